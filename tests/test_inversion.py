"""Edit-friendly DDPM inversion against an oracle built from diffusers primitives (tests/oracle.py)."""
import re
import shutil
from dataclasses import replace
from unittest import mock

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

import minledits
from minledits import InversionError
from minledits.io.image import fit_size, to_tensor
from tests import oracle
from tests.helpers import SIZE, SKIP, N, photo, run


@pytest.mark.parametrize("kind", ["tiny_sd1", "tiny_sd2v"])
@pytest.mark.parametrize("source_prompt", ["", "a photo of a cat"])
def test_inversion_matches_oracle(request, kind, source_prompt):
    ref = request.getfixturevalue(kind)
    sd = minledits.load(ref.folder)
    inv = minledits.invert(sd, photo(), source_prompt=source_prompt, source_guidance=3.5, steps=N, skip=SKIP, seed=7,
                           size=SIZE, batch_size=4)
    xts, zs = oracle.invert(ref, to_tensor(photo(), SIZE), source_prompt, 3.5, N, SKIP, seed=7)
    assert inv.timesteps == [100 * (N - 1 - k) + 1 for k in range(SKIP, N)]  # D = 1000 // N
    h = SIZE // 8
    assert inv.xts.shape == (N - SKIP + 1, 4, h, h) and inv.zs.shape == (N - SKIP, 4, h, h)
    # Latents: VAE encode differs from the reference by float32 rounding only (~1e-6 on values ~1).
    torch.testing.assert_close(inv.xts, xts[SKIP:], atol=1e-5, rtol=1e-5)
    # Noise maps divide the UNet's rounding differences (~1e-6) by sigma_t, which is ~0.03 at t = 1: ~1e-4 worst case.
    torch.testing.assert_close(inv.zs, zs[SKIP:], atol=2e-4, rtol=1e-4)
    assert torch.equal(inv.zs[-1], torch.zeros_like(inv.zs[-1]))


def test_seed_draw_order_and_determinism(sd1):
    """The noise of step k is the (N - k)-th draw of one generator: inverting with more skip keeps the same xts."""
    a = minledits.invert(sd1, photo(), steps=N, skip=SKIP, seed=3, size=SIZE, batch_size=1)
    b = minledits.invert(sd1, photo(), steps=N, skip=SKIP + 2, seed=3, size=SIZE, batch_size=1)  # same UNet batches
    assert torch.equal(a.xts[2:], b.xts) and torch.equal(a.zs[2:], b.zs)
    again = minledits.invert(sd1, photo(), steps=N, skip=SKIP, seed=3, size=SIZE, batch_size=1)
    assert torch.equal(a.xts, again.xts) and torch.equal(a.zs, again.zs)  # bit-identical on CPU
    other = minledits.invert(sd1, photo(), steps=N, skip=SKIP, seed=4, size=SIZE)
    assert not torch.equal(a.xts[0], other.xts[0])


def test_batching_does_not_change_the_result(sd1):
    one = minledits.invert(sd1, photo(), source_prompt="a cat", steps=N, skip=SKIP, size=SIZE, batch_size=1)
    many = minledits.invert(sd1, photo(), source_prompt="a cat", steps=N, skip=SKIP, size=SIZE, batch_size=5)
    torch.testing.assert_close(one.zs, many.zs, atol=1e-4, rtol=1e-4)  # batched matmuls round differently


def test_unet_runs_only_for_steps_the_edit_uses(sd1, monkeypatch):
    calls = []
    forward = sd1.unet.forward
    monkeypatch.setattr(sd1.unet, "forward", lambda x, t, c: calls.append(len(x)) or forward(x, t, c))
    minledits.invert(sd1, photo(), steps=N, skip=SKIP, size=SIZE)
    assert sum(calls) == N - SKIP


@pytest.mark.parametrize("skip, batch_size", [(2, 3), (1, 4), (3, 4), (0, 5)])
def test_only_the_first_batch_may_be_partial(sd1, monkeypatch, skip, batch_size):
    """Batches end at k = N - j batch_size: ceil((N - skip) / batch_size) calls, whatever the skip."""
    calls = []
    forward = sd1.unet.forward
    monkeypatch.setattr(sd1.unet, "forward", lambda x, t, c: calls.append(len(x)) or forward(x, t, c))
    minledits.invert(sd1, photo(), steps=10, skip=skip, size=SIZE, batch_size=batch_size)
    n = 10 - skip
    assert calls == [n % batch_size] * (n % batch_size > 0) + [batch_size] * (n // batch_size)


@pytest.mark.parametrize("bad", [dict(skip=10), dict(skip=-1), dict(steps=0), dict(source_guidance=float("nan")),
                                 dict(size=100), dict(batch_size=0), dict(batch_size=-2), dict(batch_size=1.5),
                                 dict(image=np.zeros((0, 0, 3), np.uint8)), dict(image=np.zeros((64, 0, 3), np.uint8)),
                                 dict(image=Image.new("RGB", (4096, 64)), keep_aspect=True),
                                 dict(zero_noise_steps=N - SKIP + 1)])
def test_bad_parameters_fail_before_any_unet_work(sd1, monkeypatch, bad):
    monkeypatch.setattr(sd1, "unet", lambda *a: pytest.fail("the UNet ran"))
    if "image" in bad:  # a picture is read after the model's size check (which reads the VAE's config)
        monkeypatch.setattr(sd1, "encode", lambda *a: pytest.fail("the VAE ran"))
    else:
        monkeypatch.setattr(sd1, "vae", None)  # nor the VAE
    image = bad.pop("image", photo())
    with pytest.raises(ValueError) as e:
        minledits.invert(sd1, image, **{**dict(steps=N, skip=SKIP, size=SIZE), **bad})
    assert "\n" not in str(e.value)


def test_a_vae_that_downscales_by_2(tiny_sd1, sd1, tmp_path):
    """diffusers' own tiny test pipelines use a two-level VAE (latent = image / 2): such a model inverts and edits,
    the shape check reading the factor from the inversion itself; an inversion of another factor is refused by name."""
    folder = tmp_path / "m"
    shutil.copytree(tiny_sd1.folder, folder, ignore=shutil.ignore_patterns("vae"))
    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=[32, 32], down_block_types=["DownEncoderBlock2D"] * 2,
                  up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, layers_per_block=1,
                  sample_size=SIZE).save_pretrained(folder / "vae")
    sd = minledits.load(folder)
    assert sd.latent_scale == 2
    inv = minledits.invert(sd, photo(), steps=N, skip=SKIP, size=SIZE, seed=1, source_prompt="a cat")
    assert inv.xts.shape[-2:] == (SIZE // 2, SIZE // 2) and inv.latent_scale == 2
    for w0 in (minledits.edit(sd, inv, concepts="glasses"), minledits.p2p.edit(sd, inv, "a dog", cross_replace=0.5)):
        assert w0.shape == inv.w0.shape and w0.isfinite().all()
    with pytest.raises(InversionError, match="latents 1/2 of its image's size; this model's VAE makes 1/8"):
        minledits.edit(sd1, inv)


@pytest.mark.parametrize("sampler, steps, skip", [("ddpm", 100, 36), ("ddpm", 10, 4), ("ddpm", 50, 18),
                                                  ("dpmsolver++", 57, 7), ("dpmsolver++", 10, 1)])
def test_skip_none_keeps_the_methods_proportion(sampler, steps, skip):
    """skip=None (the default) is LEDITS' 36 of 100 steps for ddpm, and for dpmsolver++ LEDITS++' skip fraction 0.15
    as the pipeline reads it (int(n * 1.15) steps, all but n skipped); a given skip stays a count."""
    assert minledits.InversionSettings(steps=steps, sampler=sampler).skip == skip
    assert minledits.InversionSettings(steps=steps, sampler=sampler, skip=3).skip == 3
    assert minledits.p2p.default_skip(100) == 12 and minledits.p2p.default_skip(10) == 1


def test_steps_without_skip_invert(sd1):
    inv = minledits.invert(sd1, photo(), steps=10, size=SIZE)
    assert inv.settings.skip == 4 and len(inv.zs) == 6


@pytest.mark.parametrize("picture, size, fitted", [((4096, 64), 64, None), ((64, 4096), 512, None),
                                                   ((3000, 2000), 512, (512, 320)), ((1000, 100), 512, (512, 64)),
                                                   ((600, 400), 128, (128, 64)), ((3000, 2000), 64, (64, 64))])
def test_keep_aspect_refuses_to_stretch_a_picture(picture, size, fitted):
    if fitted:
        assert fit_size(*picture, size, True) == fitted
    else:
        with pytest.raises(ValueError, match=f"a {picture[0]}x{picture[1]} px picture cannot keep its aspect ratio"):
            fit_size(*picture, size, True)


def test_zero_noise_steps_counts_at_most_the_maps_the_edit_runs_on(sd1, tmp_path, capsys):
    """The last zero_noise_steps of the N - skip maps are 0: as many as there are zeroes them all; more is refused in
    one line (it zeroed them all without a word), through the API and the command line, before any UNet work."""
    inv = minledits.invert(sd1, photo(), steps=N, skip=SKIP, size=SIZE, zero_noise_steps=N - SKIP)
    assert len(inv.zs) == N - SKIP and not inv.zs.any()
    with pytest.raises(ValueError, match=rf"^zero_noise_steps {N} is more than the {N - SKIP} noise maps the edit "
                                         rf"runs on \(steps {N} - skip {SKIP}\)$"):
        minledits.invert(sd1, photo(), steps=N, skip=SKIP, size=SIZE, zero_noise_steps=N)
    photo().save(tmp_path / "in.png")
    with mock.patch.object(minledits.inversion, "noise_maps", side_effect=AssertionError("the UNet ran")):
        rc, _, err = run(capsys, "invert", tmp_path / "in.png", "-o", tmp_path / "inv.safetensors", "--model",
                         sd1.model_id, "--device", "cpu", "--size", SIZE, "--steps", 6, "--skip", 2,
                         "--zero-noise-steps", 5)
    assert rc == 1 and err.count("\n") == 1 and re.search("zero_noise_steps 5 is more than the 4 noise maps", err), err
    assert not (tmp_path / "inv.safetensors").exists()


def test_the_default_zero_noise_steps_is_at_most_the_maps():
    """SDXL's dpmsolver++ zeroes 3 maps by default (its pipeline's num_zero_noise_steps): with fewer maps, all of them
    (the count recorded is theirs, not a count the settings refuse)."""
    s = minledits.inversion.InversionSettings(steps=4, skip=2, sampler="dpmsolver++")
    sdxl = mock.Mock(spec=minledits.model.StableDiffusionXL)
    assert minledits.inversion.with_zero_noise_steps(s, sdxl).zero_noise_steps == 2
    assert minledits.inversion.with_zero_noise_steps(replace(s, steps=10), sdxl).zero_noise_steps == 3

"""sampler="ddim", the deterministic DDIM inversion and its regeneration, against diffusers' DDIMInverseScheduler and
DDIMScheduler(eta 0) on the tiny models (tests/oracle_ddim.py), and Prompt-to-Prompt on it ("DDIM + P2P") against
the reference controller of tests/oracle_p2p.py driven by DDIM steps.

Relative error: ||ours - theirs|| / ||theirs|| per latent. The DDIM step and its inverse use the schedulers' float32
arithmetic, so with equal model outputs the latents are the same bits; what is left is the UNet's own rounding
between batch layouts (one row against two) and the VAE's."""
import json

import numpy as np
import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler
from PIL import Image

import minledits
from minledits import InversionSettings, ledits, p2p
from minledits.ddim import DDIM
from minledits.io import store
from minledits.io.image import to_tensor
from minledits.sampler import SAMPLERS
from minledits.schedule import Schedule
from tests import hub, oracle, oracle_ddim, oracle_p2p, reconstruction
from tests.helpers import SIZE, N, deep, photo, run

pytestmark = pytest.mark.usefixtures("one_thread")
SRC, TARGET = "a cat sitting on a mat", "a dog sitting on a mat"
SD15 = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "trained_betas": None, "clip_sample": False}


def relative(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """The worst over the leading axis of ||ours - theirs|| / ||theirs||."""
    return ((ours - theirs).flatten(1).norm(dim=1) / theirs.flatten(1).norm(dim=1)).max().item()


# ------------------------------------------------------------------------------------------- the sampler
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing, offset, alpha_one", [("leading", 1, False), ("leading", 0, True),
                                                        ("trailing", 0, False), ("trailing", 1, True)])
@pytest.mark.parametrize("steps", [1, 7, 10, 50])
def test_steps_equal_the_schedulers(steps, spacing, offset, alpha_one, prediction_type):
    """Timesteps, step (DDIMScheduler.step, eta 0) and unstep (DDIMInverseScheduler.step) on random tensors: the same
    bits, for every k, both prediction types, both spacings, steps_offset and set_alpha_to_one either way."""
    cfg = dict(SD15, timestep_spacing=spacing, steps_offset=offset, set_alpha_to_one=alpha_one,
               prediction_type=prediction_type)
    ours = DDIM(Schedule(cfg), steps)
    forward, inverse = DDIMScheduler(**cfg), DDIMInverseScheduler(**cfg)
    forward.set_timesteps(steps)
    inverse.set_timesteps(steps)
    assert ours.timesteps == forward.timesteps.tolist() == inverse.timesteps.flip(0).tolist()
    g = torch.Generator().manual_seed(steps)
    for k, t in enumerate(ours.timesteps):
        x, out = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
        assert torch.equal(ours.step(k, x, out, torch.zeros_like(x)), forward.step(out, t, x, eta=0.0).prev_sample)
        assert torch.equal(ours.unstep(k, x, out), inverse.step(out, t, x).prev_sample)
        assert torch.equal(ours.noise_map(k, x, x, out), torch.zeros_like(x))


def test_settings():
    """Default skip 0 (the DDIM + P2P baseline's), for Prompt-to-Prompt too; the options about noise maps refused
    (every map is 0); 'linspace' refused (DDIMInverseScheduler has none)."""
    assert InversionSettings(sampler="ddim", steps=50).skip == 0 == p2p.default_skip(50, "ddim")
    assert p2p.default_skip(100) == 12 and SAMPLERS["ddim"] is DDIM and DDIM.trajectory
    for bad in (dict(keep_last_noise=True), dict(zero_noise_steps=1)):
        with pytest.raises(ValueError, match="no meaning for the ddim sampler: its noise maps are all 0"):
            InversionSettings(sampler="ddim", **bad)
    with pytest.raises(ValueError, match="'leading' or 'trailing' timestep_spacing, not 'linspace'"):
        DDIM(Schedule(dict(SD15, timestep_spacing="linspace")), 10)


# ------------------------------------------------------------------------------------------- inversion, regeneration
@pytest.mark.parametrize("kind", ["tiny_sd1", "tiny_sd2v"])
@pytest.mark.parametrize("source_prompt", ["", "a photo of a cat"])
@pytest.mark.parametrize("skip", [0, 3])
def test_inversion_and_regeneration_match_the_oracle(request, kind, source_prompt, skip):
    """Every inverted latent, then every latent of the regeneration with the source prompt and guidance (none without
    a source prompt), within 1e-5 relative (seen: 0 with a source prompt, whose UNet batches have the same layout;
    <= 1.3e-6 inverted and <= 9e-6 regenerated without one)."""
    ref = request.getfixturevalue(kind)
    sd = minledits.load(ref.folder)
    inv = minledits.invert(sd, photo(), sampler="ddim", source_prompt=source_prompt, source_guidance=3.5, steps=N,
                           skip=skip, size=SIZE)
    theirs = oracle_ddim.invert(ref, to_tensor(photo(), SIZE), source_prompt, 3.5, N, skip)
    assert inv.timesteps == [100 * (N - 1 - k) + 1 for k in range(skip, N)]
    assert inv.xts.shape == theirs.shape == (N - skip + 1, 4, SIZE // 8, SIZE // 8)
    assert relative(inv.xts, theirs) <= 1e-5
    assert not inv.zs.any() and inv.zs.shape == (N - skip, 4, SIZE // 8, SIZE // 8)
    s = 3.5 if source_prompt else 1.0
    steps = []
    ledits.edit(sd, inv, target_prompt=source_prompt, target_guidance=s, callback=steps.append)
    again = oracle_ddim.regenerate(ref, inv.xts[:1], N, skip, [source_prompt], [s])
    assert len(steps) == len(again) == N - skip
    assert max(relative(st.x_prev, x) for st, x in zip(steps, again)) <= 1e-5


def test_a_larger_skip_is_a_slice(sd1):
    """The trajectory runs from w0 up: stopping earlier gives the same tensors, bit for bit, and the UNet runs once per
    inverted step, one row without a source prompt."""
    rows = []
    hook = sd1.unet.register_forward_pre_hook(lambda module, args: rows.append(len(args[0])))
    try:
        full = minledits.invert(sd1, photo(), sampler="ddim", steps=N, size=SIZE)
    finally:
        hook.remove()
    part = minledits.invert(sd1, photo(), sampler="ddim", steps=N, skip=3, size=SIZE)
    assert rows == [1] * N and full.settings.skip == 0
    assert torch.equal(full.xts[3:], part.xts) and full.timesteps[3:] == part.timesteps


def test_the_settings_object_spelling_and_the_file(sd1, tmp_path):
    """invert(sd, image, InversionSettings(sampler="ddim", ...)) is invert(sd, image, sampler="ddim", ...); the file
    keeps it (zero_noise_steps None), and an edit of the file is the edit of the inversion."""
    a = minledits.invert(sd1, photo(), InversionSettings(sampler="ddim", steps=N, size=SIZE, source_prompt=SRC))
    b = minledits.invert(sd1, photo(), sampler="ddim", steps=N, size=SIZE, source_prompt=SRC)
    assert torch.equal(a.xts, b.xts) and a.settings == b.settings and a.settings.zero_noise_steps is None
    store.save(a, tmp_path / "inv.safetensors")
    back = store.load(tmp_path / "inv.safetensors")
    assert back.settings == a.settings and torch.equal(back.xts, a.xts) and not back.zs.any()
    assert torch.equal(p2p.edit(sd1, back, TARGET), p2p.edit(sd1, a, TARGET))
    with pytest.raises(TypeError, match="must be an InversionSettings"):
        minledits.invert(sd1, photo(), {"sampler": "ddim"})


def test_ddpm_is_unchanged_by_the_settings_object(sd1):
    s = InversionSettings(steps=N, skip=3, size=SIZE, seed=1)
    assert torch.equal(minledits.invert(sd1, photo(), s).zs, minledits.invert(sd1, photo(), steps=N, skip=3,
                                                                           size=SIZE, seed=1).zs)


# ------------------------------------------------------------------------------------------- DDIM + P2P
@pytest.fixture(scope="module")
def deep_model(tmp_path_factory):
    """A tiny SD 1.x UNet with cross-attention on 3 levels at 192 px (as test_p2p.py's), inverted with DDIM."""
    ref = deep("tiny-sd1", tmp_path_factory.mktemp("deep"), 24)
    sd = minledits.load(ref.folder)
    return ref, sd, minledits.invert(sd, photo(), sampler="ddim", steps=N, size=192, source_prompt=SRC,
                                     source_guidance=1.0)


@pytest.mark.parametrize("target, reweight, blend, s_src", [
    (TARGET, None, None, None), ("a fluffy cat sitting on a red mat", None, None, 7.5),
    (TARGET, {"dog": 2.0}, ("cat", "dog"), 7.5)])
def test_ddim_p2p_equals_the_reference(deep_model, target, reweight, blend, s_src):
    """Both rows' latents at every step against the reference controller driven by DDIMScheduler(eta 0) from the
    inversion's x_T (the baseline: inverted with the conditional estimate alone, s_src = 1, edited at 7.5 in both
    rows through source_guidance=). Tolerance as test_p2p.py's: the reference's separate unconditional and conditional
    calls round otherwise than our one batch, amplified by the guidance (seen <= 1.0e-5 relative, 1e-4 absolute)."""
    ref, sd, inv = deep_model
    steps = []
    ours = p2p.edit(sd, inv, target, target_guidance=7.5, reweight=reweight, local_blend=blend, source_guidance=s_src,
                    callback=steps.append)
    tokenizer, prompts = oracle.tokenizer(ref.folder), [SRC, target]
    kind = "replace" if len(SRC.split(" ")) == len(target.split(" ")) else "refine"
    ctrl = oracle_p2p.Controller(tokenizer, prompts, N, 0.6, 0.2, kind, reweight,
                                 [w.split() for w in blend] if blend else None, (6, 6), 0.3)
    before = dict(ref.unet.attn_processors)
    oracle_p2p.register(ref.unet, ctrl)
    try:
        theirs = oracle_ddim.regenerate(ref, inv.xts[:1], N, 0, prompts, [s_src or 1.0, 7.5], ctrl)
    finally:
        ref.unet.set_attn_processor(before)
    assert len(steps) == len(theirs) == N
    for st, x in zip(steps, theirs):
        torch.testing.assert_close(st.x_prev, x, atol=1e-4, rtol=1e-4)
    print(f"DDIM + P2P: worst relative {max(relative(st.x_prev, x) for st, x in zip(steps, theirs)):.2e}")
    assert torch.equal(ours, steps[-1].x_prev[1:])


def test_cli_ddim_p2p_is_p2p_edit(deep_model, tmp_path, capsys):
    """edit --sampler ddim --method p2p writes the decoded p2p.edit of its inversion (read back from
    --save-inversion); the PNG records the sampler."""
    ref, sd, _ = deep_model
    photo().save(tmp_path / "in.png")
    rc, _, err = run(capsys, "edit", tmp_path / "in.png", "-o", tmp_path / "out.png", "--model", ref.folder,
                     "--sampler", "ddim", "--method", "p2p", "--steps", N, "--skip", 0, "--size", 64,
                     "--source-prompt", SRC, "--source-guidance", 1, "--target-prompt", TARGET, "--target-guidance",
                     7.5, "--save-inversion", tmp_path / "inv.safetensors", "-q")
    assert rc == 0, err
    inv = store.load(tmp_path / "inv.safetensors")
    assert inv.settings.sampler == "ddim" and inv.settings.skip == 0 and not inv.zs.any()
    w0 = p2p.edit(sd, inv, TARGET, target_guidance=7.5)
    assert np.array_equal(np.asarray(minledits.decode(sd, w0)), np.asarray(Image.open(tmp_path / "out.png")))
    said = json.loads(Image.open(tmp_path / "out.png").text["minledits"])
    assert said["sampler"] == "ddim" and said["method"] == "p2p" and "--sampler=ddim" in \
        Image.open(tmp_path / "out.png").text["parameters"]


@pytest.mark.parametrize("extra, message", [
    (["--keep-last-noise"], "keep_last_noise has no meaning for the ddim sampler"),
    (["--zero-noise-steps", "1"], "zero_noise_steps has no meaning for the ddim sampler")])
def test_cli_refuses_noise_map_options(tmp_path, capsys, extra, message):
    photo().save(tmp_path / "in.png")
    rc, _, err = run(capsys, "invert", tmp_path / "in.png", "-o", tmp_path / "i.safetensors", "--model", "random-tiny",
                     "--sampler", "ddim", "--steps", 4, "--size", 64, "-q", *extra)
    assert rc == 1 and len(err.splitlines()) == 1 and message in err and not (tmp_path / "i.safetensors").exists()


def test_the_reconstruction_table(tiny_sd1):
    """tests/reconstruction.py on the tiny model (64 px, 3 steps): the exact DDPM inversion regenerates w0, the DDIM
    inversion does not (its eps is taken one latent early), and the VAE row is the input's own ceiling."""
    sd = minledits.load(tiny_sd1.folder)
    found = reconstruction.measure(sd, photo(), 3, 64, SRC, [3.5])
    assert found["VAE alone", None][0] == 0 and found["VAE alone", None][3] == float("inf")
    assert found["DDPM, exact", 3.5][0] < 1e-3 < found["DDIM", 3.5][0]
    assert "| 3 | DDIM | 3.5 |" in reconstruction.table(found, 3)


@pytest.mark.parametrize("source_prompt", ["", SRC])
def test_sdxl_inversion_matches_the_oracle(tiny_xl, source_prompt):
    """SDXL (tests/hub.py tiny-sdxl): every inverted latent against DDIMInverseScheduler driving the diffusers SDXL
    UNet with our text conditioning (equal to the SDXL pipeline's: test_sdxl.py) and the picture's time_ids."""
    ref, sd = tiny_xl
    inv = minledits.invert(sd, photo(), sampler="ddim", steps=N, size=SIZE, source_prompt=source_prompt)
    text = sd.text_embeddings(["", source_prompt])
    theirs = oracle_ddim.invert(ref, to_tensor(photo(), SIZE), source_prompt, 3.5, N, 0, xl_text=text)
    assert relative(inv.xts, theirs) <= 1e-5 and not inv.zs.any()


@pytest.fixture(scope="module")
def tiny_xl(tmp_path_factory):
    ref = hub.make("tiny-sdxl", tmp_path_factory.mktemp("tiny-sdxl"))
    return ref, minledits.load(ref.folder)


def test_a_ddim_file_with_noise_maps_is_refused(sd1, tmp_path):
    """A file that says ddim but holds non-zero maps is no inversion this version made: one line."""
    inv = minledits.invert(sd1, photo(), sampler="ddim", steps=4, size=SIZE)
    inv.zs = torch.ones_like(inv.zs)
    store.save(inv, tmp_path / "bad.safetensors")
    with pytest.raises(minledits.InversionFileError, match="a ddim inversion's noise maps are all 0, its are not"):
        store.load(tmp_path / "bad.safetensors")

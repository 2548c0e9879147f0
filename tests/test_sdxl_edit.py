"""LEDITS and LEDITS++ on Stable Diffusion XL (tests/hub.py "tiny-sdxl": attention at 1/2 and 1/4 of the latent
side, as SDXL's) against diffusers' LEditsPPPipelineStableDiffusionXL and the SDXL UNet.

The pipeline is built on the reference modules with one patch (tests/oracle.leditspp_xl_pipeline): its
__call__ sums each concept's own tokens into its attention map (diffusers 0.42.1 reports the padded length 77, so
it sums tokens 1..75). Pictures are square here: the pipeline swaps height and width in its time_ids (invert sets
size = (w * 8, h * 8) from latents [.., h, w]), ours are (H, W) as SDXL was trained; square sizes agree.
"""
import re
import sys
import warnings

import pytest
import torch

import minledits
import minledits.inversion
import minledits.io.store
from minledits import ledits, leditspp, parity
from minledits.io.image import to_tensor
from minledits.parity import TextKV
from minledits.sega import Concept
from tests import bench, bitwise, hub, oracle
from tests.helpers import SIZE, aligned, batch_dependent, photo, run

pytestmark = pytest.mark.usefixtures("one_thread")
CONCEPTS = [Concept("glasses", scale=5.0, threshold=0.8, warmup=0),
            Concept("a big beard", scale=4.0, threshold=0.7, warmup=2, cooldown=5, reverse=True)]


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    ref = hub.make("tiny-sdxl", tmp_path_factory.mktemp("tiny-sdxl"))
    return ref, minledits.load(ref.folder)


def xl_pipeline(ref, scheduler="dpmsolver++"):
    return oracle.leditspp_xl_pipeline(ref, scheduler)


def quietly(fn, *a, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **kw)


# ---- inversion ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("source_prompt", ["", "a photo of a cat"])
def test_dpmsolver_inversion_matches_the_xl_pipeline(xl, source_prompt):
    """Ours with steps = int(n (1 + f)), skip = steps - n is the pipeline's invert(n, f): the same x_T and noise maps,
    and by default the last 3 maps zeroed, as its num_zero_noise_steps (SD keeps zeroing 1)."""
    ref, sd = xl
    n, f = 8, 0.5
    steps = int(n * (1 + f))
    inv = minledits.invert(sd, photo(), sampler="dpmsolver++", steps=steps, skip=steps - n, seed=7, size=SIZE,
                           source_prompt=source_prompt, source_guidance=3.5)
    pipe = xl_pipeline(ref)
    x = to_tensor(photo(), SIZE)
    quietly(pipe.invert, image=x, source_prompt=source_prompt, source_guidance_scale=3.5, num_inversion_steps=n,
            skip=f, generator=torch.Generator().manual_seed(7), height=SIZE, width=SIZE)
    assert inv.timesteps == pipe.inversion_steps.tolist() and inv.settings.zero_noise_steps == 3
    torch.testing.assert_close(inv.xts[:1], pipe.init_latents, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(inv.zs, pipe.zs[:, 0], atol=1e-4, rtol=1e-4)
    print(f"XL inversion {source_prompt!r}: max |zs diff| {(inv.zs - pipe.zs[:, 0]).abs().max():.3g}")
    assert not inv.zs[-3:].any() and inv.zs[-4].abs().min() > 0
    assert minledits.invert(sd, photo(), sampler="ddpm", steps=6, skip=2, size=SIZE).settings.zero_noise_steps == 1


# ---- LEDITS++ -----------------------------------------------------------------------------------------------------
def run_both(ref, sd, inv, sampler, mask, forced):
    """(ours, theirs, trace, the pipeline's own latents per step). forced: every pipeline step starts from our
    x_t (its callback puts our x_{t-1} in place of its own), so each step compares alone."""
    trace = []
    ours = leditspp.edit(sd, inv, concepts=CONCEPTS, mask=mask, callback=trace.append)
    pipe = xl_pipeline(ref, sampler)
    pipe.scheduler.config.timestep_spacing = "leading"
    pipe.scheduler.set_timesteps(inv.settings.steps)
    pipe.inversion_steps = pipe.scheduler.timesteps[inv.settings.skip:]
    assert pipe.inversion_steps.tolist() == inv.timesteps
    pipe.init_latents, pipe.zs, pipe.eta, pipe.batch_size = inv.xts[:1].clone(), inv.zs[:, None].clone(), 1.0, 1
    pipe.size = (SIZE, SIZE)
    theirs = oracle.leditspp_call(pipe, CONCEPTS, mask, inv.settings.steps, trace if forced else None)
    return ours, theirs, trace, pipe.own, pipe


@pytest.mark.parametrize("sampler, mask, skip", [("dpmsolver++", "intersect", 2), ("dpmsolver++", "intersect", 0),
                                               ("ddpm", "cross_attention", 2)])
def test_leditspp_equals_the_xl_pipeline(xl, sampler, mask, skip):
    """Teacher forced, each step's x_{t-1} and each concept's mask equal the pipeline's (1e-5: UNet rounding ~1e-6
    scaled by s_c <= 5); free running, the final latents within 1e-4 (the pipeline computes every layer's attention
    probabilities explicitly, we keep the fused kernel where no mask reads them). At skip 0 the edit starts above
    t = 800, where the SD pipeline's intersect mode takes the attention mask alone (leditspp.T_INTERSECT) and the XL
    pipeline intersects: ours follows each family's."""
    ref, sd = xl
    inv = minledits.invert(sd, photo(), sampler=sampler, steps=10, skip=skip, size=SIZE, seed=5)
    assert (max(inv.timesteps) > leditspp.T_INTERSECT) == (skip == 0)
    ours, _, trace, own, pipe = run_both(ref, sd, inv, sampler, mask, forced=True)
    xs = torch.cat([st.x_prev for st in trace])
    torch.testing.assert_close(xs, own, atol=1e-5, rtol=1e-5)
    for st in trace:
        for c in range(len(CONCEPTS)):
            expected = pipe.activation_mask[st.i, c].to(st.M) if st.on[c] else torch.zeros_like(st.M[c])
            assert torch.equal(st.M[c], expected), (st.i, c)
    assert trace[0].attn.shape == (2, 2, 2)   # the maps at 1/4 of the 8x8 latent, as the pipeline reads them
    ours, theirs, *_ = run_both(ref, sd, inv, sampler, mask, forced=False)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    print(f"XL LEDITS++ {sampler} {mask}: forced {(xs - own).abs().max():.3g}, free {(ours - theirs).abs().max():.3g}")


def test_from_the_photo_with_the_pipelines_kernel_and_batch_1_both_are_bit_identical(xl):
    """As on SD (tests/test_leditspp.py): with the attention kernel the XL pipeline sets (explicit_attention) and
    batch_size 1 (its invert's recurrence), each path inverts the photo and edits it; the noise maps, every step and
    the final latents are equal bit for bit. Also where a prompt's embedding depends on its batch, as on CUDA
    (helpers.batch_dependent): both embed the concepts together, apart from the empty prompt."""
    ref, _ = xl
    sd, (n, f), trace = minledits.load(ref.folder), (8, 0.25), []
    aligned(sd.unet)
    with batch_dependent(sd.text_encoder, sd.text_encoder_2, ref.text_encoder, ref.text_encoder_2):
        with parity.pipeline_attention(sd):
            inv = minledits.invert(sd, photo(), sampler="dpmsolver++", steps=10, skip=2, size=SIZE, seed=5,
                                   batch_size=1)
            ours = leditspp.edit(sd, inv, concepts=CONCEPTS, mask="cross_attention", callback=trace.append)
        pipe = xl_pipeline(ref)
        quietly(pipe.invert, image=to_tensor(photo(), SIZE), num_inversion_steps=n, skip=f,
                generator=torch.Generator().manual_seed(5), height=SIZE, width=SIZE)
        assert inv.timesteps == pipe.inversion_steps.tolist()
        assert torch.equal(inv.xts[:1], pipe.init_latents) and torch.equal(inv.zs, pipe.zs[:, 0])
        theirs = oracle.leditspp_call(pipe, CONCEPTS, "cross_attention", inv.settings.steps)
    assert torch.equal(torch.cat([st.x_prev for st in trace]), pipe.own) and torch.equal(ours, theirs)


def test_the_device_check_script_reads_zero_on_tiny_sdxl(xl, monkeypatch, capsys):
    """tests/bitwise.py, the script a GPU loan runs (a broken one costs device time), on this tiny SDXL: every
    comparison of ours with the reference it prints reads 0.00e+00 on CPU (the rows of a batch against their own
    call, which it prints too, are left out: they compare one path with itself)."""
    ref, _ = xl
    monkeypatch.setattr(bench, "model_folder", lambda kind: ref.folder)
    monkeypatch.setattr(sys, "argv", ["bitwise", "--kind", "tiny-sdxl", "--size", str(SIZE)])
    bitwise.main()
    out = capsys.readouterr().out.splitlines()
    lines = [line for line in out if re.match(r"(VAE|CLIP|OpenCLIP|UNet|LEDITS)", line)]
    against_ref = [part for line in lines for part in line.split(" | ") if "against its own call" not in part]
    figures = [f for part in against_ref for f in re.findall(r"\d\.\d\de[+-]\d\d", part)]
    assert len(lines) == 9 and len(figures) == 1 + 2 * 4 + 4 * 2 + 2 + 1 + 30, lines
    assert set(figures) == {"0.00e+00"}, lines


# ---- LEDITS -------------------------------------------------------------------------------------------------------
def test_ledits_reconstructs_exactly_with_keep_last_noise(xl):
    ref, sd = xl
    inv = minledits.invert(sd, photo(), steps=10, skip=3, size=SIZE, seed=1, keep_last_noise=True)
    w0 = ledits.edit(sd, inv, target_guidance=1.0)   # no guidance: the DDPM steps retrace the inversion
    torch.testing.assert_close(w0, inv.w0, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_ledits_unet_calls_equal_the_sdxl_unet(xl, monkeypatch):
    """Every UNet call of a LEDITS edit on SDXL (batched: unconditional, target and concept rows; the pooled text of
    each, zeros for ""; time_ids (64, 64, 0, 0, 64, 64)) equals diffusers' UNet on the same inputs - ours taking
    the text's keys and values computed once for the edit (a TextKV), diffusers' the text itself."""
    ref, sd = xl
    inv = minledits.invert(sd, photo(), steps=6, skip=2, size=SIZE, seed=1, source_prompt="a photo")
    calls, forward = [], sd.unet.forward

    def spy(x, t, c, **kw):
        out = forward(x, t, c, **kw)
        assert isinstance(c, TextKV) and len(c) == len(x)
        calls.append((x.clone(), t, c.context.clone(), {k: v.clone() for k, v in kw.items()}, out))
        return out
    monkeypatch.setattr(sd.unet, "forward", spy)
    ledits.edit(sd, inv, target_prompt="a man", concepts=["glasses", "-beard"])
    c, pooled = parity.embed(sd, [""], ["a man"], ["glasses", "beard"])  # SEGA's groups
    assert len(calls) == 4
    for x, t, ctx, kw, out in calls:
        assert torch.equal(ctx, c) and torch.equal(kw["text_embeds"], pooled) and not ctx[0].any()
        assert kw["time_ids"].tolist() == [[SIZE, SIZE, 0, 0, SIZE, SIZE]] * 4
        expected = ref.unet(x, t, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": kw["time_ids"]}).sample
        assert ((out - expected).abs().max() / expected.abs().max()).item() <= 1e-5


# ---- command line and defaults ------------------------------------------------------------------------------------
def test_command_line_on_sdxl(xl, tmp_path, capsys):
    """invert (dpmsolver++) then edit --method leditspp and a LEDITS edit with --vae: PNGs whose parameters line
    names the model, the VAE swap is in the fingerprint, and the edit equals the Python API's."""
    import json

    from PIL import Image
    ref, sd = xl
    photo().save(tmp_path / "photo.png")
    inv = tmp_path / "inv.safetensors"
    common = ["--model", ref.folder, "--device", "cpu", "--steps", 6, "--skip", 1, "--size", SIZE, "-q"]
    assert run(capsys, "invert", tmp_path / "photo.png", "-o", inv, *common, "--sampler", "dpmsolver++")[0] == 0
    rc, _, err = run(capsys, "edit", inv, "--model", ref.folder, "-o", tmp_path / "pp.png", "--method", "leditspp",
                     "-e", "glasses", "-q")
    assert rc == 0, err
    info = json.loads(Image.open(tmp_path / "pp.png").text["minledits"])
    assert info["zero_noise_steps"] == 3 and info["method"] == "leditspp"
    stored = minledits.io.store.load(inv)
    expected = minledits.decode(sd, leditspp.edit(sd, stored, concepts=[leditspp.concept("glasses")]))
    assert list(Image.open(tmp_path / "pp.png").getdata()) == list(expected.getdata())
    rc, _, err = run(capsys, "edit", tmp_path / "photo.png", "-o", tmp_path / "vae.png", "-e", "glasses",
                     *common, "--vae", ref.folder / "vae")
    assert rc == 0, err
    assert f"--vae={ref.folder / 'vae'}" in Image.open(tmp_path / "vae.png").text["parameters"]


def test_default_size_is_1024_for_sdxl(xl, monkeypatch):
    ref, sd = xl
    sizes = []
    monkeypatch.setattr(minledits.inversion, "noise_maps", lambda sd, s, xts, *a, **k: sizes.append(xts.shape) or
                        torch.zeros_like(xts[1:]))
    inv = minledits.invert(sd, photo(), steps=4, skip=2)
    assert inv.settings.size == 1024 and inv.image.shape[-2:] == (1024, 1024) and sizes[0][-2:] == (128, 128)
    assert sd.default_size == 1024 and minledits.load("random-tiny").default_size == 64  # SD's is 512

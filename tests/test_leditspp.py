"""minledits.leditspp.edit against diffusers' LEditsPPPipelineStableDiffusion.__call__ on the same dpmsolver++
inversion (ours, handed to the pipeline as its invert() leaves it), per mask mode, on tiny SD1 and SD2-v.

The cross-attention mask reads layers at 1/4 of the latent side (the pipeline's rule): the tiny UNets have
attention only at the latent size, so the attention modes run on a 3-level variant ("deep": down/up blocks at
h, h/2, h/4, all with cross-attention) at 128 px (16x16 latents, 4x4 maps)."""
from unittest import mock

import pytest
import torch
from diffusers import DDIMScheduler, PNDMScheduler
from diffusers.pipelines.ledits_pp import pipeline_leditspp_stable_diffusion as reference_module

import minledits
import minledits.nets.layers
from minledits import leditspp
from minledits.io.image import to_tensor
from minledits.sega import Concept
from tests import hub, oracle
from tests.helpers import SIZE, aligned, batch_dependent, deep, photo

STEPS, SKIP = 10, 1  # 9 edited steps; leading spacing: t = 811, 721, ..., 1 (the first above T_INTERSECT)
CONCEPTS = [Concept("glasses", scale=5.0, threshold=0.8, warmup=0),
            Concept("a big beard", scale=4.0, threshold=0.7, warmup=2, cooldown=5, reverse=True)]


@pytest.fixture(scope="module", params=["tiny-sd1", "tiny-sd2v"])
def deep_model(request, tmp_path_factory):
    ref = deep(request.param, tmp_path_factory.mktemp(request.param))
    return ref, minledits.load(ref.folder)


def invert(sd, size, seed=5):
    return minledits.invert(sd, photo(), sampler="dpmsolver++", steps=STEPS, skip=SKIP, size=size, seed=seed)


def pipeline(ref, inv, copy_unet=True, scheduler=PNDMScheduler):
    """oracle.leditspp_pipeline (its fix: each concept's own tokens in its attention map, where diffusers 0.42.1
    sums tokens 1..75 of the padded prompt) with our inversion set as its invert() sets it (init_latents, zs,
    inversion_steps, eta 1, the scheduler's leading timesteps); test_dpmsolver.py proves its invert equal."""
    pipe = oracle.leditspp_pipeline(ref, copy_unet=copy_unet, scheduler=scheduler)
    pipe.scheduler.config.timestep_spacing = "leading"
    pipe.scheduler.set_timesteps(STEPS)
    pipe.inversion_steps = pipe.scheduler.timesteps[SKIP:]
    assert pipe.inversion_steps.tolist() == inv.timesteps
    pipe.init_latents, pipe.zs, pipe.eta, pipe.batch_size = inv.xts[:1].clone(), inv.zs[:, None].clone(), 1.0, 1
    return pipe


def run_both(ref, sd, inv, concepts, mask, forced=True, copy_unet=True, scheduler=PNDMScheduler, **kw):
    """(ours, theirs, pipe, trace). forced: every pipeline step starts from our x_t (its callback puts our
    x_{t-1} in place of its own, which it keeps in pipe.own), so each step compares alone."""
    trace = []
    ours = leditspp.edit(sd, inv, concepts=concepts, mask=mask, callback=trace.append, **kw)
    pipe = pipeline(ref, inv, copy_unet, scheduler)
    theirs = oracle.leditspp_call(pipe, concepts, mask, STEPS, trace if forced else None, **kw)
    return ours, theirs, pipe, trace


def report(name, diffs):
    print(f"{name}: max abs diff {max(diffs):.3g}")


@pytest.mark.parametrize("mask", leditspp.MASK_MODES)
def test_masks_and_steps_equal_the_pipeline(deep_model, mask):
    """Teacher forced: each step's x_{t-1} and each concept's mask per step (the pipeline's activation_mask)
    equal. 1e-5: the estimates differ by float32 rounding of the UNet (~1e-6 of O(1) outputs), scaled by s_c
    <= 5 and the solver's coefficients (<= ~1.5)."""
    ref, sd = deep_model
    inv = invert(sd, 128)
    ours, _, pipe, trace = run_both(ref, sd, inv, CONCEPTS, mask)
    xs = torch.cat([st.x_prev for st in trace])
    torch.testing.assert_close(xs, pipe.own, atol=1e-5, rtol=1e-5)
    for st in trace:
        for c in range(len(CONCEPTS)):
            if st.on[c]:
                assert torch.equal(st.M[c], pipe.activation_mask[st.i, c].to(st.M)), (st.i, c)
            else:
                assert not st.M[c].any()
    assert any(st.t > leditspp.T_INTERSECT for st in trace) and any(st.t <= leditspp.T_INTERSECT for st in trace)
    report(f"{ref.kind} {mask} forced", [(xs - pipe.own).abs().max().item()])


@pytest.mark.parametrize("mask", leditspp.MASK_MODES)
def test_free_runs_equal_the_pipeline(deep_model, mask):
    """Whole runs, each from its own latents. With the attention masks both sides run the down/up cross-attention
    explicitly but differ elsewhere (the pipeline's AttnProcessor computes every other layer's probabilities, we
    keep the fused kernel): ~1e-6 per UNet call (the forced test's first step), scaled by s_c <= 5 and carried
    through 9 steps: atol 1e-4 (seen 4.2e-5). The noise mode runs the same kernels on both sides: bit-equal on
    one thread, but with two the kernels' reductions split differently for the two batch layouts (seen 3.0e-5).
    A value within ~1e-6 of its quantile may fall on either side of it, and the runs part there (seen once: tiny
    SD2-v intersect, step 6, 2 of 256 positions): so the runs must agree step by step until the first step
    whose mask differs, and that step's mask may differ in at most 2 positions (the forced test proves every
    step)."""
    ref, sd = deep_model
    inv = invert(sd, 128)
    ours, theirs, pipe, trace = run_both(ref, sd, inv, CONCEPTS, mask, forced=False)
    tol, diffs = 1e-4, []
    for st in trace:
        flips = sum((st.M[c] != pipe.activation_mask[st.i, c].to(st.M)).sum().item()
                    for c in range(len(CONCEPTS)) if st.on[c])
        if flips:
            assert flips <= 2 * 4, (st.i, flips)  # positions x 4 latent channels
            break
        diffs.append((st.x_prev - pipe.own[st.i]).abs().max().item())
        torch.testing.assert_close(st.x_prev, pipe.own[st.i:st.i + 1], atol=tol, rtol=tol)
    else:
        torch.testing.assert_close(ours, theirs, atol=tol, rtol=tol)
    assert len(diffs) >= len(trace) // 2, "the runs part early"
    report(f"{ref.kind} {mask} free, {len(diffs)} steps before any flip", diffs)


def test_from_the_photo_with_the_pipelines_kernel_and_batch_1_both_are_bit_identical(deep_model):
    """What the tests above tolerate is two roundings: the attention kernel, and the inversion's batching. With the
    kernel the pipeline sets for its invert and its edit (explicit_attention: diffusers' AttnProcessor, in the layers
    the masks do not read) and batch_size 1 (the pipeline's recurrence, inversion.py), each path inverts the photo
    and edits it: the noise maps, every step and the final latents are equal bit for bit. Also where a prompt's
    embedding depends on its batch, as on CUDA (helpers.batch_dependent): both embed the empty prompt alone and
    the concepts together (parity.embed)."""
    ref, _ = deep_model
    sd, (n, f), trace = minledits.load(ref.folder), (STEPS - SKIP, 0.12), []
    aligned(sd.unet)
    assert int(n * (1 + f)) == STEPS
    with batch_dependent(sd.text_encoder, ref.text_encoder):
        with minledits.parity.pipeline_attention(sd):
            inv = minledits.invert(sd, photo(), sampler="dpmsolver++", steps=STEPS, skip=SKIP, size=128, seed=5,
                                   batch_size=1)
            ours = leditspp.edit(sd, inv, concepts=CONCEPTS, mask="intersect", callback=trace.append)
        pipe = oracle.leditspp_invert(oracle.leditspp_pipeline(ref), to_tensor(photo(), 128), "", n, f, seed=5)
        assert torch.equal(inv.xts[:1], pipe.init_latents) and torch.equal(inv.zs, pipe.zs[:, 0])
        theirs = oracle.leditspp_call(pipe, CONCEPTS, "intersect", STEPS)
    assert torch.equal(torch.cat([st.x_prev for st in trace]), pipe.own) and torch.equal(ours, theirs)


@pytest.mark.parametrize("kind", ["tiny_sd1", "tiny_sd2v"])
def test_noise_mask_on_the_tiny_models(request, kind):
    """The standard tiny models (attention at the latent size only) at 64 px: the noise mode, free running
    (tolerance as in test_free_runs_equal_the_pipeline: two threads split reductions differently, seen 3.2e-5)."""
    ref = request.getfixturevalue(kind)
    sd = minledits.load(ref.folder)
    inv = invert(sd, SIZE)
    ours, theirs, _, _ = run_both(ref, sd, inv, CONCEPTS, "noise", forced=False)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    report(f"{kind} noise free", [(ours - theirs).abs().max().item()])


def test_attention_maps_come_from_the_coarsest_layers(tiny_sd1):
    """On the 2-level tiny UNet the down/up cross-attention is at the latent size: the map is 8x8 there (the
    pipeline's latent / 4 finds no layer at 2x2 and fails)."""
    sd = minledits.load(tiny_sd1.folder)
    inv, trace = invert(sd, SIZE), []
    leditspp.edit(sd, inv, concepts=CONCEPTS, mask="cross_attention", callback=trace.append)
    assert trace[0].attn.shape == (2, 8, 8) and trace[0].m_attn.shape == (2, 1, 4, 8, 8)


@pytest.mark.parametrize("mask", leditspp.MASK_MODES)
def test_concepts_do_not_leak(deep_model, mask):
    """A concept's mask and guidance in a 2-concept call equal those of a call with it alone (same x_t: the
    one-concept runs are forced onto the two-concept run's latents through a patched sampler)."""
    ref, sd = deep_model
    inv = invert(sd, 128)
    both = []
    leditspp.edit(sd, inv, concepts=CONCEPTS, mask=mask, callback=both.append)
    for c, con in enumerate(CONCEPTS):
        alone = []
        step = minledits.dpmsolver.DPMSolverPP.step
        with mock.patch.object(minledits.dpmsolver.DPMSolverPP, "step",
                               lambda self, k, x, out, z: (step(self, k, x, out, z), both[k - SKIP].x_prev)[1]):
            leditspp.edit(sd, inv, concepts=[con], mask=mask, callback=alone.append)
        for a, b in zip(alone, both):
            assert torch.equal(a.x_t, b.x_t)
            torch.testing.assert_close(a.g[0], b.g[c], atol=1e-6, rtol=1e-5)
            assert torch.equal(a.M[0], b.M[c]), (a.i, c)


def test_guidance_rescale_is_diffusers_rescale():
    """rescale() is diffusers' rescale_noise_cfg (the pipeline's own call of it fails in 0.42.1: it takes the mean
    of a tuple of concept estimates)."""
    g = torch.Generator().manual_seed(0)
    eps, eps_c = torch.randn(1, 4, 8, 8, generator=g), torch.randn(2, 1, 4, 8, 8, generator=g)
    for phi in (0.0, 0.3, 1.0):
        torch.testing.assert_close(leditspp.rescale(eps, eps_c.mean(0), phi),
                                   reference_module.rescale_noise_cfg(eps, eps_c.mean(0), phi), atol=0, rtol=0)


def test_defaults_live_in_one_place():
    assert leditspp.concept("cat") == Concept("cat", scale=5.0, threshold=0.9, warmup=0)
    assert leditspp.concept("-cat:scale=3") == Concept("cat", scale=3.0, threshold=0.9, warmup=0, reverse=True)
    assert leditspp.concept({"prompt": "cat", "warmup": 2}) == Concept("cat", scale=5.0, threshold=0.9, warmup=2)


@pytest.mark.parametrize("kw, words", [
    (dict(concepts=[{"prompt": "cat", "threshold": 1.0}]), r"threshold must be in \[0, 1\)"),
    (dict(concepts=["cat:threshold=-0.1"]), r"threshold must be in \[0, 1\)"),
    (dict(concepts=["cat"], mask="both"), "mask must be one of 'intersect', 'cross_attention', 'noise'"),
    (dict(concepts=["cat"], user_mask=torch.ones(4, 4)), r"user_mask must be a tensor of the latent size \[8, 8\]"),
    (dict(concepts=["cat"], user_mask=torch.ones(2, 1, 8, 8)), "user_mask must be a tensor of the latent size"),
    (dict(concepts=["cat"], guidance_rescale=2.0), r"guidance_rescale must be in \[0, 1\]"),
    (dict(concepts=[Concept("cat", weight=2.0)]), "LEDITS\\+\\+ has no concept weights")])
def test_bad_parameters_fail_before_any_unet_work(sd1, kw, words, monkeypatch):
    inv = invert(sd1, SIZE)
    monkeypatch.setattr(sd1, "unet", mock.Mock(side_effect=AssertionError("the UNet ran"), config=sd1.unet.config))
    monkeypatch.setattr(sd1, "text_encoder", mock.Mock(side_effect=AssertionError("the text encoder ran")))
    with pytest.raises(ValueError, match=words):
        leditspp.edit(sd1, inv, **kw)


def test_user_mask_multiplies_the_guidance(sd1):
    inv, trace, plain = invert(sd1, SIZE), [], []
    u = torch.zeros(8, 8)
    u[:, :4] = 1
    leditspp.edit(sd1, inv, concepts=CONCEPTS, mask="noise", user_mask=u, callback=trace.append)
    leditspp.edit(sd1, inv, concepts=CONCEPTS, mask="noise", callback=plain.append)
    assert torch.equal(trace[0].g, plain[0].g * u) and not trace[0].g[..., 4:].any()


def test_user_mask_equals_the_pipeline(deep_model):
    """user_mask (left half of the latent, and a grey column) against the pipeline's, intersect, teacher forced."""
    ref, sd = deep_model
    inv = invert(sd, 128)
    u = torch.zeros(16, 16)
    u[:, :8], u[:, 8] = 1, 0.5
    _, _, pipe, trace = run_both(ref, sd, inv, CONCEPTS, "intersect", user_mask=u)
    torch.testing.assert_close(torch.cat([st.x_prev for st in trace]), pipe.own, atol=1e-5, rtol=1e-5)
    assert all(torch.equal(st.M[c], pipe.activation_mask[st.i, c].to(st.M))
               for st in trace for c in range(2) if st.on[c])
    assert not any(st.g[..., 9:].any() for st in trace)


def test_ddpm_inversion_equals_the_pipeline_with_ddim(deep_model):
    """On a DDPM inversion the edit steps with DDPM, which is the pipeline's DDIMScheduler at eta 1 (its invert
    crashes there, test_dpmsolver.py; the maps are handed over as its invert leaves them, the last one kept)."""
    ref, sd = deep_model
    inv = minledits.invert(sd, photo(), sampler="ddpm", steps=STEPS, skip=SKIP, size=128, seed=5, keep_last_noise=True)
    _, _, pipe, trace = run_both(ref, sd, inv, CONCEPTS, "intersect", scheduler=DDIMScheduler)
    torch.testing.assert_close(torch.cat([st.x_prev for st in trace]), pipe.own, atol=1e-5, rtol=1e-5)
    assert all(torch.equal(st.M[c], pipe.activation_mask[st.i, c].to(st.M))
               for st in trace for c in range(2) if st.on[c])


def test_guidance_rescale_applies_to_the_guided_estimate(tiny_sd1, sd1):
    """eps = rescale(eps_u + sum_c M_c g_c, mean_c eps_c, phi) (the pipeline's own run of it fails: see above)."""
    inv, trace = invert(sd1, SIZE), []
    leditspp.edit(sd1, inv, concepts=CONCEPTS, mask="noise", guidance_rescale=0.7, callback=trace.append)
    for st in trace:
        guided = st.eps_u + (st.M * st.g).sum(0)
        torch.testing.assert_close(st.eps, leditspp.rescale(guided, st.eps_c.mean(0), 0.7), atol=0, rtol=0)
    with pytest.raises(AttributeError, match="'tuple' object has no attribute 'mean'"):
        run_both(tiny_sd1, sd1, inv, CONCEPTS, "noise", forced=False, guidance_rescale=0.7)


def test_either_sampler(sd1, inv1):
    """On a DDPM inversion (inv1) the edit steps with DDPM: without concepts it is LEDITS' unguided regeneration,
    bit for bit; with them it runs every mask mode to finite latents."""
    plain = minledits.edit(sd1, inv1, target_guidance=1.0)
    assert torch.equal(leditspp.edit(sd1, inv1), plain)
    for mask in leditspp.MASK_MODES:
        out = leditspp.edit(sd1, inv1, concepts=CONCEPTS, mask=mask)
        assert out.isfinite().all() and not torch.allclose(out, plain)


def test_other_sizes(deep_model):
    """A tall picture (64x128 px: 16x8 latents, 4x2 maps) and 192 px (6x6 maps): the map size comes from the layers
    the controller sees, and steps and masks equal the pipeline's (teacher forced)."""
    ref, sd = deep_model
    for inv in (minledits.invert(sd, photo(size=(64, 128)), sampler="dpmsolver++", steps=STEPS, skip=SKIP, size=128,
                                 seed=5, keep_aspect=True), invert(sd, 192)):
        _, _, pipe, trace = run_both(ref, sd, inv, CONCEPTS, "intersect")
        torch.testing.assert_close(torch.cat([st.x_prev for st in trace]), pipe.own, atol=1e-5, rtol=1e-5)
        assert trace[0].attn.shape[1:] == tuple(d // 4 for d in inv.xts.shape[-2:]) and all(
            torch.equal(st.M[c], pipe.activation_mask[st.i, c]) for st in trace for c in range(2) if st.on[c])


@pytest.mark.parametrize("kind", ["tiny_sd1", "tiny_sd2v"])
def test_exactly_invertible_option(request, kind):
    """keep_last_noise=True (the sigma_min grid for dpmsolver++): an edit without concepts returns w0 within 1e-5.
    Each step lands on the next x_t up to the rounding of mu + C z (~2 ulp), which the random UNet carries on:
    seen <= 6e-6 after 9 steps. batch_size=1 makes the inversion's UNet calls the edit's shape (a batch of 4 runs
    other kernels: ~1e-7 relative more per call, seen 1.3e-5). The pipeline's grid (the default) ends with
    sigma 0, where the last step lands on the x0 prediction, so no noise map makes it exact (docs/references.md)."""
    sd = minledits.load(request.getfixturevalue(kind).folder)
    errors = {}
    for exact in (False, True):
        inv = minledits.invert(sd, photo(), sampler="dpmsolver++", steps=STEPS, skip=SKIP, size=SIZE, seed=5,
                               keep_last_noise=exact, batch_size=1)
        errors[exact] = (leditspp.edit(sd, inv) - inv.w0).abs().max().item()
    print(f"{kind}: reconstruction max abs error, pipeline grid {errors[False]:.3g}, exact option {errors[True]:.3g}")
    assert errors[True] <= 1e-5 < 1e-2 < errors[False]


@pytest.mark.slow
def test_full_size_sd15(tmp_path):
    """The SD 1.5 architecture (random weights, Hub layout) at 128 px: 16x16 latents, the attention maps at 4x4
    (its coarsest down/up cross-attention), intersect masks, teacher forced as above: every step and mask equal
    the pipeline's. About 4.3 GB on disk, ~8 GB of memory (the reference and ours; the pipeline shares the
    reference UNet), ~2 minutes on 2 cores."""
    ref = hub.make("sd15", tmp_path)
    sd = minledits.load(ref.folder)
    inv = invert(sd, 128)
    _, _, pipe, trace = run_both(ref, sd, inv, CONCEPTS, "intersect", copy_unet=False)
    xs = torch.cat([st.x_prev for st in trace])
    diff = (xs - pipe.own).abs().max().item()
    report("sd15 intersect forced", [diff])
    torch.testing.assert_close(xs, pipe.own, atol=1e-4, rtol=1e-4)
    assert trace[0].attn.shape[1:] == (4, 4)
    assert all(torch.equal(st.M[c], pipe.activation_mask[st.i, c].to(st.M))
               for st in trace for c in range(2) if st.on[c])

"""The SDE-DPM-Solver++ (2M) sampler against diffusers' DPMSolverMultistepScheduler as the LEDITS++ pipeline
configures it, its noise map against its step, and invert(sampler="dpmsolver++") against
LEditsPPPipelineStableDiffusion.invert on the tiny models."""
import re

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, PNDMScheduler
from safetensors import safe_open
from safetensors.torch import save_file

import minledits
from minledits import parity
from minledits.dpmsolver import DPMSolverPP
from minledits.io import store
from minledits.io.image import to_tensor
from minledits.sampler import SAMPLERS
from minledits.schedule import Schedule
from tests import hub, oracle
from tests.helpers import SIZE, SKIP, N, aligned, batch_dependent, photo

# SD 1.5's scheduler/scheduler_config.json (a PNDMScheduler, which the pipeline replaces)
SD15 = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
        "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
        "trained_betas": None}
PREDICTIONS = ["epsilon", "v_prediction"]


def reference(config: dict, N: int, final: str = "zero") -> DPMSolverMultistepScheduler:
    """The scheduler as LEditsPPPipelineStableDiffusion builds it (__init__: from_config of a scheduler that is
    neither DDIM nor DPM) and sets it (invert: 'leading' spacing, written on the frozen config as it does);
    final: its final_sigmas_type (the pipeline's is "zero")."""
    sched = DPMSolverMultistepScheduler.from_config(PNDMScheduler.from_config(hub._clean(config)).config,
                                                    algorithm_type="sde-dpmsolver++", solver_order=2,
                                                    final_sigmas_type=final)
    sched.config.timestep_spacing = "leading"
    sched.set_timesteps(N)
    return sched


def model(ref, k, x, x0, g):
    """A model output for step k that keeps the run O(1): the eps (or v) of x for the clean latent x0, plus noise."""
    alpha, sigma = ref._sigma_to_alpha_sigma_t(ref.sigmas[k])
    eps = (x - alpha * x0) / sigma + 0.1 * torch.randn(x.shape, generator=g)
    return alpha * eps - sigma * x0 if ref.config.prediction_type == "v_prediction" else eps


def probe(ref, k, order, sample=0.0, m0=0.0, m1=0.0, noise=0.0):
    """The scheduler's own update at step k on constant tensors: reads its coefficients A, B, C, B/2 and 1/r."""
    ref._step_index, full = k, lambda v: torch.full((1,), v)
    if order == 1:
        return ref.dpm_solver_first_order_update(full(m0), sample=full(sample), noise=full(noise)).item()
    return ref.multistep_dpm_solver_second_order_update([full(m1), full(m0)], sample=full(sample),
                                                        noise=full(noise)).item()


# ------------------------------------------------------------------------------------------- the sampler
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("steps", [5, 10, 30, 50])
def test_timesteps_and_scalars_equal_the_scheduler(steps, prediction_type):
    cfg = dict(SD15, prediction_type=prediction_type)
    ref, ours = reference(cfg, steps), DPMSolverPP(Schedule(cfg), steps)
    assert ours.timesteps == ref.timesteps.tolist() == [(steps - k) * (1000 // (steps + 1)) + 1 for k in range(steps)]
    for k, s in enumerate(ours.steps):
        alpha, sigma = ref._sigma_to_alpha_sigma_t(ref.sigmas[k])
        assert (s.t, s.alpha, s.sigma) == (ref.timesteps[k], alpha.item(), sigma.item())
        assert (s.A, s.B, s.C) == (probe(ref, k, 1, sample=1), probe(ref, k, 1, m0=1), probe(ref, k, 1, noise=1))
        if k:  # the second-order term: D_1 = (m0 - m1) / r, weighted by B / 2
            assert probe(ref, k, 2, m0=1, m1=0) == torch.tensor(s.B) * 1 + torch.tensor(s.half_B) * (s.r * 1)
    assert ours.steps[-1].C == 0 and ours.steps[-1].A == 0 and ours.steps[-1].B == 1  # lands on D_{N-1}


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("steps, start, final", [
    (5, 0, "zero"), (10, 0, "zero"), (10, 3, "zero"), (30, 0, "zero"), (50, 0, "zero"), (50, 17, "zero"),
    (2, 0, "zero"), (1, 0, "zero"), (5, 0, "sigma_min"), (10, 3, "sigma_min"), (30, 0, "sigma_min")])
def test_steps_equal_the_scheduler_over_a_whole_run(steps, start, final, prediction_type):
    """Every step(k) against scheduler.step(variance_noise=z), from k = start (the scheduler, like the pipeline,
    starts its history where its first step is): first order at k = start, second order, first order at the
    end (final sigma 0; lower_order_final for N < 15; with final sigma_min second order from N = 15). The same
    float32 operations in the same order: bit-equal."""
    cfg = dict(SD15, prediction_type=prediction_type)
    ref, ours = reference(cfg, steps, final), DPMSolverPP(Schedule(cfg), steps, final)
    g = torch.Generator().manual_seed(steps)
    x0 = torch.randn(2, 4, 8, 8, generator=g)
    x = ours.add_noise(start, x0, torch.randn(2, 4, 8, 8, generator=g))
    ref_x, worst = x.clone(), 0.0
    for k in range(start, steps):
        out, z = model(ref, k, x, x0, g), torch.randn(2, 4, 8, 8, generator=g)
        ref_x = ref.step(out, ref.timesteps[k], ref_x, variance_noise=z).prev_sample
        x = ours.step(k, x, out, z)
        worst = max(worst, (x - ref_x).abs().max().item())
    assert worst == 0, worst
    assert x.abs().max() < 10  # the run stayed O(1): the comparison meant something


def test_zero_snr_and_the_longest_grid():
    """rescale_betas_zero_snr: the scheduler sets abar_{T-1} = 2^-24; N = T - 2 is the first grid to visit T - 1."""
    cfg = dict(SD15, rescale_betas_zero_snr=True, prediction_type="v_prediction")
    ref, ours, g = reference(cfg, 998), DPMSolverPP(Schedule(cfg), 998), torch.Generator().manual_seed(0)
    assert ours.timesteps[0] == 999
    x0 = torch.randn(1, 4, 4, 4, generator=g)
    x = ref_x = ours.add_noise(0, x0, torch.randn(1, 4, 4, 4, generator=g))
    for k in range(998):
        out, z = model(ref, k, x, x0, g), torch.randn(1, 4, 4, 4, generator=g)
        ref_x, x = ref.step(out, ref.timesteps[k], ref_x, variance_noise=z).prev_sample, ours.step(k, x, out, z)
        assert torch.equal(x, ref_x), k


def test_add_noise_equals_the_scheduler():
    ref, ours, g = reference(SD15, 9), DPMSolverPP(Schedule(SD15), 9), torch.Generator().manual_seed(0)
    x0, noise = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    for k, t in enumerate(ref.timesteps):  # as the pipeline's invert calls it: a float timestep
        assert torch.equal(ours.add_noise(k, x0, noise), ref.add_noise(x0, noise, torch.Tensor([t])))


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("steps, skip", [(9, 3), (30, 0)])
def test_noise_map_inverts_step(steps, skip, prediction_type):
    """Inversion-style: independent x_{tau_k}, maps computed in order, then a fresh run of steps from k = skip
    lands on each x_{tau_{k+1}}: mu + C ((x - mu) / C) rounds three times, so within a few ulps of |x| <= 4
    (ulp 2.4e-7; measured <= 4.8e-7).
    The last step has C = 0: its map is 0 and it lands on D_{N-1}."""
    cfg = dict(SD15, prediction_type=prediction_type)
    ref, g = reference(cfg, steps), torch.Generator().manual_seed(1)
    x0 = torch.randn(1, 4, 8, 8, generator=g)
    inverse = DPMSolverPP(Schedule(cfg), steps)
    xts = torch.cat([inverse.add_noise(k, x0, torch.randn(1, 4, 8, 8, generator=g)) for k in range(skip, steps)] + [x0])
    outs = torch.cat([model(ref, k, xts[j:j + 1], x0, g) for j, k in enumerate(range(skip, steps))])
    zs = torch.cat([inverse.noise_map(k, xts[j:j + 1], xts[j + 1:j + 2], outs[j:j + 1])
                    for j, k in enumerate(range(skip, steps))])
    batched = DPMSolverPP(Schedule(cfg), steps)  # slices, as inversion.noise_maps passes its UNet batches
    assert torch.equal(torch.cat([batched.noise_map(slice(skip + a, min(skip + a + 4, steps)), xts[a:a + 4],
                                                    xts[a + 1:a + 5], outs[a:a + 4])
                                  for a in range(0, steps - skip, 4)]), zs)
    forward = DPMSolverPP(Schedule(cfg), steps)
    for j, k in enumerate(range(skip, steps)):
        x_prev = forward.step(k, xts[j:j + 1], outs[j:j + 1], zs[j:j + 1])
        if k < steps - 1:
            torch.testing.assert_close(x_prev, xts[j + 1:j + 2], atol=1e-6, rtol=0)
    assert torch.equal(zs[-1], torch.zeros_like(zs[-1]))
    assert torch.equal(x_prev, forward.x0_hat(steps - 1, xts[-2:-1], outs[-1:]))


def test_sigma_min_grid_has_a_last_noise_map():
    """final "sigma_min": the scalars of the last step equal the scheduler's, C_{N-1} > 0, so noise_map inverts
    the last step as every other (the exactly invertible option); a bad name is refused."""
    ref, ours = reference(SD15, 12, "sigma_min"), DPMSolverPP(Schedule(SD15), 12, "sigma_min")
    s = ours.steps[-1]
    assert (s.A, s.B, s.C) == (probe(ref, 11, 1, sample=1), probe(ref, 11, 1, m0=1), probe(ref, 11, 1, noise=1))
    assert s.C > 0 and ours.timesteps == DPMSolverPP(Schedule(SD15), 12).timesteps
    g = torch.Generator().manual_seed(0)
    x, x_prev, out = (torch.randn(1, 4, 4, 4, generator=g) for _ in range(3))
    z = ours.noise_map(11, x, x_prev, out)
    ours.reset()
    torch.testing.assert_close(ours.step(11, x, out, z), x_prev, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="final must be 'zero' or 'sigma_min', got 'one'"):
        DPMSolverPP(Schedule(SD15), 12, "one")


def test_history_order():
    """k ascending by one from the run's first step; a repeat of k is allowed (noise_map, then step); reset()."""
    s, x = DPMSolverPP(Schedule(SD15), 10), torch.randn(1, 4, 2, 2)
    s.step(2, x, x, x)
    s.noise_map(3, x, x, x)
    first = s.step(3, x, x, x)
    assert torch.equal(s.step(3, x, x, x), first)  # the same k again: the same D_{k-1}, the same result
    with pytest.raises(ValueError, match="after step 3: its calls must come for k ascending by one"):
        s.step(5, x, x, x)
    s.reset()
    s.step(5, x, x, x)  # a new run: first order
    fresh = DPMSolverPP(Schedule(SD15), 10)
    assert torch.equal(fresh.step(3, x, x, x), DPMSolverPP(Schedule(SD15), 10).step(3, x, x, x))
    assert not torch.equal(fresh.step(3, x, x, x), first)  # first order, unlike the run that came from k = 2


@pytest.mark.parametrize("bad, words", [(dict(use_karras_sigmas=True), "use_karras_sigmas must be False"),
                                        (dict(final_sigmas_type="sigma_min"), "final_sigmas_type must be 'zero'"),
                                        (dict(solver_type="heun"), "solver_type must be 'midpoint'")])
def test_options_it_does_not_implement_are_refused(bad, words):
    with pytest.raises(ValueError, match=words):
        DPMSolverPP(Schedule({**SD15, **bad}), 10)


def test_number_of_steps():
    assert DPMSolverPP(Schedule(SD15), 998).timesteps[0] == 999
    for bad in (0, 999, 2.0, True):
        with pytest.raises(ValueError, match=r"integer from 1 to num_train_timesteps - 2 \(998\)"):
            DPMSolverPP(Schedule(SD15), bad)


def test_registered():
    assert SAMPLERS["dpmsolver++"] is DPMSolverPP and SAMPLERS["ddpm"].name == "ddpm"


# ------------------------------------------------------------------------------------------- the inversion
@pytest.mark.parametrize("kind, source_prompt, n, f", [
    ("tiny_sd1", "", 6, 0.5), ("tiny_sd1", "a photo of a cat", 6, 0.5),
    ("tiny_sd1", "", 45, 0.4),  # int(45 * 1.4) = 62 in float arithmetic, not 63
    ("tiny_sd2v", "a photo of a cat", 6, 0.5)])
def test_inversion_matches_the_ledits_pp_pipeline(request, kind, source_prompt, n, f):
    """Also where a prompt's embedding depends on its batch (helpers.batch_dependent, as on CUDA): both embed the
    empty and the source prompt each alone (embedded together, the maps move by 0.1 to 0.2 here)."""
    ref = request.getfixturevalue(kind)
    sd = minledits.load(ref.folder)
    steps = int(n * (1 + f))  # diffusers' invert(num_inversion_steps=n, skip=f) is ours with these steps and skip
    with batch_dependent(sd.text_encoder, ref.text_encoder):
        inv = minledits.invert(sd, photo(), sampler="dpmsolver++", steps=steps, skip=steps - n, seed=7, size=SIZE,
                               source_prompt=source_prompt, source_guidance=3.5, batch_size=4)
        pipe = oracle.leditspp_invert(oracle.leditspp_pipeline(ref), to_tensor(photo(), SIZE), source_prompt, n, f,
                                      seed=7)
    assert inv.timesteps == pipe.inversion_steps.tolist() and len(pipe.scheduler.timesteps) == steps
    assert inv.settings.sampler == "dpmsolver++" and inv.zs.shape == pipe.zs[:, 0].shape
    # x_{tau_skip}: the same noise draws, add_noise with the same float32 scalars, VAE latents ~1e-6 apart
    torch.testing.assert_close(inv.xts[:1], pipe.init_latents, atol=1e-5, rtol=1e-5)
    # the maps divide UNet rounding (~1e-6; the pipeline also feeds each UNet call its recomputed x_t) by C_k >= 0.08
    torch.testing.assert_close(inv.zs, pipe.zs[:, 0], atol=1e-4, rtol=1e-4)
    assert torch.equal(inv.zs[-1], torch.zeros_like(inv.zs[-1]))


@pytest.mark.parametrize("kind", ["tiny_sd1", "tiny_sd2v"])
def test_at_batch_size_one_with_the_pipelines_kernel_the_maps_are_bit_identical(request, kind):
    """At batch_size 1 ours feeds each UNet call the previous step's mu_k + C_k z_k, as the pipeline does; with the
    attention kernel its invert sets (diffusers' AttnProcessor) the maps are its own bit for bit."""
    ref = request.getfixturevalue(kind)
    sd, n, f = minledits.load(ref.folder), 6, 0.5
    aligned(sd.unet)
    with parity.pipeline_attention(sd):
        inv = minledits.invert(sd, photo(), sampler="dpmsolver++", steps=int(n * (1 + f)), skip=int(n * (1 + f)) - n,
                               seed=7, size=SIZE, batch_size=1)
    pipe = oracle.leditspp_invert(oracle.leditspp_pipeline(ref), to_tensor(photo(), SIZE), "", n, f, seed=7)
    assert torch.equal(inv.xts[:1], pipe.init_latents) and torch.equal(inv.zs, pipe.zs[:, 0])


@pytest.mark.parametrize("source_prompt", ["", "a photo of a cat"])
def test_ddpm_inversion_matches_the_pipeline_with_ddim(tiny_sd1, source_prompt):
    """With a DDIMScheduler the pipeline inverts with DDIM at eta 1, which is our DDPM sampler. diffusers 0.42.1
    crashes on that path (invert calls add_noise with the float tensor torch.Tensor([t]), which DDIMScheduler uses
    as an index): the oracle patches that one call to a long tensor. Its noise maps assume an eps model (eps
    taken as it comes, v models get wrong maps), so the comparison runs on SD1; ours converts v (sampler.py).
    The pipeline keeps the last map (LEDITS zeroes it; keep_last_noise=True keeps it)."""
    sd, n, f = minledits.load(tiny_sd1.folder), 6, 0.5
    x = to_tensor(photo(), SIZE)
    with pytest.raises(IndexError, match="tensors used as indices must be long"):
        oracle.leditspp_invert(oracle.leditspp_pipeline(tiny_sd1, scheduler=DDIMScheduler), x, source_prompt, n, f,
                               seed=3)
    pipe = oracle.leditspp_pipeline(tiny_sd1, scheduler=DDIMScheduler)
    add_noise = pipe.scheduler.add_noise
    pipe.scheduler.add_noise = lambda x0, noise, t: add_noise(x0, noise, t.long())
    oracle.leditspp_invert(pipe, x, source_prompt, n, f, seed=3)
    steps = int(n * (1 + f))
    inv = minledits.invert(sd, photo(), sampler="ddpm", steps=steps, skip=steps - n, seed=3, size=SIZE,
                           source_prompt=source_prompt, source_guidance=3.5, batch_size=4, keep_last_noise=True)
    assert inv.timesteps == pipe.inversion_steps.tolist()
    torch.testing.assert_close(inv.xts[:1], pipe.init_latents, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(inv.zs, pipe.zs[:, 0], atol=1e-4, rtol=1e-4)


def test_the_pipeline_forces_leading_spacing_and_offset_one(tiny_sd1):
    """The pipeline sets steps_offset 1 (__init__) and 'leading' (invert) whatever the model's config says; so does
    the sampler, which reads neither. Also: the scheduler the tests build is the pipeline's."""
    cfg = {**tiny_sd1.scheduler_config, "steps_offset": 0, "timestep_spacing": "trailing"}
    pipe = oracle.leditspp_invert(oracle.leditspp_pipeline(tiny_sd1, cfg), to_tensor(photo(), SIZE), "", 3, 0.7, seed=0)
    assert pipe.scheduler.config.steps_offset == 1 and pipe.scheduler.config.timestep_spacing == "leading"
    assert DPMSolverPP(Schedule(cfg), 5).timesteps == pipe.scheduler.timesteps.tolist()
    settings = lambda c: {k: v for k, v in c.items() if not k.startswith("_") and k != "steps_offset"}
    assert settings(pipe.scheduler.config) == settings(reference(cfg, 5).config)


def test_regenerating_from_the_inversion_walks_its_latents(sd1):
    """What an edit without guidance does: a fresh sampler, steps from x_{tau_skip} with the UNet and the maps.
    Each step lands on the inversion's next latent (the UNet sees x_t again up to rounding); the last on D_{N-1}."""
    inv = minledits.invert(sd1, photo(), steps=N, skip=SKIP, size=SIZE, seed=2, sampler="dpmsolver++", batch_size=3)
    sampler, context, x = DPMSolverPP(sd1.schedule, N), sd1.text_embeddings([""]), inv.xts[:1]
    with torch.inference_mode():
        for j, k in enumerate(range(SKIP, N)):
            x_t, out = x, sd1.unet(x, sampler.timesteps[k], context)
            x = sampler.step(k, x_t, out, inv.zs[j:j + 1])
            if k < N - 1:
                torch.testing.assert_close(x, inv.xts[j + 1:j + 2], atol=1e-5, rtol=1e-5)
    assert torch.equal(x, sampler.x0_hat(N - 1, x_t, out))


# ------------------------------------------------------------------------------------------- settings and files
def test_unknown_sampler_fails_before_any_unet_work(sd1, monkeypatch):
    monkeypatch.setattr(sd1, "unet", lambda *a: pytest.fail("the UNet ran"))
    monkeypatch.setattr(sd1.vae, "encode", lambda *a: pytest.fail("the VAE ran"))
    with pytest.raises(ValueError, match=r"^sampler must be one of 'ddpm', 'ddim', 'dpmsolver\+\+', 'flow', "
                                         r"got 'nope'$"):
        minledits.invert(sd1, photo(), steps=N, skip=SKIP, size=SIZE, sampler="nope")
    with pytest.raises(ValueError, match="dpmsolver"):  # and its step limit, before any work too
        minledits.invert(sd1, photo(), steps=999, skip=SKIP, size=SIZE, sampler="dpmsolver++")


def test_files_keep_the_sampler(sd1, tmp_path):
    dpm = minledits.invert(sd1, photo(), steps=N, skip=SKIP, size=SIZE, sampler="dpmsolver++")
    store.save(dpm, tmp_path / "dpm.safetensors")
    back = store.load(tmp_path / "dpm.safetensors")
    assert back.settings == dpm.settings and torch.equal(back.zs, dpm.zs) and back.timesteps == dpm.timesteps


@pytest.mark.parametrize("sampler, keep, words", [
    ("euler", False, "made with sampler 'euler', which this minledits does not have (ddpm, ddim, dpmsolver++, flow)"),
    ("dpmsolver++", True, None)])
def test_files_a_sampler_cannot_serve_are_refused(sd1, tmp_path, sampler, keep, words):
    """A sampler this version lacks (a newer file): one line; the others load."""
    inv = minledits.invert(sd1, photo(), steps=N, skip=SKIP, size=SIZE, sampler="dpmsolver++", keep_last_noise=keep)
    store.save(inv, tmp_path / "a.safetensors")
    with safe_open(str(tmp_path / "a.safetensors"), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(tmp_path / "b.safetensors"), {**meta, "sampler": f'"{sampler}"'})
    if words is None:
        assert store.load(tmp_path / "b.safetensors").settings == inv.settings
    else:
        with pytest.raises(minledits.InversionFileError, match=re.escape(words)):
            store.load(tmp_path / "b.safetensors")

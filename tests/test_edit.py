"""The editing loop (Algorithm 1) against SemanticStableDiffusionPipeline with injected noise (tests/oracle.py)."""
import pytest
import torch

import minledits
from minledits import Concept
from minledits.sampler import DDPM
from tests import hub
from tests.helpers import CONCEPTS, SIZE, SKIP, N, batch_dependent, photo, run_both


@pytest.mark.parametrize("target_prompt", ["a man with a hat", ""])
def test_full_edit_matches_pipeline(tiny_sd1, sd1, inv1, target_prompt):
    """Every step, started from the same x_t in both (teacher forcing: helpers.run_both), computes the same
    x_{t-1}: by induction the whole trajectory is the pipeline's."""
    ours, theirs, pipe, trace = run_both(tiny_sd1, sd1, inv1, target_prompt, CONCEPTS, forced=True)
    for i, st in enumerate(trace):
        # Same x_t: only the UNets' float32 rounding (~1e-6; the empty target is a different batch size in the
        # two, another ~1e-6), amplified by the guidance scales s_tar + sum s_c ~ 16: measured <= 1.2e-5 on E,
        # 7e-6 on x_{t-1}.
        torch.testing.assert_close(st.eps_u, pipe.uncond_estimates[i], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(st.eps_c, pipe.edit_estimates[i], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(st.guidance.E, pipe.sem_guidance[i], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(st.x_prev, theirs[i], atol=5e-5, rtol=5e-5)
    partial = [st.i for st in trace if 1 <= st.i < 3]
    assert partial and all(not torch.equal(trace[i].guidance.E, trace[i].guidance.G) for i in partial)


def test_pure_ddpm_edit_matches_pipeline(tiny_sd1, sd1, inv1):
    ours, theirs, _, _ = run_both(tiny_sd1, sd1, inv1, "a man with a hat", [])
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_reconstruction(sd1):
    exact = minledits.invert(sd1, photo(), steps=N, skip=SKIP, size=SIZE, keep_last_noise=True)
    w0 = minledits.edit(sd1, exact, concepts=[])
    # Each step recomputes x_{t-1} = mu + sigma z = xts[k+1] up to float32 rounding, so w0 comes back (~1e-6).
    torch.testing.assert_close(w0, exact.w0, atol=1e-5, rtol=1e-5)
    default = minledits.invert(sd1, photo(), steps=N, skip=SKIP, size=SIZE)  # the reference zeroes z_{N-1}
    w0_default = minledits.edit(sd1, default, concepts=[])
    sigma_last = DDPM(sd1.schedule, N).steps[-1].sigma
    torch.testing.assert_close(w0_default, exact.w0 - sigma_last * exact.zs[-1], atol=1e-5, rtol=1e-5)


def test_scale_zero_is_the_pure_ddpm_edit(sd1, inv1):
    pure = minledits.edit(sd1, inv1, target_prompt="a man with a hat", target_guidance=7.5)
    with pytest.warns(UserWarning, match="never acts"):
        zero = minledits.edit(sd1, inv1, target_prompt="a man with a hat", target_guidance=7.5,
                              concepts=[Concept("glasses", scale=0.0, warmup=0)])
    torch.testing.assert_close(zero, pure, atol=1e-6, rtol=1e-6)  # batch of 3 vs 2: rounding only


def test_same_seed_is_bit_identical(sd1):
    runs = [minledits.edit(sd1, minledits.invert(sd1, photo(), steps=N, skip=SKIP, size=SIZE, seed=5),
                           target_guidance=7.5, concepts=CONCEPTS) for _ in range(2)]
    assert torch.equal(*runs)


def test_empty_target_drops_a_branch(sd1, inv1, monkeypatch):
    sizes = []
    forward = sd1.unet.forward
    monkeypatch.setattr(sd1.unet, "forward", lambda x, t, c: sizes.append(len(x)) or forward(x, t, c))
    minledits.edit(sd1, inv1, target_guidance=7.5, concepts=CONCEPTS)
    assert sizes == [1 + len(CONCEPTS)] * (N - SKIP)  # one batched call per step: "", concepts


def test_ablation_swaps_the_guidance_function(sd1, inv1):
    """Replace SEGA by plain (unthresholded) concept guidance in a few lines."""
    def plain(i, eps_u, eps_c, m, p):
        g = p.scale.view(-1, 1, 1, 1, 1) * (eps_c - eps_u)
        return minledits.Guidance(E=g.sum(0), m=m, g=g, acts=torch.ones_like(g, dtype=torch.bool), q=None, G=g.sum(0))
    a = minledits.edit(sd1, inv1, target_guidance=7.5, concepts=CONCEPTS[:1], guidance=plain)
    b = minledits.edit(sd1, inv1, target_guidance=7.5, concepts=CONCEPTS[:1])
    assert a.shape == b.shape and not torch.allclose(a, b)


@pytest.mark.parametrize("bad", [dict(target_guidance=float("inf")), dict(concepts=[{"prompt": "x", "bogus": 1}]),
                                 dict(concepts=["x:threshold=1.5"]), dict(concepts=["x"], target_guidance=1.0),
                                 dict(momentum_beta=2.0)])
def test_bad_parameters_fail_before_any_unet_work(sd1, inv1, monkeypatch, bad):
    monkeypatch.setattr(sd1, "unet", lambda *a: pytest.fail("the UNet ran"))
    with pytest.raises(ValueError):
        minledits.edit(sd1, inv1, **{**dict(concepts=CONCEPTS), **bad})


@pytest.mark.parametrize("kind", ["tiny_sd2", "tiny_sd2v"])
def test_sd2_and_v_prediction_edit_matches_pipeline(request, kind):
    """SD2-style model (linear projections, gelu CLIP, pad id 0); the v-prediction one also upcasts attention.
    Step by step from the same x_t (as above): the pipeline batches the same rows as ours here, and these UNets
    agree bit for bit, so E is equal and x_{t-1} differs only by the DDIM formulas' operation order (~5e-7). Also
    where a prompt's embedding depends on its batch (helpers.batch_dependent, as on CUDA): both embed the empty
    prompt and the target prompt each alone and the concepts together."""
    ref = request.getfixturevalue(kind)
    sd = minledits.load(ref.folder)
    inv = minledits.invert(sd, photo(), source_prompt="a photo", steps=N, skip=SKIP, size=SIZE, seed=2)
    with batch_dependent(sd.text_encoder, ref.text_encoder):
        ours, theirs, pipe, trace = run_both(ref, sd, inv, "a man with a hat", CONCEPTS, forced=True)
    for i, st in enumerate(trace):  # guidance combines the raw (v) outputs in both
        torch.testing.assert_close(st.guidance.E, pipe.sem_guidance[i], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(st.x_prev, theirs[i], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["tiny_sd2", "tiny_sd2v"])
def test_sd2_and_v_prediction_pure_ddpm_edit_matches_pipeline(request, kind):
    """Without concepts the loop is continuous in its inputs: the free runs agree end to end."""
    ref = request.getfixturevalue(kind)
    sd = minledits.load(ref.folder)
    inv = minledits.invert(sd, photo(), source_prompt="a photo", steps=N, skip=SKIP, size=SIZE, seed=2)
    ours, theirs, _, _ = run_both(ref, sd, inv, "a man with a hat", [])
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.heavy
@pytest.mark.parametrize("kind", ["sd21-base", "sd21"])
def test_full_size_sd2_edit_matches_pipeline(kind, tmp_path):
    """SD 2.1-base (eps) and SD 2.1 (768: v-prediction, upcast attention) at full size, random weights, 128 px."""
    ref = hub.make(kind, tmp_path / kind)
    sd = minledits.load(ref.folder)
    inv = minledits.invert(sd, photo(size=(128, 128)), source_prompt="a photo", steps=10, skip=4, size=128, seed=0,
                           batch_size=3)
    ours, theirs, _, trace = run_both(ref, sd, inv, "a man with a hat", CONCEPTS, forced=True)
    torch.testing.assert_close(torch.stack([st.x_prev for st in trace]), theirs, atol=1e-4, rtol=1e-4)


def test_edit_runs_the_inversions_own_sampler(sd1):
    """An inversion made with dpmsolver++ is edited with dpmsolver++: without guidance every step lands on the
    inversion's next latent, but the last (the solver's last step has no noise: it lands on its x0 prediction)."""
    inv = minledits.invert(sd1, photo(), steps=N, skip=SKIP, size=SIZE, sampler="dpmsolver++")
    trace = []
    minledits.edit(sd1, inv, target_guidance=1.0, callback=trace.append)
    assert [st.t for st in trace] == inv.timesteps
    # each x_{t-1} is mu + sigma z with z from the inversion: float32 rounding of the two formulas (~1e-6)
    torch.testing.assert_close(torch.cat([st.x_prev for st in trace[:-1]]), inv.xts[1:-1], atol=1e-5, rtol=1e-5)

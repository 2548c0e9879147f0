"""The noise schedule against diffusers' DDIMScheduler (the DDPM posterior at eta = 1)."""
import pytest
import torch
from diffusers import DDIMScheduler

from minledits.schedule import Schedule, eps_from_v, mu

CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
              steps_offset=1, set_alpha_to_one=False, clip_sample=False)


def reference(prediction_type="epsilon", N=100):
    ref = DDIMScheduler(**CONFIG, prediction_type=prediction_type)
    ref.set_timesteps(N)
    return ref


@pytest.mark.parametrize("N", [10, 50, 100])
def test_timesteps_and_variance(N):
    ref, ours = reference(N=N), Schedule(CONFIG).steps(N)
    assert [s.t for s in ours] == ref.timesteps.tolist()
    assert torch.equal(Schedule(CONFIG).a_bar, ref.alphas_cumprod)
    for s in ours:  # sigma_t^2 vs the scheduler's variance, including a_prev = abar_0 at the last step
        var = ref._get_variance(torch.tensor(s.t), torch.tensor(s.t - 1000 // N)).item()
        assert s.sigma**2 == pytest.approx(var, rel=1e-6, abs=1e-12)  # both computed in float32
    if N == 100:
        assert ours[0].t == 991 and ours[-1].t == 1 and ours[-1].a_prev == ref.alphas_cumprod[0].item()


@pytest.mark.parametrize("N", [10, 50, 100])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_step_matches_ddim_eta1(N, prediction_type):
    ref, sched = reference(prediction_type, N), Schedule({**CONFIG, "prediction_type": prediction_type})
    g = torch.Generator().manual_seed(N)
    worst = 0.0
    for s in sched.steps(N):
        x, out, z = (torch.randn(1, 4, 8, 8, generator=g) for _ in range(3))
        expected = ref.step(out, s.t, x, eta=1.0, variance_noise=z).prev_sample
        eps = eps_from_v(out, x, s) if prediction_type == "v_prediction" else out
        worst = max(worst, (mu(x, eps, s) + s.sigma * z - expected).abs().max().item())
    # Same formulas in float32; only the rounding of the per-step scalars differs (measured <= 1e-6 for
    # |x|, |eps|, |z| up to ~4, with coefficients up to 1/sqrt(abar_991) ~ 15): a few float32 ulps.
    assert worst < 5e-6

"""The noise schedule and the DDPM step against diffusers' DDIMScheduler (the DDPM posterior at eta = 1)."""
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from minledits.sampler import DDPM
from minledits.schedule import SCHEDULER_DEFAULTS, Schedule

CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
              steps_offset=1, set_alpha_to_one=False, clip_sample=False)
BETAS = {"scaled_linear": {}, "linear": {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02},
         "squaredcos_cap_v2": {"beta_schedule": "squaredcos_cap_v2"},
         "trained_betas": {"trained_betas": np.linspace(1e-4, 0.02, 1000).tolist()}}  # float64: rounded to float32
# As shipped (scheduler/scheduler_config.json): SD 1.5 (PNDM) and SD 2.1 (DDIM, v-prediction).
SD15 = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
        "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None}
SD21 = {**SD15, "_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0", "prediction_type": "v_prediction"}


def reference(config: dict, N: int | None = None) -> DDIMScheduler:
    ref = DDIMScheduler(**{k: v for k, v in config.items() if not k.startswith("_") and k != "skip_prk_steps"})
    if N is not None:
        ref.set_timesteps(N)
    return ref


def one_line(err, *fragments):
    msg = str(err.value)
    assert "\n" not in msg and len(msg) < 300 and all(f in msg for f in fragments), msg


@pytest.mark.parametrize("zero_snr", [False, True])
@pytest.mark.parametrize("betas", list(BETAS))
def test_a_bar_matches_ddim(betas, zero_snr):
    config = {**CONFIG, **BETAS[betas], "rescale_betas_zero_snr": zero_snr}
    ours, ref = Schedule(config), reference(config)
    assert ours.a_bar.dtype == torch.float32 and ours.a_bar.shape == (1000,)
    assert torch.equal(ours.a_bar, ref.alphas_cumprod)  # bit for bit
    if zero_snr:  # DDIMScheduler keeps abar_{T-1} = 0 (DPMSolver / Euler would set it to 2**-24)
        assert ours.a_bar[-1].item() == 0 and ours.a_bar[-2].item() > 0


@pytest.mark.parametrize("T, offset", [(1000, 1), (1000, 0), (999, 3)])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_timesteps_match_ddim_for_every_N(spacing, T, offset):
    """Every N from 1 to T; refused exactly where diffusers' own timesteps are unusable."""
    config = {**CONFIG, "num_train_timesteps": T, "steps_offset": offset, "timestep_spacing": spacing}
    ours, ref, refused = Schedule(config), reference(config), []
    for N in range(1, T + 1):
        ref.set_timesteps(N)
        expected = ref.timesteps.tolist()
        try:
            assert ours.timesteps(N) == expected, N
        except ValueError:
            refused.append(N)  # too many timesteps (np.arange's float stride), or one outside 0..T-1
            assert len(expected) != N or not 0 <= min(expected) <= max(expected) < T, (N, expected)
    if spacing == "leading":  # D (N - 1) + offset > T - 1: only N = T for the SD offset 1
        assert refused == [N for N in range(1, T + 1) if (T // N) * (N - 1) + offset >= T]
        assert refused == {0: [], 1: [1000], 3: [333, 499, 997, 998, 999]}[offset]
    elif spacing == "trailing":
        assert len(refused) == {1000: 62, 999: 94}[T] and (T != 1000 or refused[:3] == [61, 103, 121])
    else:
        assert refused == []


SCHEDULES = {"sd": {}, "zero_snr": {"rescale_betas_zero_snr": True}, "cosine": BETAS["squaredcos_cap_v2"]}


def ddpm_case(spacing, N, schedule="sd", prediction_type="epsilon"):
    config = {**CONFIG, **SCHEDULES[schedule], "timestep_spacing": spacing, "prediction_type": prediction_type}
    return DDPM(Schedule(config), N), reference(config, N)


CASES = [("leading", N, "sd") for N in (7, 10, 30, 50, 100)] + \
        [("trailing", N, "sd") for N in (7, 10, 30, 50, 100)] + \
        [("leading", N, "zero_snr") for N in (7, 10, 30, 100)] + \
        [("leading", N, "cosine") for N in (10, 50, 100)]  # 'leading' never visits t = 999 for these N


@pytest.mark.parametrize("spacing, N, schedule", CASES)
def test_timesteps_and_variance(spacing, N, schedule):
    ours, ref = ddpm_case(spacing, N, schedule)
    assert ours.timesteps == [s.t for s in ours.steps] == ref.timesteps.tolist()
    for s in ours.steps:  # a_prev and sigma_t vs the scheduler's, including a_prev = abar_0 past the end
        prev = s.t - 1000 // N  # DDIMScheduler.step's previous timestep, for every spacing
        assert s.a_bar == ref.alphas_cumprod[s.t].item()
        assert s.a_prev == (ref.alphas_cumprod[prev] if prev >= 0 else ref.final_alpha_cumprod).item()
        assert s.sigma == (ref._get_variance(s.t, prev) ** 0.5).item()  # both in float32: exact
    if N == 100 and spacing == "leading":
        assert ours.steps[0].t == 991 and ours.steps[-1].t == 1
        assert ours.steps[-1].a_prev == ref.alphas_cumprod[0].item()
    if (N, spacing) == (30, "trailing"):  # t - D is not the next timestep when N does not divide T
        assert ours.timesteps[1:3] == [966, 932] and ours.timesteps[1] - 1000 // N == 933


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing, N, schedule", CASES)
def test_step_matches_ddim_eta1(spacing, N, schedule, prediction_type):
    ours, ref = ddpm_case(spacing, N, schedule, prediction_type)
    g = torch.Generator().manual_seed(N)
    x, out, z = (torch.randn(N, 4, 8, 8, generator=g) for _ in range(3))
    expected = torch.cat([ref.step(out[k:k + 1], t, x[k:k + 1], eta=1.0, variance_noise=z[k:k + 1]).prev_sample
                          for k, t in enumerate(ours.timesteps)])
    each = torch.cat([ours.step(k, x[k:k + 1], out[k:k + 1], z[k:k + 1]) for k in range(N)])
    batched = ours.step(slice(0, N), x, out, z)
    # Same formulas in float32; only the rounding of the per-step scalars differs (measured <= 1.43e-6 for
    # |x|, |eps|, |z| up to ~4, with coefficients up to 1/sqrt(abar_t) ~ 15, ~80 cosine, ~280 zero SNR): float32 ulps.
    assert (each - expected).abs().max().item() < 5e-6
    assert (batched - expected).abs().max().item() < 5e-6
    # noise_map inverts the step: z back from x_prev, to its rounding over sigma_t (>= 0.0047; measured <= 1.3e-4 there)
    zs = torch.cat([ours.noise_map(k, x[k:k + 1], expected[k:k + 1], out[k:k + 1]) for k in range(N)])
    assert (zs - z).abs().max().item() < 1e-6 / min(s.sigma for s in ours.steps)


@pytest.mark.parametrize("config, N, fragments", [
    ({"timestep_spacing": "linspace"}, 10, ["step 9 of 10 at t = 0", "sigma_t = 0", "it is t = 0"]),
    ({"steps_offset": 0}, 10, ["step 9 of 10 at t = 0", "sigma_t = 0"]),
    ({"timestep_spacing": "trailing"}, 1000, ["step 999 of 1000 at t = 0", "sigma_t = 0"]),
    ({"set_alpha_to_one": True}, 10, ["step 9 of 10 at t = 1", "sigma_t = 0", "set_alpha_to_one"]),
    ({"timestep_spacing": "trailing", "rescale_betas_zero_snr": True, "prediction_type": "v_prediction"}, 10,
     ["step 0 of 10 at t = 999", "abar_t = 0", "rescale_betas_zero_snr"]),
    ({"rescale_betas_zero_snr": True}, 500, ["step 0 of 500 at t = 999", "abar_t = 0"]),
    ({"timestep_spacing": "trailing", "beta_schedule": "squaredcos_cap_v2"}, 5,
     ["step 0 of 5 at t = 999", "abar_t = 2.43e-09, too close to 0", "1 - abar_prev - sigma_t^2 rounds below 0"]),
    ({"timestep_spacing": "trailing", "beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction"}, 10,
     ["step 0 of 10 at t = 999", "too close to 0", "sqrt(abar_prev / abar_t) > 100"]),
])
def test_ddpm_refuses_undefined_steps(config, N, fragments):
    """A step whose noise map or mean is undefined, or lost to float32 rounding, is refused; diffusers' step is
    degenerate there too (last case: our v -> eps -> xhat_0 is 4e-4 from its sqrt(abar_t) x_t - sqrt(1 - abar_t) v)."""
    config = {**CONFIG, **config}
    with pytest.raises(ValueError) as err:
        DDPM(Schedule(config), N)
    one_line(err, *fragments)
    ref, t = reference(config, N), int(str(err.value).split(" at t = ")[1].split()[0])
    prev = t - 1000 // N
    a_prev = ref.alphas_cumprod[prev] if prev >= 0 else ref.final_alpha_cumprod
    variance = ref._get_variance(t, prev)
    assert variance == 0 or ref.alphas_cumprod[t] == 0 or 1 - a_prev - (variance**0.5) ** 2 <= 0 \
        or a_prev / ref.alphas_cumprod[t] > 1e4


@pytest.mark.parametrize("key, value, fragments", [
    ("num_train_timesteps", 0, ["an integer >= 1", "got 0"]),
    ("num_train_timesteps", "1000", ["an integer >= 1", "got '1000'"]),
    ("num_train_timesteps", 1000.0, ["an integer >= 1"]),
    ("num_train_timesteps", True, ["an integer >= 1"]),
    ("beta_start", 0, ["a number in (0, 1)"]),
    ("beta_start", 1.0, ["a number in (0, 1)"]),
    ("beta_start", float("nan"), ["a number in (0, 1)"]),
    ("beta_start", "0.00085", ["a number in (0, 1)"]),
    ("beta_end", None, ["a number in (0, 1)"]),
    ("beta_end", float("inf"), ["a number in (0, 1)"]),
    ("beta_schedule", "cosine", ["'squaredcos_cap_v2'", "got 'cosine'"]),
    ("trained_betas", [0.01] * 999, ["num_train_timesteps (1000)", "got 999 values"]),
    ("trained_betas", "0.01", ["a list of num_train_timesteps (1000) numbers"]),
    ("trained_betas", [0.01] * 999 + [0.0], ["numbers in (0, 1]", "got 0.0"]),
    ("trained_betas", [0.01] * 999 + [float("nan")], ["numbers in (0, 1]", "got nan"]),
    ("steps_offset", -1, ["an integer >= 0"]),
    ("steps_offset", 1.0, ["an integer >= 0"]),
    ("set_alpha_to_one", "false", ["true or false"]),
    ("set_alpha_to_one", 0, ["true or false"]),
    ("prediction_type", "sample", ["'epsilon' or 'v_prediction'", "'sample'"]),
    ("prediction_type", "eps", ["'epsilon' or 'v_prediction'"]),
    ("timestep_spacing", "Leading", ["'leading', 'trailing' or 'linspace'", "got 'Leading'"]),
    ("timestep_spacing", None, ["'leading', 'trailing' or 'linspace'"]),
    ("rescale_betas_zero_snr", "true", ["true or false"]),
    ("clip_sample", True, ["must be false", "clip xhat_0"]),
    ("thresholding", True, ["must be false", "threshold xhat_0"]),
])
def test_bad_config_is_one_line(key, value, fragments):
    with pytest.raises(ValueError) as err:
        Schedule({**CONFIG, key: value})
    one_line(err, f"{key} must be", *fragments)


def test_bad_zero_snr_configs():
    with pytest.raises(ValueError) as err:
        Schedule({**CONFIG, "num_train_timesteps": 1, "rescale_betas_zero_snr": True})
    one_line(err, "num_train_timesteps must be at least 2 with rescale_betas_zero_snr")
    with pytest.raises(ValueError) as err:  # 1 - beta rounds to 1 in float32: abar is constant, r_0 - r_{T-1} = 0
        Schedule({**CONFIG, "beta_start": 1e-9, "beta_end": 2e-9, "rescale_betas_zero_snr": True})
    one_line(err, "rescale_betas_zero_snr cannot rescale these betas")
    assert torch.isnan(reference({**CONFIG, "beta_start": 1e-9, "beta_end": 2e-9, "rescale_betas_zero_snr": True})
                       .alphas_cumprod).any()  # where diffusers gives NaN


@pytest.mark.parametrize("N", [0, -1, 1001, 1.5, "10", True, None])
def test_bad_number_of_steps(N):
    for make in (lambda: Schedule(CONFIG).timesteps(N), lambda: DDPM(Schedule(CONFIG), N)):
        with pytest.raises(ValueError) as err:
            make()
        one_line(err, "an integer from 1 to num_train_timesteps (1000)")


def test_steps_past_the_schedule_are_refused():
    with pytest.raises(ValueError) as err:  # leading: 1000 steps + offset 1 reach t = 1000
        Schedule(CONFIG).timesteps(1000)
    one_line(err, "1000 'leading' steps with steps_offset 1 reach t = 1000", "last training step 999")
    with pytest.raises(ValueError) as err:  # trailing: np.arange(1000, 0, -1000 / 61) has 62 entries, the last -1
        Schedule({**CONFIG, "timestep_spacing": "trailing"}).timesteps(61)
    one_line(err, "61 'trailing' steps of 1000", "extra timestep -1")
    assert reference({**CONFIG, "timestep_spacing": "trailing"}, 61).timesteps[-2:].tolist() == [15, -1]


@pytest.mark.parametrize("config", [SD15, SD21, {}, SCHEDULER_DEFAULTS, dict(reference(CONFIG).config)],
                         ids=["sd15", "sd21", "empty", "defaults", "ddim-full"])
def test_shipped_configs_load(config):
    """SD's own configs (clip_sample false, trained_betas null, other schedulers' keys), a config without keys,
    SCHEDULER_DEFAULTS (what convert writes: every key a DDIMScheduler argument), and a diffusers 0.4x DDIM config."""
    ours, ref = Schedule(config), reference({**SCHEDULER_DEFAULTS, **config}, 50)
    assert torch.equal(ours.a_bar, ref.alphas_cumprod) and ours.timesteps(50) == ref.timesteps.tolist()
    assert (ours.T, ours.offset, ours.alpha_one) == (1000, 1, False)
    assert ours.prediction_type == config.get("prediction_type", "epsilon")

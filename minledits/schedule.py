"""The training noise schedule of Stable Diffusion, and which N of its T timesteps an inference run visits.

Every option means what it means in diffusers' DDIMScheduler (so a_bar and the timesteps match it exactly);
an option minledits does not implement is refused with a one-line ValueError naming the key, never ignored.

Notation (code name -> symbol), t = 0..T-1, k = 0..N-1; round() rounds half to even, as numpy does
    T        T                 number of training timesteps (num_train_timesteps, 1000)
    beta     beta_t            variance of the noise added at training step t; by beta_schedule, b0 = beta_start,
                               b1 = beta_end, and g(s) = cos(pi/2 (s + 0.008) / 1.008)^2:
                               linear:            b0 + (b1 - b0) t / (T - 1)
                               scaled_linear:     (sqrt(b0) + (sqrt(b1) - sqrt(b0)) t / (T - 1))^2
                               squaredcos_cap_v2: min(1 - g((t + 1) / T) / g(t / T), 0.999)
                               trained_betas:     the config's T values (beta_start, beta_end, beta_schedule unused)
    a_bar    abar_t            prod_{s <= t} (1 - beta_s): x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps
    zero SNR                   rescale_betas_zero_snr (Lin et al. 2023, Algorithm 1), r = sqrt(abar) before it:
                               sqrt(abar'_t) = (r_t - r_{T-1}) r_0 / (r_0 - r_{T-1})  so abar'_{T-1} = 0 (left 0, as in
                               DDIMScheduler; diffusers' DPM-Solver and Euler schedulers raise it to 2^-24)
                               beta'_t = 1 - abar'_t / abar'_{t-1}, beta'_0 = 1 - abar'_0;  abar = prod (1 - beta')
    tau      tau_k             the N inference timesteps, descending, k = 0 the noisiest; by timestep_spacing:
                               leading:  D (N - 1 - k) + offset,  D = T // N,  offset = steps_offset
                               trailing: round(T - k T / N) - 1                        (steps_offset unused)
                               linspace: round((N - 1 - k) (T - 1) / (N - 1)), or 0 if N = 1  (steps_offset unused)
beta and abar are float32 tensors (squaredcos_cap_v2 is computed in float64 first), as in diffusers.
The samplers (sampler.py) build their step scalars from these.
"""
import math

import torch

# The scheduler config of Stable Diffusion 1.x / 2.x (scheduler/scheduler_config.json): what a missing key means.
SCHEDULER_DEFAULTS = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "steps_offset": 1, "set_alpha_to_one": False, "prediction_type": "epsilon", "timestep_spacing": "leading",
    "trained_betas": None, "rescale_betas_zero_snr": False, "clip_sample": False, "thresholding": False}
SPACINGS = ("leading", "trailing", "linspace")


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def require(ok: bool, key: str, expected: str, value) -> None:
    if not ok:
        got = f"{len(value)} values" if isinstance(value, (list, tuple)) else repr(value)[:60]
        raise ValueError(f"{key} must be {expected}, got {got}")


def validate(cfg: dict) -> None:
    """One-line ValueErrors naming the key, for the values minledits cannot use as diffusers' DDIMScheduler would."""
    T = cfg["num_train_timesteps"]
    require(is_int(T) and T >= 1, "num_train_timesteps", "an integer >= 1", T)
    betas = cfg["trained_betas"]
    if betas is None:
        for key in ("beta_start", "beta_end"):
            require(is_number(cfg[key]) and 0 < cfg[key] < 1, key, "a number in (0, 1)", cfg[key])
        require(cfg["beta_schedule"] in ("linear", "scaled_linear", "squaredcos_cap_v2"), "beta_schedule",
              "'linear', 'scaled_linear' or 'squaredcos_cap_v2'", cfg["beta_schedule"])
    else:
        require(isinstance(betas, (list, tuple)) and len(betas) == T, "trained_betas",
              f"null or a list of num_train_timesteps ({T}) numbers", betas)
        bad = [b for b in betas if not (is_number(b) and 0 < b <= 1)]
        require(not bad, "trained_betas", "numbers in (0, 1]", bad[0] if bad else None)
    require(is_int(cfg["steps_offset"]) and cfg["steps_offset"] >= 0, "steps_offset", "an integer >= 0",
          cfg["steps_offset"])
    for key in ("set_alpha_to_one", "rescale_betas_zero_snr"):
        require(isinstance(cfg[key], bool), key, "true or false", cfg[key])
    require(cfg["prediction_type"] in ("epsilon", "v_prediction"), "prediction_type",
          "'epsilon' or 'v_prediction' (minledits does not support 'sample')", cfg["prediction_type"])
    require(cfg["timestep_spacing"] in SPACINGS, "timestep_spacing", "'leading', 'trailing' or 'linspace'",
          cfg["timestep_spacing"])
    for key, what in (("clip_sample", "clip"), ("thresholding", "threshold")):
        require(cfg[key] is False, key, f"false (minledits' DDPM step does not {what} xhat_0)", cfg[key])
    require(not cfg["rescale_betas_zero_snr"] or T >= 2, "num_train_timesteps",
            "at least 2 with rescale_betas_zero_snr",
          T)


def cosine_betas(T: int) -> torch.Tensor:
    """squaredcos_cap_v2: beta_t = min(1 - g((t + 1) / T) / g(t / T), 0.999), in float64, then float32."""
    g = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    return torch.tensor([min(1 - g((t + 1) / T) / g(t / T), 0.999) for t in range(T)], dtype=torch.float32)


def betas(cfg: dict) -> torch.Tensor:
    """beta_t for t = 0..T-1 (float32), before any zero-SNR rescale."""
    T, b0, b1, kind = cfg["num_train_timesteps"], cfg["beta_start"], cfg["beta_end"], cfg["beta_schedule"]
    if cfg["trained_betas"] is not None:
        return torch.tensor(cfg["trained_betas"], dtype=torch.float32)
    if kind == "scaled_linear":
        return torch.linspace(b0**0.5, b1**0.5, T, dtype=torch.float32) ** 2
    if kind == "linear":
        return torch.linspace(b0, b1, T, dtype=torch.float32)
    return cosine_betas(T)


def zero_snr(beta: torch.Tensor) -> torch.Tensor:
    """rescale_betas_zero_snr: the betas whose sqrt(abar) is shifted to end at 0 and scaled to start where it did."""
    s = torch.cumprod(1 - beta, dim=0).sqrt()
    s = (s - s[-1]) * (s[0] / (s[0] - s[-1]))
    a_bar = s**2
    return 1 - torch.cat([a_bar[:1], a_bar[1:] / a_bar[:-1]])


class Schedule:
    """abar_t for the T training steps, and the N-step inference timesteps built from it.

    `config` is the model's scheduler config (missing keys take SCHEDULER_DEFAULTS); it is kept as `self.config`.
    Keys of other schedulers (skip_prk_steps, solver_order, ...) do not change abar_t or the DDIM timesteps
    and are not read."""

    def __init__(self, config: dict):
        self.config = cfg = {**SCHEDULER_DEFAULTS, **config}
        validate(cfg)
        self.T, self.offset, self.spacing = cfg["num_train_timesteps"], cfg["steps_offset"], cfg["timestep_spacing"]
        self.prediction_type, self.alpha_one = cfg["prediction_type"], cfg["set_alpha_to_one"]
        beta = betas(cfg)
        if cfg["rescale_betas_zero_snr"]:
            beta = zero_snr(beta)
            if not torch.isfinite(beta).all():  # 0 / 0: abar_0 == abar_{T-1}, or abar reaches 0 before T - 1
                raise ValueError("rescale_betas_zero_snr cannot rescale these betas: it needs abar_0 > abar_{T-1} "
                                 "and abar_t > 0 for t < T - 1")
        self.a_bar = torch.cumprod(1.0 - beta, dim=0)  # float32, as Stable Diffusion was trained

    def timesteps(self, N: int) -> list[int]:
        """tau_k for k = 0..N-1 (descending), by the config's timestep_spacing; 1 <= N <= T."""
        T = self.T
        if not (is_int(N) and 1 <= N <= T):
            raise ValueError(f"the number of steps must be an integer from 1 to num_train_timesteps ({T}), got {N!r}")
        if self.spacing == "leading":
            D = T // N
            if D * (N - 1) + self.offset >= T:
                raise ValueError(f"{N} 'leading' steps with steps_offset {self.offset} reach t = "
                                 f"{D * (N - 1) + self.offset}, past the last training step {T - 1}")
            return [D * (N - 1 - k) + self.offset for k in range(N)]
        if self.spacing == "trailing":
            if math.ceil(T / (T / N)) != N:  # diffusers' np.arange(T, 0, -T / N) then has N + 1 entries, the last -1
                raise ValueError(f"{N} 'trailing' steps of {T} are not exact in diffusers (T / (T / N) rounds above N, "
                                 "giving an extra timestep -1); choose another number of steps")
            d = (T - T / N) - T  # the stride as np.arange applies it (rounded through T - T / N)
            return [round(T + k * d) - 1 for k in range(N)]
        if N == 1:  # linspace
            return [0]
        d = (T - 1) / (N - 1)  # the stride as np.linspace applies it, its last entry set to T - 1 exactly
        return [T - 1] + [round(k * d) for k in reversed(range(N - 1))]

"""The Euler sampler of a rectified flow (Stable Diffusion 3, FLUX.1), beside its inverse: the ODE run forward, from
the clean latent to noise. Every number is diffusers' FlowMatchEulerDiscreteScheduler's, as SD3 configures it
(scheduler/scheduler_config.json: num_train_timesteps 1000, shift 3.0: the static shift) and as FLUX.1's pipeline does
(sigmas linspace(1, 1/N, N) passed to set_timesteps; FLUX.1-dev's dynamic shift, its mu from the image's tokens).

Notation (code name -> symbol), k = 0..N-1 the inference step (0 = the noisiest), sigma_N = 0
    T         T                 number of training timesteps (num_train_timesteps, 1000)
    shift     s                 the schedule's shift: f(u) = s u / (1 + (s - 1) u)   (s = 1: f(u) = u)
    sigma_lo  sigma_min         f(1 / T) in float32: the cleanest training sigma (the training grid is t / T, t = 1..T)
    sigma_hi  sigma_max         f(1) = 1
    u         u_k               (T sigma_max + k (T sigma_min - T sigma_max) / (N - 1)) / T in float64 (numpy's
                                linspace order; u_{N-1} = sigma_min exactly; N = 1: u_0 = sigma_max)
    sigmas    sigma_k           f(u_k) in float64, rounded to float32; then sigma_N = 0 appended. f is applied twice
                                to the ends (sigma_min is already shifted), as in the scheduler
  FLUX.1 (uniform_sigmas, minledits' own key, on by default with the dynamic shift: the pipeline passes its u):
    u         u_k               1 + k (1/N - 1) / (N - 1) in float64 (numpy's linspace(1, 1/N, N)), rounded to float32;
                                sigma_k = f(u_k) or g(u_k) in float32
    tokens    n                 the image's token count: (h // 2) (w // 2) for an h x w latent (image_tokens)
    mu_of     mu                n m + b, m = (max_shift - base_shift) / (max_image_seq_len - base_image_seq_len),
                                b = base_shift - m base_image_seq_len: the line through (256, 0.5) and (4096, 1.15)
    time_shifted g(u)           e^mu / (e^mu + (1/u - 1)) ("exponential"; "linear": mu / (mu + (1/u - 1))): the
                                dynamic shift, in u's dtype (its static ends: sigma_min = 1 / T unshifted)
    timesteps t_k               T sigma_k in float32: the model's timestep input at step k
    x         x_k               the latent at sigma_k: x_sigma = (1 - sigma) x_0 + sigma eps
    v         v                 the model's velocity, d x / d sigma = eps - x_0
    step      x_{k+1}           x_k + (sigma_{k+1} - sigma_k) v,  v at (x_k, t_k): the Euler step toward sigma = 0
    unstep    x_k               x_{k+1} + (sigma_k - sigma_{k+1}) v,  v at (x_{k+1}, T sigma_{k+1}) (inv_timesteps):
                                the explicit Euler step of the ODE run forward, the velocity taken at the latent it
                                leaves (at k = N - 1 that is the clean latent, at timestep 0)
    scale_noise x_{sigma_k}     sigma_k eps + (1 - sigma_k) x_0: the forward process at step k (img2img's start)
    x0_hat    xhat_0            x_k - sigma_k v: the clean latent predicted (the end of the straight line through x_k)
step and unstep upcast x to float32, scale v by the float32 step size in v's own dtype, and return v's dtype, as the
scheduler's step does. An inversion by unstep is approximate: v at (x_{k+1}, sigma_{k+1}) stands in for the v at
(x_k, sigma_k) that step uses, so regenerating returns x_0 only up to that error, first order in the step (to
leading order the sum over k of (sigma_k - sigma_{k+1}) (v(x_k, sigma_k) - v(x_{k+1}, sigma_{k+1}))): it vanishes as
N grows for the same velocity field, and only where v is constant along the path is it float rounding; with the same
v, unstep undoes step to float rounding. Source guidance at the inversion (v_u + s_src (v_src - v_u)) and none at the
regeneration integrate two different fields: that error does not shrink with N.

As a sampler (sampler.py's protocol, SAMPLERS["flow"]) it is a trajectory: the inversion walks w_0 up with unstep,
the model run at (x_{k+1}, inv_timesteps[k]); step takes the protocol's z and ignores it, every noise map is 0, mu is
the step itself; the schedule it is made from is the model's scheduler config (a dict: flow_config).
"""
import math

import torch

from .sampler import SAMPLERS
from .schedule import is_int, is_number

# FlowMatchEulerDiscreteScheduler's defaults: what a missing key means (SD3's config sets only T and the shift).
FLOW_DEFAULTS = {
    "num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False, "base_shift": 0.5, "max_shift": 1.15,
    "base_image_seq_len": 256, "max_image_seq_len": 4096, "time_shift_type": "exponential", "invert_sigmas": False,
    "shift_terminal": None, "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
    "stochastic_sampling": False}
# The options minledits does not implement, and the value that turns each off.
UNSUPPORTED = ("invert_sigmas", "shift_terminal", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
               "stochastic_sampling")
TIME_SHIFTS = ("exponential", "linear")


def flow_config(config: dict) -> dict:
    """The scheduler config with defaults filled in (and uniform_sigmas, minledits' own key: the pipeline passes
    linspace(1, 1/N, N), as FLUX.1's does; it defaults to use_dynamic_shifting); a one-line ValueError naming the key
    for a value minledits cannot use as diffusers would."""
    cfg = {**FLOW_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
    cfg.setdefault("uniform_sigmas", cfg["use_dynamic_shifting"])
    T, s = cfg["num_train_timesteps"], cfg["shift"]
    if not (is_int(T) and T >= 1):
        raise ValueError(f"num_train_timesteps must be an integer >= 1, got {T!r:.60}")
    if not (is_number(s) and s > 0):
        raise ValueError(f"shift must be a positive number, got {s!r:.60}")
    for key in ("use_dynamic_shifting", "uniform_sigmas"):
        if not isinstance(cfg[key], bool):
            raise ValueError(f"{key} must be true or false, got {cfg[key]!r:.60}")
    if cfg["use_dynamic_shifting"]:
        for key in ("base_shift", "max_shift"):
            if not is_number(cfg[key]):
                raise ValueError(f"{key} must be a number, got {cfg[key]!r:.60}")
        lo, hi = cfg["base_image_seq_len"], cfg["max_image_seq_len"]
        if not (is_int(lo) and is_int(hi) and lo != hi):
            raise ValueError(f"base_image_seq_len and max_image_seq_len must be two different integers, got "
                             f"{lo!r:.20} and {hi!r:.20}")
        if (kind := cfg["time_shift_type"]) not in TIME_SHIFTS:
            raise ValueError(f"time_shift_type must be one of {', '.join(TIME_SHIFTS)}, got {kind!r:.60}")
    for key in UNSUPPORTED:
        if cfg[key]:
            raise ValueError(f"{key} = {cfg[key]!r:.60} is not supported by minledits' flow sampler (only the static "
                             f"shift of Stable Diffusion 3 and the dynamic shift of FLUX.1); remove it from the "
                             f"scheduler config")
    return cfg


def image_tokens(h: int, w: int) -> int:
    """n: the tokens of an h x w latent, packed in 2 x 2 patches (FluxPipeline's image_seq_len)."""
    return (h // 2) * (w // 2)


def mu_of(cfg: dict, n: int) -> float:
    """mu = n m + b: the line through (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift), in
    Python floats in the pipeline's order (calculate_shift)."""
    m = (cfg["max_shift"] - cfg["base_shift"]) / (cfg["max_image_seq_len"] - cfg["base_image_seq_len"])
    b = cfg["base_shift"] - m * cfg["base_image_seq_len"]
    return n * m + b


def shifted(s: float, u: torch.Tensor) -> torch.Tensor:
    """f(u) = s u / (1 + (s - 1) u), in u's dtype and the scheduler's order of operations."""
    return s * u / (1 + (s - 1) * u)


def time_shifted(cfg: dict, mu: float, u: torch.Tensor) -> torch.Tensor:
    """g(u) = a / (a + (1/u - 1)), a = e^mu (exponential) or mu (linear), in u's dtype (a rounded to it first, as
    numpy does with the scheduler's Python float)."""
    a = torch.full_like(u, math.exp(mu) if cfg["time_shift_type"] == "exponential" else mu)
    return a / (a + (torch.ones_like(u) / u - 1))


def linspace(start: float, stop: float, N: int) -> torch.Tensor:
    """numpy's linspace(start, stop, N) in float64, bit for bit: start + k (stop - start) / (N - 1), the last stop."""
    if N == 1:
        return torch.tensor([start], dtype=torch.float64)
    u = torch.arange(N, dtype=torch.float64) * ((stop - start) / (N - 1)) + start
    u[-1] = stop
    return u


def flow_sigmas(config: dict, N: int, tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmas [N + 1], timesteps [N]), float32: those of FlowMatchEulerDiscreteScheduler(**config).set_timesteps(N)
    (with uniform_sigmas: set_timesteps(sigmas=linspace(1, 1/N, N)); with the dynamic shift: mu=mu(tokens)), bit for
    bit. ValueError (one line) for N outside 1..T or tokens missing where the dynamic shift needs them."""
    cfg = flow_config(config)
    T, s, dynamic = cfg["num_train_timesteps"], cfg["shift"], cfg["use_dynamic_shifting"]
    if not (is_int(N) and 1 <= N <= T):
        raise ValueError(f"the number of flow steps must be an integer in 1..{T}, got {N!r:.60}")
    if dynamic and not (is_int(tokens) and tokens >= 1):
        raise ValueError(f"the dynamic shift needs the image's token count (an integer >= 1: image_tokens(h, w) of "
                         f"the latent), got {tokens!r:.60}")
    if cfg["uniform_sigmas"]:
        u = linspace(1.0, 1 / N, N).to(torch.float32)
    else:
        ends = torch.tensor([1.0, float(T)], dtype=torch.float32) / T
        sigma_lo, sigma_hi = (ends if dynamic else shifted(s, ends)).tolist()
        u = linspace(sigma_hi * T, sigma_lo * T, N) / T
    sigmas = (time_shifted(cfg, mu_of(cfg, tokens), u) if dynamic else shifted(s, u)).to(torch.float32)
    timesteps = sigmas * T
    return torch.cat([sigmas, torch.zeros(1)]), timesteps


class FlowEuler:
    """The Euler step of a rectified flow over N inference steps (FlowMatchEulerDiscreteScheduler's step) and its
    inverse (unstep), from the model's scheduler config; tokens = image_tokens(h, w) of the latent, which the dynamic
    shift needs (ignored without it). timesteps and inv_timesteps are float32 tensors."""
    name, trajectory, outputs = "flow", True, ("flow",)

    def __init__(self, config: dict, N: int, tokens: int | None = None):
        self.N = N
        self.sigmas, self.timesteps = flow_sigmas(config, N, tokens)
        self.inv_timesteps = self.sigmas[1:] * flow_config(config)["num_train_timesteps"]  # T sigma_{k+1}

    def move(self, x: torch.Tensor, sigma_from: torch.Tensor, sigma_to: torch.Tensor, v: torch.Tensor):
        """x + (sigma_to - sigma_from) v: x upcast to float32, the float32 step size times v in v's dtype (a 0-d
        tensor does not promote v), the sum returned in v's dtype."""
        d = (sigma_to - sigma_from).to(v.device)
        return (x.to(torch.float32) + d * v).to(v.dtype)

    @classmethod
    def for_inversion(cls, schedule: dict, N: int, keep_last_noise: bool, latent_size=None) -> "FlowEuler":
        """No noise maps: keep_last_noise has no meaning (InversionSettings refuses it); the latent's size (h, w)
        gives the dynamic shift its token count (refused without it there)."""
        return cls(schedule, N, None if latent_size is None else image_tokens(*latent_size))

    @staticmethod
    def default_skip(N: int) -> int:
        """FlowEdit's: it edits the last n_max = 33 of 50 steps, so the two methods start from the same noise level."""
        return N - round(33 * N / 50)

    def step(self, k: int, x: torch.Tensor, v: torch.Tensor, z=None) -> torch.Tensor:
        """x_{k+1} from x_k and the velocity at (x_k, t_k); z (the protocol's noise) is not used."""
        return self.move(x, self.sigmas[k], self.sigmas[k + 1], v)

    mu = step

    def noise_map(self, k, x, x_prev, v) -> torch.Tensor:
        return torch.zeros_like(x_prev)

    def x0_hat(self, k: int, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.move(x, self.sigmas[k], torch.zeros(()), v)

    def unstep(self, k: int, x_next: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """x_k from x_{k+1} and the velocity at (x_{k+1}, inv_timesteps[k])."""
        return self.move(x_next, self.sigmas[k + 1], self.sigmas[k], v)

    def scale_noise(self, k: int, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_{sigma_k} = sigma_k noise + (1 - sigma_k) x0, sigma_k in x0's dtype."""
        sigma = self.sigmas[k].to(device=x0.device, dtype=x0.dtype).reshape([1] * x0.dim())
        return sigma * noise + (1.0 - sigma) * x0

    add_noise = scale_noise


SAMPLERS[FlowEuler.name] = FlowEuler

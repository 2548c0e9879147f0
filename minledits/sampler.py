"""Samplers: each reverse step of the diffusion beside its inverse, the noise map that makes the step land
on a given latent. Every editing method regenerates a latent x_{tau_k} -> x_{tau_{k+1}} by

    x_prev = step(k, x, out, z)           the sampler's update with the injected noise z
    z      = noise_map(k, x, x_prev, out) its inverse: the z for which step(k, x, out, z) == x_prev

where `out` is the (guided) model output - eps, or v for a v-prediction model, converted inside - and k is
the inference step (0 = the noisiest). A sampler is an object because a multistep solver keeps a history of
model outputs between steps; DDPM keeps none, so its `step` and `noise_map` may also take a slice of
steps (batched over k, their scalars as [n, 1, 1, 1] columns).

DDPM (the posterior step: DDIM's formulas with eta = 1); schedule symbols as in schedule.py
    a_prev   abar_{t - D}      abar at the previous inference step, with D = T // N for every timestep_spacing as in
                               DDIMScheduler.step: t - D = tau_{k+1} for 'leading', and for 'trailing' when N divides T,
                               not always otherwise; abar_0 past the end (set_alpha_to_one false), else 1
    sigma    sigma_t           posterior std: sigma_t^2 = (1 - a_prev) / (1 - abar_t) * (1 - abar_t / a_prev)
    eps      eps               noise estimate; from v: eps = sqrt(abar_t) v + sqrt(1 - abar_t) x_t
    x0_hat   xhat_0            (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t): the clean latent predicted
    mu       mu_t              sqrt(a_prev) xhat_0 + sqrt(1 - a_prev - sigma_t^2) eps: the posterior mean
    step     x_{t-1}           mu_t + sigma_t z
    noise_map  z               (x_{t-1} - mu_t) / sigma_t

DDIM (deterministic: DDIM's formulas with eta = 0, sigma_t = 0; a_prev as DDPM's), and its inversion
    step     x_{t-1}           mu_t = sqrt(a_prev) xhat_0 + sqrt(1 - a_prev) eps: no noise enters, whatever z is
    noise_map  z               0: no z is needed to land anywhere, the trajectory itself is the inversion
    unstep   x_t               sqrt(abar_t) xhat'_0 + sqrt(1 - abar_t) eps': the inverse step, from x_{t-1}, with
                               the model run at (x_{t-1}, tau_k) giving eps' (from v: sqrt(a_prev) v +
                               sqrt(1 - a_prev) x_{t-1}), and xhat'_0 = (x_{t-1} - sqrt(1 - a_prev) eps') / sqrt(a_prev)
                               (diffusers' DDIMInverseScheduler: its model input is the latent one step cleaner than
                               tau_k, its first one w_0 itself, taken as noised to a_prev = abar_0, or 1)
An inversion by unstep is approximate: eps at (x_{t-1}, tau_k) stands in for eps at (x_t, tau_k), so regenerating
it returns w_0 only up to that error (with source guidance, more); its noise maps are all 0, so an edit with the
inversion's settings is the plain DDIM sampler started from x_{tau_skip}.
"""
from typing import NamedTuple, Protocol

import torch

from .schedule import Schedule


class Sampler(Protocol):
    """What the methods use of a sampler; DDPM, DPMSolverPP and DDIM, SAMPLERS holds them by name."""
    name: str                # its key in SAMPLERS (inversion files record it)
    N: int                   # inference steps
    timesteps: list[int]     # tau_k, k = 0..N-1, descending

    @classmethod  # a fresh sampler for an inversion; keep_last_noise: one whose last step has a noise map
    def for_inversion(cls, schedule: Schedule, N: int, keep_last_noise: bool) -> "Sampler": ...
    @staticmethod  # the skip its method's reference uses, in proportion to N
    def default_skip(N: int) -> int: ...
    def add_noise(self, k, x0, noise): ...
    def x0_hat(self, k, x, out): ...
    def mu(self, k, x, out): ...
    def step(self, k, x, out, z): ...
    def noise_map(self, k, x, x_prev, out): ...
    # True: the inversion walks up the trajectory with unstep(k, x_prev, out) (DDIM); False: it draws the x_t
    # independently and maps the noise between them (noise_map)
    trajectory: bool


class Step(NamedTuple):
    """The scalars of one inference step at timestep t (floats), or of several ([n] / [n, 1, 1, 1] tensors)."""
    t: int
    a_bar: float
    a_prev: float
    sigma: float


def abar_prev(schedule: Schedule, t: int, D: int) -> torch.Tensor:
    """abar_{t - D}: abar at the previous inference step, past the end abar_0 (1 with set_alpha_to_one)."""
    return schedule.a_bar[t - D] if t - D >= 0 else (torch.tensor(1.0) if schedule.alpha_one else schedule.a_bar[0])


class DDPM:
    """The DDPM posterior step over N inference steps of `schedule`, and its inverse."""
    name, trajectory = "ddpm", False

    def __init__(self, schedule: Schedule, N: int):
        """ValueError (one line) for N outside 1..T, and for a step the posterior is undefined at."""
        self.N, self.v_prediction = N, schedule.prediction_type == "v_prediction"
        timesteps, a_bar = schedule.timesteps(N), schedule.a_bar
        D, self.steps = schedule.T // N, []  # t - D for every spacing, as DDIMScheduler.step
        for k, t in enumerate(timesteps):
            a_prev = abar_prev(schedule, t, D)
            var = (1 - a_prev) / (1 - a_bar[t]) * (1 - a_bar[t] / a_prev)  # in float32, like the reference
            where = f"DDPM step {k} of {N} at t = {t} (timestep_spacing {schedule.spacing!r})"
            if a_bar[t] == 0:
                raise ValueError(f"{where} has abar_t = 0 (rescale_betas_zero_snr) and xhat_0 divides by sqrt(abar_t); "
                                 f"use 'leading' spacing with a number of steps that skips t = {t}")
            if not var > 0:
                why = "set_alpha_to_one makes abar_prev 1" if t - D < 0 and schedule.alpha_one else "it is t = 0"
                raise ValueError(f"{where} has sigma_t = 0 ({why}), so its noise map (x_prev - mu_t) / sigma_t is "
                                 "undefined; use 'leading' or 'trailing' spacing with steps_offset >= 1, "
                                 "set_alpha_to_one false, and fewer steps than T")
            if min(1 - a_prev - var.sqrt() ** 2, 1 - a_prev.item() - var.sqrt().item() ** 2) < 0:  # as mu_t computes it
                raise ValueError(f"{where} has abar_t = {a_bar[t].item():.3g}, too close to 0: 1 - abar_prev - "
                                 "sigma_t^2 rounds below 0 (diffusers can give NaN); use 'leading' spacing")
            if a_prev / a_bar[t] > 1e4:  # xhat_0 ~ x_t / sqrt(abar_t): v -> eps -> xhat_0 loses 1e-5 relative
                raise ValueError(f"{where} has abar_t = {a_bar[t].item():.3g}, too close to 0: xhat_0 amplifies "
                                 "float32 rounding by sqrt(abar_prev / abar_t) > 100; use 'leading' spacing")
            self.steps.append(Step(t, a_bar[t].item(), a_prev.item(), var.sqrt().item()))
        self.timesteps = [s.t for s in self.steps]

    @classmethod
    def for_inversion(cls, schedule: Schedule, N: int, keep_last_noise: bool) -> "DDPM":
        return cls(schedule, N)  # its last step always has a noise map

    @staticmethod
    def default_skip(N: int) -> int:
        """LEDITS' 36 of 100 steps."""
        return round(36 * N / 100)

    def at(self, k, like: torch.Tensor | None = None) -> Step:
        """The scalars of step k (an int), or of steps k (a slice) as float32 columns on like's device."""
        if isinstance(k, int):
            return self.steps[k]
        steps = self.steps[k]
        col = lambda j: torch.tensor([s[j] for s in steps], dtype=torch.float32, device=like.device).view(-1, 1, 1, 1)
        return Step(torch.tensor([s.t for s in steps], device=like.device), col(1), col(2), col(3))

    def add_noise(self, k, x0, noise):
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise  (the forward process, in one jump)."""
        s = self.at(k, x0)
        return s.a_bar**0.5 * x0 + (1 - s.a_bar) ** 0.5 * noise

    def eps(self, k, x, out):
        """The model output as a noise estimate: a v-prediction model's v is converted."""
        s = self.at(k, x)
        return s.a_bar**0.5 * out + (1 - s.a_bar) ** 0.5 * x if self.v_prediction else out

    def x0_hat(self, k, x, out):
        s, eps = self.at(k, x), self.eps(k, x, out)
        return (x - (1 - s.a_bar) ** 0.5 * eps) / s.a_bar**0.5

    def mu(self, k, x, out):
        s, eps = self.at(k, x), self.eps(k, x, out)
        return s.a_prev**0.5 * self.x0_hat(k, x, out) + (1 - s.a_prev - s.sigma**2) ** 0.5 * eps

    def step(self, k, x, out, z):
        return self.mu(k, x, out) + self.at(k, x).sigma * z

    def noise_map(self, k, x, x_prev, out):
        return (x_prev - self.mu(k, x, out)) / self.at(k, x).sigma


class DDIM(DDPM):
    """The deterministic DDIM step (eta = 0) over N inference steps of `schedule`, and its inverse step (unstep):
    diffusers' DDIMScheduler(eta=0) and DDIMInverseScheduler on the model's scheduler config."""
    name, trajectory = "ddim", True

    def __init__(self, schedule: Schedule, N: int):
        """ValueError (one line) for N outside 1..T, 'linspace' spacing (DDIMInverseScheduler has none), and a step
        at abar_t = 0 (xhat_0 divides by sqrt(abar_t))."""
        if schedule.spacing == "linspace":
            raise ValueError("the ddim sampler's inversion (diffusers' DDIMInverseScheduler) takes 'leading' or "
                             "'trailing' timestep_spacing, not 'linspace'; use the ddpm sampler")
        self.N, self.v_prediction = N, schedule.prediction_type == "v_prediction"
        timesteps, a_bar, D = schedule.timesteps(N), schedule.a_bar, schedule.T // N
        self.steps = []
        for k, t in enumerate(timesteps):
            if a_bar[t] == 0:
                raise ValueError(f"DDIM step {k} of {N} at t = {t} has abar_t = 0 (rescale_betas_zero_snr) and xhat_0 "
                                 f"divides by sqrt(abar_t); use 'leading' spacing with a number of steps that skips "
                                 f"t = {t}")
            self.steps.append(Step(t, a_bar[t].item(), abar_prev(schedule, t, D).item(), 0.0))
        self.timesteps = [s.t for s in self.steps]
        self.abar = [(a_bar[t], abar_prev(schedule, t, D)) for t in self.timesteps]  # float32 (abar_t, a_prev)

    @staticmethod
    def default_skip(N: int) -> int:
        """0: the DDIM + P2P baseline (Prompt-to-Prompt's null-text notebook, PnPInversion's run_editing_p2p) inverts
        every step and edits from the noisiest latent."""
        return 0

    def jump(self, a_from, a_to, x, out):
        """The DDIM update from x at abar a_from to abar a_to with the model output `out`, in float32 0-d scalars and
        the schedulers' order of operations (their step's arithmetic, so that equal inputs give equal latents)."""
        a_from, a_to = a_from.to(x.device), a_to.to(x.device)
        b = 1 - a_from
        if self.v_prediction:
            x0, eps = a_from**0.5 * x - b**0.5 * out, a_from**0.5 * out + b**0.5 * x
        else:
            x0, eps = (x - b**0.5 * out) / a_from**0.5, out
        return a_to**0.5 * x0 + (1 - a_to) ** 0.5 * eps

    def step(self, k, x, out, z):
        """x_{t-1} = mu_t (z is not used: sigma_t = 0)."""
        return self.jump(*self.abar[k], x, out)

    def noise_map(self, k, x, x_prev, out):
        return torch.zeros_like(x_prev)

    def unstep(self, k, x_prev, out):
        """x_{tau_k} from the latent one step cleaner (w_0 at k = N - 1) and the model's output at (x_prev, tau_k)."""
        a_bar, a_prev = self.abar[k]
        return self.jump(a_prev, a_bar, x_prev, out)


class DPMStep(NamedTuple):
    """The scalars of one DPM-Solver++ step (floats holding the float32 values the scheduler computes)."""
    t: int
    alpha: float
    sigma: float
    A: float
    B: float
    C: float
    r: float       # 1 / r_k (NaN at k = 0)
    half_B: float  # B_k / 2


# DPMSolverMultistepScheduler options with the only value implemented here (SD scheduler configs have none of them)
DPM_FIXED = {"use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
             "use_lu_lambdas": False, "use_flow_sigmas": False, "final_sigmas_type": "zero",
             "lambda_min_clipped": -float("inf"), "solver_type": "midpoint", "variance_type": None}


class DPMSolverPP:
    """SDE-DPM-Solver++ (2M): the second-order multistep solver of the LEDITS++ pipeline, and its inverse.

    It is diffusers' DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order=2) as
    LEditsPPPipelineStableDiffusion makes it from an SD scheduler config (from_config: lower_order_final true,
    euler_at_final false, final_sigmas_type "zero", plain sigmas, midpoint), with what the pipeline forces:
    steps_offset 1 (__init__) and 'leading' spacing (invert); the config's own spacing and offset are not read.
    k = 0..N-1 (0 = the noisiest), k + 1 the next step; every scalar is float32, in the scheduler's order.
        tau      tau_k             (N - k) (T // (N + 1)) + 1, the scheduler's 'leading' grid (not DDPM's)
        s        s_k               sqrt((1 - abar_{tau_k}) / abar_{tau_k});  abar_{T-1} = 2^-24 with zero SNR;
                                   s_N = 0 (final "zero"), or s at t = 0 (final "sigma_min": exactly invertible)
        alpha    alpha_k           1 / sqrt(s_k^2 + 1)
        sigma    sigma_k           s_k alpha_k
        add_noise  x_{tau_k}       alpha_k x_0 + sigma_k noise
        lam      lambda_k          log(alpha_k) - log(sigma_k)            (lambda_N = inf)
        h        h_k               lambda_{k+1} - lambda_k
        A        A_k               sigma_{k+1} / sigma_k exp(-h_k)
        B        B_k               alpha_{k+1} (1 - exp(-2 h_k))
        C        C_k               sigma_{k+1} sqrt(1 - exp(-2 h_k))     (C_{N-1} = 0 with final "zero")
        r        1 / r_k           1 / (h_{k-1} / h_k)
        x0_hat   D_k               (x - sigma_k eps) / alpha_k, or alpha_k x - sigma_k v: the data prediction
        mu       mu_k              A_k x + B_k D_k                                  first order
                                   A_k x + B_k D_k + (B_k / 2) (D_k - D_{k-1}) / r_k  second order (midpoint)
        step     x_{tau_{k+1}}     mu_k + C_k z
        noise_map  z               (x_{tau_{k+1}} - mu_k) / C_k, and 0 where C_k = 0 (the pipeline's too)
    First order at the run's first step (no D_{k-1}) and at k = N - 1 when final is "zero" or N < 15
    (lower_order_final), second order otherwise. With final "zero" (the pipeline's grid) the last step lands on
    D_{N-1} whatever z is, so no noise map can make it land on w_0; final "sigma_min" (diffusers'
    final_sigmas_type="sigma_min") ends the grid at the smallest training sigma, so the last step has a noise map
    too and regenerating an inversion returns w_0 (InversionSettings.keep_last_noise picks it).

    History: the object keeps D_{k-1}. Calls come for k ascending by one from the run's first step (the edit's
    and the inversion's is k = skip); a call may repeat its k (noise_map, then step). A fresh object, or
    reset(), starts a run. noise_map also takes a slice of steps (row i of x, x_prev, out is step start + i) and
    maps them in order: the inversion's x_t are independent, so their UNet outputs can be batched first.
    """
    name, trajectory = "dpmsolver++", False

    def __init__(self, schedule: Schedule, N: int, final: str = "zero"):
        """ValueError (one line) for N outside 1..T-2 and for scheduler options this solver does not implement.
        final: "zero" | "sigma_min", the grid's last sigma (see the class docstring)."""
        if final not in ("zero", "sigma_min"):
            raise ValueError(f"final must be 'zero' or 'sigma_min', got {final!r}")
        for key, value in DPM_FIXED.items():
            if schedule.config.get(key, value) != value:
                raise ValueError(f"{key} must be {value!r} for the dpmsolver++ sampler, got {schedule.config[key]!r}")
        T = schedule.T
        if not (isinstance(N, int) and not isinstance(N, bool) and 1 <= N <= T - 2):
            raise ValueError(f"the number of dpmsolver++ steps must be an integer from 1 to num_train_timesteps - 2 "
                             f"({T - 2}): its grid (N - k) (T // (N + 1)) + 1 must stay below T; got {N!r}")
        self.N, self.v_prediction = N, schedule.prediction_type == "v_prediction"
        self.final, self.last_first_order = final, final == "zero" or N < 15  # lower_order_final
        self.timesteps = [(N - k) * (T // (N + 1)) + 1 for k in range(N)]
        a_bar = schedule.a_bar.clone()
        if schedule.config["rescale_betas_zero_snr"]:
            a_bar[-1] = 2**-24  # as the scheduler does, so that s_{T-1} is finite
        s_all = ((1 - a_bar) / a_bar) ** 0.5
        s = [s_all[t] for t in self.timesteps] + [s_all[0] if final == "sigma_min" else torch.tensor(0.0)]
        alpha = [1 / (s_k**2 + 1) ** 0.5 for s_k in s]
        sigma = [s_k * alpha_k for s_k, alpha_k in zip(s, alpha)]
        lam = [torch.log(alpha_k) - torch.log(sigma_k) for alpha_k, sigma_k in zip(alpha, sigma)]
        h = [lam[k + 1] - lam[k] for k in range(N)]
        self.steps = [self.scalars(k, alpha, sigma, h) for k in range(N)]
        self.reset()

    @classmethod
    def for_inversion(cls, schedule: Schedule, N: int, keep_last_noise: bool) -> "DPMSolverPP":
        return cls(schedule, N, "sigma_min" if keep_last_noise else "zero")

    @staticmethod
    def default_skip(N: int) -> int:
        """LEditsPPPipelineStableDiffusion's skip=0.15: its invert(num_inversion_steps=n) sets int(n * 1.15) steps and
        skips all but n; for N steps, the largest n that fits."""
        return N - max(n for n in range(1, N + 1) if int(n * (1 + 0.15)) <= N)

    def scalars(self, k, alpha, sigma, h) -> DPMStep:
        """Step k's scalars from the float32 0-d tensors alpha_k, sigma_k (k = 0..N) and h_k (k = 0..N-1)."""
        A = sigma[k + 1] / sigma[k] * torch.exp(-h[k])
        B = alpha[k + 1] * (1 - torch.exp(-2.0 * h[k]))
        C = sigma[k + 1] * torch.sqrt(1.0 - torch.exp(-2 * h[k]))
        r = 1.0 / (h[k - 1] / h[k]) if k else torch.tensor(float("nan"))
        return DPMStep(self.timesteps[k], *(v.item() for v in (alpha[k], sigma[k], A, B, C, r, 0.5 * B)))

    def reset(self) -> None:
        """Forget the history: the next call is the first step of a run."""
        self.D = {}

    def previous(self, k: int) -> torch.Tensor | None:
        """D_{k-1}, or None when k is the run's first step; ValueError for a call out of order."""
        if k - 1 in self.D:
            return self.D[k - 1]
        if set(self.D) <= {k}:
            return None
        raise ValueError(f"dpmsolver++ step {k} after step {max(self.D)}: its calls must come for k ascending by one "
                         "(a repeat of k is allowed); reset() or a new sampler starts a run")

    def add_noise(self, k, x0, noise):
        s = self.steps[k]
        return (s.alpha * x0.float() + s.sigma * noise.float()).to(x0.dtype)

    def x0_hat(self, k, x, out):
        """D_k (float32)."""
        s, x, out = self.steps[k], x.float(), out.float()
        return s.alpha * x - s.sigma * out if self.v_prediction else (x - s.sigma * out) / s.alpha

    def mu(self, k, x, out):
        """mu_k (float32); records D_k as the history of step k + 1."""
        s, D, D_prev = self.steps[k], self.x0_hat(k, x, out), self.previous(k)
        self.D = {k: D} if D_prev is None else {k - 1: D_prev, k: D}
        first = s.A * x.float() + s.B * D
        if D_prev is None or k == self.N - 1 and self.last_first_order:
            return first
        return first + s.half_B * (s.r * (D - D_prev))

    def step(self, k, x, out, z):
        return (self.mu(k, x, out) + self.steps[k].C * z.float()).to(x.dtype)

    def noise_map(self, k, x, x_prev, out):
        if isinstance(k, slice):
            ks = range(*k.indices(self.N))
            return torch.cat([self.noise_map(j, x[i:i + 1], x_prev[i:i + 1], out[i:i + 1]) for i, j in enumerate(ks)])
        mu, C = self.mu(k, x, out), self.steps[k].C
        return ((x_prev.float() - mu) / C if C > 0 else torch.zeros_like(mu)).to(x.dtype)


SAMPLERS = {DDPM.name: DDPM, DPMSolverPP.name: DPMSolverPP, DDIM.name: DDIM}

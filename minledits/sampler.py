"""Samplers: each reverse step of the diffusion beside its inverse, the noise map that makes the step land
on a given latent. Every editing method regenerates a latent x_{tau_k} -> x_{tau_{k+1}} by

    x_prev = step(k, x, out, z)           the sampler's update with the injected noise z
    z      = noise_map(k, x, x_prev, out) its inverse: the z for which step(k, x, out, z) == x_prev

where `out` is the (guided) model output - eps, or v for a v-prediction model, converted inside - and k is
the inference step (0 = the noisiest). A sampler is an object because a multistep solver (DPM-Solver++, in
dpmsolver.py) keeps a history of model outputs between steps; DDPM keeps none, so its `step` and `noise_map` may
also take a slice of steps (batched over k, their scalars as [n, 1, 1, 1] columns).

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
"""
from typing import NamedTuple, Protocol

import torch

from .schedule import Schedule


class Sampler(Protocol):
    """What the methods use of a sampler; SAMPLERS holds them by name: DDPM here, DDIM in ddim.py, DPMSolverPP
    (LEDITS++') in dpmsolver.py, FlowEuler (a rectified flow's Euler step) in flowmatch.py."""
    name: str                # its key in SAMPLERS (inversion files record it)
    N: int                   # inference steps
    timesteps: list[int]     # tau_k, k = 0..N-1, descending (a flow's: T sigma_k, a float32 tensor; numbers())
    outputs: tuple[str, ...]  # the model outputs it takes (prediction types: eps and v, or a flow's velocity)

    @classmethod  # a fresh sampler for an inversion (schedule: sd.schedule, a flow's a dict); keep_last_noise: one
    # whose last step has a noise map; latent_size (h, w): what a schedule that depends on it takes (FLUX's shift)
    def for_inversion(cls, schedule: Schedule, N: int, keep_last_noise: bool, latent_size=None) -> "Sampler": ...
    @staticmethod  # the skip its method's reference uses, in proportion to N
    def default_skip(N: int) -> int: ...
    def add_noise(self, k, x0, noise): ...
    def x0_hat(self, k, x, out): ...
    def mu(self, k, x, out): ...
    def step(self, k, x, out, z): ...
    def noise_map(self, k, x, x_prev, out): ...
    # True: the inversion walks up the trajectory with unstep(k, x_prev, out), the model run at (x_prev,
    # inv_timesteps[k]) (DDIM, flow); False: it draws the x_t independently and maps the noise between them (noise_map)
    trajectory: bool
    inv_timesteps: list[int]  # a trajectory sampler's: the timestep unstep(k) wants the model at (DDIM: tau_k)


def numbers(timesteps) -> list:
    """A sampler's timesteps as Python numbers: ints, or a tensor's values (float32 ones as the floats they equal)."""
    return timesteps.tolist() if isinstance(timesteps, torch.Tensor) else list(timesteps)


def takes(sampler, prediction_type: str) -> bool:
    """Whether the sampler (class or object) works on a model whose output is prediction_type."""
    return prediction_type in sampler.outputs


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
    name, trajectory, outputs = "ddpm", False, ("epsilon", "v_prediction")

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
    def for_inversion(cls, schedule: Schedule, N: int, keep_last_noise: bool, latent_size=None) -> "DDPM":
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


SAMPLERS = {DDPM.name: DDPM}  # ddim.py, dpmsolver.py and flowmatch.py add "ddim", "dpmsolver++" and "flow"

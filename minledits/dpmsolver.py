"""SDE-DPM-Solver++ (2M), the sampler of LEDITS++: its step beside its inverse, the noise map (sampler.py says what a
sampler is; this one adds itself to sampler.SAMPLERS as "dpmsolver++"). Its notation is in DPMSolverPP's docstring.
"""
from typing import NamedTuple

import torch

from .sampler import SAMPLERS
from .schedule import Schedule


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
    name, trajectory, outputs = "dpmsolver++", False, ("epsilon", "v_prediction")

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
    def for_inversion(cls, schedule: Schedule, N: int, keep_last_noise: bool, latent_size=None) -> "DPMSolverPP":
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


SAMPLERS[DPMSolverPP.name] = DPMSolverPP

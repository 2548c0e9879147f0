"""The noise schedule of Stable Diffusion and the DDPM posterior step (DDIM with eta = 1).

Notation (code name -> symbol)
    T        T                 number of training timesteps (1000)
    beta     beta_t            variance of the noise added at training step t
    a_bar    abar_t            prod_{s <= t} (1 - beta_s): x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps
    tau      tau_k             the N inference timesteps, descending: tau_k = D (N - 1 - k) + offset, D = T // N
    a_prev   abar_{t - D}      abar at the previous inference step; abar_0 past the end (set_alpha_to_one false)
    sigma    sigma_t           posterior std: sigma_t^2 = (1 - a_prev) / (1 - abar_t) * (1 - abar_t / a_prev)
    x0_hat   xhat_0            the clean latent predicted from x_t and eps
    mu       mu_t              posterior mean, so that x_{t-1} = mu_t + sigma_t z,  z ~ N(0, I)
"""
from typing import NamedTuple

import torch


class Step(NamedTuple):
    """The scalars of one inference step at timestep t."""
    t: int
    a_bar: float
    a_prev: float
    sigma: float


class Schedule:
    """abar_t for the 1000 training steps, and the N-step inference steps built from it."""

    def __init__(self, config: dict):
        self.T = config.get("num_train_timesteps", 1000)
        self.offset = config.get("steps_offset", 1)
        self.prediction_type = config.get("prediction_type", "epsilon")
        self.alpha_one = config.get("set_alpha_to_one", False)
        b0, b1, kind = config.get("beta_start", 0.00085), config.get("beta_end", 0.012), config.get("beta_schedule", "scaled_linear")
        if kind == "scaled_linear":
            beta = torch.linspace(b0**0.5, b1**0.5, self.T, dtype=torch.float32) ** 2
        elif kind == "linear":
            beta = torch.linspace(b0, b1, self.T, dtype=torch.float32)
        else:
            raise ValueError(f"unsupported beta_schedule {kind!r} (expected scaled_linear or linear)")
        self.a_bar = torch.cumprod(1.0 - beta, dim=0)  # float32, as Stable Diffusion was trained

    def timesteps(self, N: int) -> list[int]:
        """tau_k = D (N - 1 - k) + offset for k = 0..N-1 ("leading" spacing), descending."""
        D = self.T // N
        return [D * (N - 1 - k) + self.offset for k in range(N)]

    def steps(self, N: int) -> list[Step]:
        """The scalars of each of the N inference steps, in the order they run (t descending)."""
        D, out = self.T // N, []
        for t in self.timesteps(N):
            a_bar = self.a_bar[t]
            a_prev = self.a_bar[t - D] if t - D >= 0 else (torch.tensor(1.0) if self.alpha_one else self.a_bar[0])
            var = (1 - a_prev) / (1 - a_bar) * (1 - a_bar / a_prev)  # in float32, like the reference
            out.append(Step(t, a_bar.item(), a_prev.item(), var.sqrt().item()))
        return out


def add_noise(x0, eps, s: Step):
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps  (the forward process, in one jump)."""
    return s.a_bar**0.5 * x0 + (1 - s.a_bar) ** 0.5 * eps


def x0_hat(x, eps, s: Step):
    """xhat_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
    return (x - (1 - s.a_bar) ** 0.5 * eps) / s.a_bar**0.5


def mu(x, eps, s: Step):
    """mu_t = sqrt(a_prev) xhat_0 + sqrt(1 - a_prev - sigma_t^2) eps  (DDIM, eta = 1)."""
    return s.a_prev**0.5 * x0_hat(x, eps, s) + (1 - s.a_prev - s.sigma**2) ** 0.5 * eps


def eps_from_v(v, x, s: Step):
    """v-prediction -> noise: eps = sqrt(abar_t) v + sqrt(1 - abar_t) x_t."""
    return s.a_bar**0.5 * v + (1 - s.a_bar) ** 0.5 * x

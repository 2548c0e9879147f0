"""The deterministic DDIM sampler and its inversion, the contrast LEDITS draws and the "DDIM + P2P" baseline of
PIE-Bench (sampler.py says what a sampler is; this one adds itself to sampler.SAMPLERS as "ddim"); symbols as in
sampler.py's DDPM block.

DDIM's formulas with eta = 0 (sigma_t = 0; a_prev as DDPM's), and the inverse step
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
import torch

from .sampler import DDPM, SAMPLERS, Step, abar_prev
from .schedule import Schedule


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
        self.timesteps = self.inv_timesteps = [s.t for s in self.steps]  # unstep's model runs at tau_k
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


SAMPLERS[DDIM.name] = DDIM

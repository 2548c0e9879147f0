"""RF-Inversion (Rout, Chen, Ruiz, Caramanis, Shakkottai & Chu 2024): inversion and editing on a rectified flow by
two controlled ODEs. The forward ODE carries the photo's latent y_0 to noise, pulled (gamma) towards one noise draw
y_1; the reverse ODE, under the target prompt, starts from where it arrived and is pulled (eta) back towards y_0 for
the steps between start and stop. As diffusers' community pipeline RFInversionFluxPipeline
(examples/community/pipeline_flux_rf_inversion.py: invert, then __call__ with the inverted latents) on FLUX.1.

Notation (code name -> symbol); flow symbols in flowmatch.py (sigma_k: the flow sampler's shifted sigmas for the
latent's tokens, sigma_0 = 1, sigma_N = 0; t_k = T sigma_k; k = 0 the noisiest), N steps
    x        x                the picture in [-1, 1]                                                    [1, 3, H, W]
    y_0      y_0              f (mu_E(x) + s_E(x) eps_E - shift): a sample of the VAE's posterior (mean mu_E, std
                              s_E = exp(logvar / 2), logvar clamped to [-30, 20]; f, shift as sd.encode)  [1, C, h, w]
    y_1      y_1              a standard normal draw: where the forward ODE is pulled                   [1, C, h, w]
  the controlled forward ODE (invert), i = 0 .. N - 1 from Y_0 = y_0:
    t_i      t_i              i / (N + 1): its time, also the transformer's timestep (unshifted; never reaches 1)
    u        u_t(Y)           the velocity at (Y_i, T t_i) under the source prompt, guidance embedding 0
    u_cond   u_t(Y | y_1)     (y_1 - Y_i) / (1 - t_i): the straight line to y_1
    u_hat    u^_t(Y)          u + gamma (u_cond - u): the controlled vector field (the paper's Eq. 8, Algorithm 1)
    Y        Y_{i+1}          Y_i + u_hat (sigma_i - sigma_{i+1})
  the controlled reverse ODE (edit), k = 0 .. N - 1 from X_0 = Y_N:
    v        v_t(X)           -(the velocity at (X_k, t_k)) under the target prompt, guidance embedding `guidance`
    s_k      s_k              1 - t_k / T in float32: the time as the reference counts it (1 - s_k = sigma_k up to
                              rounding)
    v_cond   v_t(X | y_0)     (y_0 - X_k) / (1 - s_k): the straight line to y_0
    eta_k    eta_k            eta for start <= k < stop, else 0; start = floor(start_timestep N),
                              stop = min(floor(stop_timestep N), N)
    v_hat    v^_t(X)          v + eta_k (v_cond - v): the controlled vector field (the paper's Algorithm 2)
    X        X_{k+1}          X_k + v_hat (sigma_k - sigma_{k+1});  the result is X_N
What the forward ODE's two clocks mean (the reference's, reproduced): the transformer and u_cond are told the time
t_i of N + 1 uniform steps from 0, while the latent moves by the shifted schedule's step sizes in the edit's order,
the noisy end's first: Y arrives at sigma_0 - sigma_N = 1 with the transformer last asked at N / (N + 1).

The draws: the reference seeds torch's global generator before invert and draws eps_E (the VAE's posterior sample)
then y_1 (torch.randn_like of the packed latent [1, (h/2)(w/2), 4C]). Here both come from a torch.Generator seeded
with `seed`, on the CPU in float32 (the numbers of torch.manual_seed(seed)'s CPU generator): eps_E of y_0's shape,
then y_1 drawn packed and unpacked (nets/flux.py), so equal to the reference's on the CPU at fp32 (on a GPU it draws
on the device: other numbers).

The inversion is an Inversion (inversion.py) with settings.gamma set: xts [N + 1] = Y_N, ..., Y_1, y_0 (the forward
path, noisiest first), timesteps the edit's t_k, zs 0, saved and loaded as any other; source_guidance records the
guidance embedding's value during the inversion (0: the reference's source_guidance_scale; none on schnell).
"""
import math
from dataclasses import dataclass

import torch

from .errors import MinleditsError, shorten
from .inversion import Inversion, InversionSettings
from .io.image import to_tensor
from .ledits import as_inversion
from .nets.flux import unpack
from .sampler import numbers

GAMMA = 0.5         # invert's gamma
STEPS = 28          # num_inversion_steps (and the edit's num_inference_steps)
ETA = 1.0           # __call__'s eta
START = 0.0         # __call__'s start_timestep
STOP = 0.25         # __call__'s stop_timestep
SOURCE_GUIDANCE = 0.0  # invert's source_guidance_scale: the guidance embedding's value in the forward ODE


@dataclass
class RFStep:
    """Everything one step of either ODE computed; handed to the callback (references, no copies)."""
    ode: str                    # "forward" (invert) or "reverse" (edit)
    i: int                      # the step: i of the forward ODE, k of the reverse one
    t: torch.Tensor             # the transformer's timestep T t_i (forward) or t_k (reverse)
    x: torch.Tensor             # Y_i or X_k                                                          [1, C, h, w]
    v: torch.Tensor             # u_t(Y_i), or v_t(X_k) (the transformer's velocity negated)
    v_cond: torch.Tensor        # u_t(Y_i | y_1) or v_t(X_k | y_0)
    strength: float             # gamma, or eta_k
    v_hat: torch.Tensor         # the controlled vector field
    x_next: torch.Tensor        # Y_{i+1} or X_{k+1}


def check_number(name: str, value, low=None, high=None) -> None:
    """A one-line ValueError unless value is a finite number (within [low, high] where given)."""
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and (low is None or value >= low) and (high is None or value <= high)):
        where = f" from {low} to {high}" if high is not None else f" >= {low}" if low is not None else ""
        raise ValueError(f"{name} must be a finite number{where}, got {shorten(value)}")


def check_model(sd) -> None:
    """RF-Inversion as its reference runs it needs FLUX.1's transformer (its guidance embedding, or schnell's none)."""
    if not hasattr(sd, "guidance_embeds"):
        raise ValueError(f"RF-Inversion runs on FLUX.1 (its reference is the FLUX pipeline's); this model "
                         f"({shorten(str(getattr(sd, 'model_id', '?')))}) is not FLUX.1: use flowedit, ledits or "
                         "leditspp")


def posterior_sample(sd, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """y_0 = f (mu_E(x) + s_E(x) eps - shift) in the model's dtype (the VAE's moments: mean, then log-variance)."""
    mean, logvar = sd.vae.moments(x.to(sd.device, sd.vae.conv_dtype))
    sample = mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * eps.to(mean)
    return ((sample - sd.vae.shift_factor) * sd.vae.scaling_factor).to(sd.dtype)


def draws(seed: int, C: int, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(eps_E [1, C, h, w], y_1 [1, C, h, w]) from one generator, on the CPU in float32 (module docstring)."""
    g = torch.Generator().manual_seed(seed)
    eps_E = torch.randn(1, C, h, w, generator=g, dtype=torch.float32)
    y_1 = unpack(torch.randn(1, (h // 2) * (w // 2), 4 * C, generator=g, dtype=torch.float32), h, w)
    return eps_E, y_1


def step_size(flow, k: int, x: torch.Tensor) -> torch.Tensor:
    """sigma_k - sigma_{k+1}, float32 on x's device (a 0-d tensor: x keeps its dtype)."""
    return (flow.sigmas[k] - flow.sigmas[k + 1]).to(x.device)


@torch.inference_mode()
def invert(sd, image, *, gamma=GAMMA, steps=STEPS, seed=0, size=None, keep_aspect=False, source_prompt="",
           callback=None) -> Inversion:
    """The controlled forward ODE from the picture (a path or PIL image, centre-cropped and resized to size, by
    default sd.default_size; keep_aspect: resized only) to noise: an Inversion for edit (module docstring).
    callback(RFStep) receives every step's tensors."""
    check_model(sd)
    if not isinstance(source_prompt, str):
        raise ValueError(f"the source prompt must be text, got {shorten(source_prompt)}")
    check_number("gamma", gamma, 0, 1)
    s = InversionSettings(steps=steps, skip=0, seed=seed, size=sd.default_size if size is None else size,
                          source_prompt=source_prompt, source_guidance=SOURCE_GUIDANCE, keep_aspect=keep_aspect,
                          sampler="flow", gamma=gamma)
    sd.check_fits(s.size, s.size)
    x = to_tensor(image, s.size, s.keep_aspect)
    h, w = (d // sd.latent_scale for d in x.shape[-2:])
    flow = s.new_sampler(sd.schedule, (h, w))  # refuses more steps than the model was trained with
    eps_E, y_1 = draws(seed, sd.vae.config["latent_channels"], h, w)
    y_0 = posterior_sample(sd, x, eps_E)
    y_1 = y_1.to(y_0)
    c = sd.text_embeddings([source_prompt])
    guidance = SOURCE_GUIDANCE if sd.guidance_embeds else None
    T, N = sd.schedule["num_train_timesteps"], steps
    path = [y_0]
    for i in range(N):
        Y = path[-1]
        t_i = torch.tensor(i / (N + 1), dtype=Y.dtype, device=Y.device)
        u = sd.predict(Y, T * t_i, c, guidance)
        u_cond = (y_1 - Y) / (1 - t_i)
        u_hat = u + gamma * (u_cond - u)
        path.append(Y + u_hat * step_size(flow, i, Y))
        check_finite("inversion", i, path[-1])
        if callback:
            callback(RFStep("forward", i, T * t_i, Y, u, u_cond, gamma, u_hat, path[-1]))
    xts = torch.cat(path[::-1])
    return Inversion(numbers(flow.timesteps), xts, torch.zeros_like(xts[1:]), x, s, str(sd.model_id),
                     str(sd.fingerprint))


@torch.inference_mode()
def edit(sd, inv, *, prompt, eta=ETA, start_timestep=START, stop_timestep=STOP, guidance=None,
         callback=None) -> torch.Tensor:
    """The controlled reverse ODE from an RF inversion (an Inversion from invert, or its file) under `prompt`: the
    edited latents [1, C, h, w] (decode them with minledits.decode). guidance: the guidance embedding's value
    (None: the model's default, 3.5 on FLUX.1-dev; schnell takes none). callback(RFStep) receives every step's
    tensors."""
    check_model(sd)
    if not isinstance(prompt, str):
        raise ValueError(f"the prompt must be text, got {shorten(prompt)}")
    check_number("eta", eta, 0, 1)
    check_number("start_timestep", start_timestep, 0)
    check_number("stop_timestep", stop_timestep, start_timestep)
    if guidance is not None:
        check_number("guidance", guidance)
    inv = as_inversion(inv)
    inv.check_tensors()
    inv.check_model(sd, rf=True)
    flow = inv.new_sampler(sd.schedule)
    N, T = flow.N, sd.schedule["num_train_timesteps"]
    start, stop = int(start_timestep * N), min(int(stop_timestep * N), N)
    c = sd.text_embeddings([prompt])
    y_0, X = (inv.xts[i].unsqueeze(0).to(sd.device, sd.dtype) for i in (-1, 0))
    for k in range(N):
        t = flow.timesteps[k].to(sd.device)
        v = -sd.predict(X, t, c, guidance)
        s_k = 1 - t / T
        v_cond = (y_0 - X) / (1 - s_k)
        eta_k = eta if start <= k < stop else 0.0
        v_hat = v + eta_k * (v_cond - v)
        X_next = X + v_hat * step_size(flow, k, X)
        check_finite("edit", k, X_next)
        if callback:
            callback(RFStep("reverse", k, t, X, v, v_cond, eta_k, v_hat, X_next))
        X = X_next
    return X


def check_finite(ode: str, i: int, x: torch.Tensor) -> None:
    if not x.isfinite().all():
        raise MinleditsError(f"the {ode}'s latents became inf or NaN at step {i}: the transformer's output is not "
                             "finite (damaged weights, or fp16 overflow: try fp32)")

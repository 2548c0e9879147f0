"""Edit-friendly DDPM inversion (Huberman-Spiegelglas, Kulikov & Michaeli), with LEDITS' semantics.

Notation (code name -> symbol); schedule symbols as in schedule.py
    x        x_0               the image, in [-1, 1]
    w0       w_0 = f E(x)      its latent: scaled posterior mean of the VAE encoder (f = scaling factor)
    xts[k]   x_{tau_k}         noisy latent at tau_k, drawn independently: sqrt(abar) w0 + sqrt(1 - abar) eps_k
    xts[N]   w_0
    eps      eps(x_t, t)       noise estimate; with a source prompt: eps_u + s_src (eps_src - eps_u)
                               (for a v-prediction model: the same on v, then converted to eps)
    zs[k]    z_k               the noise map that makes the DDPM step land exactly on the next latent:
                               z_k = (x_{tau_{k+1}} - mu_{tau_k}(x_{tau_k}, eps)) / sigma_{tau_k}
Index convention: xts[k] belongs to tau_k (k = 0 is the noisiest); the edit starts at xts[skip] and its
step i uses z_{skip+i}. Only k >= skip are kept: the UNet never runs for the steps the edit does not use.
"""
import math
from dataclasses import dataclass, field

import torch

from .image import to_tensor
from .schedule import Step, add_noise, eps_from_v, mu


@dataclass
class Inversion:
    """What the edit needs. timesteps [N - skip] descending; xts [N - skip + 1, 4, h, w] (last: w0); zs [N - skip, 4, h, w]."""
    timesteps: list[int]
    xts: torch.Tensor
    zs: torch.Tensor
    image: torch.Tensor | None = None  # the preprocessed input [1, 3, H, W], for comparisons
    settings: dict = field(default_factory=dict)  # steps, skip, seed, size, source_prompt, ...

    @property
    def w0(self) -> torch.Tensor:
        return self.xts[-1:]


def text_embeddings(sd, prompts: list[str]) -> torch.Tensor:
    """CLIP last hidden states [B, 77, D] for the prompts, computed once per run."""
    return sd.text_encoder(sd.tokenizer(prompts).to(sd.device))


def stack(steps: list[Step], like: torch.Tensor) -> Step:
    """Several steps as one batch: t becomes [n], the scalars [n, 1, 1, 1] float32 tensors."""
    col = lambda v: torch.tensor(v, dtype=torch.float32, device=like.device).view(-1, 1, 1, 1)
    return Step(torch.tensor([s.t for s in steps], device=like.device), *(col([s[j] for s in steps]) for j in (1, 2, 3)))


def as_eps(sd, out: torch.Tensor, x: torch.Tensor, s: Step) -> torch.Tensor:
    """The model's (guided) output as a noise estimate: a v-prediction model's v is converted.

    Guidance is combined on the raw outputs, as the reference does; SEGA's momentum mixes steps with
    different abar_t, so converting each branch to eps first would not give the same result."""
    return eps_from_v(out, x, s) if sd.schedule.prediction_type == "v_prediction" else out


def noisy_latents(w0: torch.Tensor, steps: list[Step], seed: int) -> torch.Tensor:
    """xts[k] = sqrt(abar_{tau_k}) w0 + sqrt(1 - abar_{tau_k}) eps_k, eps_k drawn in ascending t from one generator."""
    g, N = torch.Generator().manual_seed(seed), len(steps)
    eps = {k: torch.randn(w0.shape, generator=g, dtype=torch.float32) for k in reversed(range(N))}
    return torch.cat([add_noise(w0, eps[k].to(w0), steps[k]) for k in range(N)] + [w0])


def noise_maps(sd, xts, steps, context, source_guidance, batch_size=1, callback=None) -> torch.Tensor:
    """z_k = (xts[k+1] - mu_k(xts[k], eps)) / sigma_k for every k of `steps`, batch_size timesteps per UNet call."""
    zs = []
    for a in range(0, len(steps), batch_size):
        chunk = steps[a:a + batch_size]
        x, b, c = xts[a:a + len(chunk)], len(chunk), len(context)  # c = 1, or 2 with a source prompt
        t = torch.tensor([s.t for s in chunk] * c, device=x.device)
        eps_u, *eps_src = sd.unet(x.repeat(c, 1, 1, 1), t, context.repeat_interleave(b, 0)).chunk(c)
        s = stack(chunk, x)
        eps = as_eps(sd, eps_u + source_guidance * (eps_src[0] - eps_u) if eps_src else eps_u, x, s)
        zs.append(((xts[a + 1:a + b + 1] - mu(x, eps, s)) / s.sigma).to(x.dtype))
        if callback:
            callback(a + b, len(steps))
    return torch.cat(zs)


def check_inversion_args(steps, skip, source_guidance, size):
    if not (isinstance(steps, int) and steps >= 1):
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if not (isinstance(skip, int) and 0 <= skip < steps):
        raise ValueError(f"skip must be an integer with 0 <= skip < steps ({steps}), got {skip!r}")
    if not math.isfinite(source_guidance):
        raise ValueError(f"source guidance must be finite, got {source_guidance!r}")
    if not (isinstance(size, int) and size >= 64 and size % 64 == 0):
        raise ValueError(f"size must be a multiple of 64 (at least 64), got {size!r}")


@torch.inference_mode()
def invert(sd, image, source_prompt="", source_guidance=3.5, steps=100, skip=36, seed=0, size=512,
           keep_last_noise=False, keep_aspect=False, batch_size=4, callback=None) -> Inversion:
    """Invert an image (path or PIL): the latents and noise maps from which the edit regenerates it.

    keep_last_noise=False zeroes z_{N-1}, as the reference does; True keeps it, so that an edit with no
    guidance reproduces w0 exactly. batch_size: timesteps per UNet call (the x_t are independent: batching
    only changes float rounding; on a 2-core CPU 4 made the inversion 1.4x faster than 1, and 8 another ~10%
    for twice the activation memory; tests/bench.py).
    callback(done, total) reports progress of the UNet work.
    """
    check_inversion_args(steps, skip, source_guidance, size)
    x = to_tensor(image, size, keep_aspect).to(sd.device, sd.dtype)
    w0 = sd.vae.scaling_factor * sd.vae.encode(x)
    all_steps = sd.schedule.steps(steps)
    xts = noisy_latents(w0, all_steps, seed)[skip:]
    context = text_embeddings(sd, [""] + ([source_prompt] if source_prompt else []))
    zs = noise_maps(sd, xts, all_steps[skip:], context, source_guidance, batch_size, callback)
    if not keep_last_noise:
        zs[-1] = 0
    settings = dict(source_prompt=source_prompt, source_guidance=source_guidance, steps=steps, skip=skip, seed=seed,
                    size=size, keep_last_noise=keep_last_noise, keep_aspect=keep_aspect)
    return Inversion([s.t for s in all_steps[skip:]], xts, zs, x, settings)

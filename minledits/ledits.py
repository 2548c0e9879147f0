"""LEDITS (Tsaban & Passos), Algorithm 1: regenerate the inverted image with its own noise maps,
steering each DDPM step with a target prompt (classifier-free guidance) and SEGA concepts.

Notation (code name -> symbol); schedule symbols in schedule.py, SEGA symbols in sega.py
    x          x_t                the current latent, starting at xts[skip] of the inversion
    z          z_k                the inversion's noise map for this step
    eps_u      eps(x_t)           unconditional estimate
    eps_tar    eps(x_t, p_tar)    target-prompt estimate (= eps_u when the target prompt is empty)
    eps_c      eps(x_t, c)        concept estimates [C, 1, 4, h, w]
    s_tar      s_tar              target guidance scale
    eps        eps_u + s_tar (eps_tar - eps_u) + E_i       the guided estimate (guidance only when s_tar > 1)
    x          x_{t-1} = mu_t(x_t, eps) + sigma_t z_k      the DDPM step, with the inverted noise
For a v-prediction model the estimates are v: the guidance combines them as they are (as the reference
does) and only the guided result is converted to eps for the step.
"""
import math
from dataclasses import dataclass

import torch

from .image import to_pil
from .inversion import Inversion, as_eps, text_embeddings
from .schedule import Step, mu
from .sega import Concept, Guidance, SegaParams, sega


@dataclass
class EditStep:
    """Everything one edit step computed; handed to the callback (references, no copies)."""
    i: int
    step: Step            # t, a_bar, a_prev, sigma
    eps_u: torch.Tensor | None  # None when guidance is off (s_tar <= 1)
    eps_tar: torch.Tensor
    eps_c: torch.Tensor
    guidance: Guidance | None  # g, mask, q, G, m, E of SEGA (None without concepts)
    eps: torch.Tensor
    mu: torch.Tensor
    z: torch.Tensor
    x: torch.Tensor       # x_{t-1}


def branches(target_prompt, concepts, s_tar) -> list[str]:
    """Prompts of the batched UNet call: "", the target (only if non-empty), then the concepts (only if s_tar > 1)."""
    if s_tar <= 1:
        return [target_prompt]  # no guidance: only the target-prompt estimate is used
    return [""] + ([target_prompt] if target_prompt else []) + [c.prompt for c in concepts]


def guided_eps(i, eps_all, has_target, s_tar, m, p, guidance):
    """Split the batch into eps_u, eps_tar, eps_c and combine them: eps = eps_u + s_tar (eps_tar - eps_u) + E_i."""
    if s_tar <= 1:  # a single branch: the target prompt's
        return None, eps_all, eps_all[:0], None, eps_all
    eps_u, eps_tar = eps_all[:1], eps_all[1:2] if has_target else eps_all[:1]
    eps_c = eps_all[1 + has_target:, None]  # [C, 1, 4, h, w]
    out = guidance(i, eps_u, eps_c, m, p) if len(eps_c) else None
    E = out.E if out else 0
    return eps_u, eps_tar, eps_c, out, eps_u + s_tar * (eps_tar - eps_u) + E


@torch.inference_mode()
def edit(sd, inv: Inversion, target_prompt="", target_guidance=15.0, concepts=(), momentum_scale=0.3,
         momentum_beta=0.6, guidance=sega, callback=None) -> torch.Tensor:
    """The edited w0 [1, 4, h, w]. guidance(i, eps_u, eps_c, m, params) -> Guidance can be swapped;
    callback(EditStep) receives every intermediate tensor of every step."""
    concepts = [Concept.of(c) for c in concepts]
    if not math.isfinite(target_guidance):
        raise ValueError(f"target guidance must be finite, got {target_guidance}")
    if concepts and target_guidance <= 1:
        raise ValueError("concepts need target guidance > 1 (guidance is off at <= 1)")
    p = SegaParams.of(concepts, momentum_scale, momentum_beta, sd.device)
    steps = sd.schedule.steps(inv.settings["steps"])[inv.settings["skip"]:]
    if [s.t for s in steps] != list(inv.timesteps):
        raise ValueError("the inversion's timesteps do not match this model's schedule")
    prompts = branches(target_prompt, concepts, target_guidance)
    context = text_embeddings(sd, prompts)
    x = inv.xts[:1].to(sd.device, sd.dtype)
    m = torch.zeros_like(x)
    for i, (s, z) in enumerate(zip(steps, inv.zs.to(sd.device, sd.dtype))):
        eps_all = sd.unet(x.expand(len(prompts), -1, -1, -1), s.t, context)
        eps_u, eps_tar, eps_c, out, eps = guided_eps(i, eps_all, bool(target_prompt), target_guidance, m, p, guidance)
        m = out.m if out else m
        mu_t = mu(x, as_eps(sd, eps, x, s), s)
        x = mu_t + s.sigma * z
        if callback:
            callback(EditStep(i, s, eps_u, eps_tar, eps_c, out, eps, mu_t, z, x))
    return x


@torch.inference_mode()
def decode(sd, latents: torch.Tensor):
    """w0 latents [1, 4, h, w] -> PIL image."""
    return to_pil(sd.vae.decode(latents.to(sd.device, sd.dtype) / sd.vae.scaling_factor))[0]

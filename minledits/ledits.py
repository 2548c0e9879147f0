"""LEDITS (Tsaban & Passos 2023), Algorithm 1: regenerate the inverted image with its own noise maps,
steering each DDPM step with a target prompt (classifier-free guidance) and SEGA concepts.

Notation (code name -> symbol); sampler symbols in sampler.py, SEGA symbols in sega.py
    x          x_t                the current latent, starting at x_{tau_skip} of the inversion
    k, i       k = skip + i       the inference step, and the edit step (i = 0 the first after the skip)
    z          z_k                the inversion's noise map for this step
    eps_u      eps(x_t)           unconditional estimate
    eps_tar    eps(x_t, p_tar)    target-prompt estimate (= eps_u when the target prompt is empty)
    eps_c      eps(x_t, c)        concept estimates [C, 1, 4, h, w]
    s_tar      s_tar              target guidance scale
    E          E_i                SEGA's semantic guidance (sega.py); 0 without concepts
    eps        eps_u + s_tar (eps_tar - eps_u) + E_i     the guided estimate (guidance only when s_tar > 1)
    x_prev     x_{t-1} = mu_t(x_t, eps) + sigma_t z_k    the DDPM step, with the inverted noise (the inversion's
                                                         sampler's step: DDPM for LEDITS, sampler.py)
For a v-prediction model the estimates are v: the guidance combines them as they are (as the reference
does) and the sampler converts the guided result to eps for the step. On a flow inversion (SD3) they are velocities
and the step is the flow's Euler step (flowmatch.py); its maps are 0, so without guidance the edit is the plain
Euler regeneration from x_{tau_skip}.
"""
import math
import os
import warnings
from dataclasses import dataclass

import torch

from . import parity
from .errors import MinleditsError, shorten
from .inversion import Inversion
from .io import store
from .model import StableDiffusion
from .sega import Concept, Guidance, SegaParams, sega


@dataclass
class EditStep:
    """Everything one edit step computed; handed to the callback (references, no copies)."""
    i: int                # edit step
    k: int                # inference step: k = skip + i
    t: int | float        # timestep tau_k (a flow's T sigma_k: a float)
    x_t: torch.Tensor     # the latent the step starts from
    eps_u: torch.Tensor | None  # None when guidance is off (s_tar <= 1)
    eps_tar: torch.Tensor
    eps_c: torch.Tensor   # [C, 1, 4, h, w]
    guidance: Guidance | None  # g, mask, q, G, m, E of SEGA (None without concepts)
    eps: torch.Tensor     # the guided estimate
    z: torch.Tensor
    x_prev: torch.Tensor  # x_{t-1}


@dataclass(frozen=True)
class Branches:
    """The rows of the one batched UNet call per step: the prompts, and which rows hold which estimate."""
    prompts: list[str]
    u: slice | None       # eps_u (None: guidance off)
    tar: slice            # eps_tar: the target prompt's row, or the empty prompt's when the target is empty
    c: slice              # eps_c: one row per concept

    @classmethod
    def of(cls, target_prompt: str, concepts: list[Concept], guided: bool) -> "Branches":
        if not guided:  # s_tar <= 1: one row, the target prompt's, used as it is
            return cls([target_prompt], None, slice(0, 1), slice(1, 1))
        tar = [target_prompt] if target_prompt else []  # an empty target is the unconditional row itself
        return cls(["", *tar, *(c.prompt for c in concepts)], slice(0, 1), slice(len(tar), len(tar) + 1),
                   slice(1 + len(tar), None))

    @property
    def groups(self) -> list[list[str]]:
        """The prompts in SemanticStableDiffusionPipeline's embedding groups: each one before the concepts alone,
        the concepts together (parity.embed)."""
        return [[p] for p in self.prompts[:self.c.start]] + [self.prompts[self.c]]


def check_options(target_guidance, concepts, momentum_scale, momentum_beta, dtype=torch.float32) -> list[Concept]:
    """The concepts as Concept objects, after checking every edit option (ValueError, one line); numbers must
    also be finite in `dtype`, the dtype they are used in."""
    if isinstance(concepts, (str, dict, Concept)):  # one concept, not a sequence of them
        concepts = [concepts]
    concepts = [Concept.of(c) for c in concepts]
    if not (isinstance(target_guidance, (int, float)) and math.isfinite(target_guidance)):
        raise ValueError(f"target guidance (--target-guidance, target_guidance=) must be finite, "
                         f"got {target_guidance!r}")
    if concepts and target_guidance <= 1:
        raise ValueError(f"concepts need target guidance (--target-guidance, target_guidance=) > 1, got "
                         f"{target_guidance!r}: guidance is off at <= 1")
    SegaParams.of(concepts, momentum_scale, momentum_beta)
    numbers = [("target guidance", target_guidance), ("momentum scale", momentum_scale)] + \
        [(f"concept {shorten(c.prompt)}: {k}", getattr(c, k)) for c in concepts for k in ("scale", "weight")]
    big = torch.finfo(dtype).max
    for name, v in numbers:
        if abs(v) > big:
            raise ValueError(f"{name} {v:g} overflows {str(dtype).removeprefix('torch.')} (at most {big:g})")
    return concepts


def idle(concepts: list[Concept], n: int) -> dict[str, str]:
    """{concept prompt: why it never acts} over n edit steps: concept c acts at steps warmup_c <= i < cooldown_c."""
    why = {}
    for c in concepts:
        end = n if c.cooldown is None else min(c.cooldown, n)
        if c.scale == 0 or c.weight == 0:
            why[c.prompt] = f"its {'scale' if c.scale == 0 else 'weight'} is 0"
        elif c.warmup >= end:
            why[c.prompt] = (f"warmup {c.warmup} >= the {n} edit steps" if end == n else
                             f"cooldown {c.cooldown} <= warmup {c.warmup}")
    return why


def as_inversion(inv) -> Inversion:
    """An Inversion, or the path of an inversion file (read with store.load)."""
    if isinstance(inv, (str, os.PathLike)):
        return store.load(inv)
    if not isinstance(inv, Inversion):
        raise TypeError(f"edit takes an Inversion (from minledits.invert) or an inversion file's path, "
                        f"got {type(inv).__name__}")
    return inv


def start(sd: StableDiffusion, inv) -> tuple[Inversion, object]:
    """(the inversion, a fresh sampler of its kind) for an edit: an Inversion or its file, checked in itself and
    against the model (weights, latent shape, timesteps)."""
    inv = as_inversion(inv)
    inv.check_tensors()
    inv.check_model(sd)
    return inv, inv.new_sampler(sd.schedule)


def check_finite(i: int, t: int, out: torch.Tensor, x_t: torch.Tensor, x_prev: torch.Tensor) -> None:
    """After step i: refuse inf / NaN latents, naming the cause: the guidance (the UNet's output was finite, or
    its input had already grown far beyond any latent's range), else the UNet itself."""
    if not x_prev.isfinite().all():
        if out.isfinite().all() or x_t.abs().max() > 1e4:
            cause = f"the guidance overflowed (|x_t| reached {x_t.abs().max():.1e}): lower the scales"
        else:
            cause = "the UNet's output is not finite (damaged weights, or fp16 overflow: try fp32)"
        raise MinleditsError(f"the edit's latents became inf or NaN at step {i} (t = {t}): {cause}")


@torch.inference_mode()
def edit(sd: StableDiffusion, inv: Inversion, *, target_prompt="", target_guidance=15.0, concepts=(),
         momentum_scale=0.3, momentum_beta=0.6, guidance=sega, callback=None) -> torch.Tensor:
    """The edited w0 [1, 4, h, w]. guidance(i, eps_u, eps_c, m, params) -> Guidance can be swapped;
    callback(EditStep) receives every intermediate tensor of every step."""
    concepts = check_options(target_guidance, concepts, momentum_scale, momentum_beta, sd.dtype)
    inv, sampler = start(sd, inv)
    skip = inv.settings.skip
    for prompt, why in idle(concepts, len(inv.zs)).items():
        warnings.warn(f"concept {shorten(prompt)} never acts ({why}): the edit ignores it", stacklevel=3)
    s_tar, guided = target_guidance, target_guidance > 1
    p = SegaParams.of(concepts, momentum_scale, momentum_beta, sd.device)
    b = Branches.of(target_prompt, concepts, guided)
    context = parity.text_kv(sd, parity.embed(sd, *b.groups))  # the text, its keys and values: once for the edit
    x = inv.xts[:1].to(sd.device, sd.dtype)  # x_T: the noisiest latent the edit starts from (line 1)
    m = torch.zeros_like(x)                  # SEGA momentum
    for i, (k, t, z) in enumerate(zip(range(skip, sampler.N), inv.timesteps, inv.zs.to(sd.device, sd.dtype))):
        out = sd.predict(x.expand(len(b.prompts), -1, -1, -1), t, context)  # all estimates (for t = T..1)
        eps_u, eps_tar, eps_c = out[b.u] if guided else None, out[b.tar], out[b.c, None]
        g = guidance(i, eps_u, eps_c, m, p) if guided and concepts else None  # SEGA: E_i and momentum
        m = g.m if g else m
        eps = eps_u + s_tar * (eps_tar - eps_u) + (g.E if g else 0) if guided else eps_tar
        x_prev = sampler.step(k, x, eps, z)  # x_{t-1} = mu_t(x_t, eps) + sigma_t z_t
        check_finite(i, t, out, x, x_prev)
        if callback:
            callback(EditStep(i, k, t, x, eps_u, eps_tar, eps_c, g, eps, z, x_prev))
        x = x_prev
    return x

"""SEGA semantic guidance (Brack et al.), exactly as the reference implementation behaves.

Notation (code name -> symbol); C concepts, i = the edit step (0 = the first step after the skip)
    eps_u     eps(x_t)            unconditional noise estimate                          [B, 4, h, w]
    eps_c     eps(x_t, c)         the concepts' noise estimates                         [C, B, 4, h, w]
    s, d      s_c, d_c            guidance scale; direction +1 (add) or -1 (remove: "reverse")
    lam       lambda_c            threshold: the quantile of |g_c| below which guidance is dropped
    w         w_c                 concept weight
    g         g_c  = s_c d_c (eps_c - eps_u)
    q         q_c  = quantile(|g_c|, lambda_c) over H*W, per batch item and channel (in fp32)
    g_hat     gh_c = g_c [|g_c| >= q_c], and 0 (with w_c = 0) from step cooldown_c on
    G         G    = sum_c w_c gh_c + s_m m                       the guidance once every concept is warm
    m         m   <- beta_m m + (1 - beta_m) G                    momentum, starts at 0, updated every step
    E         E_i  = G                                  if i >= warmup_c for every c
                   = sum_{c warm} (w_c / sum_{c warm} w_c) gh_c   if only some are (normalised, no momentum)
                   = 0                                  if none is
"""
import math
from dataclasses import dataclass, fields

import torch

from .errors import shorten


@dataclass(frozen=True)
class Concept:
    """One edit concept: a prompt to move towards (or away from, with reverse=True)."""
    prompt: str
    scale: float = 7.0
    threshold: float = 0.95
    warmup: int = 2
    cooldown: int | None = None  # None: never
    reverse: bool = False
    weight: float = 1.0

    def __post_init__(self):
        if not math.isfinite(self.scale):
            raise ValueError(f"concept {shorten(self.prompt)}: scale must be finite, got {self.scale}")
        if not 0 <= self.threshold < 1:
            raise ValueError(f"concept {shorten(self.prompt)}: threshold must be in [0, 1), got {self.threshold}")
        if not (math.isfinite(self.weight) and self.weight >= 0):
            raise ValueError(f"concept {shorten(self.prompt)}: weight must be finite and >= 0, got {self.weight}")
        if self.warmup < 0 or (self.cooldown is not None and self.cooldown < 0):
            raise ValueError(f"concept {shorten(self.prompt)}: warmup and cooldown must be >= 0")

    @classmethod
    def of(cls, c) -> "Concept":
        """A Concept from a Concept, a spec string (see parse) or a dict of its fields."""
        if isinstance(c, str):
            return cls.parse(c)
        if isinstance(c, dict):
            unknown = set(c) - {f.name for f in fields(cls)}
            if unknown:
                raise ValueError(f"unknown concept option(s) {sorted(unknown)}; known: {[f.name for f in fields(cls)]}")
            return cls(**c)
        if isinstance(c, cls):
            return c
        raise ValueError(f"a concept must be a Concept, a string or a dict, got {type(c).__name__}")

    @classmethod
    def parse(cls, spec: str) -> "Concept":
        """'glasses', '-beard' (remove) or 'smile:scale=6,threshold=0.9,warmup=2,cooldown=40,weight=1'."""
        prompt, _, opts = spec.partition(":")
        reverse = prompt.startswith("-")
        prompt = prompt[1:] if reverse else prompt
        kinds = {"scale": float, "threshold": float, "warmup": int, "cooldown": int, "weight": float}
        kw = {}
        for item in filter(None, (o.strip() for o in opts.split(","))):
            key, eq, value = item.partition("=")
            if key.strip() not in kinds or not eq:
                raise ValueError(f"bad concept option {shorten(item)} in {shorten(spec)}: use key=value with key one "
                                 f"of {', '.join(kinds)}")
            if key.strip() in kw:
                raise ValueError(f"concept option {key.strip()} given twice in {shorten(spec)}: give it once")
            try:
                kw[key.strip()] = kinds[key.strip()](value)
            except ValueError:
                raise ValueError(f"bad value {shorten(value)} for {key.strip()} in concept {shorten(spec)}") from None
        if not prompt.strip():
            raise ValueError(f"empty concept prompt in {shorten(spec)}")
        return cls(prompt.strip(), reverse=reverse, **kw)


@dataclass
class SegaParams:
    """Per-concept parameters as [C] tensors, plus the momentum settings."""
    scale: torch.Tensor       # s_c * d_c (signed)
    threshold: list[float]    # lambda_c
    weight: torch.Tensor      # w_c
    warmup: torch.Tensor      # [C] long
    cooldown: torch.Tensor    # [C] float, inf for never
    momentum_scale: float = 0.3
    momentum_beta: float = 0.6

    @classmethod
    def of(cls, concepts: list[Concept], momentum_scale=0.3, momentum_beta=0.6, device=None) -> "SegaParams":
        if not (math.isfinite(momentum_scale) and 0 <= momentum_beta <= 1):
            raise ValueError(f"momentum scale must be finite and momentum beta in [0, 1], "
                             f"got {momentum_scale}, {momentum_beta}")
        t = lambda v, dtype=torch.float32: torch.tensor(v, dtype=dtype, device=device)
        return cls(scale=t([c.scale * (-1 if c.reverse else 1) for c in concepts]),
                   threshold=[c.threshold for c in concepts],
                   weight=t([c.weight for c in concepts]),
                   warmup=t([c.warmup for c in concepts], torch.long),
                   cooldown=t([math.inf if c.cooldown is None else c.cooldown for c in concepts]),
                   momentum_scale=momentum_scale, momentum_beta=momentum_beta)


@dataclass
class Guidance:
    """One step of semantic guidance: E (to add to eps), the new momentum m, and its intermediates."""
    E: torch.Tensor
    m: torch.Tensor
    g: torch.Tensor      # [C, B, 4, h, w]
    acts: torch.Tensor   # [C, B, 4, h, w] bool: where gh_c = g_c (where each concept acts)
    q: torch.Tensor      # [C, B, 4]
    G: torch.Tensor


def quantile(a: torch.Tensor, lam: list[float]) -> torch.Tensor:
    """q_c = the lambda_c-quantile of a_c over its last two dims (H*W; linear interpolation, in fp32), per leading
    index: [C, B, 4, h, w] -> [C, B, 4]."""
    q = [torch.quantile(a_c.flatten(-2).float(), lam_c, dim=-1) for a_c, lam_c in zip(a, lam)]
    return torch.stack(q).to(a.dtype)


def mask(g: torch.Tensor, p: SegaParams, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each concept acts at step i: |g_c| >= q_c, and only before its cooldown. (mask [C, B, 4, h, w], q).

    The ablation people try first: edit(..., guidance=functools.partial(sega, mask=my_mask)) swaps it."""
    per_c = (-1,) + (1,) * (g.dim() - 1)  # view a [C] tensor as [C, 1, 1, 1, 1]
    q = quantile(g.abs(), p.threshold)
    return (g.abs() >= q[..., None, None]) & (i < p.cooldown).view(per_c), q


def sega(i: int, eps_u: torch.Tensor, eps_c: torch.Tensor, m: torch.Tensor, p: SegaParams, mask=mask) -> Guidance:
    """E_i, the semantic guidance of edit step i, and the updated momentum (see the notation above).
    mask(g, p, i) -> (where each concept acts, q): SEGA's by default (`mask` above)."""
    per_c = (-1,) + (1,) * (eps_c.dim() - 1)
    g = p.scale.view(per_c).to(eps_c.dtype) * (eps_c - eps_u)
    on, q = mask(g, p, i)
    g_hat = torch.where(on, g, 0)
    w = (p.weight * (i < p.cooldown)).to(g.dtype)  # w_c, 0 from the cooldown on
    G = torch.einsum("c,c...->...", w, g_hat) + p.momentum_scale * m
    m = p.momentum_beta * m + (1 - p.momentum_beta) * G
    warm = (i >= p.warmup).to(w.dtype)
    if warm.all():
        E = G
    else:  # normalised over the warm concepts, no momentum (0 when none is warm)
        w_warm = w * warm
        E = torch.einsum("c,c...->...", w_warm / w_warm.sum().clamp(min=torch.finfo(w.dtype).tiny), g_hat)
    return Guidance(E, m, g, on, q, G)

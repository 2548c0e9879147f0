"""LEDITS++ (Brack et al. 2024): regenerate the inverted image with its own noise maps (either sampler), adding
per concept a guidance term masked where the concept acts: by the cross-attention of its tokens, by the
magnitude of its guidance, or both. As diffusers' LEditsPPPipelineStableDiffusion edits an inversion.

Notation (code name -> symbol); sampler symbols in sampler.py; C concepts, i the edit step (k = skip + i)
    x          x_t                 the current latent, starting at x_{tau_skip} of the inversion
    t          tau_k               the timestep of step k
    eps_u      eps(x_t, p_neg)     unconditional estimate (the negative prompt's, "" by default)   [1, 4, h, w]
    eps_c      eps(x_t, c)         the concepts' estimates                                         [C, 1, 4, h, w]
    s_d        s_c d_c             edit scale s_c times the direction d_c: +1, or -1 for a reversed concept
    u          U                   the user's mask in latent space (1 without one)
    g          g_c  = s_c d_c (eps_c - eps_u) U
    on         a_c  = [warmup_c <= i < cooldown_c]            whether concept c acts at step i
    lam        lambda_c            the threshold: the quantile below which a mask is 0
    a_noise    |g_c|_1 = sum over channels of |g_c|           [C, 1, 1, h, w]
    m_noise    M^n_c = [|g_c|_1 >= quantile(|g_c|_1, lambda_c)]  over h*w, per image (fp32 quantile)
    tokens     n_c                 the concept prompt's CLIP tokens, without start and end
    A          A_c  = mean over the down/up cross-attention layers at the coarsest size (h', w') and their heads
                      of the probabilities of concept c's row, summed over its tokens 1..n_c (diffusers 0.42.1
                      means to; its tokenizer call reports the padded length 77, so it sums tokens 1..75)
    A_s        A~_c = K * reflect_pad(A_c)                    3x3 Gaussian K (kernel())                [C, h', w']
    m_attn     M^a_c = up(A~_c >= quantile(A~_c, lambda_c))   nearest-neighbour to (h, w)             [C, 1, 4, h, w]
    M          M_c  = M^a_c M^n_c  ("intersect"; SD: M^a_c alone at t > T_INTERSECT), M^a_c ("cross_attention"),
                      M^n_c ("noise"); times a_c
    eps        eps  = eps_u + sum_c M_c g_c
    phi        phi                 guidance rescale: eps <- phi eps std(eps_bar_c) / std(eps) + (1 - phi) eps,
                                   eps_bar_c = the mean of the eps_c (only with concepts, only for phi > 0)
    x_prev     x_{t-1} = sampler.step(k, x_t, eps, z_k)   the inversion's own sampler, a fresh object
For a v-prediction model the estimates are v; they combine as they are and the sampler converts.

On a flow inversion (SD3, sampler "flow": flowmatch.py) the estimates are velocities, v_u and v_c, and the same
formulas hold with eps -> v: g_c = s_c d_c (v_c - v_u) U, x_{k+1} = x_k + (sigma_{k+1} - sigma_k) v (z_k = 0). There
is no reference; what differs:
    A          A_c  = mean over every joint-attention block of the transformer (place "joint", cross) and its heads
                      of the image tokens' probabilities (softmax over image and text keys) to concept c's CLIP
                      columns 1..n_c (of the 77 CLIP-token columns, which both CLIP encoders share), summed over
                      those tokens, on the patch grid (h/p, w/p). T5's 256 columns are not read (other tokens, and
                      zeros without T5); a block's head-mean is kept (JointAttentionMaps), all blocks having the
                      same heads, so the mean over blocks of those is the mean over blocks and heads
    M^a_c      0 where n_c = 0 (no tokens of the concept: nothing to attend to; on SD, A_c = 0 thresholds to 1)
    M          "intersect" is M^a_c M^n_c at every step: SD's T_INTERSECT rule (a timestep of its DDPM grid) does
               not carry over to a flow's T sigma, and SDXL's pipeline has none either
On FLUX (a flow inversion of FLUX.1; every velocity at the guidance embedding's default, sd.predict's) as on SD3 but:
    A          A_c  = mean over the double-stream blocks (transformer_blocks.0 .. num_layers - 1: 19 on FLUX.1) and
                      their heads of the image tokens' probabilities (softmax over text and image keys, RoPE applied)
                      to concept c's T5 columns 0..n_c-1, on the packed grid (h/2, w/2); the single-stream blocks
                      (one stream of text and image, not shown to controllers) are not read
    tokens     n_c                 the concept prompt's T5 tokens without </s> (T5 has no start token; at most 511):
                                   c is T5's 512 columns alone (CLIP gives only the pooled vector)
An RF-Inversion (rfinversion.py) is refused: its latents follow its controlled ODEs, not the plain flow regenerated.
"""
import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import parity
from .errors import shorten
from .inversion import Inversion
from .io.image import to_tensor
from .ledits import check_finite, start
from .model import StableDiffusion, StableDiffusionXL
from .nets.layers import AttentionLayer
from .sega import Concept, quantile

CONCEPT_DEFAULTS = dict(scale=5.0, threshold=0.9, warmup=0)  # LEDITS++' concept defaults (SEGA's are 7, 0.95, 2)
MASK_MODES = ("intersect", "cross_attention", "noise")
T_INTERSECT = 800  # SD's pipeline: "intersect" takes the attention mask alone above this t (SDXL's: at no t)


def concept(c) -> Concept:
    """A Concept from a Concept (as it is), a dict of its fields or a spec string (sega.Concept.parse), with
    LEDITS++' CONCEPT_DEFAULTS for the fields a dict or string leaves out."""
    if isinstance(c, Concept):
        return c
    if isinstance(c, dict):
        return Concept.of({**CONCEPT_DEFAULTS, **c})
    if isinstance(c, str):
        given = {o.partition("=")[0].strip() for o in c.partition(":")[2].split(",")}
        return dataclasses.replace(Concept.parse(c), **{k: v for k, v in CONCEPT_DEFAULTS.items() if k not in given})
    return Concept.of(c)  # its ValueError


@dataclass
class EditStep:
    """Everything one LEDITS++ step computed; handed to the callback (references, no copies)."""
    i: int
    k: int
    t: int | float                      # tau_k (a flow's T sigma_k)
    x_t: torch.Tensor
    eps_u: torch.Tensor
    eps_c: torch.Tensor                 # [C, 1, 4, h, w]
    g: torch.Tensor                     # [C, 1, 4, h, w]: g_c before any mask
    on: torch.Tensor                    # [C] bool: a_c
    m_noise: torch.Tensor | None        # [C, 1, 4, h, w] (None: the mode does not use it)
    attn: torch.Tensor | None           # [C, h', w']: A~_c, the smoothed attention map
    m_attn: torch.Tensor | None         # [C, 1, 4, h, w]
    M: torch.Tensor                     # [C, 1, 4, h, w]: M_c, the mask applied (0 for inactive concepts)
    eps: torch.Tensor
    z: torch.Tensor
    x_prev: torch.Tensor


class CrossAttentionMaps:
    """Attention controller: keeps the concept rows' probabilities of the down/up cross-attention layers at the
    coarsest size it sees (a finer layer's are dropped when a coarser one comes); changes nothing."""

    def __init__(self, rows: slice):
        self.rows, self.size, self.probs = rows, None, []

    def wants(self, layer: AttentionLayer, size) -> bool:
        return layer.cross and layer.place in ("down", "up")

    def __call__(self, layer: AttentionLayer, size, probs: torch.Tensor) -> None:
        if self.size is None or size[0] * size[1] < self.size[0] * self.size[1]:
            self.size, self.probs = tuple(size), []
        if tuple(size) == self.size:
            self.probs.append(probs[self.rows])  # [C, heads, h' w', 77]


class JointAttentionMaps(CrossAttentionMaps):
    """Attention controller for a flow transformer (SD3, FLUX): keeps each joint-attention block's head-mean of the
    concept rows' probabilities to the first `width` text columns (SD3: the 77 CLIP columns); changes nothing."""

    def __init__(self, rows: slice, width: int = 77):
        super().__init__(rows)
        self.width = width

    def wants(self, layer: AttentionLayer, size) -> bool:
        return layer.cross and layer.place == "joint"

    def __call__(self, layer: AttentionLayer, size, probs: torch.Tensor) -> None:
        self.size = tuple(size)
        self.probs.append(probs[self.rows, :, :, :self.width].mean(1, keepdim=True))  # [C, 1, h' w', width]


def kernel(dtype, device) -> torch.Tensor:
    """K: the pipeline's 3x3 'Gaussian' exp(-(x / (2 sigma))^2), sigma = 0.5, normalised; [1, 1, 3, 3]."""
    x, sigma = torch.arange(3, dtype=torch.float32) - 1, 0.5
    k1 = 1 / (sigma * math.sqrt(2 * math.pi)) * torch.exp(-((x / (2 * sigma)) ** 2))
    K = k1[:, None] * k1[None, :]
    return (K / K.sum()).view(1, 1, 3, 3).to(device, dtype)


def attention_map(maps: CrossAttentionMaps, tokens: list[int], first: int = 1) -> torch.Tensor:
    """A~_c [C, h', w']: the layer- and head-mean of each concept's probabilities, summed over its token columns
    first..first + n_c - 1 (CLIP's 1..n_c), smoothed by K with reflect padding."""
    P = torch.cat(maps.probs, dim=1)      # [C, L heads, h' w', columns]
    P = P.sum(1) / P.shape[1]             # mean over layers and heads
    A = torch.stack([P[c, :, first:first + n].sum(-1) for c, n in enumerate(tokens)]).unflatten(-1, maps.size)
    A_s = F.conv2d(F.pad(A[:, None], (1, 1, 1, 1), mode="reflect"), kernel(A.dtype, A.device))
    return A_s[:, 0]


def quantile_mask(a: torch.Tensor, lam: list[float]) -> torch.Tensor:
    """[a_c >= quantile(a_c, lambda_c)] over the last two dims, per leading index, as 1.0 / 0.0 (sega.quantile)."""
    q = quantile(a, lam)
    return (a >= q[..., None, None]).to(a.dtype)


def noise_mask(g: torch.Tensor, lam: list[float]) -> torch.Tensor:
    """M^n_c [C, B, 4, h, w]: the lambda_c-quantile of sum_channels |g_c|, per image."""
    a_noise = g.abs().sum(2, keepdim=True)  # [C, B, 1, h, w]
    return quantile_mask(a_noise, lam).expand_as(g)


def attention_mask(A_s: torch.Tensor, lam: list[float], like: torch.Tensor) -> torch.Tensor:
    """M^a_c [C, 1, 4, h, w]: A~_c thresholded at its lambda_c-quantile, nearest-upsampled to like's (h, w)."""
    m = F.interpolate(quantile_mask(A_s, lam)[:, None], like.shape[-2:])  # [C, 1, h, w]
    return m[:, None].expand(-1, *like.shape[-4:])


def rescale(eps: torch.Tensor, eps_bar: torch.Tensor, phi: float) -> torch.Tensor:
    """phi eps std(eps_bar) / std(eps) + (1 - phi) eps, the std over each image (Lin et al. 2023, 3.4)."""
    dims = list(range(1, eps.dim()))
    return phi * (eps * (eps_bar.std(dim=dims, keepdim=True) / eps.std(dim=dims, keepdim=True))) + (1 - phi) * eps


def combine(mask: str, t: int, m_noise, m_attn, g: torch.Tensor, attention_only_above=T_INTERSECT) -> torch.Tensor:
    """M_c before a_c: the mode's mask(s), "intersect" the attention mask alone at t > attention_only_above (None:
    at no t); 0 without concepts."""
    if not len(g):
        return torch.zeros_like(g)
    if mask == "noise":
        return m_noise
    if mask == "cross_attention" or attention_only_above is not None and t > attention_only_above:
        return m_attn
    return m_noise * m_attn


def token_counts(sd: StableDiffusion, concepts: list[Concept]) -> list[int]:
    """n_c: the CLIP tokens of each concept prompt without start/end (at most 75, as the prompt is cut)."""
    return [min(len(sd.tokenizer.tokenize(c.prompt)), 75) for c in concepts]


def token_columns(sd, concepts: list[Concept]) -> tuple[int, list[int]]:
    """(first, n): concept c's words are the text columns first..first + n_c - 1 of the conditioning: CLIP's tokens
    1..n_c (token_counts), or on FLUX, whose conditioning is T5's alone, T5's 0..n_c - 1 (its tokens without </s>)."""
    if getattr(sd, "guidance_embeds", None) is None:
        return 1, token_counts(sd, concepts)
    return 0, [int(mask.sum()) - 1 for mask in sd.tokenizer_2([c.prompt for c in concepts])[1]] if concepts else []


def user_mask(picture, inv: Inversion) -> torch.Tensor:
    """U [h, w] in [0, 1] from a picture (white: the concepts may act, black: not, grey: partly), preprocessed as
    the inversion's image was (centre crop unless keep_aspect, resize), its grey level area-averaged to the latent
    size. A picture of the input image's size, or of the inversion's, lines up with it."""
    m = to_tensor(picture, inv.settings.size, inv.settings.keep_aspect)
    if m.shape[-2:] != inv.image.shape[-2:]:
        raise ValueError(f"the user mask becomes {m.shape[-1]}x{m.shape[-2]} px where the inversion's image is "
                         f"{inv.image.shape[-1]}x{inv.image.shape[-2]}: draw it on the input image")
    grey = ((m.mean(1, keepdim=True) + 1) / 2).clamp(0, 1)
    return F.interpolate(grey, size=tuple(inv.xts.shape[-2:]), mode="area")[0, 0]


def check_options(concepts, mask, user_mask, guidance_rescale, latent_hw, unet_config) -> list[Concept]:
    """The concepts as Concept objects after checking every option (one-line ValueError); unet_config None (no
    model yet, as in the CLI) skips the check that the UNet has cross-attention."""
    if isinstance(concepts, (str, dict, Concept)):
        concepts = [concepts]
    concepts = [concept(c) for c in concepts]
    if mask not in MASK_MODES:
        raise ValueError(f"mask must be one of {', '.join(map(repr, MASK_MODES))}, got {mask!r}")
    unet = unet_config is not None and "down_block_types" in unet_config  # a transformer's joint attention sees text
    blocks = unet_config["down_block_types"] + unet_config["up_block_types"] if unet else []
    if unet and concepts and mask != "noise" and not any(b.startswith("CrossAttn") for b in blocks):
        raise ValueError(f"mask {mask!r} needs cross-attention in the UNet's down or up blocks; use mask='noise'")
    if not (isinstance(guidance_rescale, (int, float)) and 0 <= guidance_rescale <= 1):
        raise ValueError(f"guidance_rescale must be in [0, 1], got {guidance_rescale!r}")
    for c in concepts:
        if c.weight != 1:
            raise ValueError(f"concept {shorten(c.prompt)}: LEDITS++ has no concept weights (got weight {c.weight})")
    if user_mask is not None:
        shape = tuple(getattr(user_mask, "shape", ()))
        if not (isinstance(user_mask, torch.Tensor) and 2 <= len(shape) <= 4 and shape[-2:] == latent_hw
                and all(s == 1 for s in shape[:-2][:-1]) and (len(shape) < 3 or shape[-3] in (1, 4))):
            raise ValueError(f"user_mask must be a tensor of the latent size {list(latent_hw)} ([h, w], [1|4, h, w] "
                             f"or [1, 1|4, h, w]), got {list(shape) if shape else type(user_mask).__name__}")
        if not user_mask.isfinite().all():
            raise ValueError("user_mask must be finite")
    return concepts


@torch.inference_mode()
def edit(sd: StableDiffusion, inv: Inversion, *, concepts=(), mask="intersect", user_mask=None, negative_prompt="",
         guidance_rescale=0.0, callback=None) -> torch.Tensor:
    """The edited w0 [1, 4, h, w] by LEDITS++ on an inversion (an Inversion or its file); callback(EditStep)
    receives every intermediate tensor of every step. mask: "intersect" | "cross_attention" | "noise"."""
    inv, sampler = start(sd, inv)
    concepts = check_options(concepts, mask, user_mask, guidance_rescale, tuple(inv.xts.shape[-2:]), sd.unet.config)
    skip = inv.settings.skip
    C, lam, phi = len(concepts), [c.threshold for c in concepts], guidance_rescale
    per_c = (C, 1, 1, 1, 1)
    s_d = torch.tensor([c.scale * (-1 if c.reverse else 1) for c in concepts], device=sd.device).view(per_c)
    u = 1 if user_mask is None else user_mask.to(sd.device, sd.dtype)
    first, tokens = token_columns(sd, concepts)
    use_attn, use_noise = C and mask != "noise", C and mask != "cross_attention"
    flow = sd.prediction_type == "flow"
    above = None if isinstance(sd, StableDiffusionXL) or flow else T_INTERSECT  # each family's pipeline
    present = torch.tensor([n > 0 or not flow for n in tokens], device=sd.device).view(per_c)
    context = parity.text_kv(sd, parity.embed(sd, [negative_prompt], [c.prompt for c in concepts]))
    x = inv.xts[:1].to(sd.device, sd.dtype)
    for i, (k, t, z) in enumerate(zip(range(skip, sampler.N), inv.timesteps, inv.zs.to(sd.device, sd.dtype))):
        maps = JointAttentionMaps(slice(1, None), first + max(tokens, default=0)) if flow else \
            CrossAttentionMaps(slice(1, None))
        with sd.unet.attention_controller(maps if use_attn else None):
            out = sd.predict(x.expand(1 + C, -1, -1, -1), t, context)  # eps_u and every eps_c in one call
        eps_u, eps_c = out[:1], out[1:, None]
        on = torch.tensor([c.warmup <= i < (math.inf if c.cooldown is None else c.cooldown) for c in concepts],
                          device=sd.device)
        g = s_d.to(out.dtype) * (eps_c - eps_u) * u
        m_noise = noise_mask(g, lam) if use_noise else None
        A_s = attention_map(maps, tokens, first) if use_attn else None
        m_attn = attention_mask(A_s, lam, g) * present.to(g.dtype) if use_attn else None
        M = combine(mask, t, m_noise, m_attn, g, above) * on.view(per_c).to(g.dtype)
        eps = eps_u + (M * g).sum(0)
        if C and phi > 0:
            eps = rescale(eps, eps_c.mean(0), phi)
        x_prev = sampler.step(k, x, eps, z)
        check_finite(i, t, out, x, x_prev)
        if callback:
            callback(EditStep(i, k, t, x, eps_u, eps_c, g, on, m_noise, A_s, m_attn, M, eps, z, x_prev))
        x = x_prev
    return x

"""FlowEdit (Kulikov, Kleiner, Huberman-Spiegelglas & Michaeli 2024): inversion-free editing on a rectified flow.
No inversion: an ODE runs from the photo's own latent, driven by the difference of the target- and source-conditioned
velocities at two latents that share one noise draw; the noise cancels in the difference. As the authors'
FlowEditSD3 and FlowEditFLUX (fallenshock/FlowEdit, FlowEdit_utils.py) on Stable Diffusion 3 and FLUX.1-dev.

Notation (code name -> symbol); flow symbols in flowmatch.py (sigma_k, t_k = T sigma_k, k = 0 the noisiest, N steps)
    x_src      X_0^src          the photo's latent, sd.encode of the preprocessed picture              [1, C, h, w]
    n_max      n_max            the steps edited, the last n_max: k >= N - n_max (the first N - n_max are skipped:
                                the edit starts at sigma_{N - n_max}, the larger n_max the stronger the edit)
    n_min      n_min            of those, the last n_min are the SDEdit-style tail (plain sampling, below)
    n_avg      n_avg            noise draws per FlowEdit step, their velocity differences averaged
    noise      N_k^j            draw j = 0..n_avg-1 at step k, standard normal (the draw order is below)
    zt_src     Z_t^src          scale_noise(k, x_src, N_k^j) = (1 - sigma_k) x_src + sigma_k N_k^j: the photo noised
    zt_edit    Z_t^FE           the edit's state: x_src at k = N - n_max, then the Euler steps below
    zt_tar     Z_t^tar          zt_edit + zt_src - x_src: the same noise on the edit
    v_u, v_c   V(z, p)          the velocity (sd.predict) at z with the negative prompt, with prompt p
    V_src      V^src            v_u(zt_src) + s_src (v_c(zt_src, p_src) - v_u(zt_src))     (v_c alone at s_src <= 1)
    V_tar      V^tar            v_u(zt_tar) + s_tar (v_c(zt_tar, p_tar) - v_u(zt_tar))     (v_c alone at s_tar <= 1)
    V_delta    V_delta_k        sum_j (1 / n_avg) (V_tar^j - V_src^j)
    zt_edit    Z_{t_{k+1}}^FE   zt_edit + (sigma_{k+1} - sigma_k) V_delta_k     (FlowEuler.move: the float32 update)
The SDEdit-style tail, k >= N - n_min (when n_min > 0):
    xt_tar     X_t^tar          at k = N - n_min: zt_edit + scale_noise(k, x_src, N) - x_src, one more draw N;
                                then xt_tar + (sigma_{k+1} - sigma_k) V^tar(xt_tar): the target prompt's own flow
The result is zt_edit at sigma_N = 0 (n_min = 0), else xt_tar there.
On FLUX.1-dev (sd.guidance_embeds), no classifier-free guidance: V^src = V(zt_src, p_src; g = s_src), V^tar =
V(zt_tar, p_tar; g = s_tar), one row each, s the guidance embedding's value (sd.predict's per-row guidance); N_k^j
drawn packed, unpack(randn [1, (h/2)(w/2), 4C]); sigma_k shifted by the latent's tokens. Schnell (no embedding) refused.

Each FlowEdit step is one batched transformer call per draw: the rows [src_uncond, src_cond, tar_uncond, tar_cond]
(the reference's order; a side at guidance <= 1 keeps only its cond row: no classifier-free guidance; on FLUX the
rows [src, tar], the reference's two calls in one); each tail step one call of the target's rows. The noise comes
from one torch.Generator seeded with `seed`, on the CPU in float32 (the same numbers on every device and dtype, then
cast to the latent's): n_avg draws of x_src's shape (FLUX: packed) per FlowEdit step in ascending k, then the tail's
one draw. These are exactly the reference's draws (torch.manual_seed(seed), then torch.randn_like(x_src) each time)
where its x_src is a contiguous float32 CPU tensor; on SD3 its x_src is channels-last after diffusers' preprocessing,
so its randn_like fills memory in that order and the numbers differ.
On FLUX its randn_like is of the packed latent, a contiguous tensor whatever x_src's layout: the same numbers.
The prompts are embedded one per text-encoder call (negative, source, target; FLUX: source, target), as the
reference's encode_prompt. SD3's reference steps with t_k / T where this uses sigma_k: equal on SD3's 50-step grid, an
ulp apart on some others; its tail computes all four rows and uses the target's two (FLUX's: sigma_k, one row).
"""
import math
from dataclasses import dataclass

import torch

from . import parity
from .errors import MinleditsError, shorten
from .flowmatch import FlowEuler, image_tokens
from .io.image import to_tensor
from .nets.flux import unpack

# The paper's FLUX.1-dev settings (the authors' FLUX_exp.yaml); edit's own defaults are its SD3 settings.
FLUX_DEFAULTS = dict(steps=28, n_max=24, n_min=0, n_avg=1, source_guidance=1.5, target_guidance=5.5)


@dataclass
class FlowStep:
    """Everything one step computed; handed to the callback (references, no copies)."""
    i: int                      # edit step: k = N - n_max + i
    k: int                      # inference step
    t: torch.Tensor             # timestep t_k = T sigma_k, the transformer's input
    tail: bool                  # an SDEdit-style step (k >= N - n_min)
    x: torch.Tensor             # the state the step starts from: zt_edit, or xt_tar in the tail
    noise: torch.Tensor | None  # the draws N_k^j [n_avg, C, h, w]; the tail's first step: its one draw [1, ...]
    zt_src: torch.Tensor | None  # [n_avg, C, h, w]; the tail's first step: scale_noise(k, x_src, N) [1, ...]
    zt_tar: torch.Tensor        # [n_avg, C, h, w]; in the tail: xt_tar [1, ...]
    v_src: torch.Tensor | None  # V^src per draw [n_avg, C, h, w] (None in the tail)
    v_tar: torch.Tensor         # V^tar per draw [n_avg, C, h, w] ([1, ...] in the tail)
    v_delta: torch.Tensor       # V_delta_k (the tail: V^tar) [1, C, h, w]
    x_next: torch.Tensor        # the state after the Euler step


def check_options(steps, n_max, n_min, n_avg, source_guidance, target_guidance, seed, prompts: dict) -> None:
    """Every option of an edit, refused in one line (ValueError): 0 <= n_min <= n_max <= steps, n_max >= 1,
    n_avg >= 1, finite guidance, a seed torch.Generator takes, prompts that are text."""
    for name, value in [("steps", steps), ("n_max", n_max), ("n_min", n_min), ("n_avg", n_avg), ("seed", seed)]:
        if not (isinstance(value, int) and not isinstance(value, bool)):
            raise ValueError(f"{name} must be an integer, got {shorten(value)}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 1 <= n_max <= steps:
        raise ValueError(f"n_max (the steps edited) must be in 1..steps ({steps}), got {n_max}")
    if not 0 <= n_min <= n_max:
        raise ValueError(f"n_min (the plain sampling steps at the end) must be in 0..n_max ({n_max}), got {n_min}")
    if n_avg < 1:
        raise ValueError(f"n_avg (noise draws per step) must be >= 1, got {n_avg}")
    if not -2**63 <= seed < 2**64:  # what torch.Generator.manual_seed takes
        raise ValueError(f"seed must be an integer from -2**63 to 2**64 - 1, got {seed}")
    for name, s in [("source guidance", source_guidance), ("target guidance", target_guidance)]:
        if not (isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s)):
            raise ValueError(f"{name} must be a finite number, got {shorten(s)}")
    for name, p in prompts.items():
        if not isinstance(p, str):
            raise ValueError(f"{name} must be text, got {shorten(p)}")


def take(c, rows: list[int]):
    """Those rows of a conditioning (text_embeddings' tensor, or the (c, pooled) pair)."""
    return tuple(x[rows] for x in c) if isinstance(c, tuple) else c[rows]


def join(a, b):
    """The rows of two conditionings, a's first."""
    return tuple(map(torch.cat, zip(a, b))) if isinstance(a, tuple) else torch.cat([a, b])


def guided(v: torch.Tensor, s: float) -> torch.Tensor:
    """v_u + s (v_c - v_u) from the rows [v_u, v_c]; v_c itself from one row [v_c] (guidance off)."""
    return v[:1] + s * (v[1:] - v[:1]) if len(v) == 2 else v


def check_finite(i: int, t, x_next: torch.Tensor) -> None:
    if not x_next.isfinite().all():
        raise MinleditsError(f"the edit's latents became inf or NaN at step {i} (t = {float(t):g}): lower the "
                             "guidance, or the transformer's output is not finite (fp16 overflow: try fp32)")


@torch.inference_mode()
def edit(sd, image, *, source_prompt: str, target_prompt: str, steps=50, n_max=33, n_min=0, n_avg=1,
         source_guidance=3.5, target_guidance=13.5, seed=0, negative_prompt="", size=None, keep_aspect=False,
         callback=None) -> torch.Tensor:
    """The edited latents [1, C, h, w] of image (a path or PIL image, centre-cropped and resized to size, by default
    sd.default_size; keep_aspect: resized only). callback(FlowStep) receives every intermediate tensor of every step.
    Decode them with minledits.decode(sd, latents). The defaults are the paper's SD3 settings; on FLUX.1-dev pass
    **FLUX_DEFAULTS (as the CLI does)."""
    check_options(steps, n_max, n_min, n_avg, source_guidance, target_guidance, seed,
                  {"source prompt": source_prompt, "target prompt": target_prompt, "negative prompt": negative_prompt})
    if sd.prediction_type != "flow":
        raise ValueError(f"FlowEdit runs on a rectified flow (SD3); this model predicts {sd.prediction_type}: use "
                         "ledits, leditspp or p2p")
    embedded = check_model(sd, negative_prompt)
    size = sd.default_size if size is None else size
    sd.check_fits(size, size)
    x_src = sd.encode(to_tensor(image, size, keep_aspect))
    flow = FlowEuler(sd.schedule, steps, tokens=image_tokens(*x_src.shape[-2:]))
    s_src, s_tar = source_guidance, target_guidance
    both, tar, (n_s, n_t) = conditioning(sd, embedded, negative_prompt, source_prompt, target_prompt, s_src, s_tar)
    draw = drawer(seed, x_src, packed=embedded)

    zt_edit, xt_tar, N = x_src, None, steps
    for i, k in enumerate(range(N - n_max, N)):
        if k < N - n_min:  # FlowEdit: the ODE on the velocity difference, averaged over n_avg draws
            noise = [draw() for _ in range(n_avg)]
            step = flowedit_step(sd, flow, i, k, x_src, zt_edit, noise, both, (n_s, n_t), (s_src, s_tar))
            zt_edit = step.x_next
        else:  # the SDEdit-style tail: the target prompt's own flow from the edit, noised once more
            noise = draw() if k == N - n_min else None
            x = zt_edit if noise is not None else xt_tar
            step = tail_step(sd, flow, i, k, x_src, x, noise, tar, n_t, s_tar)
            xt_tar = step.x_next
        check_finite(i, step.t, step.x_next)
        if callback:
            callback(step)
    return zt_edit if n_min == 0 else xt_tar


def check_model(sd, negative_prompt: str) -> bool:
    """Whether sd steers by a guidance embedding (FLUX.1-dev) rather than classifier-free guidance (SD3); a model
    FlowEdit cannot run on refused in one line (ValueError)."""
    if sd.prediction_type != "flow":
        raise ValueError(f"FlowEdit runs on a rectified flow (SD3, FLUX); this model predicts {sd.prediction_type}: "
                         "use ledits, leditspp or p2p")
    embedded = getattr(sd, "guidance_embeds", None)  # None: classifier-free guidance; True: FLUX.1-dev's embedding
    if embedded is False:
        raise ValueError("FlowEdit on FLUX steers by the guidance embedding, which this model (FLUX.1-schnell) lacks: "
                         "use FLUX.1-dev, or ledits or leditspp")
    if embedded and negative_prompt:
        raise ValueError("FlowEdit on FLUX takes no negative prompt (no classifier-free guidance)")
    return bool(embedded)


def conditioning(sd, embedded: bool, negative_prompt, source_prompt, target_prompt, s_src, s_tar):
    """(both sides' rows, the target's rows, (n_s, n_t) rows per side); rows = (conditioning, guidance embedding's
    values per row or None). SD3: [negative, source] and [negative, target] (a side at guidance <= 1: its prompt
    alone); FLUX.1-dev: [source] and [target], each with its scale as the embedding's value."""
    if embedded:
        c = parity.embed(sd, [source_prompt], [target_prompt])
        g = torch.tensor([s_src, s_tar], device=sd.device)
        return (c, g), (take(c, [1]), g[1:]), (1, 1)
    text = parity.embed(sd, [negative_prompt], [source_prompt], [target_prompt])  # rows: negative, source, target
    c_src = take(text, [0, 1] if s_src > 1 else [1])
    c_tar = take(text, [0, 2] if s_tar > 1 else [2])
    return (join(c_src, c_tar), None), (c_tar, None), (1 + (s_src > 1), 1 + (s_tar > 1))


def drawer(seed: int, x_src: torch.Tensor, packed: bool):
    """The draws N_k^j one after another: a CPU float32 generator seeded with `seed`, each draw of x_src's shape
    (packed: drawn as FLUX's tokens [1, (h/2)(w/2), 4C], then unpacked), cast to x_src's dtype and device."""
    g, (_, C, h, w) = torch.Generator().manual_seed(seed), x_src.shape
    if packed:
        tokens = (1, image_tokens(h, w), 4 * C)
        return lambda: unpack(torch.randn(tokens, generator=g, dtype=torch.float32), h, w).to(x_src)
    return lambda: torch.randn(x_src.shape, generator=g, dtype=torch.float32).to(x_src)


def velocity(sd, x, t, cond: tuple) -> torch.Tensor:
    """sd.predict at x of cond = (the rows' conditioning, their guidance embedding's values or None: none)."""
    c, guidance = cond
    return sd.predict(x, t, c) if guidance is None else sd.predict(x, t, c, guidance=guidance)


def flowedit_step(sd, flow, i, k, x_src, zt_edit, noise: list, cond, rows: tuple, scales: tuple) -> FlowStep:
    """One FlowEdit step: per draw N_k^j, zt_src, zt_tar and both guided velocities in one transformer call (cond:
    the rows' conditioning and guidance embedding (velocity), rows: the source's and the target's counts, scales:
    s_src, s_tar), V_delta their mean difference, then zt_edit's Euler step."""
    (n_s, n_t), (s_src, s_tar) = rows, scales
    t, zt_src, zt_tar, v_src, v_tar = flow.timesteps[k], [], [], [], []
    V_delta = torch.zeros_like(x_src)
    for n in noise:
        zt_src.append(flow.scale_noise(k, x_src, n))
        zt_tar.append(zt_edit + zt_src[-1] - x_src)
        x = torch.cat([zt_src[-1].expand(n_s, -1, -1, -1), zt_tar[-1].expand(n_t, -1, -1, -1)])
        v = velocity(sd, x, t, cond)
        v_src.append(guided(v[:n_s], s_src))
        v_tar.append(guided(v[n_s:], s_tar))
        V_delta = V_delta + (1 / len(noise)) * (v_tar[-1] - v_src[-1])
    x_next = flow.move(zt_edit, flow.sigmas[k], flow.sigmas[k + 1], V_delta)
    return FlowStep(i, k, t, False, zt_edit, torch.cat(noise), torch.cat(zt_src), torch.cat(zt_tar), torch.cat(v_src),
                    torch.cat(v_tar), V_delta, x_next)


def tail_step(sd, flow, i, k, x_src, x, noise, cond, n_t, s_tar) -> FlowStep:
    """One step of the SDEdit-style tail from x: at its first step (noise given) x is zt_edit, noised once more to
    xt_tar = zt_edit + scale_noise(k, x_src, N) - x_src; then the Euler step on the target's guided velocity."""
    t, zt_src = flow.timesteps[k], None
    if noise is not None:
        zt_src = flow.scale_noise(k, x_src, noise)
        x = x + zt_src - x_src
    v_tar = guided(velocity(sd, x.expand(n_t, -1, -1, -1), t, cond), s_tar)
    x_next = flow.move(x, flow.sigmas[k], flow.sigmas[k + 1], v_tar)
    return FlowStep(i, k, t, True, x, noise, zt_src, x, None, v_tar, v_tar, x_next)

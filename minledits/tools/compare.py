"""Methods side by side on one inversion: the LEDITS paper's Figure 4 for one picture.

    input | reconstruction | DDPM inversion edit | DDPM + P2P | LEDITS | LEDITS++   (on a DDIM inversion: DDIM ...)
    reconstruction   the edit without guidance (the inversion's noise maps regenerate the picture)
    DDPM             edit-friendly DDPM inversion edited by the target prompt alone (Huberman-Spiegelglas et al.)
    DDPM + P2P       the same with Prompt-to-Prompt's attention control from the source prompt (p2p.py; its options
                     cross_replace, self_replace, reweight, local_blend as given, else p2p.edit's defaults)
    LEDITS           the target prompt and the SEGA concepts (ledits.py)
    LEDITS++         the concepts with LEDITS++' implicit masks (leditspp.py), on the same inversion
On a flow inversion (sampler "flow": Stable Diffusion 3) the middle panels are "flow inversion" (its regeneration
steered by the target prompt alone, key "flow") and "FlowEdit" (flowedit.py from the inversion's picture, inv.image,
with the inversion's source prompt, steps, source guidance and seed, the target prompt and guidance, n_max (by default
the inversion's edited steps N - skip: both start at one noise level), n_min, n_avg, the negative prompt); no P2P
panel (Prompt-to-Prompt replaces a UNet's cross-attention). FlowEdit needs no inversion: its panel equals
`minledits edit PHOTO --method flowedit` with those options.
On FLUX.1 (a flow inversion of a model with sd.guidance_embeds) the FlowEdit panel is FlowEdit with the paper's FLUX
settings (flowedit.FLUX_DEFAULTS: its steps, n_max, guidances as the guidance embedding's values; no negative prompt;
n_max, n_min, n_avg as given), with the inversion's source prompt, seed, size: `minledits edit PHOTO --method
flowedit` on FLUX with those options (left out on schnell: no guidance embedding); and one more panel, "RF-Inversion"
(key "rf-inversion"): rfinversion.invert of the inversion's picture with its source prompt, seed and size (its own
steps, rfinversion.STEPS; gamma as given, else rfinversion's), then rfinversion.edit towards the target prompt (eta,
start, stop, guidance likewise): `minledits edit PHOTO --method rf-inversion` with those options; its evaluations and
time count both ODEs.
On a DDIM inversion (sampler "ddim") the two middle panels are "DDIM inversion" (its DDIM regeneration steered by
the target prompt alone) and "DDIM + P2P" (Prompt-to-Prompt on it: the classic baseline), keys "ddim" and
"ddim+p2p"; LEDITS and LEDITS++ run on it too (their steps take the DDIM step; its noise maps are 0), and the
reconstruction is its regeneration without guidance (DDIM inversion is not exact: it shows how far it drifts).
Every method walks the one inversion it is given (they all take every sampler's inversion), so their inputs are
equal by construction. A method whose inputs are missing (DDPM without a target prompt, P2P without a source and a
target prompt, LEDITS and LEDITS++ without concepts) is left out, and said so.
Each panel comes with its UNet image-evaluations (rows of the UNet's batches; on SD3 and FLUX the transformer's) and
its time.
"""
import time
from contextlib import contextmanager
from dataclasses import dataclass

from PIL import Image

from .. import flowedit, ledits, leditspp, p2p, rfinversion
from ..io.image import to_pil
from ..model import decode
from .sweep import text_tile

LABELS = {"input": "input", "reconstruction": "reconstruction", "ddpm": "DDPM inversion", "p2p": "DDPM + P2P",
          "ddim": "DDIM inversion", "ddim+p2p": "DDIM + P2P", "flow": "flow inversion", "flowedit": "FlowEdit",
          "flow+p2p": "flow + P2P", "rf-inversion": "RF-Inversion",
          "ledits": "LEDITS", "leditspp": "LEDITS++"}
P2P_ON_FLOW = ("Prompt-to-Prompt replaces a UNet's cross-attention: none on a rectified flow (Stable Diffusion 3, "
               "FLUX.1)")
NO_EMBEDDING = "FlowEdit on FLUX steers by the guidance embedding, which this model (FLUX.1-schnell) lacks"
RF_INVERT = ("gamma",)                                            # rf_options: rfinversion.invert's
RF_EDIT = ("eta", "start_timestep", "stop_timestep", "guidance")  # rfinversion.edit's


@dataclass
class Panel:
    method: str                   # a key of LABELS
    image: Image.Image
    unet_evaluations: int = 0     # image-evaluations: the rows of every UNet call
    seconds: float = 0.0


@contextmanager
def unet_rows(unet):
    """Counts the rows of every UNet call inside the block: `with unet_rows(sd.unet) as n: ...; n[0]`."""
    n = [0]
    hook = unet.register_forward_pre_hook(lambda module, args: n.__setitem__(0, n[0] + len(args[0])))
    try:
        yield n
    finally:
        hook.remove()


def method_edits(source_prompt: str, target_prompt: str, target_guidance: float, concepts: list,
                 momentum_scale: float, momentum_beta: float, pp_concepts: list, p2p_options: dict,
                 sampler: str = "ddpm", flow_options: dict | None = None, guidance_embeds: bool | None = None,
                 rf_options: dict | None = None, **pp) -> tuple[dict, dict]:
    """({method: function(sd, inv) -> w0}, {method: why it is left out}). concepts: LEDITS' (sega.Concept),
    pp_concepts: the same with LEDITS++' defaults (leditspp.concept); p2p_options: p2p.edit's cross_replace,
    self_replace, reweight, local_blend; sampler: the inversion's (its name keys the middle panels: "ddim" and
    "ddim+p2p" on a DDIM inversion, "flow" and "flowedit" on a flow one, else "ddpm" and "p2p"); flow_options:
    FlowEdit's n_max (None: the inversion's edited steps; FLUX's default), n_min, n_avg; guidance_embeds: the model's
    (None: no FLUX.1; True: dev; False: schnell), on FLUX the RF-Inversion panel is drawn with rf_options (RF_INVERT,
    RF_EDIT; absent: rfinversion's defaults); pp: leditspp.edit's mask, negative_prompt, guidance_rescale (FlowEdit
    on SD3 takes its negative_prompt too)."""
    plain, with_p2p = {"ddim": ("ddim", "ddim+p2p"), "flow": ("flow", "flowedit")}.get(sampler, ("ddpm", "p2p"))
    run, left_out = {"reconstruction": lambda sd, inv: ledits.edit(sd, inv)}, {}
    if target_prompt:
        run[plain] = lambda sd, inv: ledits.edit(sd, inv, target_prompt=target_prompt,
                                                 target_guidance=target_guidance)
    else:
        left_out[plain] = "it edits by the target prompt alone: give --target-prompt"
    if sampler == "flow":
        more, why = flow_edits(source_prompt, target_prompt, target_guidance, pp.get("negative_prompt", ""),
                               flow_options or {}, guidance_embeds, rf_options or {})
        run.update(more)
        left_out.update(why)
    elif source_prompt and target_prompt:
        run[with_p2p] = lambda sd, inv: p2p.edit(sd, inv, target_prompt, target_guidance, **p2p_options)
    else:
        need = [] if target_prompt else ["--target-prompt"]
        need += [] if source_prompt else ["an inversion with a source prompt (--source-prompt when the photo is "
                                          "inverted)"]
        left_out[with_p2p] = f"it maps the source prompt's words to the target's: give {' and '.join(need)}"
    if concepts:
        run["ledits"] = lambda sd, inv: ledits.edit(sd, inv, target_prompt=target_prompt,
                                                    target_guidance=target_guidance, concepts=concepts,
                                                    momentum_scale=momentum_scale, momentum_beta=momentum_beta)
        run["leditspp"] = lambda sd, inv: leditspp.edit(sd, inv, concepts=pp_concepts, **pp)
    else:
        left_out.update(ledits="it needs concepts: give -e", leditspp="it needs concepts: give -e")
    return run, left_out


def flow_edits(source_prompt: str, target_prompt: str, target_guidance: float, negative_prompt: str,
               flow_options: dict, guidance_embeds: bool | None, rf_options: dict) -> tuple[dict, dict]:
    """method_edits' panels of a flow inversion besides LEDITS': FlowEdit (from the inversion's picture, no
    inversion; not on FLUX.1-schnell) and, on FLUX.1, RF-Inversion (its own inversion of that picture)."""
    run, left_out = {}, {"flow+p2p": P2P_ON_FLOW}
    if guidance_embeds is False:
        left_out["flowedit"] = NO_EMBEDDING
    elif source_prompt and target_prompt:
        run["flowedit"] = lambda sd, inv: flowedit.edit(sd, to_pil(inv.image)[0], **flowedit_options(
            inv, target_prompt, target_guidance, negative_prompt, guidance_embeds, **flow_options))
    else:
        left_out["flowedit"] = ("it edits from the source prompt to the target prompt: give --source-prompt (to the "
                                "inversion) and --target-prompt")
    if guidance_embeds is not None and target_prompt:
        run["rf-inversion"] = lambda sd, inv: rf_edit(sd, inv, target_prompt, rf_options)
    elif guidance_embeds is not None:
        left_out["rf-inversion"] = "it edits towards the target prompt: give --target-prompt"
    return run, left_out


def flowedit_options(inv, target_prompt: str, target_guidance: float, negative_prompt: str = "",
                     guidance_embeds: bool | None = None, n_max=None, n_min=None, n_avg=None) -> dict:
    """flowedit.edit's options for the FlowEdit panel of a flow inversion inv (module docstring): on SD3 its steps,
    edited steps and source guidance; on FLUX.1 (guidance_embeds not None) flowedit.FLUX_DEFAULTS."""
    s = inv.settings
    own = dict(flowedit.FLUX_DEFAULTS) if guidance_embeds is not None else dict(
        steps=s.steps, n_max=len(inv.zs), n_min=0, n_avg=1, source_guidance=s.source_guidance,
        target_guidance=target_guidance, negative_prompt=negative_prompt)
    given = {k: v for k, v in dict(n_max=n_max, n_min=n_min, n_avg=n_avg).items() if v is not None}
    return dict(source_prompt=s.source_prompt, target_prompt=target_prompt, **{**own, **given}, seed=s.seed,
                size=s.size, keep_aspect=s.keep_aspect)


def rf_edit(sd, inv, target_prompt: str, options: dict):
    """The RF-Inversion panel: rfinversion's own inversion of inv's picture (its source prompt, seed, size), then its
    edit towards the target prompt; options: RF_INVERT and RF_EDIT's given values."""
    s = inv.settings
    rf_inv = rfinversion.invert(sd, to_pil(inv.image)[0], seed=s.seed, size=s.size, keep_aspect=s.keep_aspect,
                                source_prompt=s.source_prompt, **{k: options[k] for k in RF_INVERT if k in options})
    return rfinversion.edit(sd, rf_inv, prompt=target_prompt, **{k: options[k] for k in RF_EDIT if k in options})


def panels(sd, inv, run: dict) -> list[Panel]:
    """The input, then each method's edit of `inv`, decoded, with its UNet evaluations and time."""
    out = [Panel("input", to_pil(inv.image)[0])]
    for method, edit in run.items():
        start = time.time()
        with unet_rows(sd.unet) as n:
            w0 = edit(sd, inv)
        out.append(Panel(method, decode(sd, w0), n[0], time.time() - start))
    return out


def picture(found: list[Panel]) -> Image.Image:
    """One row of panels under their labels."""
    W, H = found[0].image.size
    strip = max(H // 4, 16)
    sheet = Image.new("RGB", (W * len(found), H + strip), "white")
    for j, p in enumerate(found):
        sheet.paste(text_tile(LABELS[p.method], (W, strip)), (W * j, 0))
        sheet.paste(p.image if p.image.size == (W, H) else p.image.resize((W, H)), (W * j, strip))
    return sheet

"""The `minledits` command line's options: three tables (model and run, inversion, edit) that every command
draws from, each command's own arguments, and the parser built from them (__init__.py runs the commands).

In the tables argparse keeps None as the default, so that "not given" can be told apart (an inversion file
brings its own settings); resolve() then fills in the defaults shown in --help.
"""
import argparse
import difflib
import inspect
import os
import re

from .. import flowedit, ledits, leditspp, p2p, rfinversion
from ..errors import shorten
from ..flux import Flux
from ..inversion import BATCH_SIZE, InversionSettings
from ..io import tiny
from ..io.load import DEFAULT_MODEL, DTYPES
from ..model import StableDiffusionXL
from ..sampler import SAMPLERS
from ..sega import Concept
from ..tools import metrics


def text(value: str) -> str:
    """Text from the command line as typed: under an ASCII locale (LC_ALL=C) the bytes of UTF-8 text arrive as
    surrogates (os.fsdecode's), and are decoded here; bytes that are not UTF-8 stay surrogates (then refused)."""
    if not any("\udc80" <= c <= "\udcff" for c in value):
        return value
    try:
        return os.fsencode(value).decode("utf-8")
    except UnicodeError:
        return value


BOOL, INT, FLOAT, TEXT = dict(action="store_true"), dict(type=int), dict(type=float), dict(metavar="TEXT", type=text)
INV = InversionSettings()  # the defaults of the inversion options
EDIT_DEFAULTS = {k: p.default for k, p in inspect.signature(ledits.edit).parameters.items()}
FLOWEDIT_DEFAULTS = {k: p.default for k, p in inspect.signature(flowedit.edit).parameters.items()}
# --method flowedit's defaults of the options that differ by model, the paper's settings: on Stable Diffusion 3 and on
# FLUX (its guidances are the values of FLUX.1-dev's guidance embedding, each side one transformer row)
FLOWEDIT_SD3 = {k: FLOWEDIT_DEFAULTS[k] for k in ("steps", "n_max", "source_guidance", "target_guidance")}
FLOWEDIT_FLUX = {**FLOWEDIT_SD3, **flowedit.FLUX_DEFAULTS}
# --method rf-inversion's defaults (the community pipeline's); its guidance: FLUX.1-dev's embedding at the edit
RF_DEFAULTS = {"steps": rfinversion.STEPS, "gamma": rfinversion.GAMMA, "eta": rfinversion.ETA,
               "start_timestep": rfinversion.START, "stop_timestep": rfinversion.STOP}

# (flags, default, help, argparse options)
COMMON = [
    (("--model",), DEFAULT_MODEL, "Hub repo id, diffusers folder, single .safetensors file, or random-tiny "
     "(random weights: an offline smoke test that draws noise); an inversion file's own model by default", {}),
    (("--revision",), None, "Hub branch, tag or commit", {}),
    (("--variant",), None, "weight files to prefer, e.g. fp16 (implied by --dtype fp16)", {}),
    (("--prediction-type",), None, "epsilon or v_prediction (SD 2.x single files need it)", {}),
    (("--vae",), None, "another VAE: a folder with config.json and its weights, or a model folder's vae/ "
     "(e.g. an fp16-fixed SDXL VAE)", dict(metavar="FOLDER")),
    (("--device",), "auto", "auto: cuda, else mps, else cpu", dict(choices=["auto", "cpu", "cuda", "mps"])),
    (("--dtype",), "auto", "auto: fp16 on CUDA, else fp32", dict(choices=["auto", *DTYPES])),
    (("--no-t5",), False, "Stable Diffusion 3: load without its T5 text encoder (zeros stand for its tokens, as in "
     "SD3's pipeline; T5-XXL is 9.5 GB in fp16, 19 GB in fp32; FLUX cannot: T5 writes all the text it reads)", BOOL),
    (("--offload-text",), False, "Stable Diffusion 3 and FLUX: keep the text encoders on the CPU (the prompts embed "
     "there): the GPU holds only the transformer and the VAE", BOOL),
    (("--force",), False, "overwrite outputs that exist", BOOL),
    (("-q", "--quiet"), False, "no progress bars or notes", BOOL),
    (("-v", "--verbose"), False, "show the traceback of an error", BOOL)]
INVERT = [
    (("--source-prompt",), "", "text describing the input image (optional)", TEXT),
    (("--source-guidance",), INV.source_guidance, "guidance scale of the source prompt (--method flowedit on FLUX: "
     f"FLUX.1-dev's guidance embedding at the source rows, {FLOWEDIT_FLUX['source_guidance']:g})", FLOAT),
    (("--steps",), INV.steps, f"diffusion steps N (--method flowedit: {FLOWEDIT_SD3['steps']}, on FLUX "
     f"{FLOWEDIT_FLUX['steps']}; --method rf-inversion: {RF_DEFAULTS['steps']})", INT),
    (("--gamma",), None, "rf-inversion: the controller of its inversion (the forward ODE), from 0 to 1: how far the "
     "photo's path is pulled towards one noise draw (more: more editable, less faithful); given to invert (FLUX), it "
     f"makes an RF-Inversion for edit --method rf-inversion (default: {RF_DEFAULTS['gamma']:g})", FLOAT),
    (("--skip",), None, "steps skipped at the noisy end: more keeps more of the input (default: the method's share of "
     f"N: {SAMPLERS['ddpm'].default_skip(100)} of 100; --method p2p: {p2p.default_skip(100)} of 100; --sampler "
     f"dpmsolver++: {SAMPLERS['dpmsolver++'].default_skip(100)} of 100, diffusers' skip=0.15; --sampler ddim: "
     f"{SAMPLERS['ddim'].default_skip(100)}, every step as the DDIM + P2P baseline; --sampler flow: "
     f"{SAMPLERS['flow'].default_skip(100)} of 100, FlowEdit's share)", INT),
    (("--seed",), INV.seed, "seed of the inversion noise", INT),
    (("--size",), None, "side in pixels (the longest with --keep-aspect), a multiple of 64 (--method flowedit on "
     f"FLUX: of 16) (default: the model's, {INV.size}; SDXL, SD3 and FLUX: "
     f"{StableDiffusionXL.default_size}; random-tiny: {tiny.RandomTiny.default_size})", INT),
    (("--keep-aspect",), False, "keep the aspect ratio (sides multiples of 64), do not centre-crop", BOOL),
    (("--keep-last-noise",), False, "keep the last noise map (exact reconstruction; LEDITS zeroes it)", BOOL),
    (("--zero-noise-steps",), None, "noise maps zeroed at the end unless --keep-last-noise (default 1; 3 for SDXL "
     "with dpmsolver++, as diffusers' LEDITS++ XL pipeline)", INT),
    (("--sampler",), INV.sampler, "ddpm (LEDITS' edit-friendly DDPM), dpmsolver++ (LEDITS++' SDE-DPM-Solver++ 2M) "
     "or ddim (deterministic DDIM inversion, not exact; with --method p2p the DDIM + P2P baseline); flow: a rectified "
     "flow's ODE run forward, Stable Diffusion 3's only sampler and its default",
     dict(choices=list(SAMPLERS))),
    (("--batch-size",), BATCH_SIZE, "inversion timesteps per UNet call with ddpm and dpmsolver++ (faster than 1: "
     "docs/benchmarks.md); ddim and flow take one step per call, each from the last", INT)]
EDIT = [
    (("--method",), "ledits", "ledits (SEGA guidance), leditspp (LEDITS++: implicit masks; best on an inversion "
     "made with --sampler dpmsolver++; on SD3 and FLUX a flow inversion), p2p (Prompt-to-Prompt on the DDPM "
     "inversion, or with --sampler ddim on the DDIM one: needs --source-prompt and --target-prompt), flowedit "
     "(FlowEdit on Stable Diffusion 3 or FLUX: edits the image itself, no inversion; --source-prompt and "
     "--target-prompt) or rf-inversion (RF-Inversion on FLUX: the photo inverted along a controlled flow, then "
     "regenerated towards --target-prompt, pulled back to the photo by --eta)",
     dict(choices=["ledits", "leditspp", "p2p", "flowedit", "rf-inversion"])),
    (("--target-prompt",), "", "text describing the edited image (optional; ledits)", TEXT),
    (("--target-guidance",), EDIT_DEFAULTS["target_guidance"], "guidance scale of the target prompt; concepts need > 1 "
     f"(--method flowedit: {FLOWEDIT_SD3['target_guidance']:g}, <= 1: no guidance; on FLUX: FLUX.1-dev's guidance "
     f"embedding at the target rows, {FLOWEDIT_FLUX['target_guidance']:g})", FLOAT),
    (("-e", "--concept"), None, "concept to add, or -NAME to remove; repeatable (see below)",
     dict(action="append", dest="concepts", metavar="SPEC", type=text)),
    (("--momentum-scale",), EDIT_DEFAULTS["momentum_scale"], "SEGA momentum scale", FLOAT),
    (("--momentum-beta",), EDIT_DEFAULTS["momentum_beta"], "SEGA momentum beta", FLOAT),
    (("--mask",), "intersect", "leditspp: where a concept acts: intersect (cross-attention and noise masks), "
     "cross_attention or noise", dict(choices=list(leditspp.MASK_MODES))),
    (("--negative-prompt",), "", "leditspp, flowedit: the unconditional branch's prompt", TEXT),
    (("--guidance-rescale",), 0.0, "leditspp: guidance rescale phi in [0, 1]", FLOAT),
    (("--user-mask",), None, "leditspp: a picture of the input's size, white where the concepts may act (black: "
     "not; grey: partly)", dict(metavar="M.png")),
    (("--cross-replace",), 0.6, "p2p: fraction of all N steps during which the target takes the source's "
     "cross-attention (counted from the first step after --skip)", FLOAT),
    (("--self-replace",), 0.2, "p2p: the same for self-attention (layers of <= 16x16 queries)", FLOAT),
    (("--reweight",), None, "p2p: scale the attention of target words, e.g. dog=2 or dog=2,grass=0.5",
     dict(metavar="WORD=W,...", type=text)),
    (("--local-blend",), None, "p2p: edit only where these words attend: source words,target words (each side "
     "space-separated words of its prompt), e.g. cat,dog", dict(metavar="SRC,TAR", type=text)),
    (("--n-max",), None, "flowedit: the steps edited, the last N of --steps (more: a stronger edit; compare's FlowEdit "
     f"panel: by default the flow inversion's edited steps, N - skip) (default: {FLOWEDIT_SD3['n_max']}; on FLUX: "
     f"{FLOWEDIT_FLUX['n_max']})", INT),
    (("--n-min",), FLOWEDIT_DEFAULTS["n_min"], "flowedit: of those, the last N sample the target prompt alone "
     "(SDEdit-style)", INT),
    (("--n-avg",), FLOWEDIT_DEFAULTS["n_avg"], "flowedit: noise draws averaged per step", INT),
    (("--eta",), None, "rf-inversion: the controller of its edit (the reverse ODE): how far it is pulled back "
     "to the photo from --start-timestep to --stop-timestep; more: more faithful, less edited (default: "
     f"{RF_DEFAULTS['eta']:g})", FLOAT),
    (("--start-timestep",), None, "rf-inversion: where --eta starts acting, a fraction of the steps from the noisy end "
     f"(default: {RF_DEFAULTS['start_timestep']:g})", FLOAT),
    (("--stop-timestep",), None, "rf-inversion: where it stops (default: "
     f"{RF_DEFAULTS['stop_timestep']:g})", FLOAT),
    (("--guidance",), None, "rf-inversion: FLUX.1-dev's guidance embedding at the edit: the guidance strength the "
     "distilled transformer is told (no classifier-free guidance: one row per step); FLUX.1-schnell has no such "
     f"embedding (default: {Flux.default_guidance:g})", FLOAT),
    (("--save-inversion",), None, "also save the inversion of an input image", dict(metavar="INV")),
    (("--trace",), None, "write T.safetensors (every per-step tensor) and T.png (per step: x0 prediction and "
     "each concept's mask; leditspp: also its attention map and noise mask; flowedit: the target's x0 prediction and "
     "the edit's latent; rf-inversion: the x0 prediction and the state after each step of its edit)",
     dict(metavar="T")),
    (("--compare",), False, "also write OUT-compare.png: input | reconstruction | edit", BOOL)]
# The edit options of each method (--method, the outputs: every method's); edit refuses another method's (given
# otherwise than its default): it would be ignored without a word
METHOD_OPTIONS = {"ledits": {"target_prompt", "target_guidance", "concepts", "momentum_scale", "momentum_beta"},
                  "leditspp": {"concepts", "mask", "negative_prompt", "guidance_rescale", "user_mask"},
                  "p2p": {"target_prompt", "target_guidance", "cross_replace", "self_replace", "reweight",
                          "local_blend"},
                  "flowedit": {"target_prompt", "target_guidance", "negative_prompt", "n_max", "n_min", "n_avg"},
                  "rf-inversion": {"gamma", "target_prompt", "eta", "start_timestep", "stop_timestep", "guidance"}}
COMMANDS = {
    "download": "fetch a model from the Hub (into the Hugging Face cache, or --local-dir)",
    "invert": "IMAGE -> inversion file (latents, noise maps, timesteps, settings)",
    "edit": "IMAGE or inversion file -> edited PNG (an image is inverted first; --method flowedit edits the image "
            "itself)",
    "reconstruct": "IMAGE or inversion file -> PNG regenerated without guidance",
    "batch": "the edits listed in a JSON file, every job checked before the first runs; a job whose output "
             "exists is skipped, so a rerun resumes",
    "sweep": "IMAGE|INV -> a grid of edits, options varied (--vary KEY=V1,V2,...): a contact sheet, one PNG per "
             "cell, a table of settings, times and metrics; inverts once per inversion setting; a rerun resumes",
    "compare": "IMAGE|INV -> the methods side by side on one inversion (input | reconstruction | DDPM inversion | "
               "DDPM + P2P | LEDITS | LEDITS++; DDIM ... on a --sampler ddim inversion; on SD3: reconstruction | flow "
               "inversion | FlowEdit | LEDITS | LEDITS++), labelled, with their metrics and UNet evaluations in a JSON "
               "file",
    "evaluate": "PIE_DIR -> the PIE-Bench table: each method's edits where the benchmark looks for them, per-image "
                "and summary metrics (needs the eval extra); a rerun resumes",
    "app": "a page in the browser: invert once, try edits, see where each concept acts (needs the app extra)",
    "metrics": "PSNR and SSIM of two pictures of one size; with CLIP weights also their CLIP image similarity and "
               "the second's CLIP score against --text"}
EXAMPLES = """examples:
  minledits edit photo.jpg -o glasses.png -e glasses
  minledits invert photo.jpg -o photo.safetensors            # invert once ...
  minledits edit photo.safetensors -o old.png --target-prompt "an old man" -e -beard   # ... edit often
  minledits edit photo.jpg -o smoke.png --model random-tiny   # offline smoke test (noise), in seconds
  minledits edit photo.jpg -o dog.png --method flowedit --model stabilityai/stable-diffusion-3-medium-diffusers \
      --source-prompt "a cat" --target-prompt "a dog"        # FlowEdit on SD3, no inversion
  minledits edit photo.jpg -o dog.png --method rf-inversion --model black-forest-labs/FLUX.1-dev \
      --target-prompt "a dog" --dtype bf16 --offload-text     # RF-Inversion on FLUX
errors print one line and exit 1 (usage errors: 2); outputs are never overwritten without --force"""
_C = Concept("")
LEDITSPP_DEFAULTS = ", ".join(f"{k}={v:g}" for k, v in leditspp.CONCEPT_DEFAULTS.items())
CONCEPT_HELP = f"""concepts (-e SPEC, repeatable):
  -e glasses    add "glasses"        -e -beard    remove "beard"
  -e "smile:scale=6,threshold=0.9,warmup=2,cooldown=40,weight=1"   with options; their defaults:
    scale={_C.scale:<9g} strength of the concept's guidance
    threshold={_C.threshold:<5g} act only where its guidance is in the top (1 - threshold) of each channel
    warmup={_C.warmup:<8} edit steps before it acts;   cooldown=none  edit step from which it stops
    weight={_C.weight:<8g} its weight among the concepts
  with --method leditspp the defaults are {LEDITSPP_DEFAULTS} (no weight)
An inversion file (from invert or --save-inversion) is known by its content, whatever its name: its settings
(and, by default, model) are used."""


class UsageError(Exception):
    """An argparse error, raised (not exited) so that batch can report a bad job and go on."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line: argparse quotes user text whole ('...'), and lists unknown arguments
        message = re.sub(r"'[^']{60,}'", lambda m: shorten(m[0][1:-1]), message)
        message = message if len(message) < 300 else message[:300] + "…"
        raise UsageError(f"{self.prog}: error: {message} (usage: {self.prog} --help)")

    def parse_args(self, args=None, namespace=None):
        """As argparse's, but unknown arguments are the command's error, with the nearest option of that command."""
        args, unknown = self.parse_known_args(args, namespace)
        if unknown:
            commands = next((a.choices for a in self._actions if isinstance(a, argparse._SubParsersAction)), {})
            command = commands.get(getattr(args, "cmd", None), self)
            options = [o for a in command._actions for o in a.option_strings if o.startswith("--")]
            near = [m for u in unknown if u.startswith("--") for m in difflib.get_close_matches(u.split("=")[0],
                                                                                                  options, n=1)]
            hint = f"; did you mean {' and '.join(dict.fromkeys(near))}?" if near else ""
            command.error(f"unrecognized arguments: {' '.join(unknown)}{hint}")
        return args


def dest(flags, options) -> str:
    return options.get("dest") or flags[-1].lstrip("-").replace("-", "_")


def resolve(args, table):
    for flags, default, _, options in table:
        if getattr(args, dest(flags, options), None) is None:
            setattr(args, dest(flags, options), default)


def to_argv(options: dict) -> list[str]:
    """{"steps": 50, "keep_aspect": True, "concepts": ["a", "-b"]} -> ["--steps=50", "--keep-aspect", ...]."""
    argv = []
    for k, v in options.items():
        name = "--" + ("concept" if k == "concepts" else k).replace("_", "-")
        for item in v if isinstance(v, list) else [v]:
            argv += [name] if item is True else [] if item is False or item is None else [f"{name}={item}"]
    return argv


# --------------------------------------------------------------------------------------------- each command's own
def add_metrics_arguments(s):
    s.add_argument("a", metavar="A.png", help="the source picture")
    s.add_argument("b", metavar="B.png", help="the edited picture (same size)")
    s.add_argument("--text", type=text, help="prompt for B's CLIP score")
    s.add_argument("--clip-model", default=metrics.CLIP_MODEL, help="CLIP weights: Hub repo id or folder, or none "
                   f"(default: {metrics.CLIP_MODEL})")
    s.add_argument("--json", action="store_true", help="print the numbers as one JSON object")
    s.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda", "mps"],
                   help="device of CLIP (default: cpu)")
    s.add_argument("-v", "--verbose", action="store_true", help="show the traceback of an error")


def add_batch_arguments(s):
    s.add_argument("jobs", metavar="JOBS.json", help='[{"input": "a.jpg", "output": "a.png", "concepts": '
                   '["glasses"], ...}, ...] or {"defaults": {...}, "jobs": [...]}; keys are edit options')
    s.add_argument("--outdir", required=True, help="folder of the outputs (created if missing)")
    s.add_argument("--allow-outside-outdir", action="store_true",
                   help="let jobs write outside --outdir (absolute paths, .., symbolic links)")


def add_sweep_arguments(s):
    s.add_argument("input", metavar="IMAGE|INV", help="an image, or an inversion file (then only edit options vary)")
    s.add_argument("-o", "--output", required=True, metavar="GRID.png",
                   help="the contact sheet; cells go to GRID/NNN.png, the table to GRID.csv and GRID.json")
    s.add_argument("--vary", action="append", required=True, metavar="KEY=V1,V2,...",
                   help="an inversion or edit option (skip, seed, target_guidance, ...; concept.I.scale and the "
                        "other concept options) and its values, or a JSON list; twice: a grid; more: one grid per "
                        "value of the rest")
    s.add_argument("--clip-model", default=metrics.CLIP_MODEL, help="CLIP weights for the metrics (Hub repo id or "
                   f"folder), or none (default: {metrics.CLIP_MODEL})")


def add_compare_arguments(s):
    s.add_argument("input", metavar="IMAGE|INV")
    s.add_argument("-o", "--output", required=True, metavar="CMP.png",
                   help="the panels, labelled; CMP.json gets each method's metrics, UNet evaluations and time")
    s.add_argument("--clip-model", default=metrics.CLIP_MODEL, help="CLIP weights for the metrics (Hub repo id or "
                   f"folder), or none (default: {metrics.CLIP_MODEL})")


# --------------------------------------------------------------------------------------------- the parser
def parser(more=None) -> Parser:
    """more: {command: function adding its own arguments} for the commands whose modules import this one
    (evaluate, app); a command not in it is left out."""
    more = more or {}
    raw = argparse.RawDescriptionHelpFormatter
    p = Parser(prog="minledits", description="LEDITS image editing on Stable Diffusion and FLUX.", epilog=EXAMPLES,
               formatter_class=raw)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    inversion = ("inversion", INVERT)
    for name, tables in [("download", []), ("invert", [inversion]), ("edit", [inversion, ("edit", EDIT)]),
                         ("reconstruct", [inversion]), ("batch", []), ("metrics", []),
                         ("sweep", [inversion, ("edit", EDIT)]), ("compare", [inversion, ("edit", EDIT)]),
                         ("evaluate", [inversion, ("edit", EDIT)]), ("app", [])]:
        if name in ("evaluate", "app") and name not in more:
            continue
        s = sub.add_parser(name, help=COMMANDS[name], description=COMMANDS[name], formatter_class=raw,
                           epilog=CONCEPT_HELP if name == "edit" else None)
        if name == "download":
            s.add_argument("--local-dir", help="write the files here instead of the Hugging Face cache")
        elif name == "metrics":
            add_metrics_arguments(s)
            continue
        elif name == "sweep":
            add_sweep_arguments(s)
        elif name == "compare":
            add_compare_arguments(s)
        elif name == "batch":
            add_batch_arguments(s)
        elif name in more:
            more[name](s)
        else:
            s.add_argument("input", metavar="IMAGE" if name == "invert" else "IMAGE|INV")
            s.add_argument("-o", "--output", required=True, metavar="INV" if name == "invert" else "OUT.png")
        for title, table in tables + [("model and run", COMMON)]:
            group = s.add_argument_group(title)
            for flags, default, text, options in table:
                shown = "" if default is None or default is False or default == "" else f" (default: {default})"
                metavar = {} if options.get("action") else dict(metavar={int: "N", float: "X"}.get(options.get("type")))
                group.add_argument(*flags, default=None, help=text + shown, **{**metavar, **options})
    return p

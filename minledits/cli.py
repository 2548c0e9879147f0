"""The `minledits` command line (argparse): one small handler per command, options in three tables.

Errors print one line and exit 1 (usage errors exit 2); --verbose adds the traceback. Every input is
checked before the work starts; outputs are written to a temporary file then renamed, never overwritten
without --force.
"""
import argparse
import errno
import inspect
import json
import os
import shlex
import sys
import tempfile
import time
import traceback
import warnings
from functools import partial
from pathlib import Path

import torch
from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars, tqdm
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from . import compare, ledits, leditspp, metrics, p2p, ranks, store, sweep, tiny
from .errors import MinleditsError
from .files import atomic
from .image import open_rgb, to_pil, to_tensor
from .inversion import BATCH_SIZE, InversionSettings, invert
from .load import DEFAULT_MODEL, download, load
from .model import DTYPES, decode, dtype_name
from .sampler import SAMPLERS
from .sega import Concept
from .trace import AttentionTrace, Trace, side_by_side

BOOL, INT, FLOAT = dict(action="store_true"), dict(type=int), dict(type=float)
INV = InversionSettings()  # the defaults of the inversion options
EDIT_DEFAULTS = {k: p.default for k, p in inspect.signature(ledits.edit).parameters.items()}
FULL = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up"}
OUTPUTS = {"output": "-o", "compare": "--compare", "trace": "--trace", "save_inversion": "--save-inversion"}

# (flags, default, help, argparse options). argparse keeps None as the default, so that "not given" can be
# told apart (an inversion file brings its own settings); resolve() then fills in the defaults shown here.
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
    (("--force",), False, "overwrite outputs that exist", BOOL),
    (("-q", "--quiet"), False, "no progress bars or notes", BOOL),
    (("-v", "--verbose"), False, "show the traceback of an error", BOOL)]
INVERT = [
    (("--source-prompt",), "", "text describing the input image (optional)", dict(metavar="TEXT")),
    (("--source-guidance",), INV.source_guidance, "guidance scale of the source prompt", FLOAT),
    (("--steps",), INV.steps, "diffusion steps N", INT),
    (("--skip",), INV.skip, "steps skipped at the noisy end: more keeps more of the input", INT),
    (("--seed",), INV.seed, "seed of the inversion noise", INT),
    (("--size",), INV.size, "side in pixels (the longest with --keep-aspect), a multiple of 64; SDXL's default: "
     "1024", INT),
    (("--keep-aspect",), False, "keep the aspect ratio (sides multiples of 64), do not centre-crop", BOOL),
    (("--keep-last-noise",), False, "keep the last noise map (exact reconstruction; LEDITS zeroes it)", BOOL),
    (("--zero-noise-steps",), None, "noise maps zeroed at the end unless --keep-last-noise (default 1; 3 for SDXL "
     "with dpmsolver++, as diffusers' LEDITS++ XL pipeline)", INT),
    (("--sampler",), INV.sampler, "ddpm (LEDITS' edit-friendly DDPM) or dpmsolver++ (LEDITS++' SDE-DPM-Solver++ 2M)",
     dict(choices=list(SAMPLERS))),
    (("--batch-size",), BATCH_SIZE, "inversion timesteps per UNet call (faster than 1: README, Performance)", INT)]
EDIT = [
    (("--method",), "ledits", "ledits (SEGA guidance), leditspp (LEDITS++: implicit masks; best on an inversion "
     "made with --sampler dpmsolver++) or p2p (Prompt-to-Prompt on the DDPM inversion: needs --source-prompt and "
     f"--target-prompt; its default --skip is {p2p.SKIP}, the reference's at N = 100)",
     dict(choices=["ledits", "leditspp", "p2p"])),
    (("--target-prompt",), "", "text describing the edited image (optional; ledits)", dict(metavar="TEXT")),
    (("--target-guidance",), EDIT_DEFAULTS["target_guidance"], "guidance scale of the target prompt; concepts need > 1",
     FLOAT),
    (("-e", "--concept"), None, "concept to add, or -NAME to remove; repeatable (see below)",
     dict(action="append", dest="concepts", metavar="SPEC")),
    (("--momentum-scale",), EDIT_DEFAULTS["momentum_scale"], "SEGA momentum scale", FLOAT),
    (("--momentum-beta",), EDIT_DEFAULTS["momentum_beta"], "SEGA momentum beta", FLOAT),
    (("--mask",), "intersect", "leditspp: where a concept acts: intersect (cross-attention and noise masks), "
     "cross_attention or noise", dict(choices=list(leditspp.MASKS))),
    (("--negative-prompt",), "", "leditspp: the unconditional branch's prompt", dict(metavar="TEXT")),
    (("--guidance-rescale",), 0.0, "leditspp: guidance rescale phi in [0, 1]", FLOAT),
    (("--user-mask",), None, "leditspp: a picture of the input's size, white where the concepts may act (black: "
     "not; grey: partly)", dict(metavar="M.png")),
    (("--cross-replace",), 0.6, "p2p: fraction of all N steps during which the target takes the source's "
     "cross-attention (counted from the first step after --skip)", FLOAT),
    (("--self-replace",), 0.2, "p2p: the same for self-attention (layers of <= 16x16 queries)", FLOAT),
    (("--reweight",), None, "p2p: scale the attention of target words, e.g. dog=2 or dog=2,grass=0.5",
     dict(metavar="WORD=W,...")),
    (("--local-blend",), None, "p2p: edit only where these words attend: source words,target words (each side "
     "space-separated words of its prompt), e.g. cat,dog", dict(metavar="SRC,TAR")),
    (("--save-inversion",), None, "also save the inversion of an input image", dict(metavar="INV")),
    (("--trace",), None, "write T.safetensors (every per-step tensor) and T.png (per step: x0 prediction and "
     "each concept's mask; leditspp: also its attention map and noise mask)", dict(metavar="T")),
    (("--compare",), False, "also write OUT-compare.png: input | reconstruction | edit", BOOL)]
COMMANDS = {
    "download": "fetch a model from the Hub (into the Hugging Face cache, or --local-dir)",
    "invert": "IMAGE -> inversion file (latents, noise maps, timesteps, settings)",
    "edit": "IMAGE or inversion file -> edited PNG (an image is inverted first)",
    "reconstruct": "IMAGE or inversion file -> PNG regenerated without guidance",
    "batch": "the edits listed in a JSON file, every job checked before the first runs; a job whose output "
             "exists is skipped, so a rerun resumes",
    "sweep": "IMAGE|INV -> a grid of edits, options varied (--vary KEY=V1,V2,...): a contact sheet, one PNG per "
             "cell, a table of settings, times and metrics; inverts once per inversion setting; a rerun resumes",
    "compare": "IMAGE|INV -> the methods side by side on one inversion (input | reconstruction | DDPM inversion | "
               "DDPM + P2P | LEDITS | LEDITS++), labelled, with their metrics and UNet evaluations in a JSON file",
    "metrics": "PSNR and SSIM of two pictures of one size; with CLIP weights also their CLIP image similarity and "
               "the second's CLIP score against --text"}
EXAMPLES = """examples:
  minledits edit photo.jpg -o glasses.png -e glasses
  minledits invert photo.jpg -o photo.safetensors            # invert once ...
  minledits edit photo.safetensors -o old.png --target-prompt "an old man" -e -beard   # ... edit often
  minledits edit photo.jpg -o smoke.png --model random-tiny --size 128   # offline smoke test (noise)
errors print one line and exit 1 (usage errors: 2); outputs are never overwritten without --force"""
_C = Concept("")
CONCEPT_HELP = f"""concepts (-e SPEC, repeatable):
  -e glasses    add "glasses"        -e -beard    remove "beard"
  -e "smile:scale=6,threshold=0.9,warmup=2,cooldown=40,weight=1"   with options; their defaults:
    scale={_C.scale:<9g} strength of the concept's guidance
    threshold={_C.threshold:<5g} act only where its guidance is in the top (1 - threshold) of each channel
    warmup={_C.warmup:<8} edit steps before it acts;   cooldown=none  edit step from which it stops
    weight={_C.weight:<8g} its weight among the concepts
  with --method leditspp the defaults are {", ".join(f"{k}={v:g}" for k, v in leditspp.DEFAULTS.items())} (no weight)
An inversion file (from invert or --save-inversion) is known by its content, whatever its name: its settings
(and, by default, model) are used."""


class UsageError(Exception):
    """An argparse error, raised (not exited) so that batch can report a bad job and go on."""


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{self.format_usage()}{self.prog}: error: {message}")


def dest(flags, options) -> str:
    return options.get("dest") or flags[-1].lstrip("-").replace("-", "_")


def parser() -> Parser:
    raw = argparse.RawDescriptionHelpFormatter
    p = Parser(prog="minledits", description="LEDITS image editing on Stable Diffusion.", epilog=EXAMPLES,
               formatter_class=raw)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    inversion = ("inversion", INVERT)
    for name, tables in [("download", []), ("invert", [inversion]), ("edit", [inversion, ("edit", EDIT)]),
                         ("reconstruct", [inversion]), ("batch", []), ("metrics", []),
                         ("sweep", [inversion, ("edit", EDIT)]), ("compare", [inversion, ("edit", EDIT)])]:
        s = sub.add_parser(name, help=COMMANDS[name], description=COMMANDS[name], formatter_class=raw,
                           epilog=CONCEPT_HELP if name == "edit" else None)
        s.set_defaults(func={"download": cmd_download, "invert": cmd_invert, "batch": cmd_batch,
                             "metrics": cmd_metrics, "sweep": cmd_sweep,
                             "compare": cmd_compare}.get(name, cmd_edit))
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
            s.add_argument("jobs", metavar="JOBS.json", help='[{"input": "a.jpg", "output": "a.png", "concepts": '
                           '["glasses"], ...}, ...] or {"defaults": {...}, "jobs": [...]}; keys are edit options')
            s.add_argument("--outdir", required=True, help="folder of the outputs (created if missing)")
            s.add_argument("--allow-outside-outdir", action="store_true",
                           help="let jobs write outside --outdir (absolute paths, .., symbolic links)")
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


# --------------------------------------------------------------------------------------------- helpers
def resolve(args, table):
    for flags, default, _, options in table:
        if getattr(args, dest(flags, options), None) is None:
            setattr(args, dest(flags, options), default)


def bar(args, desc, total):
    return tqdm(total=total, desc=desc, unit="step", disable=args.quiet, leave=False, file=sys.stderr)


def model_of(args):
    """The model of args, on --device in --dtype (cached per run: a batch loads it once)."""
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    elif not (torch.cuda if device == "cuda" else torch.backends.mps if device == "mps" else torch.cpu).is_available():
        raise MinleditsError(f"--device {device}: no such device is available to this PyTorch")
    dtype = DTYPES.get(args.dtype) or (torch.float16 if device == "cuda" else torch.float32)
    key = (args.model, args.revision, args.variant, args.prediction_type, args.vae, device, dtype)
    if key not in args.cache and args.model == tiny.NAME and not args.quiet:
        print("minledits: random-tiny has random weights: its pictures are noise (a smoke test)", file=sys.stderr)
    if key not in args.cache:
        args.cache[key] = load(args.model, device, dtype=dtype, variant=args.variant, revision=args.revision,
                               prediction_type=args.prediction_type, vae=args.vae)
    return args.cache[key]


def label(args, key) -> str:
    """An output in the user's words: its option, or its key in a batch job."""
    return f'"{key}"' if getattr(args, "job", None) is not None else OUTPUTS[key]


def file_name(args, key) -> Path:
    """The output `key` of args as a path. "", "dir/" and "." are refused here: Path would drop the slash."""
    name = getattr(args, key)
    if not name:
        raise MinleditsError(f"{label(args, key)} is empty: give a file name")
    if name.replace(os.sep, "/").rsplit("/", 1)[-1] in ("", ".", ".."):
        raise MinleditsError(f"{label(args, key)} {name} names a folder, not a file: add a file name, "
                             f"e.g. {os.path.join(name, 'out.png')}")
    return Path(name)


def outputs(args) -> list[tuple[str, Path]]:
    """(key, path) of every file the command writes, the main output first; refused before any work: names that
    are no file names, folders, an inversion not named *.safetensors, two outputs that are one file (one would be
    lost)."""
    named = [("output", file_name(args, "output"))]
    if getattr(args, "compare", None):
        named.append(("compare", named[0][1].with_name(named[0][1].stem + "-compare.png")))
    if getattr(args, "trace", None) is not None:
        named += [("trace", p) for p in Trace.files(file_name(args, "trace"))]
    if getattr(args, "save_inversion", None) is not None:
        named.append(("save_inversion", file_name(args, "save_inversion")))
    seen = {}
    for key, p in named:
        if p.is_dir():
            raise MinleditsError(f"{label(args, key)} {p} is a folder: give a file name, e.g. {p / 'out.png'}")
        other = seen.setdefault(p.resolve(), key)  # resolve(): "a/../b", symbolic links
        if other != key:
            raise MinleditsError(f"{label(args, other)} and {label(args, key)} both name {p}: "
                                 "give them different names")
        if (key == "save_inversion" or args.cmd == "invert") and p.suffix != ".safetensors":
            raise MinleditsError(f"{label(args, key)} {p}: an inversion file is named *.safetensors "
                                 f"(e.g. {p.with_suffix('.safetensors')})")
    return named


def refuse_existing(args, named) -> None:
    """No output is overwritten without --force. An inversion saved by an interrupted run is offered as the input."""
    for key, p in named:
        if args.force or not p.exists():
            continue
        if key == "save_inversion" and store.is_inversion(p):
            raise MinleditsError(f"{p} exists (an inversion saved earlier): use it as the input "
                                 f"(minledits edit {p} ...), or add --force to overwrite it")
        raise MinleditsError(f"{p} exists: add --force to overwrite it")


def check_outputs(args) -> list[tuple[str, Path]]:
    """Before any work: outputs() and refuse_existing(), and each folder takes a new file. Returns outputs()."""
    named = outputs(args)
    refuse_existing(args, named)
    for _, p in named:
        try:
            tempfile.TemporaryFile(dir=p.parent).close()
        except OSError as e:
            raise MinleditsError(f"cannot write {p}: {p.parent} is not a writable folder ({e.strerror})") from e
    return named


def inversion_of(args):
    """(model, Inversion) for args.input: an inversion file is read and checked, an image is inverted."""
    given = {k: getattr(args, k) for k in store.SETTINGS if getattr(args, k) is not None}
    # by content; a .safetensors suffix too, so that store.load says why such a file is not an inversion
    if Path(args.input).suffix == ".safetensors" or store.is_inversion(args.input):
        inv = store.load(args.input)
        store.check(inv, source=args.input, **given)
        args.model = args.model or inv.model_id
        resolve(args, COMMON)
        sd = model_of(args)
        store.check(inv, sd, source=args.input)
        vars(args).update(inv.settings.dict())
        return sd, inv
    try:
        image = open_rgb(args.input)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise MinleditsError(f"cannot read image {args.input}: {getattr(e, 'strerror', None) or e}") from e
    size_given = args.size is not None
    resolve(args, INVERT + COMMON)
    settings = InversionSettings(**{k: getattr(args, k) for k in store.SETTINGS})
    if args.batch_size < 1:
        raise MinleditsError(f"--batch-size must be >= 1, got {args.batch_size}")
    sd = model_of(args)
    for check in getattr(args, "model_checks", ()):  # a method's checks that need the model, before the inversion
        check(sd)
    if not size_given and args.size != sd.default_size:  # SDXL: 1024 unless --size says otherwise
        args.size = sd.default_size
        settings = InversionSettings(**{k: getattr(args, k) for k in store.SETTINGS})
    key = (id(sd), str(args.input), settings)
    if key not in args.cache:  # a batch inverts an image once for all its edits
        with bar(args, "invert", args.steps - args.skip) as b:
            args.cache[key] = invert(sd, image, batch_size=args.batch_size,
                                     callback=lambda done, total: b.update(done - b.n), **settings.dict())
    return sd, args.cache[key]


def run_edit(args, sd, inv, target_prompt, concepts, trace=None, desc="edit", user_mask=None):
    """The edited image (PIL), with progress bars for the edit and the decoding."""
    with bar(args, desc, len(inv.zs)) as b, warnings.catch_warnings():
        warnings.filterwarnings("ignore", "concept .* never acts")  # cmd_edit said so in one line already
        if args.method == "p2p" and target_prompt:
            w0 = p2p.edit(sd, inv, target_prompt, args.target_guidance, args.cross_replace, args.self_replace,
                          args.reweight, args.local_blend, callback=lambda step: (b.update(), trace and trace(step)))
        elif args.method == "leditspp" and concepts:
            w0 = leditspp.edit(sd, inv, concepts=concepts, mask=args.mask, negative_prompt=args.negative_prompt,
                               guidance_rescale=args.guidance_rescale, user_mask=user_mask,
                               callback=lambda step: (b.update(), trace and trace(step)))
        else:
            w0 = ledits.edit(sd, inv, target_prompt=target_prompt, target_guidance=args.target_guidance,
                             concepts=concepts, momentum_scale=args.momentum_scale, momentum_beta=args.momentum_beta,
                             callback=lambda step: (b.update(), trace and trace(step)))
    with bar(args, "decode", 1) as b:
        im = decode(sd, w0)
        b.update()
    return im


def spec(c: Concept) -> str:
    """A concept in the -e syntax, every option spelt out."""
    opts = [f"{k}={getattr(c, k)}" for k in ("scale", "threshold", "warmup", "cooldown", "weight")]
    return ("-" if c.reverse else "") + c.prompt + ":" + ",".join(o for o in opts if not o.endswith("=None"))


def to_argv(options: dict) -> list[str]:
    """{"steps": 50, "keep_aspect": True, "concepts": ["a", "-b"]} -> ["--steps=50", "--keep-aspect", ...]."""
    argv = []
    for k, v in options.items():
        name = "--" + ("concept" if k == "concepts" else k).replace("_", "-")
        for item in v if isinstance(v, list) else [v]:
            argv += [name] if item is True else [] if item is False or item is None else [f"{name}={item}"]
    return argv


def shown(text: str) -> str:
    """text with the bytes of a non-UTF-8 file name (surrogates, from os.fsdecode) as \\xNN: printable, storable."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate no file name decodes to
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def save_png(im, path, args, sd, inv, concepts, idle=None):
    """PNG with every parameter that decides its pixels (not where it was written), as JSON ("minledits")
    and as a command line ("parameters"). A non-UTF-8 input name round-trips in the JSON (os.fsencode of its
    "input"); the command line shows its odd bytes as \\xNN. idle: {concept: why it never acted}, JSON only."""
    p = dict(model=sd.model_id, device=sd.device.type, dtype=dtype_name(sd.dtype), **inv.settings.dict())
    if getattr(args, "vae", None):
        p["vae"] = str(args.vae)
    if concepts is not None and args.method == "p2p":
        p.update(method="p2p", target_prompt=args.target_prompt, target_guidance=args.target_guidance,
                 cross_replace=args.cross_replace, self_replace=args.self_replace, reweight=args.reweight,
                 local_blend=args.local_blend)
    elif concepts is not None and args.method == "leditspp":
        p.update(method="leditspp", concepts=[spec(c) for c in concepts], mask=args.mask,
                 negative_prompt=args.negative_prompt, guidance_rescale=args.guidance_rescale,
                 user_mask=None if args.user_mask is None else str(args.user_mask))
    elif concepts is not None:
        p.update(target_prompt=args.target_prompt, target_guidance=args.target_guidance,
                 concepts=[spec(c) for c in concepts], momentum_scale=args.momentum_scale,
                 momentum_beta=args.momentum_beta)
    info = PngInfo()
    info.add_text("minledits", json.dumps(dict(command=args.cmd, input=str(args.input), fingerprint=sd.fingerprint,
                                               **p, **({"idle_concepts": idle} if idle else {}))))
    info.add_text("parameters", shown("minledits " + shlex.join([args.cmd, str(args.input), *to_argv(p)])))
    with atomic(path) as tmp:
        im.save(tmp, format="PNG", pnginfo=info)


def finish(args, start, text):
    noise = " (random-tiny: noise)" if args.model == tiny.NAME else ""
    print(shown(f"{text} in {time.time() - start:.1f} s{noise}"))


# --------------------------------------------------------------------------------------------- commands
def cmd_download(args):
    start = time.time()
    resolve(args, COMMON)
    if args.model == tiny.NAME or Path(args.model).exists():
        where = "built on the fly" if args.model == tiny.NAME else "local"
        return print(f"{args.model} is {where}: nothing to download")
    bars_were_on = not are_progress_bars_disabled()
    if args.quiet:
        disable_progress_bars()
    try:
        folder = download(args.model, args.variant, args.revision, args.local_dir)
    finally:
        if args.quiet and bars_were_on:
            enable_progress_bars()
    finish(args, start, f"downloaded {args.model} -> {folder}")


def check_text(args):
    """Prompts are text: a byte that is not UTF-8 (from the shell) would fail in the tokenizer, after the loading."""
    texts = [("--source-prompt", args.source_prompt), ("--target-prompt", getattr(args, "target_prompt", None))]
    for flag, text in texts + [("-e", c) for c in getattr(args, "concepts", None) or []]:
        try:
            (text or "").encode("utf-8")
        except UnicodeEncodeError:
            raise MinleditsError(f"{flag} {shown(text)} is not UTF-8 text: write it in UTF-8") from None


def cmd_invert(args):
    start = time.time()
    check_text(args)
    check_outputs(args)
    sd, inv = inversion_of(args)
    store.save(inv, args.output)
    finish(args, start, f"inverted {args.input} -> {args.output} ({args.steps - args.skip} steps)")


def concepts_of(args):
    """The concepts of an edit (None for reconstruct), the edit options checked."""
    resolve(args, EDIT)
    check_text(args)
    if args.user_mask is not None and not (args.method == "leditspp" and args.cmd == "edit"):
        raise MinleditsError("--user-mask is an option of edit --method leditspp")
    if args.method == "p2p" and args.cmd == "edit":
        return p2p_options(args)
    if args.method == "leditspp" and args.cmd == "edit":
        concepts = [leditspp.concept(c) for c in args.concepts or []]
        return leditspp.check(concepts, args.mask, None, args.guidance_rescale, None, None)
    concepts = [Concept.parse(c) for c in args.concepts or []] if args.cmd == "edit" else None
    ledits.check(args.target_guidance, concepts or [], args.momentum_scale, args.momentum_beta)
    return concepts


def p2p_options(args) -> list:
    """--method p2p (no concepts): its options checked before any work; on an image input its default --skip, and
    --source-prompt required (an inversion file's own is checked when it is read, before the edit's UNet work)."""
    if args.concepts:
        raise MinleditsError("--method p2p takes no concepts (-e): it edits by --target-prompt")
    src = None
    if not (Path(args.input).suffix == ".safetensors" or store.is_inversion(args.input)):
        src = args.source_prompt or ""
        args.skip = p2p.SKIP if args.skip is None else args.skip
    p2p.check(src, args.target_prompt, args.target_guidance, args.cross_replace, args.self_replace, args.reweight,
              args.local_blend)
    if args.local_blend is not None:
        args.model_checks = [lambda sd: p2p.check_levels(sd.unet.config)]
    return []


def read_user_mask(args):
    """The --user-mask picture (None without one), checked against an input image's size before any work."""
    if args.user_mask is None:
        return None
    try:
        picture = open_rgb(args.user_mask)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise MinleditsError(f"cannot read --user-mask {args.user_mask}: {getattr(e, 'strerror', None) or e}") from e
    try:
        image_size = None if store.is_inversion(args.input) else open_rgb(args.input).size
    except (OSError, ValueError, Image.DecompressionBombError):
        image_size = None  # inversion_of says why the input cannot be read
    if image_size not in (None, picture.size):
        raise MinleditsError(f"--user-mask {args.user_mask} is {picture.width}x{picture.height} px, the input "
                             f"{image_size[0]}x{image_size[1]}: draw the mask on the input image")
    return picture


def cmd_edit(args):
    """edit and reconstruct: everything is checked before the work starts; the main output is written last."""
    start = time.time()
    concepts = concepts_of(args)
    named = check_outputs(args)
    out, compare = named[0][1], next((p for key, p in named if key == "compare"), None)
    trace_files = [p for key, p in named if key == "trace"]
    picture = read_user_mask(args)
    sd, inv = inversion_of(args)
    try:
        user_mask = None if picture is None else leditspp.user_mask(picture, inv)
    except ValueError as e:
        raise MinleditsError(f"--user-mask {args.user_mask}: {e}") from None
    idle = ledits.idle(concepts or [], len(inv.zs))
    for prompt, why in idle.items():
        print(shown(f"minledits: warning: concept {prompt!r} never acts ({why}): the edit ignores it"), file=sys.stderr)
    if args.save_inversion is not None:
        store.save(inv, args.save_inversion)
    trace = None if not trace_files else AttentionTrace(sd, inv, p2p.word_positions(sd.tokenizer, args.target_prompt)) \
        if args.method == "p2p" else Trace(sd, inv)
    im = run_edit(args, sd, inv, args.target_prompt, concepts or [], trace, args.cmd, user_mask)
    if compare:
        recon = run_edit(args, sd, inv, "", [], desc="reconstruct")
        save_png(side_by_side([to_pil(inv.image)[0], recon, im]), compare, args, sd, inv, concepts, idle)
    if trace:
        trace.save(*trace_files, concepts=[spec(c) for c in concepts])
    save_png(im, out, args, sd, inv, concepts, idle)
    finish(args, start, f"{args.cmd}: {args.input} -> {out}")


def job_args(i, job, defaults, base, jobs_dir: Path, outdir: Path):
    """Job i as parsed `edit` arguments; its input (and user mask) is relative to the jobs file, its outputs to
    --outdir."""
    if not isinstance(job, dict) or "input" not in job:
        raise MinleditsError('a job is an object with at least an "input" (an image or inversion file)')
    job = {**defaults, **job}
    for key in ("input", "output", "save_inversion", "trace", "user_mask"):
        if not isinstance(job.get(key, ""), str) and (key == "input" or job[key] is not None):
            raise MinleditsError(f'"{key}" must be a file name (a string), not {json.dumps(job[key])}')
    inp = jobs_dir / job.pop("input")
    if job.get("user_mask") is not None:
        job["user_mask"] = str(jobs_dir / job["user_mask"])
    # os.path.join keeps what Path would drop: "" and "sub/" must be refused as outputs, not read as the folder
    out = job.pop("output", None)
    out = os.path.join(outdir, f"{i:03d}-{inp.stem}.png" if out is None else out)
    job.update({k: os.path.join(outdir, job[k]) for k in ("save_inversion", "trace") if job.get(k) is not None})
    try:
        args = parser().parse_args(["edit", str(inp), "-o", out, *to_argv(job)])
    except SystemExit as e:  # "help": true printed the help; a batch goes on
        raise MinleditsError('"help" is not an option of a job') from e
    for flags, _, _, options in COMMON:  # what the job leaves open comes from the batch's own flags
        if getattr(args, dest(flags, options)) is None:
            setattr(args, dest(flags, options), getattr(base, dest(flags, options)))
    args.cache, args.force, args.job = base.cache, base.force, i  # outputs that exist: as in edit, only --force
    return args


def check_job(args, outdir: Path, allow_outside: bool):
    """(outputs, skip) of a parsed job, checked before the batch starts: skip if its main output exists (a rerun
    resumes); else its input, options and the rest of its outputs must be fine."""
    named = outputs(args)
    for key, p in named:  # resolve(): after "..", symbolic links
        if not (allow_outside or p.resolve().is_relative_to(outdir.resolve())):
            raise MinleditsError(f"{label(args, key)} {p} is outside --outdir {outdir}: write inside it, "
                                 "or add --allow-outside-outdir")
    if named[0][1].exists() and not args.force:
        return named, True
    try:
        open(args.input, "rb").close()
    except OSError as e:
        raise MinleditsError(f"cannot read input {args.input}: {e.strerror}") from e
    concepts_of(args)
    refuse_existing(args, named)
    return named, False


def job_name(i, job) -> str:
    inp = job.get("input") if isinstance(job, dict) else None
    return f"job {i}" + (f" ({inp})" if isinstance(inp, str) else "")


def report(args, i, job, e):
    print("".join(traceback.format_exception(e)) if args.verbose else "", end="", file=sys.stderr)
    print(f"minledits: {job_name(i, job)} failed: {one_line(e)}", file=sys.stderr)


def plan(args, jobs, defaults):
    """Every job checked before the first one runs: ([(i, args, skip)], {i: why it cannot run})."""
    ready, failed, owners = [], {}, {}
    for i, job in enumerate(jobs):
        try:
            job_ns = job_args(i, job, defaults, args, Path(args.jobs).parent, Path(args.outdir))
            named, skip = check_job(job_ns, Path(args.outdir), args.allow_outside_outdir)
        except Exception as e:
            failed[i] = e
            continue
        ready.append((i, job_ns, skip))
        for key, p in named:
            owners.setdefault(p.resolve(), []).append((i, key, p))
    for same in (o for o in owners.values() if len(o) > 1):  # one file for two jobs: one would be lost
        for i, key, p in same:
            j, other = next((j, k) for j, k, _ in same if j != i)
            failed.setdefault(i, MinleditsError(f'"{key}" {p} is also the "{other}" of job {j}: '
                                                "give each job its own outputs"))
    return [r for r in ready if r[0] not in failed], failed


def cmd_batch(args):
    start = time.time()
    try:
        jobs = json.loads(Path(args.jobs).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise MinleditsError(f"cannot read {args.jobs}: {one_line(e)}") from e
    jobs = {"jobs": jobs} if isinstance(jobs, list) else jobs
    if not (isinstance(jobs, dict) and isinstance(jobs.get("jobs"), list)
            and isinstance(jobs.get("defaults", {}), dict)):
        raise MinleditsError(f'{args.jobs}: expected [job, ...] or {{"defaults": {{...}}, "jobs": [job, ...]}}')
    try:  # only once the jobs file is good: a bad one leaves no folder behind
        Path(args.outdir).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MinleditsError(f"cannot make --outdir {args.outdir}: {one_line(e)}") from e
    defaults, jobs = jobs.get("defaults", {}), jobs["jobs"]
    rank, world = ranks.init(args.device or "auto")
    ready, failed = plan(args, jobs, defaults)
    for i in sorted(failed) if rank == 0 else []:  # every process planned the same: process 0 says it
        report(args, i, jobs[i], failed[i])
    done, skipped = 0, sum(skip for _, _, skip in ready)
    ranks.barrier()  # every process has planned from the same files before any writes
    for i, job_ns, _ in sweep.shares([r for r in ready if not r[2]], rank, world):
        try:
            for _, p in outputs(job_ns):
                p.parent.mkdir(parents=True, exist_ok=True)
            job_ns.func(job_ns)
            done += 1
        except Exception as e:
            failed[i] = e
            report(args, i, jobs[i], e)
    done, failed = sum(ranks.gather(done)), {i for part in ranks.gather(sorted(failed)) for i in part}
    which = f" ({', '.join(f'job {i}' for i in sorted(failed))})" if failed else ""
    if rank == 0:
        finish(args, start, f"batch: {done} done, {skipped} skipped (output exists), {len(failed)} failed{which}"
               f" -> {args.outdir}")
    ranks.done()
    return 1 if failed else 0


def add_metrics_arguments(s):
    s.add_argument("a", metavar="A.png", help="the source picture")
    s.add_argument("b", metavar="B.png", help="the edited picture (same size)")
    s.add_argument("--text", help="prompt for B's CLIP score")
    s.add_argument("--clip-model", default=metrics.CLIP_MODEL, help="CLIP weights: Hub repo id or folder, or none "
                   f"(default: {metrics.CLIP_MODEL})")
    s.add_argument("--json", action="store_true", help="print the numbers as one JSON object")
    s.add_argument("--device", default="cpu", help="device of CLIP (default: cpu)")
    s.add_argument("-v", "--verbose", action="store_true", help="show the traceback of an error")


def clip_of(args):
    """CLIP for the metrics, or None (with one note line) where its weights cannot be had."""
    if args.clip_model in (None, "", "none"):
        return None
    try:
        device = "cuda" if args.device in (None, "auto") and torch.cuda.is_available() else args.device or "cpu"
        return metrics.Clip.load(args.clip_model, "cpu" if device == "auto" else device)
    except MinleditsError as e:
        print(f"minledits: note: CLIP metrics left out: {one_line(e)}", file=sys.stderr)
        return None


def cmd_metrics(args):
    try:  # bad input is a usage error: one line, exit 2, before CLIP is loaded
        a, b = open_rgb(args.a), open_rgb(args.b)
        found = metrics.measure(a, b)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        print(f"minledits: error: {one_line(e)}", file=sys.stderr)
        return 2
    if clip := clip_of(args):
        found = metrics.measure(a, b, args.text, clip)
    if args.json:
        return print(json.dumps(found))
    print(", ".join(f"{k} {v:.4f}" for k, v in found.items() if v is not None))


# --------------------------------------------------------------------------------------------- sweep
INVERT_NAMES = [dest(flags, options) for flags, _, _, options in INVERT]
NOT_VARIED = ("concepts", "save_inversion", "trace", "compare", "user_mask")
EDIT_SETTINGS = ("method", "target_prompt", "target_guidance", "momentum_scale", "momentum_beta", "mask",
                 "negative_prompt", "guidance_rescale")


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


def choice(choices, value):
    if value not in choices:
        raise ValueError(f"{value!r} is not one of {', '.join(choices)}")
    return value


def yes_no(value):
    if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError(f"{value!r} is not true or false")
    return value.lower() in ("true", "1", "yes")


def vary_types() -> dict:
    """--vary's option names and their parsers: every inversion and edit option but those naming files."""
    return {dest(flags, o): yes_no if o.get("action") else partial(choice, o["choices"]) if "choices" in o
            else o.get("type", str) for flags, _, _, o in INVERT + EDIT if dest(flags, o) not in NOT_VARIED}


def sweep_cell(args, n, cell, out):
    """The `edit` arguments of cell n: the sweep's, with the cell's values."""
    c = argparse.Namespace(**vars(args))
    c.cmd, c.output = "edit", str(sweep.cell_paths(out, n)[0])
    for key, value in cell.items():
        if m := sweep.CONCEPT_KEY.fullmatch(key):
            c.concepts = sweep.set_concept_option(c.concepts or [], int(m[1]), m[2], value)
        else:
            setattr(c, key, value)
    return c


def sweep_settings(c, from_file: bool) -> tuple[dict, tuple]:
    """(every setting of a cell, the key of the inversion it needs), checked; skip is no DDPM inversion setting."""
    concepts = concepts_of(c)
    if from_file:
        s = {"input": "inversion file"}
    else:
        resolve(c, INVERT + COMMON)
        s = InversionSettings(**{k: getattr(c, k) for k in store.SETTINGS}).dict()
        if c.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {c.batch_size}")
        s.update(model=c.model, batch_size=c.batch_size)
    key = tuple((k, v) for k, v in s.items() if not (k == "skip" and s["sampler"] == "ddpm"))
    edit = {k: getattr(c, k) for k in EDIT_SETTINGS}
    return {**s, **edit, "concepts": [spec(x) for x in concepts]}, key


def sweep_plan(args):
    """(vary, [(n, cell args, settings, group key)], todo) with every cell checked, before any work."""
    if args.trace is not None or args.compare or args.save_inversion is not None or args.user_mask is not None:
        raise ValueError("--trace, --compare, --save-inversion and --user-mask are options of edit, not of sweep")
    vary, out = sweep.parse_vary(args.vary, vary_types()), file_name(args, "output")
    if out.suffix.lower() != ".png":
        raise ValueError(f"-o {out}: the contact sheet is a .png file")
    from_file = Path(args.input).suffix == ".safetensors" or store.is_inversion(args.input)
    if from_file and (fixed := [k for k, _ in vary if k in INVERT_NAMES]):
        raise ValueError(f"--vary {fixed[0]}: an inversion file fixes the inversion options; vary them on the image")
    if not (from_file or Path(args.input).is_file()):
        raise ValueError(f"cannot read input {args.input}: no such file")
    cells, todo = [], []
    for n, cell in enumerate(sweep.grid_cells(vary)):
        c = sweep_cell(args, n, cell, out)
        settings, key = sweep_settings(c, from_file)
        cells.append((n, c, settings, key))
        state = sweep.state(*sweep.cell_paths(out, n), settings)
        if state == "foreign" and not args.force:
            raise ValueError(f"{c.output} exists and was not made by this sweep: add --force, or choose another -o")
        if state != "done":
            todo.append(cells[-1])
    old = sweep.read_json(sweep.table_paths(out)["json"])
    mine = isinstance(old, dict) and old.get("format") == sweep.FORMAT
    for p in [*sweep.sheet_paths(out, 1), *sweep.table_paths(out).values()]:
        if p.exists() and not (mine or args.force):
            raise ValueError(f"{p} exists and is not a sweep's: add --force, or choose another -o")
    return vary, out, cells, sorted(todo, key=lambda t: str(t[3]))


def sweep_text(c, concepts):
    """The text of a cell's CLIP score: the target prompt, else the concepts it adds."""
    return c.target_prompt or ", ".join(x.prompt for x in concepts or [] if not x.reverse) or None


def sweep_group(args, out, items, skips, clip):
    """The cells of one inversion: invert once (at the group's smallest skip), edit each, write PNG and record."""
    g = argparse.Namespace(**vars(items[0][1]))
    g.skip = min(skips) if items[0][2].get("sampler") == "ddpm" else g.skip
    start = time.time()
    sd, inv = inversion_of(g)
    invert_s, failed, sliced = time.time() - start, {}, {None: inv, inv.settings.skip: inv}
    for n, c, settings, _ in items:
        png, record = sweep.cell_paths(out, n)
        try:
            start = time.time()
            if c.skip not in sliced:
                sliced[c.skip] = sweep.at_skip(sd, inv, c.skip, c.batch_size)
            inv_c = sliced[c.skip]
            concepts = concepts_of(c)
            sweep.write_json(record, {"settings": settings})
            im = run_edit(c, sd, inv_c, c.target_prompt, concepts or [])
            save_png(im, png, c, sd, inv_c, concepts, ledits.idle(concepts or [], len(inv_c.zs)))
            found = metrics.measure(to_pil(inv_c.image)[0], im, sweep_text(c, concepts), clip)
            sweep.write_json(record, {"settings": settings, "invert_s": round(invert_s, 3),
                                      "edit_s": round(time.time() - start, 3),
                                      **{k: sweep.finite(v) for k, v in found.items()}})
        except Exception as e:
            failed[n] = one_line(e)
            print("".join(traceback.format_exception(e)) if args.verbose else "", end="", file=sys.stderr)
            print(f"minledits: cell {n} ({png}) failed: {failed[n]}", file=sys.stderr)
    return failed


def sweep_assemble(args, vary, out, cells):
    """Process 0, when every cell is written: the sheets, the table, the plot."""
    keys, values = [k for k, _ in vary], dict(vary)
    R, C = (len(values[keys[0]]), len(values[keys[1]])) if len(keys) > 1 else (1, len(values[keys[0]]))
    first = cells[0][1]
    corner = to_pil(store.load(args.input).image if first.size is None else
                    to_tensor(args.input, first.size, first.keep_aspect))[0]
    records, sheets = [], sweep.sheet_paths(out, len(cells) // (R * C))
    for n, c, settings, _ in cells:
        found = sweep.read_json(sweep.cell_paths(out, n)[1]) or {}
        records.append({"cell": n, "sheet": sheets[n // (R * C)].name, "row": n // C % R, "col": n % C,
                        "file": str(Path(c.output).relative_to(out.parent)), "varied": vars_of(c, keys),
                        **{k: v for k, v in found.items()}})
    for j, path in enumerate(sheets):
        mine = records[j * R * C:(j + 1) * R * C]
        tiles = [[Image.open(cells[r["cell"]][1].output).convert("RGB") for r in mine[i * C:(i + 1) * C]]
                 for i in range(R)]
        rows = [sweep.label(r["varied"], keys[:1]) for r in mine[::C]] if len(keys) > 1 else [""]
        cols = [sweep.label(r["varied"], keys[1:2] if len(keys) > 1 else keys[:1]) for r in mine[:C]]
        info = PngInfo()
        info.add_text("minledits", json.dumps({"command": "sweep", "rows": rows, "columns": cols,
                                               "sheet": {k: mine[0]["varied"][k] for k in keys[2:]}}))
        with atomic(path) as tmp:
            sweep.contact_sheet(corner, tiles, rows, cols).save(tmp, format="PNG", pnginfo=info)
    header = {"input": str(args.input), "vary": [{k: v} for k, v in vary], "sheets": [p.name for p in sheets]}
    sweep.write_table(sweep.table_paths(out), header, records)
    return sweep.tradeoff_plot(records, sweep.table_paths(out)["plot"])


def vars_of(c, keys):
    found = {}
    for k in keys:
        m = sweep.CONCEPT_KEY.fullmatch(k)
        found[k] = getattr(Concept.parse(c.concepts[int(m[1])]), m[2]) if m else getattr(c, k)
    return found


def cmd_sweep(args):
    start = time.time()
    rank, world = ranks.init(args.device or "auto")
    try:
        vary, out, cells, todo = sweep_plan(args)
    except (MinleditsError, ValueError) as e:  # bad input: one line, exit 2, before any work
        print(f"minledits: error: {one_line(e)}", file=sys.stderr)
        return 2
    groups = {key: [t for t in todo if t[3] == key] for key in dict.fromkeys(t[3] for t in todo)}
    rows = sum(sweep.patch_rows([t[1].skip for t in g], min(t[1].skip for t in g), g[0][1].batch_size,
                                g[0][1].steps) for g in groups.values() if g[0][2].get("sampler") == "ddpm")
    if rank == 0 and not args.quiet:
        print(f"minledits: sweep of {len(cells)} cells, {len(cells) - len(todo)} done already: {len(groups)} "
              f"inversion(s){f' (+{rows} UNet rows to align skips)' if rows else ''} and {len(todo)} edit(s)"
              f"{f' on {world} processes' if world > 1 else ''}", file=sys.stderr)
    out.with_suffix("").mkdir(parents=True, exist_ok=True)
    ranks.barrier()  # every process has planned from the same files
    clip, failed, mine = clip_of(args) if todo else None, {}, sweep.shares(todo, rank, world)
    for key in dict.fromkeys(t[3] for t in mine):
        failed.update(sweep_group(args, out, [t for t in mine if t[3] == key], [t[1].skip for t in groups[key]], clip))
    failed = {n: why for part in ranks.gather(failed) for n, why in part.items()}
    if rank == 0:
        note = sweep_assemble(args, vary, out, cells)
        if not args.quiet:
            print(f"minledits: {note}", file=sys.stderr)
        finish(args, start, f"sweep: {len(todo) - len(failed)} cells done, {len(cells) - len(todo)} kept, "
               f"{len(failed)} failed -> {out}")
    ranks.barrier()
    ranks.done()
    return 1 if failed else 0


# --------------------------------------------------------------------------------------------- compare
def add_compare_arguments(s):
    s.add_argument("input", metavar="IMAGE|INV")
    s.add_argument("-o", "--output", required=True, metavar="CMP.png",
                   help="the panels, labelled; CMP.json gets each method's metrics, UNet evaluations and time")
    s.add_argument("--clip-model", default=metrics.CLIP_MODEL, help="CLIP weights for the metrics (Hub repo id or "
                   f"folder), or none (default: {metrics.CLIP_MODEL})")


def compare_plan(args):
    """(output, record, LEDITS concepts, LEDITS++ concepts), every input checked before any work."""
    if args.trace is not None or args.compare or args.user_mask is not None or args.method is not None \
            or args.save_inversion is not None:
        raise ValueError("--trace, --compare, --user-mask, --save-inversion and --method are options of edit: "
                         "compare runs every method")
    out = file_name(args, "output")
    if out.suffix.lower() != ".png":
        raise ValueError(f"-o {out}: the comparison is a .png file")
    args.cmd = "edit"  # concepts_of parses concepts for edit only
    concepts, args.cmd = concepts_of(args), "compare"
    pp_concepts = leditspp.check([leditspp.concept(c) for c in args.concepts or []], args.mask, None,
                                 args.guidance_rescale, None, None)
    for p in (out, out.with_suffix(".json")):
        if p.exists() and not args.force:
            raise ValueError(f"{p} exists: add --force to overwrite it")
    if not Path(args.input).is_file():
        raise ValueError(f"cannot read input {args.input}: no such file")
    return out, out.with_suffix(".json"), concepts, pp_concepts


def compare_inversion(args):
    """(model, inversion, UNet image-evaluations of the inversion: 0 when read from a file)."""
    if Path(args.input).suffix == ".safetensors" or store.is_inversion(args.input):
        return *inversion_of(args), 0
    resolve(args, INVERT + COMMON)
    with compare.unet_rows(model_of(args).unet) as n:
        sd, inv = inversion_of(args)
    return sd, inv, n[0]


def cmd_compare(args):
    start = time.time()
    try:
        out, record, concepts, pp_concepts = compare_plan(args)
    except (MinleditsError, ValueError) as e:  # bad input: one line, exit 2, before any work
        print(f"minledits: error: {one_line(e)}", file=sys.stderr)
        return 2
    sd, inv, inversion_rows = compare_inversion(args)
    run, left_out = compare.plans(inv.settings.source_prompt, args.target_prompt, args.target_guidance, concepts,
                                  args.momentum_scale, args.momentum_beta, pp_concepts, mask=args.mask,
                                  negative_prompt=args.negative_prompt, guidance_rescale=args.guidance_rescale)
    for method, why in left_out.items():
        print(f"minledits: note: {compare.LABELS[method]} left out: {why}", file=sys.stderr)
    found, clip = compare.panels(sd, inv, run), clip_of(args)
    text = sweep_text(args, concepts)
    p = dict(model=sd.model_id, device=sd.device.type, dtype=dtype_name(sd.dtype), **inv.settings.dict(),
             target_prompt=args.target_prompt, target_guidance=args.target_guidance,
             concepts=list(args.concepts or []), momentum_scale=args.momentum_scale,
             momentum_beta=args.momentum_beta, mask=args.mask, negative_prompt=args.negative_prompt,
             guidance_rescale=args.guidance_rescale)
    rows = [{"method": x.method, "label": compare.LABELS[x.method], "unet_evaluations": x.unet_evaluations,
             "seconds": round(x.seconds, 3), **{k: sweep.finite(v) for k, v in metrics.measure(
                 found[0].image, x.image, text, clip).items()}} for x in found]
    info = PngInfo()
    info.add_text("minledits", json.dumps(dict(command="compare", input=str(args.input), **p)))
    info.add_text("parameters", shown("minledits " + shlex.join(["compare", str(args.input), *to_argv(p)])))
    with atomic(out) as tmp:
        compare.picture(found).save(tmp, format="PNG", pnginfo=info)
    sweep.write_json(record, {"input": str(args.input), "settings": p, "inversion_unet_evaluations": inversion_rows,
                              "left_out": left_out, "panels": rows})
    finish(args, start, f"compare: {', '.join(compare.LABELS[x.method] for x in found)} -> {out}")


# --------------------------------------------------------------------------------------------- main
def one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.errno in FULL:
        text = f"cannot write {e.filename or 'a file'}: {FULL[e.errno]} ({e.strerror}): free some space and run again"
    elif isinstance(e, OSError) and e.filename:
        text = f"{e.filename}: {e.strerror}"
    elif isinstance(e, (MinleditsError, ValueError, UsageError)):
        text = str(e).splitlines()[-1].split(": error: ")[-1] if isinstance(e, UsageError) else str(e)
    else:
        text = f"{type(e).__name__}: {e} (unexpected: --verbose shows where)"
    return " ".join(text.split())


def main(argv=None) -> int:
    argv, it = [], iter(sys.argv[1:] if argv is None else argv)
    for a in map(str, it):  # `-e -beard`: argparse would take "-beard" for an option
        argv.append(f"--concept={next(it, '')}" if a in ("-e", "--concept") else a)
    warnings.formatwarning = lambda message, *_, **__: f"minledits: warning: {message}\n"  # one line, no source
    try:
        args = parser().parse_args(argv)
    except UsageError as e:
        print(e, file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return e.code or 0
    args.cache = {}
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print("minledits: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        print(traceback.format_exc() if args.verbose else "", end="", file=sys.stderr)
        print(f"minledits: error: {one_line(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

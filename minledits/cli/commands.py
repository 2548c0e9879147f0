"""The commands on one picture - download, invert, edit and reconstruct, metrics - and what every command
shares: the model and inversion of the arguments, the outputs checked before any work, the edit run with
progress bars, the PNG with its parameters, a failure reported in one line. Outputs are written to a temporary
file then renamed, never overwritten without --force; `cache` (a dict) keeps a run's models and inversions.
"""
import errno
import json
import mimetypes
import os
import shlex
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch
from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars, tqdm
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .. import flowedit, ledits, leditspp, p2p, rfinversion
from ..errors import InversionFileError, MinleditsError, shorten
from ..flux import Flux
from ..inversion import Inversion, InversionSettings, invert
from ..io import store, tiny
from ..io.files import all_or_none, atomic, refuse_output, require_regular, require_writable
from ..io.image import open_rgb, to_pil, to_tensor
from ..io.load import DEFAULT_MODEL, DTYPES, download, dtype_name, is_flux, is_sd3, load
from ..model import decode
from ..tools import metrics
from ..tools.trace import AttentionTrace, FlowTrace, RFTrace, Trace, side_by_side
from .options import (
    COMMON,
    EDIT,
    FLOWEDIT_FLUX,
    FLOWEDIT_SD3,
    INVERT,
    METHOD_OPTIONS,
    RF_DEFAULTS,
    UsageError,
    dest,
    resolve,
    to_argv,
)

FULL = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up"}
MODEL_OPTIONS = ("revision", "variant", "prediction_type", "vae")  # the weights model_of loads besides --model
TEXT_OPTIONS = {"no_t5": "--no-t5", "offload_text": "--offload-text"}  # the text encoders' options of the flows
TEXT_OWNERS = {"no_t5": "Stable Diffusion 3", "offload_text": "Stable Diffusion 3 and FLUX"}  # the models taking them
NO_T5_ON_FLUX = "--no-t5: FLUX cannot run without T5 (its transformer reads the prompt as T5's tokens alone; CLIP " \
                "gives only the pooled vector): leave it out"
SD_SAMPLERS = ("ddpm", "dpmsolver++", "ddim")  # the samplers of SD 1.x, 2.x and XL (SD3's and FLUX's: flow)
# What --method flowedit leaves unused, being no inversion: refused when given
NO_INVERSION = {"skip": "--skip", "keep_last_noise": "--keep-last-noise", "zero_noise_steps": "--zero-noise-steps",
                "sampler": "--sampler", "batch_size": "--batch-size", "save_inversion": "--save-inversion"}
# What --method rf-inversion leaves unused (its inversion is its own controlled flow): refused when given
RF_UNUSED = {"skip": "--skip", "keep_last_noise": "--keep-last-noise", "zero_noise_steps": "--zero-noise-steps",
             "sampler": "--sampler", "batch_size": "--batch-size", "source_guidance": "--source-guidance"}
RF_INVERSION = ("gamma", "steps", "seed", "size", "keep_aspect", "source_prompt")  # rfinversion.invert's options
OUTPUTS = {"output": "-o", "compare": "--compare", "trace": "--trace", "save_inversion": "--save-inversion"}


# --------------------------------------------------------------------------------------------- helpers
def bar(args, desc, total, unit="step", leave=False):
    return tqdm(total=total, desc=desc, unit=unit, disable=args.quiet, leave=leave, file=sys.stderr)


def model_of(args, cache: dict, model=None):
    """The model `model` (by default --model's) on --device in --dtype, kept in `cache` for the rest of the run."""
    resolve(args, COMMON)
    model, device = model or args.model, args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    elif not (torch.cuda if device == "cuda" else torch.backends.mps if device == "mps" else torch.cpu).is_available():
        raise MinleditsError(f"--device {device}: no such device is available to this PyTorch")
    dtype = DTYPES.get(args.dtype) or (torch.float16 if device == "cuda" else torch.float32)
    if model == tiny.NAME and (given := [k for k in (*MODEL_OPTIONS, *TEXT_OPTIONS) if getattr(args, k)]):
        raise MinleditsError(f"random-tiny is built on the fly from random weights: it takes no "
                             f"--{given[0].replace('_', '-')}; leave it out")
    key = (model, *(getattr(args, k) for k in MODEL_OPTIONS), *(bool(getattr(args, k)) for k in TEXT_OPTIONS), device,
           dtype)
    if Path(model).is_dir():  # a local folder: refused before loading
        check_text_options(args, str(model), "sd3" if is_sd3(Path(model)) else "flux" if is_flux(Path(model)) else "",
                           "a folder of another pipeline")
    if key not in cache and model == tiny.NAME and not args.quiet:
        print("minledits: random-tiny has random weights: its pictures are noise (a smoke test)", file=sys.stderr)
    if key not in cache:
        cache[key] = load(model, device, dtype=dtype, variant=args.variant, revision=args.revision,
                          prediction_type=args.prediction_type, vae=args.vae, t5=not args.no_t5,
                          offload_text=bool(args.offload_text))  # SD3's alone: refused on the others below
    sd = cache[key]
    check_text_options(args, str(sd.model_id), "flux" if isinstance(sd, Flux) else "sd3" if sd.prediction_type ==
                       "flow" else "", f"it predicts {sd.prediction_type}")
    return sd


def check_text_options(args, name: str, kind: str, why: str) -> None:
    """--no-t5 and --offload-text refused where the model (kind: "sd3", "flux", or "" for the others; why: how that
    is known) does not take them."""
    for key, flag in TEXT_OPTIONS.items():
        if not getattr(args, key):
            continue
        if kind == "flux" and key == "no_t5":
            raise MinleditsError(NO_T5_ON_FLUX)
        if not kind:
            raise MinleditsError(f"{flag} is an option of {TEXT_OWNERS[key]}; {shorten(name)} is not one ({why}): "
                                 "leave it out")


def family(sd) -> str:
    """The kind of model sd is, as messages name it."""
    return "FLUX" if isinstance(sd, Flux) else "Stable Diffusion 3" if sd.prediction_type == "flow" else \
        "Stable Diffusion 1.x, 2.x or XL"


def check_kind(args, sd, sampler_given: bool = True) -> None:
    """A method or sampler of another kind of model than sd refused in one line: flowedit and the flow sampler need
    a rectified flow (Stable Diffusion 3 or FLUX), rf-inversion FLUX, p2p (the UNet's cross-attention) and the DDPM /
    DPM-Solver++ / DDIM samplers a diffusion model (SD 1.x, 2.x, XL). On a flow a sampler not given becomes flow."""
    flow, name, method = sd.prediction_type == "flow", shorten(str(sd.model_id)), getattr(args, "method", None)
    flux, kind = isinstance(sd, Flux), family(sd)
    if flow and method == "p2p":
        raise MinleditsError(f"--method p2p is for Stable Diffusion 1.x, 2.x and XL (it replaces the UNet's "
                             f"cross-attention); {name} is a rectified flow ({kind}): use --method flowedit"
                             f"{' or rf-inversion' if flux else ''}, or leditspp or ledits on a flow inversion")
    if not flow and method in ("flowedit", "rf-inversion"):
        needs = "a rectified-flow model (Stable Diffusion 3 or FLUX)" if method == "flowedit" else "FLUX"
        raise MinleditsError(f"--method {method} needs {needs}; {name} predicts {sd.prediction_type}: use --method "
                             "ledits, leditspp or p2p")
    if flow and not flux and method == "rf-inversion":
        raise MinleditsError(f"--method rf-inversion needs FLUX; {name} is {kind}: use --method flowedit, or leditspp "
                             "or ledits on a flow inversion")
    sampler = getattr(args, "sampler", None)
    if flow and sampler_given and sampler in SD_SAMPLERS:
        raise MinleditsError(f"--sampler {sampler} is for Stable Diffusion 1.x, 2.x and XL; {name} is a rectified flow "
                             f"({kind}): leave --sampler out (flow, its only sampler)")
    if not flow and sampler == "flow":
        raise MinleditsError(f"--sampler flow is for rectified-flow models (Stable Diffusion 3, FLUX); {name} predicts "
                             f"{sd.prediction_type}: use --sampler {', '.join(SD_SAMPLERS[:-1])} or {SD_SAMPLERS[-1]}")
    if flow and not sampler_given:
        args.sampler = "flow"


def is_inversion_file(path) -> bool:
    """Whether the input `path` is an inversion file: by its content, or by a .safetensors name (store.load then
    says why such a file is not one). What is not a regular file is refused first: a named pipe would hang."""
    require_regular(path)
    return Path(path).suffix == ".safetensors" or store.is_inversion(path)


def png_name(path: Path) -> bool:
    """Whether a PNG may take the name `path`: one whose suffix names no other format (a.jpg, a.txt; "a" is fine)."""
    kind, encoding = mimetypes.guess_type(path.name)
    return Image.registered_extensions().get(path.suffix.lower(), "PNG") == "PNG" and kind in (None, "image/png") \
        and encoding is None


def file_name(args, key, names=OUTPUTS) -> Path:
    """The output `key` of args as a path. "", "dir/" and "." are refused here: Path would drop the slash."""
    name = getattr(args, key)
    if not name:
        raise MinleditsError(f"{names[key]} is empty: give a file name")
    if name == "-":
        raise MinleditsError(f"{names[key]} -: minledits writes files, not standard output: give a file name "
                             "(./- for a file named -)")
    if name.replace(os.sep, "/").rsplit("/", 1)[-1] in ("", ".", ".."):
        raise MinleditsError(f"{names[key]} {name} names a folder, not a file: add a file name, "
                             f"e.g. {os.path.join(name, 'out.png')}")
    return Path(name)


def outputs(args, names=OUTPUTS) -> list[tuple[str, Path]]:
    """(key, path) of every file the command writes, the main output first; refused before any work: names that
    are no file names, folders, an inversion not named *.safetensors, two outputs that are one file (one would be
    lost). names: how messages name each output (its option; a batch job's key)."""
    named = [("output", file_name(args, "output", names))]
    if getattr(args, "compare", None):
        named.append(("compare", named[0][1].with_name(named[0][1].stem + "-compare.png")))
    if getattr(args, "trace", None) is not None:
        named += [("trace", p) for p in Trace.files(file_name(args, "trace", names))]
    if getattr(args, "save_inversion", None) is not None:
        named.append(("save_inversion", file_name(args, "save_inversion", names)))
    seen = {}
    for key, p in named:
        if p.is_dir():
            raise MinleditsError(f"{names[key]} {p} is a folder: give a file name, e.g. {p / 'out.png'}")
        other = seen.setdefault(p.resolve(), key)  # resolve(): "a/../b", symbolic links
        if other != key:
            raise MinleditsError(f"{names[other]} and {names[key]} both name {p}: give them different names")
        protect(args, [(key, p)], names)  # before the name's format: that it is an input matters more
        if key in ("output", "compare") and args.cmd != "invert" and not png_name(p):
            raise MinleditsError(f"{names[key]} {p}: minledits writes PNG files (the settings travel in their text): "
                                 f"name it {p.with_suffix('.png')}")
        if (key == "save_inversion" or args.cmd == "invert") and p.suffix != ".safetensors":
            raise MinleditsError(f"{names[key]} {p}: an inversion file is named *.safetensors "
                                 f"(e.g. {p.with_suffix('.safetensors')})")
    return named


def inputs_of(args) -> list:
    """The files a command reads, which it never writes over: its input, a user mask, and for a batch's job
    (`reads`) the jobs file and every job's inputs."""
    return [args.input, getattr(args, "user_mask", None), *getattr(args, "reads", ())]


def protect(args, named, names=OUTPUTS) -> None:
    """What no output may be, even with --force (refuse_output): one of the inputs, or no regular file."""
    for key, p in named:
        refuse_output(p, True, inputs_of(args), names[key])


def refuse_existing(args, named, names=OUTPUTS) -> None:
    """protect(), and no output is overwritten without --force. An inversion saved by an interrupted run is offered
    as the input."""
    protect(args, named, names)
    for key, p in named:
        if key == "save_inversion" and not args.force and p.exists() and store.is_inversion(p):
            raise MinleditsError(f"{p} exists (an inversion saved earlier): use it as the input "
                                 f"(minledits edit {p} ...), or add --force to overwrite it")
        refuse_output(p, args.force, name=names[key])


def check_outputs(args, names=OUTPUTS) -> list[tuple[str, Path]]:
    """Before any work: outputs() and refuse_existing(), and each folder takes a new file. Returns outputs()."""
    named = outputs(args, names)
    refuse_existing(args, named, names)
    for key, p in named:
        require_writable(p, names[key])
    return named


def inversion_settings(args, default_size: int) -> InversionSettings:
    """The inversion options of args (resolved) as settings. Not given: the size is the model's, the skip the
    method's share of the steps (the sampler's, InversionSettings; Prompt-to-Prompt's own)."""
    s = {k: getattr(args, k) for k in store.SETTINGS}
    if s["keep_last_noise"] and s["zero_noise_steps"] is not None:
        raise MinleditsError("--zero-noise-steps and --keep-last-noise: --keep-last-noise keeps every noise map, "
                             "zeroing none; give one of them")
    if s["skip"] is None and getattr(args, "method", None) == "p2p":
        s["skip"] = p2p.default_skip(s["steps"], s["sampler"])
    return InversionSettings(**{**s, "size": default_size if s["size"] is None else s["size"]})


def model_to_load(inv, given=None, source="the inversion") -> str:
    """The model to read for `inv`: the one the user named (given), else minledits' own default or random-tiny when
    the inversion was made with one of them. The name recorded in a file is never read by itself (a file from
    someone else could name any local path or Hub repository): it is a check (check_made_with) and a suggestion."""
    if given:
        return given
    if inv.model_id in (DEFAULT_MODEL, tiny.NAME):
        return inv.model_id
    named = shlex.quote(inv.model_id) if len(inv.model_id) <= 200 and inv.model_id.isprintable() else "MODEL"
    raise InversionFileError(f"{source} was made with model {shorten(inv.model_id)}; minledits loads only a model "
                             f"you name: add --model {named} if you trust it")


def read_image(path) -> Image.Image:
    """The picture at path, RGB; a one-line MinleditsError when it cannot be read."""
    try:
        return open_rgb(path)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise MinleditsError(f"cannot read image {path}: {getattr(e, 'strerror', None) or e}") from e


def options_given(args, names) -> dict:
    """The options among `names` that the command line gave (not None), by name."""
    return {k: getattr(args, k) for k in names if getattr(args, k) is not None}


def check_made_with(inv: Inversion, sd=None, source="the inversion", **settings) -> None:
    """Refuse an inversion made with other settings than those given (e.g. size=512), or with another model than sd."""
    H, W = inv.image.shape[-2:]
    for k, v in settings.items():
        if v != (made := getattr(inv.settings, k)):
            raise InversionFileError(f"{source} was made with {k}={shorten(made)} ({W}x{H} px), not {shorten(v)}: "
                                     "leave the option out, or invert again")
    if sd is not None:
        inv.check_model(sd, source)


def resolve_inversion_options(args) -> None:
    """The inversion options of args given their defaults, --batch-size checked."""
    resolve(args, INVERT)
    if args.batch_size < 1:
        raise MinleditsError(f"--batch-size must be >= 1, got {args.batch_size}")


def inversion_of(args, cache: dict, settings=None, check_model=lambda sd: None):
    """(model, Inversion) of args.input: an inversion file is read and checked; an image is inverted with `settings`
    (by default inversion_settings'), after check_model(model) (an edit's checks that need the model)."""
    if is_inversion_file(args.input):
        inv = store.load(args.input)
        check_made_with(inv, source=args.input, **options_given(args, store.SETTINGS))
        sd = model_of(args, cache, model_to_load(inv, args.model, args.input))
        check_kind(args, sd, sampler_given=False)
        check_made_with(inv, sd, source=args.input)
        return sd, inv
    image = read_image(args.input)
    sampler_given = getattr(args, "sampler", None) is not None
    resolve_inversion_options(args)
    sd = model_of(args, cache)
    check_kind(args, sd, sampler_given)
    settings = settings or inversion_settings(args, sd.default_size)
    check_model(sd)
    key = (id(sd), str(args.input), settings)
    if key not in cache:
        with bar(args, "invert", settings.steps - settings.skip) as b:
            cache[key] = invert(sd, image, batch_size=args.batch_size,
                                callback=lambda done, total: b.update(done - b.n), **settings.dict())
    return sd, cache[key]


def run_edit(args, sd, inv, target_prompt, concepts, trace=None, desc="edit", user_mask=None):
    """The edited image (PIL), with progress bars for the edit and the decoding."""
    if args.method == "flowedit":  # cmd_flowedit runs it: it edits the picture, not an inversion
        raise MinleditsError("--method flowedit edits the image itself, not an inversion: run minledits edit on the "
                             "picture")
    if args.method == "rf-inversion":  # cmd_rfinversion runs it, on its own inversion
        raise MinleditsError("--method rf-inversion edits its own inversion: run minledits edit --method rf-inversion "
                             "on the picture or on its inversion file")
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
    return decoded(args, sd, w0)


def decoded(args, sd, w0):
    """The picture (PIL) of latents w0, with a progress bar."""
    with bar(args, "decode", 1) as b:
        im = decode(sd, w0)
        b.update()
    return im


def spec(c) -> str:
    """A concept in the -e syntax, every option spelt out."""
    opts = [f"{k}={getattr(c, k)}" for k in ("scale", "threshold", "warmup", "cooldown", "weight")]
    return ("-" if c.reverse else "") + c.prompt + ":" + ",".join(o for o in opts if not o.endswith("=None"))


def shown(text: str) -> str:
    """text with the bytes of a non-UTF-8 file name (surrogates, from os.fsdecode) as \\xNN: printable, storable."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate no file name decodes to
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def made_with(args, sd, inv) -> dict:
    """What decides a picture's pixels besides the method: the model (and the weights' --revision, --variant,
    --prediction-type and --vae where given), device, dtype, the inversion's settings, and --batch-size where this
    run inverts an image (an inversion file's tensors are made already)."""
    batch = {} if is_inversion_file(args.input) else {"batch_size": args.batch_size}
    return dict(model_made_with(args, sd), **inv.settings.dict(), **batch)


def model_made_with(args, sd) -> dict:
    """The model, the options its weights were read with where given (--revision, ..., --no-t5, --offload-text),
    device and dtype."""
    weights = {k: str(getattr(args, k)) for k in MODEL_OPTIONS if getattr(args, k, None) is not None}
    sd3 = {k: True for k in TEXT_OPTIONS if getattr(args, k, None)}
    return dict(model=sd.model_id, **weights, **sd3, device=sd.device.type, dtype=dtype_name(sd.dtype))


def write_png(im, path, record: dict, argv: list | None = None) -> None:
    """im as a PNG at path, atomically, with `record` as JSON ("minledits") and, given argv, the command line that
    makes it again ("parameters": `minledits ARGV`, a non-UTF-8 file name's odd bytes as \\xNN)."""
    info = PngInfo()
    info.add_text("minledits", json.dumps(record))
    if argv is not None:
        info.add_text("parameters", shown("minledits " + shlex.join(argv)))
    with atomic(path) as tmp:
        im.save(tmp, format="PNG", pnginfo=info)


def save_png(im, path, args, sd, inv, concepts, idle=None):
    """The PNG of an edit (a reconstruction where concepts is None) with every parameter that decides its pixels
    (not where it was written). A non-UTF-8 input name round-trips in the JSON (os.fsencode of its "input").
    idle: {concept: why it never acted}, JSON only."""
    command, p = "reconstruct" if concepts is None else "edit", made_with(args, sd, inv)
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
    write_png(im, path, dict(command=command, input=str(args.input), fingerprint=sd.fingerprint, **p,
                             **({"idle_concepts": idle} if idle else {})), [command, str(args.input), *to_argv(p)])


def finish(start, text, model=None, note=""):
    noise = " (random-tiny: noise)" if model == tiny.NAME else ""
    line = shown(f"{text} in {time.time() - start:.1f} s{noise}{note}")  # a name's control characters escaped: one line
    print("".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in line))


def one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.errno in FULL:
        text = f"cannot write {e.filename or 'a file'}: {FULL[e.errno]} ({e.strerror}): free some space and run again"
    elif isinstance(e, OSError) and e.filename:
        text = f"{e.filename}: {e.strerror}"
    elif isinstance(e, (MinleditsError, ValueError, UsageError)):
        text = str(e).split(": error: ")[-1] if isinstance(e, UsageError) else str(e)
    else:
        text = f"{type(e).__name__}: {e} (unexpected: --verbose shows where)"
    return " ".join(text.split())


def report(e: BaseException, verbose: bool, what: str = "error") -> None:
    """A failure on stderr: `minledits: WHAT: its message` in one line, after its traceback with --verbose."""
    print("".join(traceback.format_exception(e)) if verbose else "", end="", file=sys.stderr)
    print(shown(f"minledits: {what}: {one_line(e)}"), file=sys.stderr)


def check_text(args):
    """Prompts are text: a byte that is not UTF-8 (from the shell) would fail in the tokenizer, after the loading."""
    texts = [("--source-prompt", args.source_prompt), ("--target-prompt", getattr(args, "target_prompt", None)),
             ("--negative-prompt", getattr(args, "negative_prompt", None))]
    for flag, text in texts + [("-e", c) for c in getattr(args, "concepts", None) or []]:
        try:
            (text or "").encode("utf-8")
        except UnicodeEncodeError:
            raise MinleditsError(f"{flag} {shorten(text)} is not UTF-8 text: write it in UTF-8") from None


def check_method_options(args) -> None:
    """An option of another method than --method's (METHOD_OPTIONS), given otherwise than its default, is refused
    before any work: it would be ignored without a word."""
    for flags, default, _, options in EDIT + INVERT:
        key, value = dest(flags, options), getattr(args, dest(flags, options), None)
        owners = [m for m, keys in METHOD_OPTIONS.items() if key in keys]
        if owners and args.method not in owners and value is not None and value != default:
            what = "concepts (-e)" if key == "concepts" else flags[-1]
            raise MinleditsError(f"--method {args.method} takes no {what}: it is an option of --method "
                                 f"{' and '.join(owners)}; leave it out")


def concepts_of(args):
    """The concepts of an edit (Prompt-to-Prompt: none; reconstruct: None), every option checked before any work;
    for --method p2p on an image, its source prompt too (an inversion file's is checked when it is read)."""
    if getattr(args, "method", None) == "flowedit":
        return flowedit_options(args)
    if getattr(args, "method", None) == "rf-inversion":
        return rf_options(args)
    resolve(args, EDIT)
    check_text(args)
    if args.cmd == "reconstruct" and args.gamma is not None:
        raise MinleditsError("reconstruct takes no --gamma: RF-Inversion regenerates with minledits edit --method "
                             "rf-inversion")
    if args.cmd == "reconstruct":
        return None
    if args.cmd == "edit":
        check_method_options(args)
    if args.method == "leditspp":
        return leditspp.check_options(args.concepts or [], args.mask, None, args.guidance_rescale, None, None)
    if args.method == "ledits":
        return ledits.check_options(args.target_guidance, args.concepts or [], args.momentum_scale, args.momentum_beta)
    p2p.check_options(None if is_inversion_file(args.input) else args.source_prompt or "", args.target_prompt,
                      args.target_guidance, args.cross_replace, args.self_replace, args.reweight, args.local_blend)
    return []


def flowedit_options(args) -> list:
    """--method flowedit's options checked before any work as far as they can be without the model (those whose
    defaults are the model's, FLOWEDIT_SD3 and FLOWEDIT_FLUX, stay None where not given: flowedit_settings), and the
    input an image; what only an inversion uses is refused. No concepts: []."""
    if args.cmd not in ("edit", "sweep"):
        raise MinleditsError(f"--method flowedit edits one image without an inversion: {args.cmd} does not run it; "
                             "use minledits edit (or batch, sweep)")
    if given := [flag for key, flag in NO_INVERSION.items() if getattr(args, key, None) not in (None, False)]:
        raise MinleditsError(f"--method flowedit takes no {given[0]}: it edits the image itself, without an "
                             "inversion (the steps it edits are --n-max); leave it out")
    resolve(args, [row for row in EDIT + INVERT if dest(row[0], row[3]) not in {*NO_INVERSION, *FLOWEDIT_SD3}])
    check_text(args)
    check_method_options(args)
    if is_inversion_file(args.input):
        raise MinleditsError(f"--method flowedit edits an image, and {args.input} is an inversion file: give the "
                             "picture itself (FlowEdit needs no inversion)")
    check_size(args.size, 16)
    return []


def check_size(size: int | None, multiple: int) -> None:
    """--size refused in one line unless None or a multiple of `multiple` (at least that)."""
    if size is not None and not (size >= multiple and size % multiple == 0):
        raise MinleditsError(f"--size must be a multiple of {multiple} (at least {multiple}), got {size}")


def flowedit_settings(args, sd) -> dict:
    """flowedit.edit's options of args (checked before the model by flowedit_options), those not given the model's
    defaults (FLOWEDIT_SD3; FLOWEDIT_FLUX), all checked against each other and the model in one line; the size the
    model's where not given."""
    flux = isinstance(sd, Flux)
    for key, value in (FLOWEDIT_FLUX if flux else FLOWEDIT_SD3).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    check_size(args.size, 16 if flux else 64)
    if flux and not sd.guidance_embeds:
        raise MinleditsError(f"--method flowedit on FLUX steers by FLUX.1-dev's guidance embedding (--source-guidance, "
                             f"--target-guidance), which {shorten(str(sd.model_id))} lacks (as FLUX.1-schnell): use "
                             "FLUX.1-dev, or --method leditspp on a flow inversion")
    if flux and args.negative_prompt:
        raise MinleditsError("--negative-prompt: FlowEdit on FLUX has no unconditional branch (FLUX.1 is guided by "
                             "its guidance embedding, one row per side): leave it out")
    names = {"steps": "--steps", "n_max": "--n-max", "n_min": "--n-min", "n_avg": "--n-avg", "seed": "--seed"}
    try:
        flowedit.check_options(args.steps, args.n_max, args.n_min, args.n_avg, args.source_guidance,
                               args.target_guidance, args.seed, {})
    except ValueError as e:
        text = str(e)
        for key, flag in names.items():
            text = text.replace(f"{key} (", f"{flag} (").replace(f"{key} must", f"{flag} must")
        raise MinleditsError(text) from None
    return dict(source_prompt=args.source_prompt, target_prompt=args.target_prompt, steps=args.steps,
                n_max=args.n_max, n_min=args.n_min, n_avg=args.n_avg, source_guidance=args.source_guidance,
                target_guidance=args.target_guidance, seed=args.seed, negative_prompt=args.negative_prompt,
                size=sd.default_size if args.size is None else args.size, keep_aspect=args.keep_aspect)


def read_user_mask(args):
    """The --user-mask picture (None without one), checked against the input's size before any work: an image's
    size, refused otherwise; an inversion file's picture (preprocessed: the image it was made from may be of another
    size, and then lines up too) warned of in one line otherwise."""
    if args.user_mask is None:
        return None
    try:
        picture = open_rgb(require_regular(args.user_mask, "--user-mask"))
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise MinleditsError(f"cannot read --user-mask {args.user_mask}: {getattr(e, 'strerror', None) or e}") from e
    try:
        inversion = store.load(args.input) if is_inversion_file(args.input) else None
        size = open_rgb(args.input).size if inversion is None else tuple(inversion.image.shape[:-3:-1])
    except (OSError, ValueError, Image.DecompressionBombError, MinleditsError):
        return picture  # inversion_of says why the input cannot be read
    mask = f"--user-mask {args.user_mask} is {picture.width}x{picture.height} px"
    if size == picture.size:
        return picture
    if inversion is None:
        raise MinleditsError(f"{mask}, the input {size[0]}x{size[1]}: draw the mask on the input image")
    user_mask_of(args, picture, inversion)
    how = "resized" if inversion.settings.keep_aspect else "centre-cropped and resized"
    print(f"minledits: warning: {mask}, the inversion's picture {size[0]}x{size[1]}: it is {how} to that, which "
          "lines up only if it was drawn on the image the inversion was made from", file=sys.stderr)
    return picture


def user_mask_of(args, picture, inv):
    """The --user-mask picture as the mask of an edit of inv (leditspp.user_mask), or one line why it cannot line up
    with the inversion's picture."""
    try:
        return leditspp.user_mask(picture, inv)
    except ValueError:
        keep = " (made with --keep-aspect)" if inv.settings.keep_aspect else ""
        raise MinleditsError(f"--user-mask {args.user_mask} is {picture.width}x{picture.height} px, which cannot line "
                             f"up with the inversion's picture, {inv.image.shape[-1]}x{inv.image.shape[-2]} px{keep}: "
                             "draw the mask on the input image") from None


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


# --------------------------------------------------------------------------------------------- commands
def cmd_download(args):
    start = time.time()
    resolve(args, COMMON)
    if args.offload_text:
        raise MinleditsError("--offload-text is an option of running a model, not of download; leave it out")
    if args.model == tiny.NAME or Path(args.model).exists():
        where = "built on the fly" if args.model == tiny.NAME else "local"
        return print(f"{args.model} is {where}: nothing to download")
    bars_were_on = not are_progress_bars_disabled()
    if args.quiet:
        disable_progress_bars()
    try:
        folder = download(args.model, args.variant, args.revision, args.local_dir, t5=not args.no_t5, command=True)
    finally:
        if args.quiet and bars_were_on:
            enable_progress_bars()
    finish(start, f"downloaded {args.model} -> {folder}")


def cmd_invert(args):
    start = time.time()
    check_text(args)
    check_outputs(args)
    if is_inversion_file(args.input):
        raise MinleditsError(f"{args.input} is an inversion file already: edit or reconstruct it "
                             f"(minledits edit {shlex.quote(str(args.input))} ...)")
    if args.gamma is not None:  # an RF-Inversion, for edit --method rf-inversion
        rf_inversion_options(args)
        sd, inv = rf_inversion_of(args, {})
    else:
        sd, inv = inversion_of(args, {})
    store.save(inv, args.output)
    finish(start, f"inverted {args.input} -> {args.output} ({len(inv.zs)} steps)", sd.model_id)


def cmd_edit(args, cache=None, names=OUTPUTS):
    """edit and reconstruct: everything is checked before the work starts; the main output is written last.
    A batch passes its cache, and names: how messages name the outputs (its jobs' keys)."""
    if getattr(args, "method", None) == "flowedit":
        return cmd_flowedit(args, cache, names)
    if getattr(args, "method", None) == "rf-inversion":
        return cmd_rfinversion(args, cache, names)
    start = time.time()
    concepts = concepts_of(args)
    named = check_outputs(args, names)
    out, compare = named[0][1], next((p for key, p in named if key == "compare"), None)
    trace_files = [p for key, p in named if key == "trace"]
    picture = read_user_mask(args)
    levels = p2p.check_levels if args.method == "p2p" and args.local_blend else lambda config: None  # --local-blend's
    sd, inv = inversion_of(args, {} if cache is None else cache, check_model=lambda sd: levels(sd.unet.config))
    user_mask = None if picture is None else user_mask_of(args, picture, inv)
    idle = ledits.idle(concepts or [], len(inv.zs))
    for prompt, why in idle.items():
        print(f"minledits: warning: concept {shorten(prompt)} never acts ({why}): the edit ignores it", file=sys.stderr)
    with all_or_none([p for _, p in named], [p for key, p in named if key == "save_inversion"]):
        if args.save_inversion is not None:
            store.save(inv, args.save_inversion)
        trace = None if not trace_files else AttentionTrace(sd, inv, p2p.word_positions(
            sd.tokenizer, args.target_prompt)) if args.method == "p2p" else Trace(sd, inv)
        im = run_edit(args, sd, inv, args.target_prompt, concepts or [], trace, args.cmd, user_mask)
        if compare:
            recon = run_edit(args, sd, inv, "", [], desc="reconstruct")
            save_png(side_by_side([to_pil(inv.image)[0], recon, im]), compare, args, sd, inv, concepts, idle)
        if trace:
            trace.save(*trace_files, concepts=[spec(c) for c in concepts])
        save_png(im, out, args, sd, inv, concepts, idle)
    nothing = args.cmd == "edit" and not concepts and not (args.method != "leditspp" and args.target_prompt)
    what = "-e" if args.method == "leditspp" else "-e, no --target-prompt"
    finish(start, f"{args.cmd}: {args.input} -> {out}", sd.model_id,
           f" (nothing to edit: no {what}: a reconstruction)" if nothing else "")


def cmd_flowedit(args, cache=None, names=OUTPUTS):
    """edit --method flowedit: the image edited by FlowEdit (flowedit.py) on a rectified-flow model, no inversion;
    every option checked before the work, the PNG written last (--compare: input | edit; --trace: tools/trace.py's
    FlowTrace)."""
    start = time.time()
    flowedit_options(args)
    named = check_outputs(args, names)
    out, compare = named[0][1], next((p for key, p in named if key == "compare"), None)
    image = read_image(args.input)
    sd = model_of(args, {} if cache is None else cache)
    check_kind(args, sd)
    options = flowedit_settings(args, sd)
    x = to_tensor(image, options["size"], args.keep_aspect)
    trace_files = [p for key, p in named if key == "trace"]
    with all_or_none([p for _, p in named]):
        trace = FlowTrace(sd, x, args.steps) if trace_files else None
        im = run_flowedit(args, sd, image, options, trace)
        if compare:
            write_png(side_by_side([to_pil(x)[0], im]), compare, *flowedit_record(args, sd, options))
        if trace:
            trace.save(*trace_files)
        write_png(im, out, *flowedit_record(args, sd, options))
    finish(start, f"edit: {args.input} -> {out}", sd.model_id)


def run_flowedit(args, sd, image, options: dict, trace=None):
    """The picture (PIL) FlowEdit makes of image with `options` (flowedit_settings), with progress bars."""
    with bar(args, "edit", options["n_max"]) as b:
        w0 = flowedit.edit(sd, image, **options, callback=lambda step: (b.update(), trace and trace(step)))
    return decoded(args, sd, w0)


def flowedit_record(args, sd, options: dict) -> tuple[dict, list]:
    """(the PNG's record, the edit command line that makes it again) of a FlowEdit picture (write_png)."""
    return edit_record(args, sd, dict(model_made_with(args, sd), method="flowedit", **options))


def edit_record(args, sd, p: dict) -> tuple[dict, list]:
    """(the PNG's record, the edit command line that makes it again) of an edit of args.input whose settings are p."""
    return dict(command="edit", input=str(args.input), fingerprint=sd.fingerprint, **p), \
        ["edit", str(args.input), *to_argv(p)]


def rf_options(args) -> list:
    """--method rf-inversion's options (rf_inversion_options, and the edit's: RF_DEFAULTS where not given) checked
    before any work. No concepts: []."""
    if args.cmd not in ("edit", "sweep"):
        raise MinleditsError(f"--method rf-inversion: {args.cmd} does not run it; use minledits edit (or batch, "
                             "sweep)")
    rf_inversion_options(args)
    resolve(args, [row for row in EDIT if dest(row[0], row[3]) not in RF_UNUSED])
    check_text(args)
    check_method_options(args)
    try:  # rfinversion.edit's checks, before any work
        rfinversion.check_number("--eta", args.eta, 0, 1)
        rfinversion.check_number("--start-timestep", args.start_timestep, 0)
        rfinversion.check_number("--stop-timestep", args.stop_timestep, args.start_timestep)
        if args.guidance is not None:
            rfinversion.check_number("--guidance", args.guidance)
    except ValueError as e:
        raise MinleditsError(str(e)) from None
    return []


def rf_inversion_options(args) -> None:
    """The inversion options of RF-Inversion (edit --method rf-inversion; invert --gamma) before any work: what it
    leaves unused refused, its defaults where not given (RF_DEFAULTS; an inversion file's settings are its own,
    checked when it is read), --size and --gamma checked."""
    if given := [flag for key, flag in RF_UNUSED.items() if getattr(args, key, None) not in (None, False)]:
        raise MinleditsError(f"RF-Inversion takes no {given[0]}: its inversion is its own controlled flow (--gamma, "
                             "--steps, --seed); leave it out")
    fixed = set(RF_INVERSION) if is_inversion_file(args.input) else set()
    for key, value in RF_DEFAULTS.items():
        if getattr(args, key, None) is None and key not in fixed:
            setattr(args, key, value)
    resolve(args, [row for row in INVERT if dest(row[0], row[3]) not in {*RF_UNUSED, *fixed}])
    check_size(args.size, 64)  # an inversion's (InversionSettings)
    if args.gamma is not None:
        try:
            rfinversion.check_number("--gamma", args.gamma, 0, 1)
        except ValueError as e:
            raise MinleditsError(str(e)) from None


def cmd_rfinversion(args, cache=None, names=OUTPUTS):
    """edit --method rf-inversion: the image inverted by RF-Inversion's controlled forward ODE (or its inversion file
    read), then edited by its controlled reverse ODE (rfinversion.py) on FLUX; every option checked before the work,
    the PNG written last (--compare: input | edit; --trace: tools/trace.py's RFTrace)."""
    start = time.time()
    rf_options(args)
    named = check_outputs(args, names)
    out, compare = named[0][1], next((p for key, p in named if key == "compare"), None)
    trace_files = [p for key, p in named if key == "trace"]
    sd, inv = rf_inversion_of(args, {} if cache is None else cache)
    with all_or_none([p for _, p in named], [p for key, p in named if key == "save_inversion"]):
        if args.save_inversion is not None:
            store.save(inv, args.save_inversion)
        trace = RFTrace(sd, inv) if trace_files else None
        im = run_rfinversion(args, sd, inv, trace)
        if compare:
            write_png(side_by_side([to_pil(inv.image)[0], im]), compare, *rf_record(args, sd, inv))
        if trace:
            trace.save(*trace_files)
        write_png(im, out, *rf_record(args, sd, inv))
    finish(start, f"edit: {args.input} -> {out}", sd.model_id)


def run_rfinversion(args, sd, inv, trace=None):
    """The picture (PIL) RF-Inversion's edit makes of inv with args' options, with progress bars: the one way the
    command, sweep and the app run it; trace: a callback of each step too (RFTrace)."""
    with bar(args, "edit", inv.settings.steps) as b:
        w0 = rfinversion.edit(sd, inv, prompt=args.target_prompt, eta=args.eta, start_timestep=args.start_timestep,
                              stop_timestep=args.stop_timestep, guidance=args.guidance,
                              callback=lambda step: (b.update(), trace and trace(step)))
    return decoded(args, sd, w0)


def rf_inversion_of(args, cache: dict):
    """(model, RF-Inversion) of args.input: its inversion file read and checked (the inversion options given must be
    its own), or the image inverted by rfinversion.invert with a progress bar."""
    if is_inversion_file(args.input):
        inv = store.load(args.input)
        check_made_with(inv, source=args.input, **options_given(args, RF_INVERSION))
        sd = model_of(args, cache, model_to_load(inv, args.model, args.input))
        check_rf_model(args, sd)
        inv.check_model(sd, args.input, rf=True)
        return sd, inv
    image = read_image(args.input)
    sd = model_of(args, cache)
    check_rf_model(args, sd)
    size = sd.default_size if args.size is None else args.size
    sd.check_fits(size, size)
    options = {k: getattr(args, k) for k in RF_INVERSION} | {"size": size}
    key = (id(sd), str(args.input), "rf-inversion", *options.values())
    if key not in cache:
        with bar(args, "invert", args.steps) as b:
            cache[key] = rfinversion.invert(sd, image, **options, callback=lambda *_: b.update())
    return sd, cache[key]


def check_rf_model(args, sd) -> None:
    """RF-Inversion's model: FLUX (check_kind's message for edit), --guidance only where it has the guidance
    embedding."""
    check_kind(args, sd)
    if not isinstance(sd, Flux):
        raise MinleditsError(f"--gamma makes an RF-Inversion, which needs FLUX; {shorten(str(sd.model_id))} is "
                             f"{family(sd)}: leave --gamma out")
    if getattr(args, "guidance", None) is not None and not sd.guidance_embeds:
        raise MinleditsError(f"--guidance sets FLUX.1-dev's guidance embedding; {shorten(str(sd.model_id))} has none "
                             "(as FLUX.1-schnell, distilled to run without guidance): leave it out")


def rf_record(args, sd, inv) -> tuple[dict, list]:
    """(the PNG's record, the edit command line that makes it again) of an RF-Inversion picture (write_png): the
    inversion's settings and the edit's options, the guidance embedding's value as it ran (none on schnell)."""
    guidance = args.guidance if args.guidance is not None else sd.default_guidance if sd.guidance_embeds else None
    return edit_record(args, sd, dict(
        model_made_with(args, sd), method="rf-inversion", **{k: getattr(inv.settings, k) for k in RF_INVERSION},
        target_prompt=args.target_prompt, eta=args.eta, start_timestep=args.start_timestep,
        stop_timestep=args.stop_timestep, guidance=guidance))


def cmd_metrics(args):
    try:  # bad input is a usage error: one line, exit 2, before CLIP is loaded
        if args.text is not None and args.clip_model in ("", "none"):
            raise MinleditsError("--text is for the CLIP score, which --clip-model none leaves out: name CLIP weights "
                                 "with --clip-model, or leave --text out")
        a, b = (open_rgb(require_regular(p, "the picture")) for p in (args.a, args.b))
        found = metrics.measure(a, b)
    except (MinleditsError, OSError, ValueError, Image.DecompressionBombError) as e:
        report(e, args.verbose)
        return 2
    if clip := clip_of(args):
        found = metrics.measure(a, b, args.text, clip)
    if args.json:
        return print(metrics.to_json(found))
    print(", ".join(f"{k} {v:.4f}" for k, v in found.items() if v is not None))

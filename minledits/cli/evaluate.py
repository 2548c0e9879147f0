"""`minledits evaluate PIE_DIR -o RESULTS`: the PIE-Bench table (tools/piebench.py; the metrics: tools/scores.py).

Each entry is inverted once per inversion its methods need (DDIM for ddim+p2p; DDPM for ddpm, ddpm+p2p and ledits,
at the smallest of their skips, the others sliced as sweep does; DPM-Solver++ for leditspp) and edited by each
method; the edit is written where the benchmark's evaluation reads it, its row beside (RESULTS/rows/), and process 0
writes per_image.csv, summary.csv and summary.md from every row. A (method, entry) whose picture exists with a row
of the same settings is kept (scored again only where the metrics' settings changed): a rerun resumes. Under
torchrun the entries are shared among the processes (tools/ranks.py).
"""
import argparse
import hashlib
import importlib.util
import json
import sys
import time
import warnings
from pathlib import Path

import torch
from PIL import Image

from .. import ledits, leditspp, p2p
from ..errors import MinleditsError, shorten
from ..inversion import invert
from ..io.image import open_rgb, to_pil, to_tensor
from ..io.load import dtype_name
from ..model import decode
from ..sega import Concept
from ..tools import metrics, piebench, ranks, scores, sweep
from .commands import MODEL_OPTIONS, bar, finish, inversion_settings, model_of, one_line, report
from .options import COMMON, EDIT, INVERT, resolve, text

SAMPLER = {"ddim+p2p": "ddim", "ddpm": "ddpm", "ddpm+p2p": "ddpm", "ledits": "ddpm", "leditspp": "dpmsolver++"}
EDITOR = {"ddim+p2p": "p2p", "ddpm": "ledits", "ddpm+p2p": "p2p", "ledits": "ledits", "leditspp": "leditspp"}
EDIT_KEYS = {"p2p": ("target_guidance", "cross_replace", "self_replace"),  # the options each editor uses
             "ledits": ("target_guidance", "momentum_scale", "momentum_beta"),
             "leditspp": ("mask", "negative_prompt", "guidance_rescale")}
# DDIM + P2P as the benchmark's baseline runs it (PnPInversion's run_editing_p2p, prompt-to-prompt's notebook): 50
# steps, inverted with the conditional estimate alone (guidance 1), both rows edited at 7.5, cross-attention replaced
# for 40% of the steps, self-attention for 60%; an option given on the command line replaces its value here
BASELINE = {"steps": 50, "source_guidance": 1.0, "target_guidance": 7.5, "cross_replace": 0.4, "self_replace": 0.6}
REFUSED = {"method": "--method (give --methods)", "target_prompt": "--target-prompt (each entry's editing_prompt)",
           "source_prompt": "--source-prompt (each entry's original_prompt)", "concepts": "-e (each entry's "
           "bracketed words; --concept-options sets their options)", "sampler": "--sampler (each method's own)",
           "user_mask": "--user-mask", "trace": "--trace", "compare": "--compare", "save_inversion": "--save-inversion",
           "reweight": "--reweight", "local_blend": "--local-blend"}


def add_arguments(s):
    s.add_argument("pie_dir", metavar="PIE_DIR", help="the benchmark's data folder (mapping_file.json, "
                   "annotation_images/)")
    s.add_argument("-o", "--output", required=True, metavar="RESULTS", help="folder of the results")
    s.add_argument("--methods", default=",".join(piebench.METHODS), metavar="M1,M2,...",
                   help=f"of {', '.join(piebench.METHODS)} (default: all); a VAE reconstruction row is always added")
    s.add_argument("--limit", type=int, metavar="N", help="only the first N entries (of the chosen types)")
    s.add_argument("--types", metavar="T1,T2,...", help="only these edit types, 0 to 9 (default: all)")
    s.add_argument("--concept-options", type=text, default="", metavar="OPTS", help="options of every concept of "
                   "ledits and leditspp, e.g. scale=7,threshold=0.9 (the concepts: the target prompt's bracketed "
                   "words added, the source prompt's removed)")
    s.add_argument("--keep-source-words", action="store_true", help="do not remove the source prompt's bracketed "
                   "words (ledits, leditspp)")
    s.add_argument("--clip-model", default=metrics.CLIP_MODEL, help="CLIP weights of CLIP Whole and Edited (Hub repo "
                   f"id or folder), or none (default: {metrics.CLIP_MODEL})")
    s.add_argument("--dino-model", default=scores.DINO_MODEL, help="DINO ViT weights of the structure distance "
                   f"(Hub repo id or folder, ViTModel layout), or none (default: {scores.DINO_MODEL})")
    s.add_argument("--squeezenet", default=scores.SQUEEZENET, help="SqueezeNet 1.1 weights of LPIPS (URL or .pth "
                   "state dict), or none (default: torchvision's)")


# --------------------------------------------------------------------------------------------- checks and plan
def check_arguments(args) -> tuple[list[str], set | None]:
    """(methods, types) of the command line, refusing options the entries or methods fix; a one-line error."""
    for key, what in REFUSED.items():
        if getattr(args, key, None) not in (None, False):
            raise MinleditsError(f"evaluate takes no {what}")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods or (unknown := [m for m in methods if m not in piebench.METHODS]):
        what = f"{shorten(unknown[0])} is no method" if methods else "names no method"
        raise MinleditsError(f"--methods {shorten(args.methods)}: {what}; give some of {', '.join(piebench.METHODS)}")
    types = None if args.types is None else {t.strip() for t in args.types.split(",")}
    if types is not None and (bad := sorted(types - set(piebench.TYPES))):
        raise MinleditsError(f"--types {shorten(args.types)}: {shorten(bad[0])} is no edit type (0 to 9)")
    if args.limit is not None and args.limit < 1:
        raise MinleditsError(f"--limit must be >= 1, got {args.limit}")
    if importlib.util.find_spec("torchmetrics") is None:
        raise MinleditsError("evaluate computes the benchmark's metrics with torchmetrics: pip install "
                             "'minledits[eval]'")
    args.baseline = {k: v for k, v in BASELINE.items() if getattr(args, k) is None}  # before the defaults fill in
    resolve(args, COMMON + INVERT + EDIT)
    concept_options(args, "x")  # a bad --concept-options fails here, before any work
    return list(dict.fromkeys(methods)), types


def concept_options(args, word: str) -> dict:
    """The options --concept-options gives a concept (only those given)."""
    c = Concept.parse(f"{word}:{args.concept_options}")
    return {k: getattr(c, k) for k in ("scale", "threshold", "warmup", "cooldown", "weight")
            if f"{k}=" in args.concept_options.replace(" ", "")}


def concepts_of(args, method: str, e: piebench.Entry) -> list[dict]:
    """The concepts of ledits and leditspp: the target's bracketed words added, the source's removed."""
    if EDITOR[method] == "p2p" or method == "ddpm":
        return []
    removed = [] if args.keep_source_words else e.remove
    return [{"prompt": w, "reverse": r, **concept_options(args, w)} for ws, r in ((e.add, False), (removed, True))
            for w in ws]


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def plan(args, sd, e: piebench.Entry, methods, photo_hash, scored_with) -> tuple[dict, dict]:
    """({method: (inversion settings or None, every setting that decides the picture, its key, the key of the
    metrics' settings)}, {method: why its options refuse this entry}) of an entry."""
    base = {"model": sd.model_id, "fingerprint": sd.fingerprint, **{k: getattr(args, k) for k in MODEL_OPTIONS},
            "device": sd.device.type, "dtype": dtype_name(sd.dtype), "photo": photo_hash, "side": piebench.SIDE}
    out, refused = {piebench.VAE: (None, {**base, "method": piebench.VAE, "size": args.size or sd.default_size})}, {}
    for m in methods:
        try:
            out[m] = method_settings(args, sd, e, m, base)
        except ValueError as ex:
            refused[m] = one_line(ex)
    return {m: (s, settings, digest(settings), digest({**scored_with, "settings": digest(settings)}))
            for m, (s, settings) in out.items()}, refused


def options_of(args, m: str, e: piebench.Entry) -> argparse.Namespace:
    """The command line's options as method m runs entry e (ddim+p2p: the baseline's where not given)."""
    return argparse.Namespace(**{**vars(args), **(args.baseline if m == "ddim+p2p" else {}), "method": EDITOR[m],
                                 "sampler": SAMPLER[m], "source_prompt": e.source})


def method_settings(args, sd, e: piebench.Entry, m: str, base: dict) -> tuple:
    """(inversion settings, every setting that decides the picture) of method m on entry e, its options checked
    against the entry's prompts (a one-line ValueError)."""
    ns = options_of(args, m, e)
    s = inversion_settings(ns, sd.default_size)
    concepts = concepts_of(args, m, e)
    if EDITOR[m] == "p2p":
        p2p.check_options(e.source, e.target, ns.target_guidance, ns.cross_replace, ns.self_replace, None,
                          None, sd.dtype)
    elif EDITOR[m] == "ledits":
        ledits.check_options(args.target_guidance, concepts, args.momentum_scale, args.momentum_beta, sd.dtype)
    else:
        leditspp.check_options(concepts, args.mask, None, args.guidance_rescale, None, sd.unet.config)
    s.new_sampler(sd.schedule, (s.size // sd.latent_scale,) * 2)
    sd.check_fits(s.size, s.size)
    return s, {**base, "method": m, **s.dict(), "batch_size": args.batch_size, "target_prompt": e.target,
               **{k: getattr(ns, k) for k in EDIT_KEYS[EDITOR[m]]}, "concepts": concepts}


# --------------------------------------------------------------------------------------------- one entry
def edit_with(args, method, sd, inv, e: piebench.Entry, concepts) -> torch.Tensor:
    """w0 of the method's edit of the inversion (ddim+p2p: both rows at the target guidance, as the baseline)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "concept .* never acts")
        if EDITOR[method] == "p2p":
            o = options_of(args, method, e)
            return p2p.edit(sd, inv, e.target, o.target_guidance, o.cross_replace, o.self_replace,
                            source_guidance=o.target_guidance if method == "ddim+p2p" else None)
        if EDITOR[method] == "leditspp":
            return leditspp.edit(sd, inv, concepts=concepts, mask=args.mask, negative_prompt=args.negative_prompt,
                                 guidance_rescale=args.guidance_rescale)
        return ledits.edit(sd, inv, target_prompt=e.target, target_guidance=args.target_guidance,
                           concepts=[Concept.of(c) for c in concepts], momentum_scale=args.momentum_scale,
                           momentum_beta=args.momentum_beta)


def at_side(picture: Image.Image) -> Image.Image:
    """A picture at the benchmark's 512 x 512 (bicubic where the model ran at another size)."""
    side = piebench.SIDE
    return picture if picture.size == (side, side) else picture.resize((side, side), Image.Resampling.BICUBIC)


def inversions(args, sd, photo, todo: dict):
    """Yield (method, inversion, seconds) for the methods todo that need one: one inversion per group (sweep.shared_key:
    where the sampler slices, at its smallest skip, the others sliced by sweep.at_skip, bit-identical to their own)."""
    groups = {}
    for m, (s, *_) in todo.items():
        if s is not None:
            key = sweep.shared_key(s.dict())
            groups.setdefault(key, []).append((m, s))
    for group in groups.values():
        first = min(group, key=lambda t: t[1].skip)[1]
        start = time.time()
        inv = invert(sd, photo, batch_size=args.batch_size, **first.dict())
        took, sliced = time.time() - start, {first.skip: inv}
        for m, s in group:
            start = time.time()
            if s.skip not in sliced:
                sliced[s.skip] = sweep.at_skip(sd, inv, s.skip, args.batch_size)
            yield m, sliced[s.skip], took + time.time() - start


def run_entry(args, sd, scorer, e: piebench.Entry, planned: dict, states: dict) -> dict:
    """Edit and score the methods of one entry that are not kept; write each picture and row. Returns
    {method: why it failed}."""
    photo = open_rgb(e.photo(args.pie_dir))
    if photo.size != (piebench.SIDE, piebench.SIDE):
        why = f"{piebench.entry_name(e.id)}: the photo is {photo.width}x{photo.height} px, the benchmark's are 512x512"
        return dict.fromkeys(planned, why)
    mask, failed = piebench.decode_mask(list(e.mask)), {}
    redo = {m: planned[m] for m, state in states.items() if state == "redo"}
    made = {}
    if piebench.VAE in redo:
        start = time.time()
        with torch.inference_mode():
            x = to_tensor(photo, redo[piebench.VAE][1]["size"])
            made[piebench.VAE] = (to_pil(sd.decode(sd.encode(x.to(sd.device, sd.dtype))))[0], time.time() - start)
    try:
        for m, inv, took in inversions(args, sd, photo, {m: t for m, t in redo.items() if m != piebench.VAE}):
            try:
                start = time.time()
                made[m] = (decode(sd, edit_with(args, m, sd, inv, e, planned[m][1]["concepts"])),
                           took + time.time() - start)
            except Exception as ex:  # this method fails for this entry; the others go on
                failed[m] = f"{piebench.entry_name(e.id)}, {m}: {one_line(ex)}"
    except Exception as ex:
        failed.update({m: f"{piebench.entry_name(e.id)}, {m}: {one_line(ex)}" for m in redo if m not in made})
    for m, state in states.items():
        if m in failed or state == "kept":
            continue
        _, settings, key, scored_key = planned[m]
        png, record = piebench.result_path(args.output, m, e), piebench.record_path(args.output, m, e)
        if m in made:
            picture, seconds = made[m]
            piebench.write_result(at_side(picture), png, {"command": "evaluate", "id": e.id, **settings})
        else:  # "rescore": the picture is kept, the metrics' settings changed
            seconds = piebench.kept(args.output, m, e, key)["seconds"]
        start = time.time()
        found = scorer.score(photo, piebench.scored(open_rgb(png)), mask, e.target)
        piebench.write_row(record, {"method": m, "id": e.id, "editing_type_id": e.edit_type, **found,
                                    "seconds": round(seconds, 3), "metric_seconds": round(time.time() - start, 3),
                                    "settings": key, "scored_with": scored_key})
    return failed


def state_of(args, m, e, planned) -> str:
    """kept (picture and row of these settings and metrics), rescore (the picture kept, other metrics) or redo."""
    row = piebench.kept(args.output, m, e, planned[m][2])
    return "redo" if row is None else "kept" if row.get("scored_with") == planned[m][3] else "rescore"


# --------------------------------------------------------------------------------------------- the command
def plan_entries(args, sd, entries, methods, scored_with, bad) -> tuple[list, dict, dict]:
    """(the entries with work left: (entry, plan, states), {(method, id): why refused}, {(method, id): settings key});
    an entry whose photo cannot be read goes to bad."""
    todo, failed, keys = [], {}, {}
    for e in entries:
        try:
            planned, refused = plan(args, sd, e, methods, sweep.file_hash(e.photo(args.pie_dir)),
                                    {**scored_with, "mask": list(e.mask), "text": e.target})
        except OSError as ex:  # the photo cannot be read
            bad[e.id] = f"{piebench.entry_name(e.id)}: {one_line(ex)}"
            continue
        failed.update({(m, e.id): f"{piebench.entry_name(e.id)}, {m}: {why}" for m, why in refused.items()})
        keys.update({(m, e.id): t[2] for m, t in planned.items()})
        states = {m: state_of(args, m, e, planned) for m in planned}
        if any(s != "kept" for s in states.values()):
            todo.append((e, planned, states))
    return todo, failed, keys


def write_tables(args, out: Path, entries, methods, keys, failed, notes) -> list[dict]:
    """per_image.csv, summary.csv and summary.md from every kept row (process 0); the rows."""
    rows = [row for m in [piebench.VAE, *methods] for e in entries if (m, e.id) in keys
            and (m, e.id) not in failed and (row := piebench.kept(args.output, m, e, keys[m, e.id])) is not None]
    piebench.write_rows(out / "per_image.csv", rows)
    piebench.write_summary(out / "summary.csv", out / "summary.md", piebench.summary(rows, [piebench.VAE, *methods]),
                           notes)
    return rows


def cmd_evaluate(args):
    start = time.time()
    try:
        methods, types = check_arguments(args)
    except (MinleditsError, ValueError) as e:  # bad input: one line, exit 2, before any work
        report(e, args.verbose)
        return 2
    entries, bad = piebench.read(args.pie_dir, types, args.limit)
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise MinleditsError(f"-o {out} exists and is not a folder: name a folder (made if missing)")
    rank, world = ranks.init(args.device or "auto")
    sd = model_of(args, {})
    scorer = scores.load(args.clip_model, args.dino_model, args.squeezenet, sd.device)
    scored_with = {"clip": scorer.clip is not None and args.clip_model, "dino": scorer.dino is not None and
                   args.dino_model, "lpips": scorer.lpips is not None and args.squeezenet}
    todo, failed, keys = plan_entries(args, sd, entries, methods, scored_with, bad)
    if rank == 0:
        for why in scorer.notes if not args.quiet else []:
            print(f"minledits: note: {why}", file=sys.stderr)
        for why in [*bad.values(), *failed.values()]:
            print(f"minledits: left out: {why}", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    ranks.barrier()
    mine, done = sweep.shares(todo, rank, world), 0
    with bar(args, "evaluate", len(mine), unit="image", leave=True) as b:
        for e, planned, states in mine:
            try:
                found = run_entry(args, sd, scorer, e, planned, states)
            except Exception as ex:  # a photo that cannot be read, a full disk: this entry fails, the rest go on
                found = dict.fromkeys(states, f"{piebench.entry_name(e.id)}: {one_line(ex)}")
            for m, why in found.items():
                failed[(m, e.id)] = why
                report(MinleditsError(why), args.verbose, "failed")
            done += sum(s != "kept" for m, s in states.items() if m not in found)
            b.update()
    failed = {k: why for part in ranks.gather(failed) for k, why in part.items()}
    done = sum(ranks.gather(done))
    if rank == 0:
        rows = write_tables(args, out, entries, methods, keys, failed, scorer.notes)
        which = f" ({', '.join(sorted({k[1] for k in failed}))})" if failed else ""
        finish(start, f"evaluate: {done} rows made, {len(rows) - done} kept, {len(failed)} failed{which}, "
               f"{len(bad)} bad entries; {len(rows)} rows of {len(entries)} entries x {len(methods) + 1} methods"
               f" -> {out}", sd.model_id)
    ranks.barrier()
    ranks.done()
    return 1 if failed or bad else 0


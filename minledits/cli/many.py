"""The commands of many edits: batch (a JSON file of edits), sweep (a grid of settings) and compare (the methods
side by side on one inversion). Each checks every job, cell or method before the first UNet call and inverts an
image once for the edits that share the inversion; batch and sweep share their work among the processes of a
torchrun (ranks.py), and a rerun resumes them.
"""
import argparse
import json
import os
import shlex
import sys
import time
import traceback
from functools import partial
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .. import ledits, leditspp
from ..errors import MinleditsError
from ..inversion import InversionSettings
from ..io import store
from ..io.files import atomic
from ..io.image import to_pil, to_tensor
from ..model import dtype_name
from ..sega import Concept
from ..tools import compare, metrics, ranks, sweep
from .commands import (
    clip_of,
    cmd_edit,
    concepts_of,
    file_name,
    finish,
    inversion_of,
    label,
    model_of,
    one_line,
    outputs,
    refuse_existing,
    run_edit,
    save_png,
    shown,
    spec,
)
from .options import COMMON, EDIT, INVERT, dest, parser, resolve, to_argv


# --------------------------------------------------------------------------------------------- batch
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
            cmd_edit(job_ns)
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


# --------------------------------------------------------------------------------------------- sweep
INVERT_NAMES = [dest(flags, options) for flags, _, _, options in INVERT]
NOT_VARIED = ("concepts", "save_inversion", "trace", "compare", "user_mask")
EDIT_SETTINGS = ("method", "target_prompt", "target_guidance", "momentum_scale", "momentum_beta", "mask",
                 "negative_prompt", "guidance_rescale")


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
    pp_concepts = leditspp.check_options([leditspp.concept(c) for c in args.concepts or []], args.mask, None,
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

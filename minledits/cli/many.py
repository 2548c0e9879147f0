"""The commands of many edits: batch (a JSON file of edits), sweep (a grid of settings) and compare (the methods
side by side on one inversion). Each checks every job, cell or method before the first UNet call and inverts an
image once for the edits that share the inversion; batch and sweep share their work among the processes of a
torchrun (ranks.py), and a rerun resumes them.
"""
import argparse
import json
import os
import sys
import time
from functools import partial
from pathlib import Path

from PIL import Image

from .. import flowedit, ledits, leditspp, p2p, rfinversion
from ..errors import MinleditsError, shorten
from ..inversion import InversionSettings
from ..io import store
from ..io.files import all_or_none, refuse_output, require_regular, require_writable
from ..io.image import to_pil, to_tensor
from ..sega import Concept
from ..tools import compare, metrics, ranks, sweep
from .commands import (
    MODEL_OPTIONS,
    OUTPUTS,
    RF_INVERSION,
    check_kind,
    check_method_options,
    check_rf_model,
    clip_of,
    cmd_edit,
    concepts_of,
    file_name,
    finish,
    flowedit_record,
    flowedit_settings,
    inputs_of,
    inversion_of,
    inversion_settings,
    is_inversion_file,
    made_with,
    model_of,
    one_line,
    options_given,
    outputs,
    protect,
    read_image,
    refuse_existing,
    report,
    rf_inversion_of,
    rf_record,
    run_edit,
    run_flowedit,
    run_rfinversion,
    save_png,
    spec,
    write_png,
)
from .options import COMMON, EDIT, INVERT, METHOD_OPTIONS, RF_DEFAULTS, dest, parser, resolve, to_argv

JOB_KEYS = {key: f'"{key}"' for key in OUTPUTS}  # a job's outputs in messages: its keys
JSON_KINDS = {bool: "a boolean", int: "a number", float: "a number", list: "a list", dict: "an object"}
FILE_KEYS = ("input", "output", "save_inversion", "trace", "user_mask")  # a job's file names


def file_system_name(key: str, name: str) -> str:
    """A file name from the jobs file (JSON: text) as the command line gives it under any locale: its UTF-8 bytes
    decoded as the file system decodes names (os.fsdecode; under LC_ALL=C the bytes past ASCII as surrogates), so
    that the file read or written is the one named; \\udcNN (a name that is no UTF-8, as minledits writes it in JSON)
    stands for the byte NN."""
    try:
        return os.fsdecode(name.encode("utf-8", "surrogateescape"))
    except UnicodeEncodeError:
        raise MinleditsError(f'"{key}" {shorten(name)} is no file name: it holds a lone surrogate') from None


# --------------------------------------------------------------------------------------------- batch
def job_args(i, job, defaults, base, jobs_dir: Path, outdir: Path):
    """Job i as parsed `edit` arguments; its input (and user mask) is relative to the jobs file, its outputs to
    --outdir; the model and run options it leaves open are the batch's, and only the batch's --force overwrites."""
    if not isinstance(job, dict) or "input" not in job:
        raise MinleditsError('a job is an object with at least an "input" (an image or inversion file)')
    job = {**defaults, **job}
    if "force" in job:  # --force is the batch's: a job's would be ignored
        raise MinleditsError('"force" is not an option of a job (nor of "defaults"): --force on the batch command '
                             "overwrites the outputs of every job")
    for key in FILE_KEYS:
        if not isinstance(job.get(key, ""), str) and (key == "input" or job[key] is not None):
            raise MinleditsError(f'"{key}" must be a file name (a string), '
                                 f'not {JSON_KINDS.get(type(job[key]), "null")}')
        if isinstance(job.get(key), str):
            job[key] = file_system_name(key, job[key])
    inp = jobs_dir / job.pop("input")
    if job.get("user_mask") is not None:
        job["user_mask"] = str(jobs_dir / job["user_mask"])
    # os.path.join keeps what Path would drop: "" and "sub/" must be refused as outputs, not read as the folder
    out = job.pop("output", None)
    out = os.path.join(outdir, f"{i:03d}-{inp.stem}.png" if out is None else out)
    job.update({k: os.path.join(outdir, job[k]) for k in ("save_inversion", "trace") if job.get(k) is not None})
    batch = {dest(flags, o): getattr(base, dest(flags, o)) for flags, _, _, o in COMMON}
    try:
        job_ns = parser().parse_args(["edit", str(inp), "-o", out, *to_argv({**batch, **job, "force": base.force})])
    except SystemExit as e:  # "help": true printed the help; a batch goes on
        raise MinleditsError('"help" is not an option of a job') from e
    return job_ns


def check_job(args, outdir: Path, allow_outside: bool):
    """(outputs, skip) of a parsed job, checked before the batch starts: no output is an input or no regular file
    (a failure, even where the main output exists); skip if its main output exists (a rerun resumes); else its
    input, options and the rest of its outputs must be fine."""
    named = outputs(args, JOB_KEYS)
    for key, p in named:  # resolve(): after "..", symbolic links
        if not (allow_outside or p.resolve().is_relative_to(outdir.resolve())):
            raise MinleditsError(f"{JOB_KEYS[key]} {p} is outside --outdir {outdir}: write inside it, "
                                 "or add --allow-outside-outdir")
    protect(args, named, JOB_KEYS)
    if named[0][1].exists() and not args.force:
        return named, True
    try:
        open(require_regular(args.input), "rb").close()
    except OSError as e:
        raise MinleditsError(f"cannot read input {args.input}: {e.strerror}") from e
    concepts_of(args)
    refuse_existing(args, named, JOB_KEYS)
    for key, p in named:
        writable(p, JOB_KEYS[key])
    return named, False


def writable(p: Path, name: str) -> None:
    """require_writable for a job's output p before any work; where its folder is missing (the batch makes it), the
    first missing folder on its way must be one that can be made."""
    missing = [f for f in (p.parent, *p.parent.parents) if not os.path.lexists(f)]
    if missing:
        require_writable(missing[-1], f"{name} {p}'s folder")
    else:
        require_writable(p, name)


def job_name(i, job) -> str:
    inp = job.get("input") if isinstance(job, dict) else None
    return f"job {i}" + (f" ({inp})" if isinstance(inp, str) else "")


def check_jobs(args, jobs, defaults):
    """Every job checked before the first one runs: ([(i, args, skip)], {i: why it cannot run})."""
    ready, failed, owners, parsed = [], {}, {}, {}
    for i, job in enumerate(jobs):
        try:
            parsed[i] = job_args(i, job, defaults, args, Path(args.jobs).parent, Path(args.outdir))
        except Exception as e:
            failed[i] = e
    read = [args.jobs, *(p for job_ns in parsed.values() for p in inputs_of(job_ns))]
    for i, job_ns in parsed.items():
        job_ns.reads = read  # the batch's inputs: the jobs file and every job's, never written over by any job
        try:
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


def read_jobs(path) -> tuple[dict, list]:
    """(defaults, jobs) of a jobs file, or one line why it cannot serve."""
    try:
        jobs = json.loads(require_regular(path, "the jobs file").read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:  # a list of edits in text, an empty file
        raise MinleditsError(f"{path} is not JSON ({e.msg} at line {e.lineno}, column {e.colno}): a jobs file is "
                             '[{"input": "a.jpg", "output": "a.png", ...}, ...] (minledits batch --help)') from None
    except (OSError, ValueError) as e:
        raise MinleditsError(f"cannot read {path}: {one_line(e)}") from e
    jobs = {"jobs": jobs} if isinstance(jobs, list) else jobs
    if not (isinstance(jobs, dict) and isinstance(jobs.get("jobs"), list)
            and isinstance(jobs.get("defaults", {}), dict)):
        raise MinleditsError(f'{path}: expected [job, ...] or {{"defaults": {{...}}, "jobs": [job, ...]}}')
    if not jobs["jobs"]:
        raise MinleditsError(f"{path}: no jobs (an empty list): list the edits to make")
    return jobs.get("defaults", {}), jobs["jobs"]


def cmd_batch(args):
    start = time.time()
    defaults, jobs = read_jobs(args.jobs)
    if os.path.lexists(args.outdir) and not os.path.isdir(args.outdir):
        raise MinleditsError(f"--outdir {args.outdir} exists and is not a folder: name a folder (made if missing)")
    try:  # only once the jobs file is good: a bad one leaves no folder behind
        Path(args.outdir).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MinleditsError(f"cannot make --outdir {args.outdir}: {one_line(e)}") from e
    cache = {}
    rank, world = ranks.init(args.device or "auto")
    ready, failed = check_jobs(args, jobs, defaults)
    for i in sorted(failed) if rank == 0 else []:  # every process checked the same: process 0 says it
        report(failed[i], args.verbose, f"{job_name(i, jobs[i])} failed")
    done, skipped = 0, sum(skip for _, _, skip in ready)
    ranks.barrier()  # every process has checked the same files before any writes
    for i, job_ns, _ in sweep.shares([r for r in ready if not r[2]], rank, world):
        try:
            for _, p in outputs(job_ns):
                p.parent.mkdir(parents=True, exist_ok=True)
            cmd_edit(job_ns, cache, JOB_KEYS)
            done += 1
        except Exception as e:
            failed[i] = e
            report(e, args.verbose, f"{job_name(i, jobs[i])} failed")
    done, failed = sum(ranks.gather(done)), {i for part in ranks.gather(sorted(failed)) for i in part}
    which = f" ({', '.join(f'job {i}' for i in sorted(failed))})" if failed else ""
    if rank == 0:
        finish(start, f"batch: {done} done, {skipped} skipped (output exists), {len(failed)} failed{which}"
               f" -> {args.outdir}", args.model)
    ranks.done()
    return 1 if failed else 0


# --------------------------------------------------------------------------------------------- sweep
INVERT_NAMES = [dest(flags, options) for flags, _, _, options in INVERT]
NOT_VARIED = ("concepts", "save_inversion", "trace", "compare", "user_mask")
EDIT_SETTINGS = [dest(flags, o) for flags, _, _, o in EDIT if dest(flags, o) not in NOT_VARIED]
FLOWEDIT_KEY = ("flowedit",)  # the group of FlowEdit's cells: no inversion to share
RF_KEY = ("rf-inversion",)    # RF-Inversion's groups start so: its own inversion, of their options
RF_EDIT = ("target_prompt", "eta", "start_timestep", "stop_timestep", "guidance")  # rfinversion.edit's (the CLI's)
BOOLS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def vary_value(options: dict, text: str):
    """One --vary value of the option with these argparse options, from its text; a one-line ValueError."""
    kind = bool if options.get("action") else options.get("type", str)
    try:
        value = BOOLS[text.lower()] if kind is bool else kind(text)
        if value in options.get("choices", [value]):
            return value
    except (KeyError, ValueError):
        pass
    what = {bool: "true or false", int: "an integer", float: "a number"}.get(kind, "one of " + ", ".join(
        options.get("choices", [])))
    raise ValueError(f"{shorten(text)} is not {what}")


def vary_types() -> dict:
    """--vary's option names and their parsers: every inversion and edit option but those naming files."""
    return {dest(flags, o): partial(vary_value, o) for flags, _, _, o in INVERT + EDIT
            if dest(flags, o) not in NOT_VARIED}


def sweep_cell(args, cell):
    """The edit arguments of a cell: the sweep's, with the cell's values."""
    c = argparse.Namespace(**vars(args))
    for key, value in cell.items():
        if m := sweep.CONCEPT_KEY.fullmatch(key):
            c.concepts = sweep.set_concept_option(c.concepts or [], int(m[1]), m[2], value)
        else:
            setattr(c, key, value)
    return c


def sweep_source(args, cache, from_file: bool) -> tuple:
    """(model, the inversion file's inversion or None, what every cell shares that decides its pixels: the input
    file's content, the model's name, weights (fingerprint) and loading options, the device and dtype)."""
    sd, inv = inversion_of(args, cache) if from_file else (model_of(args, cache), None)
    return sd, inv, {"input": sweep.file_hash(args.input), "model": sd.model_id, "fingerprint": sd.fingerprint,
                     **{k: getattr(args, k) for k in MODEL_OPTIONS}, "device": sd.device.type,
                     "dtype": str(sd.dtype).removeprefix("torch.")}


def check_varied(c, keys) -> None:
    """A varied option the cell's method ignores (METHOD_OPTIONS) is refused: its cells would differ in name only;
    so is an option of another method given once (check_method_options, as edit refuses it)."""
    for key in keys:
        name = "concepts" if sweep.CONCEPT_KEY.fullmatch(key) else key
        owners = [m for m, names in METHOD_OPTIONS.items() if name in names]
        if owners and c.method not in owners:
            raise ValueError(f"--vary {key}: --method {c.method} ignores it (an option of --method "
                             f"{' and '.join(owners)}): leave it out")
    check_method_options(c)


def check_p2p(c, src, sd=None) -> None:
    """Prompt-to-Prompt's options (p2p.check_options) against the source prompt src (None: not known yet) and, given
    the model sd, its dtype and, with --local-blend, its UNet's levels: what p2p.edit would refuse at its first step."""
    p2p.check_options(src, c.target_prompt, c.target_guidance, c.cross_replace, c.self_replace, c.reweight,
                      c.local_blend, *([sd.dtype] if sd else []))
    if sd is not None and c.local_blend:
        p2p.check_levels(sd.unet.config)


def cell_concepts(c, keys):
    """A cell's concepts, its options checked as far as they can be without the model (concepts_of,
    check_varied)."""
    concepts = concepts_of(c)
    check_varied(c, keys)
    return concepts


def sweep_settings(c, concepts, sd, inv, source: dict) -> tuple[dict, tuple]:
    """(every setting that decides a cell's pixels, the key of the inversion it needs), checked as far as can be
    without UNet work: the sweep's source, an image's inversion settings and batch size (skip is none where the
    sampler slices: sweep.shared_key; inv: an inversion file's, which fixes them), every edit option and the
    concepts. A cell is kept only where its record holds all of them."""
    s = dict(source)
    if c.method == "flowedit":  # no inversion: every cell its own (concepts_of checked its options)
        check_kind(c, sd)
        options = flowedit_settings(c, sd)
        sd.check_fits(options["size"], options["size"])
        return {**s, "method": "flowedit", **options}, FLOWEDIT_KEY
    if c.method == "rf-inversion":  # its own inversion, one per group of equal inversion options (rf_options
        check_rf_model(c, sd)       # checked the rest)
        inverted = {**{k: getattr(c, k) for k in RF_INVERSION}, "size": c.size or sd.default_size}
        sd.check_fits(inverted["size"], inverted["size"])
        return {**s, "method": "rf-inversion", **inverted, **{k: getattr(c, k) for k in RF_EDIT}}, \
            RF_KEY + tuple(inverted.items())
    if inv is None:
        check_kind(c, sd, c.sampler is not None)  # on SD3 the flow sampler where none is given
        resolve(c, INVERT + COMMON)
        inverted = inversion_settings(c, sd.default_size)
        if c.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {c.batch_size}")
        side = inverted.size // sd.latent_scale  # (any latent size: FLUX's shift needs one, the check does not)
        inverted.new_sampler(sd.schedule, (side, side))  # steps past the model's schedule
        sd.check_fits(inverted.size, inverted.size)
        s.update(inverted.dict(), batch_size=c.batch_size)
    if c.method == "p2p":
        check_p2p(c, c.source_prompt if inv is None else inv.settings.source_prompt, sd)
    key = sweep.shared_key(s) if inv is None else tuple(s.items())
    return {**s, **{k: getattr(c, k) for k in EDIT_SETTINGS}, "concepts": [spec(x) for x in concepts]}, key


def sweep_outputs(args, vary, out: Path, count: int) -> None:
    """Every file a sweep of `count` cells writes, checked before the model is read: none an input or no regular
    file; the sheets, table and plot only over a sweep's own (or with --force); the folders take new files."""
    for n in range(count):
        for p in sweep.cell_paths(out, n):
            refuse_output(p, True, inputs_of(args))
    old = sweep.read_json(sweep.table_paths(out)["json"])
    mine = isinstance(old, dict) and old.get("format") == sweep.FORMAT
    for p in summary_paths(vary, out, count):
        refuse_output(p, True, inputs_of(args))
        if p.exists() and not (mine or args.force):
            raise ValueError(f"{p} exists and is not a sweep's: add --force, or choose another -o")
    cell_folder = out.with_suffix("")
    if os.path.lexists(cell_folder) and not cell_folder.is_dir():
        raise ValueError(f"{cell_folder} (the cells' folder) exists and is not a folder: choose another -o")
    for p in (out, *sweep.cell_paths(out, 0)[:1 if cell_folder.is_dir() else 0]):
        require_writable(p)


def sweep_grid(args, cache):
    """(vary, out, [(n, cell args, settings, group key)], todo), every cell and output checked before any UNet work:
    first what needs no model, then the rest; a cell made otherwise than this one would be (another setting, input
    content, model, device or dtype) is refused unless --force."""
    if args.trace is not None or args.compare or args.save_inversion is not None or args.user_mask is not None:
        raise ValueError("--trace, --compare, --save-inversion and --user-mask are options of edit, not of sweep")
    vary, out = sweep.parse_vary(args.vary, vary_types()), file_name(args, "output")
    if out.suffix.lower() != ".png":
        raise ValueError(f"-o {out}: the contact sheet is a .png file")
    from_file = is_inversion_file(args.input)
    if from_file and (fixed := [k for k, _ in vary if k in INVERT_NAMES]):
        raise ValueError(f"--vary {fixed[0]}: an inversion file fixes the inversion options; vary them on the image")
    grid = [sweep_cell(args, cell) for cell in sweep.grid_cells(vary)]
    if from_file and any(c.method == "rf-inversion" for c in grid):
        raise ValueError("--method rf-inversion: a sweep makes RF-Inversion's inversions from the picture: give the "
                         "picture, not an inversion file")
    concepts = [cell_concepts(c, [k for k, _ in vary]) for c in grid]
    sweep_outputs(args, vary, out, len(grid))
    sd, inv, source = sweep_source(args, cache, from_file)
    cells, todo = [], []
    for n, c in enumerate(grid):
        settings, key = sweep_settings(c, concepts[n], sd, inv, source)
        cells.append((n, c, settings, key))
        state, why = sweep.state(*sweep.cell_paths(out, n), settings)
        if state == "foreign" and not args.force:
            raise ValueError(f"{sweep.cell_paths(out, n)[0]} exists and {why}: add --force to redo it, "
                             "or choose another -o")
        if state != "done":
            todo.append(cells[-1])
    return vary, out, cells, sorted(todo, key=lambda t: str(t[3]))


def sheet_shape(vary) -> tuple[int, int]:
    """(rows, columns) of a contact sheet: the values of the first two varied keys (one key: one row)."""
    counts = [len(values) for _, values in vary]
    return (counts[0], counts[1]) if len(counts) > 1 else (1, counts[0])


def summary_paths(vary, out: Path, count: int) -> list[Path]:
    """The files a sweep of `count` cells writes besides its cells: its sheets, its table, its plot."""
    rows, cols = sheet_shape(vary)
    return [*sweep.sheet_paths(out, count // (rows * cols)), *sweep.table_paths(out).values()]


def sweep_text(c, concepts):
    """The text of a cell's CLIP score: the target prompt, else the concepts it adds."""
    return c.target_prompt or ", ".join(x.prompt for x in concepts or [] if not x.reverse) or None


def sweep_group(args, cache, out, items, skips, clip):
    """The cells of one inversion: invert once (at the smallest skip where the sampler slices), edit each, write PNG
    and record (a failed cell: neither); FlowEdit's cells (FLOWEDIT_KEY) each edit the image, RF-Inversion's (RF_KEY)
    make their own inversion once per group (sweep_alone). Returns {cell: why it failed}."""
    if items[0][3] == FLOWEDIT_KEY:
        return sweep_alone(args, cache, out, items, clip, partial(flowedit_cell, cache))
    if items[0][3][:1] == RF_KEY:
        return sweep_alone(args, cache, out, items, clip, partial(rf_cell, cache))
    s = items[0][2]  # an image's settings: the group's, but a sliceable inversion's skip is its smallest
    skip = {"skip": min(skips)} if "sampler" in s and sweep.sliceable(s["sampler"]) else {}
    inverted = InversionSettings(**{**{k: s[k] for k in store.SETTINGS}, **skip}) if "sampler" in s else None
    start = time.time()
    try:
        sd, inv = inversion_of(items[0][1], cache, inverted)
    except Exception as e:  # each of its cells fails; the other groups (and processes) go on
        report(e, args.verbose, f"the inversion of cell{'s' * (len(items) > 1)} {', '.join(str(t[0]) for t in items)}"
               " failed")
        return {n: one_line(e) for n, *_ in items}
    invert_s, failed, sliced = time.time() - start, {}, {None: inv, inv.settings.skip: inv}
    for n, c, settings, _ in items:
        png, record = sweep.cell_paths(out, n)
        png.unlink(missing_ok=True)  # a cell made otherwise (--force): never left beside this cell's record
        try:
            with all_or_none([png, record]):  # a failed cell leaves neither: the rerun redoes it
                start = time.time()
                if settings.get("skip") not in sliced:
                    sliced[settings["skip"]] = sweep.at_skip(sd, inv, settings["skip"], settings["batch_size"])
                inv_c = sliced[settings.get("skip")]
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
            report(e, args.verbose, f"cell {n} ({png}) failed")
    return failed


def sweep_alone(args, cache, out, items, clip, edit):
    """The cells that each edit the picture on their own - FlowEdit's (no inversion), RF-Inversion's (its own, made
    once per group through the cache) - each its PNG and record (a failed cell: neither). edit(cell args) -> (picture,
    the input as edited (PIL), the PNG's record and command line (write_png), seconds inverting). Returns {cell: why
    it failed}."""
    failed = {}
    for n, c, settings, _ in items:
        png, record = sweep.cell_paths(out, n)
        png.unlink(missing_ok=True)
        try:
            with all_or_none([png, record]):
                start = time.time()
                sweep.write_json(record, {"settings": settings})
                im, source, made, invert_s = edit(c)
                write_png(im, png, *made)
                found = metrics.measure(source, im, c.target_prompt or None, clip)
                sweep.write_json(record, {"settings": settings, "invert_s": round(invert_s, 3),
                                          "edit_s": round(time.time() - start - invert_s, 3),
                                          **{k: sweep.finite(v) for k, v in found.items()}})
        except Exception as e:
            failed[n] = one_line(e)
            report(e, args.verbose, f"cell {n} ({png}) failed")
    return failed


def flowedit_cell(cache, c):
    """A FlowEdit cell's edit (sweep_alone): cmd_flowedit's edit and PNG."""
    sd, image = model_of(c, cache), read_image(c.input)
    options = flowedit_settings(c, sd)
    im = run_flowedit(c, sd, image, options)
    return im, to_pil(to_tensor(image, options["size"], c.keep_aspect))[0], flowedit_record(c, sd, options), 0.0


def rf_cell(cache, c):
    """An RF-Inversion cell's edit (sweep_alone): cmd_rfinversion's inversion (shared by the cells of its group
    through the cache), edit and PNG."""
    start = time.time()
    sd, inv = rf_inversion_of(c, cache)
    invert_s = time.time() - start
    return run_rfinversion(c, sd, inv), to_pil(inv.image)[0], rf_record(c, sd, inv), invert_s


def sweep_assemble(args, vary, out, cells, kept, failed):
    """Process 0, when every cell is written or has failed: the sheets (a failed cell: a grey tile), the table (each
    cell's status: done, kept or failed, and why), the plot. kept: the numbers of the cells kept from a former run;
    failed: {number: why}."""
    keys, (R, C) = [k for k, _ in vary], sheet_shape(vary)
    first = cells[0][2]
    corner = to_pil(store.load(args.input).image if "size" not in first else
                    to_tensor(args.input, first["size"], first["keep_aspect"]))[0]
    records, sheets = [], sweep.sheet_paths(out, len(cells) // (R * C))
    for n, c, settings, _ in cells:
        png, record = sweep.cell_paths(out, n)
        found = {} if n in failed else sweep.read_json(record) or {}
        status = {"status": "failed", "error": failed[n]} if n in failed else {
            "status": "kept" if n in kept else "done"}
        records.append({"cell": n, "sheet": sheets[n // (R * C)].name, "row": n // C % R, "col": n % C,
                        "file": str(png.relative_to(out.parent)), "varied": vars_of(c, keys), **status,
                        "settings": settings, **found})
    for j, path in enumerate(sheets):
        mine = records[j * R * C:(j + 1) * R * C]
        tiles = [[sweep.text_tile(f"cell {r['cell']} failed", corner.size, "lightgrey") if r["status"] == "failed"
                  else Image.open(sweep.cell_paths(out, r["cell"])[0]).convert("RGB") for r in mine[i * C:(i + 1) * C]]
                 for i in range(R)]
        rows = [sweep.label(r["varied"], keys[:1]) for r in mine[::C]] if len(keys) > 1 else [""]
        cols = [sweep.label(r["varied"], keys[1:2] if len(keys) > 1 else keys[:1]) for r in mine[:C]]
        write_png(sweep.contact_sheet(corner, tiles, rows, cols), path, {
            "command": "sweep", "rows": rows, "columns": cols, "sheet": {k: mine[0]["varied"][k] for k in keys[2:]}})
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
    start, cache = time.time(), {}
    rank, world = ranks.init(args.device or "auto")
    try:
        vary, out, cells, todo = sweep_grid(args, cache)
    except (MinleditsError, ValueError) as e:  # bad input: one line, exit 2, before any work
        report(e, args.verbose)
        return 2
    groups = {key: [t for t in todo if t[3] == key] for key in dict.fromkeys(t[3] for t in todo)}
    rows = sum(sweep.patch_rows([t[2]["skip"] for t in g], min(t[2]["skip"] for t in g), g[0][2]["batch_size"],
                                g[0][2]["steps"]) for g in groups.values() if g[0][2].get("sampler") == "ddpm")
    if rank == 0 and not args.quiet:
        print(f"minledits: sweep of {len(cells)} cells, {len(cells) - len(todo)} done already: "
              f"{sum(key != FLOWEDIT_KEY for key in groups)} "
              f"inversion(s){f' (+{rows} UNet rows to align skips)' if rows else ''} and {len(todo)} edit(s)"
              f"{f' on {world} processes' if world > 1 else ''}", file=sys.stderr)
    out.with_suffix("").mkdir(parents=True, exist_ok=True)
    ranks.barrier()  # every process has checked the same files
    clip, failed, mine = clip_of(args) if todo else None, {}, sweep.shares(todo, rank, world)
    for key in dict.fromkeys(t[3] for t in mine):
        failed.update(sweep_group(args, cache, out, [t for t in mine if t[3] == key],
                                  [t[2].get("skip") for t in groups[key]], clip))
    failed = {n: why for part in ranks.gather(failed) for n, why in part.items()}
    if rank == 0:
        kept = {t[0] for t in cells} - {t[0] for t in todo}
        with all_or_none(summary_paths(vary, out, len(cells))):
            note = sweep_assemble(args, vary, out, cells, kept, failed)
        if not args.quiet:
            print(f"minledits: {note}", file=sys.stderr)
        which = f" (cell{'s' * (len(failed) > 1)} {', '.join(map(str, sorted(failed)))}: grey in the sheet)" \
            if failed else ""
        finish(start, f"sweep: {len(todo) - len(failed)} cells done, {len(kept)} kept, {len(failed)} failed{which} "
               f"-> {out}", args.model)
    ranks.barrier()
    ranks.done()
    return 1 if failed else 0


# --------------------------------------------------------------------------------------------- compare
P2P_OPTIONS = {"cross_replace": "--cross-replace", "self_replace": "--self-replace", "reweight": "--reweight",
               "local_blend": "--local-blend"}
FLOW_OPTIONS = {"n_max": "--n-max", "n_min": "--n-min", "n_avg": "--n-avg"}  # the FlowEdit panel's (on a flow)
RF_OPTIONS = {"gamma": "--gamma", "eta": "--eta", "start_timestep": "--start-timestep",
              "stop_timestep": "--stop-timestep", "guidance": "--guidance"}  # the RF-Inversion panel's (on FLUX)


class OptionError(ValueError):
    """An option found wrong once the model or the inversion file is read: a usage error (exit 2), before any UNet
    work."""


def compare_inputs(args):
    """(output, record, LEDITS concepts, LEDITS++ concepts, the Prompt-to-Prompt options given, FlowEdit's options
    given, RF-Inversion's options given), every input checked before any work."""
    if args.trace is not None or args.compare or args.user_mask is not None or args.method is not None \
            or args.save_inversion is not None:
        raise ValueError("--trace, --compare, --user-mask, --save-inversion and --method are options of edit: "
                         "compare runs every method")
    out = file_name(args, "output")
    if out.suffix.lower() != ".png":
        raise ValueError(f"-o {out}: the comparison is a .png file")
    given = list(options_given(args, P2P_OPTIONS))  # before concepts_of fills in the defaults
    flow_given = options_given(args, FLOW_OPTIONS)
    rf_given = rf_options(args)
    concepts = concepts_of(args)  # LEDITS' (--method is refused above: its default)
    pp_concepts = leditspp.check_options(args.concepts or [], args.mask, None, args.guidance_rescale, None, None)
    require_regular(args.input)
    compare_p2p(args, given, None if is_inversion_file(args.input) else args.source_prompt or "")
    for p in (out, out.with_suffix(".json")):
        refuse_output(p, args.force, inputs_of(args))
        require_writable(p)
    return out, out.with_suffix(".json"), concepts, pp_concepts, given, flow_given, rf_given


def rf_options(args) -> dict:
    """The RF-Inversion panel's options given ({name: value}), checked as rfinversion checks them (the others its
    defaults, RF_DEFAULTS), before any work."""
    given = options_given(args, RF_OPTIONS)
    o = {**RF_DEFAULTS, **given}
    bounds = {"gamma": (0, 1), "eta": (0, 1), "start_timestep": (0, None), "guidance": (None, None),
              "stop_timestep": (o["start_timestep"], None)}
    try:
        for k, (low, high) in bounds.items():
            if k in given or k == "stop_timestep" and "start_timestep" in given:
                rfinversion.check_number(RF_OPTIONS[k], o[k], low, high)
    except ValueError as e:
        raise ValueError(f"{e} (the RF-Inversion panel's)") from None
    return given


def check_rf(given: dict, sd) -> None:
    """RF-Inversion's options given refused where the model draws no RF-Inversion panel (it is no FLUX.1), and
    --guidance where it has no guidance embedding (schnell): an OptionError."""
    if not given:
        return
    flags, embeds = ", ".join(RF_OPTIONS[k] for k in given), getattr(sd, "guidance_embeds", None)
    if embeds is None:
        raise OptionError(f"{flags} (the RF-Inversion panel's): RF-Inversion runs on FLUX.1, and "
                          f"{shorten(str(sd.model_id))} is not one: leave {flags} out")
    if "guidance" in given and not embeds:
        raise OptionError("--guidance (the RF-Inversion panel's) sets FLUX.1-dev's guidance embedding, which this "
                          "model (FLUX.1-schnell) lacks: leave it out")


def compare_p2p(args, given, src, sd=None):
    """The Prompt-to-Prompt options given (given: their names), which the Prompt-to-Prompt panel (DDPM + P2P, or
    DDIM + P2P) uses, checked (check_p2p; src None: not known yet; sd None: the model not read yet); an OptionError
    naming them."""
    if not given:
        return
    if sd is not None and sd.prediction_type == "flow":
        raise OptionError(f"{', '.join(P2P_OPTIONS[k] for k in given)}: {compare.P2P_ON_FLOW}: leave them out")
    try:
        check_p2p(args, src, sd)
    except ValueError as e:
        raise OptionError(f"{', '.join(P2P_OPTIONS[k] for k in given)} (the Prompt-to-Prompt panel's): {e}") from None


def compare_inversion(args, cache, given, rf_given):
    """(model, inversion, UNet image-evaluations of the inversion: 0 when read from a file); the Prompt-to-Prompt
    and RF-Inversion options given are checked against the model and the source prompt before any UNet work."""
    if is_inversion_file(args.input):
        sd, inv = inversion_of(args, cache)
        compare_p2p(args, given, inv.settings.source_prompt, sd)
        check_rf(rf_given, sd)
        return sd, inv, 0
    sd = model_of(args, cache)
    compare_p2p(args, given, args.source_prompt or "", sd)
    check_rf(rf_given, sd)
    with compare.unet_rows(sd.unet) as n:
        sd, inv = inversion_of(args, cache)
    return sd, inv, n[0]


def check_flowedit(args, sd, inv, given: dict) -> None:
    """FlowEdit's options given (given: {name: value}) checked against the inversion and the model
    (flowedit.check_options), or refused where no FlowEdit panel is drawn (an inversion of another sampler than flow,
    FLUX.1-schnell): an OptionError."""
    if not given:
        return
    flags, embeds = ", ".join(FLOW_OPTIONS[k] for k in given), getattr(sd, "guidance_embeds", None)
    if inv.settings.sampler != "flow":
        raise OptionError(f"{flags} (the FlowEdit panel's): FlowEdit runs on a rectified flow (Stable Diffusion 3, "
                          f"FLUX.1), and this is a {inv.settings.sampler} inversion: leave {flags} out")
    if embeds is False:
        raise OptionError(f"{flags} (the FlowEdit panel's): {compare.NO_EMBEDDING}: leave {flags} out")
    o = compare.flowedit_options(inv, args.target_prompt, args.target_guidance, guidance_embeds=embeds, **given)
    steps = "the inversion's" if embeds is None else f"FlowEdit's on FLUX, {o['steps']}"
    try:
        flowedit.check_options(o["steps"], o["n_max"], o["n_min"], o["n_avg"], 0.0, 0.0, 0, {})
    except ValueError as e:
        raise OptionError(f"{flags} (the FlowEdit panel's, its steps {steps}): {e}") from None


def cmd_compare(args):
    start, cache = time.time(), {}
    try:
        out, record, concepts, pp_concepts, given, flow_given, rf_given = compare_inputs(args)
    except (MinleditsError, ValueError) as e:  # bad input: one line, exit 2, before any work
        report(e, args.verbose)
        return 2
    try:
        sd, inv, inversion_rows = compare_inversion(args, cache, given, rf_given)
        check_flowedit(args, sd, inv, flow_given)
    except OptionError as e:  # found once the model or inversion file is read, still before any UNet work
        report(e, args.verbose)
        return 2
    embeds = getattr(sd, "guidance_embeds", None)  # None: no FLUX.1
    run, left_out = compare.method_edits(inv.settings.source_prompt, args.target_prompt, args.target_guidance,
                                         concepts, args.momentum_scale, args.momentum_beta, pp_concepts,
                                         {k: getattr(args, k) for k in P2P_OPTIONS}, inv.settings.sampler,
                                         flow_given, embeds, rf_given, mask=args.mask,
                                         negative_prompt=args.negative_prompt, guidance_rescale=args.guidance_rescale)
    for method, why in left_out.items():
        print(f"minledits: note: {compare.LABELS[method]} left out: {why}", file=sys.stderr)
    found, clip = compare.panels(sd, inv, run), clip_of(args)
    text = sweep_text(args, concepts)
    p = dict(made_with(args, sd, inv), target_prompt=args.target_prompt, target_guidance=args.target_guidance,
             concepts=list(args.concepts or []), momentum_scale=args.momentum_scale,
             momentum_beta=args.momentum_beta, mask=args.mask, negative_prompt=args.negative_prompt,
             guidance_rescale=args.guidance_rescale)
    # the P2P options only where a P2P panel is drawn: a rerun of the line would refuse them otherwise
    if {"p2p", "ddim+p2p"} & set(run):
        p.update({k: getattr(args, k) for k in P2P_OPTIONS})
    if "flowedit" in run:  # FlowEdit's steps are the inversion's (FLUX: FLUX_DEFAULTS'); n_max as it ran
        p.update({k: v for k, v in compare.flowedit_options(inv, "", 0, guidance_embeds=embeds, **flow_given).items()
                  if k in FLOW_OPTIONS})
    if "rf-inversion" in run:  # its options as it ran (the guidance: the model's default where not given)
        p.update({k: v for k, v in {**RF_DEFAULTS, **rf_given}.items() if k in RF_OPTIONS})
    rows = [{"method": x.method, "label": compare.LABELS[x.method], "unet_evaluations": x.unet_evaluations,
             "seconds": round(x.seconds, 3), **{k: sweep.finite(v) for k, v in metrics.measure(
                 found[0].image, x.image, text, clip).items()}} for x in found]
    with all_or_none([out, record]):
        write_png(compare.picture(found), out, dict(command="compare", input=str(args.input), **p),
                  ["compare", str(args.input), *to_argv(p)])
        sweep.write_json(record, {"input": str(args.input), "settings": p,
                                  "inversion_unet_evaluations": inversion_rows, "left_out": left_out, "panels": rows})
    finish(start, f"compare: {', '.join(compare.LABELS[x.method] for x in found)} -> {out}", sd.model_id)

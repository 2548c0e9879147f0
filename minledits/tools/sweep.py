"""Parameter sweeps: a grid of edits of one input, each option varied over a list of values (the LEDITS paper's
Figure 5 is skip x target guidance), with one contact sheet, one PNG per cell and a table of settings, times and
metrics. The command line wiring is cli/many.py's; this module holds the grid and the pictures.

    cells     the Cartesian product of the --vary lists; the first key gives the rows, the second the columns,
              the others one sheet per combination of their values (a 1-D sweep is one row)
    groups    cells that share an inversion: equal inversion settings, except skip where the sampler slices
              (`sliceable`): DDPM's x_t and z_k of step k do not depend on the skip (inversion.py), and a trajectory
              (DDIM, flow) at a larger skip is the start of the same walk, so the group inverts once at its smallest
              skip and each cell takes a slice (at_skip); DPM-Solver++'s maps follow one another from the first
              inverted step, so there skip is an inversion setting like the others; FlowEdit's cells need no
              inversion, RF-Inversion's (FLUX) share one per value of its inversion options (gamma, steps, ...)
    files     OUT.png (sheets: OUT.png, or OUT-1.png, OUT-2.png, ... with more than two keys), OUT/NNN.png (the cells,
              each with the command that reproduces it, as `edit` writes it) and OUT/NNN.json (its settings, times,
              metrics), OUT.csv and OUT.json (the table), OUT-tradeoff.png (CLIP score against SSIM, matplotlib)
A cell whose PNG exists and whose JSON holds the same settings (every one that decides its pixels, the input's
content among them) is done: a rerun resumes. A cell that fails leaves neither file; the sheets show it as a grey
tile and the table marks it (status, error).
"""
import csv
import hashlib
import io
import itertools
import json
import math
import re
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from ..errors import shorten
from ..inversion import Inversion, noise_maps, source_context
from ..io.files import atomic
from ..sampler import SAMPLERS

FORMAT = "minledits.sweep"
CONCEPT_KEYS = ("scale", "threshold", "warmup", "cooldown", "weight")
CONCEPT_KEY = re.compile(r"concept\.(\d+)\.(\w+)")


# --------------------------------------------------------------------------------------------- the grid
def parse_vary(texts: list[str], types: dict) -> list[tuple[str, list]]:
    """["skip=12,24", "concept.0.scale=3,7"] -> [("skip", [12, 24]), ("concept.0.scale", [3.0, 7.0])]. types: option
    name -> function from text to value. A list given as JSON ('target_prompt=["a, b", "c"]') may hold commas."""
    vary = []
    for text in texts:
        key, sep, values = text.partition("=")
        key = key.strip().replace("-", "_")
        m = CONCEPT_KEY.fullmatch(key)
        if not sep or not (key in types or m and m[2] in CONCEPT_KEYS):
            known = ", ".join(sorted(types)) + ", concept.I." + "|".join(CONCEPT_KEYS)
            raise ValueError(f"--vary {shorten(text)}: unknown option {shorten(key)} (KEY=v1,v2,...; keys: {known})")
        if key in (k for k, _ in vary):
            raise ValueError(f"--vary {key} is given twice: give its values once")
        try:
            items = json.loads(values) if values.lstrip().startswith("[") else values.split(",")
        except json.JSONDecodeError as e:
            raise ValueError(f"--vary {shorten(text)}: the list is not JSON ({e.msg} at column {e.colno + len(key) + 1}"
                             f"): e.g. {key}=[1,2,3] or {key}=1,2,3") from None
        if not items or any(str(v).strip() == "" for v in items):
            raise ValueError(f"--vary {shorten(text)}: give a list of values, e.g. {key}=1,2,3")
        convert = types.get(key, str)  # a concept option's values stay text: Concept.parse checks each cell's
        try:
            vary.append((key, [convert(str(v).strip()) for v in items]))
        except ValueError as e:
            raise ValueError(f"--vary {shorten(text)}: {e}") from None
    return vary



def grid_cells(vary: list[tuple[str, list]]) -> list[dict]:
    """[{key: value, ...}] in sheet, row, column order."""
    keys = [k for k, _ in vary]
    order = keys[2:] + keys[:2]  # the rest (sheets) first, then rows, then columns
    values = dict(vary)
    return [dict(sorted(zip(order, combo), key=lambda kv: keys.index(kv[0])))
            for combo in itertools.product(*(values[k] for k in order))]


def set_concept_option(specs: list[str], i: int, key: str, value) -> list[str]:
    """specs with option `key` of concept i (in the -e syntax) set to value."""
    if i >= len(specs):
        raise ValueError(f"--vary concept.{i}.{key}: there are only {len(specs)} concepts (-e), counted from 0")
    name, _, options = specs[i].partition(":")
    kept = [o for o in options.split(",") if o and o.split("=", 1)[0].strip() != key]
    return specs[:i] + [f"{name}:{','.join(kept + [f'{key}={value}'])}"] + specs[i + 1:]


def label(cell: dict, keys: list[str]) -> str:
    return ", ".join(f"{k}={cell[k]}" for k in keys)


def shares(items: list, rank: int, world: int) -> list:
    """The contiguous share of items of process `rank` among `world` (cells of one inversion stay together)."""
    n = len(items)
    return items[rank * n // world:(rank + 1) * n // world]


# --------------------------------------------------------------------------------------------- inversions
def sliceable(sampler: str) -> bool:
    """Whether inversions that differ only in skip share their tensors, so that one at the smallest skip serves
    the others (at_skip): DDPM's (independent x_t, aligned batches) and a trajectory's (DDIM, flow)."""
    return sampler == "ddpm" or SAMPLERS[sampler].trajectory


def shared_key(settings: dict) -> tuple:
    """The settings' items that decide which inversion serves them: all but skip where the sampler slices."""
    return tuple((k, v) for k, v in settings.items() if not (k == "skip" and sliceable(settings["sampler"])))


@torch.inference_mode()
def at_skip(sd, inv: Inversion, skip: int, batch_size: int) -> Inversion:
    """The inversion at a larger skip, from one at a smaller skip: its tensors sliced, bit-identical to
    invert(..., skip=skip). A trajectory (DDIM, flow) needs nothing more; DDPM runs its first partial UNet batch
    ((N - skip) mod batch_size steps) again as that inversion runs it (inversion.noise_maps aligns its batches)."""
    d, s = skip - inv.settings.skip, replace(inv.settings, skip=skip)
    if d < 0 or not sliceable(s.sampler):
        raise ValueError(f"an inversion at skip {inv.settings.skip} ({inv.settings.sampler}) cannot give skip {skip}")
    xts, zs = inv.xts[d:], inv.zs[d:].clone()
    e = len(zs) % batch_size
    if d and e and s.sampler == "ddpm":
        z = noise_maps(sd, s.new_sampler(sd.schedule), xts[:e + 1], skip, source_context(sd, s), s.source_guidance,
                       batch_size)
        zeroed = (zs[:e] == 0).flatten(1).all(1).view(-1, 1, 1, 1)  # the last maps, zeroed as the inversion does
        zs[:e] = torch.where(zeroed, zs[:e], z)
    return Inversion(inv.timesteps[d:], xts, zs, inv.image, s, inv.model_id, inv.fingerprint)


def patch_rows(skips, smallest: int, batch_size: int, steps: int) -> int:
    """UNet rows at_skip runs again for these skips (0 for the smallest and for aligned ones)."""
    return sum((steps - s) % batch_size for s in set(skips) if s != smallest)


# --------------------------------------------------------------------------------------------- files
def cell_paths(out: Path, n: int) -> tuple[Path, Path]:
    return out.with_suffix("") / f"{n:03d}.png", out.with_suffix("") / f"{n:03d}.json"


def sheet_paths(out: Path, count: int) -> list[Path]:
    return [out] if count == 1 else [out.with_name(f"{out.stem}-{j + 1}{out.suffix}") for j in range(count)]


def table_paths(out: Path) -> dict[str, Path]:
    return {"csv": out.with_suffix(".csv"), "json": out.with_suffix(".json"),
            "plot": out.with_name(out.stem + "-tradeoff.png")}


def read_json(path: Path):
    """The JSON in path; None where it is no regular file (a named pipe would block the read) or not JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, ValueError):
        return None


def state(png: Path, record: Path, settings: dict) -> tuple[str, str]:
    """("done", "") for a PNG whose JSON holds these settings, ("todo", "") where there is no PNG, ("foreign", why)
    for a PNG made otherwise: why says by what (no sweep's record, or the first setting that differs)."""
    if not png.exists():
        return "todo", ""
    found = read_json(record)
    old = found.get("settings") if isinstance(found, dict) else None
    if not isinstance(old, dict):
        return "foreign", "was not made by this sweep"
    if old == settings:
        return "done", ""
    key = next(k for k in {**settings, **old} if (k in old, old.get(k)) != (k in settings, settings.get(k)))
    if key not in old:
        return "foreign", f"has a record without its {key}: it may have been made otherwise"
    if key not in settings:
        return "foreign", f"was made with {key} {shorten(old[key])}, which this sweep has not"
    if key == "input":
        return "foreign", "was made from another input (the input file's content has changed)"
    return "foreign", f"was made with {key} {shorten(old[key])}, not {shorten(settings[key])}"


def file_hash(path) -> str:
    """"sha256-" and the hex digest of the file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return "sha256-" + h.hexdigest()


def write_json(path: Path, obj) -> None:
    with atomic(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, default=str), encoding="utf-8")


def write_table(paths: dict, header: dict, records: list[dict]) -> None:
    """OUT.json ({format, header..., cells}) and OUT.csv (one row per cell: its index, files, status (done, kept or
    failed) and error, varied values, times and metrics; the full settings are in the JSON)."""
    write_json(paths["json"], {"format": FORMAT, **header, "cells": records})
    flat = [{"cell": r["cell"], "sheet": r["sheet"], "row": r["row"], "col": r["col"], "file": r["file"],
             "status": r["status"], "error": r.get("error"), **r["varied"],
             **{k: r.get(k) for k in ("invert_s", "edit_s", "psnr", "ssim", "clip_score", "clip_image")}}
            for r in records]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(flat[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(flat)
    # a file name that is no UTF-8 (os.fsdecode's surrogates): its bytes as they are, which the JSON's \udcNN name
    with atomic(paths["csv"]) as tmp:
        tmp.write_text(buffer.getvalue(), encoding="utf-8", errors="surrogateescape")


# --------------------------------------------------------------------------------------------- pictures
def font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def text_tile(text: str, size: tuple[int, int], background: str = "white") -> Image.Image:
    """A tile with text, wrapped at ", " and "=", centred, in the largest font size that fits (>= 6 px)."""
    tile = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(tile)
    lines = [p for part in text.split(", ") for p in re.split(r"(?<==)", part)]
    for px in range(max(size[1] // 8, 6), 5, -1):
        f = font(px)
        box = draw.multiline_textbbox((0, 0), "\n".join(lines), font=f, align="center")
        if box[2] - box[0] <= size[0] - 4 and box[3] - box[1] <= size[1] - 4:
            break
    x, y = (size[0] - (box[2] - box[0])) / 2 - box[0], (size[1] - (box[3] - box[1])) / 2 - box[1]
    draw.multiline_text((x, y), "\n".join(lines), fill="black", font=f, align="center")
    return tile


def contact_sheet(corner: Image.Image, tiles: list[list[Image.Image]], row_labels: list[str],
                  col_labels: list[str]) -> Image.Image:
    """(rows + 1) x (cols + 1) tiles of the corner's size: the input at the top left, the column labels on top,
    the row labels on the left, the cells (resized to the corner's size if they differ)."""
    W, H = corner.size
    sheet = Image.new("RGB", (W * (len(col_labels) + 1), H * (len(row_labels) + 1)), "white")
    sheet.paste(corner, (0, 0))
    for c, text in enumerate(col_labels):
        sheet.paste(text_tile(text, (W, H)), (W * (c + 1), 0))
    for r, text in enumerate(row_labels):
        sheet.paste(text_tile(text, (W, H)), (0, H * (r + 1)))
        for c, tile in enumerate(tiles[r]):
            sheet.paste(tile if tile.size == (W, H) else tile.resize((W, H), Image.Resampling.BICUBIC),
                        (W * (c + 1), H * (r + 1)))
    return sheet


def tradeoff_plot(records: list[dict], path: Path) -> str:
    """CLIP score against SSIM per cell; returns what was done, in one line."""
    points = [r for r in records if r.get("clip_score") is not None and r.get("ssim") is not None]
    if not points:
        return "no trade-off plot: the cells have no CLIP score (CLIP weights, and a target prompt or concept)"
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no trade-off plot: it needs matplotlib (pip install 'minledits[plot]')"
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    ax.scatter([r["ssim"] for r in points], [r["clip_score"] for r in points])
    for r in points:
        ax.annotate(label(r["varied"], list(r["varied"])), (r["ssim"], r["clip_score"]), fontsize=6)
    ax.set_xlabel("SSIM to the input (fidelity)")
    ax.set_ylabel("CLIP score to the text (alignment)")
    with atomic(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    plt.close(fig)
    return f"trade-off plot -> {path}"


def finite(x):
    """JSON has no inf: PSNR of identical pictures is written as the string "inf"."""
    return "inf" if isinstance(x, float) and math.isinf(x) else x

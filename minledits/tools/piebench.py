"""PIE-Bench (Ju et al., "PnP Inversion" / "Direct Inversion", 2023): its data set, the methods run on it, and the
table `minledits evaluate` writes. The command line wiring is cli/evaluate.py's; the metrics are scores.py's.

Notation
    PIE_DIR                  the benchmark's data folder: mapping_file.json, annotation_images/<image_path>
    entry                    one value of mapping_file.json: image_path, original_prompt, editing_prompt,
                             editing_instruction, editing_type_id ("0".."9"), blended_word, mask
    source, target           original_prompt, editing_prompt without the brackets [ ] (every consumer strips them)
    add, remove              the bracketed words of the target prompt (concepts to add) and of the source prompt
                             (concepts to remove): the concepts of the methods that edit with concepts
    mask M                   run-length code [start, length, ...] over the row-major flattening of 512 x 512
                             pixels: M[start : start + length] = 1 (the union of the runs, the last clipped at the end),
                             then the 1-pixel frame set to 1; 1 = the region to edit, 0 = background to preserve
    result                   RESULTS/<method>/annotation_images/<image_path>: where the benchmark's own evaluation
                             reads a method's edit (same name; a picture that is not square is scored on its
                             bottom-right 512 x 512 block, as the benchmark crops)
    row                      one (method, entry): the seven metrics and the seconds of its edit
    summary                  per method and edit type, the means of the rows with a number (nan skipped), in the
                             paper's units: structure x 10^3, PSNR, LPIPS x 10^3, MSE x 10^4, SSIM x 10^2, CLIP
"""
import csv
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ..errors import MinleditsError, shorten
from ..io.files import atomic

SIDE = 512                       # the benchmark's pictures and masks: 512 x 512
TYPES = {"0": "random", "1": "change object", "2": "add object", "3": "delete object",
         "4": "change content", "5": "change pose", "6": "change color", "7": "change material",
         "8": "change background", "9": "change style"}
KEYS = ("image_path", "original_prompt", "editing_prompt", "editing_instruction", "editing_type_id", "blended_word",
        "mask")
NEEDED = ("image_path", "original_prompt", "editing_prompt", "editing_type_id", "mask")  # what a run reads
METHODS = {"ddim+p2p": "DDIM + P2P", "ddpm": "DDPM inversion", "ddpm+p2p": "DDPM + P2P", "ledits": "LEDITS",
           "leditspp": "LEDITS++"}
VAE = "vae"                      # the row of encode -> decode of each photo: the ceiling of the background metrics
LABELS = {**METHODS, VAE: "VAE reconstruction"}
METRICS = ("structure_distance", "psnr_unedit_part", "lpips_unedit_part", "mse_unedit_part", "ssim_unedit_part",
           "clip_similarity_target_image", "clip_similarity_target_image_edit_part")
UNITS = {"structure_distance": 1e3, "psnr_unedit_part": 1, "lpips_unedit_part": 1e3, "mse_unedit_part": 1e4,
         "ssim_unedit_part": 1e2, "clip_similarity_target_image": 1, "clip_similarity_target_image_edit_part": 1}
HEADS = {"structure_distance": "Structure x10^3", "psnr_unedit_part": "PSNR", "lpips_unedit_part": "LPIPS x10^3",
         "mse_unedit_part": "MSE x10^4", "ssim_unedit_part": "SSIM x10^2", "clip_similarity_target_image": "CLIP Whole",
         "clip_similarity_target_image_edit_part": "CLIP Edited"}
ROW_KEYS = ("method", "id", "editing_type_id", *METRICS, "seconds", "settings")
BRACKETS = re.compile(r"\[([^\[\]]*)\]")


class EntryError(MinleditsError, ValueError):
    """An entry of mapping_file.json that cannot be run: one line naming it."""


# --------------------------------------------------------------------------------------------- the data set
def decode_mask(code, side: int = SIDE) -> np.ndarray:
    """The mask M (bool [side, side], True = edit) of a run-length code, with the frame forced to 1. A code that is
    not pairs of integers, or whose starts or lengths fall outside the picture, is a ValueError."""
    n = side * side
    if not (isinstance(code, list) and len(code) % 2 == 0 and all(type(v) is int for v in code)):
        raise ValueError("the mask is not a list of integer pairs [start, length, ...]")
    flat = np.zeros(n, dtype=bool)
    for start, length in zip(code[::2], code[1::2]):
        if not (0 <= start < n and length >= 0):
            raise ValueError(f"the mask's run ({start}, {length}) is outside the {side}x{side} picture "
                             f"(starts 0 to {n - 1})")
        flat[start:start + length] = True  # a slice past the end stops there: the benchmark's clipping
    m = flat.reshape(side, side)
    m[0, :] = m[-1, :] = m[:, 0] = m[:, -1] = True
    return m


def strip(prompt: str) -> str:
    return prompt.replace("[", "").replace("]", "")


def bracketed(prompt: str) -> list[str]:
    """The words in [ ] of a prompt, each bracket one concept: "a [red] [old] car" -> ["red", "old"]."""
    return [w.strip() for w in BRACKETS.findall(prompt) if w.strip()]


@dataclass(frozen=True)
class Entry:
    id: str
    image_path: str
    source: str                  # original_prompt, brackets stripped
    target: str                  # editing_prompt, brackets stripped
    edit_type: str               # editing_type_id
    add: tuple[str, ...]         # bracketed words of the target prompt
    remove: tuple[str, ...]      # bracketed words of the source prompt
    mask: tuple[int, ...] = field(repr=False)  # the run-length code

    def photo(self, pie_dir) -> Path:
        return Path(pie_dir) / "annotation_images" / self.image_path


def entry_name(key: str) -> str:
    """How messages name an entry: "entry 111000000000" (an odd key quoted and shortened)."""
    return f"entry {key}" if key.isalnum() and len(key) <= 40 else f"entry {shorten(key)}"


def entry(key: str, value, pie_dir) -> Entry:
    """One entry of mapping_file.json, checked: an EntryError naming it where it cannot be run."""
    name = entry_name(key)
    if not isinstance(value, dict):
        raise EntryError(f"{name}: not an object with {', '.join(KEYS)}")
    if missing := [k for k in NEEDED if k not in value]:
        raise EntryError(f"{name}: no {missing[0]}")
    for k in ("image_path", "original_prompt", "editing_prompt", "editing_type_id"):
        if not isinstance(value[k], str):
            raise EntryError(f"{name}: {k} is not text")
    if value["editing_type_id"] not in TYPES:
        raise EntryError(f"{name}: unknown edit type {shorten(value['editing_type_id'])} (0 to 9)")
    for k in ("original_prompt", "editing_prompt"):
        if not strip(value[k]).strip():
            raise EntryError(f"{name}: {k} is empty")
    path = Path(value["image_path"])
    if path.is_absolute() or ".." in path.parts or not value["image_path"]:
        raise EntryError(f"{name}: image_path {shorten(value['image_path'])} is not a path inside annotation_images/")
    try:
        decode_mask(value["mask"])
    except ValueError as e:
        raise EntryError(f"{name}: {e}") from None
    e = Entry(key, value["image_path"], strip(value["original_prompt"]), strip(value["editing_prompt"]),
              value["editing_type_id"], tuple(bracketed(value["editing_prompt"])),
              tuple(bracketed(value["original_prompt"])), tuple(value["mask"]))
    if not e.photo(pie_dir).is_file():
        raise EntryError(f"{name}: no photo {e.photo(pie_dir)}")
    return e


def read(pie_dir, types=None, limit=None) -> tuple[list[Entry], dict[str, str]]:
    """(the entries to run, {id: why it cannot run}) of PIE_DIR, in the file's order: those of the edit types
    `types` (None: all), the first `limit` of them (bad ones count)."""
    path = Path(pie_dir) / "mapping_file.json"
    try:
        mapping = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise MinleditsError(f"{path} is not JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except (OSError, ValueError) as e:
        raise MinleditsError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    if not isinstance(mapping, dict):
        raise MinleditsError(f"{path}: not a JSON object keyed by entry id")
    chosen = [(k, v) for k, v in mapping.items()
              if types is None or not isinstance(v, dict) or v.get("editing_type_id") in types]
    entries, bad = [], {}
    for key, value in chosen[:limit]:
        try:
            entries.append(entry(key, value, pie_dir))
        except EntryError as e:
            bad[key] = str(e)
    return entries, bad


# --------------------------------------------------------------------------------------------- results
def result_path(results, method: str, e: Entry) -> Path:
    return Path(results) / method / "annotation_images" / e.image_path


def record_path(results, method: str, e: Entry) -> Path:
    """The row of (method, entry), beside nothing the benchmark reads: RESULTS/rows/<method>/<image_path>.json."""
    return Path(results) / "rows" / method / Path(e.image_path).with_suffix(".json")


def scored(picture: Image.Image) -> Image.Image:
    """The picture the benchmark scores: RGB, and a picture that is not square cropped to its bottom-right
    512 x 512 block (the benchmark's convention for rows of pictures, the edit last)."""
    w, h = picture.size
    return picture if w == h else picture.crop((w - SIDE, h - SIDE, w, h))


def write_result(picture: Image.Image, path: Path, record: dict) -> None:
    """The edit as PNG data under the benchmark's file name (lossless: a JPEG would change the metrics; PIL, and so
    the benchmark, reads a file by its content), the settings as JSON text ("minledits")."""
    info = PngInfo()
    info.add_text("minledits", json.dumps(record))
    buf = io.BytesIO()
    picture.save(buf, format="PNG", pnginfo=info)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic(path) as tmp:
        Path(tmp).write_bytes(buf.getvalue())


def write_row(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic(path) as tmp:
        Path(tmp).write_text(json.dumps(row, allow_nan=True) + "\n", encoding="utf-8")


def kept(results, method: str, e: Entry, settings: str) -> dict | None:
    """The row of a former run to keep: its picture exists and its row holds the same settings; else None."""
    png, record = result_path(results, method, e), record_path(results, method, e)
    if not png.is_file():
        return None
    try:
        row = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return row if isinstance(row, dict) and row.get("settings") == settings else None


# --------------------------------------------------------------------------------------------- the table
def number(v) -> str:
    """A CSV cell: "nan" where no number, else the full float."""
    return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else repr(float(v))


def write_rows(path: Path, rows: list[dict]) -> None:
    with atomic(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(ROW_KEYS)
        for r in rows:
            w.writerow([r["method"], r["id"], r["editing_type_id"], *(number(r[k]) for k in METRICS),
                        f"{r['seconds']:.3f}", r["settings"]])


def means(rows: list[dict]) -> dict:
    """{metric: mean in the paper's units, nan skipped (nan where none)}, and "n": the rows."""
    out = {"n": len(rows)}
    for k in METRICS:
        found = [r[k] for r in rows if r[k] is not None and not math.isnan(r[k])]
        out[k] = sum(found) / len(found) * UNITS[k] if found else math.nan
    return out


def summary(rows: list[dict], methods: list[str]) -> list[dict]:
    """Per method (in `methods` order): all types ("all"), then each edit type present."""
    table = []
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        if not mine:
            continue
        table.append({"method": m, "edit_type": "all", **means(mine)})
        for t in sorted({r["editing_type_id"] for r in mine}):
            table.append({"method": m, "edit_type": t, **means([r for r in mine if r["editing_type_id"] == t])})
    return table


def write_summary(csv_path: Path, md_path: Path, table: list[dict], notes: list[str]) -> None:
    with atomic(csv_path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["method", "edit_type", "n", *(HEADS[k] for k in METRICS)])
        for r in table:
            w.writerow([r["method"], r["edit_type"], r["n"], *(f"{r[k]:.2f}" for k in METRICS)])
    lines = ["| method | edit type | n | " + " | ".join(HEADS[k] for k in METRICS) + " |",
             "| --- | --- | ---: |" + " ---: |" * len(METRICS)]
    for r in table:
        kind = "all" if r["edit_type"] == "all" else f"{r['edit_type']} {TYPES[r['edit_type']]}"
        lines.append(f"| {LABELS[r['method']]} | {kind} | {r['n']} | "
                     + " | ".join(f"{r[k]:.2f}" for k in METRICS) + " |")
    text = "\n".join(["# PIE-Bench", "", *lines, "", *(f"- {n}" for n in notes)]).rstrip() + "\n"
    with atomic(md_path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")

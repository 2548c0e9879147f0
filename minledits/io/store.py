"""Inversion files.

An inversion file is one safetensors file:
    tensors   xts [N-skip+1, 4, h, w]   xts[skip], ..., xts[N-1], w0
              zs  [N-skip, 4, h, w]     z_skip, ..., z_{N-1} (all 0 for a ddim or flow inversion: its trajectory
                                        is xts)
              timesteps [N-skip] int64  the edit's timesteps, descending (float32 for a flow's T sigma_k: read back
                                        as the same floats)
              image [1, 3, H, W]        the preprocessed input in [-1, 1] (for --compare and --trace)
    metadata  format, version, model_id, fingerprint, dtype, resolution ("WxH" pixels) and the inversion
              settings (the fields of inversion.InversionSettings; gamma only in an RF-Inversion's file, whose
              xts are its forward path and zs 0: inversion.py), each value JSON-encoded (safetensors
              metadata holds strings only). A file of another version is refused: invert again.
"""
import json
from dataclasses import fields
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as save_bytes

from ..errors import InversionError, InversionFileError, shorten
from ..inversion import Inversion, InversionSettings
from ..sampler import SAMPLERS
from .files import atomic, require_regular

FORMAT, VERSION = "minledits.inversion", 2
SETTINGS = [f.name for f in fields(InversionSettings) if f.name != "gamma"]  # the commands' inversion options
# Each tensor of the format: its shape (an int: that size, from the settings; a letter: the same size wherever it
# appears; "n" = steps - skip) and the dtypes it may have ("dtype": the float dtype the metadata names).
TENSORS = {"xts": (("n+1", "C", "h", "w"), "dtype"), "zs": (("n", "C", "h", "w"), "dtype"),
           "timesteps": (("n",), (torch.int64, torch.float32)), "image": ((1, 3, "H", "W"), (torch.float32,))}


def is_inversion(path) -> bool:
    """Whether path is a minledits inversion file, by its content (safetensors metadata), whatever its name.
    Only a regular file is opened (a named pipe would block the reader)."""
    if not Path(path).is_file():
        return False
    try:
        with safe_open(str(path), "pt") as f:
            return json.loads((f.metadata() or {}).get("format", "null")) == FORMAT
    except Exception:  # not a file, not safetensors, not JSON metadata
        return False


def save(inv: Inversion, path) -> None:
    """Write `inv` to `path`, atomically."""
    H, W = inv.image.shape[-2:]
    settings = {k: v for k, v in inv.settings.dict().items() if k in SETTINGS or inv.rf}
    meta = dict(format=FORMAT, version=VERSION, model_id=inv.model_id, fingerprint=inv.fingerprint,
                dtype=str(inv.xts.dtype).removeprefix("torch."), resolution=f"{W}x{H}", **settings)
    whole = all(isinstance(t, int) for t in inv.timesteps)
    tensors = {"xts": inv.xts, "zs": inv.zs,
               "timesteps": torch.tensor(inv.timesteps, dtype=torch.int64 if whole else torch.float32),
               "image": inv.image.float()}
    with atomic(path) as tmp:  # the bytes, then one write: safetensors' save_file leaves its own temporaries
        tmp.write_bytes(save_bytes({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                                   {k: json.dumps(v) for k, v in meta.items()}))


def load(path) -> Inversion:
    """Read an inversion file."""
    require_regular(path, "the inversion file", InversionFileError)
    try:
        with safe_open(str(path), "pt") as f:
            raw = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # not safetensors at all, truncated, unreadable
        raise InversionFileError(f"{path} is not a readable inversion file ({str(e).splitlines()[0]})") from e
    try:
        meta = {k: json.loads(v) for k, v in raw.items()}
    except ValueError:
        meta = {}
    if meta.get("format") != FORMAT:
        raise InversionFileError(f"{path} is a safetensors file but not a minledits inversion (no '{FORMAT}' metadata)")
    if meta.get("version") != VERSION:
        raise InversionFileError(f"{path} was made by another minledits version (inversion format version "
                                 f"{shorten(meta.get('version'))}; this one reads {VERSION}): invert again")
    if "sampler" in meta and meta["sampler"] not in SAMPLERS:
        raise InversionFileError(f"{path} was made with sampler {shorten(meta['sampler'])}, which this minledits "
                                 f"does not have ({', '.join(SAMPLERS)}): invert again")
    try:
        settings = InversionSettings(**{k: meta[k] for k in SETTINGS}, gamma=meta.get("gamma"))
        check_format(path, tensors, settings, meta["dtype"])
        inv = Inversion(tensors["timesteps"].tolist(), tensors["xts"], tensors["zs"], tensors["image"],
                        settings, str(meta["model_id"]), str(meta["fingerprint"]))
    except InversionFileError:
        raise
    except KeyError as e:
        raise InversionFileError(f"{path} is a damaged minledits inversion file (missing {e})") from e
    except (TypeError, ValueError) as e:
        raise InversionFileError(f"{path} is a damaged minledits inversion file ({e})") from e
    if meta.get("resolution") != "{1}x{0}".format(*inv.image.shape[-2:]):
        raise InversionFileError(f"{path} is a damaged minledits inversion file (its resolution "
                                 f"{shorten(meta.get('resolution'))} disagrees with its image)")
    try:
        inv.check_tensors(str(path))
    except InversionError as e:
        raise InversionFileError(str(e)) from None
    if SAMPLERS[settings.sampler].trajectory and inv.zs.any():
        raise InversionFileError(f"{path} is a damaged minledits inversion file: a {settings.sampler} inversion's "
                                 "noise maps are all 0, its are not: invert again")
    return inv


def check_format(path, tensors: dict, settings: InversionSettings, dtype) -> None:
    """Refuse, naming the tensor, any tensor that the format (TENSORS) does not have, or of another rank, size or
    dtype, and timesteps that are not descending from below 2**31: before anything is built from them."""
    floats = {name: getattr(torch, name) for name in ("float32", "float16", "bfloat16")}
    if not (isinstance(dtype, str) and dtype in floats):
        raise InversionFileError(f"{path} is a damaged minledits inversion file (dtype {shorten(dtype)} is not one "
                                 f"of {', '.join(floats)})")
    if extra := sorted(set(tensors) - set(TENSORS)):
        raise InversionFileError(f"{path} is a damaged minledits inversion file (it holds a tensor "
                                 f"{shorten(extra[0])} that the format does not have)")
    n, sizes = settings.steps - settings.skip, {}
    for name, (shape, kind) in TENSORS.items():
        t = tensors[name]
        want_dtypes = (floats[dtype],) if kind == "dtype" else kind
        want = [{"n": n, "n+1": n + 1}.get(d, d) for d in shape]
        ok = t.dtype in want_dtypes and t.ndim == len(want) and all(
            sizes.setdefault(d, s) == s if isinstance(d, str) else d == s for d, s in zip(want, t.shape))
        if not ok:
            expected = ", ".join(str(sizes.get(d, d)) for d in want)
            raise InversionFileError(f"{path} is a damaged minledits inversion file: its {name} is "
                                     f"{list(t.shape)} {str(t.dtype).removeprefix('torch.')}, not [{expected}] "
                                     f"{' or '.join(str(d).removeprefix('torch.') for d in want_dtypes)}: invert "
                                     "again")
    ts = tensors["timesteps"]
    if not (bool((ts[:-1] > ts[1:]).all()) and (len(ts) == 0 or 0 <= float(ts[-1]) and float(ts[0]) < 2**31)):
        raise InversionFileError(f"{path} is a damaged minledits inversion file: its timesteps are not descending "
                                 "whole numbers from 0 to 2**31 - 1 (or a flow's float32 ones): invert again")


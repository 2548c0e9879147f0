"""Inversion files, and atomic writes for everything the CLI saves.

An inversion file is one safetensors file:
    tensors   xts [N-skip+1, 4, h, w]   xts[skip], ..., xts[N-1], w0
              zs  [N-skip, 4, h, w]     z_skip, ..., z_{N-1}
              timesteps [N-skip] int64  the edit's timesteps, descending
              image [1, 3, H, W]        the preprocessed input in [-1, 1] (for --compare and --trace)
    metadata  format, version, model_id, fingerprint, dtype, resolution ("WxH" pixels) and the inversion
              settings (steps, skip, seed, size, source_prompt, source_guidance, keep_last_noise, keep_aspect),
              each value JSON-encoded (safetensors metadata holds strings only).
"""
import json
import os
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .inversion import Inversion

FORMAT, VERSION = "minledits.inversion", 1
UMASK = os.umask(0o22)  # read the process umask (the only way is to set it) ...
os.umask(UMASK)         # ... and put it back
SETTINGS = ("steps", "skip", "seed", "size", "source_prompt", "source_guidance", "keep_last_noise", "keep_aspect")


class InversionFileError(ValueError):
    """An inversion file that cannot be used (one-line message)."""


@contextmanager
def atomic(path):
    """Yield a temporary name beside `path`; rename it to `path` on success, delete it on any failure."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~UMASK)  # like a plain open(): some writers create files private (0600)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save(inv: Inversion, path, sd) -> None:
    """Write `inv` (made with the model `sd`) to `path`, atomically."""
    H, W = inv.image.shape[-2:]
    meta = dict(format=FORMAT, version=VERSION, model_id=str(sd.model_id), fingerprint=str(sd.fingerprint),
                dtype=str(inv.xts.dtype).removeprefix("torch."), resolution=f"{W}x{H}",
                **{k: inv.settings[k] for k in SETTINGS})
    tensors = {"xts": inv.xts, "zs": inv.zs, "timesteps": torch.tensor(inv.timesteps, dtype=torch.int64),
               "image": inv.image.float()}
    with atomic(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                  {k: json.dumps(v) for k, v in meta.items()})


def load(path) -> Inversion:
    """Read an inversion file; its settings also carry model_id, fingerprint, dtype and resolution."""
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
    if not isinstance(meta.get("version"), int) or meta["version"] > VERSION:
        raise InversionFileError(f"{path} has inversion format version {meta.get('version')!r}; this minledits reads <= {VERSION}")
    try:
        inv = Inversion([int(t) for t in tensors["timesteps"]], tensors["xts"], tensors["zs"], tensors["image"], meta)
        n = meta["steps"] - meta["skip"]
    except (KeyError, TypeError) as e:
        raise InversionFileError(f"{path} is a damaged minledits inversion file (missing {e})") from e
    if not (len(inv.timesteps) == len(inv.zs) == len(inv.xts) - 1 == n and inv.xts.shape[1:] == inv.zs.shape[1:]
            and meta.get("resolution") == "{1}x{0}".format(*inv.image.shape[-2:])):
        raise InversionFileError(f"{path} is a damaged minledits inversion file (tensor shapes disagree with its settings)")
    return inv


def check(inv: Inversion, sd=None, source="the inversion", **settings) -> None:
    """Refuse an inversion made with other settings than those given (e.g. size=512), or with a model other than `sd`."""
    s = inv.settings
    for k, v in settings.items():
        if v != s.get(k):
            raise InversionFileError(f"{source} was made with {k}={s.get(k)!r} ({s.get('resolution')} px), not {v!r}: "
                                     "leave the option out, or invert again")
    if sd is not None and s.get("fingerprint") != str(sd.fingerprint):
        same = " (same name, other weights: another variant or dtype, or the files changed)" \
            if s.get("model_id") == str(sd.model_id) else ""
        raise InversionFileError(f"{source} was made with model {s.get('model_id')} (fingerprint {s.get('fingerprint')}), "
                                 f"not {sd.model_id} (fingerprint {sd.fingerprint}){same}: invert again with this model")

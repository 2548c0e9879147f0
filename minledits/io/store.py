"""Inversion files.

An inversion file is one safetensors file:
    tensors   xts [N-skip+1, 4, h, w]   xts[skip], ..., xts[N-1], w0
              zs  [N-skip, 4, h, w]     z_skip, ..., z_{N-1}
              timesteps [N-skip] int64  the edit's timesteps, descending
              image [1, 3, H, W]        the preprocessed input in [-1, 1] (for --compare and --trace)
    metadata  format, version, model_id, fingerprint, dtype, resolution ("WxH" pixels) and the inversion
              settings (the fields of inversion.InversionSettings), each value JSON-encoded (safetensors
              metadata holds strings only). Settings added since version 1 are optional: a file without
              one was made with the value in ADDED (no "sampler": "ddpm", the only sampler then).
              Version 2: keep_last_noise with sampler dpmsolver++ means its sigma_min grid (exact); a version 1
              file with both was made on the zero grid, which this version no longer runs, and is refused.
"""
import json
from dataclasses import fields

import torch
from safetensors import safe_open
from safetensors.torch import save as save_bytes

from ..errors import InversionError, InversionFileError
from ..inversion import Inversion, InversionSettings
from ..model import StableDiffusion
from ..sampler import SAMPLERS
from .files import atomic

FORMAT, VERSION = "minledits.inversion", 2
SETTINGS = [f.name for f in fields(InversionSettings)]
ADDED = {"sampler": "ddpm", "zero_noise_steps": 1}  # settings newer than version 1, what a file without them means


def is_inversion(path) -> bool:
    """Whether path is a minledits inversion file, by its content (safetensors metadata), whatever its name."""
    try:
        with safe_open(str(path), "pt") as f:
            return json.loads((f.metadata() or {}).get("format", "null")) == FORMAT
    except Exception:  # not a file, not safetensors, not JSON metadata
        return False


def save(inv: Inversion, path) -> None:
    """Write `inv` to `path`, atomically."""
    H, W = inv.image.shape[-2:]
    meta = dict(format=FORMAT, version=VERSION, model_id=inv.model_id, fingerprint=inv.fingerprint,
                dtype=str(inv.xts.dtype).removeprefix("torch."), resolution=f"{W}x{H}", **inv.settings.dict())
    tensors = {"xts": inv.xts, "zs": inv.zs, "timesteps": torch.tensor(inv.timesteps, dtype=torch.int64),
               "image": inv.image.float()}
    with atomic(path) as tmp:  # the bytes, then one write: safetensors' save_file leaves its own temporaries
        tmp.write_bytes(save_bytes({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                                   {k: json.dumps(v) for k, v in meta.items()}))


def load(path) -> Inversion:
    """Read an inversion file."""
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
        raise InversionFileError(f"{path} has inversion format version {meta.get('version')!r}; "
                                 f"this minledits reads <= {VERSION}")
    if meta.get("sampler", ADDED["sampler"]) not in SAMPLERS:
        raise InversionFileError(f"{path} was made with sampler {meta['sampler']!r}, which this minledits does not "
                                 f"have ({', '.join(SAMPLERS)}): invert again")
    if meta["version"] < 2 and meta.get("sampler") == "dpmsolver++" and meta.get("keep_last_noise") is True:
        raise InversionFileError(f"{path} is a version 1 dpmsolver++ inversion with keep_last_noise, whose grid "
                                 "this minledits no longer runs (it is exact now): invert again")
    try:
        given = {**ADDED, **meta}
        settings = InversionSettings(**{k: given[k] for k in SETTINGS})
        inv = Inversion([int(t) for t in tensors["timesteps"]], tensors["xts"], tensors["zs"], tensors["image"],
                        settings, str(meta["model_id"]), str(meta["fingerprint"]))
    except KeyError as e:
        raise InversionFileError(f"{path} is a damaged minledits inversion file (missing {e})") from e
    except (TypeError, ValueError) as e:
        raise InversionFileError(f"{path} is a damaged minledits inversion file ({e})") from e
    if meta.get("resolution") != "{1}x{0}".format(*inv.image.shape[-2:]):
        raise InversionFileError(f"{path} is a damaged minledits inversion file (its resolution "
                                 f"{meta.get('resolution')!r} disagrees with its image)")
    try:
        inv.check_tensors(str(path))
    except InversionError as e:
        raise InversionFileError(str(e)) from None
    return inv


def check_made_with(inv: Inversion, sd: StableDiffusion | None = None, source="the inversion", **settings) -> None:
    """Refuse an inversion made with other settings than those given (e.g. size=512), or with another model than sd."""
    H, W = inv.image.shape[-2:]
    for k, v in settings.items():
        if v != getattr(inv.settings, k):
            raise InversionFileError(f"{source} was made with {k}={getattr(inv.settings, k)!r} ({W}x{H} px), "
                                     f"not {v!r}: leave the option out, or invert again")
    if sd is not None:
        inv.check_model(sd, source)

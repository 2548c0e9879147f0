"""Files in and out, safely: atomic writes (nothing half-written is ever left under the final name) and the
refusal of pickle checkpoints (unpickling can run arbitrary code)."""
import os
from contextlib import contextmanager
from pathlib import Path

from .errors import LoadError

PICKLES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")


def refuse_pickle(path) -> None:
    """Raise a LoadError for a pickle checkpoint (by suffix): minledits reads only safetensors."""
    if Path(path).suffix in PICKLES:
        raise LoadError(f"{path} is a pickle checkpoint, which can run arbitrary code when loaded; "
                        "minledits reads only .safetensors: get the model's safetensors files instead")


def umask() -> int:
    """The process umask (reading it means setting it: it is put back at once)."""
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


@contextmanager
def atomic(path):
    """Yield a temporary name beside `path`; rename it to `path` on success, delete it on any failure."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~umask())  # like a plain open(): some writers create files private (0600)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)

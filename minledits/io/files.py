"""Files in and out, safely: atomic writes (nothing half-written is ever left under the final name, and the
temporaries of killed writers are cleaned up), and the refusal of pickle
checkpoints (unpickling can run arbitrary code)."""
import os
import re
from contextlib import contextmanager
from pathlib import Path

from ..errors import LoadError, MinleditsError

PICKLES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
TEMPORARY = re.compile(r"\.(.+)\.(\d+)\.tmp")  # atomic()'s temporaries: .NAME.PID.tmp


def refuse_pickle(path) -> None:
    """Raise a LoadError for a pickle checkpoint (by suffix): minledits reads only safetensors."""
    if Path(path).suffix in PICKLES:
        raise LoadError(f"{path} is a pickle checkpoint, which can run arbitrary code when loaded; "
                        "minledits reads only .safetensors: get the model's safetensors files instead")


def require_regular(path, what: str = "the input", error: type[MinleditsError] = MinleditsError) -> Path:
    """path, if it names a regular file (or a link to one); else a one-line `error`, before anything opens it: a named
    pipe would block the reader for ever, a device or folder fail later and less clearly."""
    path = Path(path)
    if not path.exists():
        raise error(f"{what} {path} does not exist")
    if not path.is_file():
        kind = "a folder" if path.is_dir() else "a named pipe" if path.is_fifo() else "not a regular file"
        raise error(f"{what} {path} is {kind}: give a regular file")
    return path


def umask() -> int:
    """The process umask (reading it means setting it: it is put back at once)."""
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


def alive(pid: int) -> bool:
    """Whether a process `pid` runs on this machine (signal 0 only asks)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # someone else's process, or no pid at all: not ours to judge
        return True
    return True


def clean_temporaries(folder: Path) -> None:
    """Delete the temporaries that killed writers left in `folder`: `.NAME.PID.tmp` whose PID no longer runs.
    (A writer on another machine sharing the folder cannot be seen; its PID looks dead.)"""
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process there
        return
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        m = TEMPORARY.fullmatch(name)
        if m and not alive(int(m[2])):
            try:
                os.unlink(folder / name)
            except OSError:  # gone already, or not ours to delete
                pass


@contextmanager
def atomic(path):
    """Yield a temporary name beside `path`; rename it to `path` on success, delete it on any failure.
    An OS error while writing (a full disk) names `path`, not the temporary or nothing."""
    path = Path(path)
    clean_temporaries(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~umask())  # like a plain open(): some writers create files private (0600)
        os.replace(tmp, path)
    except OSError as e:
        if e.filename in (None, tmp, str(tmp)):
            e.filename = str(path)
        raise
    finally:
        tmp.unlink(missing_ok=True)

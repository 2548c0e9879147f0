"""Files in and out, safely: the one rule for every file minledits writes (refuse_output), atomic writes (nothing
half-written is ever left under the final name, and the temporaries of killed minledits writers are cleaned up),
and the refusal of pickle checkpoints (unpickling can run arbitrary code)."""
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path

from ..errors import LoadError, MinleditsError

PICKLES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
MARK = "minledits"
TEMPORARY = re.compile(rf"\.(.+)\.{MARK}-(\d+)\.tmp")  # atomic()'s temporaries: .NAME.minledits-PID.tmp


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


def kind(path: Path) -> str:
    """What a path that exists but is no regular file is, in words (a link is followed)."""
    if not path.exists():
        return "a link to nothing"
    return ("a folder" if path.is_dir() else "a named pipe" if path.is_fifo() else "a socket" if path.is_socket()
            else "a device" if path.is_char_device() or path.is_block_device() else "not a regular file")


def same_file(a, b) -> bool:
    """Whether a and b are one file: the same real path (links, "..") or the same inode (hard links)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        return False


def refuse_output(path, force: bool = True, inputs=(), name: str = "") -> bool:
    """The one rule for every file minledits writes, before any work: never one of the command's own inputs,
    never what is not a regular file (a device, named pipe, socket, folder, or a link to one), both even with
    --force; an existing file only with `force`. A one-line MinleditsError; else whether the file exists.
    name: how the message names the output (its option), before the path."""
    path = Path(path)
    label = f"{name} {path}" if name else str(path)
    for given in (p for p in inputs if p is not None):
        if same_file(path, given):
            raise MinleditsError(f"{label} is also an input of this command: minledits never writes over its "
                                 "inputs, even with --force; choose another output name")
    if not os.path.lexists(path):
        return False
    if not path.is_file():
        raise MinleditsError(f"{label} is {kind(path)}: minledits writes only regular files, even with --force; "
                             "choose another output name")
    if not force:
        raise MinleditsError(f"{label} exists: add --force to overwrite it")
    return True


def require_writable(path, name: str = "") -> None:
    """A one-line MinleditsError, before any work, unless the folder of the output `path` takes a new file; it names
    the folder (not a temporary)."""
    folder, label = Path(path).parent, f"{name} {path}" if name else str(path)
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise MinleditsError(f"cannot write {label}: {folder} {what}: name an existing folder")
    try:
        most = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # no such query here (Windows): the common limit
        most = 255
    extra = len(os.fsencode(temporary(path).name)) - len(os.fsencode(Path(path).name))
    if len(os.fsencode(temporary(path).name)) > most:
        raise MinleditsError(f"cannot write {label}: its name is {len(os.fsencode(Path(path).name))} bytes, and "
                             f"{folder} takes names up to {most} bytes ({extra} more for minledits' temporary): "
                             "give a shorter name")
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise MinleditsError(f"cannot write {label}: {folder} is not a writable folder ({e.strerror})") from e


def identity(path):
    """(device, inode, modification time) of path, None where it does not exist: a rewrite (atomic's rename) makes
    a new one."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_mtime_ns


@contextmanager
def all_or_none(paths, keep_on_interrupt=()):
    """The outputs of one command: on a failure inside, those it already wrote are removed, so that a rerun starts
    clean (no --force needed, nothing of the failed run left). An interrupt (Ctrl-C) keeps `keep_on_interrupt`:
    work saved for the rerun to use (a saved inversion, whose refusal message says how)."""
    before = {Path(p): identity(p) for p in paths}
    try:
        yield
    except BaseException as e:
        kept = {Path(p) for p in keep_on_interrupt} if isinstance(e, KeyboardInterrupt) else set()
        for p, was in before.items():
            if p not in kept and identity(p) != was:
                try:
                    p.unlink()
                except OSError:
                    pass
        raise


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
    """Delete the temporaries that killed minledits writers left in `folder`: `.NAME.minledits-PID.tmp` whose PID no
    longer runs; no other name (another program's `.NAME.PID.tmp` is not ours). (A writer on another machine
    sharing the folder cannot be seen; its PID looks dead.)"""
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


def temporary(path) -> Path:
    """The temporary name under which atomic() writes `path` (TEMPORARY)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{MARK}-{os.getpid()}.tmp")


@contextmanager
def atomic(path):
    """Yield a temporary name beside `path`; rename it to `path` on success, delete it on any failure.
    What is not a regular file is never replaced (refuse_output; the command checked the rest before its work).
    An OS error while writing (a full disk) names `path`, not the temporary or nothing."""
    path = Path(path)
    refuse_output(path)
    clean_temporaries(path.parent)
    tmp = temporary(path)
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

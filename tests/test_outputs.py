"""Issue 26, section 1: one rule for every file a command writes. --force overwrites regular files only; no command
writes over its own inputs; the temporary-file cleanup removes only minledits' own temporaries; a command that
fails part-way leaves none of its outputs, so that the rerun works. On random-tiny, 64 px, few steps.
"""
import errno
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from minledits import cli
from minledits.cli import commands as cli_commands
from minledits.cli import many as cli_many
from minledits.io import files
from minledits.tools import trace as trace_module
from tests.helpers import run

TINY = ["--model", "random-tiny", "--steps", "6", "--skip", "2", "--size", "64", "-q"]
NO_WORK = AssertionError("the work started")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    y, x = np.mgrid[0:64, 0:64]
    path = tmp_path_factory.mktemp("photo") / "photo.png"
    Image.fromarray(np.stack([x * 3, y * 2, (x + y) % 256], -1).astype(np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def inv(photo, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("inv") / "inv.safetensors"
    assert cli.main([str(a) for a in ["invert", photo, "-o", path, *TINY]]) == 0
    return path


@pytest.fixture
def no_work(monkeypatch):
    for module in (cli_commands, cli_many):
        monkeypatch.setattr(module, "model_of", lambda *a: (_ for _ in ()).throw(NO_WORK))
    monkeypatch.setattr(cli_commands, "inversion_of", lambda *a, **k: (_ for _ in ()).throw(NO_WORK))


def one_error(rc, err, *words, code=1):
    lines = err.strip().splitlines()
    assert rc == code and len(lines) == 1 and lines[0].startswith("minledits: error: "), (rc, err)
    assert all(w in lines[0] for w in words), (words, lines[0])


def fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def device(path: Path) -> Path:
    if os.geteuid() != 0:
        pytest.skip("making a device node needs root")
    os.mknod(path, 0o666 | 0o020000, os.makedev(1, 3))  # a character device like /dev/null
    return path


def unix_socket(path: Path) -> Path:
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()
    return path


def folder(path: Path) -> Path:
    path.mkdir()
    return path


def link_to_fifo(path: Path) -> Path:
    target = fifo(path.with_name("target-fifo"))
    path.symlink_to(target)
    return path


def dangling(path: Path) -> Path:
    path.symlink_to(path.with_name("nowhere"))
    return path


KINDS = {"device": (device, "a device"), "fifo": (fifo, "a named pipe"), "socket": (unix_socket, "a socket"),
         "folder": (folder, "a folder"), "link": (link_to_fifo, "a named pipe"), "dangling": (dangling, "a link")}


# --------------------------------------------------------------------------------------------- 1. no regular file
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("force", [[], ["--force"]])
@pytest.mark.parametrize("option", ["-o", "--save-inversion", "--trace"])
def test_force_overwrites_regular_files_only(inv, tmp_path, capsys, no_work, kind, force, option):
    make, words = KINDS[kind]
    name = {"-o": "e.png", "--save-inversion": "s.safetensors", "--trace": "t.png"}[option]
    target = make(tmp_path / name)
    argv = ["edit", inv, "-e", "x", *force, "-q"]
    argv += ["-o", target] if option == "-o" else ["-o", tmp_path / "e.png", option, target]
    rc, _, err = run(capsys, *argv)
    if kind == "folder" and option == "-o":
        words = "is a folder"
    one_error(rc, err, str(target), words)
    assert os.path.lexists(target) and not os.path.isfile(target) and not (tmp_path / "e.png").is_file()


@pytest.mark.parametrize("kind", ["device", "fifo", "folder"])
def test_the_writer_itself_never_replaces_what_is_no_regular_file(tmp_path, kind):
    target = KINDS[kind][0](tmp_path / "x.png")
    with pytest.raises(files.MinleditsError, match="writes only regular files"):
        with files.atomic(target) as tmp:
            tmp.write_bytes(b"png")
    assert not files.Path(target).is_file()


@pytest.mark.parametrize("kind", ["device", "fifo", "folder"])
def test_invert_compare_sweep_and_batch_refuse_it_too(photo, inv, tmp_path, capsys, no_work, kind):
    make = KINDS[kind][0]
    target = make(tmp_path / "o.safetensors")
    one_error(*run(capsys, "invert", photo, "-o", target, "--force", *TINY)[::2], str(target))
    target = make(tmp_path / "c.json")
    one_error(*run(capsys, "compare", inv, "-o", tmp_path / "c.png", "-e", "x", "--force")[::2], str(target),
              code=2)
    target = make(tmp_path / "g.csv")
    one_error(*run(capsys, "sweep", inv, "-o", tmp_path / "g.png", "--vary", "concept.0.scale=1,2", "-e", "hat",
                   "--force")[::2],
              str(target), code=2)
    (tmp_path / "out").mkdir()
    target = make(tmp_path / "out" / "j.png")
    jobs = tmp_path / "jobs.json"
    jobs.write_text(json.dumps([{"input": str(inv), "output": "j.png", "concepts": ["x"]}]))
    rc, _, err = run(capsys, "batch", jobs, "--outdir", tmp_path / "out", "--force", "-q")
    assert rc == 1 and str(target) in err, err


def test_a_sweep_with_three_keys_never_writes_over_its_numbered_sheets(inv, tmp_path, capsys, no_work):
    for j in (1, 2):
        (tmp_path / f"g-{j}.png").write_bytes(b"mine")
    rc, _, err = run(capsys, "sweep", inv, "-o", tmp_path / "g.png", "--vary", "concept.0.scale=1,2", "--vary",
                     "target_guidance=7,8", "--vary", "concept.0.warmup=0,1", "-e", "hat", "--clip-model", "none")
    assert rc == 2 and f"{tmp_path / 'g-1.png'} exists" in err, err
    assert [(tmp_path / f"g-{j}.png").read_bytes() for j in (1, 2)] == [b"mine"] * 2


# --------------------------------------------------------------------------------------------- 2. inputs
@pytest.mark.parametrize("force", [[], ["--force"]])
def test_no_command_writes_over_its_own_inputs(photo, inv, tmp_path, capsys, no_work, force):
    before = {p: p.read_bytes() for p in (photo, inv)}
    link = tmp_path / "link.png"
    link.symlink_to(photo)
    hard = tmp_path / "hard.safetensors"
    os.link(inv, hard)
    cell = tmp_path / "g" / "000.png"  # a sweep's first cell
    cell.parent.mkdir()
    cell.write_bytes(photo.read_bytes())
    for argv in (["edit", photo, "-o", photo, "-e", "x"], ["edit", photo, "-o", link, "-e", "x"],
                 ["edit", inv, "-o", tmp_path / "e.png", "--save-inversion", hard, "-e", "x"],
                 ["edit", inv, "-o", tmp_path / "e.png", "--user-mask", photo, "--trace", photo.with_suffix(""),
                  "--method", "leditspp", "-e", "x"],
                 ["edit", inv, "-o", tmp_path / "e.png", "--save-inversion", inv, "-e", "x"],
                 ["edit", inv, "-o", tmp_path / "e.png", "--trace", inv.with_suffix(""), "-e", "x"]):
        one_error(*run(capsys, *argv, *force)[::2], "is also an input")
    for argv in (["compare", photo, "-o", photo, "-e", "x"], ["compare", photo, "-o", link, "-e", "x"],
                 ["sweep", photo, "-o", photo, "--vary", "seed=1,2", "--size", "64"],
                 ["sweep", cell, "-o", tmp_path / "g.png", "--vary", "seed=1,2", "--size", "64"]):
        one_error(*run(capsys, *argv, *force)[::2], "is also an input", code=2)
    assert {p: p.read_bytes() for p in before} == before


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_a_batch_job_naming_an_input_as_output_is_a_failure(inv, tmp_path, capsys, no_work, force):
    jobs = tmp_path / "jobs.json"
    text = json.dumps([{"input": "in.safetensors", "output": "jobs.json", "concepts": ["x"]},
                       {"input": "in.safetensors", "output": "in.safetensors", "concepts": ["x"]}])
    jobs.write_text(text)
    (tmp_path / "in.safetensors").write_bytes(inv.read_bytes())
    rc, out, err = run(capsys, "batch", jobs, "--outdir", tmp_path, *force, "-q")
    assert rc == 1 and err.count("is also an input") == 2, err
    assert "0 skipped" in out and "2 failed" in out, out
    assert jobs.read_text() == text and (tmp_path / "in.safetensors").read_bytes() == inv.read_bytes()


def test_no_batch_job_writes_over_another_jobs_input(inv, tmp_path, capsys, no_work):
    (tmp_path / "in.safetensors").write_bytes(inv.read_bytes())
    (tmp_path / "other.safetensors").write_bytes(inv.read_bytes())
    jobs = tmp_path / "jobs.json"
    jobs.write_text(json.dumps([{"input": "in.safetensors", "output": "o.png", "save_inversion": "other.safetensors",
                                 "concepts": ["x"]},
                                {"input": "other.safetensors", "output": "p.png", "concepts": ["x"]}]))
    rc, _, err = run(capsys, "batch", jobs, "--outdir", tmp_path, "--force", "-q")
    assert rc == 1 and "job 0" in err and "is also an input" in err, err
    assert (tmp_path / "other.safetensors").read_bytes() == inv.read_bytes()


# --------------------------------------------------------------------------------------------- 3. temporaries
def test_only_minledits_own_temporaries_are_cleaned(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    names = {f".a.png.minledits-{dead.pid}.tmp": False, f".x.{dead.pid}.tmp": True, ".x.123.tmp": True,
             f".b.png.minledits-{os.getpid()}.tmp": True, ".c.png.minledits-.tmp": True, "d.minledits-1.tmp": True}
    for name in names:
        (tmp_path / name).write_bytes(b"half")
    with files.atomic(tmp_path / "new.txt") as tmp:
        assert files.TEMPORARY.fullmatch(tmp.name)
        tmp.write_text("whole")
    assert {p.name for p in tmp_path.iterdir()} == {n for n, kept in names.items() if kept} | {"new.txt"}


# --------------------------------------------------------------------------------------------- 4. rerun
def test_a_failure_part_way_leaves_no_outputs_and_the_rerun_works(inv, tmp_path, capsys, monkeypatch):
    argv = ["edit", inv, "-o", tmp_path / "e.png", "--trace", tmp_path / "t", "--compare", "-e", "x", "-q"]
    real = trace_module.Trace.picture

    def full(self):  # the trace's tensors are written, then its picture meets a full disk
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "t.png"))
    monkeypatch.setattr(trace_module.Trace, "picture", full)
    rc, _, err = run(capsys, *argv)
    assert rc == 1 and "disk is full" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    monkeypatch.setattr(trace_module.Trace, "picture", real)
    assert run(capsys, *argv)[0] == 0
    assert {p.name for p in tmp_path.iterdir()} == {"e.png", "e-compare.png", "t.safetensors", "t.png"}


def test_a_failure_keeps_what_force_did_not_replace(inv, tmp_path, capsys, monkeypatch):
    (tmp_path / "e.png").write_bytes(b"old")
    monkeypatch.setattr(trace_module.Trace, "picture", lambda self: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, "No space left on device")))
    rc, _, _ = run(capsys, "edit", inv, "-o", tmp_path / "e.png", "--trace", tmp_path / "t", "-e", "x", "--force")
    assert rc == 1 and (tmp_path / "e.png").read_bytes() == b"old" and not (tmp_path / "t.safetensors").exists()


def test_a_batch_redoes_only_the_failed_job_without_force(inv, tmp_path, capsys, monkeypatch):
    jobs = tmp_path / "jobs.json"
    jobs.write_text(json.dumps([{"input": str(inv), "output": "a.png", "concepts": ["x"], "trace": "ta"},
                                {"input": str(inv), "output": "b.png", "concepts": ["y"], "trace": "tb"}]))
    real, calls = trace_module.Trace.picture, []

    def second_fails(self):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self)
    monkeypatch.setattr(trace_module.Trace, "picture", second_fails)
    out = tmp_path / "out"
    rc, printed, err = run(capsys, "batch", jobs, "--outdir", out, "-q")
    assert rc == 1 and "1 failed" in printed, err
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "ta.png", "ta.safetensors"]
    a = (out / "a.png").read_bytes()
    rc, printed, err = run(capsys, "batch", jobs, "--outdir", out, "-q")
    assert rc == 0 and "1 done, 1 skipped" in printed, err
    assert (out / "a.png").read_bytes() == a and (out / "b.png").exists() and (out / "tb.png").exists()


def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_compare_that_fails_part_way_leaves_nothing(inv, tmp_path, capsys, monkeypatch):
    argv = ["compare", inv, "-o", tmp_path / "c.png", "-e", "x", "--clip-model", "none", "-q"]
    monkeypatch.setattr(cli_many.sweep, "write_json", full)
    rc, _, err = run(capsys, *argv)
    assert rc == 1 and "disk is full" in err and list(tmp_path.iterdir()) == [], err
    monkeypatch.undo()
    assert run(capsys, *argv)[0] == 0 and (tmp_path / "c.json").exists()


def test_a_sweep_whose_table_fails_reruns_without_force(inv, tmp_path, capsys, monkeypatch):
    argv = ["sweep", inv, "-o", tmp_path / "g.png", "--vary", "concept.0.scale=1,2", "-e", "hat",
            "--clip-model", "none", "-q"]
    monkeypatch.setattr(cli_many.sweep, "write_table", full)
    assert run(capsys, *argv)[0] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g"]  # the cells are kept: the rerun uses them
    monkeypatch.undo()
    rc, printed, err = run(capsys, *argv)
    assert rc == 0 and "0 cells done, 2 kept" in printed, err
    assert (tmp_path / "g.png").exists() and (tmp_path / "g.csv").exists()


# --------------------------------------------------------------------------------------------- 5. before any work
READ_ONLY = {  # argv after the command, its input and the folder `ro` that takes no file; what names the folder
    "edit": ["edit", "{inv}", "-o", "{ro}/o.png", "-e", "x"],
    "edit --trace": ["edit", "{inv}", "-o", "{d}/o.png", "--trace", "{ro}/t", "-e", "x"],
    "edit --save-inversion": ["edit", "{photo}", "-o", "{d}/o.png", "--save-inversion", "{ro}/i.safetensors"],
    "invert": ["invert", "{photo}", "-o", "{ro}/i.safetensors"],
    "reconstruct": ["reconstruct", "{inv}", "-o", "{ro}/o.png"],
    "batch --outdir": ["batch", "{d}/jobs.json", "--outdir", "{ro}"],
    "sweep": ["sweep", "{inv}", "-o", "{ro}/o.png", "--vary", "concept.0.scale=1,2", "-e", "x"],
    "compare": ["compare", "{inv}", "-o", "{ro}/o.png", "-e", "x"],
}


@pytest.mark.parametrize("case", READ_ONLY)
def test_a_folder_that_takes_no_file_is_found_before_any_work(photo, inv, tmp_path, capsys, no_work, monkeypatch,
                                                              case):
    ro, make_file = tmp_path / "ro", files.tempfile.TemporaryFile
    ro.mkdir()

    def read_only(*args, **kwargs):  # as root a chmod would not stop the writes
        if Path(kwargs["dir"]) == ro:
            raise PermissionError(errno.EACCES, "Permission denied", str(kwargs["dir"] / ".tmpx"))
        return make_file(*args, **kwargs)
    monkeypatch.setattr(files.tempfile, "TemporaryFile", read_only)
    (tmp_path / "jobs.json").write_text(json.dumps([{"input": str(inv), "concepts": ["x"]}]))
    argv = [a.format(inv=inv, photo=photo, ro=ro, d=tmp_path) for a in READ_ONLY[case]]
    rc, printed, err = run(capsys, *argv, "-q")
    words = (f"{ro} is not a writable folder", "Permission denied")
    if case == "batch --outdir":  # the job fails, the batch says so
        assert rc == 1 and "1 failed (job 0)" in printed and err.startswith("minledits: job 0 ("), (rc, printed, err)
        assert err.count("\n") == 1 and all(w in err for w in words), err
    else:
        one_error(rc, err, *words, code=2 if case in ("sweep", "compare") else 1)
    assert ".tmp" not in err and list(ro.iterdir()) == []


@pytest.mark.parametrize("command", ["edit", "invert", "reconstruct"])
@pytest.mark.parametrize("folder, says", [("nope", "does not exist"), ("photo.png", "is not a folder")])
def test_an_output_folder_that_is_missing_or_a_file_is_named(photo, inv, tmp_path, capsys, no_work, command, folder,
                                                             says):
    (tmp_path / "photo.png").write_bytes(photo.read_bytes())
    out = tmp_path / folder / ("o.safetensors" if command == "invert" else "o.png")
    extra = ["-e", "x"] if command == "edit" else []
    rc, _, err = run(capsys, command, photo if command == "invert" else inv, "-o", out, *extra, "-q")
    one_error(rc, err, f"cannot write -o {out}: {tmp_path / folder} {says}: name an existing folder")


@pytest.mark.parametrize("name", ["o.jpg", "o.JPEG", "o.webp", "o.tif", "o.ppm", "o.txt", "o.json", "o.png.gz"])
def test_an_output_named_for_another_format_is_refused(inv, tmp_path, capsys, no_work, name):
    one_error(*run(capsys, "edit", inv, "-o", tmp_path / name, "-e", "x")[::2], name, "PNG", "o.png")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["o", "v1.5-edit", "o.PNG"])
def test_an_output_name_that_names_no_other_format_is_taken(inv, tmp_path, capsys, name):
    rc, _, err = run(capsys, "edit", inv, "-o", tmp_path / name, "-e", "x", "-q")
    assert rc == 0 and Image.open(tmp_path / name).format == "PNG", err

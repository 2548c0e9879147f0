"""`minledits batch` (random-tiny, 64 px, 6 steps) and the sweep's table: file names from the jobs file under any
locale, --outdir that is a file, each job's folders checked before any work, keys a job cannot have, a jobs file
without jobs; a sweep's table with a file name that is no UTF-8."""
import csv
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import minledits
from minledits.cli import many as cli_many
from minledits.io import files
from tests.helpers import photo, run

TINY = ["--model", "random-tiny", "-q"]
JOB = {"steps": 6, "skip": 2, "size": 64, "concepts": ["hat"]}
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def image(tmp_path):
    photo(size=(64, 64)).save(tmp_path / "photo.png")
    return tmp_path / "photo.png"


def batch(capsys, tmp_path, jobs, *flags, outdir="out"):
    (tmp_path / "jobs.json").write_text(json.dumps(jobs, ensure_ascii=False), encoding="utf-8")
    return run(capsys, "batch", tmp_path / "jobs.json", "--outdir", tmp_path / outdir, *TINY, *flags)


@pytest.fixture
def edits(monkeypatch):
    """The jobs that reached their work (cmd_edit), by output name."""
    done, cmd_edit = [], cli_many.cmd_edit
    monkeypatch.setattr(cli_many, "cmd_edit", lambda args, *a: (done.append(Path(args.output).name),
                                                                 cmd_edit(args, *a))[1])
    return done


def test_non_ascii_names_in_the_jobs_file_under_an_ascii_locale(image, tmp_path):
    """LC_ALL=C PYTHONUTF8=0: the names are the UTF-8 bytes, as the command line gives them there, and the run
    exits 0 (it wrote the file and then failed)."""
    (tmp_path / "phöto.png").write_bytes(image.read_bytes())
    jobs = [{"input": "phöto.png", "output": "café.png", "target_prompt": "un café", **JOB},
            {"input": "phöto.png", "output": "sub/ünter.png", "save_inversion": "ï.safetensors", **JOB}]
    (tmp_path / "jobs.json").write_text(json.dumps(jobs, ensure_ascii=False), encoding="utf-8")
    root = str(Path(minledits.__file__).parents[1])
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONIOENCODING": "",
           "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "minledits", "batch", "jobs.json", "--outdir", "out", *TINY],
                          cwd=tmp_path, env=env, capture_output=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert b"batch: 2 done, 0 skipped (output exists), 0 failed" in done.stdout
    out = os.fsencode(tmp_path / "out")
    assert sorted(os.listdir(out)) == sorted(["café.png".encode(), b"sub", "ï.safetensors".encode()])
    assert os.listdir(os.path.join(out, b"sub")) == ["ünter.png".encode()]


def test_a_file_name_that_is_no_utf8_round_trips_through_the_jobs_file(image, tmp_path, capsys):
    """A name minledits wrote in JSON as \\udcNN (a byte that is no UTF-8) names that byte."""
    (tmp_path / os.fsdecode(b"ph\xffto.png")).write_bytes(image.read_bytes())
    (tmp_path / "jobs.json").write_text(json.dumps([{"input": os.fsdecode(b"ph\xffto.png"), "output": "a.png", **JOB}]))
    rc, printed, err = run(capsys, "batch", tmp_path / "jobs.json", "--outdir", tmp_path / "out", *TINY)
    assert rc == 0 and (tmp_path / "out" / "a.png").is_file(), err


def test_an_outdir_that_is_a_file_is_one_line(image, tmp_path, capsys):
    (tmp_path / "out").write_text("mine")
    rc, printed, err = batch(capsys, tmp_path, [{"input": str(image), **JOB}])
    assert rc == 1 and printed == "" and err.splitlines() == [
        f"minledits: error: --outdir {tmp_path / 'out'} exists and is not a folder: name a folder (made if missing)"]
    assert (tmp_path / "out").read_text() == "mine"


@pytest.mark.parametrize("output", ["ro/x.png", "ro/sub/x.png"])
def test_each_jobs_folder_is_checked_before_any_work(image, tmp_path, capsys, monkeypatch, edits, output):
    """The second job's folder takes no file (or cannot be made): it fails before the first job's work."""
    ro, make_file = tmp_path / "out" / "ro", files.tempfile.TemporaryFile
    ro.mkdir(parents=True)

    def read_only(*args, **kwargs):  # as root a chmod would not stop the writes
        if Path(kwargs["dir"]) == ro:
            raise PermissionError(errno.EACCES, "Permission denied", str(kwargs["dir"] / ".tmpx"))
        return make_file(*args, **kwargs)

    monkeypatch.setattr(files.tempfile, "TemporaryFile", read_only)
    rc, printed, err = batch(capsys, tmp_path, [{"input": str(image), "output": "a.png", **JOB},
                                                {"input": str(image), "output": output, **JOB}])
    assert rc == 1 and "batch: 1 done, 0 skipped (output exists), 1 failed (job 1)" in printed
    assert err.startswith("minledits: job 1 (") and err.count("\n") == 1, err
    assert f"{ro} is not a writable folder (Permission denied)" in err and ".tmp" not in err
    if output == "ro/sub/x.png":
        assert f"{tmp_path / 'out' / 'ro' / 'sub' / 'x.png'}'s folder {ro / 'sub'}" in err
    assert edits == ["a.png"] and list(ro.iterdir()) == []


@pytest.mark.parametrize("where", ["job", "defaults"])
@pytest.mark.parametrize("force", [True, False])
def test_a_job_with_force_is_refused(image, tmp_path, capsys, where, force):
    """--force is the batch's (every job's outputs): a job's "force" would be ignored without a word."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a.png").write_bytes(b"mine")
    job = {"input": str(image), "output": "a.png", **JOB}
    jobs = {"defaults": {"force": force}, "jobs": [job]} if where == "defaults" else [{**job, "force": force}]
    rc, printed, err = batch(capsys, tmp_path, jobs)
    assert rc == 1 and "0 done, 0 skipped (output exists), 1 failed (job 0)" in printed
    assert err.count("\n") == 1 and err.startswith("minledits: job 0 (") and '"force" is not an option of a job' in err
    assert (tmp_path / "out" / "a.png").read_bytes() == b"mine"


@pytest.mark.parametrize("jobs", [[], {"jobs": []}, {"defaults": {"steps": 6}, "jobs": []}])
def test_a_jobs_file_without_jobs_is_one_line(tmp_path, capsys, jobs):
    rc, printed, err = batch(capsys, tmp_path, jobs)
    assert rc == 1 and printed == "" and err.splitlines() == [
        f"minledits: error: {tmp_path / 'jobs.json'}: no jobs (an empty list): list the edits to make"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text, where", [("photo.jpg -o a.png -e glasses\n", "line 1, column 1"),
                                         ("", "line 1, column 1"), ('[{"input": "a.jpg",}]', "line 1, column 20")])
def test_a_jobs_file_that_is_not_json_is_one_line(tmp_path, capsys, text, where):
    (tmp_path / "jobs.json").write_text(text, encoding="utf-8")
    rc, printed, err = run(capsys, "batch", tmp_path / "jobs.json", "--outdir", tmp_path / "out", *TINY)
    assert rc == 1 and printed == "" and err.count("\n") == 1, err
    assert err.startswith(f"minledits: error: {tmp_path / 'jobs.json'} is not JSON (") and f"at {where}): " in err
    assert not (tmp_path / "out").exists()


def test_a_sweep_table_with_a_file_name_that_is_no_utf8(image, tmp_path, capsys):
    """The CSV holds the name's bytes as they are, the JSON the \\udcNN that stand for them."""
    out = tmp_path / os.fsdecode(b"g\xff.png")
    rc, printed, err = run(capsys, "sweep", image, "-o", out, *TINY, "--steps", "6", "--skip", "2", "--size", "64",
                           "--vary", "target_guidance=5,7", "-e", "hat", "--clip-model", "none")
    assert rc == 0 and "sweep: 2 cells done" in printed, err
    rows = list(csv.DictReader(out.with_suffix(".csv").open(encoding="utf-8", errors="surrogateescape")))
    assert [os.fsencode(r["file"]) for r in rows] == [b"g\xff/000.png", b"g\xff/001.png"]
    table = json.loads(out.with_suffix(".json").read_text())
    assert os.fsencode(table["sheets"][0]) == b"g\xff.png" and (tmp_path / table["cells"][1]["file"]).is_file()

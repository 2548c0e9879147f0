"""Nothing lost, nothing silent: the command line's refusals and its behaviour under faults.

No output is overwritten without --force (batch jobs included, and never outside --outdir unless allowed), two
outputs are never one file, names are checked before any work, odd file names work, a full disk names the file,
and the temporaries of killed writers are cleaned up. On random-tiny, 64 px, few steps.
"""
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from minledits import cli
from minledits.cli import commands as cli_commands
from minledits.cli import many as cli_many
from minledits.errors import shorten
from minledits.io import files, store
from tests.helpers import console_script, run

TINY = ["--model", "random-tiny", "--steps", "6", "--skip", "2", "--size", "64", "-q"]
NO_WORK = AssertionError("the work started")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    y, x = np.mgrid[0:64, 0:72]
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
    """Loading a model fails the test: what it guards must be refused before any work."""
    for module in (cli_commands, cli_many):
        monkeypatch.setattr(module, "model_of", lambda *a: (_ for _ in ()).throw(NO_WORK))


def one_error(rc, err, *words):
    lines = err.strip().splitlines()
    assert rc == 1 and len(lines) == 1 and lines[0].startswith("minledits: error: "), (rc, err)
    assert all(w in lines[0] for w in words), (words, lines[0])


def snapshot(folder: Path) -> dict:
    """{path: bytes} of every file under folder (symbolic links not followed)."""
    return {Path(d) / f: (Path(d) / f).read_bytes() for d, _, names in os.walk(folder) for f in names
            if not (Path(d) / f).is_symlink()}


def batch(capsys, tmp_path, jobs, *flags, outdir="out"):
    (tmp_path / "jobs.json").write_text(json.dumps({"defaults": {"model": "random-tiny", "steps": 4, "skip": 1,
                                                                 "size": 64}, "jobs": jobs}))
    return run(capsys, "batch", tmp_path / "jobs.json", "--outdir", tmp_path / outdir, "-q", *flags)


# --------------------------------------------------------------------------------------------- data loss
@pytest.mark.parametrize("where", ["..", "absolute", "symlink"])
def test_batch_job_outside_outdir_is_refused(where, photo, tmp_path, capsys):
    (tmp_path / "victim.png").write_bytes(b"the user's photo")
    (tmp_path / "out").mkdir()
    if where == "symlink":
        (tmp_path / "out" / "link").symlink_to(tmp_path)
    trace = {"..": "../victim", "absolute": str(tmp_path / "victim"), "symlink": "link/victim"}[where]
    jobs = [{"input": str(photo), "output": "a.png", "trace": trace}, {"input": str(photo), "output": "b.png"}]
    before = snapshot(tmp_path)
    rc, out, err = batch(capsys, tmp_path, jobs)
    assert rc == 1 and "1 done, 0 skipped (output exists), 1 failed (job 0)" in out
    assert err.count("\n") == 1 and f"job 0 ({photo}) failed: \"trace\"" in err
    assert "is outside --outdir" in err and "--allow-outside-outdir" in err
    assert (tmp_path / "victim.png").read_bytes() == b"the user's photo"
    assert set(snapshot(tmp_path)) - set(before) == {tmp_path / "jobs.json", tmp_path / "out" / "b.png"}


def test_batch_outside_outdir_when_allowed_still_never_overwrites(photo, tmp_path, capsys):
    (tmp_path / "victim.png").write_bytes(b"the user's photo")
    jobs = [{"input": str(photo), "output": "a.png", "trace": "../victim"},
            {"input": str(photo), "output": "../new.png"}]
    rc, out, err = batch(capsys, tmp_path, jobs, "--allow-outside-outdir")
    assert rc == 1 and "1 done, 0 skipped (output exists), 1 failed (job 0)" in out
    assert "victim.png exists: add --force" in err and err.count("\n") == 1
    assert (tmp_path / "victim.png").read_bytes() == b"the user's photo" and (tmp_path / "new.png").exists()
    assert "--allow-outside-outdir" in run(capsys, "batch", "--help")[1]


def test_batch_jobs_do_not_overwrite_side_outputs_without_force(photo, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    for name in ["a-compare.png", "s.safetensors", "t.png"]:
        (tmp_path / "out" / name).write_bytes(b"keep")
    jobs = [{"input": str(photo), "output": "a.png", "compare": True},
            {"input": str(photo), "output": "b.png", "save_inversion": "s.safetensors"},
            {"input": str(photo), "output": "c.png", "trace": "t"}]
    rc, out, err = batch(capsys, tmp_path, jobs)
    assert rc == 1 and "0 done, 0 skipped (output exists), 3 failed (job 0, job 1, job 2)" in out
    assert all(f"job {i} ({photo}) failed:" in err for i in range(3)) and err.count("exists: add --force") == 3
    assert all((tmp_path / "out" / n).read_bytes() == b"keep" for n in ["a-compare.png", "s.safetensors", "t.png"])
    rc, out, err = batch(capsys, tmp_path, jobs, "--force")
    assert rc == 0 and "3 done" in out and (tmp_path / "out" / "t.png").read_bytes() != b"keep"
    assert store.is_inversion(tmp_path / "out" / "s.safetensors")


@pytest.mark.skipif(console_script() is None, reason="the minledits console script is not installed (pip install .)")
def test_console_script_batch_spares_the_victim(photo, tmp_path):
    """The reported case, as a user runs it: a job's trace "../victim" must not replace victim.png."""
    Image.new("RGB", (8, 8), "red").save(tmp_path / "victim.png")
    before = (tmp_path / "victim.png").read_bytes()
    job = {"input": str(photo), "trace": "../victim", "concepts": ["x"], "steps": 4, "skip": 1, "size": 64}
    (tmp_path / "jobs.json").write_text(json.dumps([job]))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    done = subprocess.run([console_script(), "batch", str(tmp_path / "jobs.json"), "--outdir", str(tmp_path / "out"),
                           "--model", "random-tiny", "-q"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 1 and "0 done, 0 skipped (output exists), 1 failed (job 0)" in done.stdout
    assert 'job 0' in done.stderr and '"trace"' in done.stderr and "--allow-outside-outdir" in done.stderr
    assert (tmp_path / "victim.png").read_bytes() == before and list((tmp_path / "out").iterdir()) == []


COLLISIONS = {  # argv after "edit INV", the two options the message names
    "-o t.png --trace t": (["-o", "t.png", "--trace", "t"], "-o and --trace both name"),
    "--save-inversion s.png -o s.png": (["--save-inversion", "s.png", "-o", "s.png"], "-o and --save-inversion"),
    "-o s.safetensors --save-inversion s.safetensors": (["-o", "s.safetensors", "--save-inversion", "s.safetensors"],
                                                        "-o and --save-inversion"),
    "--compare and --trace": (["-o", "a.png", "--compare", "--trace", "a-compare"], "--compare and --trace"),
    "one file, two spellings": (["-o", "a.png", "--trace", "sub/../a"], "-o and --trace"),
}


@pytest.mark.parametrize("case", COLLISIONS)
def test_colliding_outputs_are_refused(case, photo, tmp_path, capsys, monkeypatch, no_work):
    argv, words = COLLISIONS[case]
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)
    rc, out, err = run(capsys, "edit", photo, *argv, "-e", "x", *TINY, "--force")
    one_error(rc, err, words, "give them different names")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub"]


def test_batch_duplicate_and_folder_outputs(photo, tmp_path, capsys):
    jobs = [{"input": str(photo), "output": "same.png"}, {"input": str(photo), "output": "same.png"},
            {"input": str(photo), "output": "same.png"}, {"input": str(photo), "output": ""},
            {"input": str(photo), "output": "sub/"}, {"input": str(photo), "output": "x.png", "trace": "y"},
            {"input": str(photo), "output": "y.png"}, {"input": str(photo), "output": "ok.png"}]
    rc, out, err = batch(capsys, tmp_path, jobs)
    assert rc == 1 and "1 done, 0 skipped (output exists), 7 failed (job 0, job 1, job 2, job 3, job 4, job 5, " \
                       "job 6)" in out
    lines = err.strip().splitlines()
    assert len(lines) == 7 and all(line.startswith(f"minledits: job {i} ({photo}) failed: ")
                                   for i, line in enumerate(lines))
    assert '"output"' in lines[0] and 'also the "output" of job 1' in lines[0]
    assert 'also the "output" of job 0' in lines[1] and 'also the "output" of job 0' in lines[2]
    assert "names a folder, not a file" in lines[3] and "names a folder, not a file" in lines[4]
    assert '"trace"' in lines[5] and 'also the "output" of job 6' in lines[5]
    assert '"output"' in lines[6] and 'also the "trace" of job 5' in lines[6]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ok.png"]  # no file "sub", no "same.png"


def test_batch_checks_every_job_before_the_first_runs(photo, tmp_path, capsys):
    """Job 1's bad input is reported before job 0 runs (and fails at its work: --size 100)."""
    jobs = [{"input": str(photo), "output": "a.png", "size": 100}, {"input": 5}, {"input": ["a.png"]},
            {"input": None}, {"input": str(photo), "output": 7}, {"input": str(photo), "trace": True}]
    rc, out, err = batch(capsys, tmp_path, jobs)
    lines = err.strip().splitlines()
    assert rc == 1 and "0 done, 0 skipped (output exists), 6 failed" in out and len(lines) == 6
    assert lines[0] == 'minledits: job 1 failed: "input" must be a file name (a string), not a number'
    assert lines[1] == 'minledits: job 2 failed: "input" must be a file name (a string), not a list'
    assert lines[2] == 'minledits: job 3 failed: "input" must be a file name (a string), not null'
    assert lines[3].endswith('"output" must be a file name (a string), not a number')
    assert lines[4].endswith('"trace" must be a file name (a string), not a boolean')
    assert lines[5].startswith(f"minledits: job 0 ({photo}) failed:") and "size" in lines[5]


def test_batch_job_asking_for_help_does_not_end_the_batch(photo, tmp_path, capsys):
    rc, out, err = batch(capsys, tmp_path, [{"input": str(photo), "help": True}, {"input": str(photo)}])
    assert rc == 1 and "1 done, 0 skipped (output exists), 1 failed (job 0)" in out
    assert err.strip() == f'minledits: job 0 ({photo}) failed: "help" is not an option of a job'


def test_batch_rerun_skips_only_existing_outputs(photo, tmp_path, capsys):
    jobs = [{"input": str(photo), "output": "a.png"}, {"input": str(photo), "output": ""}]
    assert "1 done, 0 skipped (output exists), 1 failed (job 1)" in batch(capsys, tmp_path, jobs)[1]
    rc, out, err = batch(capsys, tmp_path, jobs)
    assert rc == 1 and "0 done, 1 skipped (output exists), 1 failed (job 1)" in out and "job 1" in err


# --------------------------------------------------------------------------------------------- checked in time
@pytest.mark.parametrize("output", ["a_folder", "", "a_folder/", "."])
def test_output_that_is_no_file_is_refused_before_work(output, photo, tmp_path, capsys, monkeypatch, no_work):
    (tmp_path / "a_folder").mkdir()
    monkeypatch.chdir(tmp_path)
    rc, out, err = run(capsys, "edit", photo, "-o", output, "-e", "x", *TINY, "--force")
    one_error(rc, err, "-o", "give a file name" if output == "" else "folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_folder"] and not out


@pytest.mark.parametrize("argv", [["edit", "-e", "a\udcff"], ["edit", "--target-prompt", "a\udcff"],
                                  ["invert", "--source-prompt", "a\udcff"]])
def test_non_utf8_prompt_is_refused_before_work(argv, photo, tmp_path, capsys, no_work):
    out = tmp_path / ("i.safetensors" if argv[0] == "invert" else "o.png")
    rc, _, err = run(capsys, argv[0], photo, "-o", out, *argv[1:], *TINY)
    one_error(rc, err, argv[1], "'a\\udcff' is not UTF-8 text")


def test_non_utf8_input_path(photo, tmp_path, capsys):
    """A name Linux allows but UTF-8 does not decode: the PNG is written, and its "input" round-trips."""
    name = os.fsencode(tmp_path) + b"/photo-\xff.png"
    try:
        shutil.copy(photo, name)
    except OSError:
        pytest.skip("this file system refuses non-UTF-8 names")
    rc, out, err = run(capsys, "edit", os.fsdecode(name), "-o", tmp_path / "o.png", "-e", "x", *TINY)
    assert rc == 0, err
    text = Image.open(tmp_path / "o.png").text
    assert os.fsencode(json.loads(text["minledits"])["input"]) == name
    assert "photo-\\xff.png" in text["parameters"] and "photo-\\xff.png" in out


@pytest.mark.skipif(console_script() is None, reason="the minledits console script is not installed (pip install .)")
def test_console_script_non_utf8_paths(photo, tmp_path):
    """End to end with a strict UTF-8 stdout (as under en_US.UTF-8): input and output names with a \\xff byte."""
    folder = os.fsencode(tmp_path)
    try:
        shutil.copy(photo, folder + b"/in-\xff.png")
    except OSError:
        pytest.skip("this file system refuses non-UTF-8 names")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), PYTHONIOENCODING="utf-8:strict",
               PYTHONUTF8="0")
    cmd = [os.fsencode(console_script()), b"edit", folder + b"/in-\xff.png", b"-o", folder + b"/out-\xff.png",
           *map(os.fsencode, TINY), b"-e", b"x", b"--compare"]
    done = subprocess.run(cmd, capture_output=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert b"in-\\xff.png -> " in done.stdout and b"out-\\xff.png" in done.stdout
    meta = json.loads(Image.open(folder + b"/out-\xff.png").text["minledits"])
    assert os.fsencode(meta["input"]) == folder + b"/in-\xff.png" and os.path.exists(folder + b"/out-\xff-compare.png")


def test_a_name_with_a_newline_is_one_line_and_dash_is_no_file(photo, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, out, err = run(capsys, "edit", photo, "-o", "o\nb.png", "-e", "x", *TINY)
    assert rc == 0 and out.count("\n") == 1 and "-> o\\nb.png in " in out and (tmp_path / "o\nb.png").exists(), err
    rc, out, err = run(capsys, "edit", photo, "-o", "-", "-e", "x", *TINY)
    one_error(rc, err, "-o -: minledits writes files, not standard output")
    assert not (tmp_path / "-").exists()


def test_ascii_locale_non_ascii_names_and_prompts(photo, tmp_path):
    """Under LC_ALL=C (ASCII stdout, file names and arguments as surrogates): a non-ASCII output name is written and
    printed as \\xNN with exit 0 (it used to fail once written), UTF-8 prompts are taken as typed, and a refusal
    naming the file is one line."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), LC_ALL="C", PYTHONUTF8="0")
    env.pop("PYTHONIOENCODING", None)
    cmd = [sys.executable, "-m", "minledits", "edit", str(photo), "-o", "édit.png", *TINY, "-e", "hé",
           "--target-prompt", "un café"]
    runs = [subprocess.run([os.fsencode(a) for a in cmd], capture_output=True, env=env, cwd=tmp_path, timeout=300)
            for _ in range(2)]
    assert runs[0].returncode == 0 and b"-> \\xe9dit.png in " in runs[0].stdout, runs[0]
    assert os.listdir(tmp_path) == ["édit.png"], runs[0]
    text = Image.open(tmp_path / "édit.png").text
    assert "'--target-prompt=un café'" in text["parameters"]
    assert json.loads(text["minledits"])["concepts"][0].startswith("hé:")
    assert runs[1].returncode == 1, runs[1]
    assert runs[1].stderr == b"minledits: error: -o \\xe9dit.png exists: add --force to overwrite it\n"


def test_inversion_recognised_by_content(inv, tmp_path, capsys):
    shutil.copy(inv, tmp_path / "renamed.dat")
    rc, out, err = run(capsys, "reconstruct", tmp_path / "renamed.dat", "-o", tmp_path / "r.png", "-q")
    assert rc == 0, err
    assert json.loads(Image.open(tmp_path / "r.png").text["minledits"])["steps"] == 6  # the file's own settings


def test_inversion_output_must_be_safetensors(photo, tmp_path, capsys, no_work):
    rc, _, err = run(capsys, "invert", photo, "-o", tmp_path / "inv.png", *TINY)
    one_error(rc, err, "-o", "inv.png", "*.safetensors", "inv.safetensors")
    rc, _, err = run(capsys, "edit", photo, "-o", tmp_path / "e.png", "--save-inversion", tmp_path / "s.png", *TINY)
    one_error(rc, err, "--save-inversion", "s.png", "s.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_full_disk_names_the_file(photo, inv, tmp_path, capsys, monkeypatch):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with monkeypatch.context() as m:
        m.setattr(Image.Image, "save", full)
        rc, _, err = run(capsys, "reconstruct", inv, "-o", tmp_path / "r.png", "-q")
    one_error(rc, err, f"cannot write {tmp_path / 'r.png'}: the disk is full", "free some space")
    assert "unexpected" not in err

    monkeypatch.setattr(Path, "write_bytes", full)  # how inversion files are written (store.save)
    rc, _, err = run(capsys, "invert", photo, "-o", tmp_path / "i.safetensors", *TINY)
    one_error(rc, err, f"cannot write {tmp_path / 'i.safetensors'}: the disk is full")
    assert list(tmp_path.iterdir()) == []  # no temporaries left


def test_interrupted_save_inversion_is_offered_as_the_input(photo, tmp_path, capsys, monkeypatch):
    argv = ["edit", photo, "-o", tmp_path / "e.png", "--save-inversion", tmp_path / "s.safetensors", "-e", "x", *TINY]
    with monkeypatch.context() as m:
        m.setattr(cli_commands, "run_edit", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
        assert run(capsys, *argv)[0] == 130
    assert (tmp_path / "s.safetensors").exists() and not (tmp_path / "e.png").exists()
    rc, _, err = run(capsys, *argv)
    one_error(rc, err, f"{tmp_path / 's.safetensors'} exists", f"minledits edit {tmp_path / 's.safetensors'}",
              "--force")
    assert run(capsys, "edit", tmp_path / "s.safetensors", "-o", tmp_path / "e.png", "-e", "x", "-q")[0] == 0


# --------------------------------------------------------------------------------------------- leftovers
def test_stale_temporaries_are_cleaned(tmp_path, photo, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = {f".a.png.minledits-{dead.pid}.tmp": False, f".b.safetensors.minledits-{live.pid}.tmp": True,
                 f".c.png.minledits-{os.getpid()}.tmp": True, ".d.png.tmp": True, ".e.png.minledits-12x.tmp": True,
                 "f.minledits-1.tmp": True, f".g.png.{dead.pid}.tmp": True}
        for name in names:
            (tmp_path / name).write_bytes(b"half")
        with files.atomic(tmp_path / "new.txt") as tmp:
            tmp.write_text("whole")
        assert {p.name for p in tmp_path.iterdir()} == {n for n, kept in names.items() if kept} | {"new.txt"}
    finally:
        live.kill()
        live.wait()
    # the same through the command line: the next write into the folder cleans it
    (tmp_path / f".x.png.minledits-{dead.pid}.tmp").write_bytes(b"half")
    (tmp_path / f".y.png.minledits-{live.pid}.tmp").write_bytes(b"half")  # now dead too
    assert run(capsys, "edit", photo, "-o", tmp_path / "o.png", "-e", "x", *TINY)[0] == 0
    assert not list(tmp_path.glob(".[xy].png.*.tmp")) and (tmp_path / "o.png").exists()


def test_a_concept_that_cannot_act_is_named_and_recorded(inv, tmp_path, capsys):
    """4 edit steps: warmup 4 never comes; cooldown 0 stops before the start. One warning line each, in the PNG."""
    rc, _, err = run(capsys, "edit", inv, "-o", tmp_path / "e.png", "-e", "hat:warmup=4", "-e", "sun:cooldown=0",
                     "-e", "glasses", "-q")
    lines = err.strip().splitlines()
    assert rc == 0 and lines == ["minledits: warning: concept 'hat' never acts (warmup 4 >= the 4 edit steps): "
                                 "the edit ignores it",
                                 "minledits: warning: concept 'sun' never acts (cooldown 0 <= warmup 2): "
                                 "the edit ignores it"], err
    meta = json.loads(Image.open(tmp_path / "e.png").text["minledits"])
    assert meta["idle_concepts"] == {"hat": "warmup 4 >= the 4 edit steps", "sun": "cooldown 0 <= warmup 2"}
    assert "idle" not in Image.open(tmp_path / "e.png").text["parameters"]  # the command line still reproduces it


def test_more_faults_of_a_new_user(photo, inv, tmp_path, capsys):
    """From trying twenty more faults: a seed torch cannot take, a prompt past 77 tokens (its warning is one
    line), a jobs file without jobs (no --outdir is left behind)."""
    rc, _, err = run(capsys, "edit", photo, "-o", tmp_path / "a.png", *TINY, "--seed", str(2**70))
    one_error(rc, err, "seed must be an integer from -2**63 to 2**64 - 1")
    if console_script():  # through the process: pytest itself would catch the warning
        done = subprocess.run([console_script(), "edit", str(inv), "-o", str(tmp_path / "b.png"), "--target-prompt",
                               "cat " * 100, "-q"], capture_output=True, text=True, timeout=300)
        warning = f"minledits: warning: prompt longer than 75 CLIP tokens (100); dropped: {shorten('cat ' * 25)}"
        assert done.returncode == 0 and done.stderr.strip().splitlines() == [warning], done.stderr
    (tmp_path / "nojobs.json").write_text("{}")
    rc, _, err = run(capsys, "batch", tmp_path / "nojobs.json", "--outdir", tmp_path / "out", "-q")
    one_error(rc, err, "nojobs.json: expected [job, ...]")
    assert not (tmp_path / "out").exists()

"""`torchrun --nproc-per-node 2 -m minledits sweep|batch ...` on CPU (gloo): the cells and jobs split across the two
processes give the same files as one process (the table's times aside)."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import minledits
from tests.helpers import photo, run

TINY = ["--model", "random-tiny", "--steps", "6", "--skip", "2", "--size", "64", "-q"]
pytestmark = pytest.mark.usefixtures("one_thread")


def torchrun(*argv, cwd):
    """`torchrun --standalone --nproc-per-node 2 -m minledits argv...` (one thread each): its completed process."""
    root = str(Path(minledits.__file__).parents[1])  # the package this test imported, not another install
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    env.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "minledits", *map(str, argv)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def png(path):
    im = Image.open(path)
    return im.tobytes(), im.text


def table(path, times=("invert_s", "edit_s")):
    return [{k: v for k, v in row.items() if k not in times} for row in csv.DictReader(open(path))]


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("input") / "photo.png"
    photo(size=(64, 64)).save(path)
    return path


def test_a_sweep_on_two_processes_equals_one(image, tmp_path, capsys, monkeypatch):
    argv = ["sweep", image, "-o", "g.png", *TINY, "--vary", "skip=2,3", "--vary", "target_guidance=5,9", "-e", "hat",
            "--target-prompt", "a cat", "--clip-model", "none"]
    for d in ("one", "two"):
        (tmp_path / d).mkdir()
    monkeypatch.chdir(tmp_path / "one")
    assert run(capsys, *argv)[0] == 0
    done = torchrun(*argv[:-1], "none", cwd=tmp_path / "two")
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("sweep: 4 cells done") == 1  # process 0 alone reports
    for n in range(4):
        assert png(tmp_path / "one" / "g" / f"{n:03d}.png") == png(tmp_path / "two" / "g" / f"{n:03d}.png"), n
    assert png(tmp_path / "one" / "g.png") == png(tmp_path / "two" / "g.png")
    assert table(tmp_path / "one" / "g.csv") == table(tmp_path / "two" / "g.csv")
    one, two = (json.loads((tmp_path / d / "g.json").read_text()) for d in ("one", "two"))
    for cells in (one["cells"], two["cells"]):
        for c in cells:
            c.pop("invert_s"), c.pop("edit_s")
    assert one == two


def test_a_sweep_with_failed_cells_on_two_processes_equals_one(image, tmp_path, capsys, monkeypatch):
    """A guidance that overflows fails its cells (one on each process): process 0 still draws the sheet (grey
    tiles) and the table (their status and error), both equal to one process's, and the sweep exits 1."""
    argv = ["sweep", image, "-o", "g.png", *TINY, "--vary", "skip=2,3", "--vary", "target_guidance=5,1e38", "-e",
            "hat", "--target-prompt", "a cat", "--clip-model", "none"]
    for d in ("one", "two"):
        (tmp_path / d).mkdir()
    monkeypatch.chdir(tmp_path / "one")
    assert run(capsys, *argv)[0] == 1
    done = torchrun(*argv, cwd=tmp_path / "two")
    assert done.returncode != 0 and done.stdout.count("sweep: 2 cells done, 0 kept, 2 failed (cells 1, 3") == 1
    assert sorted(p.name for p in (tmp_path / "two" / "g").iterdir()) == ["000.json", "000.png", "002.json",
                                                                          "002.png"]
    assert png(tmp_path / "one" / "g.png") == png(tmp_path / "two" / "g.png")
    rows = table(tmp_path / "two" / "g.csv")
    assert rows == table(tmp_path / "one" / "g.csv") and [r["status"] for r in rows] == ["done", "failed"] * 2
    assert "overflowed" in rows[1]["error"]


def test_a_batch_on_two_processes_equals_one(image, tmp_path, capsys, monkeypatch):
    jobs = {"defaults": {"steps": 6, "skip": 2, "size": 64},
            "jobs": [{"input": str(image), "output": f"{n}.png", "concepts": [c], "seed": n % 2}
                     for n, c in enumerate(["hat", "-hat", "glasses", "tree", "dog"])]}
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    assert run(capsys, "batch", tmp_path / "jobs.json", "--outdir", tmp_path / "one", "--model", "random-tiny",
               "-q")[0] == 0
    done = torchrun("batch", tmp_path / "jobs.json", "--outdir", tmp_path / "two", "--model", "random-tiny", "-q",
                    cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("batch: 5 done, 0 skipped (output exists), 0 failed") == 1
    for n in range(5):
        assert png(tmp_path / "one" / f"{n}.png") == png(tmp_path / "two" / f"{n}.png"), n

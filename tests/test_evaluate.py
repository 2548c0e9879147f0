"""`minledits evaluate` end to end on a synthetic PIE-Bench (tests/piebench_data.py) with random-tiny at 64 px: every
method's edits where the benchmark reads them, the rows and the table, bad entries named, resume, torchrun."""
import csv
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

import minledits
from minledits import p2p
from minledits.tools import piebench
from tests import clip_hub, piebench_data
from tests.helpers import run

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = ["--model", "random-tiny", "--steps", "6", "--size", "64", "-q"]
METHODS = list(piebench.METHODS)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    d = tmp_path_factory.mktemp("weights")
    return ["--clip-model", clip_hub.write(d / "clip"), "--dino-model", piebench_data.write_dino(d / "dino"),
            "--squeezenet", piebench_data.write_squeezenet(d / "squeezenet.pth")]


@pytest.fixture(scope="module")
def pie(tmp_path_factory):
    """Three good entries (a drawn region; a style edit, whole frame) and a bad one (its photo missing)."""
    d = tmp_path_factory.mktemp("pie")
    ids = piebench_data.write(d, 4, types=[1, 2, 9, 6])
    mapping = json.loads((d / "mapping_file.json").read_text())
    (d / "annotation_images" / mapping[ids[3]]["image_path"]).unlink()
    return d, ids


def rows(path):
    return list(csv.DictReader(open(path)))


@pytest.fixture(scope="module")
def first(pie, weights, tmp_path_factory):
    d, ids = pie
    out = tmp_path_factory.mktemp("results") / "res"
    rc = minledits.cli.main(["evaluate", d, "-o", out, "--methods", ",".join(METHODS), *TINY, *map(str, weights)])
    return out, rc


def test_every_method_writes_where_the_benchmark_reads(pie, first, capsys):
    (d, ids), (out, rc) = pie, first
    assert rc == 1  # the bad entry
    mapping = json.loads((d / "mapping_file.json").read_text())
    for m in ["vae", *METHODS]:
        for key in ids[:3]:
            path = out / m / "annotation_images" / mapping[key]["image_path"]
            with Image.open(path) as im:  # the benchmark's .jpg name, PNG data, 512 x 512, our settings inside
                assert im.format == "PNG" and im.size == (512, 512) and im.mode == "RGB"
                record = json.loads(im.text["minledits"])
            assert record["method"] == m and record["id"] == key and record["model"] == "random-tiny"
            if m.endswith("p2p"):  # Prompt-to-Prompt's skip: every step on a DDIM inversion, its share on DDPM's
                assert record["skip"] == p2p.default_skip(6, record["sampler"]) == (0 if m == "ddim+p2p" else 1)
            if m == "ddim+p2p":  # the baseline's settings where the command line gives none (it gives --steps)
                assert (record["steps"], record["source_guidance"], record["target_guidance"], record["cross_replace"],
                        record["self_replace"]) == (6, 1.0, 7.5, 0.4, 0.6)
            elif m == "ddpm+p2p":  # the command's defaults
                assert (record["source_guidance"], record["cross_replace"]) == (3.5, 0.6)
        assert not (out / m / "annotation_images" / mapping[ids[3]]["image_path"]).exists()
    found = rows(out / "per_image.csv")
    assert list(found[0]) == list(piebench.ROW_KEYS)
    assert [(r["method"], r["id"]) for r in found] == [(m, k) for m in ["vae", *METHODS] for k in ids[:3]]
    for r in found:
        assert all(r[k] != "nan" for k in ("structure_distance", "clip_similarity_target_image",
                                           "clip_similarity_target_image_edit_part")), r
        background = [r[k] for k in ("psnr_unedit_part", "lpips_unedit_part", "mse_unedit_part", "ssim_unedit_part")]
        assert background == ["nan"] * 4 if r["editing_type_id"] == "9" else "nan" not in background, r
    table = rows(out / "summary.csv")
    assert [(r["method"], r["edit_type"]) for r in table] == [(m, t) for m in ["vae", *METHODS]
                                                              for t in ("all", "1", "2", "9")]
    assert table[0]["n"] == "3" and float(table[0]["PSNR"]) > 0
    md = (out / "summary.md").read_text()
    assert "| VAE reconstruction | all | 3 |" in md and "| LEDITS++ | 9 change style | 1 |" in md


def test_a_rerun_keeps_everything_and_a_lost_row_or_picture_is_redone(pie, first, weights, capsys):
    (d, ids), (out, _) = pie, first
    capsys.readouterr()
    pictures = sorted(p for p in out.rglob("*.jpg"))
    before = {p: p.stat().st_mtime_ns for p in pictures}
    table = (out / "per_image.csv").read_text()
    rc, stdout, err = run(capsys, "evaluate", d, "-o", out, "--methods", ",".join(METHODS), *TINY, *weights)
    assert rc == 1 and "evaluate: 0 rows made, " in stdout and "1 bad entries" in stdout
    assert len(err.splitlines()) == 1 and err.startswith(f"minledits: left out: entry {ids[3]}: no photo ")
    assert {p: p.stat().st_mtime_ns for p in pictures} == before and (out / "per_image.csv").read_text() == table
    mapping = json.loads((d / "mapping_file.json").read_text())
    (out / "ledits" / "annotation_images" / mapping[ids[0]]["image_path"]).unlink()  # as a kill leaves it
    piebench.record_path(out, "ddpm", piebench.read(d)[0][1]).unlink()
    rc, stdout, err = run(capsys, "evaluate", d, "-o", out, "--methods", ",".join(METHODS), *TINY, *weights)
    assert "evaluate: 2 rows made, 16 kept, " in stdout
    assert untimed(rows(out / "per_image.csv")) == untimed(csv.DictReader(table.splitlines()))


def untimed(table):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in table]


def test_other_metric_weights_score_again_without_editing(pie, first, capsys):
    (d, _), (out, _) = pie, first
    pictures = sorted(p for p in out.rglob("*.jpg"))
    before = {p: p.stat().st_mtime_ns for p in pictures}
    rc, stdout, err = run(capsys, "evaluate", d, "-o", out, "--methods", ",".join(METHODS), *TINY,
                          "--clip-model", "none", "--dino-model", "none", "--squeezenet", "none")
    assert {p: p.stat().st_mtime_ns for p in pictures} == before
    assert all(r["lpips_unedit_part"] == "nan" and r["clip_similarity_target_image"] == "nan"
               for r in rows(out / "per_image.csv"))
    assert "- LPIPS: nan (--squeezenet none)" in (out / "summary.md").read_text()


def test_refusals(pie, tmp_path, capsys, monkeypatch):
    spec = importlib.util.find_spec
    d, _ = pie
    for argv, words in [(["--method", "p2p"], "--method (give --methods)"),
                        (["-e", "hat"], "-e (each entry's bracketed words"),
                        (["--methods", "ddpm,magic"], "--methods 'ddpm,magic': 'magic' is no method"),
                        (["--methods", " , "], "--methods ' , ': names no method; give some of ddim+p2p,"),
                        (["--methods", "x" * 10_000], f"--methods '{'x' * 60}'…: '{'x' * 60}'… is no method"),
                        (["--types", "3,11"], "--types '3,11': '11' is no edit type"),
                        (["--types", "7" * 10_000], f"--types '{'7' * 60}'…: '{'7' * 60}'… is no edit type"),
                        (["--concept-options", "size=3"], "bad concept option")]:
        rc, out, err = run(capsys, "evaluate", d, "-o", tmp_path / "r", *TINY, *argv)
        assert rc == 2 and words in err and len(err.strip().splitlines()) == 1 and len(err) < 300, err
    assert not (tmp_path / "r").exists()
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "torchmetrics" else spec(name, *a))
    rc, out, err = run(capsys, "evaluate", d, "-o", tmp_path / "r", *TINY)
    assert rc == 2 and "pip install 'minledits[eval]'" in err


def child(argv, cwd, torchrun=False, **kw):
    """`minledits argv...` (under `torchrun --standalone --nproc-per-node 2` if torchrun) in a subprocess with one
    thread per process, the package this test imported first on its path: its Popen (kw: Popen's)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(Path(minledits.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
    env.pop("WORLD_SIZE", None)
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"] if torchrun else []
    return subprocess.Popen([sys.executable, *launch, "-m", "minledits", *map(str, argv)], cwd=cwd, env=env, **kw)


def killed_run(argv, cwd, out: Path):
    """`minledits argv...` in a subprocess, killed (SIGKILL) once its first rows are written."""
    p = child(argv, cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while len(list((out / "rows").rglob("*.json"))) < 2 and p.poll() is None and time.time() < deadline:
            time.sleep(0.05)
    finally:
        p.kill()
        p.wait()


@pytest.mark.slow
def test_two_processes_and_a_killed_run_write_what_one_writes(pie, tmp_path, capsys):
    d, _ = pie
    argv = ["evaluate", d, "--methods", ",".join(METHODS), *TINY, "--clip-model", "none", "--dino-model", "none",
            "--squeezenet", "none"]
    assert run(capsys, *argv[:2], "-o", tmp_path / "one", *argv[2:])[0] == 1
    p = child([*argv[:2], "-o", tmp_path / "two", *argv[2:]], tmp_path, torchrun=True, stdout=subprocess.PIPE,
              stderr=subprocess.PIPE, text=True)
    stdout, stderr = p.communicate(timeout=600)
    assert p.returncode == 1 and stdout.count("evaluate: ") == 1, stderr
    one, two = tmp_path / "one", tmp_path / "two"
    assert sorted(p.relative_to(one) for p in one.rglob("*.jpg")) == sorted(p.relative_to(two) for p in
                                                                            two.rglob("*.jpg"))
    for p in sorted(one.rglob("*.jpg")):
        with Image.open(p) as a, Image.open(two / p.relative_to(one)) as b:
            assert a.tobytes() == b.tobytes() and a.text == b.text, p
    assert untimed(rows(two / "per_image.csv")) == untimed(rows(one / "per_image.csv"))
    assert (two / "summary.md").read_text() == (one / "summary.md").read_text()
    three = tmp_path / "three"
    killed_run([*argv[:2], "-o", three, *argv[2:]], tmp_path, three)
    assert not (three / "per_image.csv").exists() and list((three / "rows").rglob("*.json"))
    rc, out, _ = run(capsys, *argv[:2], "-o", three, *argv[2:])
    assert rc == 1 and " kept, " in out and not out.startswith("evaluate: 0 rows made, 0 kept")
    for p in sorted(one.rglob("*.jpg")):
        with Image.open(p) as a, Image.open(three / p.relative_to(one)) as b:
            assert a.tobytes() == b.tobytes() and a.text == b.text, p
    assert untimed(rows(three / "per_image.csv")) == untimed(rows(one / "per_image.csv"))

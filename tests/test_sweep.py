"""`minledits sweep` on the tiny SD1 folder (64 px, 6 steps): inversions shared and sliced, cells equal to single
edits, the sheet, the table, resuming, refusals; and the slice of an inversion at a larger skip."""
import csv
import json
import shlex
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

import minledits
from minledits import cli, inversion
from minledits.cli import commands as cli_commands
from minledits.cli import many as cli_many
from minledits.tools import sweep
from tests import clip_hub
from tests.helpers import photo, run

FAST = ["--steps", "6", "--skip", "2", "--size", "64"]
pytestmark = pytest.mark.usefixtures("one_thread")


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("input") / "photo.png"
    photo(size=(80, 64)).save(path)
    return path


@pytest.fixture
def counts(monkeypatch):
    """Inversions run through the CLI, UNet rows of inversions and of at_skip's re-run batches, edits."""
    n = types.SimpleNamespace(inversions=0, rows=0, patch_rows=0, edits=0)
    invert, noise_maps, at_skip = cli_commands.invert, inversion.noise_maps, sweep.noise_maps
    run_edit = cli_many.run_edit

    def counted_invert(*a, **k):
        n.inversions += 1
        return invert(*a, **k)

    def counted_maps(sd, sampler, xts, *a, **k):
        n.rows += len(xts) - 1
        return noise_maps(sd, sampler, xts, *a, **k)

    def counted_patch(sd, sampler, xts, *a, **k):
        n.patch_rows += len(xts) - 1
        return at_skip(sd, sampler, xts, *a, **k)

    def counted_edit(*a, **k):
        n.edits += 1
        return run_edit(*a, **k)

    monkeypatch.setattr(cli_commands, "invert", counted_invert)
    monkeypatch.setattr(inversion, "noise_maps", counted_maps)
    monkeypatch.setattr(sweep, "noise_maps", counted_patch)
    monkeypatch.setattr(cli_many, "run_edit", counted_edit)  # a sweep's edits
    return n


def sweep_args(tiny_sd1, image, out, *vary, extra=()):
    return ["sweep", image, "-o", out, "--model", tiny_sd1.folder, *FAST, "--target-prompt", "a cat", "-e", "glasses",
            "--clip-model", "none", *[a for v in vary for a in ("--vary", v)], *extra]


@pytest.mark.parametrize("batch_size, keep", [(1, False), (3, False), (4, False), (4, True)])
def test_a_larger_skip_is_a_slice_bit_for_bit(sd1, batch_size, keep):
    kw = dict(steps=10, size=64, seed=2, batch_size=batch_size, keep_last_noise=keep, source_prompt="a cat")
    base = minledits.invert(sd1, photo(), skip=1, **kw)
    for skip in range(1, 10):
        direct = minledits.invert(sd1, photo(), skip=skip, **kw)
        sliced = sweep.at_skip(sd1, base, skip, batch_size)
        assert sliced.settings == direct.settings and sliced.timesteps == direct.timesteps
        assert torch.equal(sliced.xts, direct.xts) and torch.equal(sliced.zs, direct.zs), skip


def test_a_ddim_inversion_at_a_larger_skip_is_its_slice(sd1):
    kw = dict(steps=8, size=64, sampler="ddim", source_prompt="a cat", source_guidance=2.0)
    base = minledits.invert(sd1, photo(), skip=0, **kw)
    for skip in (1, 5, 7):
        direct, sliced = minledits.invert(sd1, photo(), skip=skip, **kw), sweep.at_skip(sd1, base, skip, 4)
        assert sliced.settings == direct.settings and sliced.timesteps == direct.timesteps
        assert torch.equal(sliced.xts, direct.xts) and torch.equal(sliced.zs, direct.zs), skip


def test_a_ddim_sweep_over_skip_inverts_once(tiny_sd1, image, tmp_path, counts, capsys):
    args = sweep_args(tiny_sd1, image, tmp_path / "g.png", "skip=0,2,3", extra=["--sampler", "ddim"])
    rc, _, err = run(capsys, *args)
    assert rc == 0 and "3 cells, 0 done already: 1 inversion(s) and 3 edit(s)" in err
    assert (counts.inversions, counts.patch_rows, counts.edits) == (1, 0, 3)


def test_at_skip_refuses_what_it_cannot_give(sd1, inv1):
    with pytest.raises(ValueError, match="cannot give skip"):
        sweep.at_skip(sd1, inv1, inv1.settings.skip - 1, 4)
    pp = minledits.invert(sd1, photo(), steps=6, skip=1, size=64, sampler="dpmsolver++")
    with pytest.raises(ValueError, match="cannot give skip"):
        sweep.at_skip(sd1, pp, 2, 4)


@pytest.fixture(scope="module")
def grid(tiny_sd1, image, tmp_path_factory):
    """A 2 x 3 sweep over skip (rows) and target guidance (columns)."""
    out = tmp_path_factory.mktemp("grid") / "grid.png"
    assert cli.main([str(a) for a in sweep_args(tiny_sd1, image, out, "skip=2,3", "target_guidance=5,7.5,10")]) == 0
    return types.SimpleNamespace(out=out)


def test_edit_options_and_skip_share_one_inversion(tiny_sd1, image, tmp_path, counts, capsys):
    out = tmp_path / "g.png"
    rc, stdout, err = run(capsys, *sweep_args(tiny_sd1, image, out, "skip=2,3", "target_guidance=5,7.5,10"))
    assert rc == 0 and "sweep: 6 cells done, 0 kept, 0 failed" in stdout
    assert "sweep of 6 cells, 0 done already: 1 inversion(s) (+3 UNet rows to align skips) and 6 edit(s)" in err
    # one inversion at skip 2 (4 UNet rows, one batch: k = 2-5), and k = 3-5 again for skip 3 (its one batch)
    assert (counts.inversions, counts.rows, counts.patch_rows, counts.edits) == (1, 4, 3, 6)


def test_seed_needs_one_inversion_each(tiny_sd1, image, tmp_path, counts, capsys):
    out = tmp_path / "g.png"
    rc, _, err = run(capsys, *sweep_args(tiny_sd1, image, out, "seed=1,2", "concept.0.scale=3,5,7"))
    assert rc == 0 and "2 inversion(s) and 6 edit(s)" in err
    assert (counts.inversions, counts.rows, counts.patch_rows, counts.edits) == (2, 8, 0, 6)
    cells = json.loads(out.with_suffix(".json").read_text())["cells"]
    assert [c["varied"] for c in cells[:2]] == [{"seed": 1, "concept.0.scale": 3.0},
                                                {"seed": 1, "concept.0.scale": 5.0}]
    assert json.loads(Image.open(out.with_suffix("") / "002.png").text["minledits"])["concepts"] == [
        "glasses:scale=7.0,threshold=0.95,warmup=2,weight=1.0"]


def test_every_cell_equals_its_single_edit(grid, capsys, tmp_path):
    """The cell's `parameters` chunk is an `edit` command (from the image: its own inversion at its own skip)."""
    for n in range(6):
        cell = grid.out.with_suffix("") / f"{n:03d}.png"
        argv = shlex.split(Image.open(cell).text["parameters"])[1:]
        assert argv[0] == "edit" and f"--skip={2 + n // 3}" in argv
        assert run(capsys, *argv, "-o", tmp_path / f"{n}.png", "-q")[0] == 0
        assert np.array_equal(pixels(tmp_path / f"{n}.png"), pixels(cell)), n  # bit-identical, sliced skip 3 too


def test_sheet_and_table(grid, image):
    sheet = Image.open(grid.out)
    assert sheet.size == (4 * 64, 3 * 64)
    labels = json.loads(sheet.text["minledits"])
    assert labels["rows"] == ["skip=2", "skip=3"] and labels["columns"] == [
        "target_guidance=5.0", "target_guidance=7.5", "target_guidance=10.0"]
    a = np.asarray(sheet.convert("RGB"))
    corner = np.asarray(minledits.io.image.to_pil(minledits.io.image.to_tensor(image, 64))[0])
    assert np.array_equal(a[:64, :64], corner)
    for y, x in [(0, 64), (0, 128), (0, 192), (64, 0), (128, 0)]:  # label tiles: white with dark text
        tile = a[y:y + 64, x:x + 64]
        assert (tile == 255).mean() > 0.5 and (tile.sum(-1) < 200).any()
    assert np.array_equal(a[128:192, 192:256], pixels(grid.out.with_suffix("") / "005.png"))
    rows = list(csv.DictReader(grid.out.with_suffix(".csv").open()))
    assert [r["file"] for r in rows] == [f"grid/{n:03d}.png" for n in range(6)]
    assert [(r["skip"], r["target_guidance"], r["row"], r["col"]) for r in rows[:4]] == [
        ("2", "5.0", "0", "0"), ("2", "7.5", "0", "1"), ("2", "10.0", "0", "2"), ("3", "5.0", "1", "0")]
    assert all(float(r["edit_s"]) > 0 and float(r["invert_s"]) > 0 and 0 < float(r["ssim"]) <= 1 for r in rows)
    assert all(r["clip_score"] == "" for r in rows)  # --clip-model none
    table = json.loads(grid.out.with_suffix(".json").read_text())
    assert table["format"] == sweep.FORMAT and table["cells"][4]["settings"]["skip"] == 3
    assert table["cells"][4]["settings"]["target_guidance"] == 7.5 and table["cells"][4]["psnr"] > 0


def test_an_interrupted_sweep_resumes(tiny_sd1, image, tmp_path, counts, capsys, monkeypatch):
    out, argv = tmp_path / "g.png", sweep_args(tiny_sd1, image, tmp_path / "g.png", "skip=2,3", "momentum_scale=0,0.3")
    save = cli_many.save_png

    def stop_at_the_third(*a, **k):
        if counts.edits == 3:
            raise KeyboardInterrupt
        return save(*a, **k)

    monkeypatch.setattr(cli_many, "save_png", stop_at_the_third)
    assert run(capsys, *argv)[0] == 130
    monkeypatch.setattr(cli_many, "save_png", save)
    done = {p.name: p.read_bytes() for p in out.with_suffix("").glob("*.png")}
    assert sorted(done) == ["000.png", "001.png"] and not out.exists()
    counts.edits = 0
    rc, _, err = run(capsys, *argv)
    assert rc == 0 and "4 cells, 2 done already: 1 inversion(s) and 2 edit(s)" in err  # at skip 3: no slice
    assert counts.edits == 2 and all((out.with_suffix("") / k).read_bytes() == v for k, v in done.items())
    counts.edits = 0
    rc, stdout, err = run(capsys, *argv)
    assert rc == 0 and counts.edits == 0 and "0 cells done, 4 kept" in stdout and out.exists()
    assert len(list(csv.DictReader(out.with_suffix(".csv").open()))) == 4


@pytest.mark.parametrize("vary, message", [
    (["colour=1,2"], "--vary 'colour=1,2': unknown option 'colour'"),
    (["skip="], "--vary 'skip=': give a list of values, e.g. skip=1,2,3"),
    (["skip=2,,3"], "give a list of values"),
    (["skip=2,x"], "--vary 'skip=2,x': 'x' is not an integer"),
    (["skip=2,9"], "skip must be an integer with 0 <= skip < steps (6), got 9"),
    (["concept.1.scale=3,4"], "--vary concept.1.scale: there are only 1 concepts (-e), counted from 0"),
    (["concept.0.size=3"], "unknown option 'concept.0.size'"),
    (["mask=intersect,all"], "'all' is not one of intersect, cross_attention, noise"),
    (["skip=2,3", "skip=4"], "--vary skip is given twice"),
    (["trace=a,b"], "unknown option 'trace'"),
    (["skip=[2,"], "--vary 'skip=[2,': the list is not JSON (Expecting value at column 9): e.g. skip=[1,2,3] or"),
])
def test_bad_input_is_one_line_and_exit_2_before_any_work(tiny_sd1, image, tmp_path, counts, capsys, vary, message):
    rc, out, err = run(capsys, *sweep_args(tiny_sd1, image, tmp_path / "g.png", *vary))
    assert rc == 2 and out == "" and len(err.splitlines()) == 1 and err.startswith("minledits: error: ")
    assert message in err, err
    assert list(tmp_path.iterdir()) == [] and counts.inversions == 0


def test_an_inversion_file_varies_edit_options_only(tiny_sd1, image, tmp_path, capsys):
    inv = tmp_path / "inv.safetensors"
    assert run(capsys, "invert", image, "-o", inv, "--model", tiny_sd1.folder, *FAST, "-q")[0] == 0
    rc, _, err = run(capsys, "sweep", inv, "--model", tiny_sd1.folder, "-o", tmp_path / "g.png", "--vary", "seed=1,2",
                     "--clip-model", "none")
    assert rc == 2 and "an inversion file fixes the inversion options" in err
    rc, _, _ = run(capsys, "sweep", inv, "--model", tiny_sd1.folder, "-o", tmp_path / "g.png",
                   "--vary", "concept.0.scale=2,4", "-e", "hat",
                   "--clip-model", "none", "-q")
    assert rc == 0 and Image.open(tmp_path / "g.png").size == (3 * 64, 2 * 64)  # 1-D: one row
    assert json.loads(Image.open(tmp_path / "g.png").text["minledits"])["rows"] == [""]


def test_more_keys_give_one_sheet_each_and_a_foreign_file_is_kept(tiny_sd1, image, tmp_path, capsys):
    out = tmp_path / "g.png"
    (tmp_path / "g").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "g" / "001.png")
    argv = sweep_args(tiny_sd1, image, out, "momentum_beta=0.5,0.6", "target_guidance=5,6", "seed=1,2",
                      extra=["-q"])
    rc, _, err = run(capsys, *argv)
    assert rc == 2 and "g/001.png exists and was not made by this sweep" in err
    assert run(capsys, *argv, "--force")[0] == 0
    assert [json.loads(Image.open(tmp_path / f"g-{j}.png").text["minledits"])["sheet"] for j in (1, 2)] == [
        {"seed": 1}, {"seed": 2}]
    assert Image.open(tmp_path / "g" / "001.png").size == (64, 64)


def test_clip_metrics_and_the_tradeoff_plot(tiny_sd1, image, tmp_path, capsys, monkeypatch):
    clip = clip_hub.write(tmp_path / "clip")
    argv = sweep_args(tiny_sd1, image, tmp_path / "g.png", "target_guidance=5,9")
    argv[argv.index("none")] = clip
    rc, _, err = run(capsys, *argv)
    rows = list(csv.DictReader((tmp_path / "g.csv").open()))
    assert rc == 0 and all(0 <= float(r["clip_score"]) <= 100 and -1 <= float(r["clip_image"]) <= 1 for r in rows)
    assert "trade-off plot ->" in err and Image.open(tmp_path / "g-tradeoff.png").size[0] > 100
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    rc, _, err = run(capsys, *argv)
    assert rc == 0 and "minledits: no trade-off plot: it needs matplotlib (pip install 'minledits[plot]')" in err


def test_clip_weights_that_cannot_be_had_are_one_note_and_the_sweep_goes_on(tiny_sd1, image, tmp_path, capsys):
    argv = sweep_args(tiny_sd1, image, tmp_path / "g.png", "target_guidance=5,9")
    argv[argv.index("none")] = "/no/such/clip"
    rc, _, err = run(capsys, *argv, "-q")
    notes = [line for line in err.splitlines() if "CLIP" in line]
    assert rc == 0 and len(notes) == 1 and notes[0].endswith("(give a local folder, or none)")
    assert notes[0].startswith("minledits: note: CLIP metrics left out: CLIP metrics need the weights of /no/such/clip")
    rows = list(csv.DictReader((tmp_path / "g.csv").open()))
    assert len(rows) == 2 and all(r["clip_score"] == "" and float(r["psnr"]) > 0 for r in rows)

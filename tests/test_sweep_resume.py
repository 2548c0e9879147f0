"""`minledits sweep` (tiny SD1 folder, 64 px, 6 steps): a kept cell matches every setting that decides its pixels and
the input's content; every cell's options are checked before any work; a failed cell is a grey tile and a row of the
table, and the rest of the sweep is written."""
import csv
import json
import types

import numpy as np
import pytest
from PIL import Image

from minledits.cli import commands as cli_commands
from minledits.cli import many as cli_many
from tests.helpers import photo, run

FAST = ["--steps", "6", "--skip", "2", "--size", "64"]
pytestmark = pytest.mark.usefixtures("one_thread")


def sweep_args(tiny_sd1, image, out, *vary, extra=()):
    return ["sweep", image, "-o", out, "--model", tiny_sd1.folder, *FAST, "--target-prompt", "a cat", "-e", "glasses",
            "--clip-model", "none", *[a for v in vary for a in ("--vary", v)], *extra]


def cells(out) -> dict:
    return {p.name: p.read_bytes() for p in sorted(out.with_suffix("").iterdir())}


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "in" / "photo.png"
    path.parent.mkdir()
    photo(size=(64, 64)).save(path)
    return path


@pytest.fixture
def inversions(monkeypatch):
    """How many inversions and edits ran (the work a refusal must come before)."""
    n = types.SimpleNamespace(inversions=0, edits=0)
    invert, run_edit = cli_commands.invert, cli_many.run_edit
    monkeypatch.setattr(cli_commands, "invert", lambda *a, **k: (setattr(n, "inversions", n.inversions + 1),
                                                                 invert(*a, **k))[1])
    monkeypatch.setattr(cli_many, "run_edit", lambda *a, **k: (setattr(n, "edits", n.edits + 1),
                                                               run_edit(*a, **k))[1])
    return n


def one_error(rc, printed, err, *words):
    assert rc == 2 and printed == "" and len(err.splitlines()) == 1 and err.startswith("minledits: error: "), err
    assert all(w in err for w in words), (words, err)


# --------------------------------------------------------------------------------------------- what a kept cell matches
def test_a_cell_made_in_another_dtype_is_not_kept(tiny_sd1, image, tmp_path, capsys):
    """Refused, naming the setting (the overwrite rule: the earlier cells are the user's results); --force redoes
    them, and they are then the cells of the new dtype."""
    out = tmp_path / "g.png"
    argv = sweep_args(tiny_sd1, image, out, "target_guidance=5,9", extra=["-q"])
    assert run(capsys, *argv, "--dtype", "fp32")[0] == 0
    before = cells(out)
    one_error(*run(capsys, *argv, "--dtype", "bf16"), f"{out.with_suffix('') / '000.png'} exists and was made with "
              "dtype 'float32', not 'bfloat16': add --force to redo it")
    assert cells(out) == before
    rc, printed, _ = run(capsys, *argv, "--dtype", "bf16", "--force")
    assert rc == 0 and "sweep: 2 cells done, 0 kept, 0 failed" in printed
    assert json.loads((tmp_path / "g" / "000.json").read_text())["settings"]["dtype"] == "bfloat16"
    rc, printed, _ = run(capsys, *argv, "--dtype", "bf16")
    assert rc == 0 and "sweep: 0 cells done, 2 kept" in printed


@pytest.mark.parametrize("change, words", [
    (lambda s: s.update(device="cuda"), "001.png exists and was made with device 'cuda', not 'cpu'"),
    (lambda s: s.pop("input"), "001.png exists and has a record without its input: it may have been made otherwise"),
    (lambda s: s.update(colour=None), "001.png exists and was made with colour None, which this sweep has not"),
])
def test_a_cell_whose_record_differs_is_not_kept(tiny_sd1, image, tmp_path, capsys, change, words):
    """On another device (as a run on a GPU records it); a record that lacks a setting or has one more."""
    out = tmp_path / "g.png"
    argv = sweep_args(tiny_sd1, image, out, "target_guidance=5,9", extra=["-q"])
    assert run(capsys, *argv)[0] == 0
    record = tmp_path / "g" / "001.json"
    found = json.loads(record.read_text())
    change(found["settings"])
    record.write_text(json.dumps(found))
    one_error(*run(capsys, *argv), words)


def test_a_cell_made_with_other_p2p_options_is_not_kept(image, tmp_path, capsys):
    argv = ["sweep", image, "-o", tmp_path / "g.png", "--model", "random-tiny", *FAST, "--method", "p2p",
            "--source-prompt", "a photo", "--target-prompt", "a cat", "--vary", "cross_replace=0.2,0.6",
            "--clip-model", "none", "-q"]
    assert run(capsys, *argv)[0] == 0
    one_error(*run(capsys, *argv, "--self-replace", "0.5"), "was made with self_replace 0.2, not 0.5")
    one_error(*run(capsys, *argv, "--reweight", "cat=2"), "was made with reweight None, not 'cat=2'")


def test_a_cell_of_an_input_that_has_changed_is_not_kept(tiny_sd1, image, tmp_path, capsys):
    """The same name, other pixels: refused; with --force every cell and the sheet's corner are the new input's."""
    out = tmp_path / "g.png"
    argv = sweep_args(tiny_sd1, image, out, "target_guidance=5,9", extra=["-q"])
    assert run(capsys, *argv)[0] == 0
    before = cells(out)
    photo(size=(64, 64)).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(image)
    one_error(*run(capsys, *argv), "000.png exists and was made from another input (the input file's content has "
              "changed): add --force")
    assert cells(out) == before
    assert run(capsys, *argv, "--force")[0] == 0
    assert all(cells(out)[k] != v for k, v in before.items() if k.endswith(".png"))
    assert np.array_equal(pixels(out)[:64, :64], np.asarray(photo(size=(64, 64)).transpose(
        Image.Transpose.FLIP_LEFT_RIGHT)))
    single = tmp_path / "one.png"
    assert run(capsys, "edit", image, "-o", single, "--model", tiny_sd1.folder, *FAST, "--target-prompt", "a cat",
               "-e", "glasses", "--target-guidance", "9", "-q")[0] == 0
    assert np.array_equal(pixels(single), pixels(tmp_path / "g" / "001.png"))


def test_a_cell_of_an_inversion_file_that_has_changed_is_not_kept(tiny_sd1, image, tmp_path, capsys):
    inv = tmp_path / "inv.safetensors"
    make = ["invert", image, "-o", inv, "--model", tiny_sd1.folder, *FAST, "-q", "--force"]
    assert run(capsys, *make)[0] == 0
    argv = ["sweep", inv, "--model", tiny_sd1.folder, "-o", tmp_path / "g.png", "--vary", "concept.0.scale=2,4",
            "-e", "hat", "--clip-model", "none", "-q"]
    assert run(capsys, *argv)[0] == 0
    assert run(capsys, *make, "--seed", "7")[0] == 0
    one_error(*run(capsys, *argv), "was made from another input")


# --------------------------------------------------------------------------------------------- before any work
@pytest.mark.parametrize("vary, extra, words", [
    (["steps=6,2000"], [], ["2000"]),
    (["mask=intersect,noise"], [], ["--vary mask: --method ledits ignores it (an option of --method leditspp)"]),
    (["target_guidance=5,9"], ["--mask", "noise"], ["--method ledits takes no --mask"]),
    (["cross_replace=0.2,0.4"], ["--method", "leditspp"], ["--vary cross_replace: --method leditspp ignores it"]),
])
def test_every_cell_is_checked_before_any_work(tiny_sd1, image, tmp_path, capsys, inversions, vary, extra, words):
    """`--vary steps=6,2000`: the second cell's steps are past the model's schedule; an option the method ignores
    would make cells that differ in name only."""
    argv = sweep_args(tiny_sd1, image, tmp_path / "g.png", *vary, extra=extra)
    if "leditspp" in extra:
        argv.remove("--target-prompt"), argv.remove("a cat")
    one_error(*run(capsys, *argv), *words)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"] and inversions.inversions == inversions.edits == 0


def test_p2p_options_are_checked_against_an_inversion_files_prompt_before_any_work(tiny_sd1, image, tmp_path, capsys,
                                                                                    inversions):
    inv = tmp_path / "inv.safetensors"
    assert run(capsys, "invert", image, "-o", inv, "--model", tiny_sd1.folder, *FAST, "--source-prompt", "a photo",
               "-q")[0] == 0
    rc, printed, err = run(capsys, "sweep", inv, "--model", tiny_sd1.folder, "-o", tmp_path / "g.png", "--method",
                           "p2p", "--target-prompt", "a cat", "--vary", "cross_replace=0.2,0.4", "--local-blend",
                           "dog,cat", "--clip-model", "none")
    one_error(rc, printed, err, "local_blend source", "'dog'")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "inv.safetensors"] and inversions.edits == 0


# --------------------------------------------------------------------------------------------- a failed cell
def test_a_failed_cell_is_a_grey_tile_and_a_row_and_the_rest_is_written(tiny_sd1, image, tmp_path, capsys,
                                                                       monkeypatch):
    out, run_edit = tmp_path / "g.png", cli_many.run_edit

    def fail_at_9(c, *a, **k):
        if c.target_guidance == 9:
            raise RuntimeError("out of luck")
        return run_edit(c, *a, **k)

    monkeypatch.setattr(cli_many, "run_edit", fail_at_9)
    argv = sweep_args(tiny_sd1, image, out, "skip=2,3", "target_guidance=5,9", extra=["-q"])
    rc, printed, err = run(capsys, *argv)
    assert rc == 1 and printed.startswith("sweep: 2 cells done, 0 kept, 2 failed (cells 1, 3: grey in the sheet) -> ")
    assert err.count("\n") == 2 and all("out of luck" in line for line in err.splitlines())
    assert sorted(p.name for p in out.with_suffix("").iterdir()) == ["000.json", "000.png", "002.json", "002.png"]
    sheet = pixels(out)
    assert sheet.shape == (3 * 64, 3 * 64, 3)
    for y in (64, 128):
        assert (sheet[y:y + 64, 128:192] == 211).all(-1).mean() > 0.5  # light grey, with its label in black
        assert (sheet[y:y + 64, 128:192].sum(-1) < 200).any()
    assert np.array_equal(sheet[64:128, 64:128], pixels(out.with_suffix("") / "000.png"))
    rows = list(csv.DictReader(out.with_suffix(".csv").open()))
    assert [r["status"] for r in rows] == ["done", "failed", "done", "failed"]
    assert rows[1]["error"] == "RuntimeError: out of luck (unexpected: --verbose shows where)"
    assert rows[0]["error"] == ""
    assert rows[1]["psnr"] == "" and float(rows[0]["psnr"]) > 0
    monkeypatch.setattr(cli_many, "run_edit", run_edit)
    rc, printed, _ = run(capsys, *argv)
    assert rc == 0 and "sweep: 2 cells done, 2 kept, 0 failed" in printed
    assert [r["status"] for r in csv.DictReader(out.with_suffix(".csv").open())] == ["kept", "done", "kept", "done"]


def test_a_failed_inversion_fails_its_cells_only(tiny_sd1, image, tmp_path, capsys, monkeypatch):
    out, invert = tmp_path / "g.png", cli_commands.invert

    def fail_seed_2(sd, image, seed, **k):
        if seed == 2:
            raise MemoryError("no room")
        return invert(sd, image, seed=seed, **k)

    monkeypatch.setattr(cli_commands, "invert", fail_seed_2)
    rc, printed, err = run(capsys, *sweep_args(tiny_sd1, image, out, "seed=1,2", "target_guidance=5,9",
                                               extra=["-q"]))
    assert rc == 1 and "sweep: 2 cells done, 0 kept, 2 failed (cells 2, 3: grey in the sheet)" in printed
    assert err.splitlines() == ["minledits: the inversion of cells 2, 3 failed: MemoryError: no room (unexpected: "
                                "--verbose shows where)"]
    assert [r["status"] for r in csv.DictReader(out.with_suffix(".csv").open())] == ["done", "done", "failed",
                                                                                      "failed"]

"""`minledits compare` on the tiny SD1 folder (64 px, 6 steps): the methods that exist, side by side from one
inversion, each panel equal to the single command that makes it; the JSON's UNet evaluations; refusals."""
import json
import types

import numpy as np
import pytest
from PIL import Image

import minledits
from minledits import cli, p2p
from minledits.cli import commands as cli_commands
from tests.helpers import photo, run

FAST = ["--steps", "6", "--skip", "2", "--size", "64"]
PROMPTS = ["--source-prompt", "a photo", "--target-prompt", "a cat"]
CONCEPTS = ["-e", "glasses", "-e", "-beard:scale=3"]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("input") / "photo.png"
    photo(size=(64, 80)).save(path)
    return path


@pytest.fixture(scope="module")
def result(tiny_sd1, image, tmp_path_factory):
    out, n = tmp_path_factory.mktemp("cmp") / "cmp.png", types.SimpleNamespace(inversions=0)
    invert = cli_commands.invert
    mp = pytest.MonkeyPatch()
    mp.setattr(cli_commands, "invert", lambda *a, **k: (setattr(n, "inversions", n.inversions + 1), invert(*a, **k))[1])
    rc = cli.main([str(a) for a in ["compare", image, "-o", out, "--model", tiny_sd1.folder, *FAST, *PROMPTS,
                                    *CONCEPTS, "--clip-model", "none", "-q"]])
    mp.undo()
    assert rc == 0
    record = json.loads(out.with_suffix(".json").read_text())
    return types.SimpleNamespace(out=out, inversions=n.inversions, record=record)


def test_one_inversion_and_the_panels(result):
    assert result.inversions == 1
    sheet = Image.open(result.out)
    assert sheet.size == (6 * 64, 64 + 16)
    panels = result.record["panels"]
    assert [p["label"] for p in panels] == ["input", "reconstruction", "DDPM inversion", "DDPM + P2P", "LEDITS",
                                           "LEDITS++"]
    assert result.record["left_out"] == {}
    S = 6 - 2  # edit steps; UNet rows per step: 1 unguided, +1 target prompt, +1 per concept (LEDITS++: no target);
    # P2P: [u, u, source, target]
    assert result.record["inversion_unet_evaluations"] == 2 * S  # unconditional + source prompt
    assert [p["unet_evaluations"] for p in panels] == [0, S, 2 * S, 4 * S, 4 * S, 3 * S]
    assert panels[0]["psnr"] == "inf" and all(p["clip_score"] is None for p in panels)
    assert all(0 < p["psnr"] < 100 and p["seconds"] > 0 for p in panels[1:])


@pytest.mark.parametrize("j, argv", [
    (1, ["reconstruct"]),
    (2, ["edit", "--target-prompt", "a cat"]),
    (3, ["edit", "--method", "p2p", "--target-prompt", "a cat"]),
    (4, ["edit", "--target-prompt", "a cat", *CONCEPTS]),
    (5, ["edit", "--method", "leditspp", *CONCEPTS]),
])
def test_each_panel_equals_its_own_command(result, tiny_sd1, image, tmp_path, capsys, j, argv):
    """Its own command inverts the same image with the same settings: the same inversion, the same pixels."""
    out = tmp_path / "one.png"
    assert run(capsys, argv[0], image, "-o", out, "--model", tiny_sd1.folder, *FAST, "--source-prompt", "a photo",
               *argv[1:], "-q")[0] == 0
    panel = np.asarray(Image.open(result.out).convert("RGB"))[16:, 64 * j:64 * (j + 1)]
    assert np.array_equal(panel, np.asarray(Image.open(out).convert("RGB")))


def test_the_p2p_panel_equals_p2p_edit_on_the_same_inversion(result, tiny_sd1, image):
    sd = minledits.load(tiny_sd1.folder)
    inv = minledits.invert(sd, image, steps=6, skip=2, size=64, source_prompt="a photo")
    mine = np.asarray(minledits.decode(sd, p2p.edit(sd, inv, "a cat")))
    assert np.array_equal(np.asarray(Image.open(result.out).convert("RGB"))[16:, 3 * 64:4 * 64], mine)


def test_methods_without_their_inputs_are_left_out(tiny_sd1, image, tmp_path, capsys):
    rc, _, err = run(capsys, "compare", image, "-o", tmp_path / "c.png", "--model", tiny_sd1.folder, *FAST,
                     "--clip-model", "none", "-q")
    record = json.loads((tmp_path / "c.json").read_text())
    assert rc == 0 and [p["method"] for p in record["panels"]] == ["input", "reconstruction"]
    assert sorted(record["left_out"]) == ["ddpm", "ledits", "leditspp", "p2p"]
    assert "minledits: note: DDPM inversion left out: it edits by the target prompt alone: give --target-prompt" in err
    assert Image.open(tmp_path / "c.png").size == (2 * 64, 64 + 16)
    assert "cross_replace" not in record["settings"]  # the P2P panel's options: its command line would refuse them


@pytest.mark.parametrize("extra, message", [
    (["--method", "leditspp"], "compare runs every method"),
    (["--trace", "t"], "compare runs every method"),
    (["--save-inversion", "i.safetensors"], "compare runs every method"),
    (["-e", "hat:scale=x"], "hat:scale=x"),
    (["-o", "c.jpg"], "the comparison is a .png file"),
])
def test_bad_input_is_one_line_and_exit_2(tiny_sd1, image, tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.chdir(tmp_path)
    rc, out, err = run(capsys, "compare", image, "-o", "c.png", "--model", tiny_sd1.folder, *FAST, *extra)
    assert rc == 2 and out == "" and len(err.splitlines()) == 1 and message in err, err
    assert list(tmp_path.iterdir()) == []


def test_outputs_are_not_overwritten(tiny_sd1, image, tmp_path, capsys):
    (tmp_path / "c.json").write_text("{}")
    rc, _, err = run(capsys, "compare", image, "-o", tmp_path / "c.png", "--model", tiny_sd1.folder, *FAST)
    assert rc == 2 and f"{tmp_path / 'c.json'} exists: add --force to overwrite it" in err


def test_the_p2p_panel_follows_the_edit_commands_path(image, tmp_path, capsys):
    """random-tiny at 8 steps: the panel (p2p.edit without a callback) equals `edit --method p2p` (with its progress
    bar's callback), pixel for pixel."""
    tiny = ["--model", "random-tiny", "--steps", "8", "--skip", "2", "--size", "64", "-q", "--source-prompt", "a photo",
            "--target-prompt", "a cat"]
    assert run(capsys, "compare", image, "-o", tmp_path / "c.png", *tiny, "-e", "hat", "--clip-model", "none")[0] == 0
    assert run(capsys, "edit", image, "-o", tmp_path / "p.png", *tiny, "--method", "p2p")[0] == 0
    panel = np.asarray(Image.open(tmp_path / "c.png").convert("RGB"))[16:, 3 * 64:4 * 64]
    assert np.array_equal(panel, np.asarray(Image.open(tmp_path / "p.png").convert("RGB")))


def test_from_an_inversion_file(result, tiny_sd1, image, tmp_path, capsys):
    inv = tmp_path / "inv.safetensors"
    assert run(capsys, "invert", image, "-o", inv, "--model", tiny_sd1.folder, *FAST, "--source-prompt", "a photo",
               "-q")[0] == 0
    assert run(capsys, "compare", inv, "--model", tiny_sd1.folder, "-o", tmp_path / "c.png", "--target-prompt", "a cat",
               *CONCEPTS, "--clip-model", "none", "-q")[0] == 0
    record = json.loads((tmp_path / "c.json").read_text())
    assert record["inversion_unet_evaluations"] == 0 and len(record["panels"]) == 6
    assert np.array_equal(np.asarray(Image.open(tmp_path / "c.png")), np.asarray(Image.open(result.out)))


P2P_OPTIONS = ["--cross-replace", "0.3", "--self-replace", "0.5", "--reweight", "cat=3"]


def test_the_p2p_panel_takes_the_p2p_options(result, tiny_sd1, image, tmp_path, capsys):
    """The panel equals `edit --method p2p` with the same options, bit for bit, and differs from the defaults'."""
    common = ["--model", tiny_sd1.folder, *FAST, *PROMPTS, *P2P_OPTIONS, "-q"]
    assert run(capsys, "compare", image, "-o", tmp_path / "c.png", *common, "--clip-model", "none")[0] == 0
    assert run(capsys, "edit", image, "-o", tmp_path / "p.png", *common, "--method", "p2p")[0] == 0
    panel = np.asarray(Image.open(tmp_path / "c.png").convert("RGB"))[16:, 3 * 64:4 * 64]
    assert np.array_equal(panel, np.asarray(Image.open(tmp_path / "p.png").convert("RGB")))
    assert not np.array_equal(panel, np.asarray(Image.open(result.out).convert("RGB"))[16:, 3 * 64:4 * 64])
    settings = json.loads((tmp_path / "c.json").read_text())["settings"]
    assert (settings["cross_replace"], settings["self_replace"], settings["reweight"]) == (0.3, 0.5, "cat=3")
    assert "--reweight=cat=3" in Image.open(tmp_path / "c.png").text["parameters"]


@pytest.mark.parametrize("extra, words", [
    (["--cross-replace", "2", *PROMPTS], ["--cross-replace (the Prompt-to-Prompt panel's): cross_replace", "2"]),
    (["--reweight", "dog=2", *PROMPTS], ["--reweight (the Prompt-to-Prompt panel's)", "'dog'"]),
    (["--local-blend", "photo,cat", *PROMPTS],
     ["--local-blend (the Prompt-to-Prompt panel's)", "this UNet has none there"]),
    (["--self-replace", "0.1", "--target-prompt", "a cat"], ["--self-replace", "needs the inversion's source prompt"]),
    (["--cross-replace", "0.1", "--source-prompt", "a photo"], ["--cross-replace", "needs a target prompt"]),
])
def test_bad_p2p_options_are_one_line_and_exit_2_before_any_work(tiny_sd1, image, tmp_path, capsys, monkeypatch,
                                                                 extra, words):
    """Checked, not ignored: with the prompts, against them (and the model's UNet, once read); without the P2P
    panel's prompts, refused (the panel is left out)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli_commands, "invert", lambda *a, **k: pytest.fail("the work started"))
    rc, out, err = run(capsys, "compare", image, "-o", "c.png", "--model", tiny_sd1.folder, *FAST, *extra)
    assert rc == 2 and out == "" and len(err.splitlines()) == 1 and all(w in err for w in words), err
    assert list(tmp_path.iterdir()) == []


def test_p2p_options_are_checked_against_an_inversion_files_prompt(tiny_sd1, image, tmp_path, capsys):
    inv = tmp_path / "inv.safetensors"
    assert run(capsys, "invert", image, "-o", inv, "--model", tiny_sd1.folder, *FAST, "--source-prompt", "a photo",
               "-q")[0] == 0
    rc, out, err = run(capsys, "compare", inv, "-o", tmp_path / "c.png", "--model", tiny_sd1.folder,
                       "--target-prompt", "a cat", "--local-blend", "dog,cat")
    assert rc == 2 and out == "" and len(err.splitlines()) == 1 and "local_blend source" in err and "'dog'" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inv.safetensors"]


def test_a_ddim_inversion_shows_ddim_and_ddim_p2p(tiny_sd1, image, tmp_path, capsys):
    """On an inversion made with --sampler ddim every panel runs; the middle two are "DDIM inversion" and "DDIM + P2P"
    (keys ddim, ddim+p2p), each the edit of that inversion; the UNet runs once per inverted step (no skip: 6 steps,
    unconditional and source rows); without prompts the two are left out under their DDIM names."""
    out = tmp_path / "c.png"
    rc, _, err = run(capsys, "compare", image, "-o", out, "--model", tiny_sd1.folder, "--sampler", "ddim", "--steps",
                     "6", "--size", "64", *PROMPTS, *CONCEPTS, "--clip-model", "none", "-q")
    assert rc == 0, err
    record = json.loads(out.with_suffix(".json").read_text())
    panels = record["panels"]
    assert [(p["method"], p["label"]) for p in panels] == [
        ("input", "input"), ("reconstruction", "reconstruction"), ("ddim", "DDIM inversion"),
        ("ddim+p2p", "DDIM + P2P"), ("ledits", "LEDITS"), ("leditspp", "LEDITS++")]
    assert record["left_out"] == {} and record["inversion_unet_evaluations"] == 2 * 6
    assert record["settings"]["sampler"] == "ddim" and record["settings"]["cross_replace"] == 0.6
    sd = minledits.load(tiny_sd1.folder)
    inv = minledits.invert(sd, image, sampler="ddim", steps=6, size=64, source_prompt="a photo")
    sheet = np.asarray(Image.open(out).convert("RGB"))[16:]
    assert np.array_equal(sheet[:, 3 * 64:4 * 64], np.asarray(minledits.decode(sd, p2p.edit(sd, inv, "a cat"))))
    plain = minledits.ledits.edit(sd, inv, target_prompt="a cat")
    assert np.array_equal(sheet[:, 2 * 64:3 * 64], np.asarray(minledits.decode(sd, plain)))
    rc, _, err = run(capsys, "compare", image, "-o", tmp_path / "n.png", "--model", tiny_sd1.folder, "--sampler",
                     "ddim", "--steps", "6", "--size", "64", "--clip-model", "none", "-q")
    assert rc == 0 and sorted(json.loads((tmp_path / "n.json").read_text())["left_out"]) == [
        "ddim", "ddim+p2p", "ledits", "leditspp"]
    assert ("DDIM + P2P left out: it maps the source prompt's words to the target's: give --target-prompt and an "
            "inversion with a source prompt (--source-prompt when the photo is inverted)") in err
    inv_file = tmp_path / "inv.safetensors"
    assert run(capsys, "invert", image, "-o", inv_file, "--model", tiny_sd1.folder, "--steps", "6", "--size", "64",
               "-q")[0] == 0
    rc, _, err = run(capsys, "compare", inv_file, "-o", tmp_path / "f.png", "--model", tiny_sd1.folder,
                     "--target-prompt", "a cat", "--clip-model", "none", "-q")
    assert rc == 0 and ("DDPM + P2P left out: it maps the source prompt's words to the target's: give an inversion "
                        "with a source prompt (--source-prompt when the photo is inverted)") in err

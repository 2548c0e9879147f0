"""The command line on Stable Diffusion 3 (the tiny random folder of tests/sd3_hub.py): `edit --method flowedit`
end to end (the PNG equals flowedit.edit's latents decoded, its recorded command line makes it again, --compare,
the progress bar, --no-t5, --offload-text, batch), `invert` (the flow sampler by default) then `edit --method
leditspp` and `reconstruct` on its inversion, and the one-line refusals between the two kinds of model: a flow-only
option or method on SD 1.x, an SD-only method or sampler on SD3, what FlowEdit leaves unused, T5 asked of a folder
without it.
"""
import json
import shlex
import shutil

import numpy as np
import pytest
from PIL import Image

import minledits
from minledits import flowedit
from minledits.cli import commands as cli_commands
from minledits.errors import shorten
from minledits.io import store
from minledits.model import decode
from tests import sd3_hub
from tests.helpers import photo as random_photo
from tests.helpers import run

pytestmark = pytest.mark.usefixtures("one_thread")
FLOW = ["--method", "flowedit", "--source-prompt", "a cat", "--target-prompt", "a dog", "--steps", "6", "--n-max",
        "4", "--n-min", "1", "--size", "64"]
OPTIONS = dict(source_prompt="a cat", target_prompt="a dog", steps=6, n_max=4, n_min=1, size=64)


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    return sd3_hub.make(tmp_path_factory.mktemp("sd3") / "sd3").folder


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("photo") / "photo.png"
    random_photo(size=(80, 64)).save(path)
    return path


def test_flowedit_end_to_end(sd3, photo, tmp_path, capsys):
    rc, out, err = run(capsys, "edit", photo, "-o", tmp_path / "dog.png", "--model", sd3, *FLOW, "--compare")
    assert rc == 0, err
    assert f"edit: {photo} -> {tmp_path / 'dog.png'}" in out
    assert "\redit: " in err and "/4 [" in err  # the progress bar: one step per edited step
    sd = minledits.load(sd3)
    expected = np.asarray(decode(sd, flowedit.edit(sd, photo, **OPTIONS)))
    assert np.array_equal(pixels(tmp_path / "dog.png"), expected)
    record = json.loads(Image.open(tmp_path / "dog.png").text["minledits"])
    assert {k: record[k] for k in (*OPTIONS, "method", "n_avg", "seed", "target_guidance", "source_guidance")} == \
        dict(OPTIONS, method="flowedit", n_avg=1, seed=0, target_guidance=13.5, source_guidance=3.5)
    side = pixels(tmp_path / "dog-compare.png")
    assert side.shape == (64, 128, 3) and np.array_equal(side[:, 64:], expected)


def test_the_recorded_command_makes_it_again(sd3, photo, tmp_path, capsys):
    assert run(capsys, "edit", photo, "-o", tmp_path / "a.png", "--model", sd3, *FLOW, "--n-avg", "2", "--seed", "4",
               "--negative-prompt", "blurry", "--target-guidance", "1", "-q")[0] == 0
    argv = shlex.split(Image.open(tmp_path / "a.png").text["parameters"])[1:]
    assert "--n-avg=2" in argv and "--seed=4" in argv and "--target-guidance=1.0" in argv
    assert run(capsys, *argv, "-o", tmp_path / "b.png", "-q")[0] == 0
    assert np.array_equal(pixels(tmp_path / "a.png"), pixels(tmp_path / "b.png"))


def test_no_t5_and_offload_text(sd3, photo, tmp_path, capsys):
    rc, _, err = run(capsys, "edit", photo, "-o", tmp_path / "a.png", "--model", sd3, *FLOW, "--no-t5",
                     "--offload-text", "-q")
    assert rc == 0, err
    sd = minledits.load(sd3, t5=False)
    assert sd.text_encoder_3 is None
    assert np.array_equal(pixels(tmp_path / "a.png"), np.asarray(decode(sd, flowedit.edit(sd, photo, **OPTIONS))))
    record = json.loads(Image.open(tmp_path / "a.png").text["minledits"])
    assert record["no_t5"] is True and record["offload_text"] is True


def test_a_folder_without_t5(sd3, photo, tmp_path, capsys):
    folder = tmp_path / "no-t5"
    shutil.copytree(sd3, folder)
    shutil.rmtree(folder / "text_encoder_3")
    rc, _, err = run(capsys, "edit", photo, "-o", tmp_path / "a.png", "--model", folder, *FLOW, "-q")
    assert rc == 1 and err.count("\n") == 1 and "text_encoder_3" in err and "--no-t5" in err
    assert not (tmp_path / "a.png").exists()
    assert run(capsys, "edit", photo, "-o", tmp_path / "a.png", "--model", folder, *FLOW, "--no-t5", "-q")[0] == 0


def test_batch_runs_flowedit_jobs(sd3, photo, tmp_path, capsys):
    jobs = tmp_path / "jobs.json"
    jobs.write_text(json.dumps([dict(input=str(photo), output="a.png", method="flowedit", source_prompt="a cat",
                                     target_prompt="a dog", steps=6, n_max=4, n_min=1, size=64)]))
    rc, _, err = run(capsys, "batch", jobs, "--outdir", tmp_path / "out", "--model", sd3, "-q")
    assert rc == 0, err
    sd = minledits.load(sd3)
    assert np.array_equal(pixels(tmp_path / "out" / "a.png"), np.asarray(decode(sd, flowedit.edit(sd, photo,
                                                                                                  **OPTIONS))))


def test_invert_then_leditspp_and_reconstruct(sd3, photo, tmp_path, capsys):
    """invert takes the flow sampler on SD3 when none is given; leditspp, ledits and reconstruct run on its file, and
    leditspp on the image (inverted first)."""
    inv = tmp_path / "inv.safetensors"
    rc, _, err = run(capsys, "invert", photo, "-o", inv, "--model", sd3, "--steps", "6", "--size", "64",
                     "--source-prompt", "a cat", "-q")
    assert rc == 0, err
    assert store.load(inv).settings.sampler == "flow"
    assert run(capsys, "invert", photo, "-o", tmp_path / "b.safetensors", "--model", sd3, "--sampler", "flow",
               "--steps", "6", "--size", "64", "-q")[0] == 0
    rc, _, err = run(capsys, "edit", inv, "-o", tmp_path / "pp.png", "--model", sd3, "--method", "leditspp",
                     "-e", "glasses", "-q")
    assert rc == 0, err
    rc, _, err = run(capsys, "reconstruct", inv, "-o", tmp_path / "rec.png", "--model", sd3, "-q")
    assert rc == 0, err
    rc, _, err = run(capsys, "edit", inv, "-o", tmp_path / "ledits.png", "--model", sd3, "--target-prompt", "a dog",
                     "-e", "glasses", "--compare", "-q")  # LEDITS' SEGA on a flow inversion
    assert rc == 0, err
    rc, _, err = run(capsys, "edit", photo, "-o", tmp_path / "pp2.png", "--model", sd3, "--method", "leditspp",
                     "-e", "glasses", "--steps", "6", "--size", "64", "-q")
    assert rc == 0, err


@pytest.mark.parametrize("argv, message", [
    (["edit", "{photo}", "--method", "p2p", "--source-prompt", "a cat", "--target-prompt", "a dog"],
     "--method p2p is for Stable Diffusion 1.x, 2.x and XL (it replaces the UNet's cross-attention); {sd3} is a "
     "rectified flow (Stable Diffusion 3): use --method flowedit, or leditspp or ledits on a flow inversion"),
    (["invert", "{photo}", "--sampler", "ddpm"], "--sampler ddpm is for Stable Diffusion 1.x, 2.x and XL; {sd3} is a "
     "rectified flow (Stable Diffusion 3): leave --sampler out (flow, its only sampler)"),
    (["edit", "{photo}", *FLOW, "--skip", "2"], "--method flowedit takes no --skip: it edits the image itself, "
     "without an inversion (the steps it edits are --n-max); leave it out"),
    (["edit", "{photo}", *FLOW, "--save-inversion", "{tmp}/i.safetensors"], "--method flowedit takes no "
     "--save-inversion: it edits the image itself, without an inversion (the steps it edits are --n-max); leave it "
     "out"),
    (["edit", "{photo}", *FLOW, "-e", "glasses"], "--method flowedit takes no concepts (-e): it is an option of "
     "--method ledits and leditspp; leave it out"),
    (["edit", "{photo}", *FLOW, "--n-min", "5"], "--n-min (the plain sampling steps at the end) must be in "
     "0..--n-max (4), got 5"),
    (["edit", "{photo}", *FLOW, "--n-max", "7"], "--n-max (the steps edited) must be in 1..--steps (6), got 7"),
    (["edit", "{photo}", *FLOW, "--n-avg", "0"], "--n-avg (noise draws per step) must be >= 1, got 0"),
    (["edit", "{photo}", *FLOW, "--size", "96"], "--size must be a multiple of 64 (at least 64), got 96"),
    (["sweep", "{photo}", *FLOW, "--vary", "skip=1,2"], "--method flowedit takes no --skip: it edits the image "
     "itself, without an inversion (the steps it edits are --n-max); leave it out"),
    (["download", "--offload-text"], "--offload-text is an option of running a model, not of download; leave it "
     "out")])
def test_refusals_on_sd3(sd3, photo, tmp_path, capsys, argv, message):
    argv = [a.format(photo=photo, tmp=tmp_path) for a in argv]
    out = {"edit": ["-o", tmp_path / "out.png"], "sweep": ["-o", tmp_path / "out.png"],
           "invert": ["-o", tmp_path / "out.safetensors"]}.get(argv[0], [])
    rc, _, err = run(capsys, *argv, *out, "--model", sd3, "-q")
    assert rc == (2 if argv[0] == "sweep" else 1)  # sweep: its cells' options are a usage error
    assert err == f"minledits: error: {message.format(sd3=shorten(str(sd3)))}\n"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, message", [
    (["edit", "{photo}", *FLOW], "--method flowedit needs a rectified-flow model (Stable Diffusion 3 or FLUX); {sd1} "
     "predicts epsilon: use --method ledits, leditspp or p2p"),
    (["invert", "{photo}", "--sampler", "flow", "--size", "64"], "--sampler flow is for rectified-flow models (Stable "
     "Diffusion 3, FLUX); {sd1} predicts epsilon: use --sampler ddpm, dpmsolver++ or ddim"),
    (["edit", "{photo}", "--no-t5", "--size", "64"], "--no-t5 is an option of Stable Diffusion 3; {sd1} is not one "
     "(a folder of another pipeline): leave it out"),
    (["edit", "{photo}", "--n-max", "5", "--size", "64"], "--method ledits takes no --n-max: it is an option of "
     "--method flowedit; leave it out")])
def test_refusals_on_sd1(tiny_sd1, photo, tmp_path, capsys, argv, message):
    argv = [a.format(photo=photo) for a in argv]
    out = tmp_path / ("out.safetensors" if argv[0] == "invert" else "out.png")
    rc, _, err = run(capsys, *argv, "-o", out, "--model", tiny_sd1.folder, "-q")
    assert rc == 1 and err == f"minledits: error: {message.format(sd1=shorten(str(tiny_sd1.folder)))}\n"
    assert list(tmp_path.iterdir()) == []


def test_random_tiny_takes_no_sd3_option(photo, tmp_path, capsys):
    rc, _, err = run(capsys, "edit", photo, "-o", tmp_path / "a.png", "--model", "random-tiny", "--offload-text", "-q")
    assert rc == 1 and err == "minledits: error: random-tiny is built on the fly from random weights: it takes no " \
                              "--offload-text; leave it out\n"


def test_download_without_t5(monkeypatch, tmp_path, capsys):
    calls = []
    monkeypatch.setattr(cli_commands, "download", lambda *a, **k: calls.append((a, k)) or tmp_path)
    repo = "stabilityai/stable-diffusion-3-medium-diffusers"
    assert run(capsys, "download", "--model", repo, "--no-t5", "-q")[0] == 0
    assert calls == [((repo, None, None, None), {"t5": False, "command": True})]

"""The command line on FLUX (the tiny random folders of tests/flux_hub.py, dev and schnell): `edit --method
rf-inversion` end to end (the PNG equals rfinversion.invert then edit decoded, bit for bit; its recorded command line
makes it again; --save-inversion, then the edit of that file; --compare), `--method flowedit` with FLUX's defaults
(flowedit.FLUX_DEFAULTS: the PNG and --help show them), `invert` (the flow sampler) then `--method leditspp` on its
inversion, --offload-text, and the one-line refusals, nothing written: guidance on FLUX.1-schnell, a size not a
multiple of 16, another family's option or method (p2p, the diffusion samplers, --no-t5, rf-inversion's options
elsewhere, rf-inversion on Stable Diffusion).
"""
import json
import shlex

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

import minledits
from minledits import flowedit, leditspp, rfinversion
from minledits.cli import commands
from minledits.errors import shorten
from minledits.io import store
from minledits.model import decode
from minledits.sega import Concept
from tests import flux_hub, sd3_hub
from tests.helpers import photo as random_photo
from tests.helpers import run

pytestmark = pytest.mark.usefixtures("one_thread")
RF = ["--method", "rf-inversion", "--target-prompt", "a dog", "--steps", "4", "--size", "64"]
FLOW = ["--method", "flowedit", "--source-prompt", "a cat", "--target-prompt", "a dog", "--size", "32"]


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def record(path) -> dict:
    return json.loads(Image.open(path).text["minledits"])


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    return flux_hub.make(tmp_path_factory.mktemp("flux") / "dev").folder


@pytest.fixture(scope="module")
def schnell(tmp_path_factory):
    return flux_hub.make(tmp_path_factory.mktemp("flux") / "schnell", kind="schnell").folder


@pytest.fixture(scope="module")
def sd(dev):
    return minledits.load(dev)


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("photo") / "photo.png"
    random_photo(size=(48, 40)).save(path)
    return path


def rf_api(sd, photo, steps=4, size=64, prompt="a dog", inversion=None, edit=None):
    inv = rfinversion.invert(sd, photo, steps=steps, size=size, **(inversion or {}))
    return inv, np.asarray(decode(sd, rfinversion.edit(sd, inv, prompt=prompt, **(edit or {}))))


def test_rf_inversion_end_to_end(dev, sd, photo, tmp_path, capsys):
    inv_file = tmp_path / "inv.safetensors"
    rc, out, err = run(capsys, "edit", photo, "-o", tmp_path / "dog.png", "--model", dev, *RF, "--compare",
                       "--save-inversion", inv_file)
    assert rc == 0, err
    assert f"edit: {photo} -> {tmp_path / 'dog.png'}" in out
    assert "\rinvert: " in err and "\redit: " in err and "/4 [" in err  # progress bars: a step each
    inv, expected = rf_api(sd, photo)
    assert np.array_equal(pixels(tmp_path / "dog.png"), expected)
    r = record(tmp_path / "dog.png")
    assert {k: r[k] for k in ("method", "gamma", "steps", "eta", "start_timestep", "stop_timestep", "guidance",
                              "target_prompt", "seed", "size")} == \
        dict(method="rf-inversion", gamma=rfinversion.GAMMA, steps=4, eta=rfinversion.ETA,
             start_timestep=rfinversion.START, stop_timestep=rfinversion.STOP, guidance=3.5, target_prompt="a dog",
             seed=0, size=64)
    side = pixels(tmp_path / "dog-compare.png")
    assert side.shape == (64, 128, 3) and np.array_equal(side[:, 64:], expected)
    saved = store.load(inv_file)
    assert saved.xts.equal(inv.xts)
    rc, _, err = run(capsys, "edit", inv_file, "-o", tmp_path / "again.png", "--model", dev, "--method",
                     "rf-inversion", "--target-prompt", "a dog", "-q")
    assert rc == 0, err
    assert np.array_equal(pixels(tmp_path / "again.png"), expected)


def test_rf_options_and_the_recorded_command(dev, sd, photo, tmp_path, capsys):
    options = ["--gamma", "0.3", "--eta", "0.7", "--start-timestep", "0.25", "--stop-timestep", "0.75",
               "--guidance", "2", "--seed", "3", "--source-prompt", "a cat"]
    rc, _, err = run(capsys, "edit", photo, "-o", tmp_path / "a.png", "--model", dev, *RF, *options, "-q")
    assert rc == 0, err
    _, expected = rf_api(sd, photo, inversion=dict(gamma=0.3, seed=3, source_prompt="a cat"),
                         edit=dict(eta=0.7, start_timestep=0.25, stop_timestep=0.75, guidance=2.0))
    assert np.array_equal(pixels(tmp_path / "a.png"), expected)
    argv = shlex.split(Image.open(tmp_path / "a.png").text["parameters"])[1:]
    assert "--gamma=0.3" in argv and "--eta=0.7" in argv and "--guidance=2.0" in argv
    assert run(capsys, *argv, "-o", tmp_path / "b.png", "-q")[0] == 0
    assert np.array_equal(pixels(tmp_path / "a.png"), pixels(tmp_path / "b.png"))


def test_flowedit_takes_flux_defaults(dev, sd, photo, tmp_path, capsys):
    rc, _, err = run(capsys, "edit", photo, "-o", tmp_path / "a.png", "--model", dev, *FLOW)
    assert rc == 0, err
    assert f"/{flowedit.FLUX_DEFAULTS['n_max']} [" in err
    options = dict(source_prompt="a cat", target_prompt="a dog", size=32)
    expected = np.asarray(decode(sd, flowedit.edit(sd, photo, **options, **flowedit.FLUX_DEFAULTS)))
    assert np.array_equal(pixels(tmp_path / "a.png"), expected)
    r = record(tmp_path / "a.png")
    assert {k: r[k] for k in flowedit.FLUX_DEFAULTS} == flowedit.FLUX_DEFAULTS
    rc, out, _ = run(capsys, "edit", "--help")
    text = " ".join(out.split())
    for value in ("on FLUX: 24", f"on FLUX {flowedit.FLUX_DEFAULTS['steps']}",
                  f"{flowedit.FLUX_DEFAULTS['source_guidance']:g})", f"{flowedit.FLUX_DEFAULTS['target_guidance']:g})",
                  f"--method rf-inversion: {rfinversion.STEPS}", f"(default: {rfinversion.GAMMA:g})"):
        assert value in text


def test_invert_then_leditspp_and_offload_text(dev, sd, photo, tmp_path, capsys):
    inv_file = tmp_path / "inv.safetensors"
    rc, _, err = run(capsys, "invert", photo, "-o", inv_file, "--model", dev, "--steps", "4", "--size", "64",
                     "--offload-text", "-q")
    assert rc == 0, err
    inv = store.load(inv_file)
    assert inv.settings.sampler == "flow" and not inv.rf
    rc, _, err = run(capsys, "invert", photo, "-o", tmp_path / "b.safetensors", "--model", dev, "--sampler", "flow",
                     "--steps", "4", "--size", "64", "-q")
    assert rc == 0, err
    assert store.load(tmp_path / "b.safetensors").xts.equal(inv.xts)  # offloaded text: the same tensors
    rc, _, err = run(capsys, "edit", inv_file, "-o", tmp_path / "pp.png", "--model", dev, "--method", "leditspp",
                     "-e", "glasses", "--offload-text", "-q")
    assert rc == 0, err
    expected = decode(sd, leditspp.edit(sd, inv, concepts=[Concept("glasses", **leditspp.CONCEPT_DEFAULTS)]))
    assert np.array_equal(pixels(tmp_path / "pp.png"), np.asarray(expected))
    assert record(tmp_path / "pp.png")["offload_text"] is True


@pytest.mark.parametrize("model, argv, message", [
    ("schnell", [*RF, "--guidance", "2"], "--guidance sets FLUX.1-dev's guidance embedding; {model} has none (as "
     "FLUX.1-schnell, distilled to run without guidance): leave it out"),
    ("schnell", FLOW, "--method flowedit on FLUX steers by FLUX.1-dev's guidance embedding (--source-guidance, "
     "--target-guidance), which {model} lacks (as FLUX.1-schnell): use FLUX.1-dev, or --method leditspp on a flow "
     "inversion"),
    ("dev", [*FLOW, "--size", "40"], "--size must be a multiple of 16 (at least 16), got 40"),
    ("dev", [*RF, "--size", "40"], "--size must be a multiple of 64 (at least 64), got 40"),
    ("dev", ["--method", "p2p", "--source-prompt", "a cat", "--target-prompt", "a dog"], "--method p2p is for "
     "Stable Diffusion 1.x, 2.x and XL (it replaces the UNet's cross-attention); {model} is a rectified flow "
     "(FLUX): use --method flowedit or rf-inversion, or leditspp or ledits on a flow inversion"),
    ("dev", ["--sampler", "ddim", "--size", "64"], "--sampler ddim is for Stable Diffusion 1.x, 2.x and XL; {model} "
     "is a rectified flow (FLUX): leave --sampler out (flow, its only sampler)"),
    ("dev", [*RF, "--no-t5"], "--no-t5: FLUX cannot run without T5 (its transformer reads the prompt as T5's tokens "
     "alone; CLIP gives only the pooled vector): leave it out"),
    ("dev", ["-e", "glasses", "--eta", "0.5"], "--method ledits takes no --eta: it is an option of --method "
     "rf-inversion; leave it out"),
    ("dev", [*FLOW, "--gamma", "0.5"], "--method flowedit takes no --gamma: it is an option of --method "
     "rf-inversion; leave it out"),
    ("dev", [*FLOW, "--negative-prompt", "blurry"], "--negative-prompt: FlowEdit on FLUX has no unconditional branch "
     "(FLUX.1 is guided by its guidance embedding, one row per side): leave it out"),
    ("dev", [*RF, "--skip", "1"], "RF-Inversion takes no --skip: its inversion is its own controlled flow (--gamma, "
     "--steps, --seed); leave it out"),
    ("dev", [*RF, "--source-guidance", "2"], "RF-Inversion takes no --source-guidance: its inversion is its own "
     "controlled flow (--gamma, --steps, --seed); leave it out"),
    ("dev", [*RF, "-e", "glasses"], "--method rf-inversion takes no concepts (-e): it is an option of --method ledits "
     "and leditspp; leave it out"),
    ("dev", [*RF, "--start-timestep", "0.5", "--stop-timestep", "0.25"], "--stop-timestep must be a finite number "
     ">= 0.5, got 0.25"),
    ("dev", [*RF, "--eta", "1.5"], "--eta must be a finite number from 0 to 1, got 1.5"),
    ("dev", [*RF, "--gamma", "-1"], "--gamma must be a finite number from 0 to 1, got -1.0")])
def test_refusals_on_flux(dev, schnell, photo, tmp_path, capsys, model, argv, message):
    folder = {"dev": dev, "schnell": schnell}[model]
    argv = [a.format(tmp=tmp_path) for a in argv]
    rc, _, err = run(capsys, "edit", photo, "-o", tmp_path / "out.png", "--model", folder, *argv, "-q")
    assert rc == 1 and err == f"minledits: error: {message.format(model=shorten(str(folder)))}\n"
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    return sd3_hub.make(tmp_path_factory.mktemp("sd3") / "sd3").folder


def test_refusals_elsewhere(tiny_sd1, sd3, photo, tmp_path, capsys):
    cases = [
        (sd3, RF, f"--method rf-inversion needs FLUX; {shorten(str(sd3))} is Stable Diffusion 3: use --method "
         "flowedit, or leditspp or ledits on a flow inversion"),
        (tiny_sd1.folder, RF, f"--method rf-inversion needs FLUX; {shorten(str(tiny_sd1.folder))} predicts epsilon: "
         "use --method ledits, leditspp or p2p"),
        (sd3, ["--target-prompt", "a dog", "--guidance", "2", "--size", "64"], "--method ledits takes no --guidance: "
         "it is an option of --method rf-inversion; leave it out"),
        (tiny_sd1.folder, ["--gamma", "0.3", "--size", "64"], "--method ledits takes no --gamma: it is an option of "
         "--method rf-inversion; leave it out")]
    cases += [(sd3, ["invert", "--gamma", "0.5", "--size", "64"], f"--gamma makes an RF-Inversion, which needs FLUX; "
               f"{shorten(str(sd3))} is Stable Diffusion 3: leave --gamma out"),
              (sd3, ["reconstruct", "--gamma", "0.5"], "reconstruct takes no --gamma: RF-Inversion regenerates with "
               "minledits edit --method rf-inversion")]
    for model, argv, message in cases:
        command, argv = (argv[0], argv[1:]) if argv[0] in ("invert", "reconstruct") else ("edit", argv)
        out = tmp_path / ("out.safetensors" if command == "invert" else "out.png")
        rc, _, err = run(capsys, command, photo, "-o", out, "--model", model, *argv, "-q")
        assert rc == 1 and err == f"minledits: error: {message}\n"
        assert list(tmp_path.iterdir()) == []


def test_invert_with_gamma_makes_an_rf_inversion(dev, sd, photo, tmp_path, capsys):
    """invert --gamma: RF-Inversion's file, which edit --method rf-inversion takes (and no other method)."""
    inv_file = tmp_path / "rf.safetensors"
    rc, _, err = run(capsys, "invert", photo, "-o", inv_file, "--model", dev, "--gamma", "0.5", "--steps", "4",
                     "--size", "64", "-q")
    assert rc == 0, err
    inv, expected = rf_api(sd, photo)
    saved = store.load(inv_file)
    assert saved.rf and saved.xts.equal(inv.xts)
    rc, _, err = run(capsys, "edit", inv_file, "-o", tmp_path / "a.png", "--model", dev, "--method", "rf-inversion",
                     "--target-prompt", "a dog", "-q")
    assert rc == 0, err
    assert np.array_equal(pixels(tmp_path / "a.png"), expected)
    argv = shlex.split(Image.open(tmp_path / "a.png").text["parameters"])[1:]
    assert "--gamma=0.5" in argv and "--steps=4" in argv  # the file's settings, which it takes again
    assert run(capsys, *argv, "-o", tmp_path / "b.png", "-q")[0] == 0
    for argv in (["edit", inv_file, "--method", "leditspp", "-e", "glasses"], ["reconstruct", inv_file]):
        rc, _, err = run(capsys, *argv, "-o", tmp_path / "c.png", "--model", dev, "-q")
        assert rc == 1 and err.count("\n") == 1 and "is an RF-Inversion" in err
    rc, _, err = run(capsys, "edit", inv_file, "-o", tmp_path / "c.png", "--model", dev, "--method", "rf-inversion",
                     "--gamma", "0.25", "-q")
    assert rc == 1 and err.startswith(f"minledits: error: {inv_file} was made with gamma=0.5")
    assert not (tmp_path / "c.png").exists()


def test_rf_inversion_trace(dev, sd, photo, tmp_path, capsys, monkeypatch):
    """--trace of RF-Inversion: its edit's steps (RFTrace), the PNG the same bit for bit; on a failure nothing
    written."""
    rc, _, err = run(capsys, "edit", photo, "-o", tmp_path / "a.png", "--model", dev, *RF, "--trace", tmp_path / "t",
                     "-q")
    assert rc == 0, err
    assert np.array_equal(pixels(tmp_path / "a.png"), rf_api(sd, photo)[1])
    tensors = load_file(tmp_path / "t.safetensors")
    assert tensors["x0_hat"].shape == tensors["x"].shape == (4, 1, 16, 8, 8) and tensors["eta"].shape == (4,)
    assert np.array_equal(np.asarray(decode(sd, tensors["x"][-1])), pixels(tmp_path / "a.png")), "the edit's last step"
    assert Image.open(tmp_path / "t.png").width > 0
    monkeypatch.setattr(commands, "write_png", lambda *a: (_ for _ in ()).throw(OSError("the disk is full")))
    rc, _, err = run(capsys, "edit", photo, "-o", tmp_path / "b.png", "--model", dev, *RF, "--trace", tmp_path / "u",
                     "--compare", "-q")
    assert rc == 1 and err.startswith("minledits: error: ") and "the disk is full" in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "t.png", "t.safetensors"]


def test_rf_inversion_on_schnell(schnell, photo, tmp_path, capsys):
    """FLUX.1-schnell: no guidance embedding, so none recorded; its own schedule (no dynamic shift)."""
    rc, _, err = run(capsys, "edit", photo, "-o", tmp_path / "a.png", "--model", schnell, *RF, "-q")
    assert rc == 0, err
    sd = minledits.load(schnell)
    assert np.array_equal(pixels(tmp_path / "a.png"), rf_api(sd, photo)[1])
    assert record(tmp_path / "a.png")["guidance"] is None
    assert "--guidance" not in Image.open(tmp_path / "a.png").text["parameters"]


def test_ledits_on_a_flux_flow_inversion(dev, sd, photo, tmp_path, capsys):
    rc, _, err = run(capsys, "edit", photo, "-o", tmp_path / "a.png", "--model", dev, "--target-prompt", "a dog",
                     "-e", "glasses", "--steps", "4", "--size", "64", "-q")
    assert rc == 0, err
    assert record(tmp_path / "a.png")["sampler"] == "flow"


def test_batch_runs_rf_inversion_jobs(dev, sd, photo, tmp_path, capsys):
    jobs = tmp_path / "jobs.json"
    jobs.write_text(json.dumps([dict(input=str(photo), output="a.png", method="rf-inversion", target_prompt="a dog",
                                     steps=4, size=64, eta=0.5)]))
    rc, _, err = run(capsys, "batch", jobs, "--outdir", tmp_path / "out", "--model", dev, "-q")
    assert rc == 0, err
    assert np.array_equal(pixels(tmp_path / "out" / "a.png"), rf_api(sd, photo, edit=dict(eta=0.5))[1])

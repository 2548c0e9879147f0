"""The tools on FLUX.1 (the tiny random folders of tests/flux_hub.py, dev and schnell, 64 px): `compare` (input |
reconstruction | flow inversion | FlowEdit with the paper's FLUX settings | RF-Inversion | LEDITS | LEDITS++, each
panel the API's or the `edit` command's picture, transformer rows counted; on schnell no FlowEdit, said so), `--trace`
of LEDITS++ on a FLUX flow inversion and of FlowEdit on FLUX (the dynamic shift's sigmas), RF-Inversion's trace
(tools/trace.py's RFTrace), `sweep` on FLUX (FlowEdit cells, LEDITS++ cells on one flow inversion, RF-Inversion cells:
one inversion per gamma), the app's methods and samplers on FLUX.
"""
import argparse
import json
import shlex

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import minledits
from minledits import flowedit, rfinversion
from minledits.cli import webapp
from minledits.cli.options import COMMON, EDIT, INVERT, dest
from minledits.errors import MinleditsError, shorten
from minledits.flowmatch import FlowEuler, image_tokens
from minledits.io import store
from minledits.model import decode
from minledits.tools.trace import RFTrace
from tests import test_cli_flow, test_cli_flux
from tests.helpers import run
from tests.test_flow_tools import panel

pytestmark = pytest.mark.usefixtures("one_thread")
dev, schnell = test_cli_flux.dev, test_cli_flux.schnell  # fixtures: the tiny FLUX.1 folders (module-scoped)
photo, pixels = test_cli_flow.photo, test_cli_flow.pixels  # an 80 x 64 photo
SIZE = ["--size", "64"]
PROMPTS = ["--source-prompt", "a cat", "--target-prompt", "a dog"]


@pytest.fixture(scope="module")
def inversion(dev, photo, tmp_path_factory):
    """A flow inversion file of the photo on FLUX.1-dev (6 steps, 64 px: 4 to edit) with a source prompt."""
    path = tmp_path_factory.mktemp("inv") / "inv.safetensors"
    rc = minledits.cli.main(["invert", str(photo), "-o", str(path), "--model", str(dev), "--steps", "6", *SIZE,
                             "--source-prompt", "a cat", "-q"])
    assert rc == 0
    return path


# --------------------------------------------------------------------------------------------- compare
def test_compare_on_flux_each_panel_is_its_edit(dev, photo, tmp_path, capsys):
    rf = ["--gamma", "0.6", "--eta", "0.8", "--stop-timestep", "0.5"]
    rc, _, err = run(capsys, "compare", photo, "-o", tmp_path / "c.png", "--model", dev, "--steps", "6", *SIZE,
                     *PROMPTS, "-e", "glasses", "--n-max", "4", *rf, "--clip-model", "none")
    assert rc == 0, err
    assert "flow + P2P left out: Prompt-to-Prompt replaces a UNet's cross-attention: none on a rectified flow " \
           "(Stable Diffusion 3, FLUX.1)\n" in err
    record = json.loads((tmp_path / "c.json").read_text())
    assert [p["method"] for p in record["panels"]] == ["input", "reconstruction", "flow", "flowedit", "rf-inversion",
                                                       "ledits", "leditspp"]
    s = record["settings"]
    assert s["sampler"] == "flow" and (s["n_max"], s["n_min"], s["n_avg"]) == (4, 0, 1)
    assert (s["gamma"], s["eta"], s["start_timestep"], s["stop_timestep"]) == (0.6, 0.8, 0.0, 0.5)
    rows = {p["method"]: p["unet_evaluations"] for p in record["panels"]}
    # FlowEdit: one row per side (the guidance embedding, no CFG) x 4 steps; RF-Inversion: both ODEs of 28 steps
    assert rows["reconstruction"] == 4 and rows["flowedit"] == 2 * 4 and rows["rf-inversion"] == 2 * rfinversion.STEPS
    sheet = pixels(tmp_path / "c.png")
    edits = {3: ["--method", "flowedit", *PROMPTS, "--n-max", "4"],  # FLUX_DEFAULTS' 28 steps, not the inversion's
             4: ["--method", "rf-inversion", *PROMPTS, *rf],
             6: ["--method", "leditspp", "-e", "glasses", "--steps", "6", "--source-prompt", "a cat"]}
    for j, argv in edits.items():
        rc, _, err = run(capsys, "edit", photo, "-o", tmp_path / f"{j}.png", "--model", dev, *SIZE, *argv, "-q")
        assert rc == 0, err
        assert np.array_equal(panel(sheet, j), pixels(tmp_path / f"{j}.png")), f"panel {j} is the edit command's"
    sd = minledits.load(dev)  # and the API's
    w0 = rfinversion.edit(sd, rfinversion.invert(sd, photo, gamma=0.6, size=64, source_prompt="a cat"), prompt="a dog",
                          eta=0.8, stop_timestep=0.5)
    assert np.array_equal(panel(sheet, 4), np.asarray(decode(sd, w0)))


def test_compare_on_schnell_leaves_flowedit_out(schnell, photo, tmp_path, capsys):
    rc, _, err = run(capsys, "compare", photo, "-o", tmp_path / "c.png", "--model", schnell, "--steps", "4", *SIZE,
                     *PROMPTS, "--clip-model", "none")
    assert rc == 0, err
    assert "minledits: note: FlowEdit left out: FlowEdit on FLUX steers by the guidance embedding, which this model " \
           "(FLUX.1-schnell) lacks\n" in err
    record = json.loads((tmp_path / "c.json").read_text())
    assert [p["method"] for p in record["panels"]] == ["input", "reconstruction", "flow", "rf-inversion"]
    assert "n_max" not in record["settings"]


def test_compare_refusals_on_flux(dev, photo, inversion, tmp_path, capsys):
    rf = tmp_path / "rf.safetensors"
    store.save(rfinversion.invert(minledits.load(dev), photo, steps=2, size=64), rf)
    rc, _, err = run(capsys, "compare", rf, "-o", tmp_path / "c.png", "--model", dev, "--target-prompt", "a dog",
                     "--clip-model", "none", "-q")
    assert rc == 1 and err.startswith(f"minledits: error: {rf} is an RF-Inversion (gamma 0.5): only RF-Inversion's "
                                      "edit") and err.count("\n") == 1  # compare makes RF-Inversion's own
    rc, _, err = run(capsys, "compare", inversion, "-o", tmp_path / "c.png", "--model", dev, "--target-prompt",
                     "a dog", "--n-max", "29", "--clip-model", "none", "-q")
    assert rc == 2 and err == "minledits: error: --n-max (the FlowEdit panel's, its steps FlowEdit's on FLUX, 28): " \
                              "n_max (the steps edited) must be in 1..steps (28), got 29\n"
    rc, _, err = run(capsys, "compare", inversion, "-o", tmp_path / "c.png", "--model", dev, "--target-prompt",
                     "a dog", "--start-timestep", "0.5", "--clip-model", "none", "-q")
    assert rc == 2 and err == "minledits: error: --stop-timestep must be a finite number >= 0.5, got 0.25 (the " \
                              "RF-Inversion panel's)\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rf.safetensors"]


@pytest.mark.parametrize("argv, message", [
    (["--guidance", "2"], "--guidance (the RF-Inversion panel's) sets FLUX.1-dev's guidance embedding, which this "
     "model (FLUX.1-schnell) lacks: leave it out"),
    (["--n-max", "2"], "--n-max (the FlowEdit panel's): FlowEdit on FLUX steers by the guidance embedding, which this "
     "model (FLUX.1-schnell) lacks: leave --n-max out")])
def test_compare_refusals_on_schnell(schnell, photo, tmp_path, capsys, argv, message):
    rc, _, err = run(capsys, "compare", photo, "-o", tmp_path / "c.png", "--model", schnell, "--steps", "2", *SIZE,
                     "--target-prompt", "a dog", *argv, "--clip-model", "none", "-q")
    assert rc == 2 and err == f"minledits: error: {message}\n"
    assert list(tmp_path.iterdir()) == []


def test_compare_refuses_rf_options_on_sd1(tiny_sd1, photo, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(minledits.inversion, "noise_maps", lambda *a, **k: pytest.fail("inverted"))
    rc, _, err = run(capsys, "compare", photo, "-o", tmp_path / "c.png", "--model", tiny_sd1.folder, "--size", "64",
                     "--steps", "4", "--target-prompt", "a dog", "--eta", "0.5", "--clip-model", "none", "-q")
    assert rc == 2 and err == f"minledits: error: --eta (the RF-Inversion panel's): RF-Inversion runs on FLUX.1, and " \
                              f"{shorten(str(tiny_sd1.folder))} is not one: leave --eta out\n"


# --------------------------------------------------------------------------------------------- traces
def test_rf_trace(dev, photo):
    sd = minledits.load(dev)
    inv = rfinversion.invert(sd, photo, steps=6, size=64, source_prompt="a cat")
    steps, trace = [], RFTrace(sd, inv)
    w0 = rfinversion.edit(sd, inv, prompt="a dog", stop_timestep=0.5, callback=lambda st: (steps.append(st), trace(st)))
    t = trace.tensors()
    assert sorted(t) == ["eta", "t", "v", "v_cond", "v_hat", "x", "x0_hat"]
    assert t["x"].shape == t["x0_hat"].shape == (6, 1, 16, 8, 8) and torch.equal(t["x"][-1], w0)
    assert t["eta"].tolist() == [1.0] * 3 + [0.0] * 3  # eta inside start..stop (0..3 of 6 steps)
    sigmas = FlowEuler(sd.schedule, 6, image_tokens(8, 8)).sigmas
    for i, st in enumerate(steps):  # the transformer's clean prediction: X_k - sigma_k u, u = -v
        torch.testing.assert_close(t["x0_hat"][i], st.x + sigmas[i] * st.v)
    assert trace.picture().size == (6 * 66, 2 * 66)  # the x0 prediction above the state
    with pytest.raises(ValueError, match="^RFTrace follows RF-Inversion's edit"):
        rfinversion.invert(sd, photo, steps=2, size=64, callback=RFTrace(sd, inv))


def test_trace_of_flowedit_on_flux(dev, photo, tmp_path, capsys):
    rc, _, err = run(capsys, "edit", photo, "-o", tmp_path / "a.png", "--model", dev, "--method", "flowedit", *PROMPTS,
                     *SIZE, "--steps", "6", "--n-max", "4", "--trace", tmp_path / "t", "-q")
    assert rc == 0, err
    sd, steps = minledits.load(dev), []
    options = dict(source_prompt="a cat", target_prompt="a dog", steps=6, n_max=4, size=64)
    w0 = flowedit.edit(sd, photo, **{**flowedit.FLUX_DEFAULTS, **options}, callback=steps.append)
    assert np.array_equal(pixels(tmp_path / "a.png"), np.asarray(decode(sd, w0))), "the trace changes nothing"
    t = load_file(tmp_path / "t.safetensors")
    sigmas = FlowEuler(sd.schedule, 6, image_tokens(8, 8)).sigmas  # FLUX's shift for 16 tokens
    assert not torch.equal(sigmas, FlowEuler(sd.schedule, 6, image_tokens(16, 16)).sigmas)
    for i, st in enumerate(steps):
        torch.testing.assert_close(t["x0_hat"][i], (st.zt_tar - sigmas[st.k] * st.v_tar).mean(0, keepdim=True))


def test_trace_of_leditspp_on_a_flux_inversion(dev, inversion, tmp_path, capsys):
    rc, _, err = run(capsys, "edit", inversion, "-o", tmp_path / "pp.png", "--model", dev, "--method", "leditspp",
                     "-e", "glasses", "-e", "-hat", "--trace", tmp_path / "t", "-q")
    assert rc == 0, err
    t = load_file(tmp_path / "t.safetensors")
    S, C = 4, 2
    assert t["x0_hat"].shape == (S, 1, 16, 8, 8) and t["attn"].shape == (S, C, 4, 4)  # the packed grid: 8 / 2
    flow, inv = FlowEuler(minledits.load(dev).schedule, 6, image_tokens(8, 8)), store.load(inversion)
    x_t = torch.cat([inv.xts[:1], t["x"][:-1, 0]])
    for i in range(S):
        torch.testing.assert_close(t["x0_hat"][i], flow.x0_hat(2 + i, x_t[i:i + 1], t["eps"][i]))
    assert Image.open(tmp_path / "t.png").size == (4 * 66, (1 + 3 * C) * 66)


# --------------------------------------------------------------------------------------------- sweep
def test_sweep_of_leditspp_over_skip_on_flux_inverts_once(dev, photo, tmp_path, capsys):
    rc, _, err = run(capsys, "sweep", photo, "-o", tmp_path / "s.png", "--model", dev, "--steps", "6", *SIZE,
                     "--method", "leditspp", "-e", "glasses", "--vary", "skip=1,3", "--clip-model", "none")
    assert rc == 0, err
    assert "sweep of 2 cells, 0 done already: 1 inversion(s) and 2 edit(s)" in err
    rc, _, err = run(capsys, "edit", photo, "-o", tmp_path / "e.png", "--model", dev, "--steps", "6", *SIZE,
                     "--skip", "3", "--method", "leditspp", "-e", "glasses", "-q")
    assert rc == 0, err
    assert np.array_equal(pixels(tmp_path / "s" / "001.png"), pixels(tmp_path / "e.png")), "a sliced cell is its edit"


def test_sweep_of_flowedit_on_flux(dev, photo, tmp_path, capsys):
    flow = ["--method", "flowedit", *PROMPTS, "--steps", "6", *SIZE]
    rc, _, err = run(capsys, "sweep", photo, "-o", tmp_path / "s.png", "--model", dev, *flow, "--vary", "n_max=2,4",
                     "--clip-model", "none")
    assert rc == 0, err
    assert "sweep of 2 cells, 0 done already: 0 inversion(s) and 2 edit(s)" in err
    cells = json.loads((tmp_path / "s.json").read_text())["cells"]
    assert [c["settings"]["n_max"] for c in cells] == [2, 4]
    rc, _, err = run(capsys, "edit", photo, "-o", tmp_path / "e.png", "--model", dev, *flow, "--n-max", "4", "-q")
    assert rc == 0, err
    assert np.array_equal(pixels(tmp_path / "s" / "001.png"), pixels(tmp_path / "e.png"))


def test_sweep_of_rf_inversion_over_gamma_and_eta(dev, photo, inversion, tmp_path, capsys):
    """RF-Inversion's cells invert once per gamma (its own inversion), each cell the edit command's picture."""
    rf = ["--method", "rf-inversion", *PROMPTS, "--steps", "6", *SIZE]
    sweep = ["sweep", photo, "-o", tmp_path / "s.png", "--model", dev, *rf, "--vary", "gamma=0.3,0.6", "--vary",
             "eta=0.5,1", "--clip-model", "none"]
    rc, _, err = run(capsys, *sweep)
    assert rc == 0, err
    assert "sweep of 4 cells, 0 done already: 2 inversion(s) and 4 edit(s)" in err
    cells = json.loads((tmp_path / "s.json").read_text())["cells"]
    assert [(c["settings"]["gamma"], c["settings"]["eta"]) for c in cells] == [(0.3, 0.5), (0.3, 1), (0.6, 0.5),
                                                                                (0.6, 1)]
    rc, _, err = run(capsys, "edit", photo, "-o", tmp_path / "e.png", "--model", dev, *rf, "--gamma", "0.6", "--eta",
                     "0.5", "-q")
    assert rc == 0, err
    assert np.array_equal(pixels(tmp_path / "s" / "002.png"), pixels(tmp_path / "e.png"))
    rc, out, err = run(capsys, *sweep, "-q")  # a rerun keeps its cells
    assert rc == 0 and "sweep: 0 cells done, 4 kept, 0 failed" in out, err
    rc, _, err = run(capsys, "sweep", inversion, "-o", tmp_path / "f.png", "--model", dev, "--method", "rf-inversion",
                     "--target-prompt", "a dog", "--vary", "eta=0.5,1", "--clip-model", "none", "-q")
    assert rc == 2 and err == "minledits: error: --method rf-inversion: a sweep makes RF-Inversion's inversions from " \
                              "the picture: give the picture, not an inversion file\n"


# --------------------------------------------------------------------------------------------- the app
def app_on(folder, tmp_path):
    args = argparse.Namespace(**{dest(f, o): None for f, _, _, o in COMMON}, cmd="app")
    args.model = str(folder)
    return webapp.App(args, tmp_path / "app")


def test_the_app_on_flux(dev, schnell, photo, tmp_path):
    """The app offers LEDITS and LEDITS++ on a flow inversion of FLUX and RF-Inversion (no P2P, no FlowEdit: refused
    in one line; only the flow sampler); its LEDITS++ edit is the command's."""
    sd = minledits.load(dev)
    method = next(o["choices"] for f, _, _, o in EDIT if dest(f, o) == "method")
    sampler = next(o["choices"] for f, _, _, o in INVERT if dest(f, o) == "sampler")
    assert webapp.choices_for(sd, "method", method) == ["ledits", "leditspp", "rf-inversion"]
    assert webapp.choices_for(minledits.load(schnell), "method", method) == ["ledits", "leditspp", "rf-inversion"]
    assert webapp.choices_for(sd, "sampler", sampler) == ["flow"]
    app = app_on(dev, tmp_path)
    session = app.session("a")
    result = app.edit(session, photo, dict(method="leditspp", concepts="glasses", steps=6, size=64))
    assert result["inversion"].settings.sampler == "flow" and result["steps"] == 4
    assert len(result["frames"](1)) == 1 + 3
    assert minledits.cli.main(["edit", str(photo), "-o", str(tmp_path / "cli.png"), "--model", str(dev), "-q",
                               "--method", "leditspp", "-e", "glasses", "--steps", "6", "--size", "64"]) == 0
    assert np.array_equal(pixels(result["png"]), pixels(tmp_path / "cli.png"))
    with pytest.raises(MinleditsError, match="^--method p2p is for Stable Diffusion 1.x"):
        app.edit(session, photo, dict(method="p2p", source_prompt="a cat", target_prompt="a dog"))
    with pytest.raises(MinleditsError, match="^--method flowedit is not in the app: it edits the photo itself"):
        app.edit(session, photo, dict(method="flowedit", source_prompt="a cat", target_prompt="a dog"))


def test_rf_inversion_in_the_app(dev, photo, tmp_path):
    """RF-Inversion in the app: its own inversion (kept in the session, made by /invert where gamma is given), the
    edit the command's picture, its trace's x0 predictions, its files; the flow inversion's fields the page sends
    are left out."""
    app, page = app_on(dev, tmp_path), dict(sampler="flow", batch_size=4, source_guidance=3.5, keep_last_noise=False)
    session = app.session("a")
    options = dict(page, method="rf-inversion", source_prompt="a cat", target_prompt="a dog", steps=6, size=64,
                   eta=0.5, compare=True)
    result = app.edit(session, photo, options)
    assert result["inverted"] and result["inversion"].rf and result["steps"] == 6
    assert [caption for _, caption in result["frames"](6)] == ["x0 prediction"]
    argv = ["--method", "rf-inversion", "--source-prompt", "a cat", "--target-prompt", "a dog", "--steps", "6",
            "--size", "64", "--eta", "0.5", "--compare"]
    assert minledits.cli.main(["edit", str(photo), "-o", str(tmp_path / "cli.png"), "--model", str(dev), "-q",
                               *argv, "--trace", str(tmp_path / "cli-trace")]) == 0
    assert np.array_equal(pixels(result["png"]), pixels(tmp_path / "cli.png"))
    assert np.array_equal(pixels(result["compare"]), pixels(tmp_path / "cli-compare.png"))
    page_trace, cli_trace = load_file(app.files(session)[2]), load_file(tmp_path / "cli-trace.safetensors")
    assert page_trace.keys() == cli_trace.keys() and all(page_trace[k].equal(cli_trace[k]) for k in cli_trace)
    again = app.edit(session, photo, dict(options, eta=1.0))
    assert not again["inverted"], "another eta reuses the inversion"
    png, inv, tensors, _ = app.files(session)
    assert store.load(inv).rf and load_file(tensors)["eta"].tolist() == [1.0] + [0.0] * 5  # stop 0.25 of 6 steps
    from_file = app.edit(app.session("b"), inv, dict(page, method="rf-inversion", target_prompt="a dog", eta=1.0))
    assert np.array_equal(pixels(from_file["png"]), pixels(png)), "its inversion file edits as the inversion"
    args = app.arguments(photo, dict(page, source_prompt="a cat", steps=6, size=64, gamma=0.5), tmp_path / "x.png")
    inv, made, _ = app.invert(session, args)  # /invert with gamma: RF-Inversion's, the one the edits made
    assert not made and inv.rf
    pytest.importorskip("gradio")
    ids = {getattr(b, "elem_id", None) for b in webapp.page(app).blocks.values()}
    assert {"gamma", "eta", "start_timestep", "stop_timestep", "guidance"} <= ids


def test_the_app_runs_rf_inversion_s_own_steps(dev, photo, tmp_path):
    """The steps field left at the page's default: RF-Inversion's own (rfinversion.STEPS), the picture the command's
    without --steps, and the command line the page shows makes it again; /invert with gamma makes that inversion."""
    app, page = app_on(dev, tmp_path), dict(steps=webapp.STEPS, seed=0, sampler="flow", batch_size=4)
    session = app.session("a")
    result = app.edit(session, photo, dict(page, method="rf-inversion", target_prompt="a dog", size=64))
    assert result["inversion"].settings.steps == result["steps"] == rfinversion.STEPS != webapp.STEPS
    assert minledits.cli.main(["edit", str(photo), "-o", str(tmp_path / "cli.png"), "--model", str(dev), "-q",
                               "--method", "rf-inversion", "--target-prompt", "a dog", "--size", "64"]) == 0
    assert np.array_equal(pixels(result["png"]), pixels(tmp_path / "cli.png"))
    argv = shlex.split(webapp.command(result["png"], "p.png"))[1:]
    assert f"--steps={rfinversion.STEPS}" in argv and argv[-2:] == ["-o", "edit.png"]
    argv[1], argv[-1] = str(photo), str(tmp_path / "line.png")
    assert minledits.cli.main([*argv, "-q"]) == 0
    assert np.array_equal(pixels(result["png"]), pixels(tmp_path / "line.png")), "the page's command line makes it"
    args = app.arguments(photo, dict(page, gamma=rfinversion.GAMMA, size=64), tmp_path / "x.png")
    inv, made, _ = app.invert(session, args)
    assert not made and inv is result["inversion"], "the inversion /invert makes at the page's steps: the same"

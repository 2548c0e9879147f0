"""The tools on Stable Diffusion 3 (the tiny random folder of tests/sd3_hub.py): `--trace` of LEDITS++ on a flow
inversion and of FlowEdit (tools/trace.py's FlowTrace), the latent -> RGB map on 16 channels, `compare` on a flow
(input | reconstruction | flow inversion | FlowEdit | LEDITS | LEDITS++, each panel the `edit` command that makes it,
P2P left out with a note, transformer rows counted), `sweep` on the flow sampler (one inversion for a sweep over
skip), the app's methods and samplers on SD3 (FlowEdit not among them), SD3's model options refused on an SD 1.x
folder before it is read.
"""
import argparse
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import minledits
from minledits import cli, flowedit
from minledits.cli import commands as cli_commands
from minledits.cli import webapp
from minledits.cli.options import COMMON, EDIT, INVERT, dest
from minledits.errors import MinleditsError
from minledits.flowmatch import FlowEuler
from minledits.io import store
from minledits.io.image import to_tensor
from minledits.model import decode
from minledits.tools.trace import FlowTrace, latent_rgb
from tests import test_cli_flow
from tests.helpers import run

pytestmark = pytest.mark.usefixtures("one_thread")
sd3, photo = test_cli_flow.sd3, test_cli_flow.photo  # fixtures: the tiny SD3 folder, a photo (module-scoped)
FLOW, pixels = test_cli_flow.FLOW, test_cli_flow.pixels


@pytest.fixture(scope="module")
def inversion(sd3, photo, tmp_path_factory):
    """A flow inversion file of the photo (6 steps, 64 px: 4 to edit) with a source prompt."""
    path = tmp_path_factory.mktemp("inv") / "inv.safetensors"
    rc = cli.main(["invert", str(photo), "-o", str(path), "--model", str(sd3), "--steps", "6", "--size",
                             "64", "--source-prompt", "a cat", "-q"])
    assert rc == 0
    return path


def test_latent_rgb_fits_a_linear_map_of_16_channels():
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(1, 16, 8, 8, generator=g)
    A, b = torch.randn(3, 16, generator=g) / 8, torch.tensor([0.1, -0.2, 0.05])
    image = (torch.einsum("rc,bchw->brhw", A, w0) + b[:, None, None]).repeat_interleave(8, -1).repeat_interleave(8, -2)
    rgb = latent_rgb(w0, image)(torch.cat([w0, -w0]))
    assert rgb.shape == (2, 3, 8, 8)
    expected = ((torch.einsum("rc,bchw->brhw", A, torch.cat([w0, -w0])) + b[:, None, None]) / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(rgb, expected, atol=1e-4, rtol=0)


def test_trace_of_leditspp_on_a_flow_inversion(sd3, inversion, tmp_path, capsys):
    rc, _, err = run(capsys, "edit", inversion, "-o", tmp_path / "pp.png", "--model", sd3, "--method", "leditspp",
                     "-e", "glasses", "-e", "-hat", "--trace", tmp_path / "t", "-q")
    assert rc == 0, err
    t = load_file(tmp_path / "t.safetensors")
    S, C = 4, 2
    assert t["x0_hat"].shape == (S, 1, 16, 8, 8) and t["attn"].shape[:2] == (S, C)
    assert t["M"].shape == t["m_noise"].shape == (S, C, 1, 16, 8, 8)
    flow, inv = FlowEuler(minledits.load(sd3).schedule, 6), store.load(inversion)
    x_t = torch.cat([inv.xts[:1], t["x"][:-1, 0]])  # each step starts where the previous ended
    for i in range(S):  # the x0 prediction: x_t - sigma_k v, the guided velocity
        torch.testing.assert_close(t["x0_hat"][i], flow.x0_hat(2 + i, x_t[i:i + 1], t["eps"][i]))
    with safe_open(tmp_path / "t.safetensors", "pt") as f:
        assert [c.split(":")[0] for c in json.loads(f.metadata()["concepts"])] == ["glasses", "-hat"]
    picture = Image.open(tmp_path / "t.png")  # 4 steps; x0, then attention, noise and applied mask per concept
    assert picture.size == (4 * 66, (1 + 3 * C) * 66)


def test_trace_of_ledits_on_a_flow_inversion(sd3, inversion, tmp_path, capsys):
    rc, _, err = run(capsys, "edit", inversion, "-o", tmp_path / "a.png", "--model", sd3, "--target-prompt", "a dog",
                     "-e", "glasses", "--trace", tmp_path / "t", "-q")
    assert rc == 0, err
    t = load_file(tmp_path / "t.safetensors")
    assert t["x0_hat"].shape == (4, 1, 16, 8, 8) and t["acts"].shape == (4, 1, 1, 16, 8, 8)
    assert Image.open(tmp_path / "t.png").size == (4 * 66, 2 * 66)  # x0, then the concept's SEGA mask


def test_trace_of_flowedit(sd3, photo, tmp_path, capsys):
    rc, _, err = run(capsys, "edit", photo, "-o", tmp_path / "a.png", "--model", sd3, *FLOW, "--trace", tmp_path / "t",
                     "-q")
    assert rc == 0, err
    sd, steps = minledits.load(sd3), []
    w0 = flowedit.edit(sd, photo, source_prompt="a cat", target_prompt="a dog", steps=6, n_max=4, n_min=1, size=64,
                       callback=steps.append)
    assert np.array_equal(pixels(tmp_path / "a.png"), np.asarray(decode(sd, w0))), "the trace changes nothing"
    t = load_file(tmp_path / "t.safetensors")
    assert sorted(t) == ["t", "tail", "v_delta", "x", "x0_hat"]
    assert t["tail"].tolist() == [False, False, False, True] and torch.equal(t["x"][-1], w0)
    sigmas = FlowEuler(sd.schedule, 6).sigmas
    for i, st in enumerate(steps):  # the target branch's clean prediction, the mean over the draws
        torch.testing.assert_close(t["x0_hat"][i], (st.zt_tar - sigmas[st.k] * st.v_tar).mean(0, keepdim=True))
    assert Image.open(tmp_path / "t.png").size == (4 * 66, 2 * 66)  # the x0 prediction above the edit's latent


def test_flow_trace_fits_its_colours_on_the_photo(sd3, photo):
    sd, x = minledits.load(sd3), to_tensor(photo, 64)
    trace = FlowTrace(sd, x, 6)
    flowedit.edit(sd, photo, source_prompt="a cat", target_prompt="a dog", steps=6, n_max=2, size=64, callback=trace)
    w0 = sd.encode(x)
    torch.testing.assert_close(trace.rgb(w0), latent_rgb(w0, x)(w0))


def panel(sheet: np.ndarray, j: int, side: int = 64) -> np.ndarray:
    """Panel j of compare.picture's sheet (its labels' strip above: max(side // 4, 16) px)."""
    strip = max(side // 4, 16)
    return sheet[strip:, side * j:side * (j + 1)]


def test_compare_on_a_flow_each_panel_is_its_command(sd3, photo, tmp_path, capsys):
    rc, _, err = run(capsys, "compare", photo, "-o", tmp_path / "c.png", "--model", sd3, "--steps", "6", "--size", "64",
                     "--source-prompt", "a cat", "--target-prompt", "a dog", "-e", "glasses", "--clip-model", "none")
    assert rc == 0, err
    assert "minledits: note: flow + P2P left out: Prompt-to-Prompt replaces a UNet's cross-attention: none on a " \
           "rectified flow (Stable Diffusion 3, FLUX.1)\n" in err
    record = json.loads((tmp_path / "c.json").read_text())
    assert [p["method"] for p in record["panels"]] == ["input", "reconstruction", "flow", "flowedit", "ledits",
                                                       "leditspp"]
    s = record["settings"]
    assert s["sampler"] == "flow" and (s["n_max"], s["n_min"], s["n_avg"]) == (4, 0, 1)  # n_max: the 6 - 2 edited
    rows = {p["method"]: p["unet_evaluations"] for p in record["panels"]}
    assert rows["flowedit"] == 4 * 4 and rows["reconstruction"] == 4  # 4 rows (both sides guided) x 4 steps
    sheet = pixels(tmp_path / "c.png")
    rc, _, err = run(capsys, "edit", photo, "-o", tmp_path / "fe.png", "--model", sd3, "--method", "flowedit",
                     "--source-prompt", "a cat", "--target-prompt", "a dog", "--steps", "6", "--size", "64",
                     "--n-max", "4", "--target-guidance", "15", "-q")
    assert rc == 0, err
    assert np.array_equal(panel(sheet, 3), pixels(tmp_path / "fe.png")), "FlowEdit's panel is the edit command's"
    rc, _, err = run(capsys, "edit", photo, "-o", tmp_path / "pp.png", "--model", sd3, "--method", "leditspp", "-e",
                     "glasses", "--steps", "6", "--size", "64", "--source-prompt", "a cat", "-q")
    assert rc == 0, err
    assert np.array_equal(panel(sheet, 5), pixels(tmp_path / "pp.png")), "LEDITS++' panel is the edit command's"


@pytest.mark.parametrize("argv, message", [
    (["--cross-replace", "0.5"], "--cross-replace: Prompt-to-Prompt replaces a UNet's cross-attention: none on a "
     "rectified flow (Stable Diffusion 3, FLUX.1): leave them out"),
    (["--n-max", "9"], "--n-max (the FlowEdit panel's, its steps the inversion's): n_max (the steps edited) must be "
     "in 1..steps (6), got 9")])
def test_compare_refusals_on_a_flow(sd3, inversion, tmp_path, capsys, argv, message):
    rc, _, err = run(capsys, "compare", inversion, "-o", tmp_path / "c.png", "--model", sd3, "--target-prompt",
                     "a dog", *argv, "--clip-model", "none", "-q")
    assert rc == 2 and err == f"minledits: error: {message}\n"
    assert list(tmp_path.iterdir()) == []


def test_compare_refuses_flowedit_options_on_sd1(tiny_sd1, photo, tmp_path, capsys):
    rc, _, err = run(capsys, "compare", photo, "-o", tmp_path / "c.png", "--model", tiny_sd1.folder, "--size", "64",
                     "--steps", "4", "--target-prompt", "a dog", "--n-avg", "2", "--clip-model", "none", "-q")
    assert rc == 2 and err == "minledits: error: --n-avg (the FlowEdit panel's): FlowEdit runs on a rectified flow " \
                              "(Stable Diffusion 3, FLUX.1), and this is a ddpm inversion: leave --n-avg out\n"


def test_sweep_over_skip_on_a_flow_inverts_once(sd3, photo, tmp_path, capsys):
    rc, _, err = run(capsys, "sweep", photo, "-o", tmp_path / "s.png", "--model", sd3, "--steps", "6", "--size", "64",
                     "--target-prompt", "a dog", "--vary", "skip=1,3", "--clip-model", "none")
    assert rc == 0, err
    assert "sweep of 2 cells, 0 done already: 1 inversion(s) and 2 edit(s)" in err
    cells = json.loads((tmp_path / "s.json").read_text())["cells"]
    assert [(c["settings"]["sampler"], c["settings"]["skip"]) for c in cells] == [("flow", 1), ("flow", 3)]
    rc, _, err = run(capsys, "edit", photo, "-o", tmp_path / "e.png", "--model", sd3, "--steps", "6", "--size", "64",
                     "--skip", "3", "--target-prompt", "a dog", "-q")
    assert rc == 0, err
    assert np.array_equal(pixels(tmp_path / "s" / "001.png"), pixels(tmp_path / "e.png")), "a sliced cell is its edit"
    rc, _, err = run(capsys, "sweep", photo, "-o", tmp_path / "d.png", "--model", sd3, "--sampler", "ddim", "--vary",
                     "skip=1,3", "--clip-model", "none", "-q")
    assert rc == 2 and "--sampler ddim is for Stable Diffusion 1.x, 2.x and XL" in err


def test_sweep_of_flowedit_over_n_max(sd3, photo, tmp_path, capsys):
    """FlowEdit's cells need no inversion: each is the edit command's picture."""
    sweep = ["sweep", photo, "-o", tmp_path / "s.png", "--model", sd3, *FLOW[:-6], "--n-min", "1", "--size", "64",
             "--vary", "n_max=2,4", "--clip-model", "none"]
    rc, _, err = run(capsys, *sweep)
    assert rc == 0, err
    assert "sweep of 2 cells, 0 done already: 0 inversion(s) and 2 edit(s)" in err
    cells = json.loads((tmp_path / "s.json").read_text())["cells"]
    assert [(c["settings"]["method"], c["settings"]["n_max"]) for c in cells] == [("flowedit", 2), ("flowedit", 4)]
    rc, _, err = run(capsys, "edit", photo, "-o", tmp_path / "e.png", "--model", sd3, *FLOW, "-q")
    assert rc == 0, err
    assert np.array_equal(pixels(tmp_path / "s" / "001.png"), pixels(tmp_path / "e.png"))
    rc, out, err = run(capsys, *sweep, "-q")  # a rerun keeps its cells
    assert rc == 0 and "sweep: 0 cells done, 2 kept, 0 failed" in out, err


def test_the_app_on_sd3(sd3, photo, tmp_path):
    """The app offers no FlowEdit (it edits without an inversion; refused in one line through the API) and, on SD3,
    no P2P and only the flow sampler; its edit is the command's."""
    sd = minledits.load(sd3)
    method = next(o["choices"] for f, _, _, o in EDIT if dest(f, o) == "method")
    sampler = next(o["choices"] for f, _, _, o in INVERT if dest(f, o) == "sampler")
    assert webapp.choices_for(sd, "method", method) == ["ledits", "leditspp"]
    assert webapp.choices_for(sd, "sampler", sampler) == ["flow"]
    args = argparse.Namespace(**{dest(f, o): None for f, _, _, o in COMMON}, cmd="app")
    args.model = str(sd3)
    app = webapp.App(args, tmp_path / "app")
    session = app.session("a")
    options = dict(method="leditspp", concepts="glasses", steps=6, size=64)
    result = app.edit(session, photo, options)
    assert result["inversion"].settings.sampler == "flow" and result["steps"] == 4
    assert len(result["frames"](1)) == 1 + 3  # the x0 prediction, then the concept's three maps
    assert cli.main(["edit", str(photo), "-o", str(tmp_path / "cli.png"), "--model", str(sd3), "-q",
                               "--method", "leditspp", "-e", "glasses", "--steps", "6", "--size", "64"]) == 0
    assert np.array_equal(pixels(result["png"]), pixels(tmp_path / "cli.png"))
    with pytest.raises(MinleditsError, match="^--method flowedit is not in the app: it edits the photo itself"):
        app.edit(session, photo, dict(method="flowedit", source_prompt="a cat", target_prompt="a dog"))
    pytest.importorskip("gradio")
    radios = {b.elem_id: (b.choices, b.value) for b in webapp.page(app).blocks.values()
              if getattr(b, "elem_id", None) in ("method", "sampler")}
    assert radios == {"method": ([("ledits", "ledits"), ("leditspp", "leditspp")], "ledits"),
                      "sampler": ([("flow", "flow")], "flow")}


def test_the_app_on_sd1_offers_no_flow(tiny_sd1):
    sd = minledits.load(tiny_sd1.folder)
    method = next(o["choices"] for f, _, _, o in EDIT if dest(f, o) == "method")
    sampler = next(o["choices"] for f, _, _, o in INVERT if dest(f, o) == "sampler")
    assert webapp.choices_for(sd, "method", method) == ["ledits", "leditspp", "p2p"]
    assert "flow" not in webapp.choices_for(sd, "sampler", sampler)


def test_sd3_options_on_an_sd1_folder_are_refused_before_loading(tiny_sd1, photo, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli_commands, "load", lambda *a, **k: pytest.fail("the model was read"))
    rc, _, err = run(capsys, "edit", photo, "-o", tmp_path / "a.png", "--model", tiny_sd1.folder, "--offload-text",
                     "-q")
    assert rc == 1 and err.startswith("minledits: error: --offload-text is an option of Stable Diffusion 3 and FLUX; ")
    assert err.endswith(" is not one (a folder of another pipeline): leave it out\n") and err.count("\n") == 1


def test_latent_rgb_of_sd3s_encoding_is_close_to_the_photo(sd3, photo):
    """On the tiny SD3's VAE (random) the fit still beats the photo's mean colour (a fit, not a constant)."""
    sd, x = minledits.load(sd3), to_tensor(photo, 64)
    w0 = sd.encode(x)
    target = (F.interpolate(x, size=w0.shape[-2:], mode="area") / 2 + 0.5).clamp(0, 1)
    err = (latent_rgb(w0, x)(w0) - target).square().mean()
    assert err < (target - target.mean((-2, -1), keepdim=True)).square().mean()

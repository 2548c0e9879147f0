"""RF-Inversion (minledits/rfinversion.py) against the community pipeline's semantics (tests/oracle_rfinversion.py) on
the tiny FLUX.1 of tests/flux_hub.py, the same weights loaded by minledits and by diffusers' FluxPipeline: equal
inverted paths and edited latents (several gamma / eta / start / stop, two sizes, dev and schnell); the draws, the two
clocks, the eta window and the callback's tensors; the inversion file; which methods take an RF inversion; one-line
errors. With MINLEDITS_RF_REFERENCE naming the community file (pipeline_flux_rf_inversion.py, fetched by hand: never
committed) the oracle is checked against it as well.
"""
import importlib.util
import os

import pytest
import torch

import minledits
from minledits import ledits, rfinversion
from minledits.errors import InversionError
from minledits.flowmatch import FlowEuler, image_tokens
from minledits.io import store
from minledits.io.image import to_tensor
from minledits.nets.flux import unpack
from tests import flux_hub, oracle_rfinversion
from tests.helpers import photo
from tests.test_flow_inversion import FakeFlow

pytestmark = pytest.mark.usefixtures("one_thread")
PICTURE = photo(size=(160, 80))
SIZES = {"square": dict(size=64), "wide": dict(size=128, keep_aspect=True)}  # latents 8 x 8 and 8 x 16


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    return {kind: flux_hub.make(tmp_path_factory.mktemp(kind) / "m", kind=kind) for kind in flux_hub.KINDS}


@pytest.fixture(scope="module")
def models(refs):
    return {kind: minledits.load(r.folder) for kind, r in refs.items()}


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def oracle(pipe, inv, *, gamma, prompt, steps, seed, source_prompt="", **edit_options):
    """The community pipeline's inverted path [N + 1] (noisiest first) and edited latents, unpacked, for the
    picture our inversion preprocessed."""
    H, W = inv.image.shape[-2:]
    h, w = inv.xts.shape[-2:]
    _, y_0, ids, path = oracle_rfinversion.invert(pipe, inv.image, source_prompt=source_prompt,
                                                  num_inversion_steps=steps, gamma=gamma, seed=seed)
    out = oracle_rfinversion.edit(pipe, path[-1], y_0, ids, height=H, width=W, prompt=prompt,
                                  num_inference_steps=steps, **edit_options)
    return torch.cat([unpack(y, h, w) for y in path[::-1]]), unpack(out, h, w)


CASES = {  # (kind, size, invert options, edit options)
    "defaults": ("dev", "square", dict(steps=4), {}),
    "wide, a window inside": ("dev", "wide", dict(steps=6, gamma=0.3, seed=3, source_prompt="a photo"),
                              dict(eta=0.9, start_timestep=0.2, stop_timestep=0.7)),
    "gamma 1, eta everywhere": ("dev", "square", dict(steps=5, gamma=1.0, seed=1),
                                dict(eta=1.0, stop_timestep=1.5, guidance=2.0)),
    "gamma 0, eta 0": ("dev", "wide", dict(steps=3, gamma=0.0), dict(eta=0.0)),
    "schnell": ("schnell", "wide", dict(steps=4, gamma=0.7, seed=2), dict(eta=0.5, stop_timestep=0.5)),
}


@pytest.mark.parametrize("case", CASES)
def test_equals_the_community_pipeline(refs, models, case):
    kind, size, inv_options, edit_options = CASES[case]
    inv_options = {"gamma": rfinversion.GAMMA, "seed": 0, **inv_options}
    inv = rfinversion.invert(models[kind], PICTURE, **SIZES[size], **inv_options)
    ours = rfinversion.edit(models[kind], inv, prompt="a cat", **edit_options)
    names = {"guidance": "guidance_scale"}
    path, theirs = oracle(refs[kind].pipe, inv, prompt="a cat", **inv_options,
                          **{names.get(k, k): v for k, v in edit_options.items()})
    assert torch.equal(inv.xts[-1], path[-1])  # y_0: the same VAE sample, bit for bit
    assert rel(inv.xts, path) <= 1e-5 and rel(ours, theirs) <= 1e-5, (rel(inv.xts, path), rel(ours, theirs))
    assert inv.rf and inv.settings.gamma == inv_options["gamma"] and inv.xts.shape[0] == inv_options["steps"] + 1


def test_the_draws_are_the_global_generators(models):
    """eps_E then y_1 (drawn packed): the numbers torch.manual_seed(seed) gives the reference's two draws."""
    C, h, w = 16, 8, 16
    eps_E, y_1 = rfinversion.draws(7, C, h, w)
    torch.manual_seed(7)
    theirs = torch.randn(1, C, h, w), torch.randn(1, image_tokens(h, w), 4 * C)
    assert torch.equal(eps_E, theirs[0]) and torch.equal(y_1, unpack(theirs[1], h, w))
    flux = models["dev"]
    a, b = (rfinversion.invert(flux, PICTURE, size=64, steps=2, seed=s) for s in (0, 0))
    assert torch.equal(a.xts, b.xts) and not torch.equal(a.xts, rfinversion.invert(flux, PICTURE, size=64, steps=2,
                                                                                    seed=1).xts)


def test_the_steps_and_their_tensors(models):
    """Forward: the transformer at T i / (N + 1), steps sigma_i - sigma_{i+1}; reverse: at t_k with eta on the window
    [floor(start N), min(floor(stop N), N)); at eta 0 the reverse ODE is the flow sampler's Euler step; every
    tensor reaches the callback, each step starting where the last ended."""
    flux, N = models["dev"], 5
    steps = []
    inv = rfinversion.invert(flux, PICTURE, size=64, steps=N, gamma=0.4, callback=steps.append)
    flow = FlowEuler(flux.schedule, N, image_tokens(8, 8))
    assert [s.ode for s in steps] == ["forward"] * N and [s.i for s in steps] == list(range(N))
    assert [float(s.t) for s in steps] == pytest.approx([1000 * i / (N + 1) for i in range(N)], rel=1e-6)
    assert all(s.strength == 0.4 for s in steps) and torch.equal(steps[-1].x_next, inv.xts[:1])
    for s, k in zip(steps, range(N)):
        assert torch.equal(s.x, inv.xts[N - k:N - k + 1]) and torch.equal(s.x_next, inv.xts[N - k - 1:N - k])
        assert torch.equal(s.v_hat, s.v + 0.4 * (s.v_cond - s.v))
        assert torch.allclose(s.x_next, s.x + s.v_hat * (flow.sigmas[k] - flow.sigmas[k + 1]), rtol=0, atol=1e-6)
    assert inv.timesteps == flow.timesteps.tolist()
    steps.clear()
    out = rfinversion.edit(flux, inv, prompt="a dog", eta=0.8, start_timestep=0.2, stop_timestep=0.7,
                           callback=steps.append)
    assert [s.strength for s in steps] == [0.0, 0.8, 0.8, 0.0, 0.0]  # floor(0.2 * 5) = 1 .. floor(0.7 * 5) = 3
    assert torch.equal(torch.stack([s.t for s in steps]), flow.timesteps) and torch.equal(steps[-1].x_next, out)
    assert all(torch.equal(a.x_next, b.x) for a, b in zip(steps, steps[1:])) and torch.equal(steps[0].x, inv.xts[:1])
    plain, c = inv.xts[:1], flux.text_embeddings(["a dog"])
    for k in range(N):
        plain = flow.step(k, plain, flux.predict(plain, flow.timesteps[k], c))
    assert torch.equal(rfinversion.edit(flux, inv, prompt="a dog", eta=0.0), plain)


def test_the_file_and_the_methods_that_take_it(models, tmp_path):
    """An RF inversion's file keeps gamma and every tensor; its edit equals the object's bit for bit; other methods
    refuse it in one line, and RF-Inversion's edit a plain flow inversion."""
    flux = models["dev"]
    inv = rfinversion.invert(flux, PICTURE, size=64, steps=3, gamma=0.25, seed=5, source_prompt="a photo")
    store.save(inv, tmp_path / "rf.inv")
    back = store.load(tmp_path / "rf.inv")
    assert back.settings == inv.settings and back.rf and torch.equal(back.xts, inv.xts)
    assert back.timesteps == inv.timesteps and back.settings.source_guidance == rfinversion.SOURCE_GUIDANCE
    ours = rfinversion.edit(flux, inv, prompt="a cat")
    assert torch.equal(rfinversion.edit(flux, tmp_path / "rf.inv", prompt="a cat"), ours)
    with pytest.raises(InversionError, match=r"^the inversion is an RF-Inversion \(gamma 0.25\): only RF-Inversion's "
                                             r"edit .* invert again with the flow sampler$"):
        ledits.edit(flux, back)
    plain = minledits.invert(flux, PICTURE, sampler="flow", steps=3, skip=0, size=64)
    assert not plain.rf
    with pytest.raises(InversionError, match=r"^the inversion is no RF-Inversion \(its sampler: flow\): "
                                             r"RF-Inversion's edit needs one from rfinversion.invert"):
        rfinversion.edit(flux, plain, prompt="a cat")
    with pytest.raises(ValueError, match=r"^gamma is RF-Inversion's: invert with rfinversion.invert for it$"):
        minledits.invert(flux, PICTURE, sampler="flow", steps=3, skip=0, size=64, gamma=0.5)


@pytest.mark.parametrize("call, message", [
    (lambda f: rfinversion.invert(f, PICTURE, gamma=1.5), r"^gamma must be a finite number from 0 to 1, got 1.5$"),
    (lambda f: rfinversion.invert(f, PICTURE, steps=0), r"^steps must be an integer >= 1, got 0$"),
    (lambda f: rfinversion.invert(f, PICTURE, size=72), r"^size must be a multiple of 64"),
    (lambda f: rfinversion.invert(f, PICTURE, source_prompt=3), r"^the source prompt must be text, got 3$"),
    (lambda f: rfinversion.edit(f, None, prompt="a", eta=1.2), r"^eta must be a finite number from 0 to 1, got 1.2$"),
    (lambda f: rfinversion.edit(f, None, prompt="a", start_timestep=-0.1), r"^start_timestep must be a finite number "
                                                                           r">= 0, got -0.1$"),
    (lambda f: rfinversion.edit(f, None, prompt="a", start_timestep=0.5, stop_timestep=0.2),
     r"^stop_timestep must be a finite number >= 0.5, got 0.2$"),
    (lambda f: rfinversion.edit(f, None, prompt=None), r"^the prompt must be text, got None$"),
    (lambda f: rfinversion.edit(f, None, prompt="a", guidance=float("nan")), r"^guidance must be a finite number"),
    (lambda f: rfinversion.invert(FakeFlow(), PICTURE), r"^RF-Inversion runs on FLUX.1 .* is not FLUX.1: use "
                                                        r"flowedit, ledits or leditspp$"),
])
def test_bad_options_get_one_line(models, call, message):
    with pytest.raises(ValueError, match=message) as e:
        call(models["dev"])
    assert "\n" not in str(e.value)


def test_schnell_takes_no_guidance(models):
    inv = rfinversion.invert(models["schnell"], PICTURE, size=64, steps=2)
    with pytest.raises(ValueError, match=r"^this FLUX.1 model has no guidance embedding \(schnell\): pass no "
                                         r"guidance$"):
        rfinversion.edit(models["schnell"], inv, prompt="a cat", guidance=3.5)


@pytest.mark.skipif(not os.environ.get("MINLEDITS_RF_REFERENCE"), reason="MINLEDITS_RF_REFERENCE names no "
                    "community pipeline_flux_rf_inversion.py")
def test_the_oracle_equals_the_community_file(refs):
    """The oracle against the community file itself (bit for bit on the CPU): its invert after torch.manual_seed,
    then its __call__ with the inverted latents, output_type "latent"."""
    spec = importlib.util.spec_from_file_location("rf_reference", os.environ["MINLEDITS_RF_REFERENCE"])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for kind, ref in refs.items():
        parts = {k: v for k, v in ref.pipe.components.items() if k not in ("image_encoder", "feature_extractor")}
        real = module.RFInversionFluxPipeline(**parts)  # FluxPipeline's IP-Adapter parts: its __init__ has none
        real.set_progress_bar_config(disable=True)
        x = to_tensor(PICTURE, 128, True)
        H, W = x.shape[-2:]
        torch.manual_seed(4)
        Y, y_0, ids = real.invert(image=x, num_inversion_steps=4, gamma=0.6, height=H, width=W)
        out = real(prompt="a cat", inverted_latents=Y, image_latents=y_0, latent_image_ids=ids, height=H, width=W,
                   eta=0.9, stop_timestep=0.5, num_inference_steps=4, output_type="latent").images
        oY, oy_0, oids, _ = oracle_rfinversion.invert(ref.pipe, x, num_inversion_steps=4, gamma=0.6, seed=4)
        theirs = oracle_rfinversion.edit(ref.pipe, oY, oy_0, oids, height=H, width=W, prompt="a cat", eta=0.9,
                                         stop_timestep=0.5, num_inference_steps=4)
        assert torch.equal(oy_0, y_0) and torch.equal(oY, Y) and torch.equal(oids, ids) and torch.equal(theirs, out)

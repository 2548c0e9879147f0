"""FlowEdit on FLUX.1-dev (minledits/flowedit.py) against the authors' FlowEditFLUX (tests/oracle_flowedit.py,
flowedit_flux: their semantics, patched for diffusers 0.42.1's vae_scale_factor) on the tiny FLUX of tests/flux_hub.py:
equal final latents with the same noise draws across n_min (the SDEdit-style tail), n_avg, guidance values and a
non-square picture; no classifier-free guidance (one row per side, the guidance embedding per row); the draws in the
packed token layout; FLUX_DEFAULTS the authors'; schnell and a negative prompt refused in one line.

`Pipe` makes diffusers' FluxPipeline look like minledits' Flux (text_embeddings, predict with per-row guidance,
encode, schedule, guidance_embeds), so that flowedit.edit runs on the reference's own networks: that isolates the
method from the networks. Then minledits end to end: our networks (minledits.load of the same folder) against the
oracle on diffusers' pipeline.
"""
import inspect

import pytest
import torch

import minledits
from minledits import flowedit
from minledits.flowmatch import FlowEuler, image_tokens
from minledits.io.image import to_tensor
from minledits.nets.flux import unpack
from tests import flux_hub, oracle_flowedit, test_flowedit
from tests.helpers import photo
from tests.test_flowedit import relative

pytestmark = pytest.mark.usefixtures("one_thread")
SIZE, STEPS = 32, 7
PROMPTS = dict(source_prompt="a photo of a cat", target_prompt="a photo of a dog")
GUIDANCE = {k: flowedit.FLUX_DEFAULTS[k] for k in ("source_guidance", "target_guidance")}  # edit's own: SD3's


class Pipe(test_flowedit.Pipe):
    """diffusers' FluxPipeline with the model interface flowedit.edit calls (SD3's adapter for the rest)."""

    def __init__(self, pipe):
        super().__init__(pipe)
        self.guidance_embeds = pipe.transformer.config.guidance_embeds

    def text_embeddings(self, prompts):
        c, pooled, _ = self.pipe.encode_prompt(prompt=prompts, prompt_2=None, device=self.device)
        return c, pooled

    def predict(self, x, t, c, guidance=None):
        B, C, h, w = x.shape
        tokens = self.pipe._pack_latents(x, B, C, h, w)
        img_ids = self.pipe._prepare_latent_image_ids(B, h // 2, w // 2, self.device, x.dtype)
        v = self.pipe.transformer(hidden_states=tokens, timestep=torch.as_tensor(t).expand(B) / 1000,
                                  guidance=guidance, encoder_hidden_states=c[0], pooled_projections=c[1],
                                  txt_ids=torch.zeros(c[0].shape[1], 3), img_ids=img_ids, return_dict=False)[0]
        return self.pipe._unpack_latents(v, h * self.pipe.vae_scale_factor, w * self.pipe.vae_scale_factor,
                                         self.pipe.vae_scale_factor)


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    return flux_hub.make(tmp_path_factory.mktemp("flux"))


@pytest.fixture(scope="module")
def pipe(ref):
    return Pipe(ref.pipe)


@pytest.fixture(scope="module")
def flux(ref):
    return minledits.load(ref.folder)


def oracle(ref, options: dict, image, keep_aspect=False):
    x_src = oracle_flowedit.encode_image(ref.pipe, to_tensor(image, SIZE, keep_aspect))
    names = dict(steps="T_steps", source_guidance="src_guidance_scale", target_guidance="tar_guidance_scale",
                 source_prompt="src_prompt", target_prompt="tar_prompt")
    return oracle_flowedit.flowedit_flux(ref.pipe, x_src, **{names.get(k, k): v for k, v in options.items()})


CASES = {"defaults": dict(n_max=6),
         "tail": dict(n_max=6, n_min=2),
         "n_avg 2": dict(n_max=5, n_avg=2),
         "n_avg 2 and a tail": dict(n_max=STEPS, n_min=3, n_avg=2, seed=3),
         "guidance below 1": dict(n_max=6, n_min=1, source_guidance=0.5, target_guidance=1.0),
         "tail only": dict(n_max=4, n_min=4)}


@pytest.mark.parametrize("case", CASES)
def test_equals_the_authors_algorithm(ref, pipe, case):
    options = {**PROMPTS, **GUIDANCE, "steps": STEPS, **CASES[case]}
    ours = flowedit.edit(pipe, photo(), size=SIZE, **options)
    theirs = oracle(ref, options, photo())
    assert ours.shape == theirs.shape == (1, 16, SIZE // 8, SIZE // 8)
    assert relative(ours, theirs) <= 1e-5


@pytest.mark.parametrize("case", ["defaults", "tail", "n_avg 2 and a tail", "guidance below 1"])
def test_ours_end_to_end_equals_the_authors_algorithm(ref, flux, case):
    """minledits' networks and FlowEdit against the oracle on diffusers' pipeline: the same final latents."""
    options = {**PROMPTS, **GUIDANCE, "steps": STEPS, **CASES[case]}
    assert relative(flowedit.edit(flux, photo(), size=SIZE, **options), oracle(ref, options, photo())) <= 1e-5


def test_non_square_equals_the_authors_algorithm(ref, pipe):
    """128 x 64 px: an 8 x 16 latent, 32 tokens (the dynamic shift's count and the packed draws the picture's)."""
    image, options = photo(size=(128, 64)), dict(PROMPTS, **GUIDANCE, steps=STEPS, n_max=6, n_min=1)
    ours = flowedit.edit(pipe, image, size=128, keep_aspect=True, **options)
    x_src = oracle_flowedit.encode_image(ref.pipe, to_tensor(image, 128, True))
    theirs = oracle_flowedit.flowedit_flux(ref.pipe, x_src, PROMPTS["source_prompt"], PROMPTS["target_prompt"],
                                           T_steps=STEPS, n_max=6, n_min=1)
    assert ours.shape == theirs.shape == (1, 16, 8, 16)
    assert relative(ours, theirs) <= 1e-5


def test_flux_defaults_are_the_authors():
    """FLUX_DEFAULTS: FlowEditFLUX's defaults and FLUX_exp.yaml's values (T_steps 28, n_avg 1, 1.5, 5.5, n_min 0,
    n_max 24), as the oracle takes them."""
    names = dict(T_steps="steps", src_guidance_scale="source_guidance", tar_guidance_scale="target_guidance")
    theirs = {names.get(k, k): p.default for k, p in inspect.signature(oracle_flowedit.flowedit_flux).parameters.items()
              if p.default is not inspect.Parameter.empty and k != "seed"}
    assert flowedit.FLUX_DEFAULTS == theirs == dict(steps=28, n_max=24, n_min=0, n_avg=1, source_guidance=1.5,
                                                    target_guidance=5.5)


def test_one_row_per_side_with_its_guidance_and_packed_draws(pipe):
    """Each FlowEdit step one call per draw on the rows [source, target] with the guidance embedding's values
    [s_src, s_tar]; each tail step one row at [s_tar]; the draws unpack(randn [1, (h/2)(w/2), 64]) in order, which are
    torch.manual_seed + randn_like of the packed latent (the reference's), whatever the latent's memory layout."""
    calls, steps = [], []
    predict = pipe.predict
    pipe.predict = lambda x, t, c, guidance=None: calls.append((len(x), len(c[0]), guidance.tolist())) or \
        predict(x, t, c, guidance)
    try:
        out = flowedit.edit(pipe, photo(), size=SIZE, steps=STEPS, n_max=6, n_min=2, n_avg=2, seed=7,
                            source_guidance=2.0, target_guidance=4.5, callback=steps.append, **PROMPTS)
    finally:
        pipe.predict = predict
    assert calls == [(2, 2, [2.0, 4.5])] * 8 + [(1, 1, [4.5])] * 2
    assert [s.k for s in steps] == list(range(1, 7)) and [s.tail for s in steps] == [False] * 4 + [True] * 2
    x_src = pipe.encode(to_tensor(photo(), SIZE))
    _, C, h, w = x_src.shape
    flow = FlowEuler(pipe.schedule, STEPS, tokens=image_tokens(h, w))
    g = torch.Generator().manual_seed(7)
    packed = lambda n: unpack(torch.randn(n, image_tokens(h, w), 4 * C, generator=g), h, w)  # noqa: E731
    for s in steps[:4]:
        assert torch.equal(s.noise, packed(2)) and not torch.equal(s.noise[:1], torch.randn(x_src.shape))
        assert torch.equal(s.zt_src, flow.scale_noise(s.k, x_src, s.noise))
        assert torch.equal(s.x_next, s.x + (flow.sigmas[s.k + 1] - flow.sigmas[s.k]) * s.v_delta)
        assert torch.equal(s.t, flow.timesteps[s.k])
    assert torch.equal(steps[4].noise, packed(1)) and torch.equal(out, steps[5].x_next)
    for layout in (torch.contiguous_format, torch.channels_last):
        torch.manual_seed(7)
        theirs = torch.randn_like(pipe.pipe._pack_latents(x_src.to(memory_format=layout), 1, C, h, w))
        assert torch.equal(unpack(theirs, h, w), steps[0].noise[:1])


def test_seed_decides_the_draws(pipe):
    a, b, c = (flowedit.edit(pipe, photo(), size=SIZE, steps=4, n_max=3, seed=s, **PROMPTS) for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_a_negative_prompt_is_refused_in_one_line(flux):
    with pytest.raises(ValueError, match=r"^FlowEdit on FLUX takes no negative prompt \(no classifier-free "
                                         r"guidance\)$"):
        flowedit.edit(flux, photo(), size=SIZE, steps=4, n_max=2, negative_prompt="blurry", **PROMPTS)


def test_schnell_is_refused_in_one_line(tmp_path):
    schnell = minledits.load(flux_hub.make(tmp_path / "schnell", kind="schnell").folder)
    with pytest.raises(ValueError, match=r"^FlowEdit on FLUX steers by the guidance embedding, which this model "
                                         r"\(FLUX.1-schnell\) lacks: use FLUX.1-dev, or ledits or leditspp$"):
        flowedit.edit(schnell, photo(), size=SIZE, steps=4, n_max=2, **PROMPTS)

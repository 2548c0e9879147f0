"""FlowEdit (minledits/flowedit.py) against the authors' algorithm (tests/oracle_flowedit.py) on the tiny SD3 model of
tests/sd3_hub.py: equal final latents with the same noise draws, across n_min (the SDEdit-style tail), n_avg and
guidance <= 1; the draw order; the callback's tensors; one-line errors.

`Pipe` makes diffusers' StableDiffusion3Pipeline look like minledits' model (text_embeddings, predict, encode,
schedule), so that flowedit.edit can run on the reference's own networks: that isolates the method from the networks
(bit for bit but for the tail, whose batch holds the target's rows alone). Then minledits end to end: our networks
(minledits.load of the same folder) against the oracle on diffusers' pipeline.
"""
import pytest
import torch

import minledits
from minledits import flowedit
from minledits.flowmatch import FlowEuler, flow_config
from minledits.io.image import to_tensor
from tests import oracle_flowedit, sd3_hub
from tests.helpers import photo

pytestmark = pytest.mark.usefixtures("one_thread")
SIZE, STEPS = 64, 8
PROMPTS = dict(source_prompt="a photo of a cat", target_prompt="a photo of a dog")


class Pipe:
    """diffusers' StableDiffusion3Pipeline with the model interface flowedit.edit calls."""
    default_size, prediction_type = 1024, "flow"

    def __init__(self, pipe):
        self.pipe, self.device, self.dtype = pipe, torch.device("cpu"), torch.float32
        self.schedule = flow_config(dict(pipe.scheduler.config))

    def text_embeddings(self, prompts):
        c, _, pooled, _ = self.pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None,
                                                  do_classifier_free_guidance=False, device=self.device)
        return c, pooled

    def predict(self, x, t, c):
        return self.pipe.transformer(hidden_states=x, timestep=torch.as_tensor(t).expand(len(x)),
                                     encoder_hidden_states=c[0], pooled_projections=c[1], return_dict=False)[0]

    def encode(self, x):
        return oracle_flowedit.encode_image(self.pipe, x)

    def check_fits(self, height, width):
        pass


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    return sd3_hub.make(tmp_path_factory.mktemp("sd3"))


@pytest.fixture(scope="module")
def pipe(ref):
    return Pipe(ref.pipe)


@pytest.fixture(scope="module")
def sd3(ref):
    return minledits.load(ref.folder)


def relative(a, b):
    return ((a - b).norm() / b.norm()).item()


def oracle(ref, options: dict):
    x_src = oracle_flowedit.encode_image(ref.pipe, to_tensor(photo(), SIZE))
    names = dict(steps="T_steps", source_guidance="src_guidance_scale", target_guidance="tar_guidance_scale",
                 source_prompt="src_prompt", target_prompt="tar_prompt")
    return oracle_flowedit.flowedit_sd3(ref.pipe, x_src, **{names.get(k, k): v for k, v in options.items()})


CASES = {"defaults": dict(n_max=6),
         "tail": dict(n_max=6, n_min=2),
         "n_avg 2": dict(n_max=5, n_avg=2),
         "n_avg 2 and a tail": dict(n_max=STEPS, n_min=3, n_avg=2, seed=3),
         "no guidance": dict(n_max=6, n_min=2, source_guidance=1.0, target_guidance=1.0),
         "target guidance only": dict(n_max=6, n_min=1, source_guidance=0.5, negative_prompt="blurry"),
         "tail only": dict(n_max=4, n_min=4)}


@pytest.mark.parametrize("case", CASES)
def test_equals_the_authors_algorithm(ref, pipe, case):
    options = dict(PROMPTS, steps=STEPS, **CASES[case])
    ours = flowedit.edit(pipe, photo(), size=SIZE, **options)
    theirs = oracle(ref, options)
    assert ours.shape == theirs.shape == (1, 16, SIZE // 8, SIZE // 8)
    assert relative(ours, theirs) <= 1e-5


@pytest.mark.parametrize("case", ["defaults", "tail", "n_avg 2 and a tail", "no guidance", "target guidance only"])
def test_ours_end_to_end_equals_the_authors_algorithm(ref, sd3, case):
    """minledits' networks and FlowEdit against the oracle on diffusers' pipeline: the same final latents."""
    options = dict(PROMPTS, steps=STEPS, **CASES[case])
    ours = flowedit.edit(sd3, photo(), size=SIZE, **options)
    assert relative(ours, oracle(ref, options)) <= 1e-5


def test_noise_is_the_references_draws_on_a_contiguous_latent():
    """torch.manual_seed + randn_like draws, in the edit's order: equal on a contiguous latent, other numbers on the
    channels-last one diffusers' preprocessing gives the reference."""
    x = torch.zeros(1, 16, 8, 6)
    g = torch.Generator().manual_seed(5)
    ours = [torch.randn(x.shape, generator=g, dtype=torch.float32) for _ in range(3)]
    torch.manual_seed(5)
    assert all(torch.equal(a, torch.randn_like(x)) for a in ours)
    torch.manual_seed(5)
    assert not torch.equal(ours[0], torch.randn_like(x.to(memory_format=torch.channels_last)))


def test_every_step_and_its_tensors(pipe):
    """One transformer call per step and draw with the rows [src_uncond, src_cond, tar_uncond, tar_cond] (the target's
    rows alone in the tail); the callback's tensors obey the notation's formulas; the draws come in order."""
    calls, steps = [], []
    predict = pipe.predict
    pipe.predict = lambda x, t, c: calls.append(len(x)) or predict(x, t, c)
    try:
        out = flowedit.edit(pipe, photo(), size=SIZE, steps=STEPS, n_max=6, n_min=2, n_avg=2, seed=7,
                            callback=steps.append, **PROMPTS)
    finally:
        pipe.predict = predict
    assert calls == [4] * 8 + [2] * 2 and [s.k for s in steps] == list(range(2, 8)) and [s.i for s in steps] == \
        list(range(6)) and [s.tail for s in steps] == [False] * 4 + [True] * 2
    flow, x_src = FlowEuler(pipe.schedule, STEPS), pipe.encode(to_tensor(photo(), SIZE))
    g = torch.Generator().manual_seed(7)
    for s in steps[:4]:
        assert torch.equal(s.noise, torch.randn((2, *x_src.shape[1:]), generator=g))
        assert torch.equal(s.zt_src, flow.scale_noise(s.k, x_src, s.noise))
        assert torch.equal(s.zt_tar, s.x + s.zt_src - x_src)
        assert torch.allclose(s.v_delta, (s.v_tar - s.v_src).mean(0, keepdim=True), atol=1e-6)
        assert torch.equal(s.x_next, s.x + (flow.sigmas[s.k + 1] - flow.sigmas[s.k]) * s.v_delta)
        assert torch.equal(s.t, flow.timesteps[s.k])
    first, last = steps[4], steps[5]
    assert torch.equal(first.noise, torch.randn(x_src.shape, generator=g))
    assert torch.equal(first.x, steps[3].x_next + flow.scale_noise(first.k, x_src, first.noise) - x_src)
    assert last.noise is None and last.zt_src is None and torch.equal(last.x, first.x_next)
    assert torch.equal(out, last.x_next) and flow.sigmas[last.k + 1] == 0


def test_one_row_per_side_without_guidance(pipe):
    calls = []
    predict = pipe.predict
    pipe.predict = lambda x, t, c: calls.append(len(x)) or predict(x, t, c)
    try:
        flowedit.edit(pipe, photo(), size=SIZE, steps=4, n_max=3, n_min=1, source_guidance=1, target_guidance=1,
                      **PROMPTS)
        flowedit.edit(pipe, photo(), size=SIZE, steps=4, n_max=2, source_guidance=2, target_guidance=1, **PROMPTS)
    finally:
        pipe.predict = predict
    assert calls == [2, 2, 1] + [3, 3]


def test_seed_decides_the_draws(pipe):
    a, b, c = (flowedit.edit(pipe, photo(), size=SIZE, steps=4, n_max=3, seed=s, **PROMPTS) for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("options, message", [
    (dict(n_max=0), "n_max (the steps edited) must be in 1..steps (8), got 0"),
    (dict(n_max=9), "n_max (the steps edited) must be in 1..steps (8), got 9"),
    (dict(n_min=5, n_max=4), "n_min (the plain sampling steps at the end) must be in 0..n_max (4), got 5"),
    (dict(n_min=-1), "n_min (the plain sampling steps at the end) must be in 0..n_max (8), got -1"),
    (dict(n_avg=0), "n_avg (noise draws per step) must be >= 1, got 0"),
    (dict(n_avg=1.5), "n_avg must be an integer, got 1.5"),
    (dict(steps=0, n_max=0), "steps must be >= 1, got 0"),
    (dict(steps=True), "steps must be an integer, got True"),
    (dict(target_guidance=float("nan")), "target guidance must be a finite number, got nan"),
    (dict(source_guidance="3"), "source guidance must be a finite number, got '3'"),
    (dict(seed=2**64), "seed must be an integer from -2**63 to 2**64 - 1, got 18446744073709551616"),
    (dict(target_prompt=None), "target prompt must be text, got None"),
    (dict(steps=1001, n_max=5), "the number of flow steps must be an integer in 1..1000, got 1001")])
def test_bad_options_are_one_line(pipe, options, message):
    options = {**PROMPTS, "steps": STEPS, "n_max": STEPS, **options}
    with pytest.raises(ValueError) as e:
        flowedit.edit(pipe, photo(), size=SIZE, **options)
    assert str(e.value) == message


def test_a_model_that_is_no_flow_is_refused_in_one_line():
    sd = minledits.load("random-tiny")
    with pytest.raises(ValueError, match=r"^FlowEdit runs on a rectified flow \(SD3\); this model predicts epsilon: "
                                         r"use ledits, leditspp or p2p$"):
        flowedit.edit(sd, photo(), source_prompt="a cat", target_prompt="a dog", steps=4, n_max=2, size=64)

"""LEDITS++ on a flow inversion (SD3): no reference exists, so these are its properties. No concepts is the plain
regeneration; a concept's guidance acts only where its mask is on; a concept without tokens has an empty attention
mask; the masks are a recomputation from the joint attention's recorded probabilities (every block and head, the
concept's CLIP columns 1..n_c, smoothed, thresholded); "intersect" has no timestep rule; every EditStep field is
filled. Each runs on a fake flow model (tests/test_flow_inversion.py) and on the tiny random SD3."""
import pytest
import torch
import torch.nn.functional as F

import minledits
from minledits import ledits, leditspp
from minledits.sega import Concept, quantile
from tests import sd3_hub
from tests.test_flow_inversion import FakeFlow, invert, sd3  # noqa: F401 (a fixture)

CONCEPTS = [Concept("red hat", scale=4.0, threshold=0.7, warmup=0),
            Concept("glasses", scale=3.0, threshold=0.5, reverse=True, warmup=1)]


@pytest.fixture(scope="module")
def fake():
    return FakeFlow()


@pytest.fixture(scope="module", params=["fake", "sd3"])
def flow(request):
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def inv(flow):
    return invert(flow, steps=6, skip=2, source_prompt="a cat")


def run(sd, inv, **kw):
    steps = []
    w = leditspp.edit(sd, inv, callback=steps.append, **kw)
    return w, steps


def test_no_concepts_is_the_plain_regeneration(flow, inv):
    w, steps = run(flow, inv)
    assert torch.equal(w, ledits.edit(flow, inv, target_guidance=1.0))
    assert len(steps) == 4 and all(not s.M.numel() and torch.equal(s.eps, s.eps_u) for s in steps)


@pytest.mark.parametrize("mask", leditspp.MASK_MODES)
def test_each_concept_acts_only_where_its_mask_is_on(flow, inv, mask):
    w, steps = run(flow, inv, concepts=CONCEPTS, mask=mask)
    assert not torch.equal(w, ledits.edit(flow, inv, target_guidance=1.0))
    for s in steps:
        assert torch.equal(s.eps, s.eps_u + (s.M * s.g).sum(0))
        for c in range(len(CONCEPTS)):
            if not s.on[c]:
                assert not s.M[c].any()
            expected = {"noise": s.m_noise, "cross_attention": s.m_attn}.get(mask)
            if expected is None:  # intersect: both, at every step (no timestep rule on a flow)
                expected = s.m_noise * s.m_attn
            assert torch.equal(s.M[c], expected[c] * s.on[c])
    # one concept alone: where its mask is off the step's velocity is v_u exactly
    _, alone = run(flow, inv, concepts=CONCEPTS[:1], mask=mask)
    for s in alone:
        off = s.M[0] == 0
        assert off.any() and torch.equal(s.eps[off], s.eps_u[off]) and (s.eps[~off] != s.eps_u[~off]).any()


def test_a_concept_without_tokens_gets_an_empty_attention_mask(flow, inv):
    concepts = [Concept("", scale=4.0, threshold=0.5, warmup=0), Concept("red hat", scale=4.0, threshold=0.5, warmup=0)]
    _, steps = run(flow, inv, concepts=concepts, mask="cross_attention")
    for s in steps:
        assert not s.m_attn[0].any() and not s.M[0].any() and s.m_attn[1].any()


class Recorder(leditspp.JointAttentionMaps):
    """JointAttentionMaps that also keeps every probability it is shown."""
    seen = []

    def __call__(self, layer, size, probs):
        Recorder.seen.append((layer, tuple(size), probs.clone()))
        return super().__call__(layer, size, probs)


def test_masks_equal_a_recomputation_from_the_recorded_probabilities(flow, inv, monkeypatch):
    monkeypatch.setattr(leditspp, "JointAttentionMaps", Recorder)
    Recorder.seen = []
    _, steps = run(flow, inv, concepts=CONCEPTS, mask="intersect")
    blocks = flow.transformer.config["num_layers"]
    assert len(Recorder.seen) == blocks * len(steps)
    assert {layer.place for layer, _, _ in Recorder.seen} == {"joint"}
    n = [len(flow.tokenizer.tokenize(c.prompt)) for c in CONCEPTS]
    K = leditspp.kernel(torch.float32, "cpu")
    for i, s in enumerate(steps):
        probs = torch.stack([p for _, _, p in Recorder.seen[i * blocks:(i + 1) * blocks]])  # [L, 1 + C, heads, N, M]
        size = Recorder.seen[i * blocks][1]
        mean = probs[:, 1:].mean((0, 2))  # [C, N, M]: every block and head, the concept rows
        A = torch.stack([mean[c, :, 1:1 + n[c]].sum(-1) for c in range(len(n))]).unflatten(-1, size)
        A_s = F.conv2d(F.pad(A[:, None], (1, 1, 1, 1), mode="reflect"), K)[:, 0]
        assert torch.allclose(s.attn, A_s, rtol=1e-5, atol=1e-7)
        thresholds = quantile(s.attn, [c.threshold for c in CONCEPTS])
        m = (s.attn >= thresholds[:, None, None]).float()
        assert torch.equal(s.m_attn[:, 0], F.interpolate(m[:, None], s.x_t.shape[-2:]).expand(-1, 16, -1, -1))
        a_noise = s.g.abs().sum(2, keepdim=True)
        q = quantile(a_noise, [c.threshold for c in CONCEPTS])
        assert torch.equal(s.m_noise, (a_noise >= q[..., None, None]).float().expand_as(s.g))


def test_every_edit_step_field_is_filled(flow, inv):
    w, steps = run(flow, inv, concepts=CONCEPTS, mask="intersect", user_mask=torch.ones(8, 8), guidance_rescale=0.5)
    C = len(CONCEPTS)
    assert [s.i for s in steps] == list(range(4)) and [s.k for s in steps] == list(range(2, 6))
    assert [s.t for s in steps] == inv.timesteps and all(isinstance(s.t, float) for s in steps)
    for s in steps:
        assert s.eps_u.shape == (1, 16, 8, 8) and s.eps_c.shape == s.g.shape == s.M.shape == (C, 1, 16, 8, 8)
        assert s.on.tolist() == [True, s.i >= 1] and s.attn.shape == (C, 4, 4) and s.m_attn.shape == s.g.shape
        assert s.m_noise.shape == s.g.shape and not s.z.any() and s.x_prev.shape == s.x_t.shape
    assert torch.equal(steps[-1].x_prev, w) and all(torch.equal(a.x_prev, b.x_t) for a, b in zip(steps, steps[1:]))
    assert torch.equal(steps[0].x_t, inv.xts[:1])


def test_user_mask_zeroes_the_guidance_where_it_is_black(flow, inv):
    u = torch.zeros(8, 8)
    u[:, :4] = 1
    _, steps = run(flow, inv, concepts=CONCEPTS[:1], mask="noise", user_mask=u)
    for s in steps:
        assert not s.g[..., 4:].any() and torch.equal(s.eps[..., 4:], s.eps_u[..., 4:])


def test_sd35_reads_its_joint_attention_only(tmp_path, monkeypatch):
    """SD3.5's image-only attn2 (place "joint", cross False) is not part of the concept's attention map."""
    sd = minledits.load(sd3_hub.make(tmp_path / "sd35", kind="sd35", t5=False).folder, t5=False)
    monkeypatch.setattr(leditspp, "JointAttentionMaps", Recorder)
    Recorder.seen = []
    _, steps = run(sd, invert(sd, steps=4, skip=2), concepts=CONCEPTS[:1], mask="cross_attention")
    names = [layer.name for layer, _, _ in Recorder.seen]
    assert names == ["transformer_blocks.0.attn", "transformer_blocks.1.attn"] * 2
    assert all(s.m_attn.any() for s in steps)

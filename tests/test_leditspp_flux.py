"""LEDITS++ on a flow inversion of FLUX.1-dev (the tiny FLUX of tests/flux_hub.py): no reference exists, so these
are its properties. It runs end to end and reproduces bit for bit; the masks come from the double-stream blocks'
joint attention alone (a recording controller), to each concept's T5 word columns 0..n_c-1 (counted by transformers'
tokenizer); every velocity takes the guidance embedding's default; without concepts it is the inversion's plain
regeneration, recomputed here step by step; an RF-Inversion is refused in one line."""
import pytest
import torch
import torch.nn.functional as F

import minledits
from minledits import leditspp, rfinversion
from minledits.errors import InversionError
from minledits.sega import Concept, quantile
from tests import flux_hub
from tests.helpers import photo

pytestmark = pytest.mark.usefixtures("one_thread")
CONCEPTS = [Concept("red hat", scale=4.0, threshold=0.7, warmup=0),
            Concept("a small blue car", scale=3.0, threshold=0.5, reverse=True, warmup=1)]


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    return flux_hub.make(tmp_path_factory.mktemp("flux"))


@pytest.fixture(scope="module")
def flux(ref):
    return minledits.load(ref.folder)


@pytest.fixture(scope="module")
def inv(flux):
    return minledits.invert(flux, photo(), sampler="flow", steps=5, skip=2, size=64, source_prompt="a cat")


def run(sd, inv, **kw):
    steps = []
    w = leditspp.edit(sd, inv, callback=steps.append, **kw)
    return w, steps


def test_runs_end_to_end_and_reproduces_bit_for_bit(flux, inv):
    w, steps = run(flux, inv, concepts=CONCEPTS)
    again, _ = run(flux, inv, concepts=CONCEPTS)
    assert w.shape == (1, 16, 8, 8) and w.isfinite().all() and torch.equal(w, again)
    assert len(steps) == 3 and all(s.m_attn.any() and s.M.any() for s in steps)
    assert not torch.equal(w, leditspp.edit(flux, inv))
    assert minledits.decode(flux, w).size == (64, 64)


class Recorder(leditspp.JointAttentionMaps):
    """JointAttentionMaps that also keeps every probability it is shown."""
    seen = []

    def __call__(self, layer, size, probs):
        Recorder.seen.append((layer, tuple(size), probs.clone()))
        return super().__call__(layer, size, probs)


def test_masks_come_from_the_double_blocks_t5_word_columns(ref, flux, inv, monkeypatch):
    """The controller is shown the double-stream blocks (transformer_blocks.i.attn, place "joint") and no single-stream
    block; A~_c recomputed from those probabilities: every block and head, the concept's T5 columns 0..n_c-1."""
    from transformers import T5TokenizerFast
    monkeypatch.setattr(leditspp, "JointAttentionMaps", Recorder)
    Recorder.seen = []
    _, steps = run(flux, inv, concepts=CONCEPTS, mask="intersect")
    blocks = flux.transformer.config["num_layers"]
    names = [layer.name for layer, _, _ in Recorder.seen]
    assert names == [f"transformer_blocks.{i}.attn" for i in range(blocks)] * len(steps)
    assert {(layer.place, layer.cross) for layer, _, _ in Recorder.seen} == {("joint", True)}
    assert {size for _, size, _ in Recorder.seen} == {(4, 4)}  # the packed grid of the 8 x 8 latent
    tokenizer = T5TokenizerFast.from_pretrained(ref.folder / "tokenizer_2")
    n = [len(tokenizer(c.prompt).input_ids) - 1 for c in CONCEPTS]  # without </s>
    assert n == [2, 4]
    K = leditspp.kernel(torch.float32, "cpu")
    for i, s in enumerate(steps):
        probs = torch.stack([p for _, _, p in Recorder.seen[i * blocks:(i + 1) * blocks]])  # [L, 1 + C, heads, N, M]
        assert probs.shape[-1] == 512  # T5's columns: FLUX's conditioning
        mean = probs[:, 1:].mean((0, 2))
        A = torch.stack([mean[c, :, :n[c]].sum(-1) for c in range(len(n))]).unflatten(-1, (4, 4))
        A_s = F.conv2d(F.pad(A[:, None], (1, 1, 1, 1), mode="reflect"), K)[:, 0]
        assert torch.allclose(s.attn, A_s, rtol=1e-5, atol=1e-7)
        m = (s.attn >= quantile(s.attn, [c.threshold for c in CONCEPTS])[:, None, None]).float()
        assert torch.equal(s.m_attn[:, 0], F.interpolate(m[:, None], (8, 8)).expand(-1, 16, -1, -1))


def test_velocities_take_the_guidance_embeddings_default(flux, inv):
    seen = []
    hook = flux.transformer.register_forward_pre_hook(lambda m, args, kw: seen.append(args[-1]), with_kwargs=True)
    try:
        run(flux, inv, concepts=CONCEPTS[:1])
    finally:
        hook.remove()
    assert len(seen) == 3 and all(torch.equal(g, torch.full((2,), flux.default_guidance)) for g in seen)
    assert flux.default_guidance == 3.5


def test_no_concepts_regenerates_the_inversions_reconstruction(flux, inv):
    """Without concepts: x_{k+1} = x_k + (sigma_{k+1} - sigma_k) v(x_k; "") from the inversion's x_skip, each v at the
    guidance embedding's default: the Euler regeneration, recomputed here."""
    w, steps = run(flux, inv)
    sampler, c = inv.new_sampler(flux.schedule), flux.text_embeddings([""])
    x = inv.xts[:1]
    for k, t in zip(range(inv.settings.skip, sampler.N), inv.timesteps):
        x = sampler.step(k, x, flux.predict(x, t, c))
    assert torch.equal(w, x)
    assert all(not s.M.numel() and torch.equal(s.eps, s.eps_u) for s in steps)


def test_an_rf_inversion_is_refused_in_one_line(flux):
    """RF-Inversion's latents belong to its controlled ODEs: LEDITS++ takes a flow inversion only."""
    inv = rfinversion.invert(flux, photo(), steps=3, size=64)
    with pytest.raises(InversionError, match=r"^the inversion is an RF-Inversion \(gamma 0.5\): only RF-Inversion's "
                                             r"edit \(rfinversion.edit, --method rf-inversion\) takes it; for this "
                                             r"method invert again with the flow sampler$"):
        leditspp.edit(flux, inv, concepts=CONCEPTS)


def test_a_non_square_inversion_maps_on_its_packed_grid(flux, monkeypatch):
    """128 x 64 px: an 8 x 16 latent, the controller's grid (4, 8) rows by columns, the masks at the latent's size."""
    inv = minledits.invert(flux, photo(size=(128, 64)), sampler="flow", steps=3, skip=1, size=128, keep_aspect=True)
    monkeypatch.setattr(leditspp, "JointAttentionMaps", Recorder)
    Recorder.seen = []
    w, steps = run(flux, inv, concepts=CONCEPTS[:1], mask="cross_attention")
    assert w.shape == (1, 16, 8, 16) and {size for _, size, _ in Recorder.seen} == {(4, 8)}
    assert all(s.attn.shape == (1, 4, 8) and s.m_attn.shape == (1, 1, 16, 8, 16) and s.m_attn.any() for s in steps)

"""Attention controllers: read and replace the attention probabilities of any UNet layer (layers module docstring).

- the probabilities a controller sees equal diffusers' (AttnProcessor -> Attention.get_attention_scores) on the same
  weights, for every self- and cross-attention layer of the tiny SD1 / SD2 / SD2-v (upcast) models, and the
  layers' names, places, levels and cross flags match the reference modules;
- the upcast rules (fp32 scores and softmax, probabilities cast back) in bf16, against get_attention_scores;
- an identity controller changes nothing; swapping two rows' cross-attention maps changes exactly those rows;
- the context manager restores the previous controller; layers a controller does not want keep the fused path.
"""
import pytest
import torch
from diffusers.models.attention_processor import Attention as ReferenceAttention
from diffusers.models.attention_processor import AttnProcessor

import minledits
import minledits.nets.layers
import minledits.parity
from minledits.nets.layers import Attention, AttentionLayer, attention_probs

# A controlled layer computes softmax(q k^T / sqrt(d)) explicitly, the fused kernel computes the same maths blockwise:
# one attention call differs by 4e-7..1.2e-6 of its output scale (fp32 ulps), and the tiny random UNets carry that
# to 7e-7..1.1e-6 of the output scale (20 seeds, identity controller on every layer). The same allowance as two
# implementations of the same maths in test_models (TINY_REL["unet"]); a real change (a swapped row, a wrong scale)
# moves the output by > 1e-3.
ROUNDING = 2e-6


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models gain nothing from threads (conftest)


class Recording(AttnProcessor):
    """diffusers' plain AttnProcessor, keeping what attn.get_attention_scores returns under the module's name."""

    def __init__(self, name, maps):
        self.name, self.maps = name, maps

    def __call__(self, attn, *args, **kwargs):
        scores = attn.get_attention_scores

        def keep(*a, **kw):
            self.maps[self.name] = probs = scores(*a, **kw)
            return probs

        attn.get_attention_scores = keep  # an instance attribute hides the method for this call
        try:
            return super().__call__(attn, *args, **kwargs)
        finally:
            del attn.get_attention_scores


class Recorder:
    """A controller that keeps every layer's probabilities and size, and changes nothing."""

    def __init__(self):
        self.maps, self.sizes = {}, {}

    def __call__(self, layer, size, probs):
        self.maps[layer.name], self.sizes[layer.name] = probs.clone(), size


def reference_maps(unet, *args):
    """{module name: probabilities [B * heads, N, M]} of one diffusers UNet call through AttnProcessor."""
    modules = {name: m for name, m in unet.named_modules() if isinstance(m, ReferenceAttention)}
    saved, maps = {name: m.processor for name, m in modules.items()}, {}
    try:
        for name, m in modules.items():
            m.set_processor(Recording(name, maps))
        with torch.no_grad():
            unet(*args)
    finally:
        for name, m in modules.items():
            m.set_processor(saved[name])
    return maps


def inputs(ref, batch=2, seed=0):
    torch.manual_seed(seed)
    return (torch.randn(batch, 4, 8, 6), torch.tensor([981, 1, 500][:batch]),
            torch.randn(batch, 77, ref.configs["unet"]["cross_attention_dim"]))


def attention_modules(unet):
    return [m for m in unet.modules() if isinstance(m, Attention)]


@pytest.mark.parametrize("kind", ["tiny_sd1", "tiny_sd2", "tiny_sd2v"])
def test_probabilities_match_diffusers(kind, request):
    """Every layer's probabilities equal get_attention_scores' (AttnProcessor path) on the same weights and inputs.

    Tolerance: probabilities lie in [0, 1]; the activations before each attention are bit-identical on tiny models
    (test_models) and the scores are computed by the same baddbmm, so the probabilities come out bit-identical
    (measured: 0 for the three kinds, printed with pytest -s). An absolute 1e-6 (a few fp32 ulps of a probability)
    only allows for another BLAS blocking elsewhere; a wrong scale, head split or key order moves them by > 1e-2.
    """
    ref = request.getfixturevalue(kind)
    unet = minledits.load(ref.folder).unet
    x, t, context = inputs(ref)
    expected = reference_maps(ref.unet, x, t, context)
    recorder = Recorder()
    with torch.no_grad(), unet.attention_controller(recorder):
        unet(x, t, context)

    reference = dict(ref.unet.named_modules())
    places = {"down": ref.unet.down_blocks, "mid": [ref.unet.mid_block], "up": ref.unet.up_blocks}
    layers = [m.layer for m in attention_modules(unet)]
    assert {layer.name for layer in layers} == set(expected) == set(recorder.maps)
    worst = 0.0
    for layer in layers:
        module, probs, (h, w) = reference[layer.name], recorder.maps[layer.name], recorder.sizes[layer.name]
        assert layer.cross == module.is_cross_attention
        assert any(module is m for m in places[layer.place][layer.block].modules()), layer
        B, heads, N, M = probs.shape
        assert (B, heads, N, M) == (2, module.heads, h * w, 77 if layer.cross else h * w)
        assert h * w in (8 * 6, 4 * 3)
        err = (probs.reshape(B * heads, N, M) - expected[layer.name]).abs().max().item()
        assert err <= 1e-6, (layer.name, err)
        worst = max(worst, err)
    print(f"{kind}: {len(layers)} layers, max abs diff of the probabilities {worst:.3g}")


@pytest.mark.parametrize("upcast", [False, True])
def test_upcast_rules_in_bf16(upcast):
    """bf16: without upcast the scores and softmax are bf16 as diffusers' (upcast_softmax is never set in the SD
    UNets); with upcast (SD 2.1 768) they are fp32, cast back to bf16. Same operations: equal to the bit."""
    ref = ReferenceAttention(query_dim=32, heads=4, dim_head=8, upcast_attention=upcast)
    torch.manual_seed(0)
    q, k = (4 * torch.randn(2, n, 32, dtype=torch.bfloat16) for n in (12, 7))
    expected = ref.get_attention_scores(ref.head_to_batch_dim(q), ref.head_to_batch_dim(k))
    probs = attention_probs(q, k, heads=4, upcast=upcast)
    assert probs.dtype == torch.bfloat16
    torch.testing.assert_close(probs.reshape(8, 12, 7), expected, rtol=0, atol=0)


def test_identity_controller_changes_nothing(tiny_sd2v):
    sd = minledits.load(tiny_sd2v.folder)
    x, t, context = inputs(tiny_sd2v)
    calls = []

    def identity(layer, size, probs):
        calls.append(layer)
        return probs

    with torch.no_grad():
        plain = sd.unet(x, t, context)
        with sd.unet.attention_controller(identity):
            controlled = sd.unet(x, t, context)
    assert len(calls) == len(attention_modules(sd.unet)) == len(set(calls))
    err = (controlled - plain).abs().max().item()
    print(f"identity controller: max abs diff {err:.3g} = {err / plain.abs().max().item():.3g} of the output scale")
    assert err <= ROUNDING * plain.abs().max()


def test_swapping_cross_attention_rows_changes_exactly_those_rows(tiny_sd1):
    """Rows 0 and 1: one latent, two prompts; a controller swaps their cross-attention maps. Row 2 is untouched."""
    sd = minledits.load(tiny_sd1.folder)
    x, t, context = inputs(tiny_sd1, batch=3)
    x, t = x[:1].expand(3, -1, -1, -1), torch.tensor([500, 500, 20])

    def swap(layer, size, probs):
        return probs[[1, 0, 2]] if layer.cross else None

    def keep(layer, size, probs):
        return None

    def identity(layer, size, probs):
        return probs

    with torch.no_grad():
        plain = sd.unet(x, t, context)
        with sd.unet.attention_controller(keep):
            kept = sd.unet(x, t, context)
        with sd.unet.attention_controller(identity):
            assert torch.equal(sd.unet(x, t, context), kept)  # None means: keep these very probabilities
        with sd.unet.attention_controller(swap):
            swapped = sd.unet(x, t, context)
    assert (kept - plain).abs().max() <= ROUNDING * plain.abs().max()  # explicit vs fused: fp32 rounding only
    assert torch.equal(swapped[2], kept[2])  # bit-identical: per-row arithmetic does not depend on the other rows
    for row in (0, 1):
        assert (swapped[row] - kept[row]).abs().max() > 1e-3 * kept[row].abs().max()


def test_attention_kernel_is_the_unets_and_comes_back(tiny_sd1):
    """attention_kernel(k): every UNet attention that no controller reads calls k, none of the VAE's; the explicit
    kernel equals a controller that keeps the probabilities, bit for bit; on exit the fused kernel is back."""
    sd = minledits.load(tiny_sd1.folder)
    x, t, context = inputs(tiny_sd1, batch=2)
    calls = []

    def kernel(q, k, v, heads, upcast=False):
        calls.append(heads)
        return minledits.parity.explicit_attention(q, k, v, heads, upcast)
    with torch.no_grad():
        plain = sd.unet(x, t, context)
        with sd.unet.attention_kernel(kernel):
            explicit = sd.unet(x, t, context)
            assert all(m.kernel is None for m in attention_modules(sd.vae))
            with sd.unet.attention_controller(lambda layer, size, probs: None):
                sd.unet(x, t, context)
        assert len(calls) == len(attention_modules(sd.unet)) and not torch.equal(explicit, plain)
        with sd.unet.attention_controller(lambda layer, size, probs: None):
            assert torch.equal(sd.unet(x, t, context), explicit)
        assert torch.equal(sd.unet(x, t, context), plain)
    assert {m.kernel for m in attention_modules(sd.unet)} == {None}


def test_context_manager_restores_the_previous_controller(tiny_sd1):
    sd = minledits.load(tiny_sd1.folder)
    modules = attention_modules(sd.unet)

    def controllers():
        return {m.controller for m in modules}

    def a(layer, size, probs):
        return None

    def b(layer, size, probs):
        return None

    assert controllers() == {None}
    with sd.unet.attention_controller(a) as ctrl:
        assert ctrl is a and controllers() == {a}
        with sd.unet.attention_controller(b):
            assert controllers() == {b}
        assert controllers() == {a}
        with pytest.raises(RuntimeError), sd.unet.attention_controller(b):
            raise RuntimeError("inside")
        assert controllers() == {a}
        with sd.unet.attention_controller(None):
            assert controllers() == {None}
        assert controllers() == {a}
    assert controllers() == {None}
    vae = [m for m in sd.vae.modules() if isinstance(m, Attention)]
    assert vae and all(m.layer is None and m.controller is None for m in vae)


def test_unwanted_layers_keep_the_fused_path(tiny_sd2, monkeypatch):
    """wants() False: the controller is never called and layers.attention (the fused path) serves the layer."""
    sd = minledits.load(tiny_sd2.folder)
    x, t, context = inputs(tiny_sd2)
    fused, original = [], minledits.nets.layers.attention
    monkeypatch.setattr(minledits.nets.layers, "attention", lambda *a, **kw: fused.append(1) or original(*a, **kw))

    class Only:
        def __init__(self, wanted):
            self.wanted, self.called = wanted, []

        def wants(self, layer, size):
            assert isinstance(layer, AttentionLayer) and len(size) == 2
            return self.wanted(layer)

        def __call__(self, layer, size, probs):
            self.called.append(layer)

    n = len(attention_modules(sd.unet))
    with torch.no_grad():
        plain = sd.unet(x, t, context)
        assert len(fused) == n
        none = Only(lambda layer: False)
        with sd.unet.attention_controller(none):
            assert torch.equal(sd.unet(x, t, context), plain)
        assert len(fused) == 2 * n and none.called == []
        cross = Only(lambda layer: layer.cross)
        with sd.unet.attention_controller(cross):
            sd.unet(x, t, context)
        assert len(fused) == 2 * n + n // 2 and len(cross.called) == n // 2
        assert all(layer.cross for layer in cross.called)

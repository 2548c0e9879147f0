"""nets/mmdit.py against diffusers' SD3Transformer2DModel on the same weights (loaded with strict=True):

- tiny random SD3 (joint blocks, the last context_pre_only), SD3.5-medium-shaped (a dual attention block, qk RMSNorm)
  and SD3.5-large-shaped (qk RMSNorm, no dual block) configs: equal outputs for non-square latents, batch 2, the
  timestep as a number, a 0-d tensor or one per row, in fp32 and bf16; the positional table equals diffusers' bit
  for bit;
- the attention controller sees every layer (names, places, flags, grid size, shapes), the joint attention's
  image -> text probabilities equal an explicit softmax of diffusers' own q and k (hooks on its projections and
  norms), rows sum to < 1, and reading them changes nothing (the fused kernel still gives the output, bit for bit);
  a tensor returned there is refused; attn2's probabilities are replaceable as the UNet's;
- the attention kernel reaches every attention and nests; bad configs and latent sizes are refused in one line;
- equal text rows counted once (collapse + counts): the output of SD3's 77 + 256 rows (the last 256 equal) on
  77 + 1 rows equals the uncollapsed call (fused, with a kernel, with a controller), the controller's CLIP columns
  are equal and the merged column is the sum of the 256; collapse finds the runs; bad counts are refused;
- slow: the full-size SD3-medium and SD3.5-medium architectures, random weights, fp32, 16x16 latents (128 px).
"""
import gc

import pytest
import torch
from diffusers import SD3Transformer2DModel

from minledits.nets import layers, mmdit
from minledits.nets.mmdit import MMDiT

TINY = dict(sample_size=16, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=64, caption_projection_dim=16, pooled_projection_dim=32, out_channels=16,
            pos_embed_max_size=16)
KINDS = {"sd3": TINY, "sd35": {**TINY, "dual_attention_layers": (0,), "qk_norm": "rms_norm"},
         "sd35-large": {**TINY, "qk_norm": "rms_norm"}}
B, M, HW = 2, 7, (6, 10)  # batch, text tokens, latent size (grid 3 x 5: a non-square, off-centre crop)
REL = 1e-5

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models gain nothing from threads (conftest)


def reference(cfg, seed=0):
    """diffusers' transformer, seeded, every weight perturbed (the RMSNorm weights start at 1: that hides bugs)."""
    torch.manual_seed(seed)
    ref = SD3Transformer2DModel(**cfg).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return ref


@pytest.fixture(scope="module", params=list(KINDS))
def pair(request):
    ref = reference(KINDS[request.param])
    ours = MMDiT(dict(ref.config)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, 16, *HW, generator=g), torch.tensor([800.0, 37.5]), torch.randn(B, M, 64, generator=g),
            torch.randn(B, 32, generator=g))


def assert_close(ours, ref, rel=REL):
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    err, scale = (ours - ref).abs().max().item(), ref.abs().max().item()
    print(f"max abs diff {err:.3g}, scale {scale:.3g}, relative {err / scale:.3g} (tolerance {rel})")
    assert err <= rel * scale, f"max abs diff {err:.3g} > {rel} * {scale:.3g}"


@torch.no_grad()
def test_matches_diffusers(pair):
    ours, ref = pair
    x, t, c, pooled = inputs()
    expected = ref(x, c, pooled, t).sample
    assert_close(ours(x, t, c, pooled), expected)
    same_t = ref(x, c, pooled, torch.full((B,), 500.0)).sample
    for t in (500, 500.0, torch.tensor(500.0)):  # a number, a 0-d tensor: one timestep for every row
        assert_close(ours(x, t, c, pooled), same_t)
    assert_close(ours(x[:1], t=500.0, c=c[:1], pooled=pooled[:1]), same_t[:1])


@torch.no_grad()
def test_matches_diffusers_in_bfloat16():
    """Half precision takes the same casts (sinusoids to the weights' dtype, qk norms' float32 mean); equal here."""
    ref = reference(KINDS["sd35"]).to(torch.bfloat16)
    ours = MMDiT(dict(ref.config)).eval().to(torch.bfloat16)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x, t, c, pooled = inputs()
    x, c, pooled = (a.to(torch.bfloat16) for a in (x, c, pooled))
    assert_close(ours(x, t, c, pooled), ref(x, c, pooled, t).sample)


def test_positional_table_and_config():
    ref = SD3Transformer2DModel(**KINDS["sd3"])  # sample_size 16, patch 2: the table's unit is 8 positions of 16
    ours = MMDiT(dict(ref.config))
    assert torch.equal(ours.pos_embed.pos_embed, ref.pos_embed.pos_embed)
    assert sorted(ours.state_dict()) == sorted(ref.state_dict())
    filled = MMDiT({"num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 8, "caption_projection_dim": 16,
                    "out_channels": None, "in_channels": 4, "pos_embed_max_size": 8}).config
    assert filled["qk_norm"] is None and filled["out_channels"] == 4 and filled["patch_size"] == 2


class Recorder:
    """Keeps every (layer, size, probs) it is shown; returns None (reads only) unless `give` says what to return."""

    def __init__(self, give=None, wants=None):
        self.seen, self.give = [], give
        if wants is not None:
            self.wants = wants

    def __call__(self, layer, size, probs):
        self.seen.append((layer, size, probs.clone()))
        return None if self.give is None else self.give(layer, probs)


def hooked_qk(ref):
    """{(block, "attn" | "attn2"): [q, k] [B, heads, L, d]} of diffusers' forward, q and k as its softmax sees them
    (after the qk norms; the joint attention's image tokens first, then the text's)."""
    got = {}

    def keep(key, part, heads):
        def hook(module, args, out):
            out = out if out.dim() == 4 else out.unflatten(-1, (heads, -1)).transpose(1, 2)
            got.setdefault(key, {}).setdefault(part, []).append(out.detach())
        return hook

    handles = []
    for i, block in enumerate(ref.transformer_blocks):
        for name in ("attn", "attn2"):
            attn = getattr(block, name)
            if attn is None:
                continue
            parts = {"q": [attn.norm_q or attn.to_q], "k": [attn.norm_k or attn.to_k]}
            if name == "attn":
                parts["q"].append(attn.norm_added_q or attn.add_q_proj)
                parts["k"].append(attn.norm_added_k or attn.add_k_proj)
            for part, modules in parts.items():
                for m in modules:
                    handles.append(m.register_forward_hook(keep((i, name), part, attn.heads)))
    return got, handles


@torch.no_grad()
def test_controller_sees_every_layer_and_changes_nothing(pair):
    ours, ref = pair
    x, t, c, pooled = inputs()
    plain = ours(x, t, c, pooled)
    rec = Recorder()
    with ours.attention_controller(rec):
        out = ours(x, t, c, pooled)
    assert torch.equal(out, plain)  # the fused kernel still gives the output
    got, handles = hooked_qk(ref)
    ref(x, c, pooled, t)
    for h in handles:
        h.remove()
    H, W = HW[0] // 2, HW[1] // 2
    N, heads = H * W, ours.config["num_attention_heads"]
    expected = [(i, name) for i, block in enumerate(ref.transformer_blocks) for name in ("attn", "attn2")
                if getattr(block, name) is not None]
    assert [(layer.block, layer.name.split(".")[-1]) for layer, _, _ in rec.seen] == expected
    for layer, size, probs in rec.seen:
        name = layer.name.split(".")[-1]
        assert layer == layers.AttentionLayer(f"transformer_blocks.{layer.block}.{name}", "joint", layer.block,
                                              cross=name == "attn")
        assert size == (H, W)
        q, k = (torch.cat(got[layer.block, name][part], dim=2).double() for part in "qk")
        softmax = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)  # [B, heads, N (+ M), N (+ M)]
        if layer.cross:
            assert probs.shape == (B, heads, N, M)
            torch.testing.assert_close(probs.double(), softmax[:, :, :N, N:], rtol=0, atol=1e-6)
            assert (probs.sum(-1) < 1).all() and (probs > 0).all()
        else:
            assert probs.shape == (B, heads, N, N)
            torch.testing.assert_close(probs.double(), softmax, rtol=0, atol=1e-6)


@torch.no_grad()
def test_probabilities_in_row_chunks(pair, monkeypatch):
    ours, _ = pair
    x, t, c, pooled = inputs()
    whole, chunked = Recorder(wants=lambda layer, size: layer.cross), Recorder(wants=lambda layer, size: layer.cross)
    with ours.attention_controller(whole):
        ours(x, t, c, pooled)
    monkeypatch.setattr(mmdit, "PROBS_CHUNK", 2 * B * ours.config["num_attention_heads"] * (15 + M))  # 2 rows
    with ours.attention_controller(chunked):
        ours(x, t, c, pooled)
    assert len(whole.seen) == len(chunked.seen) == ours.config["num_layers"]
    for (_, _, a), (_, _, b) in zip(whole.seen, chunked.seen):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


@torch.no_grad()
def test_joint_probabilities_are_read_only(pair):
    ours, _ = pair
    x, t, c, pooled = inputs()
    with ours.attention_controller(Recorder(give=lambda layer, probs: probs)), \
            pytest.raises(ValueError, match=r"transformer_blocks\.0\.attn: .*read-only"):
        ours(x, t, c, pooled)


@torch.no_grad()
def test_attn2_probabilities_replaceable():
    ref = reference(KINDS["sd35"])
    ours = MMDiT(dict(ref.config)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x, t, c, pooled = inputs()
    plain = ours(x, t, c, pooled)
    attn2 = dict(wants=lambda layer, size: not layer.cross)
    same, uniform = Recorder(give=lambda layer, p: p, **attn2), Recorder(give=lambda layer, p: torch.full_like(
        p, 1 / p.shape[-1]), **attn2)
    with ours.attention_controller(same):
        assert_close(ours(x, t, c, pooled), plain, rel=2e-6)  # explicit softmax vs the fused kernel: rounding
    with ours.attention_controller(uniform):
        assert (ours(x, t, c, pooled) - plain).abs().max() > 1e-3 * plain.abs().max()
    assert [layer.name for layer, _, _ in same.seen] == ["transformer_blocks.0.attn2"]


@torch.no_grad()
def test_unwanted_layers_are_not_shown_and_contexts_nest(pair):
    ours, _ = pair
    x, t, c, pooled = inputs()
    none, one = Recorder(wants=lambda layer, size: False), Recorder(wants=lambda layer, size: layer.block == 1)
    with ours.attention_controller(none):
        with ours.attention_controller(one):
            ours(x, t, c, pooled)
        ours(x, t, c, pooled)
    assert none.seen == [] and [layer.name for layer, _, _ in one.seen] == ["transformer_blocks.1.attn"]


@torch.no_grad()
def test_kernel_reaches_every_attention(pair):
    ours, _ = pair
    x, t, c, pooled = inputs()
    plain, calls = ours(x, t, c, pooled), []

    def kernel(q, k, v, heads, **kw):
        calls.append(q.shape[1])
        return layers.attention(q, k, v, heads, **kw)

    n = sum(getattr(b, name) is not None for b in ours.transformer_blocks for name in ("attn", "attn2"))
    with ours.attention_kernel(kernel), ours.attention_controller(Recorder()):  # reading keeps the kernel
        assert torch.equal(ours(x, t, c, pooled), plain)
        with ours.attention_kernel(None):
            ours(x, t, c, pooled)
    ours(x, t, c, pooled)
    assert len(calls) == n


@pytest.mark.parametrize("change, match", [
    ({"qk_norm": "layer_norm"}, "qk_norm='layer_norm'"),
    ({"caption_projection_dim": 32}, "caption_projection_dim=32"),
    ({"pos_embed_max_size": None}, "pos_embed_max_size"),
    ({"dual_attention_layers": (2,)}, "dual_attention_layers=.2."),
    ({"use_pooled": True}, r"\['use_pooled'\]"),
])
def test_bad_config_is_refused(change, match):
    with pytest.raises(ValueError, match=match):
        MMDiT({**TINY, **change})


def test_bad_latent_size_is_refused():
    ours = MMDiT(TINY)
    _, t, c, pooled = inputs()
    for hw in ((5, 10), (6, 34)):  # not a multiple of the patch; more patches than the table has
        with pytest.raises(ValueError, match="does not fit"):
            ours(torch.zeros(B, 16, *hw), t, c, pooled)


# ---- equal text rows counted once ----------------------------------------------------------------------------
def no_t5_inputs(seed=2, clip=5, t5=9):
    """SD3 without T5: `clip` distinct rows, then `t5` equal rows (zeros through the context embedder there)."""
    x, t, c, pooled = inputs(seed)
    return x, t, torch.cat([c[:, :clip], torch.zeros(B, t5, c.shape[2])], dim=1), pooled


def test_collapse_finds_runs_of_equal_rows():
    c = torch.randn(2, 6, 3)
    c[:, 2] = c[:, 1]
    c[:, 4:] = 0
    short, counts = mmdit.collapse(c)
    assert counts.tolist() == [1, 2, 1, 2] and torch.equal(short, c[:, [0, 1, 3, 4]])
    c[1, 2, 0] += 1  # equal in one batch row only: not a run
    assert mmdit.collapse(c)[1].tolist() == [1, 1, 1, 1, 2]
    distinct = torch.randn(2, 4, 3)
    assert mmdit.collapse(distinct)[0] is distinct and mmdit.collapse(distinct)[1] is None


@torch.no_grad()
def test_equal_rows_counted_once_match_the_full_call(pair):
    ours, _ = pair
    x, t, c, pooled = no_t5_inputs()
    short, counts = mmdit.collapse(c)
    assert short.shape[1] == 6 and counts.tolist() == [1] * 5 + [9]
    full_rec, short_rec = Recorder(), Recorder()
    with ours.attention_controller(full_rec):
        full = ours(x, t, c, pooled)
    with ours.attention_controller(short_rec):
        assert_close(ours(x, t, short, pooled, counts), full)
    assert_close(ours(x, t, short, pooled, counts), full)  # the fused kernel with the log-count bias
    assert_close(ours(x, t, short, pooled, counts.tolist()), full)
    with ours.attention_kernel(layers.attention):  # a kernel: the merged rows repeated
        assert_close(ours(x, t, short, pooled, counts), full)
    assert len(full_rec.seen) == len(short_rec.seen) > 0
    for (layer, size, p_full), (layer2, size2, p_short) in zip(full_rec.seen, short_rec.seen):
        assert (layer, size) == (layer2, size2)
        if not layer.cross:  # attn2: image tokens only, unchanged
            assert_close(p_short, p_full)
            continue
        assert p_short.shape[-1] == 6
        merged = torch.cat([p_full[..., :5], p_full[..., 5:].sum(-1, keepdim=True)], -1)
        assert_close(p_short, merged)


def test_counts_are_refused_unless_one_per_row(pair):
    ours, _ = pair
    x, t, c, pooled = no_t5_inputs()
    for counts in ([1] * 13, [1] * 13 + [0], torch.ones(14) * 1.0):
        with pytest.raises(ValueError, match="counts must be 14 integers >= 1"):
            ours(x, t, c, pooled, counts)


# ---- full size ----------------------------------------------------------------------------------------------
SD3_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                  num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)  # transformer/config.json
FULL = {"sd3-medium": SD3_MEDIUM,  # stabilityai/stable-diffusion-3-medium-diffusers
        "sd3.5-medium": {**SD3_MEDIUM, "pos_embed_max_size": 384, "qk_norm": "rms_norm",
                         "dual_attention_layers": tuple(range(13))}}  # stabilityai/stable-diffusion-3.5-medium


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(FULL))
@torch.no_grad()
def test_full_size_parity(kind):
    """The Hub transformer architecture, random weights, fp32, latents 16x16 (128 px), batch 2, 333 text tokens.
    One copy of the weights (8 GB, 10 GB): ours is built on the meta device and takes diffusers' tensors."""
    torch.manual_seed(0)
    ref = SD3Transformer2DModel(**FULL[kind]).eval()
    with torch.device("meta"):
        ours = MMDiT(dict(ref.config))
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    ours.eval()
    g = torch.Generator().manual_seed(1)
    x, c, pooled = torch.randn(2, 16, 16, 16, generator=g), torch.randn(2, 333, 4096, generator=g), torch.randn(
        2, 2048, generator=g)
    t = torch.tensor([1000.0, 250.0])
    expected = ref(x, c, pooled, t).sample
    got = ours(x, t, c, pooled)
    del ours, ref
    gc.collect()
    assert_close(got, expected)

"""nets/flux.py against diffusers' FluxTransformer2DModel on the same weights (loaded with strict=True):

- the tiny FLUX.1-dev (guidance embedding) and schnell transformers of tests/flux_hub.py: equal outputs for square
  and non-square latents, batch 2, t and guidance per row or one number, in fp32, bf16 and fp16; the same keys;
- pack / unpack / image_ids / text_ids equal FluxPipeline's static methods; the RoPE angles equal FluxPosEmbed's;
  FluxPipeline's own transformer calls on the tiny Hub folder (dev, schnell) give the same velocity in ours;
- the attention controller sees every double-stream block (names, flags, grid size, shapes) and only those, the
  image -> text probabilities equal an explicit softmax of diffusers' own q and k after its RoPE (hooks on its
  norms), rows sum to < 1, reading them changes nothing (the fused kernel's output, bit for bit); a tensor returned
  is refused; unwanted layers are not shown; controllers nest; the attention kernel reaches every attention;
- unsupported config values, a missing or unexpected guidance and mismatched inputs are refused in one line;
- slow: one full-size FLUX.1-dev double-stream and one single-stream block (hidden 3072, 24 heads of 128, MLP 4x,
  RoPE axes 16 + 56 + 56), random weights, fp32, 512 text + 256 image tokens, against diffusers' blocks.
"""
import gc
import resource

import pytest
import torch
from diffusers import FluxTransformer2DModel
from diffusers.models.embeddings import FluxPosEmbed, apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

from minledits.nets import flux, layers
from minledits.nets.flux import FluxTransformer
from tests import flux_hub, sd3_hub
from tests.test_mmdit import Recorder, assert_close

B, M, HW = 2, 7, (6, 10)  # batch, text tokens, latent size (packed grid 3 x 5: non-square)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models gain nothing from threads (conftest)


def config(kind):
    return sd3_hub._clean(flux_hub.configs(kind)["transformer"])


def reference(kind, seed=0):
    """diffusers' transformer, seeded, every weight perturbed (RMSNorm weights start at 1: that hides bugs)."""
    torch.manual_seed(seed)
    ref = FluxTransformer2DModel(**config(kind)).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return ref


def ours_on(ref):
    ours = FluxTransformer(dict(ref.config)).eval().to(ref.dtype)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours


@pytest.fixture(scope="module", params=flux_hub.KINDS)
def pair(request):
    ref = reference(request.param)
    return ours_on(ref), ref


def inputs(kind="dev", hw=HW, seed=1):
    """(x packed [B, N, 64], t [B], c, pooled, img_ids, txt_ids, guidance [B] | None) as FluxPipeline passes them."""
    g = torch.Generator().manual_seed(seed)
    x = flux.pack(torch.randn(B, 16, *hw, generator=g))
    return (x, torch.tensor([1.0, 0.3125]), torch.randn(B, M, 32, generator=g), torch.randn(B, 16, generator=g),
            flux.image_ids(*hw), flux.text_ids(M), torch.tensor([3.5, 1.0]) if kind == "dev" else None)


def run_ref(ref, x, t, c, pooled, img_ids, txt_ids, guidance):
    return ref(hidden_states=x, timestep=t, encoder_hidden_states=c, pooled_projections=pooled, img_ids=img_ids,
               txt_ids=txt_ids, guidance=guidance, return_dict=False)[0]


def kind_of(ours):
    return "dev" if ours.guidance_embeds else "schnell"


@torch.no_grad()
@pytest.mark.parametrize("hw", [(8, 8), HW])
def test_matches_diffusers(pair, hw):
    ours, ref = pair
    args = inputs(kind_of(ours), hw)
    assert_close(ours(*args), run_ref(ref, *args))
    x, t, c, pooled, img_ids, txt_ids, guidance = args
    same = run_ref(ref, x, torch.full((B,), 0.5), c, pooled, img_ids, txt_ids,
                   None if guidance is None else torch.full((B,), 2.5))
    for t1 in (0.5, torch.tensor(0.5)):  # a number, a 0-d tensor: one value for every row
        assert_close(ours(x, t1, c, pooled, img_ids, txt_ids, None if guidance is None else 2.5), same)


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matches_diffusers_in_half_precision(dtype):
    """Half precision takes the same casts (t and guidance to the weights' dtype before x 1000, RoPE and the qk
    norms in fp32; fp16's clipping)."""
    ref = reference("dev").to(dtype)
    ours = ours_on(ref)
    x, t, c, pooled, img_ids, txt_ids, guidance = inputs()
    x, c, pooled = (a.to(dtype) for a in (x, c, pooled))
    assert_close(ours(x, t, c, pooled, img_ids, txt_ids, guidance),
                 run_ref(ref, x, t, c, pooled, img_ids, txt_ids, guidance))


def test_keys_and_config():
    for kind in flux_hub.KINDS:
        ref = FluxTransformer2DModel(**config(kind))
        assert sorted(FluxTransformer(dict(ref.config)).state_dict()) == sorted(ref.state_dict())
    filled = FluxTransformer({"num_layers": 1, "num_single_layers": 1, "num_attention_heads": 2,
                              "attention_head_dim": 128, "joint_attention_dim": 8, "pooled_projection_dim": 4}).config
    assert filled["out_channels"] == 64 and filled["axes_dims_rope"] == (16, 56, 56)
    assert filled["guidance_embeds"] is False and filled["patch_size"] == 1


def test_pack_unpack_and_ids_equal_the_pipeline():
    for h, w in ((8, 8), (6, 10), (128, 96)):
        lat = torch.randn(3, 16, h, w)
        packed = FluxPipeline._pack_latents(lat, 3, 16, h, w)
        assert torch.equal(flux.pack(lat), packed)
        assert torch.equal(flux.unpack(packed, h, w), FluxPipeline._unpack_latents(packed, 8 * h, 8 * w, 8))
        assert torch.equal(flux.unpack(packed, h, w), lat)
        assert torch.equal(flux.image_ids(h, w), FluxPipeline._prepare_latent_image_ids(3, h // 2, w // 2, "cpu",
                                                                                         torch.float32))
        assert flux.grid(flux.image_ids(h, w)) == (h // 2, w // 2)
    assert torch.equal(flux.text_ids(512), torch.zeros(512, 3))
    with pytest.raises(ValueError, match="sides must be even"):
        flux.pack(torch.zeros(1, 16, 5, 8))
    with pytest.raises(ValueError, match="do not unpack to a 8x6 latent"):
        flux.unpack(torch.zeros(1, 20, 64), 8, 6)


def test_rope_equals_diffusers():
    ids = torch.cat([flux.text_ids(5), flux.image_ids(64, 48)])
    for axes in ((16, 56, 56), (4, 6, 6)):
        for ours, theirs in zip(flux.rope(ids, axes), FluxPosEmbed(10000, list(axes))(ids)):
            assert torch.equal(ours, theirs)
        q = torch.randn(2, ids.shape[0], 3 * sum(axes))
        cs = flux.rope(ids, axes)
        assert torch.equal(flux.rotate(q, cs, 3), apply_rotary_emb(q.unflatten(-1, (3, -1)), cs, sequence_dim=1)
                           .flatten(2))


@torch.no_grad()
@pytest.mark.parametrize("kind", flux_hub.KINDS)
def test_takes_what_the_pipeline_passes(kind, tmp_path):
    """FluxPipeline on the tiny Hub folder (2 steps, 32 x 48 px): each of its transformer calls, given to ours as
    forward(x, t, c, pooled, img_ids, txt_ids, guidance), gives the same velocity (to rounding: the pipeline's weights
    are memory-mapped at addresses that take another matmul kernel than the same weights copied)."""
    ref = flux_hub.make(tmp_path / kind, kind=kind)
    pipe, calls = ref.pipe, []
    hook = pipe.transformer.register_forward_hook(lambda m, args, kw, out: calls.append((kw, out[0])),
                                                  with_kwargs=True)
    pipe("a red house", height=32, width=48, num_inference_steps=2, output_type="latent",
         generator=torch.Generator().manual_seed(0))
    hook.remove()
    ours = ours_on(pipe.transformer)
    assert len(calls) == 2
    for kw, v in calls:
        assert (kw["guidance"] is not None) == (kind == "dev") and kw["hidden_states"].shape == (1, 2 * 3, 64)
        got = ours(kw["hidden_states"], kw["timestep"], kw["encoder_hidden_states"], kw["pooled_projections"],
                   kw["img_ids"], kw["txt_ids"], kw["guidance"])
        assert_close(got, v)


def hooked_qk(ref):
    """{block: {norm name: [B, L, heads, d]}} of diffusers' double-stream blocks: q and k of the image (norm_q,
    norm_k) and of the text (norm_added_q, norm_added_k) as its norms give them (before the RoPE)."""
    got, handles = {}, []

    def keep(i, name):
        def hook(module, args, out):
            got.setdefault(i, {})[name] = out.detach()
        return hook

    for i, block in enumerate(ref.transformer_blocks):
        for name in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
            handles.append(getattr(block.attn, name).register_forward_hook(keep(i, name)))
    return got, handles


@torch.no_grad()
def test_controller_sees_every_double_block_and_changes_nothing(pair):
    ours, ref = pair
    args = inputs(kind_of(ours))
    plain = ours(*args)
    rec = Recorder()
    with ours.attention_controller(rec):
        assert torch.equal(ours(*args), plain)  # the fused kernel still gives the output
    got, handles = hooked_qk(ref)
    run_ref(ref, *args)
    for h in handles:
        h.remove()
    cos_sin = ref.pos_embed(torch.cat([args[5], args[4]]))  # diffusers' own RoPE of [text; image]
    H, W = HW[0] // 2, HW[1] // 2
    N, heads = H * W, ours.config["num_attention_heads"]
    assert [layer for layer, _, _ in rec.seen] == [
        layers.AttentionLayer(f"transformer_blocks.{i}.attn", "joint", i, cross=True)
        for i in range(ours.config["num_layers"])]
    for layer, size, probs in rec.seen:
        assert size == (H, W) and probs.shape == (B, heads, N, M)
        norms = got[layer.block]
        q, k = (apply_rotary_emb(torch.cat([norms[f"norm_added_{p}"], norms[f"norm_{p}"]], 1), cos_sin,
                                 sequence_dim=1).transpose(1, 2).double() for p in "qk")  # [text; image]
        softmax = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)  # [B, heads, M + N, M + N]
        torch.testing.assert_close(probs.double(), softmax[:, :, M:, :M], rtol=0, atol=1e-6)
        assert (probs.sum(-1) < 1).all() and (probs > 0).all()


@torch.no_grad()
def test_joint_probabilities_are_read_only(pair):
    ours, _ = pair
    with ours.attention_controller(Recorder(give=lambda layer, probs: probs)), \
            pytest.raises(ValueError, match=r"transformer_blocks\.0\.attn: .*read-only"):
        ours(*inputs(kind_of(ours)))


@torch.no_grad()
def test_unwanted_layers_are_not_shown_and_contexts_nest(pair):
    ours, _ = pair
    args = inputs(kind_of(ours))
    none, one = Recorder(wants=lambda layer, size: False), Recorder(wants=lambda layer, size: layer.block == 1)
    with ours.attention_controller(none):
        with ours.attention_controller(one):
            ours(*args)
        ours(*args)
    assert none.seen == [] and [layer.name for layer, _, _ in one.seen] == ["transformer_blocks.1.attn"]


@torch.no_grad()
def test_kernel_reaches_every_attention(pair):
    ours, _ = pair
    args = inputs(kind_of(ours))
    plain, calls = ours(*args), []

    def kernel(q, k, v, heads, **kw):
        calls.append(q.shape[1])
        return layers.attention(q, k, v, heads, **kw)

    with ours.attention_kernel(kernel), ours.attention_controller(Recorder()):  # reading keeps the kernel
        assert torch.equal(ours(*args), plain)
        with ours.attention_kernel(None):
            ours(*args)
    ours(*args)
    L = M + HW[0] * HW[1] // 4
    assert calls == [L] * (ours.config["num_layers"] + ours.config["num_single_layers"])


@pytest.mark.parametrize("change, match", [
    ({"patch_size": 2}, "patch_size=2"),
    ({"axes_dims_rope": (4, 6, 8)}, r"axes_dims_rope=\[4, 6, 8\]"),
    ({"axes_dims_rope": (5, 5, 6)}, "3 even sizes"),
    ({"axes_dims_rope": (8, 8)}, "3 even sizes"),
    ({"mlp_ratio": 2.0}, r"\['mlp_ratio'\]"),
])
def test_bad_config_is_refused(change, match):
    with pytest.raises(ValueError, match=match):
        FluxTransformer({**config("dev"), **change})


@torch.no_grad()
def test_guidance_and_inputs_are_checked():
    dev, schnell = FluxTransformer(config("dev")), FluxTransformer(config("schnell"))
    x, t, c, pooled, img_ids, txt_ids, guidance = inputs()
    with pytest.raises(ValueError, match="has a guidance embedding: pass guidance"):
        dev(x, t, c, pooled, img_ids, txt_ids)
    with pytest.raises(ValueError, match=r"has no guidance embedding \(schnell\)"):
        schnell(x, t, c, pooled, img_ids, txt_ids, guidance)
    for bad in ((x[..., :32], img_ids, txt_ids), (x, img_ids[:-1], txt_ids), (x, img_ids, txt_ids[:, :2])):
        with pytest.raises(ValueError, match="FLUX transformer inputs do not match"):
            schnell(bad[0], t, c, pooled, bad[1], bad[2])


# ---- full size ----------------------------------------------------------------------------------------------
DEV = dict(hidden=3072, heads=24, head_dim=128, axes=(16, 56, 56))  # black-forest-labs/FLUX.1-dev transformer/


@pytest.mark.slow
@torch.no_grad()
def test_full_size_blocks():
    """One double-stream and one single-stream block of FLUX.1-dev's size, random weights (norms perturbed), fp32,
    batch 1, 512 text + 256 image tokens (a 16 x 16 packed grid). Ours take diffusers' tensors (built on meta)."""
    D, heads, d = DEV["hidden"], DEV["heads"], DEV["head_dim"]
    Mt, H = 512, 16
    torch.manual_seed(0)
    refs = (FluxTransformerBlock(D, heads, d).eval(), FluxSingleTransformerBlock(D, heads, d).eval())
    for ref in refs:
        for name, p in ref.named_parameters():
            if "norm_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    with torch.device("meta"):
        ours = (flux.DoubleStreamBlock(D, heads, d), flux.SingleStreamBlock(D, heads, d))
    for a, b in zip(ours, refs):
        a.load_state_dict(b.state_dict(), strict=True, assign=True)
    g = torch.Generator().manual_seed(1)
    x, c, y = torch.randn(1, H * H, D, generator=g), torch.randn(1, Mt, D, generator=g), torch.randn(1, D, generator=g)
    ids = torch.cat([flux.text_ids(Mt), flux.image_ids(2 * H, 2 * H)])
    cos_sin = flux.rope(ids, DEV["axes"])
    c_ref, x_ref = refs[0](x, c, y, FluxPosEmbed(10000, list(DEV["axes"]))(ids))
    x_ours, c_ours = ours[0](x, c, y, cos_sin)
    assert_close(x_ours, x_ref)
    assert_close(c_ours, c_ref)
    c_ref, x_ref = refs[1](x_ref, c_ref, y, cos_sin)
    u = ours[1](torch.cat([c_ours, x_ours], 1), y, cos_sin)
    assert_close(u[:, Mt:], x_ref)
    assert_close(u[:, :Mt], c_ref)
    del ours, refs
    gc.collect()
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.2f} GiB")

"""UNet, VAE and CLIP text encoder against diffusers / transformers on the SAME random weights.

- key tree: our state-dict keys and shapes equal the reference's for the official SD 1.5 / 2.1-base / 2.1 configs
  (built on the meta device: instant, no memory);
- tiny parity: small configs of every flavour (conv vs linear projection, one vs per-level head counts, upcast,
  odd latent sizes, quick_gelu vs gelu), fp32 outputs allclose;
- the real path: the same references written in the official Hub layout (tests/hub.py), read by minledits.load;
- full size (slow, through the Hub layout): the SD 1.5 architecture, one forward of each model.
"""
import gc
import shutil

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

import minledits
import minledits.nets.layers
from minledits.nets.clip import TextEncoder
from minledits.nets.unet import UNet
from minledits.nets.vae import VAE
from minledits.parity import unet_text_kv
from tests import hub
from tests.bench import xl_inputs
from tests.helpers import deep

# ---- official architectures (docs/design.md §6) ---------------------------------------------------------
UNET_COMMON = dict(in_channels=4, out_channels=4, block_out_channels=[320, 640, 1280, 1280], layers_per_block=2,
                   down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                   up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, norm_num_groups=32, sample_size=64)
UNETS = {
    "sd15": dict(UNET_COMMON, cross_attention_dim=768, attention_head_dim=8),
    "sd21-base": dict(UNET_COMMON, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20],
                      use_linear_projection=True),
    "sd21": dict(UNET_COMMON, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True,
                 upcast_attention=True, sample_size=96),
}
VAE_SD = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4, sample_size=512,
              down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
CLIP_SD1 = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                hidden_act="quick_gelu", max_position_embeddings=77, vocab_size=49408, projection_dim=768)
CLIP_SD2 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                hidden_act="gelu", max_position_embeddings=77, vocab_size=49408, projection_dim=512)

# ---- tiny flavours ------------------------------------------------------------------------------------------
TINY_UNETS = {
    "sd1-2levels": dict(block_out_channels=[32, 64], layers_per_block=1, norm_num_groups=8, cross_attention_dim=24,
                        down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], attention_head_dim=4),
    "sd1-3levels": dict(block_out_channels=[32, 32, 64], layers_per_block=2, norm_num_groups=16, cross_attention_dim=16,
                        down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"], attention_head_dim=2),
    "sd2-headlist": dict(block_out_channels=[32, 64, 64], layers_per_block=2, norm_num_groups=8, cross_attention_dim=20,
                         down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                         up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
                         attention_head_dim=[2, 4, 8], use_linear_projection=True),
    "sd2v-upcast-2layers": dict(block_out_channels=[16, 32, 48, 48], layers_per_block=1, norm_num_groups=8,
                                cross_attention_dim=20, down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                                up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
                                attention_head_dim=[1, 2, 3, 3], use_linear_projection=True, upcast_attention=True,
                                transformer_layers_per_block=2),
}
TINY_VAES = {
    "2levels": dict(block_out_channels=[16, 32], layers_per_block=1, norm_num_groups=8, latent_channels=4),
    "4levels": dict(block_out_channels=[16, 32, 32, 64], layers_per_block=2, norm_num_groups=16, latent_channels=4),
}
TINY_CLIP = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                 max_position_embeddings=77, vocab_size=1000, layer_norm_eps=1e-5)


def vae_config(**kw):
    n = len(kw["block_out_channels"])
    return dict(kw, down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n)


def shapes(module):
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def clip_state(ref: CLIPTextModel):
    """transformers 5.x names CLIPTextModel keys without the `text_model.` prefix; the Hub files (and we) have it."""
    state = ref.state_dict()
    return {k if k.startswith("text_model.") else "text_model." + k: v for k, v in state.items()
            if not k.endswith("position_ids")}


def perturbed(ref):
    """Randomise every parameter (norm weights start at 1, biases at 0: those would hide a missing affine)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return ref.eval()


def assert_close(ours, ref, rel):
    """max |ours - ref| <= rel * max |ref| (printed for the record; see with pytest -s).

    Both sides compute the same maths in fp32 (eps 1.2e-7), in a summation order that can differ (fused
    GroupNorm+SiLU, a transposed vs contiguous operand of a matmul, thread splits). Measured here: UNet and CLIP
    are bit-identical on tiny configs; the VAE differs by up to 2.5e-6 of the output's scale (its single-head
    attention). Tolerances sit above that noise but below the smallest real bug we tried on purpose: a norm eps
    off by 10x moves the tiny UNet by 3e-6..8e-6, the VAE by >= 2.4e-5, CLIP by 1e-3 (head split, mask,
    activation, skip-order or timestep bugs are >= 1e-2). Full-size models sum over 10x more terms per layer.
    """
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    err, scale = (ours - ref).abs().max().item(), ref.abs().max().item()
    print(f"max abs diff {err:.3g}, tolerance {rel * scale:.3g} (rel {rel}, scale {scale:.3g})")
    assert err <= rel * scale, f"max abs diff {err:.3g} > {rel} * {scale:.3g}"
    return err


TINY_REL = {"unet": 2e-6, "vae": 1e-5, "clip": 2e-6}


@pytest.fixture(autouse=True)
def one_thread_for_tiny_models(request):
    """Tiny models gain nothing from threads, and on a busy shared CPU OpenMP waits make them up to 10x slower."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- key tree -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", UNETS)
def test_unet_key_tree(name):
    with torch.device("meta"):
        ref = UNet2DConditionModel(**UNETS[name])
        ours = UNet(dict(ref.config))
    assert shapes(ours) == shapes(ref)
    assert all(p.is_meta for p in ours.parameters())
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)


def test_vae_key_tree():
    with torch.device("meta"):
        ref = AutoencoderKL(**VAE_SD)
        ours = VAE(dict(ref.config))
    assert shapes(ours) == shapes(ref)
    assert ours.scaling_factor == 0.18215
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)


@pytest.mark.parametrize("config", [CLIP_SD1, CLIP_SD2], ids=["sd1", "sd2"])
def test_clip_key_tree(config):
    with torch.device("meta"):
        ref = CLIPTextModel(CLIPTextConfig(**config))
        ours = TextEncoder(ref.config.to_dict())
    assert shapes(ours) == {k: tuple(v.shape) for k, v in clip_state(ref).items()}
    assert all(k.startswith("text_model.") for k in ours.state_dict())
    ours.load_state_dict(clip_state(ref), strict=True, assign=True)


def test_unsupported_config_is_refused():
    with pytest.raises(ValueError, match="only_cross_attention"):
        UNet(dict(TINY_UNETS["sd1-2levels"], only_cross_attention=True))
    with pytest.raises(ValueError, match="block types"):
        UNet(dict(TINY_UNETS["sd1-2levels"], down_block_types=["CrossAttnDownBlock2D", "SimpleDownBlock2D"]))
    with pytest.raises(ValueError, match="hidden_act"):
        TextEncoder(dict(TINY_CLIP, hidden_act="relu"))


# ---- tiny parity --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", TINY_UNETS)
def test_unet_tiny_parity(name):
    ref = perturbed(UNet2DConditionModel(**TINY_UNETS[name]))
    ours = UNet(dict(ref.config)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    torch.manual_seed(1)
    x, context = torch.randn(2, 4, 12, 10), torch.randn(2, 7, ref.config.cross_attention_dim)  # 10 -> 5 -> 3: odd sizes
    with torch.no_grad():
        expected = ref(x, torch.tensor([999, 1]), context).sample
        assert_close(ours(x, torch.tensor([999, 1]), context), expected, TINY_REL["unet"])
        same_t = ref(x, 501, context).sample  # t as int, 0-d and [B] tensors are broadcast to the batch
        for t in (501, torch.tensor(501), torch.tensor([501, 501]), torch.tensor([501.0])):
            assert_close(ours(x, t, context), same_t, TINY_REL["unet"])


@pytest.mark.parametrize("kind", ["tiny-sd1", "tiny-sd2v", "tiny-sdxl"])
def test_unet_is_bit_identical_on_equal_inputs(kind, tmp_path):
    """The same kernels on the same memory layouts: SD 1.x's 1x1 proj_out conv gets a contiguous input, as diffusers
    gives it (a channels-last view took another oneDNN kernel, 1.3e-6 off). So LEDITS++ with the noise mask equals
    the pipeline exactly (tests/test_leditspp.py), and with attention masks too once the pipeline's attention kernel
    is swapped in (parity.explicit_attention).
    Two threads: on one, both conv kernels happened to round alike (the fixture restores the count)."""
    torch.set_num_threads(2)
    ref = deep(kind, tmp_path)
    ours = minledits.load(ref.folder).unet
    torch.manual_seed(1)
    x, c = torch.randn(3, 4, 16, 16), torch.randn(3, 77, ref.unet.config.cross_attention_dim)
    xl = xl_inputs(ref.unet.config, 3, 128) if kind == "tiny-sdxl" else {}  # pooled text and the six time_ids
    with torch.no_grad():
        theirs = ref.unet(x, 501, c, added_cond_kwargs=xl or None).sample
        assert torch.equal(ours(x, 501, c, **xl), theirs)


def two_unets(kind, tmp_path, batch):
    """The reference (deep copies, on two threads) and ours on its folder, x [batch, 4, 16, 16] (seed 1) and the
    SDXL UNet's added inputs for it."""
    torch.set_num_threads(2)
    ref = deep(kind, tmp_path)
    unet = minledits.load(ref.folder).unet
    torch.manual_seed(1)
    xl = xl_inputs(ref.unet.config, batch, 128) if kind == "tiny-sdxl" else {}
    return ref, unet, torch.randn(batch, 4, 16, 16), xl


@pytest.mark.parametrize("kind", ["tiny-sd1", "tiny-sdxl"])
def test_text_keys_and_values_computed_once_change_nothing(kind, tmp_path):
    """unet(x, t, parity.unet_text_kv(unet, c)) is unet(x, t, c) bit for bit - with rows repeated (the inversion's
    batches: one row of text for several x_t) and with a controller reading the cross-attention probabilities from
    those keys."""
    ref, unet, x, xl = two_unets(kind, tmp_path, 4)
    c = torch.randn(2, 77, ref.unet.config.cross_attention_dim)
    kv = unet_text_kv(unet, c).repeat_interleave(2)
    assert len(kv) == 4 and all(k.shape[0] == 2 for k, v in kv.kv.values())
    outs, read = [], []
    with torch.no_grad():
        for context in (c.repeat_interleave(2, 0), kv):
            outs.append(unet(x, 501, context, **xl))
            with unet.attention_controller(lambda layer, size, probs: read.append(probs) if layer.cross else None):
                outs.append(unet(x, 501, context, **xl))
    assert torch.equal(outs[0], outs[2]) and torch.equal(outs[1], outs[3])
    half = len(read) // 2
    assert half and all(torch.equal(a, b) for a, b in zip(read[:half], read[half:]))


@pytest.mark.parametrize("kind", ["tiny-sd1", "tiny-sdxl"])
def test_a_zero_text_skips_the_cross_attention_and_changes_nothing(kind, tmp_path):
    """SDXL's unconditional context is zeros, and to_v has no bias: v = 0, so attn2 is to_out's bias whatever its
    probabilities. With the zero context's TextKV no attn2 computes q, and the output is the reference's, which
    computes them all, bit for bit; a controller that reads the probabilities still gets them."""
    ref, unet, x, xl = two_unets(kind, tmp_path, 2)
    c = torch.zeros(1, 77, ref.unet.config.cross_attention_dim)
    kv = unet_text_kv(unet, c).repeat_interleave(2)
    assert kv.zero_v and not unet_text_kv(unet, c + 1e-3).zero_v
    assert not unet_text_kv(unet, c.clone().requires_grad_()).zero_v
    queries = []
    for m in unet.modules():
        if isinstance(m, minledits.nets.layers.Attention) and m.layer.cross:
            m.to_q.register_forward_hook(lambda *_: queries.append(1))
    read = []
    reader = lambda layer, size, probs: read.append(probs)  # noqa: E731
    reader.wants = lambda layer, size: layer.cross  # the self-attention keeps its fused kernel, as the reference's
    with torch.no_grad():
        theirs = ref.unet(x, 501, c.expand(2, -1, -1), added_cond_kwargs=xl or None).sample
        assert torch.equal(unet(x, 501, kv, **xl), theirs) and not queries
        with unet.attention_controller(reader):
            assert torch.equal(unet(x, 501, kv, **xl), theirs)
    assert read and queries and all(torch.all(p == 1 / 77) for p in read)


def test_unet_gradients_match():
    """The in-place adds / SiLU are autograd-safe: input and weight gradients equal the reference's."""
    ref = perturbed(UNet2DConditionModel(**TINY_UNETS["sd2v-upcast-2layers"]))
    ours = UNet(dict(ref.config)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    torch.manual_seed(1)
    x, context = torch.randn(2, 4, 8, 8, requires_grad=True), torch.randn(2, 5, 20)
    ref(x, 10, context).sample.square().sum().backward()
    expected, x.grad = x.grad, None
    ours(x, 10, context).square().sum().backward()
    assert_close(x.grad, expected, TINY_REL["unet"])
    reference = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        assert torch.allclose(p.grad, reference[name].grad, rtol=1e-5,
                              atol=1e-6 * reference[name].grad.abs().max()), name


@pytest.mark.parametrize("name", TINY_VAES)
def test_vae_tiny_parity(name):
    ref = perturbed(AutoencoderKL(**vae_config(**TINY_VAES[name])))
    ours = VAE(dict(ref.config)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    torch.manual_seed(1)
    images = torch.rand(2, 3, 32, 24) * 2 - 1
    with torch.no_grad():
        mean = ref.encode(images).latent_dist.mean
        assert_close(ours.encode(images), mean, TINY_REL["vae"])
        assert_close(ours.decode(mean), ref.decode(mean).sample, TINY_REL["vae"])


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_clip_tiny_parity(act):
    ref = perturbed(CLIPTextModel(CLIPTextConfig(**TINY_CLIP, hidden_act=act)))
    ours = TextEncoder(ref.config.to_dict()).eval()
    ours.load_state_dict(clip_state(ref), strict=True)
    torch.manual_seed(1)
    ids = torch.randint(0, TINY_CLIP["vocab_size"], (2, 77))
    with torch.no_grad():
        assert_close(ours(ids), ref(ids).last_hidden_state, TINY_REL["clip"])
        # causal: a prefix is unchanged
        assert_close(ours(ids[:, :9]), ref(ids[:, :9]).last_hidden_state, TINY_REL["clip"])


def test_all_attention_goes_through_one_function(monkeypatch):
    """Swapping layers.attention reaches every attention of the three models; upcast computes in fp32."""
    calls = []
    original = minledits.nets.layers.attention
    monkeypatch.setattr(minledits.nets.layers, "attention", lambda *a, **kw: calls.append(kw) or original(*a, **kw))
    unet, vae, clip = (UNet(TINY_UNETS["sd2v-upcast-2layers"]), VAE(vae_config(**TINY_VAES["2levels"])),
                       TextEncoder(TINY_CLIP))
    with torch.no_grad():
        unet(torch.randn(1, 4, 8, 8), 10, torch.randn(1, 5, 20))
        vae.decode(vae.encode(torch.randn(1, 3, 16, 16)))
        clip(torch.zeros(1, 77, dtype=torch.long))
    transformers = sum(isinstance(m, minledits.nets.layers.BasicTransformerBlock) for m in unet.modules())
    assert len(calls) == 2 * transformers + 2 + TINY_CLIP["num_hidden_layers"]
    assert sum(kw.get("upcast", False) for kw in calls) == 2 * transformers
    q, k, v = torch.randn(3, 2, 5, 8, dtype=torch.bfloat16).unbind(0)
    out = original(q, k, v, heads=2, upcast=True)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, original(q.float(), k.float(), v.float(), heads=2).bfloat16(), rtol=0, atol=0)


# ---- the real path: references written in the official Hub layout (tests/hub.py), then minledits.load ----------
def reference_outputs(ref, t, x, context, images, ids):
    """The reference modules' outputs, as tensors keyed like ours."""
    mean = ref.vae.encode(images).latent_dist.mean
    return {"unet": ref.unet(x, t, context).sample, "encode": mean, "decode": ref.vae.decode(mean).sample,
            "clip": ref.text_encoder(ids).last_hidden_state}


def our_outputs(sd, t, x, context, images, ids):
    return {"unet": sd.unet(x, t, context), "encode": sd.vae.encode(images), "decode": None,
            "clip": sd.text_encoder(ids)}


def inputs(unet_config, batch, latent, image):
    torch.manual_seed(2)
    return (torch.tensor([981, 1][:batch]), torch.randn(batch, 4, *latent),
            torch.randn(batch, 77, unet_config["cross_attention_dim"]), torch.rand(1, 3, *image) * 2 - 1,
            torch.randint(0, 49408, (batch, 77)))


def test_tiny_parity_through_load(tiny):
    """tiny-sd1 / tiny-sd2 / tiny-sd2v folders (CLIP keys text_model.-prefixed) -> minledits.load -> same outputs."""
    sd = minledits.load(tiny.folder)
    args = inputs(tiny.configs["unet"], 2, (8, 6), (64, 48))  # the tiny VAEs have 4 levels: latents = image / 8
    with torch.no_grad():
        expected = reference_outputs(tiny, *args)
        ours = our_outputs(sd, *args)
        ours["decode"] = sd.vae.decode(expected["encode"])
    for name, rel in [("unet", TINY_REL["unet"]), ("encode", TINY_REL["vae"]), ("decode", TINY_REL["vae"]),
                      ("clip", TINY_REL["clip"])]:
        assert_close(ours[name], expected[name], rel)
    assert sd.vae.scaling_factor == tiny.configs["vae"].get("scaling_factor", 0.18215)


# ---- full size: the SD 1.5 architecture, through the Hub layout and minledits.load ----------------------------
@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    """Random SD 1.5 written in the Hub layout; the reference's outputs; the reference freed; then minledits.load.

    Peak memory is about one copy of the weights (4.3 GB): the reference is deleted before our copy is loaded.
    The 4.3 GB folder is removed at the end of the module.
    """
    folder = tmp_path_factory.mktemp("sd15")
    ref = hub.build("sd15")
    hub.write(ref, folder)
    args = inputs(ref.configs["unet"], 2, (32, 32), (128, 128))
    with torch.no_grad():
        expected = reference_outputs(ref, *args)
    del ref
    gc.collect()
    sd = minledits.load(folder)
    with torch.no_grad():
        ours = our_outputs(sd, *args)
        ours["decode"] = sd.vae.decode(expected["encode"])
    del sd
    gc.collect()
    yield ours, expected
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["unet", "encode", "decode", "clip"])
def test_sd15_parity(sd15, name):
    """UNet at 32x32 latents (batch 2), VAE encode + decode at 128 px, CLIP on 77 tokens."""
    ours, expected = sd15
    assert_close(ours[name], expected[name], rel=1e-5)

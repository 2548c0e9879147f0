"""Stable Diffusion XL: our networks against diffusers / transformers on the same random weights.

- key trees: the full-size SDXL base UNet, both text encoders and the VAE, built on the meta device (no memory);
- tiny SDXL (tests/hub.py "tiny-sdxl": no attention at the first level, then 1 and 2 transformer layers, text_time
  conditioning, two small text encoders) written in the official layout and read back by minledits.load.
"""
import pytest
import torch

from minledits.load import build, load_file, read_json
from minledits.unet import UNet
from tests import hub

pytestmark = pytest.mark.usefixtures("one_thread")
REL = 1e-5  # relative to the output's max |.|; the tiny UNet is bit-identical on one thread (measured 0)


def shapes(module):
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def rel_err(ours, ref):
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    return hub.make("tiny-sdxl", tmp_path_factory.mktemp("tiny-sdxl"), fp16=True)


@pytest.fixture(scope="module")
def meta_sdxl():
    return hub.build("sdxl", device="meta")


# ---- UNet -------------------------------------------------------------------------------------------------------
def test_unet_key_tree_full_size(meta_sdxl):
    with torch.device("meta"):
        ours = UNet(meta_sdxl.configs["unet"])
    assert shapes(ours) == shapes(meta_sdxl.unet)
    assert "add_embedding.linear_1.weight" in shapes(ours) and shapes(ours)["add_embedding.linear_1.weight"] == (
        1280, 2816)
    assert not hasattr(ours.down_blocks[0], "attentions") or ours.down_blocks[0].attentions is None
    assert len(ours.mid_block.attentions[0].transformer_blocks) == 10
    assert [len(b.attentions[0].transformer_blocks) for b in ours.up_blocks[:2]] == [10, 2]


def tiny_unet_inputs(ref, batch=2):
    g = torch.Generator().manual_seed(3)
    c = ref.configs["unet"]
    pooled = ref.configs["text_encoder_2"]["projection_dim"]
    return dict(x=torch.randn(batch, 4, 12, 8, generator=g), t=torch.tensor([981, 3][:batch]),
                context=torch.randn(batch, 77, c["cross_attention_dim"], generator=g),
                text_embeds=torch.randn(batch, pooled, generator=g),
                time_ids=torch.tensor([[96.0, 64, 0, 0, 96, 64], [1024, 768, 16, 8, 512, 512]][:batch]))


def unet_pair(ref):
    """Ours, read from the folder's unet/ by the loader's own function; the reference."""
    folder = ref.folder / "unet"
    ours = build("unet", read_json(folder / "config.json"), "unet")
    return load_file(ours, folder / "diffusion_pytorch_model.safetensors", "unet"), ref.unet


@torch.no_grad()
def test_unet_tiny_parity(tiny_sdxl):
    ours, ref = unet_pair(tiny_sdxl)
    a = tiny_unet_inputs(tiny_sdxl)
    expected = ref(a["x"], a["t"], a["context"],
                   added_cond_kwargs={"text_embeds": a["text_embeds"], "time_ids": a["time_ids"]}).sample
    got = ours(a["x"], a["t"], a["context"], text_embeds=a["text_embeds"], time_ids=a["time_ids"])
    err = rel_err(got, expected)
    print(f"tiny SDXL UNet: max rel diff {err:.3g}")
    assert err <= REL
    # the conditioning matters: swapped crop and size ids, or no pooled text, move the output far beyond REL
    swapped = a["time_ids"][:, [2, 3, 0, 1, 4, 5]]
    assert rel_err(ours(a["x"], a["t"], a["context"], text_embeds=a["text_embeds"], time_ids=swapped), expected) > 1e-3
    zeros = torch.zeros_like(a["text_embeds"])
    assert rel_err(ours(a["x"], a["t"], a["context"], text_embeds=zeros, time_ids=a["time_ids"]), expected) > 1e-3


def test_unet_text_time_arguments_are_checked(tiny_sdxl, tiny_sd1):
    ours, _ = unet_pair(tiny_sdxl)
    a = tiny_unet_inputs(tiny_sdxl, 1)
    with pytest.raises(ValueError, match="text_embeds and time_ids"):
        ours(a["x"], a["t"], a["context"])
    sd1 = build("unet", tiny_sd1.configs["unet"], "unet")
    with pytest.raises(ValueError, match="text_time"):
        sd1(a["x"], a["t"], a["context"][..., :32], text_embeds=a["text_embeds"], time_ids=a["time_ids"])


@pytest.mark.parametrize("key, value", [
    ("addition_embed_type", "text"), ("reverse_transformer_layers_per_block", [[1], [1], [1]]),
    ("transformer_layers_per_block", [[1, 1], [1, 1], [2, 2]]), ("time_embedding_act_fn", "silu"),
    ("class_embeddings_concat", True), ("resnet_skip_time_act", True), ("encoder_hid_dim_type", "text_proj"),
    ("layers_per_block", [2, 2, 2]), ("cross_attention_dim", [64, 64, 64]), ("mid_block_scale_factor", 2),
])
def test_unet_unsupported_options_are_refused_by_name(tiny_sdxl, key, value):
    with pytest.raises(ValueError, match=key):
        UNet(dict(tiny_sdxl.configs["unet"], **{key: value}))

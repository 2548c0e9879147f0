"""Stable Diffusion XL: our networks against diffusers / transformers on the same random weights.

- key trees: the full-size SDXL base UNet, both text encoders and the VAE, built on the meta device (no memory);
- tiny SDXL (tests/hub.py "tiny-sdxl": no attention at the first level, then 1 and 2 transformer layers, text_time
  conditioning, two small text encoders) written in the official layout and read back by minledits.load.
"""
import json
import shutil
import warnings

import pytest
import torch

import minledits
from minledits.clip import TextEncoder, TextEncoderWithProjection
from minledits.load import build, load_file, read_json
from minledits.model import StableDiffusionXL
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


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl):
    return minledits.load(tiny_sdxl.folder)


@pytest.fixture(scope="module")
def pipe(tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline
    return StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl.folder), torch_dtype=torch.float32)


# 44 prompts for the tokenizers (no "!": tokenizer_2 pads with "!", which transformers then treats as special
# in prompts too; we keep open_clip's training tokenization, see minledits/tokenizer.py and tests/test_tokenizer.py)
PROMPTS = [
    "a photo of a cat", "A PHOTO of A CaT", "an astronaut riding a horse on mars", "", " ", "a",
    "masterpiece, best quality, (detailed:1.2), 8k", "tabs\tand\nnewlines", "multiple     spaces",
    "it's, they're, we've, I'm, you'll, he'd", "1234567890", "3.14159 and 2,718", "emoji 🙂😀🎉 party",
    "café naïve résumé façade", "東京タワー 夜景", "한국어 텍스트", "русский текст", "العربية",
    "<b>bold</b> <i>html</i>", "email@example.com https://example.com/path?q=1&x=2", "snake_case camelCase",
    "(parentheses) [brackets] {braces}", "$100 #hashtag @mention ^caret ~tilde", "...ellipsis… — em dash",
    "“smart quotes” ‘single’", "<|startoftext|>", "<|endoftext|>", "before <|endoftext|> after",
    "\u00a0non-breaking\u2003spaces", "zero\u200bwidth space", "ﬁ ligature ß", "ÜNÏCÖDÉ ÀÉÎÕÜ",
    "a portrait of an old man with a beard, oil painting", "cyberpunk city at night, neon lights, rain",
    "x" * 300, "a photo of an astronaut riding a horse on mars, " * 10, "1 2 3 " * 40, "🙂" * 100,
    "glasses", "sunglasses, smiling", "a dog in the style of van gogh", "low-poly 3D render",
    "combining e\u0301 accent", "Ｆｕｌｌｗｉｄｔｈ ｌｅｔｔｅｒｓ",
]


def quiet(fn, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args)


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


# ---- text encoders ------------------------------------------------------------------------------------------------
def test_text_encoder_key_trees_full_size(meta_sdxl):
    with torch.device("meta"):
        one = TextEncoder(meta_sdxl.configs["text_encoder"])
        two = TextEncoderWithProjection(meta_sdxl.configs["text_encoder_2"])
    assert shapes(one) == {"text_model." + k: v for k, v in shapes(meta_sdxl.text_encoder).items()}
    assert shapes(two) == shapes(meta_sdxl.text_encoder_2)
    assert shapes(two)["text_projection.weight"] == (1280, 1280)
    assert len(two.text_model.encoder.layers) == 32


@torch.no_grad()
def test_text_encoders_tiny_parity(tiny_sdxl, sdxl):
    """Penultimate hidden states of both encoders (quick_gelu and gelu), the last one, and the pooled projection."""
    ids = torch.cat([sdxl.tokenizer_2(["a photo of a cat", "", "glasses"]),
                     torch.randint(0, 49407, (1, 77))])  # a row without <|endoftext|>: the largest id is pooled
    one = tiny_sdxl.text_encoder(ids, output_hidden_states=True)
    two = tiny_sdxl.text_encoder_2(ids, output_hidden_states=True)
    pairs = [(sdxl.text_encoder.penultimate(ids), one.hidden_states[-2]), (sdxl.text_encoder(ids), one[0]),
             (sdxl.text_encoder_2(ids), two.last_hidden_state)]
    h2, pooled = sdxl.text_encoder_2.penultimate_and_pooled(ids)
    pairs += [(h2, two.hidden_states[-2]), (pooled, two.text_embeds)]
    for ours, ref in pairs:
        assert rel_err(ours, ref) <= 2e-6, rel_err(ours, ref)
    assert rel_err(h2, two.last_hidden_state) > 1e-2   # the penultimate is not the last


@torch.no_grad()
def test_prompt_embeddings_equal_the_sdxl_pipeline(sdxl, pipe):
    """c = [h1 ; h2] [B, 77, 64] and the pooled output as StableDiffusionXLPipeline.encode_prompt gives them; its
    negative branch (negative_prompt None, force_zeros_for_empty_prompt) is our "": zeros, pooled included."""
    prompts = ["a photo of a cat", "an astronaut riding a horse on mars, oil painting", "x" * 300]
    c, pooled = quiet(sdxl.text_embeddings, prompts + [""])
    ref_c, neg_c, ref_pooled, neg_pooled = quiet(lambda: pipe.encode_prompt(prompts, device="cpu"))
    assert c.shape == (4, 77, 64) and pooled.shape == (4, 16)
    assert rel_err(c[:3], ref_c) <= 2e-6 and rel_err(pooled[:3], ref_pooled) <= 2e-6
    assert torch.equal(c[3:], neg_c[:1]) and torch.equal(pooled[3:], neg_pooled[:1]) and not c[3].any()


@torch.no_grad()
def test_force_zeros_for_empty_prompt_false_encodes_the_empty_prompt(tiny_sdxl, tmp_path):
    from diffusers import StableDiffusionXLPipeline
    folder = shutil.copytree(tiny_sdxl.folder, tmp_path / "m")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(dict(index, force_zeros_for_empty_prompt=False)))
    sd, pipe = minledits.load(folder), StableDiffusionXLPipeline.from_pretrained(str(folder), torch_dtype=torch.float32)
    assert not sd.force_zeros_for_empty_prompt
    c, pooled = sd.text_embeddings(["glasses", ""])
    _, neg_c, _, neg_pooled = pipe.encode_prompt(["glasses"], device="cpu")
    assert c[1].abs().max() > 0.1 and rel_err(c[1:], neg_c) <= 2e-6 and rel_err(pooled[1:], neg_pooled) <= 2e-6


def test_tokenizers_match_transformers(tiny_sdxl, sdxl):
    assert len(PROMPTS) >= 40
    for name, ours in [("tokenizer", sdxl.tokenizer), ("tokenizer_2", sdxl.tokenizer_2)]:
        ref = hub.reference_tokenizer(tiny_sdxl.folder / name)
        expected = ref(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        assert torch.equal(quiet(ours, PROMPTS), expected), name
    assert (sdxl.tokenizer.pad_id, sdxl.tokenizer_2.pad_id) == (49407, 0)


def test_sdxl_model_object(sdxl):
    assert isinstance(sdxl, StableDiffusionXL) and sdxl.force_zeros_for_empty_prompt
    assert sdxl.time_ids(1024, 768).tolist() == [1024, 768, 0, 0, 1024, 768]
    assert sdxl.vae.scaling_factor == 0.13025


# ---- VAE ----------------------------------------------------------------------------------------------------------
def test_vae_key_tree_full_size(meta_sdxl):
    from minledits.vae import VAE
    with torch.device("meta"):
        ours = VAE(meta_sdxl.configs["vae"])
    assert shapes(ours) == shapes(meta_sdxl.vae) and ours.scaling_factor == 0.13025


@torch.no_grad()
def test_vae_tiny_parity(tiny_sdxl, sdxl):
    g = torch.Generator().manual_seed(4)
    images = torch.rand(2, 3, 64, 48, generator=g) * 2 - 1
    mean = tiny_sdxl.vae.encode(images).latent_dist.mean
    assert rel_err(sdxl.vae.encode(images), mean) <= 1e-5
    assert rel_err(sdxl.encode(images), 0.13025 * mean) <= 1e-5                     # the config's scaling factor
    assert rel_err(sdxl.decode(0.13025 * mean), tiny_sdxl.vae.decode(mean).sample) <= 1e-5


def vae_folder(folder, seed=1, **config):
    """A VAE on its own, laid out like madebyollin/sdxl-vae-fp16-fix: config.json and the weights at the top."""
    ref = hub.build("tiny-sdxl", seed=seed)
    (folder / "config.json").parent.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(dict(ref.configs["vae"], **config)))
    hub.save_safetensors(ref.vae.state_dict().items(), folder / "diffusion_pytorch_model.safetensors")
    return ref.vae


def test_force_upcast_keeps_the_vae_in_fp32_under_fp16(tiny_sdxl, tmp_path):
    sd = minledits.load(tiny_sdxl.folder, dtype="fp16")
    assert sd.unet.conv_in.weight.dtype == torch.float16 and sd.text_encoder_2.text_projection.weight.dtype == \
        torch.float16
    assert {p.dtype for p in sd.vae.parameters()} == {torch.float32}      # read from the fp16 files, upcast
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    assert sd.encode(x).dtype == torch.float16 and sd.decode(sd.encode(x)).dtype == torch.float32
    fixed = tmp_path / "fp16-fix"
    vae_folder(fixed, force_upcast=False)
    sd = minledits.load(tiny_sdxl.folder, dtype="fp16", vae=fixed)
    assert {p.dtype for p in sd.vae.parameters()} == {torch.float16}
    assert minledits.load(tiny_sdxl.folder, dtype="bf16").vae.conv_dtype == torch.bfloat16   # fp16 only


def test_vae_swap(tiny_sdxl, sdxl, tmp_path):
    other = vae_folder(tmp_path / "vae-only", scaling_factor=0.2)
    swapped = minledits.load(tiny_sdxl.folder, vae=tmp_path / "vae-only")
    ours = swapped.vae.state_dict()
    assert ours.keys() == other.state_dict().keys()
    assert all(torch.equal(ours[k], v) for k, v in other.state_dict().items())
    assert swapped.vae.scaling_factor == 0.2 and swapped.fingerprint != sdxl.fingerprint
    assert torch.equal(swapped.unet.conv_in.weight, sdxl.unet.conv_in.weight)
    from_model = minledits.load(tiny_sdxl.folder, vae=tiny_sdxl.folder)              # a model folder's vae/
    assert torch.equal(from_model.vae.quant_conv.weight, sdxl.vae.quant_conv.weight)
    (tmp_path / "empty").mkdir()
    with pytest.raises(minledits.LoadError, match="no config.json") as err:
        minledits.load(tiny_sdxl.folder, vae=tmp_path / "empty")
    assert "\n" not in str(err.value)

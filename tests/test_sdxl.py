"""Stable Diffusion XL: our networks against diffusers / transformers on the same random weights.

- key trees: the full-size SDXL base UNet, both text encoders and the VAE, built on the meta device (no memory);
- tiny SDXL (tests/hub.py "tiny-sdxl": no attention at the first level, then 1 and 2 transformer layers, text_time
  conditioning, two small text encoders) written in the official layout and read back by minledits.load.
"""
import json
import re
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file as safetensors_load
from safetensors.torch import save_file

import minledits
from minledits.io.load import build, load_file, read_json
from minledits.model import StableDiffusionXL
from minledits.nets.clip import TextEncoder, TextEncoderWithProjection
from minledits.nets.unet import UNet
from tests import hub
from tests.helpers import fake_snapshot_download

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
    from minledits.nets.vae import VAE
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


# ---- single files -------------------------------------------------------------------------------------------------
# The original (Stability generative-models) layout, written from diffusers-layout weights by a mapping in the other
# direction (diffusers name -> original name), independent of minledits/convert.py.
LDM_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
              "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
LDM_UNET_FIXED = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
                  "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
                  "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
LDM_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                  "self_attn.out_proj": "attn.out_proj"}


def ldm_unet(k, L, up_attn):
    head, rest = next(((a, k[len(a):]) for a in LDM_UNET_FIXED if k.startswith(a + ".")), (None, None))
    if head:
        return LDM_UNET_FIXED[head] + rest
    resnet = lambda r: LDM_RESNET[r.rsplit(".", 1)[0]] + "." + r.rsplit(".", 1)[1]  # noqa: E731
    if m := re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", k):
        n = (1 if m[1] == "down" else 0) + int(m[2]) * (L + 1) + int(m[4])
        where = "input_blocks" if m[1] == "down" else "output_blocks"
        return f"{where}.{n}.0.{resnet(m[5])}" if m[3] == "resnets" else f"{where}.{n}.1.{m[5]}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", k):
        return f"input_blocks.{(int(m[1]) + 1) * (L + 1)}.0.op.{m[2]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", k):
        return f"output_blocks.{int(m[1]) * (L + 1) + L}.{2 if up_attn[int(m[1])] else 1}.conv.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d)\.(.+)", k):
        return f"middle_block.{2 * int(m[1])}.{resnet(m[2])}"
    return re.sub(r"^mid_block\.attentions\.0\.", "middle_block.1.", k)


def ldm_vae(k, levels):
    k = re.sub(r"mid_block\.resnets\.(\d)", lambda m: f"mid.block_{int(m[1]) + 1}", k)
    k = k.replace("mid_block.attentions.0.", "mid.attn_1.").replace("conv_norm_out", "norm_out")
    k = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", k)
    k = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", k)
    k = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block.", k)
    up = lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample."  # noqa: E731
    k = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", up, k)
    for a, b in LDM_VAE_ATTN.items():
        k = k.replace(f"attn_1.{a}.", f"attn_1.{b}.")
    return k.replace("conv_shortcut", "nin_shortcut")


def openclip(sd):
    """CLIPTextModelWithProjection weights -> OpenCLIP names: q/k/v fused, text_projection as P = W^T."""
    out, fused = {}, {}
    for k, v in sd.items():
        k = k.removeprefix("text_model.")
        if k == "text_projection.weight":
            out["text_projection"] = v.T.contiguous()
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", k):
            fused.setdefault(f"transformer.resblocks.{m[1]}.attn.in_proj_{m[3]}", {})[m[2]] = v
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", k):
            out[f"transformer.resblocks.{m[1]}.{OPENCLIP_LAYER[m[2]]}.{m[3]}"] = v
        else:
            out[{"embeddings.token_embedding.weight": "token_embedding.weight", "final_layer_norm.weight":
                 "ln_final.weight", "final_layer_norm.bias": "ln_final.bias",
                 "embeddings.position_embedding.weight": "positional_embedding"}[k]] = v
    return out | {k: torch.cat([q["q"], q["k"], q["v"]]) for k, q in fused.items()}


def original_xl(unet, unet_cfg, vae, text, text_2, make):
    """The file sd_xl_base_1.0.safetensors lays out: the four networks, plus what must be ignored."""
    L, up_attn = unet_cfg["layers_per_block"], ["CrossAttn" in t for t in unet_cfg["up_block_types"]]
    out = {"model.diffusion_model." + ldm_unet(k, L, up_attn): v for k, v in unet.items()}
    out |= {"first_stage_model." + ldm_vae(k, 4): v[..., None, None] if ".attentions." in k and v.ndim == 2 else v
            for k, v in vae.items()}
    out |= {"conditioner.embedders.0.transformer.text_model." + k.removeprefix("text_model."): v
            for k, v in text.items()}
    out |= {"conditioner.embedders.1.model." + k: v for k, v in openclip(text_2).items()}
    return out | {"conditioner.embedders.1.model.logit_scale": make(()), "denoiser.sigmas": make((1000,))}


@pytest.fixture(scope="module")
def xl_file(tmp_path_factory):
    """A tiny SDXL in the original single-file layout and its diffusers config folder. It follows SDXL's
    conventions that a file cannot show (32 norm groups, heads of 64 channels), and the two encoders differ in
    width (diffusers' loader tells them apart by it)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    root = tmp_path_factory.mktemp("xl-file")
    c = hub.configs("sdxl")
    unet_cfg = dict(hub._clean(c["unet"]), block_out_channels=[64, 64, 128], attention_head_dim=[1, 1, 2],
                    transformer_layers_per_block=[1, 1, 2], cross_attention_dim=64 + 128, addition_time_embed_dim=8,
                    projection_class_embeddings_input_dim=32 + 6 * 8, sample_size=16)
    vae_cfg = dict(hub._clean(c["vae"]), block_out_channels=[32, 32, 64, 64], layers_per_block=1)
    small = dict(intermediate_size=96, num_hidden_layers=3, vocab_size=49408, max_position_embeddings=77)
    torch.manual_seed(0)
    refs = [UNet2DConditionModel(**unet_cfg), AutoencoderKL(**vae_cfg),
            CLIPTextModel(CLIPTextConfig(**c["text_encoder"] | small | dict(hidden_size=64, num_attention_heads=1))),
            CLIPTextModelWithProjection(CLIPTextConfig(**c["text_encoder_2"] | small | dict(
                hidden_size=128, num_attention_heads=2, projection_dim=32)))]
    with torch.no_grad():
        for m in refs:
            for p in m.parameters():
                p.add_(0.1 * torch.randn_like(p))
    for name, m in zip(("unet", "vae"), refs):
        m.save_config(root / name)
    for name, m in zip(("text_encoder", "text_encoder_2"), refs[2:]):
        m.config.save_pretrained(root / name)
    sds = [m.eval().state_dict() for m in refs]
    ckpt = original_xl(sds[0], unet_cfg, sds[1], sds[2], sds[3], torch.randn)
    save_file({k: v.contiguous() for k, v in ckpt.items()}, root / "sd_xl_tiny.safetensors")
    return root / "sd_xl_tiny.safetensors", root, refs


def xl_oracle(path, folder):
    """diffusers' own single-file loader, offline, configs from the local folder (the pipeline's helper for CLIP)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel, CLIPTextModelWithProjection
    kw = dict(config=str(folder), local_files_only=True, torch_dtype=torch.float32)
    ckpt = safetensors_load(path)
    return [UNet2DConditionModel.from_single_file(str(path), subfolder="unet", **kw),
            AutoencoderKL.from_single_file(str(path), subfolder="vae", **kw),
            create_diffusers_clip_model_from_ldm(CLIPTextModel, ckpt, subfolder="text_encoder", **kw),
            create_diffusers_clip_model_from_ldm(CLIPTextModelWithProjection, ckpt, subfolder="text_encoder_2", **kw)]


def plain(module):
    return {k.removeprefix("text_model."): v for k, v in module.state_dict().items()}


def test_single_file_loads_the_tensors_of_diffusers_from_single_file(xl_file):
    path, folder, refs = xl_file
    oracle = xl_oracle(path, folder)
    for ref, orc in zip(refs, oracle):   # diffusers read every tensor: the test's own mapping is right
        a, b = plain(ref), plain(orc)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sd = minledits.load(path)
    assert isinstance(sd, StableDiffusionXL) and sd.vae.scaling_factor == 0.13025 and sd.prediction_type == "epsilon"
    assert (sd.tokenizer.pad_id, sd.tokenizer_2.pad_id) == (49407, 0)
    for ours, orc in zip((sd.unet, sd.vae, sd.text_encoder, sd.text_encoder_2), oracle):
        a, b = plain(ours), plain(orc)
        assert a.keys() == b.keys()
        assert not (differ := [k for k in a if not torch.equal(a[k], b[k])]), differ[:5]
    for key in ("transformer_layers_per_block", "attention_head_dim", "cross_attention_dim", "addition_embed_type",
                "addition_time_embed_dim", "projection_class_embeddings_input_dim", "use_linear_projection",
                "down_block_types", "up_block_types", "block_out_channels"):
        assert sd.unet.config[key] == oracle[0].config[key] or list(oracle[0].config[key]) == sd.unet.config[key], key
    with torch.no_grad():
        ids = sd.tokenizer_2(["a photo of a cat"])
        assert torch.equal(sd.text_encoder_2.penultimate_and_pooled(ids)[1], oracle[3](ids).text_embeds)


def test_full_size_single_file_keys_map_one_to_one(meta_sdxl):
    """sd_xl_base_1.0's layout (from the meta reference's shapes): every tensor used once, configs inferred."""
    from minledits.io import convert
    c = meta_sdxl.configs
    ckpt = original_xl(meta_sdxl.unet.state_dict(), c["unet"], meta_sdxl.vae.state_dict(),
                       meta_sdxl.text_encoder.state_dict(), meta_sdxl.text_encoder_2.state_dict(),
                       lambda shape: torch.empty(shape, device="meta"))
    shapes_ = {k: tuple(v.shape) for k, v in ckpt.items()}
    parts = convert.parts_from_shapes(shapes_)
    assert parts["family"] == "sdxl" and parts["networks"] == ["unet", "vae", "text_encoder", "text_encoder_2"]
    used = [t.key for n in parts["networks"] for t in parts[n][1].values()]
    assert sorted(set(used)) == sorted(k for k in shapes_ if not k.endswith(("logit_scale", "sigmas")))
    for name, ref in [("unet", meta_sdxl.unet), ("vae", meta_sdxl.vae), ("text_encoder", meta_sdxl.text_encoder),
                      ("text_encoder_2", meta_sdxl.text_encoder_2)]:
        config, takes = parts[name]
        module = build(name, config, name)
        assert {k: t.shape(shapes_) for k, t in takes.items()} == shapes(module)
        if name != "text_encoder":
            assert shapes(module) == shapes(ref)
    for key in ("transformer_layers_per_block", "attention_head_dim", "addition_time_embed_dim",
                "projection_class_embeddings_input_dim", "cross_attention_dim", "use_linear_projection"):
        assert parts["unet"][0][key] == c["unet"][key], key
    assert parts["text_encoder_2"][0]["num_hidden_layers"] == 32 and parts["vae"][0]["force_upcast"]


def test_sdxl_refiner_files_are_refused(xl_file, tmp_path):
    """The refiner conditions on OpenCLIP alone (conditioner.embedders.0.model.) and five time ids: one line."""
    ckpt = {k.replace("conditioner.embedders.1.", "conditioner.embedders.0."): v
            for k, v in safetensors_load(xl_file[0]).items() if not k.startswith("conditioner.embedders.0.")}
    save_file(ckpt, tmp_path / "refiner.safetensors")
    with pytest.raises(minledits.LoadError, match="SDXL refiner") as err:
        minledits.load(tmp_path / "refiner.safetensors")
    assert "\n" not in str(err.value)


# ---- the Hub ------------------------------------------------------------------------------------------------------
def test_hub_fetches_only_the_needed_files(tiny_sdxl, tmp_path, monkeypatch):
    """snapshot_download replaced by a copy of the files matching allow_patterns: an SDXL repo's two text encoders
    and tokenizers come along, the fp16 variant with dtype fp16, nothing else (no fp32 twins, no extra files)."""
    snapshot = tmp_path / "snapshots" / ("a" * 40)
    fake_snapshot_download(monkeypatch, tiny_sdxl.folder, snapshot)
    sd = minledits.load("owner/tiny-xl", dtype="fp16")
    assert isinstance(sd, StableDiffusionXL) and sd.fingerprint == "a" * 40
    files = sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file())
    tok = ["merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]
    assert files == sorted(["model_index.json", "scheduler/scheduler_config.json"]
                           + [f"{c}/config.json" for c in ("unet", "vae", "text_encoder", "text_encoder_2")]
                           + [f"{c}/diffusion_pytorch_model.fp16.safetensors" for c in ("unet", "vae")]
                           + [f"{c}/model.fp16.safetensors" for c in ("text_encoder", "text_encoder_2")]
                           + [f"{t}/{n}" for t in ("tokenizer", "tokenizer_2") for n in tok])


# ---- full size (slow: the fp32 weights of the full-size SDXL UNet per process) -----------------------------------
REFERENCE_UNET = """
import sys, torch
from diffusers import UNet2DConditionModel
from tests import hub
from tests.helpers import fake_snapshot_download
folder = sys.argv[1]
torch.manual_seed(0)
config = hub.configs("sdxl")["unet"]
unet = UNet2DConditionModel(**hub._clean(config)).eval().requires_grad_(False)
hub._write_json(hub.Path(folder) / "unet" / "config.json", config)
hub.save_safetensors(unet.state_dict().items(), hub.Path(folder) / "unet" / "diffusion_pytorch_model.safetensors")
g = torch.Generator().manual_seed(1)
x, context = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 2048, generator=g)
pooled, time_ids = torch.randn(2, 1280, generator=g), torch.tensor([[128.0, 128, 0, 0, 128, 128]] * 2)
with torch.no_grad():
    out = unet(x, torch.tensor([999, 500]), context, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids})
torch.save({"x": x, "context": context, "pooled": pooled, "time_ids": time_ids, "out": out.sample}, folder + "/io.pt")
"""


@pytest.mark.slow
def test_full_size_sdxl_unet_at_128px(tmp_path):
    """The SDXL base UNet at full size (2.6 B parameters, random weights) at 128 px (16x16 latents), batch 2: the
    reference runs in its own process and writes its weights in the Hub layout and its output; then ours loads the
    file and runs. One copy of the weights in memory at a time: the one full-size SDXL test of the default run."""
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", REFERENCE_UNET, str(tmp_path)], check=True, cwd=root)
    io = torch.load(tmp_path / "io.pt")
    unet = unet_pair_from(tmp_path)
    with torch.no_grad():
        ours = unet(io["x"], torch.tensor([999, 500]), io["context"], text_embeds=io["pooled"], time_ids=io["time_ids"])
    err = rel_err(ours, io["out"])
    print(f"full-size SDXL UNet, 128 px: max rel diff {err:.3g}")
    assert err <= 1e-5


def unet_pair_from(folder):
    config = read_json(folder / "unet" / "config.json")
    return load_file(build("unet", config, "unet"), folder / "unet" / "diffusion_pytorch_model.safetensors", "unet")


def test_folder_without_tokenizers_and_missing_parts(tiny_sdxl, tmp_path):
    """No tokenizer/ nor tokenizer_2/: the shipped vocabulary, padded 49407 and 0 (the second encoder is gelu); an
    SDXL folder without text_encoder_2/ is refused in one line that names it."""
    folder = hub.write(tiny_sdxl, tmp_path / "no-tok", tokenizer=False)
    sd = minledits.load(folder)
    assert (sd.tokenizer.pad_id, sd.tokenizer_2.pad_id) == (49407, 0)
    shutil.rmtree(folder / "text_encoder_2")
    with pytest.raises(minledits.LoadError, match="has no text_encoder_2/") as err:
        minledits.load(folder)
    assert "\n" not in str(err.value) and "tokenizer_2/" in str(err.value)

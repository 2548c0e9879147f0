"""Single-file (original LDM / CompVis) checkpoints: minledits.io.convert against diffusers' own single-file loader.

The original-format files are written here from random diffusers-layout weights, by a mapping written in this
file in the *other* direction (diffusers name -> original name, by regular expressions), independent of
minledits/convert.py. diffusers' single-file loader, run offline on a local config folder, is the oracle.
`from_diffusers_folder` is what diffusers' scripts/convert_diffusers_to_original_stable_diffusion.py writes (its
rules re-derived here; once checked against the script itself: the same keys, shapes and dtypes for the SD 1.5 and
SD 2.1-base layouts, the same fused q/k/v values); the original release adds `tower_top` and the extras.
"""
import gc
import logging
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import minledits
from minledits.io import convert
from minledits.io.load import LoadError

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402
from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

# --------------------------------------------------------------------- diffusers names -> original names
RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
          "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
UNET_FIXED = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
              "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2"}


def ldm_resnet(rest):
    name, param = rest.rsplit(".", 1)
    return f"{RESNET[name]}.{param}"


def ldm_unet_key(k, L, up_attn):
    """A diffusers UNet key -> its LDM name (without `model.diffusion_model.`); L = layers per block."""
    for a, b in UNET_FIXED.items():
        if k.startswith(a + "."):
            return b + k[len(a):]
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", k):
        n = 1 + int(m[1]) * (L + 1) + int(m[3])
        return f"input_blocks.{n}.0.{ldm_resnet(m[4])}" if m[2] == "resnets" else f"input_blocks.{n}.1.{m[4]}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", k):
        return f"input_blocks.{(int(m[1]) + 1) * (L + 1)}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d)\.(.+)", k):
        return f"middle_block.{2 * int(m[1])}.{ldm_resnet(m[2])}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", k):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", k):
        n = int(m[1]) * (L + 1) + int(m[3])
        return f"output_blocks.{n}.0.{ldm_resnet(m[4])}" if m[2] == "resnets" else f"output_blocks.{n}.1.{m[4]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", k):
        i = int(m[1])
        return f"output_blocks.{i * (L + 1) + L}.{2 if up_attn[i] else 1}.conv.{m[2]}"
    raise KeyError(k)


VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def ldm_vae_key(k, levels):
    """A diffusers AutoencoderKL key -> its LDM name (without `first_stage_model.`)."""
    k = k.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
    k = k.replace("mid_block.resnets.0", "mid.block_1").replace("mid_block.resnets.1", "mid.block_2")
    k = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", k)
    k = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", k)
    # the original decoder counts its levels from the lowest resolution: reversed
    k = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block.", k)
    k = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
               lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample.", k)
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", k):
        return f"{m[1]}.mid.attn_1.{VAE_ATTN[m[2]]}.{m[3]}"
    return k


OPENCLIP = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
            "self_attn.out_proj": "attn.out_proj"}
OPENCLIP_TOP = {"embeddings.token_embedding.weight": "token_embedding.weight",
                "embeddings.position_embedding.weight": "positional_embedding",
                "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias",
                # a stored arange: no rule of diffusers' diffusers -> original script renames it, so it keeps its
                # transformers name under the `transformer.` the script puts in front of every text key
                "embeddings.position_ids": "transformer.text_model.embeddings.position_ids"}


def ldm_openclip_key(k):
    """A transformers CLIP text key -> (its OpenCLIP name without `cond_stage_model.model.`, and for q/k/v the
    third 0/1/2 of the fused `attn.in_proj_*` it is, else None)."""
    k = k.removeprefix("text_model.")
    if m := re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", k):
        return f"transformer.resblocks.{m[1]}.attn.in_proj_{m[3]}", "qkv".index(m[2])
    if m := re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", k):
        return f"transformer.resblocks.{m[1]}.{OPENCLIP[m[2]]}.{m[3]}", None
    return OPENCLIP_TOP[k], None


def ldm_openclip(sd):
    """transformers CLIP text weights -> OpenCLIP names (without `cond_stage_model.model.`), q/k/v fused."""
    out, fused = {}, {}
    for k, v in sd.items():
        name, third = ldm_openclip_key(k)
        if third is None:
            out[name] = v
        else:
            fused.setdefault(name, [None] * 3)[third] = v
    return out | {name: torch.cat(qkv) for name, qkv in fused.items()}


def from_diffusers_folder(unet_sd, unet_cfg, vae_sd, vae_cfg, text_sd, sd2):
    """What diffusers' scripts/convert_diffusers_to_original_stable_diffusion.py writes from a diffusers folder
    (`text_sd`: the text encoder file's keys): the three networks and nothing else. The SD 2.x text encoder keeps
    the folder's layers (23), with no `text_projection` / `logit_scale`; a stored `position_ids` is kept."""
    L, up_attn = unet_cfg["layers_per_block"], ["CrossAttn" in t for t in unet_cfg["up_block_types"]]
    levels = len(vae_cfg["block_out_channels"])
    out = {"model.diffusion_model." + ldm_unet_key(k, L, up_attn): v for k, v in unet_sd.items()}
    for k, v in vae_sd.items():  # the VAE mid attention is 1x1 convs in the original
        out["first_stage_model." + ldm_vae_key(k, levels)] = (
            v[..., None, None] if ".attentions." in k and v.ndim == 2 else v)
    if not sd2:  # SD 1.x: transformers' own names, as in the folder's file
        return out | {"cond_stage_model.transformer." + k: v for k, v in text_sd.items()}
    return out | {"cond_stage_model.model." + k: v for k, v in ldm_openclip(text_sd).items()}


def tower_top(ckpt, make):
    """Add what an original SD 2.x file holds beyond the 23 layers used: OpenCLIP's last (24th) resblock, unused
    by SD 2.x, and CLIP's image-text head. `make(shape)` gives the tensors (works on `meta` too)."""
    pre = "cond_stage_model.model."
    width, n = (ckpt[pre + "token_embedding.weight"].shape[1],
                1 + max(int(k.split(".")[4]) for k in ckpt if ".resblocks." in k))
    for k in [k for k in ckpt if k.startswith(pre + "transformer.resblocks.0.")]:
        ckpt[k.replace(".resblocks.0.", f".resblocks.{n}.")] = make(ckpt[k].shape)
    return ckpt | {pre + "text_projection": make((width, 64)), pre + "logit_scale": make(())}


def to_original(unet_sd, unet_cfg, vae_sd, vae_cfg, text_sd, sd2, make):
    """The original single-file layout (plus what must be ignored) from diffusers-layout weights.
    `make(shape)` gives a tensor for the extras (works on `meta` too)."""
    text = {"text_model." + k.removeprefix("text_model."): v for k, v in text_sd.items()}
    if not sd2:
        text["text_model.embeddings.position_ids"] = make((1, 77)).long()  # SD 1.x files store it
    out = from_diffusers_folder(unet_sd, unet_cfg, vae_sd, vae_cfg, text, sd2)
    # ignored: EMA copies (flattened names, different values), the training schedule
    for k in list(out)[:150]:
        out["model_ema." + k.split(".", 1)[1].replace(".", "")] = make(out[k].shape)
    out |= {"model_ema.decay": make(()), "model_ema.num_updates": make(()), "alphas_cumprod": make((1000,)),
            "betas": make((1000,)), "sqrt_one_minus_alphas_cumprod": make((1000,))}
    return tower_top(out, make) if sd2 else out


# ------------------------------------------------------------------------------------- tiny models
def tiny_configs(sd2):
    """Tiny SD-shaped configs. A single file cannot say what tensors do not show, so convert.py infers with
    SD's conventions: 32 norm groups, SD1 8 heads, SD2 and CLIP heads of size 64, SD2 23 text layers (of
    OpenCLIP's 24). These tiny models follow them (tests/hub.py's tiny kinds do not: 8 groups, smaller heads)."""
    unet = dict(sample_size=8, block_out_channels=(64, 64, 128), layers_per_block=2, cross_attention_dim=128,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                attention_head_dim=[1, 1, 2] if sd2 else 8, use_linear_projection=sd2, upcast_attention=False)
    vae = dict(block_out_channels=(32, 32, 64, 64), layers_per_block=2 if sd2 else 1, latent_channels=4,
               down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    text = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=23 if sd2 else 3, num_attention_heads=2,
                max_position_embeddings=77, vocab_size=49408, hidden_act="gelu" if sd2 else "quick_gelu")
    return unet, vae, text


def perturb(model):
    """Random init leaves norms at 1 / 0 and some layers at zero: give every tensor its own random values."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def original(request, tmp_path_factory):
    """(path of an original-format file, config folder, reference diffusers/transformers models, is SD2)."""
    sd2, root = request.param == "sd2", tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    unet_cfg, vae_cfg, text_cfg = tiny_configs(sd2)
    unet, vae = perturb(UNet2DConditionModel(**unet_cfg)), perturb(AutoencoderKL(**vae_cfg))
    text = perturb(CLIPTextModel(CLIPTextConfig(**text_cfg)))
    unet.save_config(root / "unet")
    vae.save_config(root / "vae")
    text.config.save_pretrained(root / "text_encoder")
    sds = [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in (unet, vae, text)]
    ckpt = to_original(sds[0], unet.config, sds[1], vae.config, sds[2], sd2, make=torch.randn)
    save_file({k: v.contiguous() for k, v in ckpt.items()}, root / "model.safetensors")
    return root / "model.safetensors", root, (unet, vae, text), sd2


def oracle(path, folder):
    """diffusers' own single-file loader, offline, configs from a local folder. The text encoder has no
    public `from_single_file` (it is a transformers class): diffusers' pipeline loader calls this helper."""
    kw = dict(config=str(folder), local_files_only=True)
    unet = UNet2DConditionModel.from_single_file(str(path), subfolder="unet", **kw)
    vae = AutoencoderKL.from_single_file(str(path), subfolder="vae", **kw)
    text = create_diffusers_clip_model_from_ldm(CLIPTextModel, load_file(path), subfolder="text_encoder", **kw)
    return unet.eval(), vae.eval(), text.eval()


def ours(path, prediction_type=None):
    """Our modules, loaded from the single file by the package's loader (which calls convert.py)."""
    sd = minledits.load(path, prediction_type=prediction_type)
    return sd.unet, sd.vae, sd.text_encoder


def max_diff(a, b):
    return (a - b).abs().max().item()


def tensors(module):
    """A state dict without CLIP's `text_model.` level (ours and the Hub files have it, transformers 5 does not)."""
    return {k.removeprefix("text_model."): v for k, v in module.state_dict().items()}


def networks(sd):
    return sd.unet, sd.vae, sd.text_encoder


def assert_same_tensors(nets, other_nets):
    """(unet, vae, text encoder) hold the same keys and bit-equal tensors as `other_nets`."""
    for a, b in zip(nets, other_nets, strict=True):
        a, b = tensors(a), tensors(b)
        assert a.keys() == b.keys()
        assert not (differ := [k for k in a if not torch.equal(a[k], b[k])]), differ[:5]


# ------------------------------------------------------------------------------------------ parity
@torch.no_grad()
def test_matches_diffusers_single_file_loader(original):
    path, folder, refs, sd2 = original
    unet_o, vae_o, text_o = oracle(path, folder)
    # diffusers loads non-strictly (a key it misses would stay random): first check it read every weight,
    # which also checks the test's own mapping to the original layout
    for ref, orc in zip(refs, (unet_o, vae_o, text_o)):
        want, got = ref.state_dict(), orc.state_dict()
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    unet, vae, text = ours(path, "epsilon" if sd2 else None)
    torch.manual_seed(1)
    x, t, ctx = torch.randn(2, 4, 16, 16), torch.tensor([10, 900]), torch.randn(2, 77, 128)
    img, ids = torch.rand(1, 3, 64, 64) * 2 - 1, torch.randint(0, 1000, (2, 77))
    lat = vae_o.encode(img).latent_dist.mean
    diffs = {"unet": max_diff(unet(x, t, ctx), unet_o(x, t, encoder_hidden_states=ctx).sample),
             "vae.encode": max_diff(vae.encode(img), lat),
             "vae.decode": max_diff(vae.decode(lat), vae_o.decode(lat).sample),
             "text_encoder": max_diff(text(ids), text_o(ids).last_hidden_state)}
    print("max |ours - diffusers single-file|", "sd2" if sd2 else "sd1", diffs)
    # fp32, same weights, same operation order up to the attention kernel: differences are rounding only
    assert max(diffs.values()) < 1e-4, diffs


def test_inferred_configs_match_the_reference(original):
    path, _, (unet, vae, text), sd2 = original
    parts = convert.read_single_file(path, "epsilon" if sd2 else None)
    for ref, name in ((unet.config, "unet"), (vae.config, "vae"), (text.config.to_dict(), "text_encoder")):
        got = parts[name][0]
        for key in set(got) - {"_class_name", "architectures", "model_type", "projection_dim", "sample_size",
                               "bos_token_id", "eos_token_id", "pad_token_id"}:
            want = ref[key]
            assert got[key] == (list(want) if isinstance(want, tuple) else want), (name, key)
    assert parts["pad_id"] == (0 if sd2 else 49407)
    assert parts["scheduler"]["prediction_type"] == "epsilon"


def test_sd2_v_prediction_upcasts_attention(original):
    path, _, _, sd2 = original
    if not sd2:
        assert convert.read_single_file(path)["unet"][0]["upcast_attention"] is False
        return
    sd = minledits.load(path, dtype=torch.bfloat16, prediction_type="v_prediction")
    assert sd.unet.config["upcast_attention"] is True and sd.unet.config["sample_size"] == 96
    assert sd.schedule.config["prediction_type"] == sd.prediction_type == "v_prediction"
    assert sd.tokenizer("a")[0, -1].item() == 0  # SD2 pads with "!"
    nets = (sd.unet, sd.vae, sd.text_encoder)
    assert {p.dtype for m in nets for p in m.parameters()} == {torch.bfloat16}  # cast tensor by tensor


# ----------------------------------------------------------------------------- full-size key coverage
@pytest.mark.parametrize("kind", ["sd15", "sd21-base", "sd21"])
def test_full_size_keys_map_one_to_one(kind):
    """Every key of the full original layout maps to exactly one of our parameters (OpenCLIP's fused
    in_proj: three disjoint row ranges), none left over, shapes equal; what is ignored is exactly the extras."""
    from minledits.nets.clip import TextEncoder
    from minledits.nets.unet import UNet
    from minledits.nets.vae import VAE
    from tests import hub
    ref, sd2 = hub.build(kind, device="meta"), kind != "sd15"
    sds = [{k: v for k, v in m.state_dict().items()} for m in (ref.unet, ref.vae, ref.text_encoder)]
    ckpt = to_original(sds[0], ref.configs["unet"], sds[1], ref.configs["vae"], sds[2], sd2,
                       make=lambda shape: torch.empty(shape, device="meta"))
    shapes = {k: tuple(v.shape) for k, v in ckpt.items()}
    parts = convert.parts_from_shapes(shapes, ref.prediction_type if sd2 else None)
    used = {}
    for name, cls in (("unet", UNet), ("vae", VAE), ("text_encoder", TextEncoder)):
        config, takes = parts[name]
        with torch.device("meta"):
            mine = {k: tuple(v.shape) for k, v in cls(config).state_dict().items()}
        assert {k: t.shape(shapes) for k, t in takes.items()} == mine
        for t in takes.values():
            used.setdefault(t.key, []).append(t.rows or (0, shapes[t.key][0]))
    for key, parts_of_key in used.items():  # each original key once, or tiled exactly by row ranges
        assert sorted(parts_of_key) == [(i * shapes[key][0] // len(parts_of_key), (i + 1) * shapes[key][0] //
                                         len(parts_of_key)) for i in range(len(parts_of_key))], key
    ignored = {k for k in shapes if k not in used}
    extras = {k for k in shapes if not k.startswith(("model.diffusion_model.", "first_stage_model.",
                                                      "cond_stage_model."))}
    extras |= ({"cond_stage_model.model.text_projection", "cond_stage_model.model.logit_scale"} |
               {k for k in shapes if k.startswith("cond_stage_model.model.transformer.resblocks.23.")}) if sd2 else \
        {"cond_stage_model.transformer.text_model.embeddings.position_ids"}
    assert ignored == extras
    want = hub.configs(kind)
    unet_cfg = parts["unet"][0]
    for key in ("block_out_channels", "cross_attention_dim", "attention_head_dim", "down_block_types",
                "up_block_types", "layers_per_block", "in_channels", "sample_size"):
        assert unet_cfg[key] == want["unet"][key], key
    assert unet_cfg["use_linear_projection"] == want["unet"].get("use_linear_projection", False)
    assert unet_cfg["upcast_attention"] == want["unet"].get("upcast_attention", False)
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act"):
        assert parts["text_encoder"][0][key] == want["text_encoder"][key], key
    assert parts["vae"][0]["block_out_channels"] == want["vae"]["block_out_channels"]
    assert parts["pad_id"] == ref.pad_id and parts["scheduler"]["prediction_type"] == ref.prediction_type


def test_sd1_clip_keys_without_the_text_model_level():
    """Older SD 1.x files store `cond_stage_model.transformer.encoder...` (no `text_model.`): same result."""
    from tests import hub
    ref = hub.build("sd15", device="meta")
    sds = [m.state_dict() for m in (ref.unet, ref.vae, ref.text_encoder)]
    ckpt = to_original(sds[0], ref.configs["unet"], sds[1], ref.configs["vae"], sds[2], False,
                       make=lambda shape: torch.empty(shape, device="meta"))
    shapes = {k: tuple(v.shape) for k, v in ckpt.items()}
    old = {k.replace(".transformer.text_model.", ".transformer."): v for k, v in shapes.items()}
    new_parts, old_parts = (convert.parts_from_shapes(s)["text_encoder"] for s in (shapes, old))
    assert old_parts[0] == new_parts[0] and old_parts[1].keys() == new_parts[1].keys()
    assert all(t.key.startswith("cond_stage_model.transformer.encoder.") for k, t in old_parts[1].items()
               if ".layers." in k)


# ------------------------------------------------------- files written from a diffusers folder (23 SD2 layers)
def test_file_from_a_diffusers_folder_loads_like_the_original_file(original, tmp_path):
    """diffusers' diffusers -> original script writes the three networks only: for SD 2.x the folder's 23 text layers
    (no unused 24th, no image-text head), and the text encoder file's `position_ids`. Such a file loads to the
    reference's tensors, as the original-layout file (SD 2.x: 24 layers) does."""
    path, _, refs, sd2 = original
    unet, vae, text = refs
    text_file = {"text_model." + k: v for k, v in tensors(text).items()}
    text_file["text_model.embeddings.position_ids"] = torch.arange(77)[None]  # as in the Hub's SD 1.5 / 2.1 files
    ckpt = from_diffusers_folder(unet.state_dict(), unet.config, vae.state_dict(), vae.config, text_file, sd2)
    if sd2:
        blocks = {k.split(".")[4] for k in ckpt if k.startswith("cond_stage_model.model.transformer.resblocks.")}
        assert len(blocks) == 23 and "cond_stage_model.model.text_projection" not in ckpt
    save_file({k: v.contiguous() for k, v in ckpt.items()}, tmp_path / "converted.safetensors")
    pred = "epsilon" if sd2 else None
    converted, release = (minledits.load(p, prediction_type=pred) for p in (tmp_path / "converted.safetensors", path))
    assert converted.text_encoder.config["num_hidden_layers"] == text.config.num_hidden_layers == (23 if sd2 else 3)
    assert_same_tensors(networks(converted), refs)
    assert_same_tensors(networks(converted), networks(release))


def hub_files(ref):
    """{component: {key: tensor}} as the Hub files of `ref` store them (the text encoder's with position_ids)."""
    from tests import hub
    return {c: dict(hub.state_items(ref, c, position_ids=c == "text_encoder")) for c in ("unet", "vae", "text_encoder")}


def script_output(ref, files):
    """from_diffusers_folder for a tests/hub.py Reference and its hub_files."""
    return from_diffusers_folder(files["unet"], ref.configs["unet"], files["vae"], ref.configs["vae"],
                                 files["text_encoder"], sd2=ref.kind != "sd15")


@pytest.mark.parametrize("kind, resblocks", [("sd15", None), ("sd21-base", 23), ("sd21-base", 24)])
def test_full_size_file_from_a_diffusers_folder_reads_the_folder_tensors(kind, resblocks):
    """Shapes only (meta): in what the script writes from a full-size folder (and, SD 2.x, the same with the 24th
    layer and the head added, as the original release holds them), convert.parts_from_shapes reads each of our
    parameters from exactly the tensor the script wrote for the folder's parameter of that name (fused q/k/v: its row
    third). Our folder loader reads that name as it is, so the file loads to the folder's tensors; the test below
    loads both."""
    from tests import hub
    ref, sd2 = hub.build(kind, device="meta"), resblocks is not None
    folder = hub_files(ref)
    ckpt = script_output(ref, folder)
    if resblocks == 24:
        ckpt = tower_top(ckpt, make=lambda shape: torch.empty(shape, device="meta"))
    shapes = {k: tuple(v.shape) for k, v in ckpt.items()}
    parts = convert.parts_from_shapes(shapes, ref.prediction_type if sd2 else None)
    unet_cfg, levels = ref.configs["unet"], len(ref.configs["vae"]["block_out_channels"])
    L, up_attn = unet_cfg["layers_per_block"], ["CrossAttn" in t for t in unet_cfg["up_block_types"]]
    width = ref.configs["text_encoder"]["hidden_size"]
    want = {"unet": {k: convert.Take(convert.UNET + ldm_unet_key(k, L, up_attn)) for k in folder["unet"]},
            "vae": {k: convert.Take(convert.VAE + ldm_vae_key(k, levels), squeeze=".attentions." in k and v.ndim == 2)
                    for k, v in folder["vae"].items()},
            "text_encoder": {}}
    for k in folder["text_encoder"]:
        if k == "text_model.embeddings.position_ids":
            continue  # an arange(77); the folder's loader skips it too (load.RENAMES)
        if not sd2:
            want["text_encoder"][k] = convert.Take(convert.CLIP + k)
            continue
        name, third = ldm_openclip_key(k)
        rows = None if third is None else (third * width, (third + 1) * width)
        want["text_encoder"][k] = convert.Take(convert.OPENCLIP + name, rows)
    for part, takes in want.items():
        assert parts[part][1] == takes, part
    assert parts["text_encoder"][0]["num_hidden_layers"] == ref.configs["text_encoder"]["num_hidden_layers"]
    ignored = set(shapes) - {t.key for takes in want.values() for t in takes.values()}
    tail = (f"{convert.OPENCLIP}transformer.resblocks.23.", f"{convert.OPENCLIP}text_projection",
            f"{convert.OPENCLIP}logit_scale")
    assert ignored == {k for k in shapes if "position_ids" in k or resblocks == 24 and k.startswith(tail)}
    assert len(ignored) == (1 if resblocks != 24 else 1 + 12 + 2)


@pytest.mark.slow
def test_sd21_base_file_from_a_diffusers_folder_loads_like_the_folder(tmp_path):
    """Full size, real tensors: a random SD 2.1-base folder in the Hub layout (fp16 files, the text encoder's storing
    position_ids, as the Hub's do) and the single file the script writes from it with --half (23 text layers; the
    script casts position_ids to fp16 too) load to bit-equal tensors. Uniform random fp16 values instead of a
    network init; the files are removed at the end."""
    from tests import hub
    try:
        ref, gen = hub.build("sd21-base", device="meta"), torch.Generator().manual_seed(0)
        for m in ref.components().values():
            m.load_state_dict({k: torch.empty(v.shape, dtype=torch.float16).uniform_(-1, 1, generator=gen)
                               for k, v in m.state_dict().items()}, assign=True)
        hub.write(ref, tmp_path / "folder", fp32=False, fp16=True, position_ids=True)
        ckpt = {k: v.half() for k, v in script_output(ref, hub_files(ref)).items()}
        hub.save_safetensors(ckpt.items(), tmp_path / "sd21-base.safetensors")
        del ref, ckpt
        gc.collect()
        folder = minledits.load(tmp_path / "folder", dtype=torch.float16)
        single = minledits.load(tmp_path / "sd21-base.safetensors", dtype=torch.float16, prediction_type="epsilon")
        assert len(single.text_encoder.text_model.encoder.layers) == 23
        assert_same_tensors(networks(single), networks(folder))
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)


def test_skipped_keys_are_reported_at_debug_level_only(original, caplog):
    path, _, _, sd2 = original
    with caplog.at_level(logging.DEBUG, logger="minledits.io.convert"):
        convert.read_single_file(path, "epsilon" if sd2 else None)
    assert [r.levelno for r in caplog.records] == [logging.DEBUG]
    assert "model_ema" in caplog.text and "alphas_cumprod" in caplog.text and "cond_stage_model" in caplog.text


# ------------------------------------------------------------------------------------------- errors
def one_line_error(path, match, prediction_type=None):
    """minledits.load (the user's entry point) refuses `path` with one line matching `match`."""
    with pytest.raises(LoadError, match=match) as e:
        minledits.load(path, prediction_type=prediction_type)
    assert "\n" not in str(e.value)
    return e.value


def test_refuses_pickle_checkpoints(tmp_path):
    (tmp_path / "model.ckpt").write_bytes(b"\x80\x02}q\x00.")
    one_line_error(tmp_path / "model.ckpt", "pickle")


def test_refuses_files_that_are_not_checkpoints(tmp_path):
    (tmp_path / "notes.safetensors").write_text("not a tensor file\n" * 3)
    one_line_error(tmp_path / "notes.safetensors", "not a readable safetensors file")
    one_line_error(tmp_path / "missing.safetensors", "does not exist")
    save_file({"foo": torch.randn(3)}, tmp_path / "random.safetensors")
    e = one_line_error(tmp_path / "random.safetensors", "not an original Stable Diffusion checkpoint")
    assert isinstance(e, convert.SingleFileError)
    unet = UNet2DConditionModel(**tiny_configs(False)[0])  # a diffusers-layout unet file
    save_file(unet.state_dict(), tmp_path / "diffusion_pytorch_model.safetensors")
    one_line_error(tmp_path / "diffusion_pytorch_model.safetensors", "model folder")


@pytest.mark.parametrize("original", ["sd2"], indirect=True)
def test_sd2_text_layer_counts_other_than_23_or_24_are_refused(original, tmp_path):
    """SD 2.x stops at OpenCLIP ViT-H's 23rd of 24 layers; with another count, where to stop is not in the file."""
    path = original[0]
    ckpt, pre = load_file(path), "cond_stage_model.model.transformer.resblocks."
    for n in (22, 25):
        blocks = {k: v for k, v in ckpt.items() if not k.startswith(pre) or int(k.split(".")[4]) < n}
        blocks |= {k.replace(f"{pre}0.", f"{pre}{i}."): v.clone() for k, v in ckpt.items() if k.startswith(f"{pre}0.")
                   for i in range(24, n)}
        save_file(blocks, tmp_path / f"{n}.safetensors")
        e = one_line_error(tmp_path / f"{n}.safetensors", rf"has {n} SD 2\.x text encoder layers .*uses 23, .* a file "
                           r"holds 24 \(the original release, the last one unused\) or 23 \(written from a diffusers "
                           r"folder\)", "epsilon")
        assert isinstance(e, convert.SingleFileError)


def test_sd2_needs_a_prediction_type(original):
    path, _, _, sd2 = original
    one_line_error(path, "prediction type", "sample")
    if sd2:
        one_line_error(path, r"--prediction-type .* epsilon .* or v_prediction")
    else:
        assert minledits.load(path).prediction_type == "epsilon"


def test_cli_edits_a_single_file_end_to_end(original, tmp_path):
    """invert + edit from the command line on an original-format file (SD2: v-prediction, pad id 0), equal to the
    Python API; an SD2 file without --prediction-type stops with one line before any work."""
    import numpy as np
    from PIL import Image

    from minledits import cli
    path, _, _, sd2 = original
    photo, inv, out = tmp_path / "photo.png", tmp_path / "inv.safetensors", tmp_path / "edit.png"
    Image.fromarray(np.arange(64 * 64 * 3, dtype=np.uint8).reshape(64, 64, 3)).save(photo)
    pred = ["--prediction-type", "v_prediction"] if sd2 else []
    common = ["--model", str(path), "--steps", "6", "--skip", "2", "--size", "64", "-q"]
    if sd2:
        assert cli.main(["invert", str(photo), "-o", str(inv), *common]) == 1 and not inv.exists()
    assert cli.main(["invert", str(photo), "-o", str(inv), *common, *pred, "--source-prompt", "a photo"]) == 0
    assert cli.main(["edit", str(inv), "--model", str(path), "-o", str(out), "-e", "glasses", "-e", "-beard",
                     *pred]) == 0
    sd = minledits.load(path, prediction_type="v_prediction" if sd2 else None)
    w0 = minledits.edit(sd, minledits.invert(sd, photo, source_prompt="a photo", steps=6, skip=2, size=64),
                        concepts=["glasses", "-beard"])
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(minledits.decode(sd, w0)))

"""Original (LDM / CompVis / Stability generative-models) single-file Stable Diffusion checkpoints -> our modules.

A file such as `v1-5-pruned-emaonly.safetensors`, `v2-1_512-ema-pruned.safetensors` or
`sd_xl_base_1.0.safetensors` holds the networks of the original training code under these prefixes:

    model.diffusion_model.                      UNet            LDM `openaimodel.UNetModel` names
    first_stage_model.                          VAE             LDM `AutoencoderKL` names
    cond_stage_model.transformer.               SD 1.x text     already Hugging Face CLIP names
    cond_stage_model.model.                     SD 2.x text     OpenCLIP names
    conditioner.embedders.0.transformer.        SDXL text       Hugging Face CLIP names (CLIP ViT-L)
    conditioner.embedders.1.model.              SDXL text_2     OpenCLIP names (ViT-bigG, all 32 layers used)

Anything else (EMA copies `model_ema.*`, the training schedule `betas`, `alphas_cumprod`, ...) is not needed
and skipped. Our modules carry diffusers / transformers names (docs/design.md §6), so converting is renaming, plus:
  * OpenCLIP fuses q, k, v into `attn.in_proj_weight` [3D, D]: its row thirds become q_proj, k_proj, v_proj;
  * the VAE mid-block attention uses 1x1 convs [C, C, 1, 1]: squeezed to linear matrices [C, C];
  * SDXL's UNet adds `label_emb.0.0` / `.0.2` (add_embedding.linear_1 / _2); OpenCLIP's `text_projection` is
    applied as x @ P, so our Linear weight is P transposed;
  * SD 2.x conditions on the *penultimate* layer of the 24-layer OpenCLIP ViT-H/14, so our text encoder has 23
    layers. The original files hold all 24 resblocks (the 24th, `text_projection` and `logit_scale` are dropped);
    files written from a diffusers folder (diffusers' scripts/convert_diffusers_to_original_stable_diffusion.py) hold
    the folder's 23, all kept. Any other count is refused: the layer to stop at is not in the file.
No key table is written out: per network, a few lines generate the *block* names from the network's shape
(levels, layers per block), and a short table renames what sits *inside* a block.
The configs are inferred from tensor shapes; `parts_from_shapes()` works on shapes alone, `read_single_file()` adds
lazy tensor-by-tensor getters over one open file.
"""
import logging
from collections import Counter
from functools import partial
from typing import NamedTuple

from safetensors import safe_open

from ..errors import SingleFileError, shorten
from ..nets.tokenizer import SD1_PAD_ID, SD2_PAD_ID
from ..schedule import SCHEDULER_DEFAULTS
from .files import refuse_pickle, require_regular

log = logging.getLogger(__name__)

UNET, VAE = "model.diffusion_model.", "first_stage_model."
CLIP, OPENCLIP = "cond_stage_model.transformer.", "cond_stage_model.model."
XL_CLIP, XL_OPENCLIP = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."
XL_SCALING_FACTOR = 0.13025  # SDXL's VAE (sdxl_vae's config); SD 1.x / 2.x: 0.18215
PREDICTION_TYPES = ("epsilon", "v_prediction")


class Take(NamedTuple):
    """Where one of our parameters comes from: an original key, maybe a row range of it or a squeezed kernel."""
    key: str
    rows: tuple[int, int] | None = None  # part of a fused tensor (OpenCLIP in_proj -> q, k, v)
    squeeze: bool = False                # 1x1 conv kernel [C, C, 1, 1] -> linear matrix [C, C]
    transpose: bool = False              # OpenCLIP's text_projection P (x @ P) -> Linear weight P^T

    def shape(self, shapes) -> tuple:
        shape = (self.rows[1] - self.rows[0], *shapes[self.key][1:]) if self.rows else tuple(shapes[self.key])
        return shape[:2] if self.squeeze else shape[::-1] if self.transpose else shape

    def read(self, f):
        """The tensor from an open `safe_open` file; only the rows needed are read."""
        x = f.get_slice(self.key)[self.rows[0]:self.rows[1]] if self.rows else f.get_tensor(self.key)
        return x.reshape(x.shape[:2]) if self.squeeze else x.T.contiguous() if self.transpose else x


def _rename(key: str, blocks: dict, inner: dict | None = None) -> str:
    """Replace the longest dotted prefix of `key` found in `blocks`; rename the rest's start by `inner`."""
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        if (head := ".".join(parts[:n])) in blocks:
            rest = _rename(".".join(parts[n:]), inner) if inner else ".".join(parts[n:])
            return blocks[head] + ("." + rest if rest else "")
    return key


def _under(shapes, prefix: str) -> dict:
    """The keys under `prefix`, prefix removed, with their shapes."""
    return {k[len(prefix):]: tuple(s) for k, s in shapes.items() if k.startswith(prefix)}


# ---------------------------------------------------------------------------------------------- UNet
# LDM lists the UNet flatly. With L = layers per block and n levels (SD: L = 2, n = 4):
#   input_blocks.0.0                     conv_in
#   input_blocks.(1 + i(L+1) + j).0 / .1 down_blocks.i.resnets.j / .attentions.j      j < L
#   input_blocks.((i+1)(L+1)).0.op       down_blocks.i.downsamplers.0.conv            all but the last level
#   middle_block.0 / .1 / .2             mid_block.resnets.0 / attentions.0 / resnets.1
#   output_blocks.(i(L+1) + j).0 / .1    up_blocks.i.resnets.j / .attentions.j        j <= L
#   output_blocks.(i(L+1) + L).1|2.conv  up_blocks.i.upsamplers.0.conv  (.2 after an attention)
#   time_embed.0 / .2, out.0 / .2        time_embedding.linear_1 / 2, conv_norm_out / conv_out
# Attention blocks (SpatialTransformer) already use the diffusers names inside; resnets do not:
UNET_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
               "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}


def _unet_blocks(levels: int, L: int, attn_down: list, attn_up: list) -> dict:
    b = {"input_blocks.0.0": "conv_in", "time_embed.0": "time_embedding.linear_1",
         "time_embed.2": "time_embedding.linear_2", "out.0": "conv_norm_out", "out.2": "conv_out",
         "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",  # SDXL
         "middle_block.0": "mid_block.resnets.0", "middle_block.1": "mid_block.attentions.0",
         "middle_block.2": "mid_block.resnets.1"}
    for i in range(levels):
        for j in range(L):
            b[f"input_blocks.{1 + i * (L + 1) + j}.0"] = f"down_blocks.{i}.resnets.{j}"
            b[f"input_blocks.{1 + i * (L + 1) + j}.1"] = f"down_blocks.{i}.attentions.{j}"
        for j in range(L + 1):
            b[f"output_blocks.{i * (L + 1) + j}.0"] = f"up_blocks.{i}.resnets.{j}"
            if attn_up[i]:
                b[f"output_blocks.{i * (L + 1) + j}.1"] = f"up_blocks.{i}.attentions.{j}"
        if i < levels - 1:
            b[f"input_blocks.{(i + 1) * (L + 1)}.0.op"] = f"down_blocks.{i}.downsamplers.0.conv"
            b[f"output_blocks.{i * (L + 1) + L}.{1 + attn_up[i]}.conv"] = f"up_blocks.{i}.upsamplers.0.conv"
    return b


def _depth(s, block: str) -> int:
    """The number of transformer blocks in one LDM attention block (SpatialTransformer)."""
    return len({k.split(".")[block.count(".") + 2] for k in s if k.startswith(block + ".transformer_blocks.")})


def _unet(shapes, family: str, prediction_type: str):
    s = _under(shapes, UNET)
    n_in = len({k.split(".")[1] for k in s if k.startswith("input_blocks.")})
    levels = 1 + sum(k.startswith("input_blocks.") and k.endswith(".0.op.weight") for k in s)
    L = (n_in - levels) // levels
    first = [1 + i * (L + 1) for i in range(levels)]  # the first input block of each level
    attn_down = [f"input_blocks.{n}.1.proj_in.weight" in s for n in first]
    attn_up = [f"output_blocks.{i * (L + 1)}.1.proj_in.weight" in s for i in range(levels)]
    channels = [s[f"input_blocks.{n}.0.out_layers.3.weight"][0] for n in first]
    v768 = family == "sd2" and prediction_type == "v_prediction"
    config = {
        "_class_name": "UNet2DConditionModel", "sample_size": 96 if v768 else 64,
        "in_channels": s["input_blocks.0.0.weight"][1], "out_channels": s["out.2.weight"][0],
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn_down],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in attn_up],
        "block_out_channels": channels, "layers_per_block": L,
        "cross_attention_dim": s["middle_block.1.transformer_blocks.0.attn2.to_k.weight"][1],
        # `attention_head_dim` holds the NUMBER of heads (a diffusers naming quirk): SD1 has 8 heads
        # everywhere; SD2 and SDXL heads of size 64, i.e. [5, 10, 20, 20] for channels [320, 640, 1280, 1280].
        "attention_head_dim": [c // 64 for c in channels] if family != "sd1" else 8,
        "use_linear_projection": len(s["middle_block.1.proj_in.weight"]) == 2,  # SD2, XL: Linear; SD1: 1x1 conv
        # The diffusers SD 2.1 (768, v-prediction) config computes attention scores in fp32; we apply it to
        # every SD2 v-prediction file (2.0-v included: upcasting only makes fp16 safer).
        "upcast_attention": v768,
        "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5, "flip_sin_to_cos": True, "freq_shift": 0,
        "downsample_padding": 1, "mid_block_scale_factor": 1, "center_input_sample": False,
    }
    if family == "sdxl":
        config.update(_xl_unet(s, shapes, [_depth(s, f"input_blocks.{n}.1") if a else 1
                                           for n, a in zip(first, attn_down)]))
    blocks = _unet_blocks(levels, L, attn_down, attn_up)
    return config, {_rename(k, blocks, UNET_RESNET): Take(UNET + k) for k in s}


def _xl_unet(s, shapes, depth: list) -> dict:
    """SDXL's UNet entries: transformer depth per level (1 where a level has no attention, as SDXL's config says),
    the text_time conditioning [pooled text, six sinusoids]: its width minus the pooled width, over 6."""
    pooled = shapes[XL_OPENCLIP + "text_projection"][1]
    width = s["label_emb.0.0.weight"][1]
    if (width - pooled) % 6 or _depth(s, "middle_block.1") != depth[-1]:
        raise SingleFileError(f"the SDXL UNet's add_embedding ({width} wide, text {pooled}) or mid-block depth "
                              "is not SDXL's layout")
    return {"transformer_layers_per_block": depth, "addition_embed_type": "text_time",
            "addition_time_embed_dim": (width - pooled) // 6, "projection_class_embeddings_input_dim": width,
            "sample_size": 128, "upcast_attention": False}


# ----------------------------------------------------------------------------------------------- VAE
# encoder.down.i.block.j / .downsample   encoder.down_blocks.i.resnets.j / .downsamplers.0
# decoder.up.i.block.j / .upsample       decoder.up_blocks.(n-1-i).resnets.j / .upsamplers.0
#                                        (LDM counts decoder levels from the lowest resolution up; diffusers
#                                         counts them in the order they run, i.e. reversed)
# mid.block_1 / attn_1 / block_2, norm_out   mid_block.resnets.0 / attentions.0 / resnets.1, conv_norm_out
# conv_in, conv_out, quant_conv, post_quant_conv: same names. Inside a resnet only nin_shortcut differs;
# inside attn_1 every name does (and q, k, v, proj_out are 1x1 convs, squeezed to linears):
VAE_INNER = {"nin_shortcut": "conv_shortcut",
             "norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _vae(shapes, family: str = "sd1"):
    s = _under(shapes, VAE)
    levels = len({k.split(".")[2] for k in s if k.startswith("encoder.down.")})
    L = len({k.split(".")[4] for k in s if k.startswith("encoder.down.0.block.")})
    blocks = {f"{part}.{a}": f"{part}.{b}" for part in ("encoder", "decoder") for a, b in (
        ("mid.block_1", "mid_block.resnets.0"), ("mid.attn_1", "mid_block.attentions.0"),
        ("mid.block_2", "mid_block.resnets.1"), ("norm_out", "conv_norm_out"))}
    for i in range(levels):
        blocks[f"encoder.down.{i}.downsample"] = f"encoder.down_blocks.{i}.downsamplers.0"
        blocks[f"decoder.up.{i}.upsample"] = f"decoder.up_blocks.{levels - 1 - i}.upsamplers.0"
        blocks |= {f"encoder.down.{i}.block.{j}": f"encoder.down_blocks.{i}.resnets.{j}" for j in range(L)}
        blocks |= {f"decoder.up.{i}.block.{j}": f"decoder.up_blocks.{levels - 1 - i}.resnets.{j}"
                   for j in range(L + 1)}
    config = {
        "_class_name": "AutoencoderKL", "in_channels": s["encoder.conv_in.weight"][1],
        "out_channels": s["decoder.conv_out.weight"][0], "latent_channels": s["post_quant_conv.weight"][0],
        "block_out_channels": [s[f"encoder.down.{i}.block.0.conv1.weight"][0] for i in range(levels)],
        "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
        "layers_per_block": L, "act_fn": "silu", "norm_num_groups": 32, "sample_size": 512,
        "scaling_factor": 0.18215,
    }
    if family == "sdxl":  # SDXL's VAE overflows in fp16 (force_upcast: decode in fp32)
        config.update(scaling_factor=XL_SCALING_FACTOR, force_upcast=True, sample_size=1024)
    takes = {_rename(k, blocks, VAE_INNER): Take(VAE + k, squeeze=".attn_1." in k and len(shape) == 4)
             for k, shape in s.items()}
    return config, takes


# ------------------------------------------------------------------------------------- text encoders
def _clip_config(width: int, vocab: int, positions: int, layers: int, ff: int, sd2: bool) -> dict:
    """text_encoder/config.json (transformers' CLIPTextConfig) for these shapes."""
    return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "hidden_size": width,
            "intermediate_size": ff, "num_hidden_layers": layers,
            "num_attention_heads": width // 64,  # heads of size 64 in both CLIP ViT-L/14 and OpenCLIP ViT-H/14
            "max_position_embeddings": positions, "vocab_size": vocab, "layer_norm_eps": 1e-5,
            "hidden_act": "gelu" if sd2 else "quick_gelu", "projection_dim": 512 if sd2 else 768,
            "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1}


def _clip(shapes, prefix: str = CLIP):
    """SD 1.x, SDXL's first: Hugging Face CLIP names already; older files lack the `text_model.` level, so add it."""
    s = _under(shapes, prefix)
    ours = {k if k.startswith("text_model.") else "text_model." + k: Take(prefix + k) for k in s}
    ours.pop("text_model.embeddings.position_ids", None)  # a stored arange(77); ours is built in
    shape = {k.removeprefix("text_model."): t.shape(shapes) for k, t in ours.items()}
    layers = len({k.split(".")[2] for k in shape if k.startswith("encoder.layers.")})
    vocab, width = shape["embeddings.token_embedding.weight"]
    return _clip_config(width, vocab, shape["embeddings.position_embedding.weight"][0], layers,
                        shape["encoder.layers.0.mlp.fc1.weight"][0], sd2=False), ours


# OpenCLIP -> transformers. Blocks: token_embedding, positional_embedding (a bare Parameter), ln_final and
# transformer.resblocks.N -> text_model.encoder.layers.N; inside a resblock (attn.in_proj_* are split below):
OPENCLIP_INNER = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
                  "attn.out_proj": "self_attn.out_proj"}


# SD 2.x runs the OpenCLIP ViT-H/14 text tower (24 resblocks) up to its penultimate layer: 23 layers. A file holds
# either the whole tower (the LDM code stores it; the 24th resblock is never run) or, written from a diffusers
# folder, only the 23 used. The count alone tells which; another count does not say where SD 2.x stops.
SD2_TEXT_LAYERS = 23
# not used: CLIP's image-text head; a causal mask buffer; the `position_ids` arange of a diffusers text encoder,
# which the diffusers -> original script leaves under this name (it renames nothing else of the embeddings)
OPENCLIP_SKIP = ("text_projection", "logit_scale", "attn_mask", "transformer.text_model.embeddings.position_ids")


def _openclip(shapes, source: str):
    s = _under(shapes, OPENCLIP)
    found = len({k.split(".")[2] for k in s if k.startswith("transformer.resblocks.")})
    if found not in (SD2_TEXT_LAYERS, SD2_TEXT_LAYERS + 1):
        raise SingleFileError(
            f"{source} has {found} SD 2.x text encoder layers ('{OPENCLIP}transformer.resblocks.*'); SD 2.x uses "
            f"{SD2_TEXT_LAYERS}, the penultimate of OpenCLIP ViT-H/14's {SD2_TEXT_LAYERS + 1}, so a file holds "
            f"{SD2_TEXT_LAYERS + 1} (the original release, the last one unused) or {SD2_TEXT_LAYERS} (written from a "
            "diffusers folder)")
    return _openclip_tower(s, OPENCLIP, SD2_TEXT_LAYERS)


def _openclip_xl(shapes):
    """SDXL's OpenCLIP ViT-bigG: every layer (SDXL takes the penultimate hidden state, diffusers keeps all 32)
    and text_projection, stored as P for x @ P: our Linear holds P^T."""
    s = _under(shapes, XL_OPENCLIP)
    layers = len({k.split(".")[2] for k in s if k.startswith("transformer.resblocks.")})
    config, ours = _openclip_tower(s, XL_OPENCLIP, layers)
    config.update(architectures=["CLIPTextModelWithProjection"], projection_dim=s["text_projection"][1])
    return config, ours | {"text_projection.weight": Take(XL_OPENCLIP + "text_projection", transpose=True)}


def _openclip_tower(s, prefix: str, layers: int):
    """Config and takes of an OpenCLIP text tower's first `layers` resblocks (s: shapes under `prefix`)."""
    width = s["token_embedding.weight"][1]
    blocks = {"token_embedding": "text_model.embeddings.token_embedding", "ln_final": "text_model.final_layer_norm",
              "positional_embedding": "text_model.embeddings.position_embedding.weight"}
    blocks |= {f"transformer.resblocks.{n}": f"text_model.encoder.layers.{n}" for n in range(layers)}
    ours = {}
    for k in s:
        if k in OPENCLIP_SKIP or k.startswith(f"transformer.resblocks.{layers}."):
            continue  # what is not used (above) and the last layer of SD2's 24-layer tower
        name = _rename(k, blocks, OPENCLIP_INNER)
        if k.endswith((".attn.in_proj_weight", ".attn.in_proj_bias")):  # rows [q; k; v], `width` each
            layer, kind = name[:name.index(".attn.")], k.rsplit("_", 1)[1]
            ours |= {f"{layer}.self_attn.{x}_proj.{kind}": Take(prefix + k, rows=(i * width, (i + 1) * width))
                     for i, x in enumerate("qkv")}
        else:
            ours[name] = Take(prefix + k)
    config = _clip_config(width, s["token_embedding.weight"][0], s["positional_embedding"][0], layers,
                          s["transformer.resblocks.0.mlp.c_fc.weight"][0], sd2=True)
    return config, ours


# ------------------------------------------------------------------------------------------ the file
def _family(shapes, source: str) -> str:
    """"sd1", "sd2" or "sdxl" (by the text encoders' prefixes); raise for anything else."""
    if not any(k.startswith(UNET) for k in shapes):
        raise SingleFileError(f"{source} is not an original Stable Diffusion checkpoint (no '{UNET}*' keys); "
                              "a diffusers-layout file is loaded with its model folder")
    if not any(k.startswith(VAE) for k in shapes):
        raise SingleFileError(f"{source} has no VAE ('{VAE}*' keys); only complete SD 1.x / 2.x / XL checkpoints load")
    if XL_OPENCLIP + "token_embedding.weight" in shapes and any(k.startswith(XL_CLIP) for k in shapes):
        return "sdxl"
    if OPENCLIP + "token_embedding.weight" in shapes:
        return "sd2"
    if any(k.startswith(CLIP) for k in shapes):
        return "sd1"
    raise SingleFileError(f"{source} has no SD 1.x / 2.x / XL base text encoders ('{CLIP}*', '{OPENCLIP}*', or "
                          f"'{XL_CLIP}*' with '{XL_OPENCLIP}*'); other model families (e.g. the SDXL refiner) "
                          "are not supported")


def _prediction(sd2: bool, prediction_type: str | None, source: str) -> str:
    """SD 1.x and SDXL base predict eps. SD 2.x comes as eps (2.x-base, 512 px) and v (768 px), identical tensors."""
    if prediction_type is None and sd2:
        raise SingleFileError(f"{source} is an SD 2.x checkpoint, whose prediction type cannot be read from the "
                              "weights: pass --prediction-type (Python: prediction_type=) epsilon for 2.x-base "
                              "(512 px) or v_prediction for the 768 px models")
    if prediction_type not in (None,) + PREDICTION_TYPES:
        raise SingleFileError(f"prediction type {shorten(prediction_type)} is not one of {', '.join(PREDICTION_TYPES)}")
    return prediction_type or "epsilon"


def parts_from_shapes(shapes, prediction_type: str | None = None, source: str = "checkpoint") -> dict:
    """From {original key: shape}: per component (config, {our key: Take}), the scheduler config, pad ids, family
    ("networks": the components present; SDXL adds text_encoder_2 and pad_id_2)."""
    family = _family(shapes, source)
    prediction_type = _prediction(family == "sd2", prediction_type, source)
    text = {"sd1": lambda: _clip(shapes), "sd2": lambda: _openclip(shapes, source),
            "sdxl": lambda: _clip(shapes, XL_CLIP)}[family]
    try:
        out = {"unet": _unet(shapes, family, prediction_type), "vae": _vae(shapes, family), "text_encoder": text()}
        if family == "sdxl":
            out["text_encoder_2"] = _openclip_xl(shapes)
    except (KeyError, ZeroDivisionError) as e:  # a tensor the shapes are read from is missing
        raise SingleFileError(f"{source} does not have the {family} layout (missing {e})") from None
    networks = [c for c in ("unet", "vae", "text_encoder", "text_encoder_2") if c in out]
    out |= {"scheduler": SCHEDULER_DEFAULTS | {"prediction_type": prediction_type}, "prediction_type": prediction_type,
            "pad_id": SD2_PAD_ID if family == "sd2" else SD1_PAD_ID,  # SD2 pads with "!", SD1 with <|endoftext|>
            "pad_id_2": SD2_PAD_ID, "sd2": family == "sd2", "family": family, "networks": networks}
    used = {t.key for part in networks for t in out[part][1].values()}
    inside = [k for k in shapes if k not in used and k.startswith((UNET, VAE, "cond_stage_model.", "conditioner."))]
    outside = Counter(k.split(".")[0] for k in shapes if k not in used and k not in inside)
    log.debug("%s: skipped, not needed for inference: %s; keys by first name: %s", source, inside, dict(outside))
    return out


def read_single_file(path, prediction_type: str | None = None) -> dict:
    """`parts_from_shapes()` for a file, each Take turned into a lazy getter over one open file (low memory)."""
    path = require_regular(path, "the checkpoint", SingleFileError)
    refuse_pickle(path)
    try:
        f = safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:  # a text file, a truncated download, ...
        raise SingleFileError(f"{path} is not a readable safetensors file ({e})") from None
    shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    out = parts_from_shapes(shapes, prediction_type, str(path))
    for part in out["networks"]:
        config, takes = out[part]
        out[part] = config, {name: partial(take.read, f) for name, take in takes.items()}
    return out

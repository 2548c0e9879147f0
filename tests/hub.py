"""Random-initialised reference models written in the official Hub (diffusers) layout.

The tests never download weights. This module builds the *reference* implementations (diffusers
``UNet2DConditionModel`` and ``AutoencoderKL``, transformers ``CLIPTextModel``) with seeded random
weights and writes them exactly as the Hub repos are laid out::

    model_index.json
    unet/config.json          unet/diffusion_pytorch_model[.fp16].safetensors
    vae/config.json           vae/diffusion_pytorch_model[.fp16].safetensors
    text_encoder/config.json  text_encoder/model[.fp16].safetensors      (keys ``text_model.``-prefixed)
    tokenizer/{vocab.json, merges.txt, special_tokens_map.json, tokenizer_config.json}
    scheduler/scheduler_config.json

Kinds (see ``KINDS``):
    tiny-sd1    SD1-style: conv proj_in/out, one head count for all blocks, quick_gelu CLIP, pads with 49407
    tiny-sd2    SD2-style: linear proj, per-block head list, gelu CLIP, pads with id 0 (pad_token "!")
    tiny-sd2v   tiny-sd2 + upcast_attention + v_prediction
    tiny-vae2   tiny-sd1 with the 2-level VAE of diffusers' own tiny test pipelines (latent = image / 2)
    sd15, sd21-base, sd21   the official full-size configs (as on the Hub)
    tiny-sdxl   SDXL-shaped: 3 levels (no attention at the first, then 1 and 2 transformer layers), text_time,
                two text encoders (CLIPTextModel + CLIPTextModelWithProjection, widths 32 + 32 -> context 64),
                tokenizer/ pads with 49407, tokenizer_2/ with "!", VAE scaling 0.13025 with force_upcast
    sdxl        stabilityai/stable-diffusion-xl-base-1.0's configs (build on meta only: 10 GB in fp32)

Usage::

    ref = hub.make("tiny-sd1", tmp_path / "m")        # build + write; ref.folder is the model folder
    ref.unet, ref.vae, ref.text_encoder               # the reference modules (fp32, eval mode)
    ref.configs["unet"], ref.scheduler_config         # the dicts written to the config files
    hub.build("sd15", device="meta")                  # reference modules only, instant, no weights

Full-size kinds are written tensor by tensor (``save_safetensors``), so writing the 3.4 GB SD 1.5
UNet costs no second copy of the weights in memory.
"""
from __future__ import annotations

import copy
import gzip
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch

KINDS = ("tiny-sd1", "tiny-sd2", "tiny-sd2v", "sd15", "sd21-base", "sd21", "tiny-sdxl", "sdxl", "tiny-vae2")
XL_KINDS = ("tiny-sdxl", "sdxl")
TINY_KINDS = KINDS[:3]
BPE_GZ = Path(__file__).resolve().parents[1] / "minledits" / "nets" / "bpe_simple_vocab_16e6.txt.gz"
N_MERGES = 49152 - 256 - 2  # 48,894 merges: lines 1..48894 of the open_clip file
BOS, EOS = "<|startoftext|>", "<|endoftext|>"

# --------------------------------------------------------------------------------------------- configs
_DOWN = ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
_UP = ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
_SCHEDULER = {
    "_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0",
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "trained_betas": None, "steps_offset": 1, "set_alpha_to_one": False, "clip_sample": False,
    "prediction_type": "epsilon",
}
_SD15 = {
    "unet": {
        "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu",
        "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
        "cross_attention_dim": 768, "down_block_types": _DOWN, "downsample_padding": 1, "flip_sin_to_cos": True,
        "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05,
        "norm_num_groups": 32, "out_channels": 4, "sample_size": 64, "up_block_types": _UP,
    },
    "vae": {
        "_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0", "act_fn": "silu",
        "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
        "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3,
        "sample_size": 512, "up_block_types": ["UpDecoderBlock2D"] * 4,
    },
    "text_encoder": {
        "architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0,
        "eos_token_id": 2, "hidden_act": "quick_gelu", "hidden_size": 768, "initializer_factor": 1.0,
        "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05,
        "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": 12,
        "num_hidden_layers": 12, "pad_token_id": 1, "projection_dim": 768, "torch_dtype": "float32",
        "transformers_version": "4.22.0.dev0", "vocab_size": 49408,
    },
    "scheduler": _SCHEDULER,
    "pad_token": EOS,
}


def _sd21_base() -> dict:
    c = copy.deepcopy(_SD15)
    c["unet"].update(_diffusers_version="0.10.0.dev0", attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024,
                     dual_cross_attention=False, use_linear_projection=True, upcast_attention=False,
                     num_class_embeds=None, only_cross_attention=False, resnet_time_scale_shift="default")
    c["vae"].update(_diffusers_version="0.10.0.dev0", sample_size=768)
    c["text_encoder"].update(hidden_act="gelu", hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                             num_hidden_layers=23, projection_dim=512, transformers_version="4.25.0.dev0")
    c["pad_token"] = "!"
    return c


def _sd21() -> dict:
    c = _sd21_base()
    c["unet"].update(upcast_attention=True, sample_size=96)
    c["scheduler"] = dict(c["scheduler"], prediction_type="v_prediction")
    return c


def _tiny(c: dict) -> dict:
    """Shrink a full config: 2-level UNet, 4-level VAE (latent = image / 8), 2-layer CLIP of width 32."""
    c = copy.deepcopy(c)
    c["unet"].update(block_out_channels=[32, 64], layers_per_block=2, norm_num_groups=8, sample_size=8,
                     down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                     up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=32)
    c["vae"].update(block_out_channels=[32, 32, 64, 64], layers_per_block=1, norm_num_groups=8, sample_size=64)
    c["text_encoder"].update(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                             projection_dim=32)
    return c


_SDXL_TEXT_2 = {
    "architectures": ["CLIPTextModelWithProjection"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0,
    "eos_token_id": 2, "hidden_act": "gelu", "hidden_size": 1280, "initializer_factor": 1.0, "initializer_range": 0.02,
    "intermediate_size": 5120, "layer_norm_eps": 1e-05, "max_position_embeddings": 77, "model_type": "clip_text_model",
    "num_attention_heads": 20, "num_hidden_layers": 32, "pad_token_id": 1, "projection_dim": 1280,
    "torch_dtype": "float16", "transformers_version": "4.32.0.dev0", "vocab_size": 49408,
}


def _sdxl() -> dict:
    """stabilityai/stable-diffusion-xl-base-1.0 (its config files as on the Hub)."""
    c = copy.deepcopy(_SD15)
    c["unet"] = {
        "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.19.0.dev0", "act_fn": "silu",
        "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256,
        "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280], "center_input_sample": False,
        "class_embed_type": None, "class_embeddings_concat": False, "conv_in_kernel": 3, "conv_out_kernel": 3,
        "cross_attention_dim": 2048, "cross_attention_norm": None,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "downsample_padding": 1,
        "dual_cross_attention": False, "encoder_hid_dim": None, "encoder_hid_dim_type": None, "flip_sin_to_cos": True,
        "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_only_cross_attention": None,
        "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05,
        "norm_num_groups": 32, "num_attention_heads": None, "num_class_embeds": None, "only_cross_attention": False,
        "out_channels": 4, "projection_class_embeddings_input_dim": 2816, "resnet_out_scale_factor": 1.0,
        "resnet_skip_time_act": False, "resnet_time_scale_shift": "default", "sample_size": 128,
        "time_cond_proj_dim": None, "time_embedding_act_fn": None, "time_embedding_dim": None,
        "time_embedding_type": "positional", "timestep_post_act": None, "transformer_layers_per_block": [1, 2, 10],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "upcast_attention": None,
        "use_linear_projection": True,
    }
    c["vae"].update(_diffusers_version="0.20.0.dev0", force_upcast=True, sample_size=1024, scaling_factor=0.13025)
    c["text_encoder"].update(transformers_version="4.32.0.dev0", torch_dtype="float16")
    c["text_encoder_2"] = copy.deepcopy(_SDXL_TEXT_2)
    c["scheduler"] = {
        "_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.19.0.dev0", "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear",
        "num_train_timesteps": 1000, "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False,
        "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None,
        "use_karras_sigmas": False}
    c["pad_token_2"] = "!"
    c["force_zeros_for_empty_prompt"] = True
    return c


def _tiny_sdxl() -> dict:
    c = _sdxl()
    c["unet"].update(block_out_channels=[32, 64, 64], attention_head_dim=[2, 4, 4], norm_num_groups=8,
                     transformer_layers_per_block=[1, 1, 2], cross_attention_dim=64, addition_time_embed_dim=8,
                     projection_class_embeddings_input_dim=16 + 6 * 8, sample_size=8)
    c["vae"].update(block_out_channels=[32, 32, 64, 64], layers_per_block=1, norm_num_groups=8, sample_size=64)
    c["text_encoder"].update(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                             projection_dim=32)
    c["text_encoder_2"].update(hidden_size=32, intermediate_size=48, num_attention_heads=2, num_hidden_layers=3,
                               projection_dim=16)
    return c


def configs(kind: str) -> dict:
    """Config dicts {unet, vae, text_encoder, scheduler, pad_token} for ``kind``, as in the Hub files."""
    if kind == "sd15":
        return copy.deepcopy(_SD15)
    if kind == "sd21-base":
        return _sd21_base()
    if kind == "sd21":
        return _sd21()
    if kind == "sdxl":
        return _sdxl()
    if kind == "tiny-sdxl":
        return _tiny_sdxl()
    if kind == "tiny-sd1":
        return _tiny(_SD15)  # 4 heads in every block (head size 8 then 16)
    if kind == "tiny-vae2":  # one downsampling: each latent pixel is 2x2 pixels
        c = _tiny(_SD15)
        c["vae"].update(block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, norm_num_groups=32, sample_size=128)
        c["unet"]["sample_size"] = 32
        return c
    if kind in ("tiny-sd2", "tiny-sd2v"):
        c = _tiny(_sd21() if kind == "tiny-sd2v" else _sd21_base())
        c["unet"]["attention_head_dim"] = [2, 4]  # heads per block (head size 16), as SD2's [5,10,20,20]
        c["vae"]["scaling_factor"] = 0.18215      # the SD1 file omits it (default); here it is explicit
        return c
    raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")


# --------------------------------------------------------------------------------------------- build
@dataclass
class Reference:
    """The reference modules of one kind (fp32, eval mode) and the configs they were built from."""
    kind: str
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module      # transformers CLIPTextModel (its state_dict keys have no text_model.)
    configs: dict
    folder: Path | None = None
    extra: dict = field(default_factory=dict)
    text_encoder_2: torch.nn.Module | None = None  # SDXL: CLIPTextModelWithProjection (text_model.*, text_projection)

    @property
    def scheduler_config(self) -> dict:
        return self.configs["scheduler"]

    @property
    def prediction_type(self) -> str:
        return self.configs["scheduler"].get("prediction_type", "epsilon")

    @property
    def pad_token(self) -> str:
        return self.configs["pad_token"]

    @property
    def pad_id(self) -> int:
        return 49407 if self.pad_token == EOS else 0

    def components(self) -> dict:
        extra = {"text_encoder_2": self.text_encoder_2} if self.text_encoder_2 is not None else {}
        return {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder, **extra}


def _clean(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _perturb_norms(module: torch.nn.Module, gen: torch.Generator) -> None:
    """Norm layers start as weight 1 / bias 0; make them random so a swapped weight/bias is caught."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and m.weight is not None:
                m.weight.add_(0.1 * torch.randn(m.weight.shape, generator=gen))
                m.bias.add_(0.1 * torch.randn(m.bias.shape, generator=gen))


def build(kind: str, seed: int = 0, device: str = "cpu") -> Reference:
    """Seeded random reference modules for ``kind``. ``device="meta"`` builds instantly, without weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    c = configs(kind)
    mods = {}
    makers = [("unet", lambda: UNet2DConditionModel(**_clean(c["unet"]))),
              ("vae", lambda: AutoencoderKL(**_clean(c["vae"]))),
              ("text_encoder", lambda: CLIPTextModel(CLIPTextConfig(**c["text_encoder"])))]
    if "text_encoder_2" in c:
        makers.append(("text_encoder_2", lambda: CLIPTextModelWithProjection(CLIPTextConfig(**c["text_encoder_2"]))))
    with torch.device(device):
        for name, make in makers:
            torch.manual_seed(seed)
            m = make().float().eval().requires_grad_(False)
            if device != "meta":
                _perturb_norms(m, torch.Generator().manual_seed(seed + 1))
            mods[name] = m
    return Reference(kind, mods["unet"], mods["vae"], mods["text_encoder"], c,
                     text_encoder_2=mods.get("text_encoder_2"))


# --------------------------------------------------------------------------------------------- write
_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
              torch.int32: "I32", torch.uint8: "U8", torch.float64: "F64"}


def save_safetensors(tensors: Iterable[tuple[str, torch.Tensor]], path, dtype: torch.dtype | None = None,
                     metadata: dict | None = None) -> Path:
    """Write a .safetensors file tensor by tensor (only one converted tensor in memory at a time).

    ``tensors`` may be a generator; it is consumed twice through a list of (name, tensor) *references*
    (no copies). Floating tensors are cast to ``dtype`` when given. The file is replaced atomically
    (write + rename), so rewriting a file whose tensors are in use (safetensors memory-maps them) is safe.
    """
    items = list(tensors)
    cast = lambda t: t.to(dtype) if dtype is not None and t.is_floating_point() else t  # noqa: E731
    header, offset = {}, 0
    for name, t in items:
        dt = dtype if dtype is not None and t.is_floating_point() else t.dtype
        nbytes = t.numel() * torch.empty((), dtype=dt).element_size()
        header[name] = {"dtype": _ST_DTYPES[dt], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for _, t in items:
            f.write(cast(t.detach()).contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    os.replace(tmp, path)  # a new file: tensors still memory-mapped from the old one stay valid
    return path


_LEGACY_VAE = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def _legacy_vae_name(name: str, t: torch.Tensor, conv: bool) -> tuple[str, torch.Tensor]:
    """Old VAE checkpoints name the mid-block attention query/key/value/proj_attn (optionally as 1x1 convs)."""
    for new, old in _LEGACY_VAE.items():
        tag = f".attentions.0.{new}."
        if tag in name:
            name = name.replace(tag, f".attentions.0.{old}.")
            if conv and t.ndim == 2:
                t = t[:, :, None, None]
    return name, t


def state_items(ref: Reference, component: str, prefix: bool = True, position_ids: bool = False,
                legacy_vae: str | None = None) -> list[tuple[str, torch.Tensor]]:
    """(key, tensor) pairs as stored in the Hub file of ``component``.

    prefix: CLIP keys get ``text_model.`` (as in the Hub files); False = as transformers 5.x saves them.
    position_ids: also store ``text_model.embeddings.position_ids`` (older Hub files carry it).
    legacy_vae: None, "linear" or "conv" - store the VAE attention under the legacy names.
    """
    sd = ref.components()[component].state_dict()
    items = list(sd.items())
    if component == "text_encoder":
        if position_ids:
            n = ref.configs["text_encoder"]["max_position_embeddings"]
            items.append(("embeddings.position_ids", torch.arange(n)[None]))
        items = [("text_model." + k if prefix else k, t) for k, t in items]
    if component == "vae" and legacy_vae:
        items = [_legacy_vae_name(k, t, legacy_vae == "conv") for k, t in items]
    return items


def bpe_merges() -> list[str]:
    """The 48,894 CLIP merges ("a b") from the shipped open_clip file."""
    lines = gzip.open(BPE_GZ, "rt", encoding="utf-8").read().split("\n")
    return lines[1:1 + N_MERGES]


_PRINTABLE = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]


def _bytes_to_unicode() -> list[str]:
    """GPT-2 byte-level alphabet: printable bytes map to themselves, the rest to code points from 256 up."""
    extra = iter(range(256, 512))
    return [chr(b) if b in _PRINTABLE else chr(next(extra)) for b in range(256)]


def bpe_vocab(merges: list[str]) -> dict[str, int]:
    """CLIP vocab order: 256 byte symbols (in printable-first order), the same + "</w>", merges, BOS, EOS."""
    table = _bytes_to_unicode()
    order = _PRINTABLE + [b for b in range(256) if b not in _PRINTABLE]
    symbols = [table[b] for b in order]
    words = symbols + [s + "</w>" for s in symbols] + [m.replace(" ", "") for m in merges] + [BOS, EOS]
    return {w: i for i, w in enumerate(words)}


def _added(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


def write_tokenizer(folder, pad_token: str = EOS) -> Path:
    """tokenizer/ files as in the Hub repos (SD1: pad <|endoftext|>; SD2: pad "!")."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    merges = bpe_merges()
    (folder / "vocab.json").write_text(json.dumps(bpe_vocab(merges), ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {"bos_token": _added(BOS), "eos_token": _added(EOS), "pad_token": pad_token, "unk_token": _added(EOS)}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = {"add_prefix_space": False, "do_lower_case": True, "errors": "replace", "model_max_length": 77,
              "tokenizer_class": "CLIPTokenizer", **{k: v if isinstance(v, str) else dict(v, __type="AddedToken")
                                                     for k, v in special.items()}}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return folder


_WEIGHT_FILE = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model",
                "text_encoder_2": "model"}


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2))


def write(ref: Reference, folder, *, prefix: bool = True, fp32: bool = True, fp16: bool = False,
          position_ids: bool = False, legacy_vae: str | None = None, tokenizer: bool = True) -> Path:
    """Write ``ref`` in the official Hub layout under ``folder``; returns the folder (``ref`` is not changed,
    so a fixture's Reference can be written again with other options).

    fp32 / fp16: write ``<name>.safetensors`` / ``<name>.fp16.safetensors`` (the Hub "fp16" variant).
    prefix, position_ids, legacy_vae: see ``state_items``.  tokenizer=False leaves out tokenizer/.
    """
    folder = Path(folder)
    c = ref.configs
    te_config = dict(c["text_encoder"], _name_or_path="openai/clip-vit-large-patch14")
    parts = [("unet", c["unet"]), ("vae", c["vae"]), ("text_encoder", te_config)]
    if "text_encoder_2" in c:
        bigg = "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k"
        parts.append(("text_encoder_2", dict(c["text_encoder_2"], _name_or_path=bigg)))
    for comp, config in parts:
        _write_json(folder / comp / "config.json", config)
        items = state_items(ref, comp, prefix=prefix, position_ids=position_ids, legacy_vae=legacy_vae)
        for on, dtype, suffix in [(fp32, None, ""), (fp16, torch.float16, ".fp16")]:
            if on:
                save_safetensors(items, folder / comp / f"{_WEIGHT_FILE[comp]}{suffix}.safetensors", dtype,
                                 metadata={"format": "pt"})
        del items
    _write_json(folder / "scheduler" / "scheduler_config.json", c["scheduler"])
    if tokenizer:
        write_tokenizer(folder / "tokenizer", c["pad_token"])
        if "pad_token_2" in c:
            write_tokenizer(folder / "tokenizer_2", c["pad_token_2"])
    if "text_encoder_2" in c:
        _write_json(folder / "model_index.json", _sdxl_index(c))
        return folder
    _write_json(folder / "model_index.json", {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.8.0",
        "feature_extractor": [None, None], "safety_checker": [None, None], "requires_safety_checker": False,
        "scheduler": ["diffusers", c["scheduler"]["_class_name"]], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"]})
    return folder


def _sdxl_index(c: dict) -> dict:
    """model_index.json of stabilityai/stable-diffusion-xl-base-1.0."""
    return {"_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.19.0.dev0",
            "force_zeros_for_empty_prompt": c["force_zeros_for_empty_prompt"],
            "scheduler": ["diffusers", c["scheduler"]["_class_name"]],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}


def make(kind: str, folder, seed: int = 0, **write_options) -> Reference:
    """build(kind, seed) then write(ref, folder, **write_options); returns the Reference (``.folder`` set)."""
    ref = build(kind, seed)
    ref.folder = write(ref, folder, **write_options)
    return ref


def reference_tokenizer(folder):
    """transformers' CLIPTokenizer (the oracle) loaded from a tokenizer/ folder written by ``write_tokenizer``."""
    from transformers import CLIPTokenizer
    return CLIPTokenizer.from_pretrained(str(folder))

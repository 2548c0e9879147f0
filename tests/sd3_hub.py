"""A random Stable Diffusion 3 / 3.5 model in the official Hub layout (stabilityai/stable-diffusion-3-medium-diffusers,
stable-diffusion-3.5-medium), and diffusers' StableDiffusion3Pipeline on the same weights (the reference):

    model_index.json                                StableDiffusion3Pipeline (text_encoder_3 [null, null] without T5)
    scheduler/scheduler_config.json                 FlowMatchEulerDiscreteScheduler, shift 3.0
    text_encoder/   config.json, model.safetensors  CLIP-L: CLIPTextModelWithProjection (text_model.*, text_projection)
    text_encoder_2/ config.json, model.safetensors  CLIP-G: CLIPTextModelWithProjection
    text_encoder_3/ config.json, model.safetensors  T5EncoderModel (tests/t5_hub.py)     only with t5=True
    tokenizer/ (pads with <|endoftext|>), tokenizer_2/ (pads with "!"), tokenizer_3/ (T5; only with t5=True)
    transformer/    config.json, diffusion_pytorch_model.safetensors   SD3Transformer2DModel
    vae/            config.json, diffusion_pytorch_model.safetensors   AutoencoderKL: 16 latent channels,
                                                                       no quant convs, scaling 1.5305, shift 0.0609

Tiny: CLIP-L width 16 (projection 8), CLIP-G width 24 (projection 16), T5 width 48 (so the CLIP pair is padded with
zeros to T5's width, as on the Hub where 768 + 1280 < 4096), transformer of 2 blocks x 4 heads x 8 (joint attention
dim 48, pooled 24, patch 2), VAE of 4 levels (latent = image / 8). kind "sd35" adds SD3.5's dual attention (block 0)
and the query/key RMSNorm. Weights that start constant (norm scales and shifts, zero-initialised layers) are
randomised, so a swapped or skipped tensor shows in the parity tests.

    ref = sd3_hub.make(tmp_path / "sd3")               # ref.folder, ref.pipe (fp32, eval, CPU), ref.configs
    ref = sd3_hub.make(tmp_path / "s", t5=False)       # no text_encoder_3/ nor tokenizer_3/ (the pipeline's zeros)
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tests import hub, t5_hub

KINDS = ("sd3", "sd35")
_CLIP = {
    "architectures": ["CLIPTextModelWithProjection"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0,
    "eos_token_id": 2, "hidden_act": "quick_gelu", "initializer_factor": 1.0, "initializer_range": 0.02,
    "layer_norm_eps": 1e-05, "max_position_embeddings": 77, "model_type": "clip_text_model", "pad_token_id": 1,
    "torch_dtype": "float16", "vocab_size": 49408}
TINY = {
    "text_encoder": dict(_CLIP, hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=3,
                         projection_dim=8),
    "text_encoder_2": dict(_CLIP, hidden_act="gelu", hidden_size=24, intermediate_size=48, num_attention_heads=3,
                           num_hidden_layers=3, projection_dim=16),
    "text_encoder_3": dict(t5_hub.TINY, d_model=48),
    "transformer": {
        "_class_name": "SD3Transformer2DModel", "_diffusers_version": "0.29.0.dev0", "attention_head_dim": 8,
        "caption_projection_dim": 32, "in_channels": 16, "joint_attention_dim": 48, "num_attention_heads": 4,
        "num_layers": 2, "out_channels": 16, "patch_size": 2, "pooled_projection_dim": 24, "pos_embed_max_size": 16,
        "sample_size": 8},
    "vae": {
        "_class_name": "AutoencoderKL", "_diffusers_version": "0.29.0.dev0", "act_fn": "silu",
        "block_out_channels": [32, 32, 64, 64], "down_block_types": ["DownEncoderBlock2D"] * 4, "force_upcast": True,
        "in_channels": 3, "latent_channels": 16, "latents_mean": None, "latents_std": None, "layers_per_block": 1,
        "norm_num_groups": 8, "out_channels": 3, "sample_size": 64, "scaling_factor": 1.5305, "shift_factor": 0.0609,
        "up_block_types": ["UpDecoderBlock2D"] * 4, "use_post_quant_conv": False, "use_quant_conv": False},
    "scheduler": {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.29.0.dev0",
                  "num_train_timesteps": 1000, "shift": 3.0},
}
_WEIGHTS = {"text_encoder": "model", "text_encoder_2": "model", "transformer": "diffusion_pytorch_model",
            "vae": "diffusion_pytorch_model"}


def configs(kind: str = "sd3") -> dict:
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    c = copy.deepcopy(TINY)
    if kind == "sd35":
        c["transformer"].update(_diffusers_version="0.31.0.dev0", dual_attention_layers=[0], qk_norm="rms_norm")
    return c


def model_index(t5: bool = True, kind: str = "sd3") -> dict:
    index = {"_class_name": "StableDiffusion3Pipeline", "_diffusers_version": "0.29.0.dev0",
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
             "text_encoder_3": ["transformers", "T5EncoderModel"] if t5 else [None, None],
             "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
             "tokenizer_3": ["transformers", "T5TokenizerFast"] if t5 else [None, None],
             "transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}
    if kind == "sd35":
        index.update(image_encoder=[None, None], feature_extractor=[None, None])
    return index


def _randomise_constants(module: torch.nn.Module, gen: torch.Generator, scale: float = 0.1) -> None:
    """Add noise to every tensor that starts constant (norm scales 1, shifts 0, zero-initialised projections)."""
    with torch.no_grad():
        for t in module.state_dict().values():
            if t.is_floating_point() and t.numel() > 0 and bool((t == t.reshape(-1)[0]).all()):
                t.add_(scale * torch.randn(t.shape, generator=gen))


def _clean(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def build(kind: str = "sd3", seed: int = 0) -> dict:
    """Seeded random reference modules {text_encoder, text_encoder_2, transformer, vae} (fp32, eval)."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection
    c = configs(kind)
    makers = {"text_encoder": lambda: CLIPTextModelWithProjection(CLIPTextConfig(**c["text_encoder"])),
              "text_encoder_2": lambda: CLIPTextModelWithProjection(CLIPTextConfig(**c["text_encoder_2"])),
              "transformer": lambda: SD3Transformer2DModel(**_clean(c["transformer"])),
              "vae": lambda: AutoencoderKL(**_clean(c["vae"]))}
    mods = {}
    for i, (name, maker) in enumerate(makers.items()):
        torch.manual_seed(seed + 10 * i)
        mods[name] = maker().float().eval().requires_grad_(False)
        _randomise_constants(mods[name], torch.Generator().manual_seed(seed + 10 * i + 1))
    return mods


@dataclass
class Reference:
    kind: str
    folder: Path
    configs: dict
    t5: bool
    modules: dict = field(default_factory=dict)
    _pipe: object = None

    @property
    def pipe(self):
        """diffusers' StableDiffusion3Pipeline.from_pretrained(folder) (fp32, eval, CPU), built once."""
        if self._pipe is None:
            self._pipe = load_pipe(self.folder)
        return self._pipe


def load_pipe(folder):
    from diffusers import StableDiffusion3Pipeline
    index = json.loads((Path(folder) / "model_index.json").read_text())
    absent = {k: None for k, v in index.items() if isinstance(v, list) and v[0] is None}   # else refused as missing
    pipe = StableDiffusion3Pipeline.from_pretrained(str(folder), dtype=torch.float32, **absent)
    pipe.set_progress_bar_config(disable=True)
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "vae"):
        if getattr(pipe, name, None) is not None:
            getattr(pipe, name).eval().requires_grad_(False)
    return pipe


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2))


def write(mods: dict, folder, *, kind: str = "sd3", seed: int = 0, t5: bool = True, fp32: bool = True,
          fp16: bool = False, t5_shards: int = 1) -> Path:
    """The Hub layout under folder. fp16 adds the ".fp16" variant files; t5_shards > 1 writes text_encoder_3 as
    model-0000i-of-0000n.safetensors + model.safetensors.index.json (as the Hub's T5 is stored)."""
    folder = Path(folder)
    c = configs(kind)
    for name, module in mods.items():
        _write_json(folder / name / "config.json", c[name])
        items = list(module.state_dict().items())
        for on, dtype, suffix in [(fp32, None, ""), (fp16, torch.float16, ".fp16")]:
            if on:
                hub.save_safetensors(items, folder / name / f"{_WEIGHTS[name]}{suffix}.safetensors", dtype,
                                     metadata={"format": "pt"})
    _write_json(folder / "scheduler" / "scheduler_config.json", c["scheduler"])
    hub.write_tokenizer(folder / "tokenizer", hub.EOS)
    hub.write_tokenizer(folder / "tokenizer_2", "!")
    if t5:
        t5_hub.write(folder, seed=seed + 100, config=c["text_encoder_3"])
        if t5_shards > 1 or fp16:
            _rewrite_t5(folder / "text_encoder_3", t5_shards, fp32, fp16)
    _write_json(folder / "model_index.json", model_index(t5, kind))
    return folder


def _rewrite_t5(te3: Path, shards: int, fp32: bool, fp16: bool) -> None:
    """Replace text_encoder_3/model.safetensors by `shards` files and their index (each variant)."""
    from safetensors.torch import load_file
    items = list(load_file(str(te3 / "model.safetensors")).items())
    (te3 / "model.safetensors").unlink()
    for on, dtype, suffix in [(fp32, None, ""), (fp16, torch.float16, ".fp16")]:
        if not on:
            continue
        if shards <= 1:
            hub.save_safetensors(items, te3 / f"model{suffix}.safetensors", dtype, metadata={"format": "pt"})
            continue
        weight_map = {}
        for i in range(shards):
            part = items[i::shards]
            name = f"model{suffix}-{i + 1:05d}-of-{shards:05d}.safetensors"
            hub.save_safetensors(part, te3 / name, dtype, metadata={"format": "pt"})
            weight_map.update({k: name for k, _ in part})
        size = sum(t.numel() * (2 if dtype else t.element_size()) for _, t in items)
        _write_json(te3 / f"model.safetensors.index{suffix}.json",
                    {"metadata": {"total_size": size}, "weight_map": weight_map})


def make(folder, kind: str = "sd3", seed: int = 0, t5: bool = True, **write_options) -> Reference:
    """build(kind, seed) then write(...): a Reference with .folder, .configs, .modules and .pipe (lazy)."""
    mods = build(kind, seed)
    folder = write(mods, folder, kind=kind, seed=seed, t5=t5, **write_options)
    return Reference(kind, folder, configs(kind), t5, mods)

"""A random FLUX.1 model in the official Hub layout (black-forest-labs/FLUX.1-dev, FLUX.1-schnell), and diffusers'
FluxPipeline on the same weights (the reference):

    model_index.json                                FluxPipeline
    scheduler/scheduler_config.json                 FlowMatchEulerDiscreteScheduler: dev shift 3.0 with dynamic
                                                    shifting (base_shift 0.5, max_shift 1.15, 256 .. 4096 tokens);
                                                    schnell shift 1.0 without (each as on the Hub)
    text_encoder/   config.json, model.safetensors  CLIP-L: CLIPTextModel (text_model.*; FLUX takes its pooled output)
    tokenizer/                                      CLIP's (pads with <|endoftext|>)
    text_encoder_2/ config.json, model.safetensors  T5EncoderModel (tests/t5_hub.py)
    tokenizer_2/                                    T5's shape (tests/t5_hub.py), model_max_length 512
    transformer/    config.json, diffusion_pytorch_model.safetensors   FluxTransformer2DModel (guidance_embeds: dev)
    vae/            config.json, diffusion_pytorch_model.safetensors   AutoencoderKL: 16 latent channels, no quant
                                                                       convs, scaling 0.3611, shift 0.1159, factor 8

Tiny: CLIP width 16 (pooled 16), T5 width 32 (joint_attention_dim 32), transformer of 2 double-stream + 2
single-stream blocks x 2 heads x 16 (axes_dims_rope 4 + 6 + 6 = 16, in_channels 64 = 16 latent channels x 2 x 2),
VAE of 4 levels (latent = image / 8; a picture's sides are multiples of 16). Weights that start constant (norm
scales and shifts, zero-initialised layers) are randomised, so a swapped or skipped tensor shows in parity tests.

    ref = flux_hub.make(tmp_path / "flux")                    # dev: ref.folder, ref.pipe (fp32, eval, CPU)
    ref = flux_hub.make(tmp_path / "s", kind="schnell")       # no guidance embedding; no dynamic shift
    ref = flux_hub.make(tmp_path / "b", dtype=torch.bfloat16, shards=2)   # bf16 files, sharded as on the Hub
"""
from __future__ import annotations

import copy
import shutil
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from tests import hub, sd3_hub, t5_hub

KINDS = ("dev", "schnell")
_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.30.0.dev0",
              "base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
              "num_train_timesteps": 1000}
TINY = {
    "text_encoder": dict(sd3_hub._CLIP, architectures=["CLIPTextModel"], hidden_size=16, intermediate_size=32,
                         num_attention_heads=2, num_hidden_layers=2, projection_dim=16),
    "text_encoder_2": dict(t5_hub.TINY),
    "transformer": {
        "_class_name": "FluxTransformer2DModel", "_diffusers_version": "0.30.0.dev0", "attention_head_dim": 16,
        "axes_dims_rope": [4, 6, 6], "guidance_embeds": True, "in_channels": 64, "joint_attention_dim": 32,
        "num_attention_heads": 2, "num_layers": 2, "num_single_layers": 2, "patch_size": 1,
        "pooled_projection_dim": 16},
    "vae": dict(sd3_hub.TINY["vae"], _diffusers_version="0.30.0.dev0", scaling_factor=0.3611, shift_factor=0.1159),
    "scheduler": dict(_SCHEDULER, shift=3.0, use_dynamic_shifting=True),
}
_WEIGHTS = {"text_encoder": "model", "text_encoder_2": "model", "transformer": "diffusion_pytorch_model",
            "vae": "diffusion_pytorch_model"}
MODEL_INDEX = {"_class_name": "FluxPipeline", "_diffusers_version": "0.30.0.dev0",
               "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
               "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "T5EncoderModel"],
               "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "T5TokenizerFast"],
               "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}


def configs(kind: str = "dev") -> dict:
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    c = copy.deepcopy(TINY)
    if kind == "schnell":
        c["transformer"]["guidance_embeds"] = False
        c["scheduler"] = dict(_SCHEDULER, shift=1.0, use_dynamic_shifting=False)
    return c


def build(kind: str = "dev", seed: int = 0) -> dict:
    """Seeded random reference modules {text_encoder, transformer, vae} (fp32, eval); T5 is written by t5_hub."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel
    c = configs(kind)
    makers = {"text_encoder": lambda: CLIPTextModel(CLIPTextConfig(**c["text_encoder"])),
              "transformer": lambda: FluxTransformer2DModel(**sd3_hub._clean(c["transformer"])),
              "vae": lambda: AutoencoderKL(**sd3_hub._clean(c["vae"]))}
    return {name: _seeded(maker, seed + 10 * i) for i, (name, maker) in enumerate(makers.items())}


def _seeded(maker, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    module = maker().float().eval().requires_grad_(False)
    sd3_hub._randomise_constants(module, torch.Generator().manual_seed(seed + 1))
    return module


@dataclass
class Reference:
    kind: str
    folder: Path
    configs: dict
    modules: dict = field(default_factory=dict)

    @cached_property
    def pipe(self):
        """diffusers' FluxPipeline.from_pretrained(folder) (fp32, eval, CPU), built on first use."""
        from diffusers import FluxPipeline
        pipe = FluxPipeline.from_pretrained(str(self.folder), dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        for module in (pipe.text_encoder, pipe.text_encoder_2, pipe.transformer, pipe.vae):
            module.eval().requires_grad_(False)
        return pipe


def _save(items: list, folder: Path, stem: str, dtype, shards: int) -> None:
    """stem.safetensors, or stem-0000i-of-0000n.safetensors + stem.safetensors.index.json (the Hub's shards)."""
    if shards <= 1:
        hub.save_safetensors(items, folder / f"{stem}.safetensors", dtype, metadata={"format": "pt"})
        return
    weight_map = {}
    for i in range(shards):
        part, name = items[i::shards], f"{stem}-{i + 1:05d}-of-{shards:05d}.safetensors"
        hub.save_safetensors(part, folder / name, dtype, metadata={"format": "pt"})
        weight_map.update({k: name for k, _ in part})
    size = sum(t.numel() * (torch.empty((), dtype=dtype).element_size() if dtype else t.element_size())
               for _, t in items)
    sd3_hub._write_json(folder / f"{stem}.safetensors.index.json",
                        {"metadata": {"total_size": size}, "weight_map": weight_map})


def write(mods: dict, folder, *, kind: str = "dev", seed: int = 0, dtype: torch.dtype | None = None,
          shards: int = 1) -> Path:
    """The Hub layout under folder. dtype (e.g. torch.bfloat16, as FLUX.1 is published) casts every weight file;
    shards > 1 splits transformer/ and text_encoder_2/ into that many files with their index."""
    from safetensors.torch import load_file
    folder = Path(folder)
    c = configs(kind)
    for name, module in mods.items():
        sd3_hub._write_json(folder / name / "config.json", c[name])
        _save(list(module.state_dict().items()), folder / name, _WEIGHTS[name], dtype,
              shards if name == "transformer" else 1)
    sd3_hub._write_json(folder / "scheduler" / "scheduler_config.json", c["scheduler"])
    hub.write_tokenizer(folder / "tokenizer", hub.EOS)
    t5_hub.write(folder, seed=seed + 100, config=c["text_encoder_2"])  # as text_encoder_3/, tokenizer_3/: renamed
    for old, new in (("text_encoder_3", "text_encoder_2"), ("tokenizer_3", "tokenizer_2")):
        if (folder / new).exists():
            shutil.rmtree(folder / new)
        (folder / old).rename(folder / new)
    te2 = folder / "text_encoder_2"
    if dtype is not None or shards > 1:
        items = list(load_file(str(te2 / "model.safetensors")).items())
        (te2 / "model.safetensors").unlink()
        _save(items, te2, "model", dtype, shards)
    sd3_hub._write_json(folder / "model_index.json", MODEL_INDEX)
    return folder


def make(folder, kind: str = "dev", seed: int = 0, **write_options) -> Reference:
    """build(kind, seed) then write(...): a Reference with .folder, .configs, .modules and .pipe (lazy)."""
    mods = build(kind, seed)
    folder = write(mods, folder, kind=kind, seed=seed, **write_options)
    return Reference(kind, folder, configs(kind), mods)

"""A random CLIP (transformers' CLIPModel: CLIPVisionModelWithProjection + CLIPTextModelWithProjection) written in
the layout of openai/clip-vit-large-patch14 on the Hub: config.json (text_config, vision_config, projection_dim)
and model.safetensors (vision_model.*, visual_projection.weight, text_model.*, text_projection.weight,
logit_scale, and the position_ids buffers the official file still carries). Tiny by default (width 32, 2 layers,
ViT patch 14 at 224 px: the preprocessing is the real one).

    folder = clip_hub.write(tmp_path / "clip")
    vision, text = clip_hub.references(folder)   # transformers' WithProjection models on those weights
"""
import json
from pathlib import Path

import torch

from tests import hub

TINY = dict(text_config=dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                             projection_dim=16),
            vision_config=dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                               patch_size=14, image_size=224, projection_dim=16),
            projection_dim=16)


def write(folder, seed: int = 0, config: dict = TINY, position_ids: bool = True) -> Path:
    from transformers import CLIPConfig, CLIPModel
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(**config)).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, t in model.state_dict().items():  # random norms and embeddings: a swapped tensor is caught
            if "norm" in name or "class_embedding" in name:
                t.add_(0.1 * torch.randn(t.shape, generator=gen))
    items = list(model.state_dict().items())
    if position_ids:
        v = model.config.vision_config
        items += [("text_model.embeddings.position_ids", torch.arange(model.config.text_config.max_position_embeddings)
                   [None]), ("vision_model.embeddings.position_ids", torch.arange((v.image_size // v.patch_size) ** 2
                                                                                   + 1)[None])]
    hub.save_safetensors(items, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2, default=str))
    return folder


def references(folder):
    """(CLIPVisionModelWithProjection, CLIPTextModelWithProjection) loaded from the folder by transformers."""
    from transformers import CLIPTextModelWithProjection, CLIPVisionModelWithProjection
    return tuple(cls.from_pretrained(str(folder)).eval() for cls in (CLIPVisionModelWithProjection,
                                                                     CLIPTextModelWithProjection))


# openai/clip-vit-large-patch14's config.json, the fields that decide the networks (ViT-L/14 and SD 1.x's text tower)
OFFICIAL = dict(projection_dim=768,
                text_config=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                                 max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu",
                                 projection_dim=768),
                vision_config=dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                                   num_hidden_layers=24, patch_size=14, image_size=224, hidden_act="quick_gelu",
                                   projection_dim=768))

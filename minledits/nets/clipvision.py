"""CLIP as a pair of towers with projections (transformers' CLIPModel key layout), for the metrics: the image
tower (CLIPVisionModelWithProjection) beside the text tower of clip.py (CLIPTextModelWithProjection).

Notation (code name -> symbol)
    pixels   x             [B, 3, S, S] image, CLIP-normalised (metrics.clip_pixels); S = image_size (224)
    p        patch side    (14 for ViT-L/14): (S / p)^2 patches, +1 class token
    h        tokens        [B, 1 + (S/p)^2, D]: class embedding, then conv patch embeddings, + learned positions
    e_img    image embedding = W_v LN_post(LN_pre-encoder(h)[:, 0])      [B, P] (W_v: visual_projection, no bias)
    e_txt    text embedding  = W_t text_model(ids)[b, eot_b]             [B, P] (eot_b: position of <|endoftext|>,
                               the largest id, so argmax(ids) as CLIP's own code; W_t: text_projection, no bias)
The encoder is clip.py's (pre-norm attention + MLP) without the causal mask. "pre_layrnorm" is the
official key's spelling. ViT-L/14 (openai/clip-vit-large-patch14): 24 layers, 1024 wide, 16 heads, P = 768.
"""
import torch
from torch import nn

from .clip import CLIPEncoder, CLIPTextTransformer

VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5)
TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                     num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5)


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        D, p, S = cfg["hidden_size"], cfg["patch_size"], cfg["image_size"]
        self.class_embedding = nn.Parameter(torch.empty(D))
        self.patch_embedding = nn.Conv2d(3, D, p, stride=p, bias=False)
        self.position_embedding = nn.Embedding((S // p) ** 2 + 1, D)

    def forward(self, x):
        patches = self.patch_embedding(x.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(len(x), 1, -1)
        return torch.cat([cls, patches], 1) + self.position_embedding.weight


class VisionTransformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        D, eps = cfg["hidden_size"], cfg["layer_norm_eps"]
        self.embeddings = VisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(D, eps=eps)
        self.encoder = CLIPEncoder(cfg, causal=False)  # every patch sees every patch
        self.post_layernorm = nn.LayerNorm(D, eps=eps)

    def forward(self, x):
        h = self.encoder(self.pre_layrnorm(self.embeddings(x)))
        return self.post_layernorm(h[:, 0])  # the class token


class CLIP(nn.Module):
    """image_embeds(pixels) -> e_img [B, P], text_embeds(ids) -> e_txt [B, P] (not normalised)."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = dict(config)  # a CLIPModel config.json; what it leaves out is transformers' default
        vision = {**VISION_DEFAULTS, **config.get("vision_config", {})}
        text = {**TEXT_DEFAULTS, **config.get("text_config", {})}
        P = config.get("projection_dim", 512)
        self.image_size = vision["image_size"]
        self.vision_model = VisionTransformer(vision)
        self.text_model = CLIPTextTransformer(text)
        self.visual_projection = nn.Linear(vision["hidden_size"], P, bias=False)
        self.text_projection = nn.Linear(text["hidden_size"], P, bias=False)
        self.logit_scale = nn.Parameter(torch.empty(()))  # in the file; unused by the metrics

    def image_embeds(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.visual_projection(self.vision_model(pixels))

    def text_embeds(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.text_model(ids)
        return self.text_projection(h[torch.arange(len(ids)), ids.argmax(-1)])

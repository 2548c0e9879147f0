"""DINO's ViT (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers"; ViT: Dosovitskiy
et al. 2021) up to the keys of its last block, in transformers' ViTModel key layout (facebook/dino-vitb8 on the Hub),
for PIE-Bench's structure distance (Tumanyan et al. 2022, "Splicing ViT Features": the self-similarity of keys).

Notation (code name -> symbol)
    x        [B, 3, S, S] picture, normalised as the metric does (scores.py); S / p patches a side (p = patch_size)
    h        tokens [B, 1 + (S/p)^2, D]: [CLS] then the patch embeddings (conv p x p, stride p), + learned positions
             (the grid the positions were trained for: S = image_size, no interpolation)
    block    h + Attn(LN_1(h)), then + MLP(LN_2(.)) (pre-norm; GELU MLP; layer_norm_eps from the config)
    keys     W_k LN_1(h) + b_k of the last block, [B, T, D]: the heads side by side (head j: channels j d .. (j+1) d)
ViT-B/8: 12 blocks, D = 768, 12 heads, p = 8, S = 224 (785 tokens).
"""
import torch
import torch.nn.functional as F
from torch import nn

DEFAULTS = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                image_size=224, patch_size=8, num_channels=3, layer_norm_eps=1e-12, qkv_bias=True)


class Linear(nn.Module):
    """A ViTModel "dense"-style holder: `.dense` is the linear map (the key layout's extra level)."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)


class SelfAttention(nn.Module):
    def __init__(self, D: int, bias: bool):
        super().__init__()
        self.query, self.key, self.value = (nn.Linear(D, D, bias=bias) for _ in range(3))


class Attention(nn.Module):
    def __init__(self, D: int, bias: bool):
        super().__init__()
        self.attention = SelfAttention(D, bias)
        self.output = Linear(D, D)


class Layer(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        D, eps = c["hidden_size"], c["layer_norm_eps"]
        self.heads = c["num_attention_heads"]
        self.attention = Attention(D, c["qkv_bias"])
        self.intermediate = Linear(D, c["intermediate_size"])
        self.output = Linear(c["intermediate_size"], D)
        self.layernorm_before, self.layernorm_after = nn.LayerNorm(D, eps=eps), nn.LayerNorm(D, eps=eps)

    def keys(self, h):
        return self.attention.attention.key(self.layernorm_before(h))

    def forward(self, h):
        a, n = self.attention.attention, self.layernorm_before(h)
        B, T, D = n.shape
        q, k, v = (f(n).view(B, T, self.heads, D // self.heads).transpose(1, 2) for f in (a.query, a.key, a.value))
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, D)
        h = h + self.attention.output.dense(o)
        return h + self.output.dense(F.gelu(self.intermediate.dense(self.layernorm_after(h))))


class PatchEmbeddings(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        p = c["patch_size"]
        self.projection = nn.Conv2d(c["num_channels"], c["hidden_size"], p, stride=p)


class Embeddings(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        D, n = c["hidden_size"], (c["image_size"] // c["patch_size"]) ** 2
        self.cls_token = nn.Parameter(torch.empty(1, 1, D))
        self.position_embeddings = nn.Parameter(torch.empty(1, n + 1, D))
        self.patch_embeddings = PatchEmbeddings(c)

    def forward(self, x):
        patches = self.patch_embeddings.projection(x).flatten(2).transpose(1, 2)
        if patches.shape[1] + 1 != self.position_embeddings.shape[1]:
            raise ValueError(f"DINO's positions are for {self.position_embeddings.shape[1] - 1} patches, the picture "
                             f"has {patches.shape[1]}")
        return torch.cat([self.cls_token.expand(len(x), -1, -1), patches], 1) + self.position_embeddings


class Encoder(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.layer = nn.ModuleList(Layer(c) for _ in range(c["num_hidden_layers"]))


class DINO(nn.Module):
    """ViTModel's embeddings and encoder (its final layernorm and pooler are not used by the keys)."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = c = {**DEFAULTS, **{k: config[k] for k in DEFAULTS if k in config}}
        self.image_size = c["image_size"]
        self.embeddings = Embeddings(c)
        self.encoder = Encoder(c)

    def last_keys(self, x) -> torch.Tensor:
        """The keys of the last block, heads concatenated: [B, T, D]."""
        h = self.embeddings(x.to(self.embeddings.cls_token.dtype))
        for layer in self.encoder.layer[:-1]:
            h = layer(h)
        return self.encoder.layer[-1].keys(h)

"""The CLIP text encoder (transformers' CLIPTextModel and CLIPTextModelWithProjection), built from its config.json.

ids [B, L] (L <= max_position_embeddings, 77 in SD) -> last hidden state after final_layer_norm [B, L, D].
Pre-norm transformer with a causal mask. SD1: 12 layers, 768 wide, quick_gelu. SD2: 23 layers, 1024 wide, gelu.
SDXL conditions on both of its encoders' penultimate hidden states h_{n-1} (the input of the last layer, not normed):
    context = [h_{n-1}(CLIP ViT-L, 12 layers, 768) ; h_{n-1}(OpenCLIP ViT-bigG, 32 layers, 1280)]   [B, 77, 2048]
    pooled  = text_projection(final_layer_norm(h_n)[eos])   (the second encoder only)           [B, 1280]
eos is the first <|endoftext|>; configs with the legacy eos_token_id 2 take the largest id instead, as transformers
does (the same position: <|endoftext|> = 49407 is the largest id).
"""
import torch
import torch.nn.functional as F
from torch import nn

from . import layers

ACTIVATIONS = {"quick_gelu": lambda x: x * torch.sigmoid(1.702 * x), "gelu": F.gelu}


class CLIPAttention(nn.Module):
    def __init__(self, dim, heads, causal=True):
        super().__init__()
        self.heads, self.causal = heads, causal  # causal: a token sees only those before it (text, not images)
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return self.out_proj(layers.attention(q, k, v, self.heads, causal=self.causal))


class CLIPMLP(nn.Module):
    def __init__(self, dim, hidden, act):
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"CLIP hidden_act {act!r} is not supported ({list(ACTIVATIONS)})")
        self.act = ACTIVATIONS[act]
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg, causal=True):
        super().__init__()
        dim, eps = cfg["hidden_size"], cfg.get("layer_norm_eps", 1e-5)
        self.self_attn = CLIPAttention(dim, cfg["num_attention_heads"], causal)
        self.layer_norm1 = nn.LayerNorm(dim, eps=eps)
        self.mlp = CLIPMLP(dim, cfg["intermediate_size"], cfg.get("hidden_act", "quick_gelu"))
        self.layer_norm2 = nn.LayerNorm(dim, eps=eps)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg["vocab_size"], cfg["hidden_size"])
        self.position_embedding = nn.Embedding(cfg["max_position_embeddings"], cfg["hidden_size"])

    def forward(self, ids):
        return self.token_embedding(ids) + self.position_embedding.weight[: ids.shape[1]]  # position ids = arange(L)


class CLIPEncoder(nn.Module):
    def __init__(self, cfg, causal=True):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg, causal) for _ in range(cfg["num_hidden_layers"]))

    def forward(self, x, n=None):
        """The first n layers (None: all)."""
        for layer in self.layers[:n]:
            x = layer(x)
        return x


class CLIPTextTransformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embeddings = CLIPEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg["hidden_size"], eps=cfg.get("layer_norm_eps", 1e-5))

    def forward(self, ids):
        return self.final_layer_norm(self.encoder(self.embeddings(ids)))


class TextEncoder(nn.Module):
    """text_encoder(ids [B, L]) -> [B, L, D]. Keys start with `text_model.` like the Hub files."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = dict(config)
        self.text_model = CLIPTextTransformer(self.config)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.text_model(ids)

    def penultimate(self, ids: torch.Tensor) -> torch.Tensor:
        """h_{n-1} [B, L, D]: the hidden state entering the last layer (transformers' hidden_states[-2])."""
        tm = self.text_model
        return tm.encoder(tm.embeddings(ids), len(tm.encoder.layers) - 1)


class TextEncoderWithProjection(TextEncoder):
    """SDXL's second encoder: TextEncoder + text_projection (no bias), for the pooled embedding."""

    def __init__(self, config: dict):
        super().__init__(config)
        self.text_projection = nn.Linear(self.config["hidden_size"], self.config["projection_dim"], bias=False)

    def penultimate_and_pooled(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(h_{n-1} [B, L, D], text_projection(final_layer_norm(h_n)[eos]) [B, P]) in one pass."""
        tm = self.text_model
        h = self.penultimate(ids)
        last = tm.final_layer_norm(tm.encoder.layers[-1](h))
        return h, self.text_projection(last[torch.arange(len(ids), device=ids.device), eos_positions(ids, self.config)])


def eos_positions(ids: torch.Tensor, config: dict) -> torch.Tensor:
    """[B] position of each row's <|endoftext|> (the module docstring)."""
    eos = config.get("eos_token_id", 49407)
    return ids.argmax(-1) if eos == 2 else (ids == eos).int().argmax(-1)

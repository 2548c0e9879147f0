"""The T5 text encoder (transformers' T5EncoderModel, SD3's text_encoder_3), built from its config.json, and its
tokenizer from the `tokenizers` library (the Hub's tokenizer_3/tokenizer.json).

Notation (code name -> symbol):
    ids, mask   token ids t [B, L], attention mask m [B, L] (1 = token, 0 = padding)
    x           hidden state h [B, L, D]        D = d_model (SD3: 4096), H = num_heads, d = d_kv (H * d = inner)
    bias        relative position bias P [1, H, L, L], from layer 0's table, shared by every layer
    bucket      b(j - i): the bucket of key position j seen from query position i (bidirectional)

    h_0 = E[t]                                            shared.weight (no scaling, no position embedding)
    P[h, i, j] = W_rel[b(j - i), h]                       encoder.block.0.layer.0.SelfAttention.relative_attention_bias
    a = h + o(softmax(q k^T + P + M) v)                   RMSNorm first; no 1/sqrt(d): T5 folds it into its weights
    h = a + wo(gelu_tanh(wi_0(n)) * wi_1(n)),  n = rms(a)   gated-GELU ("gelu_new", the tanh approximation)
    rms(x) = w * x / sqrt(mean(x^2) + eps)                no mean subtracted, no bias; mean(x^2) in float32
    out = rms_final(h_N)                                  last hidden state [B, L, D]
M is 0 on tokens and the dtype's lowest value on padded keys (padded queries are computed all the same).

Buckets (num_buckets n = 32, max_distance = 128): half the buckets for keys after the query (j > i), half for the
rest; within a half (n' = 16) distances |j - i| < n'/2 = 8 get their own bucket, larger ones a log-spaced one:
    b = (j > i) * n' + (r if r < 8 else min(8 + floor(log(r / 8) / log(128 / 8) * (n' - 8)), n' - 1)),  r = |j - i|

Keys: transformers' (shared.weight, encoder.block.N.layer.0.SelfAttention.{q,k,v,o}.weight, layer.0.layer_norm,
layer.1.DenseReluDense.{wi_0,wi_1,wo}, layer.1.layer_norm, encoder.final_layer_norm). encoder.embed_tokens.weight
is tied to shared.weight and transformers writes only the latter; `tied_keys` maps a file that has it.
In fp16, like transformers, hidden states are clamped below the float16 maximum after each sublayer (T5 overflows
in fp16), and the feed-forward's product is cast to wo's dtype: transformers keeps wo in fp32 when it loads T5 in
fp16, which a loader matches by filling wo in fp32 (fill() itself casts every floating tensor to one dtype).

Tokenizer (SD3: 256 tokens): ids of the prompt + </s>, truncated to max_length with </s> kept last, padded with
<pad> = 0; the mask marks the real tokens. Special-token text in a prompt ("<extra_id_0>") maps to its id.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer as _Backend
from torch import nn

ACTIVATIONS = {"gelu_new": lambda x: F.gelu(x, approximate="tanh"), "gelu_pytorch_tanh":
               lambda x: F.gelu(x, approximate="tanh"), "gelu": F.gelu, "relu": F.relu}
TIED = "encoder.embed_tokens.weight"
SD3_MAX_LENGTH = 256


def bucket(r: torch.Tensor, num_buckets: int = 32, max_distance: int = 128) -> torch.Tensor:
    """Bidirectional bucket of relative positions r = j - i (LongTensor) as T5 bins them."""
    half = num_buckets // 2
    exact = half // 2
    side = (r > 0).long() * half
    r = r.abs()
    far = exact + (torch.log(r.float().clamp(min=1) / exact) / math.log(max_distance / exact)
                   * (half - exact)).long()
    return side + torch.where(r < exact, r, far.clamp(max=half - 1))


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


class T5Attention(nn.Module):
    def __init__(self, cfg, has_bias):
        super().__init__()
        self.heads, inner, dim = cfg["num_heads"], cfg["num_heads"] * cfg["d_kv"], cfg["d_model"]
        self.num_buckets = cfg.get("relative_attention_num_buckets", 32)
        self.max_distance = cfg.get("relative_attention_max_distance", 128)
        self.q, self.k, self.v = (nn.Linear(dim, inner, bias=False) for _ in range(3))
        self.o = nn.Linear(inner, dim, bias=False)
        if has_bias:
            self.relative_attention_bias = nn.Embedding(self.num_buckets, self.heads)

    def position_bias(self, length: int) -> torch.Tensor:
        """P [1, H, L, L] from this layer's table (layer 0 only has one)."""
        pos = torch.arange(length, device=self.relative_attention_bias.weight.device)
        b = bucket(pos[None, :] - pos[:, None], self.num_buckets, self.max_distance)
        return self.relative_attention_bias(b).permute(2, 0, 1)[None]

    def forward(self, x, bias):
        B, L, _ = x.shape
        q, k, v = (p(x).view(B, L, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0)
        return self.o(out.transpose(1, 2).reshape(B, L, -1))


class T5LayerSelfAttention(nn.Module):
    def __init__(self, cfg, has_bias):
        super().__init__()
        self.SelfAttention = T5Attention(cfg, has_bias)
        self.layer_norm = RMSNorm(cfg["d_model"], cfg.get("layer_norm_epsilon", 1e-6))

    def forward(self, x, bias):
        return x + self.SelfAttention(self.layer_norm(x), bias)


class T5DenseGatedActDense(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        act = cfg.get("dense_act_fn", "gelu_new")
        if act not in ACTIVATIONS:
            raise ValueError(f"T5 dense_act_fn {act!r} is not supported ({list(ACTIVATIONS)})")
        self.act = ACTIVATIONS[act]
        self.wi_0, self.wi_1 = (nn.Linear(cfg["d_model"], cfg["d_ff"], bias=False) for _ in range(2))
        self.wo = nn.Linear(cfg["d_ff"], cfg["d_model"], bias=False)

    def forward(self, x):
        return self.wo((self.act(self.wi_0(x)) * self.wi_1(x)).to(self.wo.weight.dtype))


class T5LayerFF(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.DenseReluDense = T5DenseGatedActDense(cfg)
        self.layer_norm = RMSNorm(cfg["d_model"], cfg.get("layer_norm_epsilon", 1e-6))

    def forward(self, x):
        return x + self.DenseReluDense(self.layer_norm(x))


def clamp_fp16(x: torch.Tensor) -> torch.Tensor:
    """transformers' fp16 guard: clamp to +-(max - 1000) when an inf appeared, else to +-max."""
    if x.dtype != torch.float16:
        return x
    top = torch.finfo(torch.float16).max
    limit = torch.where(torch.isinf(x).any(), top - 1000, top)
    return torch.clamp(x, min=-limit, max=limit)


class T5Block(nn.Module):
    def __init__(self, cfg, has_bias):
        super().__init__()
        self.layer = nn.ModuleList([T5LayerSelfAttention(cfg, has_bias), T5LayerFF(cfg)])

    def forward(self, x, bias):
        return clamp_fp16(self.layer[1](clamp_fp16(self.layer[0](x, bias))))


class T5Stack(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.block = nn.ModuleList([T5Block(cfg, has_bias=i == 0) for i in range(cfg["num_layers"])])
        self.final_layer_norm = RMSNorm(cfg["d_model"], cfg.get("layer_norm_epsilon", 1e-6))


class T5Encoder(nn.Module):
    """T5EncoderModel: ids [B, L] (and mask [B, L]) -> last hidden state [B, L, D]."""

    def __init__(self, cfg: dict):
        super().__init__()
        gated = cfg.get("feed_forward_proj", "relu").startswith("gated-")
        if not gated or cfg.get("is_decoder", False):
            raise ValueError(f"only T5 encoders with a gated feed-forward are supported (feed_forward_proj "
                             f"{cfg.get('feed_forward_proj')!r}, is_decoder {cfg.get('is_decoder', False)})")
        self.shared = nn.Embedding(cfg["vocab_size"], cfg["d_model"])
        self.encoder = T5Stack(cfg)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.shared(ids)
        bias = self.encoder.block[0].layer[0].SelfAttention.position_bias(ids.shape[1]).to(x.dtype)
        if mask is not None:
            bias = bias + torch.where(mask.bool(), 0.0, torch.finfo(x.dtype).min).to(x.dtype)[:, None, None, :]
        for block in self.encoder.block:
            x = block(x, bias)
        return self.encoder.final_layer_norm(x)


def tied_keys(getters: Mapping[str, Callable[[], torch.Tensor]]) -> dict[str, Callable[[], torch.Tensor]]:
    """A file's {key: reader} for T5Encoder: encoder.embed_tokens.weight (tied to shared.weight) is dropped when
    shared.weight is there too, and read as shared.weight when it is alone."""
    getters = dict(getters)
    if TIED in getters:
        tied = getters.pop(TIED)
        getters.setdefault("shared.weight", tied)
    return getters


class T5Tokenizer:
    """prompts -> (ids [B, max_length], mask [B, max_length]) LongTensors, from a T5 tokenizer.json."""

    def __init__(self, path, max_length: int = SD3_MAX_LENGTH):
        self.path, self.max_length = Path(path), max_length
        self.backend = _Backend.from_file(str(self.path))
        self.pad_id = self.backend.token_to_id("<pad>")
        self.eos_id = self.backend.token_to_id("</s>")
        if self.pad_id is None or self.eos_id is None:
            raise ValueError(f"{self.path} has no <pad> or </s> token: not a T5 tokenizer.json")
        self.backend.enable_truncation(max_length)              # room is kept for the </s> the template appends
        self.backend.enable_padding(length=max_length, pad_id=self.pad_id, pad_token="<pad>")

    def truncated(self, prompts: list[str]) -> list[bool]:
        """Whether each prompt loses tokens to max_length (to warn, as the reference does)."""
        return [bool(e.overflowing) for e in self.backend.encode_batch(list(prompts))]

    def __call__(self, prompts: str | list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        encodings = self.backend.encode_batch([prompts] if isinstance(prompts, str) else list(prompts))
        return (torch.tensor([e.ids for e in encodings], dtype=torch.long),
                torch.tensor([e.attention_mask for e in encodings], dtype=torch.long))

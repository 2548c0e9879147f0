"""Building blocks shared by the UNet, the VAE and the CLIP text encoder.

Every attribute is named like the official diffusers key, so weights load with no renaming.
All attention of the package goes through `attention()`: replace `layers.attention` to swap it everywhere, or set
the UNet's alone with `UNet.attention_kernel(kernel)`.

An attention controller reads and may replace the attention probabilities of UNet layers (Prompt-to-Prompt,
LEDITS++ masks); it is set with `UNet.attention_controller(ctrl)`. It is any callable

    ctrl(layer: AttentionLayer, size: (h, w), probs [B, heads, N, M]) -> probs [B, heads, N, M] | None (keep)

with N = h * w image tokens and M keys (the 77 text tokens for cross-attention, N for self-attention), and an
optional `ctrl.wants(layer, size) -> bool` (absent: every layer). Only the layers it wants compute explicit
probabilities; the others, and every layer when no controller is set, keep the UNet's kernel (`attention()`).

A cross-attention's context may come with its keys and values computed once for a whole edit (parity.TextKV:
`keys_values(attn)`, and `zero_v` where every value is 0, making the attention to_out's bias alone).

Controllers and kernels are per call, not on the shared modules: CALL holds {(attention module, "controller" |
"kernel"): value} in a context variable, which each thread (and asyncio task) has its own of, so two threads
editing with one loaded model never see each other's controller.
"""
import contextvars
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def attention(q, k, v, heads: int, upcast: bool = False, causal: bool = False):
    """softmax(q k^T / sqrt(d)) v per head.  q [B, N, C], k and v [B, M, C] -> [B, N, C], C = heads * d."""
    B, N, C = q.shape
    dtype = q.dtype
    if upcast:  # SD 2.1 (768) computes attention in fp32, then casts back
        q, k, v = q.float(), k.float(), v.float()
    q, k, v = (x.unflatten(-1, (heads, C // heads)).transpose(1, 2) for x in (q, k, v))  # [B, heads, N|M, d]
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return out.transpose(1, 2).reshape(B, N, C).to(dtype)



def attention_probs(q, k, heads: int, upcast: bool = False):
    """softmax(q k^T / sqrt(d)) per head.  q [B, N, C], k [B, M, C] -> probs [B, heads, N, M] in q's dtype.

    As diffusers' Attention.get_attention_scores in the SD UNets (upcast_attention from the config,
    upcast_softmax never set): with upcast, scores and softmax in fp32 (SD 2.1 768), then cast back.
    """
    B, N, C = q.shape
    dtype = q.dtype
    if upcast:
        q, k = q.float(), k.float()
    q, k = (x.unflatten(-1, (heads, -1)).transpose(1, 2).flatten(0, 1) for x in (q, k))  # [B * heads, N|M, d]
    empty = q.new_empty(B * heads, N, k.shape[1])  # beta=0: ignored; alpha scales inside the matmul (one rounding)
    scores = torch.baddbmm(empty, q, k.transpose(1, 2), beta=0, alpha=(C // heads) ** -0.5)
    return scores.softmax(dim=-1).to(dtype).unflatten(0, (B, heads))


def attend(probs, v):
    """probs [B, heads, N, M] @ v [B, M, C] per head -> [B, N, C], in v's dtype.

    As diffusers' AttnProcessor: in fp16 the probabilities are fp16 here, where the fused kernel keeps them in fp32
    (docs/benchmarks.md: how far that moves a UNet whose every layer is controlled)."""
    v = v.unflatten(-1, (probs.shape[1], -1)).transpose(1, 2)  # [B, heads, M, d]
    return (probs.to(v.dtype) @ v).transpose(1, 2).flatten(2)


CALL = contextvars.ContextVar("minledits_attention_call", default={})  # set by UNet._every_attention


@dataclass(frozen=True)
class AttentionLayer:
    """Which UNet attention a controller sees: name = official key prefix
    ("down_blocks.1.attentions.0.transformer_blocks.0.attn2"), place "down" | "mid" | "up", block = level index
    (0 for mid), cross = attn2 (to the text) rather than attn1 (self-attention)."""
    name: str
    place: str
    block: int
    cross: bool


def _every(layer, size):  # the default `wants` of a controller
    return True


def timestep_embedding(t, dim: int, max_period: float = 10000.0):
    """Sinusoidal embedding [B] -> [B, dim] as [cos, sin] (flip_sin_to_cos=True, freq_shift=0)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm, optionally followed by an in-place SiLU (no second activation-sized buffer)."""

    def forward(self, x, silu: bool = False):
        x = F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return F.silu(x, inplace=True) if silu else x


class ResnetBlock2D(nn.Module):
    """h = conv2(silu(norm2(conv1(silu(norm1(x))) + time_emb_proj(silu(temb))))); out = shortcut(x) + h."""

    def __init__(self, in_ch, out_ch, temb_ch=None, groups=32, eps=1e-5):
        super().__init__()
        self.norm1 = GroupNorm(groups, in_ch, eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_ch, out_ch) if temb_ch else None
        self.norm2 = GroupNorm(groups, out_ch, eps)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x, temb=None):
        h = self.conv1(self.norm1(x, silu=True))
        if self.time_emb_proj is not None:
            h += self.time_emb_proj(F.silu(temb))[:, :, None, None]  # in place on fresh conv outputs: no new buffer
        h = self.conv2(self.norm2(h, silu=True))
        return h.add_(x if self.conv_shortcut is None else self.conv_shortcut(x))


class Attention(nn.Module):
    """Multi-head attention with separate to_q / to_k / to_v and to_out.0 (to_out.1 is a dropout placeholder).

    In the UNet, `layer` says which one it is and `controller` (see the module docstring) may edit its probabilities.
    """
    layer: AttentionLayer | None = None  # set by the UNet; None in the VAE

    @property
    def controller(self):  # set by UNet.attention_controller, for this thread's call (CALL)
        return CALL.get().get((self, "controller"))

    @property
    def kernel(self):  # set by UNet.attention_kernel, for this thread's call (CALL); None: attention() (fused)
        return CALL.get().get((self, "kernel"))

    def __init__(self, dim, heads, head_dim, context_dim=None, bias=False, upcast=False):
        super().__init__()
        inner, context_dim = heads * head_dim, context_dim or dim
        self.heads, self.upcast = heads, upcast
        self.to_q = nn.Linear(dim, inner, bias=bias)
        self.to_k = nn.Linear(context_dim, inner, bias=bias)
        self.to_v = nn.Linear(context_dim, inner, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(0.0)])

    def forward(self, x, context=None, size=None):
        """x [B, N, dim], context [B, M, context_dim] or its parity.TextKV (None: self-attention), size (h, w) of the
        N = h * w tokens."""
        ctrl = self.controller
        plain = ctrl is None or not getattr(ctrl, "wants", _every)(self.layer, size)
        if plain and getattr(context, "zero_v", False):  # softmax(q k^T) 0 = 0: to_out(0) = its bias (parity.py)
            return self.to_out[0].bias.expand(x.shape).clone()  # a fresh tensor: the caller adds into it
        q = self.to_q(x)  # before k and v, as diffusers: the order autograd sums x's three gradients in
        if hasattr(context, "keys_values"):  # computed once for the edit (parity.TextKV)
            k, v = context.keys_values(self)
        else:
            context = x if context is None else context
            k, v = self.to_k(context), self.to_v(context)
        if plain:
            return self.to_out[0]((self.kernel or attention)(q, k, v, self.heads, upcast=self.upcast))  # no probs kept
        probs = attention_probs(q, k, self.heads, self.upcast)
        edited = ctrl(self.layer, size, probs)
        return self.to_out[0](attend(probs if edited is None else edited, v))


class GEGLU(nn.Module):
    """GEGLU(x) = a * gelu(b) with [a, b] = proj(x)  (ff.net.0)."""

    def __init__(self, dim, inner):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x):
        a, b = self.proj(x).chunk(2, dim=-1)
        return F.gelu(b).mul_(a)  # the product written into gelu's fresh buffer


class FeedForward(nn.Module):
    def __init__(self, dim, mult=4):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, mult * dim), nn.Dropout(0.0), nn.Linear(mult * dim, dim)])

    def forward(self, x):
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the text context, and GEGLU feed-forward, each residual."""

    def __init__(self, dim, heads, head_dim, context_dim, upcast=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, head_dim, upcast=upcast)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, head_dim, context_dim, upcast=upcast)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x, context, size=None):  # x = x + f(x) three times, added in place into the fresh f(x)
        x = self.attn1(self.norm1(x), size=size).add_(x)
        x = self.attn2(self.norm2(x), context, size).add_(x)
        return self.ff(self.norm3(x)).add_(x)


class Transformer2DModel(nn.Module):
    """GroupNorm, proj_in (1x1 conv in SD1, Linear in SD2), transformer blocks on [B, H*W, C] tokens, proj_out."""

    def __init__(self, channels, heads, context_dim, groups=32, layers=1, linear=False, upcast=False):
        super().__init__()
        inner, self.linear = channels, linear  # SD: heads * head_dim == channels
        Proj = nn.Linear if linear else (lambda i, o: nn.Conv2d(i, o, 1))
        self.norm = GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = Proj(channels, inner)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, inner // heads, context_dim, upcast) for _ in range(layers))
        self.proj_out = Proj(inner, channels)

    def forward(self, x, context):
        B, _, H, W = x.shape
        h = self.norm(x)
        if not self.linear:
            h = self.proj_in(h)
        h = h.permute(0, 2, 3, 1).reshape(B, H * W, -1)
        if self.linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context, (H, W))
        if self.linear:
            h = self.proj_out(h)
        h = h.reshape(B, H, W, -1).permute(0, 3, 1, 2)
        if not self.linear:  # contiguous NCHW: a channels-last input takes another conv kernel (other rounding)
            h = self.proj_out(h.contiguous())
        return x + h


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv. padding=0 (the VAE) first pads right and bottom by one: F.pad (0, 1, 0, 1)."""

    def __init__(self, channels, padding=1):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.padding == 0 else x)


class Upsample2D(nn.Module):
    """Nearest-neighbour upsampling (x2, or to `size` for odd skip shapes), then a 3x3 conv."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, size=None):
        x = F.interpolate(x, size=size, scale_factor=None if size else 2.0, mode="nearest")
        return self.conv(x)

"""The MMDiT of Stable Diffusion 3 / 3.5 (diffusers' SD3Transformer2DModel), built from transformer/config.json.

Notation (code name -> symbol):
    x        latent [B, C, h, w] -> image tokens x [B, N, D]      p = patch_size, grid (H, W) = (h/p, w/p), N = H W
    c        text context [B, M, joint_attention_dim] -> text tokens c [B, M, D]   (SD3: M = 77 + 256)
    pooled   pooled text [B, P];  t the timestep as the pipeline passes it (1000 sigma)
    y        conditioning vector [B, D];  D = heads * d (num_attention_heads * attention_head_dim)
    beta, gamma, alpha   shift, scale and gate of adaLN-Zero, each [B, D], made from y per block and stream

    x_0 = conv_p(x) + E[top : top + H, left : left + W]        pos_embed: patchify, then the 2-D sin-cos table E
    y = mlp_t(sin(t)) + mlp_p(pooled)                           time_text_embed: 256 sinusoids [cos, sin]; SiLU MLPs
    c_0 = W_c c                                                 context_embedder
    mod(u; beta, gamma) = LN(u) (1 + gamma) + beta              LayerNorm without weights, eps 1e-6

Joint block i (transformer_blocks.i), image stream x, text stream c:
    beta1, gamma1, alpha1, beta2, gamma2, alpha2 = norm1.linear(silu(y))             (norm1_context: the text's)
    [o_x; o_c] = softmax(q k^T / sqrt(d)) v,  q = [q_x; q_c], k = [k_x; k_c], v = [v_x; v_c]   over all N + M tokens
    q_x = rms(W_q mod(x; beta1, gamma1)), q_c = rms(W_q' mod(c; beta1', gamma1'))   (k alike, rms per head: qk_norm)
    x' = x + alpha1 to_out(o_x)                                 c' = c + alpha1' to_add_out(o_c)
    x' += alpha3 attn2(mod(x; beta3, gamma3))                   SD3.5 dual blocks: image self-attention (norm1 gives 9)
    x'' = x' + alpha2 ff(mod(x'; beta2, gamma2))                c'' = c' + alpha2' ff_context(mod(c'; beta2', gamma2'))
    ff(u) = W_2 gelu_tanh(W_1 u)                                4 D inner
The last block is context_pre_only: its text tokens only give keys and values (c = mod(c; beta', gamma') with
gamma', beta' = norm1_context.linear(silu(y)), AdaLayerNormContinuous: scale first) and no text stream leaves it.
    gamma, beta = norm_out.linear(silu(y));  v = unpatchify(proj_out(mod(x_L; beta, gamma)))   [B, C', h, w]

E (pos_embed.pos_embed, a saved buffer): S x S positions (S = pos_embed_max_size) in units of the training grid
(u = i / (S / b), b = sample_size / p); row-major, the first D/2 channels encode the column, the last D/2 the row,
each as [sin(u omega), cos(u omega)], omega_k = 10000^(-k / (D/4)). The grid's crop is centred:
top = (S - H) // 2, left = (S - W) // 2.

Attention controllers (layers module docstring): block i's joint attention is
AttentionLayer("transformer_blocks.{i}.attn", "joint", i, cross=True) and its probabilities are read-only: a
controller sees the N image tokens' probabilities to the M text tokens [B, heads, N, M] (the softmax over all N + M
keys, then the text columns: a row sums to < 1), and the block's output still comes from the fused kernel, unchanged.
SD3.5's attn2 is AttentionLayer("transformer_blocks.{i}.attn2", "joint", i, cross=False), a plain self-attention
[B, heads, N, N] that a controller may replace as in the UNet (None keeps the fused kernel's output).

Equal text rows, counted once (forward's `counts`; collapse() finds them). Every operation on the text stream acts on
each token alone except the joint attention, where n equal keys with equal values act as one key whose logit is
raised by log n:  sum_j=1..n exp(s) v = exp(s + log n) v.  Equal text tokens stay equal through every block, so
the transformer runs exactly (to float rounding) on one row per run of equal rows (SD3 without T5: its 256 zero
rows become one, M = 77 + 1):
    c  [B, M', joint_attention_dim],  counts [M'] (n_j >= 1: how many rows text row j stands for; None: 1 each)
    [o_x; o_c] = softmax(q k^T / sqrt(d) + [0 (N image keys); log n_j]) v            the joint attention
A controller then sees M' text columns: the column of a row that stands for n rows is the sum of their n columns
(probs [B, heads, N, M']). An attention_kernel takes no logit bias: with counts, its keys and values are the rows
repeated n_j times (exact, no saving).
"""
import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from . import layers
from .layers import attend, attention_probs, timestep_embedding
from .t5 import RMSNorm
from .unet import TimestepEmbedding

DEFAULTS = {"sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 18, "attention_head_dim": 64,
            "num_attention_heads": 18, "joint_attention_dim": 4096, "caption_projection_dim": 1152,
            "pooled_projection_dim": 2048, "out_channels": 16, "pos_embed_max_size": 96, "dual_attention_layers": (),
            "qk_norm": None}
QK_NORMS = (None, "rms_norm")
TIME_CHANNELS = 256  # sinusoids of t
PROBS_CHUNK = 2 ** 27  # scores computed at once when a controller reads the joint attention (rows split to fit)


def check_config(cfg: dict) -> None:
    """Refuse, by name, every option of the diffusers config this transformer does not implement."""
    unknown = sorted(k for k in cfg if k not in DEFAULTS and not k.startswith("_"))
    D = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    if unknown:
        raise ValueError(f"transformer config options {unknown} are not supported")
    if cfg["qk_norm"] not in QK_NORMS:
        raise ValueError(f"transformer config qk_norm={cfg['qk_norm']!r} is not supported (only {QK_NORMS})")
    if cfg["caption_projection_dim"] != D:
        raise ValueError(f"transformer config caption_projection_dim={cfg['caption_projection_dim']!r} is not "
                         f"supported (only num_attention_heads * attention_head_dim = {D})")
    if D % 4 or not cfg["pos_embed_max_size"]:
        raise ValueError(f"transformer config needs a width divisible by 4 (this one: {D}) and a pos_embed_max_size "
                         f"(this one: {cfg['pos_embed_max_size']!r})")
    if not set(cfg["dual_attention_layers"]) <= set(range(cfg["num_layers"])):
        raise ValueError(f"transformer config dual_attention_layers={list(cfg['dual_attention_layers'])} names "
                         f"layers outside 0..{cfg['num_layers'] - 1}")


def sincos_table(D: int, S: int, base: int) -> torch.Tensor:
    """E [S * S, D] (module docstring): row-major positions, [column's sin-cos; row's sin-cos], in float32."""
    u = torch.arange(S, dtype=torch.float32) / (S / base)
    omega = 1.0 / 10000 ** (torch.arange(D // 4, dtype=torch.float64) / (D / 4))
    e = torch.cat([torch.sin(u.double()[:, None] * omega), torch.cos(u.double()[:, None] * omega)], -1).float()
    return torch.cat([e[None].expand(S, S, -1), e[:, None].expand(S, S, -1)], -1).reshape(S * S, D)


def collapse(c):
    """(c', counts): c [B, M, D] with each run of consecutive text rows that are equal in every batch row kept once,
    counts [M'] how many rows each kept row stands for (module docstring); (c, None) when no two neighbours are
    equal."""
    same = (c[:, 1:] == c[:, :-1]).all(-1).all(0)  # [M - 1]: row j + 1 equals row j
    if not bool(same.any()):
        return c, None
    first = torch.cat([same.new_ones(1), ~same])  # the first row of each run
    starts = first.nonzero().squeeze(1)
    return c[:, first], torch.diff(starts, append=starts.new_tensor([c.shape[1]]))


def biased_attention(q, k, v, heads, bias):
    """softmax(q k^T / sqrt(d) + bias) v per head, bias [L] over the keys.  q [B, N, C], k, v [B, L, C] -> [B, N, C]."""
    B, N, C = q.shape
    q, k, v = (u.unflatten(-1, (heads, -1)).transpose(1, 2) for u in (q, k, v))  # [B, heads, N|L, d]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype).expand(1, 1, 1, -1))
    return out.transpose(1, 2).reshape(B, N, C)


def biased_probs(q, k, heads, bias):
    """softmax(q k^T / sqrt(d) + bias) per head (layers.attention_probs with the bias [L] added to the logits)."""
    B, N, C = q.shape
    q, k = (u.unflatten(-1, (heads, -1)).transpose(1, 2).flatten(0, 1) for u in (q, k))  # [B * heads, N|L, d]
    scores = torch.baddbmm(bias.to(q.dtype).expand(B * heads, N, -1), q, k.transpose(1, 2), alpha=(C // heads) ** -0.5)
    return scores.softmax(dim=-1).unflatten(0, (B, heads))


def mod(u, beta, gamma):
    """LN(u) (1 + gamma) + beta: u [B, L, D], beta and gamma [B, D]."""
    return F.layer_norm(u, u.shape[-1:], eps=1e-6) * (1 + gamma[:, None]) + beta[:, None]


class PatchEmbed(nn.Module):
    """x [B, C, h, w] -> conv_p(x) as tokens [B, N, D], plus the grid's centred crop of E."""

    def __init__(self, cfg, D):
        super().__init__()
        p, S = cfg["patch_size"], cfg["pos_embed_max_size"]
        self.proj = nn.Conv2d(cfg["in_channels"], D, p, stride=p)
        self.register_buffer("pos_embed", sincos_table(D, S, cfg["sample_size"] // p)[None])

    def forward(self, x, size):
        (H, W), S = size, int(self.pos_embed.shape[1] ** 0.5)
        top, left = (S - H) // 2, (S - W) // 2
        E = self.pos_embed.unflatten(1, (S, S))[:, top:top + H, left:left + W].flatten(1, 2)
        return (self.proj(x).flatten(2).transpose(1, 2) + E).contiguous()


class TimeTextEmbedding(nn.Module):
    """y = mlp_t(sin(t)) + mlp_p(pooled); both MLPs are linear_2(silu(linear_1(.)))."""

    def __init__(self, D, P):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(TIME_CHANNELS, D)
        self.text_embedder = TimestepEmbedding(P, D)

    def forward(self, t, pooled):
        sin_t = timestep_embedding(t, TIME_CHANNELS).to(pooled.dtype)
        return self.timestep_embedder(sin_t) + self.text_embedder(pooled)


class Modulation(nn.Module):
    """The n vectors [B, D] of linear(silu(y)), in diffusers' order (AdaLayerNormZero and its kin: their LayerNorm
    has no weights, so mod() applies them)."""

    def __init__(self, D, n):
        super().__init__()
        self.n, self.linear = n, nn.Linear(D, n * D)

    def forward(self, y):
        return self.linear(F.silu(y)).chunk(self.n, dim=1)


class GELU(nn.Module):
    def __init__(self, dim, inner):
        super().__init__()
        self.proj = nn.Linear(dim, inner)

    def forward(self, x):
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """ff(u) = W_2 gelu_tanh(W_1 u)  (net.0.proj, net.2; net.1 is a dropout placeholder)."""

    def __init__(self, D):
        super().__init__()
        self.net = nn.ModuleList([GELU(D, 4 * D), nn.Dropout(0.0), nn.Linear(4 * D, D)])

    def forward(self, x):
        return self.net[2](self.net[0](x))


class JointAttention(layers.Attention):
    """The joint attention of a block (text=True: add_{q,k,v}_proj for the text tokens, to_add_out unless the block
    is context_pre_only) or SD3.5's image self-attention attn2 (text=False). qk_norm: RMSNorm per head of q and k."""

    def __init__(self, D, heads, head_dim, qk_norm, text=False, text_out=True):
        super().__init__(D, heads, head_dim, bias=True)
        rms = (lambda: RMSNorm(head_dim, 1e-6)) if qk_norm else (lambda: None)
        self.norm_q, self.norm_k = rms(), rms()
        if text:
            self.add_q_proj, self.add_k_proj, self.add_v_proj = (nn.Linear(D, heads * head_dim) for _ in range(3))
            self.norm_added_q, self.norm_added_k = rms(), rms()
        self.to_add_out = nn.Linear(heads * head_dim, D) if text and text_out else None

    def project(self, u, proj, norm):  # u [B, L, D] -> proj(u), RMS-normed per head when norm
        u = proj(u)
        return u if norm is None else norm(u.unflatten(-1, (self.heads, -1))).flatten(2)

    def forward(self, x, c=None, size=None, counts=None):
        """x [B, N, D] image tokens, c [B, M, D] text tokens (None: attn2), counts [M] the rows each text row stands
        for (None: 1 each; module docstring) -> (o_x [B, N, D], o_c [B, M, D] | None)."""
        N = x.shape[1]
        q, k, v = self.project(x, self.to_q, self.norm_q), self.project(x, self.to_k, self.norm_k), self.to_v(x)
        if c is not None:
            q = torch.cat([q, self.project(c, self.add_q_proj, self.norm_added_q)], dim=1)
            k = torch.cat([k, self.project(c, self.add_k_proj, self.norm_added_k)], dim=1)
            v = torch.cat([v, self.add_v_proj(c)], dim=1)
        bias = None if counts is None else F.pad(counts.to(q.device, torch.float32).log(), (N, 0))  # [N + M]
        edited = self.read(q, k, N, size, bias)
        if edited is not None:
            o = attend(edited, v)
        elif bias is None:
            o = (self.kernel or layers.attention)(q, k, v, self.heads)
        elif self.kernel is not None:  # a kernel takes no bias: each text row's key and value n_j times
            k, v = (torch.cat([u[:, :N], u[:, N:].repeat_interleave(counts.to(u.device), dim=1)], 1) for u in (k, v))
            o = self.kernel(q, k, v, self.heads)
        else:
            o = biased_attention(q, k, v, self.heads, bias)
        return self.to_out[0](o[:, :N]), None if self.to_add_out is None else self.to_add_out(o[:, N:])

    def read(self, q, k, N, size, bias=None):
        """Show the controller (if it wants this layer) its probabilities; the probabilities it returns, or None.
        bias [N + M]: log counts of the keys (module docstring), None: 0."""
        ctrl = self.controller
        if ctrl is None or not getattr(ctrl, "wants", lambda layer, size: True)(self.layer, size):
            return None
        if not self.layer.cross:  # attn2: softmax over the N image keys, replaceable
            return ctrl(self.layer, size, attention_probs(q, k, self.heads))
        B, L = k.shape[:2]
        rows = max(1, PROBS_CHUNK // (B * self.heads * L))
        probs_of = attention_probs if bias is None else lambda q, k, heads: biased_probs(q, k, heads, bias)
        probs = torch.cat([probs_of(q[:, i:min(i + rows, N)], k, self.heads)[..., N:]
                           for i in range(0, N, rows)], dim=2)  # [B, heads, N, M]: image rows, text columns
        if ctrl(self.layer, size, probs) is not None:
            raise ValueError(f"{self.layer.name}: the joint attention's probabilities are read-only "
                             "(the controller returned a tensor)")
        return None


class JointTransformerBlock(nn.Module):
    def __init__(self, D, heads, head_dim, qk_norm, context_pre_only=False, dual=False):
        super().__init__()
        self.context_pre_only = context_pre_only
        self.norm1 = Modulation(D, 9 if dual else 6)
        self.norm1_context = Modulation(D, 2 if context_pre_only else 6)
        self.attn = JointAttention(D, heads, head_dim, qk_norm, text=True, text_out=not context_pre_only)
        self.attn2 = JointAttention(D, heads, head_dim, qk_norm) if dual else None
        self.ff = FeedForward(D)
        self.ff_context = None if context_pre_only else FeedForward(D)

    def forward(self, x, c, y, size, counts=None):
        """x [B, N, D], c [B, M, D], y [B, D], counts [M] | None -> (x'', c'') (c'' None in the context_pre_only
        block)."""
        beta1, gamma1, alpha1, beta2, gamma2, alpha2, *dual = self.norm1(y)
        m = self.norm1_context(y)
        c_in = mod(c, m[1], m[0]) if self.context_pre_only else mod(c, m[0], m[1])
        o_x, o_c = self.attn(mod(x, beta1, gamma1), c_in, size, counts)
        x_out = x + alpha1[:, None] * o_x
        if self.attn2 is not None:
            beta3, gamma3, alpha3 = dual
            x_out = x_out + alpha3[:, None] * self.attn2(mod(x, beta3, gamma3), None, size)[0]
        x_out = x_out + alpha2[:, None] * self.ff(mod(x_out, beta2, gamma2))
        if self.context_pre_only:
            return x_out, None
        c = c + m[2][:, None] * o_c
        return x_out, c + m[5][:, None] * self.ff_context(mod(c, m[3], m[4]))


class MMDiT(nn.Module):
    """Velocity prediction: mmdit(x [B, C, h, w], t (number, 0-d or [B]), c [B, M, joint_attention_dim],
    pooled [B, P], counts [M] | None) -> v [B, C', h, w]; h and w multiples of patch_size, at most
    pos_embed_max_size patches; counts: how many equal text rows each row of c stands for (module docstring;
    with c1, n = collapse(c), mmdit(x, t, c1, pooled, n) is mmdit(x, t, c, pooled) on one row per run)."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = cfg = {**DEFAULTS, **config}
        cfg["out_channels"] = cfg["out_channels"] or cfg["in_channels"]
        check_config(cfg)
        heads, d, L = cfg["num_attention_heads"], cfg["attention_head_dim"], cfg["num_layers"]
        D = heads * d
        self.pos_embed = PatchEmbed(cfg, D)
        self.time_text_embed = TimeTextEmbedding(D, cfg["pooled_projection_dim"])
        self.context_embedder = nn.Linear(cfg["joint_attention_dim"], D)
        self.transformer_blocks = nn.ModuleList(
            JointTransformerBlock(D, heads, d, cfg["qk_norm"], i == L - 1, i in cfg["dual_attention_layers"])
            for i in range(L))
        self.norm_out = Modulation(D, 2)
        self.proj_out = nn.Linear(D, cfg["patch_size"] ** 2 * cfg["out_channels"])
        for i, block in enumerate(self.transformer_blocks):
            for name in ("attn", "attn2"):
                if getattr(block, name) is not None:
                    getattr(block, name).layer = layers.AttentionLayer(
                        f"transformer_blocks.{i}.{name}", "joint", i, cross=name == "attn")

    def attention_controller(self, ctrl):
        """`with mmdit.attention_controller(ctrl):` every attention of the transformer shows ctrl its probabilities
        (module docstring) in this thread; the previous controllers come back on exit, so these nest."""
        return self._every_attention("controller", ctrl)

    def attention_kernel(self, kernel):
        """`with mmdit.attention_kernel(kernel):` every attention whose probabilities no controller replaces computes
        with kernel(q, k, v, heads) (None: layers.attention, fused); these nest too."""
        return self._every_attention("kernel", kernel)

    @contextlib.contextmanager
    def _every_attention(self, name, value):  # per call, in this thread's context (layers.CALL), as the UNet's
        pairs = {(m, name): value for m in self.modules() if isinstance(m, layers.Attention)}
        token = layers.CALL.set({**layers.CALL.get(), **pairs})
        try:
            yield value
        finally:
            layers.CALL.reset(token)

    def forward(self, x, t, c, pooled, counts=None):
        B, _, h, w = x.shape
        p, S, C = self.config["patch_size"], self.config["pos_embed_max_size"], self.config["out_channels"]
        H, W = h // p, w // p
        if h % p or w % p or H > S or W > S:
            raise ValueError(f"latent {h}x{w} does not fit the transformer: sides multiples of {p}, "
                             f"at most {p * S}")
        if counts is not None:
            counts = torch.as_tensor(counts)
            if counts.shape != (c.shape[1],) or counts.is_floating_point() or bool((counts < 1).any()):
                raise ValueError(f"counts must be {c.shape[1]} integers >= 1 (one per text row), got "
                                 f"{list(counts.shape)} {counts.dtype}")
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(B)
        x = self.pos_embed(x, (H, W))
        y = self.time_text_embed(t, pooled)
        c = self.context_embedder(c)
        for block in self.transformer_blocks:
            x, c = block(x, c, y, (H, W), counts)
        gamma, beta = self.norm_out(y)
        v = self.proj_out(mod(x, beta, gamma))  # [B, N, p * p * C']
        return v.reshape(B, H, W, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, h, w)

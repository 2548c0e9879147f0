"""FLUX.1's transformer (diffusers' FluxTransformer2DModel), built from transformer/config.json.

Notation (code name -> symbol):
    x        packed latent [B, N, 4C]: the latent [B, C, h, w] cut in 2 x 2 patches, N = (h/2)(w/2) (pack)
    c        T5 text [B, M, joint_attention_dim] (M = 512);  pooled: CLIP's pooled text [B, P]
    t, g     the time sigma and the guidance scale as the pipeline passes them (t = timestep / 1000), each [B]
    y        conditioning vector [B, D];  D = heads * d (num_attention_heads * attention_head_dim)
    beta, gamma, alpha   shift, scale and gate of adaLN-Zero, each [B, D], made from y per block and stream
    ids      positions [L, 3] of the L = M + N tokens, in FLUX's order [text; image]: text (0, 0, 0) (text_ids),
             image (0, row, col) on the packed grid (image_ids);  u = [c; x] the tokens in that order

    x_0 = W_x x,  c_0 = W_c c                                    x_embedder, context_embedder
    y = mlp_t(sin(1000 t)) + mlp_g(sin(1000 g)) + mlp_p(pooled)   time_text_embed: 256 sinusoids [cos, sin], SiLU
                                                                 MLPs; mlp_g (guidance_embedder) on FLUX.1-dev only
    mod(u; beta, gamma) = LN(u) (1 + gamma) + beta               LayerNorm without weights, eps 1e-6
    rms(u) = w u / sqrt(mean(u^2) + 1e-6)                        per head of q and k (norm_q, norm_k, norm_added_*;
                                                                 torch's RMSNorm: in fp32, then u's dtype)
    R(u)                                                         RoPE (pos_embed): a head's d channels are cut in
                                                                 axes_dims_rope = (d_0, d_1, d_2) for the 3 id axes;
    (u_2j, u_2j+1) -> (u_2j cos phi - u_2j+1 sin phi, u_2j+1 cos phi + u_2j sin phi),  phi = ids_a 10000^(-2j / d_a)
                                                                 for pair j of axis a's channels (text: phi = 0)

Double-stream block i (transformer_blocks.i), image stream x, text stream c:
    beta1, gamma1, alpha1, beta2, gamma2, alpha2 = norm1.linear(silu(y))             (norm1_context: the text's ')
    q = R([rms(W_q' mod(c; beta1', gamma1')); rms(W_q mod(x; beta1, gamma1))])      k alike, v without rms and R
    [o_c; o_x] = softmax(q k^T / sqrt(d)) v                                          over all M + N tokens
    x' = x + alpha1 to_out(o_x)                                 c' = c + alpha1' to_add_out(o_c)
    x'' = x' + alpha2 ff(mod(x'; beta2, gamma2))                c'' = c' + alpha2' ff_context(mod(c'; beta2', gamma2'))
    ff(u) = W_2 gelu_tanh(W_1 u)                                4 D inner
Single-stream block j (single_transformer_blocks.j), on u = [c; x] (L tokens):
    beta, gamma, alpha = norm.linear(silu(y));  h = mod(u; beta, gamma)
    o = softmax(R(rms(W_q h)) R(rms(W_k h))^T / sqrt(d)) W_v h                       attn: no output projection
    u' = u + alpha proj_out([o, gelu_tanh(proj_mlp(h))])         proj_mlp 4 D wide; proj_out (5 D -> D)
Output: gamma, beta = norm_out.linear(silu(y)) (scale first);  v = proj_out(mod(x_L; beta, gamma))  [B, N, 4C],
x_L the N image rows of the last block's u. In fp16 the text stream of each double block and u of each single block
are clipped to +-65504, as diffusers does.

Attention controllers (layers module docstring): double-stream block i's joint attention is
AttentionLayer("transformer_blocks.{i}.attn", "joint", i, cross=True), size = the packed grid (h/2, w/2) (from the
image ids). A controller sees the N image tokens' probabilities to the M text tokens [B, heads, N, M] (the softmax
over all M + N keys, RoPE applied, then the text columns: a row sums to < 1). They are read-only, as MMDiT's, and the
block's output still comes from the fused kernel, unchanged. The single-stream blocks are not shown to controllers;
an attention_kernel computes every attention, theirs too.
"""
import torch
import torch.nn.functional as F
from torch import nn

from . import layers
from .layers import timestep_embedding
from .mmdit import TIME_CHANNELS, FeedForward, JointAttention, MMDiT, Modulation, TimeTextEmbedding, mod
from .unet import TimestepEmbedding

DEFAULTS = {"patch_size": 1, "in_channels": 64, "out_channels": None, "num_layers": 19, "num_single_layers": 38,
            "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
            "pooled_projection_dim": 768, "guidance_embeds": False, "axes_dims_rope": (16, 56, 56)}
THETA = 10000  # RoPE base
MLP_RATIO = 4  # single-stream blocks' MLP width / D


def check_config(cfg: dict) -> None:
    """Refuse, by name, every option of the diffusers config this transformer does not implement."""
    unknown = sorted(k for k in cfg if k not in DEFAULTS and not k.startswith("_"))
    if unknown:
        raise ValueError(f"transformer config options {unknown} are not supported")
    if cfg["patch_size"] != 1:
        raise ValueError(f"transformer config patch_size={cfg['patch_size']!r} is not supported (only 1: the "
                         "pipeline packs 2 x 2 patches itself)")
    axes, d = list(cfg["axes_dims_rope"]), cfg["attention_head_dim"]
    if len(axes) != 3 or any(a % 2 for a in axes) or sum(axes) != d:
        raise ValueError(f"transformer config axes_dims_rope={axes} is not supported (3 even sizes summing to "
                         f"attention_head_dim = {d})")


def pack(x):
    """x [B, C, h, w] -> tokens [B, (h/2)(w/2), 4C]: each 2 x 2 patch, row-major, its channels (C, 2, 2) flattened."""
    B, C, h, w = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"latent {h}x{w} cannot be packed: sides must be even")
    return x.reshape(B, C, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, (h // 2) * (w // 2), 4 * C)


def unpack(tokens, h: int, w: int):
    """tokens [B, (h/2)(w/2), 4C] -> x [B, C, h, w] (h, w: the latent's size), pack's inverse."""
    B, N, C4 = tokens.shape
    if h % 2 or w % 2 or N != (h // 2) * (w // 2):
        raise ValueError(f"{N} tokens do not unpack to a {h}x{w} latent")
    return tokens.reshape(B, h // 2, w // 2, C4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, C4 // 4, h, w)


def image_ids(h: int, w: int, device=None, dtype=torch.float32):
    """ids [(h/2)(w/2), 3] of the packed tokens of an h x w latent: (0, row, col), row-major."""
    rows, cols = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
    return torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).to(device, dtype)


def text_ids(M: int, device=None, dtype=torch.float32):
    """ids [M, 3] of the text tokens: all 0 (no rotation)."""
    return torch.zeros(M, 3, device=device, dtype=dtype)


def grid(img_ids) -> tuple[int, int]:
    """(h/2, w/2): the packed grid the image ids (0, row, col) cover."""
    return int(img_ids[:, 1].max()) + 1, int(img_ids[:, 2].max()) + 1


def rope(ids, axes):
    """(cos phi, sin phi) [L, d], each angle repeated for its pair of channels (module docstring: R)."""
    cos, sin = [], []
    for a, d_a in enumerate(axes):
        omega = 1.0 / THETA ** (torch.arange(0, d_a, 2, dtype=torch.float64, device=ids.device) / d_a)
        phi = ids[:, a].float().double()[:, None] * omega[None]  # [L, d_a / 2]
        cos.append(phi.cos().repeat_interleave(2, dim=1).float())
        sin.append(phi.sin().repeat_interleave(2, dim=1).float())
    return torch.cat(cos, -1), torch.cat(sin, -1)


def rotate(u, cos_sin, heads: int):
    """R(u): u [B, L, C] (C = heads * d) rotated per head by the angles (cos, sin) [L, d], in fp32, back in u's
    dtype."""
    cos, sin = cos_sin
    u = u.unflatten(-1, (heads, -1))  # [B, L, heads, d]
    even, odd = u.unflatten(-1, (-1, 2)).unbind(-1)
    turned = torch.stack([-odd, even], -1).flatten(3)
    return (u.float() * cos[:, None] + turned.float() * sin[:, None]).to(u.dtype).flatten(2)


class FluxAttention(JointAttention):
    """RMS-normed, rotated attention. text=True: a double-stream block's joint attention over [text; image] (add_*_proj
    for the text, to_add_out); text=False: a single-stream block's over all tokens, with no output projection (the
    block's proj_out takes it)."""

    def __init__(self, D, heads, d, text):
        super().__init__(D, heads, d, qk_norm=False, text=text)
        self.norm_q, self.norm_k = nn.RMSNorm(d, eps=1e-6), nn.RMSNorm(d, eps=1e-6)  # the weight times in fp32
        if text:
            self.norm_added_q, self.norm_added_k = nn.RMSNorm(d, eps=1e-6), nn.RMSNorm(d, eps=1e-6)
        else:
            self.to_out = None

    def forward(self, x, c, cos_sin, size=None):
        """x [B, N, D] image tokens (text=False: all tokens u), c [B, M, D] text tokens (None when text=False),
        cos_sin the rotation of the M + N tokens -> (o_x [B, N, D], o_c [B, M, D]) (text=False: o [B, L, D])."""
        q, k, v = self.project(x, self.to_q, self.norm_q), self.project(x, self.to_k, self.norm_k), self.to_v(x)
        if c is None:
            q, k = rotate(q, cos_sin, self.heads), rotate(k, cos_sin, self.heads)
            return (self.kernel or layers.attention)(q, k, v, self.heads)
        M = c.shape[1]
        q = rotate(torch.cat([self.project(c, self.add_q_proj, self.norm_added_q), q], 1), cos_sin, self.heads)
        k = rotate(torch.cat([self.project(c, self.add_k_proj, self.norm_added_k), k], 1), cos_sin, self.heads)
        v = torch.cat([self.add_v_proj(c), v], 1)
        if self.controller is not None:  # MMDiT's reading takes the image keys first: the softmax is over the same set
            self.read(q[:, M:], torch.cat([k[:, M:], k[:, :M]], 1), x.shape[1], size)
        o = (self.kernel or layers.attention)(q, k, v, self.heads)
        o_c, o_x = o[:, :M].contiguous(), o[:, M:].contiguous()  # contiguous, as diffusers: the same matmul kernel
        return self.to_out[0](o_x), self.to_add_out(o_c)


def clip16(u):
    """u clipped to fp16's range when it is fp16 (as diffusers), else u."""
    return u.clip(-65504, 65504) if u.dtype == torch.float16 else u


class DoubleStreamBlock(nn.Module):
    def __init__(self, D, heads, d):
        super().__init__()
        self.norm1, self.norm1_context = Modulation(D, 6), Modulation(D, 6)
        self.attn = FluxAttention(D, heads, d, text=True)
        self.ff, self.ff_context = FeedForward(D), FeedForward(D)

    def forward(self, x, c, y, cos_sin, size=None):
        """x [B, N, D], c [B, M, D], y [B, D] -> (x'', c'')."""
        beta1, gamma1, alpha1, beta2, gamma2, alpha2 = self.norm1(y)
        beta1_, gamma1_, alpha1_, beta2_, gamma2_, alpha2_ = self.norm1_context(y)
        o_x, o_c = self.attn(mod(x, beta1, gamma1), mod(c, beta1_, gamma1_), cos_sin, size)
        x = x + alpha1[:, None] * o_x
        x = x + alpha2[:, None] * self.ff(mod(x, beta2, gamma2))
        c = c + alpha1_[:, None] * o_c
        return x, clip16(c + alpha2_[:, None] * self.ff_context(mod(c, beta2_, gamma2_)))


class SingleStreamBlock(nn.Module):
    def __init__(self, D, heads, d):
        super().__init__()
        self.norm = Modulation(D, 3)
        self.proj_mlp = nn.Linear(D, MLP_RATIO * D)
        self.proj_out = nn.Linear(D + MLP_RATIO * D, D)
        self.attn = FluxAttention(D, heads, d, text=False)

    def forward(self, u, y, cos_sin):
        """u [B, L, D] = [c; x], y [B, D] -> u'."""
        beta, gamma, alpha = self.norm(y)
        h = mod(u, beta, gamma)
        mlp = F.gelu(self.proj_mlp(h), approximate="tanh")
        return clip16(u + alpha[:, None] * self.proj_out(torch.cat([self.attn(h, None, cos_sin), mlp], 2)))


class TimeGuidanceTextEmbedding(TimeTextEmbedding):
    """y = mlp_t(sin(t)) + mlp_g(sin(g)) + mlp_p(pooled); without the guidance embedder (schnell) MMDiT's y."""

    def __init__(self, D, P, guidance: bool):
        super().__init__(D, P)
        self.guidance_embedder = TimestepEmbedding(TIME_CHANNELS, D) if guidance else None

    def forward(self, t, pooled, g=None):
        if self.guidance_embedder is None:
            return super().forward(t, pooled)
        y = self.timestep_embedder(timestep_embedding(t, TIME_CHANNELS).to(pooled.dtype))
        y = y + self.guidance_embedder(timestep_embedding(g, TIME_CHANNELS).to(pooled.dtype))
        return y + self.text_embedder(pooled)


class FluxTransformer(nn.Module):
    """Velocity prediction on packed tokens: flux(x [B, N, in_channels], t, c [B, M, joint_attention_dim],
    pooled [B, P], img_ids [N, 3], txt_ids [M, 3], guidance=None) -> [B, N, out_channels]; t and guidance as
    FluxPipeline passes them (sigma and the guidance scale: numbers or [B]; the network multiplies both by 1000).
    guidance is required with the guidance embedding (FLUX.1-dev) and refused without it (schnell)."""

    attention_controller = MMDiT.attention_controller  # the same semantics (module docstring); these nest
    attention_kernel = MMDiT.attention_kernel
    _every_attention = MMDiT._every_attention

    def __init__(self, config: dict):
        super().__init__()
        self.config = cfg = {**DEFAULTS, **config}
        cfg["out_channels"] = cfg["out_channels"] or cfg["in_channels"]
        cfg["axes_dims_rope"] = tuple(cfg["axes_dims_rope"])
        check_config(cfg)
        heads, d = cfg["num_attention_heads"], cfg["attention_head_dim"]
        D = heads * d
        self.time_text_embed = TimeGuidanceTextEmbedding(D, cfg["pooled_projection_dim"], cfg["guidance_embeds"])
        self.context_embedder = nn.Linear(cfg["joint_attention_dim"], D)
        self.x_embedder = nn.Linear(cfg["in_channels"], D)
        self.transformer_blocks = nn.ModuleList(DoubleStreamBlock(D, heads, d) for _ in range(cfg["num_layers"]))
        self.single_transformer_blocks = nn.ModuleList(
            SingleStreamBlock(D, heads, d) for _ in range(cfg["num_single_layers"]))
        self.norm_out = Modulation(D, 2)
        self.proj_out = nn.Linear(D, cfg["out_channels"])
        for i, block in enumerate(self.transformer_blocks):
            block.attn.layer = layers.AttentionLayer(f"transformer_blocks.{i}.attn", "joint", i, cross=True)

    @property
    def guidance_embeds(self) -> bool:
        return bool(self.config["guidance_embeds"])

    def forward(self, x, t, c, pooled, img_ids, txt_ids, guidance=None):
        B, N, _ = x.shape
        M = c.shape[1]
        if self.guidance_embeds != (guidance is not None):
            raise ValueError("this FLUX transformer has a guidance embedding: pass guidance" if self.guidance_embeds
                             else "this FLUX transformer has no guidance embedding (schnell): pass no guidance")
        if x.shape[2] != self.config["in_channels"] or img_ids.shape != (N, 3) or txt_ids.shape != (M, 3):
            raise ValueError(f"FLUX transformer inputs do not match: x {list(x.shape)} (in_channels "
                             f"{self.config['in_channels']}), img_ids {list(img_ids.shape)}, txt_ids "
                             f"{list(txt_ids.shape)} (expected [{N}, 3], [{M}, 3])")
        x = self.x_embedder(x)
        per_row = lambda s: torch.as_tensor(s, device=x.device).reshape(-1).expand(B).to(x.dtype) * 1000  # noqa: E731
        y = self.time_text_embed(per_row(t), pooled, None if guidance is None else per_row(guidance))
        c = self.context_embedder(c)
        cos_sin = rope(torch.cat([txt_ids, img_ids]), self.config["axes_dims_rope"])
        watched = any(block.attn.controller is not None for block in self.transformer_blocks)
        size = grid(img_ids) if watched else None
        for block in self.transformer_blocks:
            x, c = block(x, c, y, cos_sin, size)
        u = torch.cat([c, x], 1)
        for block in self.single_transformer_blocks:
            u = block(u, y, cos_sin)
        gamma, beta = self.norm_out(y)
        return self.proj_out(mod(u[:, M:], beta, gamma))

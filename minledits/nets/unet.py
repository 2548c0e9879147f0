"""The Stable Diffusion UNet (diffusers' UNet2DConditionModel) for SD 1.x, 2.x and XL, built from unet/config.json.

Level i has block_out_channels[i] channels; every down level but the last halves the resolution.
A level is "CrossAttn...Block2D" (each resnet followed by a Transformer2DModel) or plain ("DownBlock2D", "UpBlock2D").
Up level i mirrors down level L-1-i with one more resnet; each up resnet eats one skip of the down path (a stack).
Level i's transformers stack transformer_layers_per_block[i] blocks (SDXL: 1, 2, 10; up levels reversed, mid = last).
SDXL adds to the time embedding (addition_embed_type "text_time"; time_ids: original h, w, crop top, left, target h, w):
    temb = time_embedding(sin(t)) + add_embedding([text_embeds, sin(time_ids[0]), ..., sin(time_ids[5])])
with sin() the sinusoidal embedding (width chs[0] for t, addition_time_embed_dim per time id; add_time_proj holds no
weights) and text_embeds the pooled projected text embedding [B, 1280].
Every attention knows its `layer` (layers.AttentionLayer); `unet.attention_controller(ctrl)` lets ctrl edit them.
"""
import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from . import layers
from .layers import Downsample2D, GroupNorm, ResnetBlock2D, Transformer2DModel, Upsample2D, timestep_embedding

# Options of the diffusers config this UNet implements only at their SD value (anything else is refused).
SD_ONLY = {"act_fn": "silu", "flip_sin_to_cos": True, "freq_shift": 0, "only_cross_attention": False,
           "dual_cross_attention": False, "class_embed_type": None,
           "resnet_time_scale_shift": "default", "time_embedding_type": "positional", "encoder_hid_dim": None,
           "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3, "center_input_sample": False,
           "mid_block_type": "UNetMidBlock2DCrossAttn", "attention_type": "default", "num_class_embeds": None,
           "reverse_transformer_layers_per_block": None, "encoder_hid_dim_type": None, "dropout": 0.0,
           "mid_block_scale_factor": 1, "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
           "time_embedding_dim": None, "time_embedding_act_fn": None, "timestep_post_act": None,
           "class_embeddings_concat": False, "mid_block_only_cross_attention": None, "cross_attention_norm": None}
ADDITION_EMBED_TYPES = (None, "text_time")  # text_time: SDXL's pooled text + size/crop conditioning
BLOCK_TYPES = {"CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"}


class TimestepEmbedding(nn.Module):
    def __init__(self, dim, temb_dim):
        super().__init__()
        self.linear_1 = nn.Linear(dim, temb_dim)
        self.linear_2 = nn.Linear(temb_dim, temb_dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


def _resnet(cfg, in_ch, out_ch):
    temb_ch = 4 * cfg["block_out_channels"][0]
    return ResnetBlock2D(in_ch, out_ch, temb_ch, cfg.get("norm_num_groups", 32), cfg.get("norm_eps", 1e-5))


def _transformer(cfg, ch, heads, depth):
    return Transformer2DModel(ch, heads, cfg["cross_attention_dim"], cfg.get("norm_num_groups", 32), depth,
                              cfg.get("use_linear_projection", False), bool(cfg.get("upcast_attention")))


def per_level(cfg, key, default, L) -> list[int]:
    """An int-or-list config entry as one int per level (a list of lists, per resnet, is refused)."""
    value = cfg.get(key) or default
    value = [value] * L if isinstance(value, int) else list(value)
    if len(value) != L or not all(isinstance(v, int) for v in value):
        raise ValueError(f"UNet config {key}={value!r} is not supported (one int, or one int per level)")
    return value


class Level(nn.Module):
    """resnets[j] (in_chs[j] -> out_ch), attentions[j] (depth transformer blocks) when cross_attn, then
    downsamplers.0 or upsamplers.0."""

    def __init__(self, cfg, in_chs, out_ch, heads, depth, cross_attn, resample=None):
        super().__init__()
        self.resnets = nn.ModuleList(_resnet(cfg, c, out_ch) for c in in_chs)
        self.attentions = nn.ModuleList(_transformer(cfg, out_ch, heads, depth) for _ in in_chs) if cross_attn else None
        if resample == "down":
            self.downsamplers = nn.ModuleList([Downsample2D(out_ch, cfg.get("downsample_padding", 1))])
        if resample == "up":
            self.upsamplers = nn.ModuleList([Upsample2D(out_ch)])

    def layer(self, j, h, temb, context):
        h = self.resnets[j](h, temb)
        return h if self.attentions is None else self.attentions[j](h, context)


class DownLevel(Level):
    def forward(self, h, temb, context, skips: list):
        for j in range(len(self.resnets)):
            h = self.layer(j, h, temb, context)
            skips.append(h)
        if hasattr(self, "downsamplers"):
            h = self.downsamplers[0](h)
            skips.append(h)
        return h


class UpLevel(Level):
    def forward(self, h, temb, context, skips: list):
        for j in range(len(self.resnets)):
            h = self.layer(j, torch.cat([h, skips.pop()], dim=1), temb, context)
        if hasattr(self, "upsamplers"):
            h = self.upsamplers[0](h, size=skips[-1].shape[-2:])  # the next skip's size (odd sizes work too)
        return h


class MidBlock(nn.Module):
    """resnets.0, attentions.0, resnets.1 at the lowest resolution."""

    def __init__(self, cfg, ch, heads, depth):
        super().__init__()
        self.resnets = nn.ModuleList([_resnet(cfg, ch, ch), _resnet(cfg, ch, ch)])
        self.attentions = nn.ModuleList([_transformer(cfg, ch, heads, depth)])

    def forward(self, h, temb, context):
        h = self.attentions[0](self.resnets[0](h, temb), context)
        return self.resnets[1](h, temb)


def check_config(cfg: dict) -> None:
    """Refuse, by name, every option of the diffusers config this UNet does not implement."""
    L = len(cfg["down_block_types"])
    for key, value in SD_ONLY.items():
        if cfg.get(key, value) not in (value, [value] * L):
            raise ValueError(f"UNet config {key}={cfg[key]!r} is not supported (only {value!r})")
    if not set(cfg["down_block_types"] + cfg["up_block_types"]) <= BLOCK_TYPES:
        raise ValueError(f"unsupported UNet block types in {cfg['down_block_types'] + cfg['up_block_types']}")
    if cfg.get("addition_embed_type") not in ADDITION_EMBED_TYPES:
        raise ValueError(f"UNet config addition_embed_type={cfg['addition_embed_type']!r} is not supported "
                         f"(only {ADDITION_EMBED_TYPES})")
    for key in ("layers_per_block", "cross_attention_dim"):
        if not isinstance(cfg.get(key, 2), int):
            raise ValueError(f"UNet config {key}={cfg[key]!r} is not supported (one int for every level)")


def attention_layer(name: str) -> layers.AttentionLayer:
    """"up_blocks.1.attentions.2.transformer_blocks.0.attn1" -> AttentionLayer(name, "up", 1, cross=False)."""
    parts = name.split(".")
    place = parts[0].split("_")[0]  # down_blocks / mid_block / up_blocks
    return layers.AttentionLayer(name, place, 0 if place == "mid" else int(parts[1]), cross=parts[-1] == "attn2")


class UNet(nn.Module):
    """eps (or v) prediction: unet(x [B, C, h, w], t (int, 0-d or [B]), context [B, 77, D]) -> [B, C_out, h, w];
    context may be a parity.TextKV, its keys and values computed once for all steps.
    SDXL (text_time) also takes text_embeds [B, P] (pooled text) and time_ids [B, 6] by keyword."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = cfg = dict(config)
        check_config(cfg)
        chs, n, L = cfg["block_out_channels"], cfg.get("layers_per_block", 2), len(cfg["block_out_channels"])
        # diffusers naming quirk: SD configs store the NUMBER OF HEADS per level in `attention_head_dim`
        # (SD1: 8 everywhere, heads of 40..160 channels; SD2: [5, 10, 20, 20] and SDXL: [5, 10, 20], heads of 64
        # channels). A `num_attention_heads` entry, when present, takes precedence. The only place heads are read.
        heads = per_level(cfg, "num_attention_heads", cfg["attention_head_dim"], L)
        depth = per_level(cfg, "transformer_layers_per_block", 1, L)  # transformer blocks per attention, per level

        self.conv_in = nn.Conv2d(cfg.get("in_channels", 4), chs[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(chs[0], 4 * chs[0])
        if cfg.get("addition_embed_type") == "text_time":  # add_time_proj (sinusoids) holds no weights
            self.add_embedding = TimestepEmbedding(cfg["projection_class_embeddings_input_dim"], 4 * chs[0])
        self.down_blocks = nn.ModuleList(
            DownLevel(cfg, [chs[max(i - 1, 0)]] + [chs[i]] * (n - 1), chs[i], heads[i], depth[i],
                      kind.startswith("CrossAttn"), "down" if i < L - 1 else None)
            for i, kind in enumerate(cfg["down_block_types"]))
        self.mid_block = MidBlock(cfg, chs[-1], heads[-1], depth[-1])
        self.up_blocks = nn.ModuleList(self._up_level(cfg, i, kind, n, heads[::-1][i], depth[::-1][i])
                                       for i, kind in enumerate(cfg["up_block_types"]))
        self.conv_norm_out = GroupNorm(cfg.get("norm_num_groups", 32), chs[0], cfg.get("norm_eps", 1e-5))
        self.conv_out = nn.Conv2d(chs[0], cfg.get("out_channels", 4), 3, padding=1)
        for name, module in self.named_modules():
            if isinstance(module, layers.Attention):
                module.layer = attention_layer(name)

    @staticmethod
    def _up_level(cfg, i, kind, n, heads, depth):
        """Up level i works at channels rev[i]; resnet j takes h (prev level's channels, then rev[i]) + one skip."""
        rev, L = cfg["block_out_channels"][::-1], len(cfg["block_out_channels"])
        h_chs = [rev[max(i - 1, 0)]] + [rev[i]] * n
        skip_chs = [rev[i]] * n + [rev[min(i + 1, L - 1)]]  # the last skip comes from the level above
        return UpLevel(cfg, [a + b for a, b in zip(h_chs, skip_chs)], rev[i], heads, depth,
                       kind.startswith("CrossAttn"), "up" if i < L - 1 else None)

    def attention_controller(self, ctrl):
        """`with unet.attention_controller(ctrl):` every attention of the UNet calls ctrl (layers module docstring) in
        this thread; the previous controllers come back on exit, exception or not, so these nest. ctrl=None: none."""
        return self._every_attention("controller", ctrl)

    def attention_kernel(self, kernel):
        """`with unet.attention_kernel(kernel):` every attention of the UNet that no controller reads computes with
        kernel(q, k, v, heads, upcast) (None: layers.attention, fused); these nest too (parity.pipeline_attention)."""
        return self._every_attention("kernel", kernel)

    @contextlib.contextmanager
    def _every_attention(self, name, value):
        # per call: in this thread's context (layers.CALL), not on the modules, so threads sharing a model don't mix
        modules = [m for m in self.modules() if isinstance(m, layers.Attention)]
        token = layers.CALL.set({**layers.CALL.get(), **{(m, name): value for m in modules}})
        try:
            yield value
        finally:
            layers.CALL.reset(token)

    def forward(self, x, t, context, *, text_embeds=None, time_ids=None):
        if hasattr(self, "add_embedding") != (text_embeds is not None) or (text_embeds is None) != (time_ids is None):
            raise ValueError("text_embeds and time_ids go together, and only to a UNet with addition_embed_type "
                             f"'text_time' (this one: {self.config.get('addition_embed_type')!r})")
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        temb = self.time_embedding(timestep_embedding(t, self.conv_in.out_channels).to(x.dtype))
        if text_embeds is not None:
            temb = temb + self.added_embedding(text_embeds, time_ids, x.dtype)
        h = self.conv_in(x)
        skips = [h]
        for block in self.down_blocks:
            h = block(h, temb, context, skips)
        h = self.mid_block(h, temb, context)
        for block in self.up_blocks:
            h = block(h, temb, context, skips)
        return self.conv_out(self.conv_norm_out(h, silu=True))

    def added_embedding(self, text_embeds, time_ids, dtype):
        """SDXL: add_embedding([text_embeds, sin(time_ids)]) [B, 4 * chs[0]] (the module docstring)."""
        B = text_embeds.shape[0]
        sin = timestep_embedding(time_ids.reshape(-1), self.config["addition_time_embed_dim"]).reshape(B, -1)
        return self.add_embedding(torch.cat([text_embeds.to(dtype), sin.to(dtype)], dim=-1))

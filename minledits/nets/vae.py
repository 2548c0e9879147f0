"""The Stable Diffusion VAE (diffusers' AutoencoderKL), built from vae/config.json.

encode: image [B, 3, H, W] in [-1, 1] -> posterior mean [B, C, H/f, W/f] (unscaled; the model subtracts
        shift_factor and multiplies by scaling_factor), f = 2 ** (levels - 1): one halving per level but the last
        (SD's 4 levels: f = 8); C = latent_channels (SD 1.x / 2.x / XL: 4, SD3: 16)
decode: unscaled latents -> image in about [-1, 1]
SD 1.x / 2.x / XL have 1x1 convolutions between the encoder and the latent (quant_conv) and before the decoder
(post_quant_conv); SD3's VAE has neither (use_quant_conv, use_post_quant_conv false) and a shift_factor (0.0609).
"""
import torch
from torch import nn

from .layers import Attention, Downsample2D, GroupNorm, ResnetBlock2D, Upsample2D

EPS = 1e-6  # every norm of the VAE
# Options of the diffusers config implemented only at their SD value (anything else is refused).
SD_ONLY = {"act_fn": "silu", "mid_block_add_attention": True}


class SpatialAttention(Attention):
    """Single-head self-attention over the H*W pixels, residual; adds group_norm to to_q, to_k, to_v, to_out.0."""

    def __init__(self, ch, groups):
        super().__init__(ch, heads=1, head_dim=ch, bias=True)
        self.group_norm = GroupNorm(groups, ch, EPS)

    def forward(self, x):
        B, C, H, W = x.shape
        h = super().forward(self.group_norm(x).view(B, C, H * W).transpose(1, 2))
        return x + h.transpose(1, 2).reshape(B, C, H, W)


class MidBlock(nn.Module):
    def __init__(self, ch, groups):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(ch, ch, None, groups, EPS),
                                      ResnetBlock2D(ch, ch, None, groups, EPS)])
        self.attentions = nn.ModuleList([SpatialAttention(ch, groups)])

    def forward(self, h):
        return self.resnets[1](self.attentions[0](self.resnets[0](h)))


class Level(nn.Module):
    """resnets (no time embedding), then an optional downsamplers.0 / upsamplers.0."""

    def __init__(self, in_ch, out_ch, n, groups, resample=None):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock2D(in_ch if j == 0 else out_ch, out_ch, None, groups, EPS)
                                     for j in range(n))
        if resample == "down":
            self.downsamplers = nn.ModuleList([Downsample2D(out_ch, padding=0)])
        if resample == "up":
            self.upsamplers = nn.ModuleList([Upsample2D(out_ch)])

    def forward(self, h):
        for resnet in self.resnets:
            h = resnet(h)
        if hasattr(self, "downsamplers"):
            h = self.downsamplers[0](h)
        if hasattr(self, "upsamplers"):
            h = self.upsamplers[0](h)
        return h


class Encoder(nn.Module):
    """conv_in, down_blocks (halving all but the last), mid_block, norm + SiLU, conv_out -> 2 * latent channels."""

    def __init__(self, cfg):
        super().__init__()
        chs, n, groups, L = (cfg["block_out_channels"], cfg.get("layers_per_block", 2), cfg.get("norm_num_groups", 32),
                             len(cfg["block_out_channels"]))
        self.conv_in = nn.Conv2d(cfg.get("in_channels", 3), chs[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            Level(chs[max(i - 1, 0)], chs[i], n, groups, "down" if i < L - 1 else None) for i in range(L))
        self.mid_block = MidBlock(chs[-1], groups)
        self.conv_norm_out = GroupNorm(groups, chs[-1], EPS)
        self.conv_out = nn.Conv2d(chs[-1], 2 * cfg.get("latent_channels", 4), 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for block in self.down_blocks:
            h = block(h)
        return self.conv_out(self.conv_norm_out(self.mid_block(h), silu=True))


class Decoder(nn.Module):
    """conv_in, mid_block, up_blocks (up_blocks.0 is the LOWEST resolution), norm + SiLU, conv_out -> RGB."""

    def __init__(self, cfg):
        super().__init__()
        chs, n, groups, L = (cfg["block_out_channels"], cfg.get("layers_per_block", 2), cfg.get("norm_num_groups", 32),
                             len(cfg["block_out_channels"]))
        rev = chs[::-1]
        self.conv_in = nn.Conv2d(cfg.get("latent_channels", 4), chs[-1], 3, padding=1)
        self.mid_block = MidBlock(chs[-1], groups)
        self.up_blocks = nn.ModuleList(
            Level(rev[max(i - 1, 0)], rev[i], n + 1, groups, "up" if i < L - 1 else None) for i in range(L))
        self.conv_norm_out = GroupNorm(groups, chs[0], EPS)
        self.conv_out = nn.Conv2d(chs[0], cfg.get("out_channels", 3), 3, padding=1)

    def forward(self, z):
        h = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(self.conv_norm_out(h, silu=True))


class VAE(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        self.config = cfg = dict(config)
        for key, value in SD_ONLY.items():
            if cfg.get(key, value) != value:
                raise ValueError(f"VAE config {key}={cfg[key]!r} is not supported (only {value!r})")
        latent = cfg.get("latent_channels", 4)
        self.scaling_factor = float(cfg.get("scaling_factor") or 0.18215)
        self.shift_factor = float(cfg.get("shift_factor") or 0.0)
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        for key, name, channels in [("use_quant_conv", "quant_conv", 2 * latent),
                                    ("use_post_quant_conv", "post_quant_conv", latent)]:
            if cfg.get(key, True) not in (True, False):
                raise ValueError(f"VAE config {key}={cfg[key]!r} is not supported (true or false)")
            setattr(self, name, nn.Conv2d(channels, channels, 1) if cfg.get(key, True) else nn.Identity())

    @property
    def conv_dtype(self) -> torch.dtype:
        """The dtype the VAE computes in (its weights')."""
        return self.decoder.conv_in.weight.dtype

    def moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The posterior's (mean, log-variance), each [B, latent_channels, h, w]."""
        return self.quant_conv(self.encoder(images)).chunk(2, dim=1)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Posterior mean E(x)."""
        return self.moments(images)[0]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(latents))

    def forward(self, images):
        return self.decode(self.encode(images))

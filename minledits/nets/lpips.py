"""LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric") on
SqueezeNet 1.1 (Iandola et al. 2016): the background LPIPS of PIE-Bench, as torchmetrics'
LearnedPerceptualImagePatchSimilarity(net_type="squeeze") computes it.

Notation (code name -> symbol)
    x, y        two pictures [B, 3, H, W] in [-1, 1]
    scaled      (x - shift) / scale                          shift, scale: LPIPS' per-channel constants
    feats[l]    F_l(x)                                       the 7 SqueezeNet stages (after conv1, and after each
                                                             Fire group: 64, 128, 256, 384, 384, 512, 512 channels)
    unit        F_l / sqrt(eps + sum_c F_l^2)                unit length over the channels at each pixel (eps 1e-8)
    d           sum_l mean_hw( w_l . (unit(F_l(x)) - unit(F_l(y)))^2 )   w_l >= 0: the 1x1 linear heads (no bias)
SqueezeNet's weights are torchvision's squeezenet1_1 state dict ("features.N.*" keys; the classifier unused);
the heads are the LPIPS v0.1 "squeeze" heads ("linL.model.1.weight", as torchmetrics ships them).
"""
import torch
import torch.nn.functional as F
from torch import nn

SHIFT, SCALE = (-0.030, -0.088, -0.188), (0.458, 0.448, 0.450)
FIRES = {3: (64, 16, 64), 4: (128, 16, 64), 6: (128, 32, 128), 7: (256, 32, 128), 9: (256, 48, 192),
         10: (384, 48, 192), 11: (384, 64, 256), 12: (512, 64, 256)}  # index in features: (in, squeeze, expand)
POOLS = (2, 5, 8)                                      # 3x3 max pools, stride 2, rounding up
STAGES = ((0, 1), (2, 3, 4), (5, 6, 7), (8, 9), (10,), (11,), (12,))  # features indices of each of the 7 stages
CHANNELS = (64, 128, 256, 384, 384, 512, 512)


class Fire(nn.Module):
    """squeeze (1x1) -> ReLU -> [expand1x1, expand3x3 (padding 1)] -> ReLU, concatenated."""

    def __init__(self, c_in: int, s: int, e: int):
        super().__init__()
        self.squeeze = nn.Conv2d(c_in, s, 1)
        self.expand1x1 = nn.Conv2d(s, e, 1)
        self.expand3x3 = nn.Conv2d(s, e, 3, padding=1)

    def forward(self, x):
        x = F.relu(self.squeeze(x))
        return torch.cat([F.relu(self.expand1x1(x)), F.relu(self.expand3x3(x))], 1)


class Features(nn.Module):
    """SqueezeNet 1.1's `features`, its modules at torchvision's indices (ReLU and pools hold no weights)."""

    def __init__(self):
        super().__init__()
        self.add_module("0", nn.Conv2d(3, 64, 3, stride=2))
        for i, (c_in, s, e) in FIRES.items():
            self.add_module(str(i), Fire(c_in, s, e))

    def layer(self, i: int, x):
        if i == 1:
            return F.relu(x)
        if i in POOLS:
            return F.max_pool2d(x, 3, stride=2, ceil_mode=True)
        return getattr(self, str(i))(x)


class LPIPS(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = Features()
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in CHANNELS)
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)

    def stages(self, x) -> list[torch.Tensor]:
        feats, x = [], (x - self.shift) / self.scale
        for stage in STAGES:
            for i in stage:
                x = self.features.layer(i, x)
            feats.append(x)
        return feats

    def forward(self, x, y) -> torch.Tensor:
        """d(x, y) per picture: [B]."""
        d = 0
        for lin, fx, fy in zip(self.lins, self.stages(x), self.stages(y)):
            unit_x = fx / torch.sqrt(1e-8 + fx.square().sum(1, keepdim=True))
            unit_y = fy / torch.sqrt(1e-8 + fy.square().sum(1, keepdim=True))
            d = d + lin((unit_x - unit_y).square()).mean((2, 3))
        return d[:, 0]

    def load(self, squeezenet: dict, heads: dict) -> "LPIPS":
        """Fill from torchvision's squeezenet1_1 state dict and the LPIPS heads; a KeyError or a shape mismatch
        (RuntimeError) where they do not fit."""
        state = {k: v for k, v in squeezenet.items() if k.startswith("features.")}
        state.update({f"lins.{i}.weight": heads[f"lin{i}.model.1.weight"] for i in range(len(CHANNELS))})
        self.load_state_dict(state, strict=True)
        return self.eval().requires_grad_(False)

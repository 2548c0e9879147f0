"""PIE-Bench's seven metrics of an edit, as the benchmark's evaluation (PnPInversion's evaluation/) computes them.

Notation (code name -> symbol); a, b: the source photo and the edit, uint8 RGB 512 x 512; M: the decoded mask
(piebench.decode_mask, 1 = edit region and frame), on the three channels
    bg           1 - M                                 the background, which must not change
    x, y         a / 255 * bg, b / 255 * bg            float32 [1, 3, 512, 512]: the whole array is scored, the
                                                       edit region zero in both (it adds 0 error and SSIM ~1)
    mse          mean((x - y)^2)                       torchmetrics mean_squared_error; paper unit x 10^4
    psnr         10 log10(1 / mse)                     torchmetrics peak_signal_noise_ratio(data_range=1)
    ssim         mean of the SSIM map over the windows  torchmetrics structural_similarity_index_measure(data_range=1):
                 that lie inside the picture            Gaussian 11 x 11, sigma 1.5, K = (0.01, 0.03); the map of
                                                       torchmetrics <= 1.4.1, the paper's (1.4.2 on reflect-pads and
                                                       averages the whole map): its full map cropped by 5 pixels
    lpips        LPIPS_squeeze(2x - 1, 2y - 1)         nets/lpips.py; paper unit x 10^3
    structure    mean((S(a) - S(b))^2)                 S = cos self-similarity [T, T] of DINO ViT-B/8's last keys
                                                       (nets/dino.py; T = 785 tokens, [CLS] included; cos with its
                                                       denominator clamped at 1e-8) on the picture in 0..255 (not
                                                       / 255, as the benchmark), resized to 224 (bilinear, no
                                                       antialias) and ImageNet-normalised; paper unit x 10^3
    clip_whole   100 max(cos(e_img(b), e_txt(t)), 0)   CLIPScore (metrics.Clip.score), t = the stripped target prompt
    clip_edited  the same of uint8(b * M)              the edit region (and frame) kept, the rest black
The background metrics are nan where M covers the whole picture (no background). A network whose weights cannot be
had leaves its metrics nan (Scorer.notes says why in one line each).
"""
import hashlib
import json
import math
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open

from ..errors import MinleditsError
from ..io.load import SkipInit, fill, safetensors_getters
from ..nets.dino import DINO
from ..nets.lpips import LPIPS
from .metrics import Clip, hub_folder

DINO_MODEL = "facebook/dino-vitb8"
SQUEEZENET = "https://download.pytorch.org/models/squeezenet1_1-b8a52dc0.pth"  # torchvision's squeezenet1_1
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
BORDER = 5                       # SSIM's window radius: the map's border whose windows leave the picture
EPS = 1e-8                       # the structure's cosine: denominators clamped here
DINO_RENAMES = [  # transformers >= 5 saves ViTModel under other names than the Hub's files (ours): theirs -> ours
    (r"^vit\.", ""), (r"^layers\.(\d+)\.", r"encoder.layer.\1."),
    (r"\.attention\.q_proj\.", ".attention.attention.query."),
    (r"\.attention\.k_proj\.", ".attention.attention.key."), (r"\.attention\.v_proj\.", ".attention.attention.value."),
    (r"\.attention\.o_proj\.", ".attention.output.dense."), (r"\.mlp\.fc1\.", ".intermediate.dense."),
    (r"\.mlp\.fc2\.", ".output.dense.")]


def uint8(picture) -> np.ndarray:
    return np.asarray(picture.convert("RGB") if isinstance(picture, Image.Image) else picture, dtype=np.uint8)


def background(a, b, m: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y): both pictures / 255 times 1 - M, float32 [1, 3, H, W]."""
    bg = (1 - m.astype(np.float32))[..., None]
    x, y = (torch.from_numpy(uint8(p).astype(np.float32) / 255 * bg).permute(2, 0, 1)[None] for p in (a, b))
    return x.contiguous(), y.contiguous()


def mse(x, y) -> float:
    from torchmetrics.functional import mean_squared_error
    return mean_squared_error(x, y).item()


def psnr(x, y) -> float:
    from torchmetrics.functional.image import peak_signal_noise_ratio
    return peak_signal_noise_ratio(x, y, data_range=1.0).item()


def ssim(x, y) -> float:
    """The paper's SSIM (torchmetrics <= 1.4.1): the mean of the map over the windows inside the picture."""
    from torchmetrics.functional.image import structural_similarity_index_measure
    _, full = structural_similarity_index_measure(x, y, data_range=1.0, return_full_image=True)
    return full[..., BORDER:-BORDER, BORDER:-BORDER].mean().item()


def dino_pixels(picture, size: int) -> torch.Tensor:
    """The structure distance's input: 0..255 floats, resized to size (bilinear), ImageNet-normalised: [1, 3, S, S]."""
    x = torch.from_numpy(uint8(picture).astype(np.float32)).permute(2, 0, 1)[None]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def self_similarity(keys: torch.Tensor) -> torch.Tensor:
    """cos of every pair of tokens' keys [B, T, D] -> [B, T, T], the denominator clamped at EPS."""
    n = keys.norm(dim=-1, keepdim=True)
    return keys @ keys.transpose(1, 2) / (n @ n.transpose(1, 2)).clamp(min=EPS)


def read_config(folder: Path, what: str) -> dict:
    try:
        return json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise MinleditsError(f"{folder} has no readable config.json of {what} ({e})") from None


def dino_key(stored: str) -> str:
    for pattern, ours in DINO_RENAMES:
        stored = re.sub(pattern, ours, stored)
    return stored


def load_dino(model: str = DINO_MODEL, device="cpu") -> DINO:
    """DINO's ViT from a Hub repo or folder in transformers' ViTModel layout (config.json, model.safetensors)."""
    folder = hub_folder(model, ["config.json", "model.safetensors"], "the structure distance")
    with torch.device("meta"), SkipInit():
        net = DINO(read_config(folder, "a ViT"))
    path = folder / "model.safetensors"
    with safe_open(str(path), framework="pt", device="cpu") as f:
        getters = {dino_key(k): g for k, g in safetensors_getters(f, "dino").items()
                   if not dino_key(k).startswith(("layernorm.", "pooler."))}  # the keys use neither
        fill(net, getters, str(path), torch.float32, device)
    return net


def lpips_heads() -> dict:
    """The LPIPS squeeze heads shipped inside torchmetrics (the eval extra)."""
    try:
        import torchmetrics
    except ImportError:
        raise MinleditsError("LPIPS needs torchmetrics (pip install 'minledits[eval]')") from None
    path = Path(torchmetrics.__file__).parent / "functional" / "image" / "lpips_models" / "squeeze.pth"
    return torch.load(path, map_location="cpu", weights_only=True)


def load_lpips(squeezenet: str = SQUEEZENET, device="cpu") -> LPIPS:
    """LPIPS with torchvision's squeezenet1_1 weights (a URL, fetched once into torch's hub cache and checked
    against the hash in its name, or a local .pth state dict) and torchmetrics' heads."""
    try:
        if Path(squeezenet).exists():
            state = torch.load(squeezenet, map_location="cpu", weights_only=True)
        else:
            state = torch.hub.load_state_dict_from_url(squeezenet, map_location="cpu", check_hash=True,
                                                       weights_only=True, progress=False)
        return LPIPS().load(state, lpips_heads()).to(device)
    except MinleditsError:
        raise
    except Exception as e:  # no network, a bad file, other weights
        why = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise MinleditsError(f"LPIPS needs SqueezeNet 1.1's weights from {squeezenet}: {why}") from None


class Scorer:
    """The seven metrics with the networks that could be loaded (None: that metric is nan)."""

    def __init__(self, clip: Clip | None, dino: DINO | None, lpips: LPIPS | None, notes=()):
        self.clip, self.dino, self.lpips, self.notes = clip, dino, lpips, list(notes)
        self.sources = {}  # the last photo's self-similarity: every method's edit of it compares with the same

    @torch.inference_mode()
    def similarity(self, picture) -> torch.Tensor:
        d = self.dino
        return self_similarity(d.last_keys(dino_pixels(picture, d.image_size).to(d.embeddings.cls_token.device)))

    def structure(self, a, b) -> float:
        key = hashlib.sha256(uint8(a).tobytes()).hexdigest()
        if key not in self.sources:
            self.sources = {key: self.similarity(a)}
        return (self.sources[key] - self.similarity(b)).square().mean().item()

    @torch.inference_mode()
    def score(self, a, b, m: np.ndarray, text: str) -> dict:
        """The seven numbers (piebench.METRICS' keys) of edit b of photo a, mask M (bool [H, W]), target text."""
        nan = math.nan
        out = dict(structure_distance=self.structure(a, b) if self.dino is not None else nan)
        if m.all():
            out.update(psnr_unedit_part=nan, lpips_unedit_part=nan, mse_unedit_part=nan, ssim_unedit_part=nan)
        else:
            x, y = background(a, b, m)
            lp = nan
            if self.lpips is not None:
                device = self.lpips.shift.device
                lp = self.lpips(x.to(device) * 2 - 1, y.to(device) * 2 - 1).item()
            out.update(psnr_unedit_part=psnr(x, y), lpips_unedit_part=lp, mse_unedit_part=mse(x, y),
                       ssim_unedit_part=ssim(x, y))
        edited = Image.fromarray((uint8(b) * m[..., None]).astype(np.uint8))
        out.update(clip_similarity_target_image=self.clip.score(Image.fromarray(uint8(b)), text) if self.clip else nan,
                   clip_similarity_target_image_edit_part=self.clip.score(edited, text) if self.clip else nan)
        return out


def load(clip_model: str | None, dino_model: str | None, squeezenet: str | None, device="cpu") -> Scorer:
    """A Scorer with each network that can be had; each one left out (named none, or its weights not to be had)
    gives one note line."""
    nets, notes = {}, []
    for name, given, flag, loader, metrics in [
            ("clip", clip_model, "--clip-model", Clip.load, "CLIP Whole and Edited"),
            ("dino", dino_model, "--dino-model", load_dino, "the structure distance"),
            ("lpips", squeezenet, "--squeezenet", load_lpips, "LPIPS")]:
        if given in (None, "", "none"):
            notes.append(f"{metrics}: nan ({flag} none)")
            continue
        try:
            nets[name] = loader(given, device)
        except MinleditsError as e:
            notes.append(f"{metrics}: nan ({' '.join(str(e).split())})")
    return Scorer(nets.get("clip"), nets.get("dino"), nets.get("lpips"), notes)

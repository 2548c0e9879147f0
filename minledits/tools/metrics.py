"""Edit metrics: fidelity to the input (PSNR, SSIM) and CLIP's judgement (text alignment, image similarity).

Notation (code name -> symbol); a, b: two RGB pictures of one size, values in [0, L] (L = data_range, 255)
    psnr         10 log10(L^2 / MSE(a, b))                                 dB; inf for equal pictures
    ssim         mean over channels and valid pixels of                     Wang et al. 2004: Gaussian window
                 (2 mu_a mu_b + C1)(2 s_ab + C2) / ((mu_a^2 + mu_b^2 + C1)(s_a^2 + s_b^2 + C2))
                 mu, s^2, s_ab: Gaussian-weighted local means, variances, covariance (sigma 1.5, radius 5:
                 11 x 11); C1 = (0.01 L)^2, C2 = (0.03 L)^2; only pixels whose window lies inside the picture
                 (as scikit-image's structural_similarity(gaussian_weights=True, sigma=1.5,
                 use_sample_covariance=False, data_range=L, channel_axis=-1))
    clip_score   100 max(cos(e_img(edit), e_txt(text)), 0)                  CLIPScore's scale (Hessel et al.)
    clip_image   cos(e_img(a), e_img(b))                                    in [-1, 1]
    e_img, e_txt CLIP embeddings (clipvision.py) of CLIP's preprocessing of a picture (clip_pixels: shortest side
                 to S = 224 with PIL bicubic, centre crop S x S, (x / 255 - mean) / std) and of a prompt
CLIP weights: openai/clip-vit-large-patch14 from the Hub (config.json and model.safetensors only), or a local
folder in that layout. Where they cannot be had, Clip.load raises one MinleditsError line; callers go on without.
"""
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open

from ..errors import MinleditsError
from ..io.image import open_rgb
from ..io.load import SkipInit, fill, safetensors_getters
from ..nets.clipvision import CLIP
from ..nets.tokenizer import SD1_PAD_ID, Tokenizer

CLIP_MODEL = "openai/clip-vit-large-patch14"
CLIP_FILES = ["config.json", "model.safetensors"]
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
K1, K2, SIGMA, RADIUS = 0.01, 0.03, 1.5, 5  # SSIM constants; RADIUS = int(3.5 sigma + 0.5) as scipy's truncate 3.5


def pixels(image) -> torch.Tensor:
    """A picture (path, PIL, uint8 array [H, W, 3]) as float64 [3, H, W] in [0, 255]."""
    if isinstance(image, torch.Tensor):
        return image.double()
    return torch.from_numpy(np.asarray(open_rgb(image), dtype=np.float64)).permute(2, 0, 1)


def pixel_pair(a, b) -> tuple[torch.Tensor, torch.Tensor]:
    """pixels() of two pictures of one size (else a one-line ValueError)."""
    a, b = pixels(a), pixels(b)
    if a.shape != b.shape:
        raise ValueError(f"the two pictures differ in size ({a.shape[-1]}x{a.shape[-2]} and "
                         f"{b.shape[-1]}x{b.shape[-2]} px): fidelity compares pictures of one size")
    return a, b


def psnr(a, b, data_range: float = 255.0) -> float:
    a, b = pixel_pair(a, b)
    mse = (a - b).square().mean().item()
    return math.inf if mse == 0 else 10 * math.log10(data_range ** 2 / mse)


def gaussian(sigma: float = SIGMA, radius: int = RADIUS) -> torch.Tensor:
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    w = torch.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


def local_mean(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian mean of x [C, H, W] over the valid windows: [C, H - 2r, W - 2r]."""
    C = len(x)
    x = F.conv2d(x[None], w.view(1, 1, -1, 1).expand(C, 1, -1, 1), groups=C)
    return F.conv2d(x, w.view(1, 1, 1, -1).expand(C, 1, 1, -1), groups=C)[0]


def ssim(a, b, data_range: float = 255.0) -> float:
    a, b = pixel_pair(a, b)
    w = gaussian()
    if min(a.shape[-2:]) < len(w):
        raise ValueError(f"SSIM needs pictures of at least {len(w)}x{len(w)} px, got {a.shape[-1]}x{a.shape[-2]}")
    mu_a, mu_b = local_mean(a, w), local_mean(b, w)
    s_a = local_mean(a * a, w) - mu_a ** 2
    s_b = local_mean(b * b, w) - mu_b ** 2
    s_ab = local_mean(a * b, w) - mu_a * mu_b
    C1, C2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    s = (2 * mu_a * mu_b + C1) * (2 * s_ab + C2) / ((mu_a ** 2 + mu_b ** 2 + C1) * (s_a + s_b + C2))
    return s.mean().item()


def clip_pixels(image, size: int = 224) -> torch.Tensor:
    """CLIP's preprocessing: [1, 3, size, size] float32, normalised."""
    im = open_rgb(image)
    short, long = sorted(im.size)
    long = int(size * long / short)  # truncated, as CLIPImageProcessor
    im = im.resize((size, long) if im.width <= im.height else (long, size), Image.Resampling.BICUBIC)
    top, left = (im.height - size) // 2, (im.width - size) // 2
    x = torch.from_numpy(np.asarray(im)[top:top + size, left:left + size].astype(np.float64) / 255).float()
    mean, std = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)
    return ((x - mean) / std).permute(2, 0, 1)[None]


def hub_folder(model: str, files=CLIP_FILES, what: str = "CLIP metrics") -> Path:
    """A local folder, or the Hub repo's `files` fetched into the Hugging Face cache; where neither can be had, one
    MinleditsError line saying that `what` needs them."""
    if Path(model).exists():
        return Path(model)
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import LocalEntryNotFoundError
    try:
        return Path(snapshot_download(model, allow_patterns=files))
    except LocalEntryNotFoundError:
        why = "they are not in the Hugging Face cache and the Hub cannot be reached"
    except Exception as e:  # no such repo, a bad name, a failed download
        why = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
    raise MinleditsError(f"{what} need the weights of {model}: {why} (give a local folder, or none)")


class Clip:
    """CLIP for the metrics: embeddings of pictures and prompts, normalised to unit length."""

    def __init__(self, model: CLIP, device="cpu"):
        self.model, self.device, self.tokenizer = model, torch.device(device), Tokenizer.builtin(SD1_PAD_ID)
        self.last_text = (None, None)  # (text, its embedding): a benchmark scores many pictures against one prompt

    @classmethod
    def load(cls, model: str = CLIP_MODEL, device="cpu") -> "Clip":
        folder = hub_folder(model)
        try:
            config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise MinleditsError(f"{folder} has no readable config.json of a CLIP model ({e})") from None
        with torch.device("meta"), SkipInit():
            net = CLIP(config)
        path = folder / "model.safetensors"
        with safe_open(str(path), framework="pt", device="cpu") as f:
            getters = {k: g for k, g in safetensors_getters(f, "clip").items() if not k.endswith(".position_ids")}
            fill(net, getters, str(path), torch.float32, device)
        return cls(net, device)

    @torch.inference_mode()
    def images(self, images) -> torch.Tensor:
        x = torch.cat([clip_pixels(im, self.model.image_size) for im in images]).to(self.device)
        return F.normalize(self.model.image_embeds(x).float(), dim=-1)

    @torch.inference_mode()
    def texts(self, texts) -> torch.Tensor:
        return F.normalize(self.model.text_embeds(self.tokenizer(list(texts)).to(self.device)).float(), dim=-1)

    def score(self, image, text: str) -> float:
        """CLIP score: 100 max(cos, 0) of a picture and a prompt."""
        if self.last_text[0] != text:
            self.last_text = (text, self.texts([text]))
        return 100 * max((self.images([image]) * self.last_text[1]).sum().item(), 0.0)

    def similarity(self, a, b) -> float:
        """cos of two pictures' CLIP embeddings."""
        e = self.images([a, b])
        return (e[0] * e[1]).sum().item()


def to_json(found: dict) -> str:
    """measure()'s dict as strict JSON: a value that is not a JSON number (psnr's inf for identical pictures) is
    null, and "notes" says why."""
    bad = {k: v for k, v in found.items() if isinstance(v, float) and not math.isfinite(v)}
    notes = {k: f"{v} (the pictures are identical)" if k == "psnr" and v == math.inf else str(v)
             for k, v in bad.items()}
    return json.dumps({**found, **dict.fromkeys(bad), **({"notes": notes} if notes else {})}, allow_nan=False)


def measure(source, edited, text: str | None = None, clip: Clip | None = None) -> dict:
    """{psnr, ssim, clip_score, clip_image} of an edit against its source (CLIP's None without clip; clip_score None
    without text)."""
    a, b = open_rgb(source), open_rgb(edited)
    out = dict(psnr=psnr(a, b), ssim=ssim(a, b), clip_score=None, clip_image=None)
    if clip is not None:
        out.update(clip_image=clip.similarity(a, b), clip_score=clip.score(b, text) if text else None)
    return out

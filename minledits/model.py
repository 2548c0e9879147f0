"""The model object every method shares: Stable Diffusion's networks and noise schedule, and the three things
every method does with them - embed prompts, encode an image to latents, decode latents to an image.

    sd.text_embeddings(["", "a cat"])   -> c [B, 77, D]      CLIP's last hidden states
    sd.encode(x)                        -> w0 [B, 4, h, w]   f E(x): the scaled VAE posterior mean (f: scaling factor)
    sd.decode(w0)                       -> x [B, 3, H, W]    D(w0 / f), in about [-1, 1]
    sd.unet(x_t, t, c)                  -> eps or v          (sd.schedule.prediction_type says which)
    sd.predict(x_t, t, c)               -> the same for any model: what the methods call, c from text_embeddings
Build one with minledits.load (load.py), or minledits.load("random-tiny") for an offline smoke test.

StableDiffusionXL adds a second tokenizer and text encoder; its prompts embed to a pair, and its UNet takes more:
    sdxl.text_embeddings(prompts)       -> (c [B, 77, 2048], pooled [B, 1280])   clip.py says how; "" gives zeros
                                                                                when force_zeros_for_empty_prompt
    sdxl.time_ids(H, W)                 -> [6] = (H, W, 0, 0, H, W)               original size, crop top-left, target
    sdxl.unet(x_t, t, c, text_embeds=pooled, time_ids=time_ids)
    sdxl.predict(x_t, t, (c, pooled))   -> that, with time_ids from x_t's size in pixels (crop 0, target = original)

StableDiffusion3 (SD3 / SD3.5, a rectified flow with three text encoders) is sd3.py's.
"""
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image

from .errors import MinleditsError
from .io.image import to_pil
from .schedule import Schedule


@dataclass
class StableDiffusion:
    """The networks and noise schedule of one Stable Diffusion model, on one device in one dtype. The networks are
    any modules with the official models' interfaces (nets/ holds ours; io/load.py builds them from the weights)."""
    tokenizer: Callable             # prompts -> token ids [B, 77]                   (nets/tokenizer.py)
    text_encoder: torch.nn.Module   # ids -> c [B, 77, D]                            (nets/clip.py)
    unet: torch.nn.Module           # (x_t, t, c) -> eps or v; .config, .attention_controller (nets/unet.py)
    vae: torch.nn.Module            # .encode(x), .decode(w), .scaling_factor, .conv_dtype, .config (nets/vae.py)
    schedule: Schedule              # from scheduler_config.json: abar_t, timesteps, prediction_type
    model_id: str                   # as given (repo id, folder or file)
    fingerprint: str                # identifies the weights: Hub commit sha, or "sha256-..." (load.content_hash)
    device: torch.device
    dtype: torch.dtype
    default_size = 512              # side in pixels the methods default to (a class attribute, not a field)

    @property
    def prediction_type(self) -> str:
        """"epsilon" or "v_prediction": what the UNet predicts (the schedule's, from the scheduler config)."""
        return self.schedule.prediction_type

    def check_fits(self, height: int, width: int) -> None:
        """Refuse a picture that certainly cannot fit: the VAE holds at least two full-resolution activations
        of its widest channel count at once (a convolution's input and output), in this dtype and device."""
        need = 2 * self.vae.config["block_out_channels"][0] * height * width * self.dtype.itemsize
        have = device_memory(self.device)
        if have and need > have:
            raise MinleditsError(f"{width}x{height} px needs at least {need / 2**30:.1f} GiB for the VAE's "
                                 f"activations alone, more than the {have / 2**30:.1f} GiB of {self.device}: "
                                 "use a smaller size")

    def text_embeddings(self, prompts: list[str]) -> torch.Tensor:
        """CLIP last hidden states [B, 77, D] of the prompts."""
        return self.text_encoder(self.tokenizer(prompts).to(self.device))

    def predict(self, x: torch.Tensor, t, c) -> torch.Tensor:
        """The UNet's output for latents x [B, 4, h, w] at t, conditioned on c (text_embeddings' rows, B of them)."""
        return self.unet(x, t, c)

    @property
    def latent_scale(self) -> int:
        """Pixels per latent pixel: 2 ** (VAE levels - 1), 8 for SD."""
        return 2 ** (len(self.vae.config["block_out_channels"]) - 1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """w0 = f E(x) for images x [B, 3, H, W] in [-1, 1]. The VAE runs in its own dtype (fp32 when loaded with
        force_upcast in fp16), the latents come back in the model's."""
        w0 = self.vae.scaling_factor * self.vae.encode(x.to(self.device, self.vae.conv_dtype))
        return w0.to(self.dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """D(w0 / f): images [B, 3, H, W] in about [-1, 1], in the VAE's dtype."""
        return self.vae.decode(latents.to(self.device, self.vae.conv_dtype) / self.vae.scaling_factor)


@dataclass
class StableDiffusionXL(StableDiffusion):
    """SDXL: StableDiffusion's fields plus the second tokenizer and text encoder (OpenCLIP ViT-bigG, projected)."""
    tokenizer_2: Callable
    text_encoder_2: torch.nn.Module  # .penultimate_and_pooled(ids) -> (h [B, 77, D2], pooled [B, P])
    force_zeros_for_empty_prompt: bool = True   # model_index.json: "" embeds to zeros (the unconditional branch)
    default_size = 1024

    def text_embeddings(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(c [B, 77, D1 + D2], pooled [B, P]): both encoders' penultimate hidden states side by side, and the
        second's projected EOS state; zeros for the prompts "" when force_zeros_for_empty_prompt."""
        h1 = self.text_encoder.penultimate(self.tokenizer(prompts).to(self.device))
        h2, pooled = self.text_encoder_2.penultimate_and_pooled(self.tokenizer_2(prompts).to(self.device))
        c = torch.cat([h1, h2], dim=-1)
        if self.force_zeros_for_empty_prompt:
            empty = torch.tensor([p == "" for p in prompts], device=self.device)
            c, pooled = c.masked_fill(empty[:, None, None], 0), pooled.masked_fill(empty[:, None], 0)
        return c, pooled

    def predict(self, x: torch.Tensor, t, c: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """The UNet's output for latents x [B, 4, h, w] at t, conditioned on c = (c, pooled) (B rows each) and the
        time_ids of the picture x decodes to (h, w times latent_scale pixels, uncropped)."""
        time_ids = self.time_ids(self.latent_scale * x.shape[-2], self.latent_scale * x.shape[-1])
        return self.unet(x, t, c[0], text_embeds=c[1], time_ids=time_ids.expand(x.shape[0], -1))

    def time_ids(self, height: int, width: int) -> torch.Tensor:
        """[6] float: original size (H, W), crop top-left (0, 0), target size (H, W), in pixels, the model's dtype."""
        return torch.tensor([height, width, 0, 0, height, width], device=self.device).to(self.dtype)


def rows(c) -> int:
    """How many prompts a conditioning (text_embeddings' tensor, or SDXL's / SD3's pair) holds."""
    return len(c[0] if isinstance(c, tuple) else c)


def repeat_rows(c, n: int):
    """Each row of a conditioning (text_embeddings' tensor, or SDXL's / SD3's pair) n times in a row."""
    return tuple(x.repeat_interleave(n, 0) for x in c) if isinstance(c, tuple) else c.repeat_interleave(n, 0)


def device_memory(device: torch.device) -> int | None:
    """Total memory of the device in bytes (CPU: physical RAM); None where unknown."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type == "cpu" and hasattr(os, "sysconf"):
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return None


@torch.inference_mode()
def decode(sd: StableDiffusion, latents: torch.Tensor) -> Image.Image:
    """w0 latents [1, 4, h, w] -> a PIL image."""
    return to_pil(sd.decode(latents))[0]

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

StableDiffusion3 (SD3 / SD3.5) is a rectified flow: a transformer (MMDiT, nets/mmdit.py) predicting the velocity
v = eps - w0 at x_t = (1 - sigma) w0 + sigma eps, t = T sigma (flowmatch.py), with three text encoders:
    h_L, p_L = CLIP-L(prompt)          penultimate hidden states [B, 77, 768], projected EOS state [B, 768]
    h_G, p_G = CLIP-G(prompt)          the same from OpenCLIP bigG [B, 77, 1280], [B, 1280]
    h_T = T5(prompt)                   last hidden state [B, 256, 4096] (no attention mask); zeros without T5
    c = [pad([h_L ; h_G], 4096) , h_T]     [B, 77 + 256, 4096]: the CLIP pair side by side, zero-padded to T5's
                                           width, then T5's tokens after CLIP's
    pooled = [p_L ; p_G]                [B, 2048]
    sd3.text_embeddings(prompts)        -> (c, pooled), as StableDiffusion3Pipeline.encode_prompt (no clip skip)
    sd3.predict(x_t, t, (c, pooled))    -> v [B, 16, h, w]
    sd3.encode(x)                       -> w0 = f (E(x) - s)      (s: the VAE's shift_factor, f: scaling factor)
    sd3.decode(w0)                      -> D(w0 / f + s)
    sd3.offload_text()                  keeps the text encoders on the CPU; text_embeddings then swaps them with the
                                        transformer: the GPU holds one or the other, never both (load(...,
                                        offload_text=True) reads them to the CPU in the first place)
"""
import contextlib
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from .errors import MinleditsError, shorten
from .io.image import to_pil
from .schedule import Schedule

T5_TOKENS = 256   # StableDiffusion3Pipeline's max_sequence_length: T5's tokens in c (zeros without T5)

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


@dataclass
class StableDiffusion3:
    """SD3 / SD3.5: three tokenizers and text encoders (the T5 pair None when loaded without T5), the MMDiT and the
    16-channel VAE, the flow-matching scheduler config, on one device in one dtype (the module docstring)."""
    tokenizer: Callable              # CLIP-L: prompts -> ids [B, 77], padded with <|endoftext|>  (nets/tokenizer.py)
    text_encoder: torch.nn.Module    # CLIP-L with projection: .penultimate_and_pooled            (nets/clip.py)
    tokenizer_2: Callable            # CLIP-G: padded with "!"
    text_encoder_2: torch.nn.Module  # CLIP-G with projection
    tokenizer_3: Callable | None     # T5: prompts -> (ids [B, 256], mask)                         (nets/t5.py)
    text_encoder_3: torch.nn.Module | None   # T5 encoder: ids -> [B, 256, 4096]
    transformer: torch.nn.Module     # (x_t, t, c, pooled) -> v; .config, .attention_controller     (nets/mmdit.py)
    vae: torch.nn.Module             # as StableDiffusion's, with .shift_factor                    (nets/vae.py)
    schedule: dict                   # scheduler_config.json through flowmatch.flow_config (FlowEuler takes it)
    model_id: str
    fingerprint: str
    device: torch.device
    dtype: torch.dtype
    text_offloaded: bool = False     # offload_text: the text encoders live on the CPU
    default_size = 1024
    check_fits = StableDiffusion.check_fits
    latent_scale = StableDiffusion.latent_scale

    @property
    def unet(self) -> torch.nn.Module:
        """The denoiser under the name the methods use (attention_controller, attention_kernel, config)."""
        return self.transformer

    @property
    def prediction_type(self) -> str:
        return "flow"

    def text_embeddings(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(c [B, 77 + 256, D], pooled [B, P]) (module docstring), in the model's dtype on its device. A prompt
        longer than T5's 256 tokens is truncated with a warning, as CLIP's beyond 77."""
        prompts, d = list(prompts), self.device
        with self.text_swapped_in():
            h_L, p_L = self.text_encoder.penultimate_and_pooled(self.tokenizer(prompts).to(d))
            h_G, p_G = self.text_encoder_2.penultimate_and_pooled(self.tokenizer_2(prompts).to(d))
            if self.text_encoder_3 is None:
                h_T = torch.zeros(len(prompts), T5_TOKENS, self.transformer.config["joint_attention_dim"], device=d)
            else:
                for prompt, cut in zip(prompts, self.tokenizer_3.truncated(prompts)):
                    if cut:
                        warnings.warn(f"prompt longer than {self.tokenizer_3.max_length - 1} T5 tokens: truncated "
                                      f"({shorten(prompt)})", stacklevel=2)
                h_T = self.text_encoder_3(self.tokenizer_3(prompts)[0].to(d))
        clip = torch.cat([h_L, h_G], dim=-1).to(self.dtype)
        c = torch.cat([F.pad(clip, (0, h_T.shape[-1] - clip.shape[-1])), h_T.to(self.dtype)], dim=-2)
        return c, torch.cat([p_L, p_G], dim=-1).to(self.dtype)

    def predict(self, x: torch.Tensor, t, c: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """The velocity v [B, 16, h, w] at latents x_t [B, 16, h, w], t = T sigma, conditioned on c = (c, pooled)."""
        return self.transformer(x, t, c[0], c[1])

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """w0 = f (E(x) - s) for images x [B, 3, H, W] in [-1, 1], in the model's dtype."""
        w0 = (self.vae.encode(x.to(self.device, self.vae.conv_dtype)) - self.vae.shift_factor) * self.vae.scaling_factor
        return w0.to(self.dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """D(w0 / f + s): images [B, 3, H, W] in about [-1, 1], in the VAE's dtype."""
        w = latents.to(self.device, self.vae.conv_dtype) / self.vae.scaling_factor + self.vae.shift_factor
        return self.vae.decode(w)

    def offload_text(self) -> None:
        """Keep the text encoders on the CPU (SD3's T5 is 10.7 GiB in fp16, its wo in fp32): text_embeddings swaps
        them with the transformer for its call, so the device never holds both."""
        self._move(self.text_encoders(), "cpu")
        self.text_offloaded = True

    def text_encoders(self) -> list[torch.nn.Module]:
        return [m for m in (self.text_encoder, self.text_encoder_2, self.text_encoder_3) if m is not None]

    @contextlib.contextmanager
    def text_swapped_in(self):
        """After offload_text, within: the transformer on the CPU, then the text encoders on the model's device;
        after: the other way round (each leaves before the other arrives). Otherwise nothing moves."""
        if not self.text_offloaded:
            yield
            return
        self._move([self.transformer], "cpu")
        self._move(self.text_encoders(), self.device)
        try:
            yield
        finally:
            self._move(self.text_encoders(), "cpu")
            self._move([self.transformer], self.device)

    def _move(self, modules: list[torch.nn.Module], device) -> None:
        for m in modules:
            m.to(device)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()       # what left is free for what comes


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

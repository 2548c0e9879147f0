"""Stable Diffusion 3 (SD3 / SD3.5): the model object of a rectified flow - the networks, the flow scheduler's config
and what every method does with them, as model.py's StableDiffusion for the UNet models.

SD3 is a rectified flow: a transformer (MMDiT, nets/mmdit.py) predicting the velocity
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
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import shorten
from .model import StableDiffusion
from .nets.mmdit import collapse

T5_TOKENS = 256   # StableDiffusion3Pipeline's max_sequence_length: T5's tokens in c (zeros without T5)


def t5_hidden(tokenizer, encoder: torch.nn.Module, prompts: list[str], device) -> torch.Tensor:
    """T5's last hidden state [B, max_length, D] of the prompts (no attention mask); a prompt longer than the
    tokenizer's max_length is truncated with a warning (attributed to the caller of text_embeddings)."""
    for prompt, cut in zip(prompts, tokenizer.truncated(prompts)):
        if cut:
            warnings.warn(f"prompt longer than {tokenizer.max_length - 1} T5 tokens: truncated ({shorten(prompt)})",
                          stacklevel=3)
    return encoder(tokenizer(prompts)[0].to(device))


@dataclass(kw_only=True)
class RectifiedFlow:
    """What SD3 and FLUX.1 share: the transformer and the 16-channel VAE, the flow-matching scheduler config, on one
    device in one dtype; encode / decode with the VAE's shift, and the text encoders' offloading. A subclass adds its
    text encoders (text_encoders lists them), text_embeddings and predict."""
    transformer: torch.nn.Module     # (x_t, t, c, ...) -> v; .config, .attention_controller (nets/mmdit, nets/flux)
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

    def text_encoders(self) -> list[torch.nn.Module]:
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """w0 = f (E(x) - s) for images x [B, 3, H, W] in [-1, 1], in the model's dtype."""
        w0 = (self.vae.encode(x.to(self.device, self.vae.conv_dtype)) - self.vae.shift_factor) * self.vae.scaling_factor
        return w0.to(self.dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """D(w0 / f + s): images [B, 3, H, W] in about [-1, 1], in the VAE's dtype."""
        w = latents.to(self.device, self.vae.conv_dtype) / self.vae.scaling_factor + self.vae.shift_factor
        return self.vae.decode(w)

    def offload_text(self) -> None:
        """Keep the text encoders on the CPU (T5-XXL: SD3's is 10.7 GiB in fp16, its wo in fp32): text_embeddings
        swaps them with the transformer for its call, so the device never holds both."""
        self._move(self.text_encoders(), "cpu")
        self.text_offloaded = True

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


@dataclass(kw_only=True)
class StableDiffusion3(RectifiedFlow):
    """SD3 / SD3.5: three tokenizers and text encoders (the T5 pair None when loaded without T5), the MMDiT and the
    16-channel VAE, the flow-matching scheduler config, on one device in one dtype (the module docstring)."""
    tokenizer: Callable              # CLIP-L: prompts -> ids [B, 77], padded with <|endoftext|>  (nets/tokenizer.py)
    text_encoder: torch.nn.Module    # CLIP-L with projection: .penultimate_and_pooled            (nets/clip.py)
    tokenizer_2: Callable            # CLIP-G: padded with "!"
    text_encoder_2: torch.nn.Module  # CLIP-G with projection
    tokenizer_3: Callable | None     # T5: prompts -> (ids [B, 256], mask)                         (nets/t5.py)
    text_encoder_3: torch.nn.Module | None   # T5 encoder: ids -> [B, 256, 4096]

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
                h_T = t5_hidden(self.tokenizer_3, self.text_encoder_3, prompts, d)
        clip = torch.cat([h_L, h_G], dim=-1).to(self.dtype)
        c = torch.cat([F.pad(clip, (0, h_T.shape[-1] - clip.shape[-1])), h_T.to(self.dtype)], dim=-2)
        return c, torch.cat([p_L, p_G], dim=-1).to(self.dtype)

    def predict(self, x: torch.Tensor, t, c: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """The velocity v [B, 16, h, w] at latents x_t [B, 16, h, w], t = T sigma, conditioned on c = (c, pooled).
        Runs of equal text rows (without T5: its 256 rows of zeros) go in once, counted: the same velocity to float
        rounding for less work (nets/mmdit.py, collapse)."""
        context, counts = collapse(c[0])
        return self.transformer(x, t, context, c[1], counts)

    def text_encoders(self) -> list[torch.nn.Module]:
        return [m for m in (self.text_encoder, self.text_encoder_2, self.text_encoder_3) if m is not None]

"""FLUX.1 (dev, schnell): the model object of a rectified flow - the networks, the flow scheduler's config and what
every method does with them, as sd3.py's StableDiffusion3.

FLUX.1 is a rectified flow as SD3 (flowmatch.py): a transformer (nets/flux.py) predicting the velocity v = eps - w0 at
x_t = (1 - sigma) w0 + sigma eps, on the latent cut in 2 x 2 patches, with two text encoders:
    p = CLIP-L(prompt)                 the pooled output [B, 768]: the final layer norm's state at <|endoftext|> (no
                                       projection)
    c = T5(prompt)                     last hidden state [B, 512, 4096] (no attention mask; 512 = T5_TOKENS)
    flux.text_embeddings(prompts)      -> (c, pooled = p), as FluxPipeline.encode_prompt
    X = pack(x)                        x [B, 16, h, w] -> X [B, (h/2)(w/2), 64]: each 2 x 2 patch's channels in a row
    ids                                image (0, row, col) on the (h/2) x (w/2) grid, text (0, 0, 0): RoPE's positions
    tau = t / T                        the transformer's time: t = T sigma as FlowEuler's timesteps give it, T = 1000
    g                                  the guidance scale, embedded as the time is (FLUX.1-dev's guidance distillation:
                                       one pass, no classifier-free guidance; default 3.5); schnell has no embedding
    flux.predict(x_t, t, (c, p), g)    -> v = unpack(F(pack(x_t), tau, c, p, ids, g)) [B, 16, h, w]
    flux.encode(x)                     -> w0 = f (E(x) - s)      (s: the VAE's shift_factor, f: scaling factor)
    flux.decode(w0)                    -> D(w0 / f + s)
    schedule                           the scheduler config (flowmatch.flow_config) with uniform_sigmas: FluxPipeline
                                       passes sigmas linspace(1, 1/N, N), shifted by mu(image_tokens(h, w)) on dev
A picture's sides are multiples of 16: the VAE's factor 8 times the 2 x 2 patches.
"""
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .errors import MinleditsError
from .flowmatch import flow_config
from .nets.clip import eos_positions
from .nets.flux import image_ids, pack, text_ids, unpack
from .sd3 import RectifiedFlow, t5_hidden

T5_TOKENS = 512         # FluxPipeline's max_sequence_length: T5's tokens in c
PATCH = 16              # a picture's sides are multiples of it: the VAE's 8 x the 2 x 2 patches


def schedule_of(config: dict) -> dict:
    """The flow schedule of FLUX.1's scheduler config: the pipeline's sigmas linspace(1, 1/N, N) (uniform_sigmas),
    through the dynamic shift where the config turns it on (dev) and the static one otherwise (schnell: shift 1)."""
    return flow_config({**config, "uniform_sigmas": True})


@dataclass(kw_only=True)
class Flux(RectifiedFlow):
    """FLUX.1-dev or -schnell: CLIP-L (pooled) and T5 with their tokenizers, the transformer (nets/flux.py: (X, tau, c,
    pooled, img_ids, txt_ids, g) -> V; .guidance_embeds) and the 16-channel VAE, the flow-matching scheduler config
    (schedule_of: FlowEuler takes it with the image's tokens), on one device in one dtype (the module docstring)."""
    tokenizer: Callable              # CLIP-L: prompts -> ids [B, 77], padded with <|endoftext|>  (nets/tokenizer.py)
    text_encoder: torch.nn.Module    # CLIP-L without projection                                  (nets/clip.py)
    tokenizer_2: Callable            # T5: prompts -> (ids [B, 512], mask)                         (nets/t5.py)
    text_encoder_2: torch.nn.Module  # T5 encoder: ids -> [B, 512, 4096]
    default_guidance = 3.5           # FluxPipeline's guidance_scale: g when predict is given none (dev)

    @property
    def guidance_embeds(self) -> bool:
        """Whether the transformer embeds a guidance scale (FLUX.1-dev: yes; schnell: no)."""
        return self.transformer.guidance_embeds

    def check_fits(self, height: int, width: int) -> None:
        """Refuse a picture whose sides are not multiples of 16, or that cannot fit the device (StableDiffusion's)."""
        if height % PATCH or width % PATCH:
            raise MinleditsError(f"{width}x{height} px does not fit FLUX.1: both sides must be multiples of {PATCH} "
                                 f"(the VAE's factor 8 times its 2 x 2 patches)")
        super().check_fits(height, width)

    def text_encoders(self) -> list[torch.nn.Module]:
        return [self.text_encoder, self.text_encoder_2]

    def text_embeddings(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(c [B, 512, 4096], pooled [B, 768]) (module docstring), in the model's dtype on its device. A prompt longer
        than T5's 512 tokens is truncated with a warning, as CLIP's beyond 77."""
        prompts, d = list(prompts), self.device
        with self.text_swapped_in():
            ids = self.tokenizer(prompts).to(d)
            h = self.text_encoder(ids)
            pooled = h[torch.arange(len(ids), device=d), eos_positions(ids, self.text_encoder.config)]
            c = t5_hidden(self.tokenizer_2, self.text_encoder_2, prompts, d)
        return c.to(self.dtype), pooled.to(self.dtype)

    def guidance_rows(self, guidance, B: int) -> torch.Tensor | None:
        """g per row [B] in float32 (as the pipeline passes it): a number or a [B] tensor, None for the default on
        dev; None on schnell, which refuses any guidance. A one-line ValueError otherwise."""
        if not self.guidance_embeds:
            if guidance is not None:
                raise ValueError("this FLUX.1 model has no guidance embedding (schnell): pass no guidance")
            return None
        g = torch.as_tensor(self.default_guidance if guidance is None else guidance, dtype=torch.float32,
                            device=self.device)
        if g.dim() > 1 or g.numel() not in (1, B):
            raise ValueError(f"guidance must be a number or one value per row ({B}), got shape {list(g.shape)}")
        return g.reshape(-1).expand(B)

    def predict(self, x: torch.Tensor, t, c: tuple[torch.Tensor, torch.Tensor], guidance=None) -> torch.Tensor:
        """The velocity v [B, 16, h, w] at latents x_t [B, 16, h, w], t = T sigma (a number or [B]), conditioned on
        c = (c, pooled) and, on dev, the guidance scale g (a number or [B]; None: default_guidance)."""
        B, _, h, w = x.shape
        context, pooled = c
        T = self.schedule["num_train_timesteps"]
        tau = torch.as_tensor(t, device=x.device).reshape(-1).expand(B).to(x.dtype) / T
        ids = image_ids(h, w, x.device), text_ids(context.shape[1], x.device)
        return unpack(self.transformer(pack(x), tau, context, pooled, *ids, self.guidance_rows(guidance, B)), h, w)

"""`--model random-tiny`: a tiny Stable Diffusion with random weights, built from our own modules.

Nothing is downloaded and, at its default size of 64 px, a command runs in seconds, so every command can be
tried offline. Its pictures are noise. Same architecture families as SD 1.x (2-level UNet, 4-level VAE,
2-layer CLIP); PyTorch's default init under a fixed seed, so two builds are identical and share one fingerprint.
"""
import torch

from ..model import StableDiffusion
from ..nets.clip import TextEncoder
from ..nets.tokenizer import SD1_PAD_ID, Tokenizer
from ..nets.unet import UNet
from ..nets.vae import VAE
from ..schedule import SCHEDULER_DEFAULTS, Schedule

NAME, FINGERPRINT = "random-tiny", "random-tiny-v1"
UNET = dict(block_out_channels=[32, 64], layers_per_block=1, norm_num_groups=8, attention_head_dim=4,
            cross_attention_dim=32, down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], in_channels=4, out_channels=4)
VAE_ = dict(block_out_channels=[16, 32, 32, 32], layers_per_block=1, norm_num_groups=8, latent_channels=4,
            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
            in_channels=3, out_channels=3, scaling_factor=0.18215)
CLIP = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
            max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5)


class RandomTiny(StableDiffusion):
    """random-tiny: its pictures are noise whatever their size, so it defaults to the smallest."""
    default_size = 64


def random_tiny(device=None, dtype=None):
    """A StableDiffusion (model.py) with seeded random weights and the SD 1.x schedule, 64 px by default."""
    device, dtype = torch.device(device or "cpu"), dtype or torch.float32
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        nets = [m(c).eval().requires_grad_(False).to(device, dtype) for m, c in
                [(TextEncoder, CLIP), (UNet, UNET), (VAE, VAE_)]]
    return RandomTiny(tokenizer=Tokenizer.builtin(SD1_PAD_ID), text_encoder=nets[0], unet=nets[1], vae=nets[2],
                      schedule=Schedule(SCHEDULER_DEFAULTS), model_id=NAME, fingerprint=FINGERPRINT, device=device,
                      dtype=dtype)

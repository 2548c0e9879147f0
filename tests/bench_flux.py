"""Benchmark: RF-Inversion on FLUX.1 through minledits (rfinversion.invert + edit) and through the community
pipeline's semantics (tests/oracle_rfinversion.py) on diffusers' FluxPipeline, the same random weights.

    python -m tests.bench_flux                                  # the mid-size FLUX below, 256 px, 4 steps, fp32, CPU
    python -m tests.bench_flux --steps 28 --size 512 --repeat 3

The model: FLUX.1-dev's layout, scheduler and VAE; a transformer of FLUX's head width (128) with 8 heads, 2 double-
and 4 single-stream blocks and the guidance embedding; CLIP-L's width with 4 layers; a T5 of 2 layers whose width is
the transformer's joint_attention_dim (1024); random weights, written once under $TMPDIR/minledits-bench/flux-mid.
Both paths run in this process on the same preprocessed picture, seed and prompts, alternating --repeat times, each
path's fastest run kept (a shared machine disturbs single runs): seconds for invert + edit (text encoders, VAE encoder
and transformer; no decoding), their ratio, and the edited latents' relative difference (fp32: at most 1e-4).
Not a pytest test (pytest collects test_*.py only).
"""
import argparse
import contextlib
import copy
import os
import time
from pathlib import Path

import torch

import minledits
from minledits import rfinversion
from minledits.io.image import to_tensor
from minledits.nets.flux import unpack
from tests import flux_hub, oracle_rfinversion
from tests.bench import photo

FOLDER = Path(os.environ.get("TMPDIR") or "/tmp") / "minledits-bench" / "flux-mid"
WIDTH = 1024  # T5's d_model = the transformer's joint_attention_dim


def mid_configs() -> dict:
    c = copy.deepcopy(flux_hub.TINY)
    c["transformer"].update(attention_head_dim=128, num_attention_heads=8, num_layers=2, num_single_layers=4,
                            axes_dims_rope=[16, 56, 56], joint_attention_dim=WIDTH, pooled_projection_dim=768)
    c["text_encoder"].update(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=4,
                             projection_dim=768)
    c["text_encoder_2"].update(d_model=WIDTH, d_kv=64, d_ff=2816, num_heads=16, num_layers=2)
    c["vae"].update(block_out_channels=[128, 256, 512, 512], layers_per_block=2, norm_num_groups=32)
    return c


@contextlib.contextmanager
def mid_size():
    """Within: tests/flux_hub.py builds and writes the mid-size configs instead of its tiny ones."""
    before, flux_hub.TINY = flux_hub.TINY, mid_configs()
    try:
        yield
    finally:
        flux_hub.TINY = before


def folder() -> Path:
    if not (FOLDER / "model_index.json").exists():
        with mid_size():
            flux_hub.make(FOLDER)
    return FOLDER


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--gamma", type=float, default=rfinversion.GAMMA)
    p.add_argument("--eta", type=float, default=0.9)
    p.add_argument("--stop", type=float, default=0.38)
    return p.parse_args(argv)


def ours(args, flux, picture):
    inv = rfinversion.invert(flux, picture, gamma=args.gamma, steps=args.steps, size=args.size)
    return rfinversion.edit(flux, inv, prompt="a photo of a tiger", eta=args.eta, stop_timestep=args.stop)


def reference(args, pipe, picture):
    x = to_tensor(picture, args.size)
    Y, y_0, ids, _ = oracle_rfinversion.invert(pipe, x, num_inversion_steps=args.steps, gamma=args.gamma, seed=0)
    out = oracle_rfinversion.edit(pipe, Y, y_0, ids, height=args.size, width=args.size, prompt="a photo of a tiger",
                                  eta=args.eta, stop_timestep=args.stop, num_inference_steps=args.steps)
    return unpack(out, args.size // 8, args.size // 8)


def main(argv=None):
    args = parse(argv)
    where = folder()
    flux, pipe = minledits.load(where), flux_hub.Reference("dev", where, mid_configs()).pipe
    picture = photo((args.size, args.size))
    best, latents = {}, {}
    for _ in range(args.repeat):
        for name, run, model in (("ours", ours, flux), ("reference", reference, pipe)):
            t = time.perf_counter()
            latents[name] = run(args, model, picture)
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - t)
    diff = ((latents["ours"] - latents["reference"]).norm() / latents["reference"].norm()).item()
    print(f"RF-Inversion, mid-size FLUX, {args.size} px, {args.steps} + {args.steps} steps, fp32, "
          f"{torch.get_num_threads()} threads, fastest of {args.repeat}:")
    print(f"  ours {best['ours']:.2f} s, reference {best['reference']:.2f} s: ours / reference "
          f"{best['ours'] / best['reference']:.2f}; edited latents' relative difference {diff:.1e}")
    if diff > 1e-4:
        raise SystemExit(f"the two paths disagree: relative difference {diff:.1e} > 1e-4")


if __name__ == "__main__":
    main()

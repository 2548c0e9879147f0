"""Reconstruction error of DDIM inversion beside edit-friendly DDPM inversion, without and with source guidance:
why LEDITS inverts with DDPM noise maps.

    python -m tests.reconstruction                          # tiny SD 1.x (tests/hub.py tiny-sd1), 128 px, 50 steps
    python -m tests.reconstruction --kind sd15 --size 256   # SD 1.5 architecture, random weights (built once, 4.3 GB)
    python -m tests.reconstruction --kind tiny-sd3 --size 64 --steps 10,20,40   # the flow inversion (tests/sd3_hub.py)

Each inversion of one picture (tests/bench.photo, centre-cropped) is regenerated as it was inverted: the source
prompt at the source guidance (ledits.edit with target_prompt = the source prompt, target_guidance = s_src; at
s_src = 1 the conditional estimate alone), every step, then decoded and compared with the picture the inversion
encoded (its preprocessed input) in 8-bit pixels: mean absolute error (0..255) and PSNR (dB); beside them the
latent error ||w0' - w0|| / ||w0|| and the PSNR against the VAE's own reconstruction of w0 (the inversion's error
alone: with random weights the VAE itself is far from the input). Rows:
    VAE                 encode -> decode alone: the ceiling every row shares
    DDPM (LEDITS)       sampler "ddpm", the last noise map zeroed as LEDITS does
    DDPM, exact         sampler "ddpm", keep_last_noise: the maps make every step land on the inverted latents
    DDIM                sampler "ddim": deterministic DDIM inversion; exact only as far as eps at the cleaner latent
                        stands in for eps at the noisier one, an error that source guidance amplifies
On a flow model (SD3) the rows are instead:
    flow                sampler "flow": the ODE run forward by Euler steps; exact only as far as the velocity one
                        step off stands in for the one the regeneration takes (first order in the step size)
    flow, regenerated at 1   the same inversion regenerated without guidance: at s_src > 1 the two directions
                        integrate different velocity fields, an error more steps do not shrink
Random weights make the figures a property of the samplers on that network, not of a trained model's pictures.
Not a pytest test.
"""
import argparse
import tempfile
import time
from pathlib import Path

import torch

import minledits
from minledits import ledits
from minledits.io.image import to_pil
from minledits.tools import metrics
from tests import hub, sd3_hub
from tests.bench import model_folder, photo

ROWS = {"DDPM (LEDITS)": dict(sampler="ddpm"), "DDPM, exact": dict(sampler="ddpm", keep_last_noise=True),
        "DDIM": dict(sampler="ddim")}
FLOW_ROWS = {"flow": dict(sampler="flow")}


def errors(image, vae_only, sd, w0, w0_inverted) -> tuple[float, float, float, float]:
    """(||w0' - w0|| / ||w0||, MAE (0..255) and PSNR (dB) of w0' decoded against the preprocessed input, PSNR against
    the VAE's own reconstruction of w0) of a regenerated w0'."""
    a, b = metrics.pixels(to_pil(image)[0]), metrics.pixels(minledits.decode(sd, w0))
    latent = ((w0 - w0_inverted).norm() / w0_inverted.norm()).item()
    return latent, (a - b).abs().mean().item(), metrics.psnr(a, b), metrics.psnr(vae_only, b)


def measure(sd, picture, steps: int, size: int, prompt: str, guidances: list[float]) -> dict:
    """{(row, s_src): errors()}, and ("VAE alone", None)."""
    found, flow = {}, sd.prediction_type == "flow"
    for s_src in guidances:
        for name, kw in (FLOW_ROWS if flow else ROWS).items():
            inv = minledits.invert(sd, picture, steps=steps, skip=0, size=size, source_prompt=prompt,
                                   source_guidance=s_src, **kw)
            vae_only = metrics.pixels(minledits.decode(sd, inv.w0))
            found["VAE alone", None] = errors(inv.image, vae_only, sd, inv.w0, inv.w0)
            w0 = ledits.edit(sd, inv, target_prompt=prompt, target_guidance=s_src)
            found[name, s_src] = errors(inv.image, vae_only, sd, w0, inv.w0)
            if flow and s_src != 1:
                w0 = ledits.edit(sd, inv, target_prompt=prompt, target_guidance=1)
                found[name + ", regenerated at 1", s_src] = errors(inv.image, vae_only, sd, w0, inv.w0)
    return found


def table(found: dict, steps: int) -> str:
    lines = ["| steps | inversion | s_src | latent error | MAE vs input | PSNR vs input | PSNR vs VAE alone |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for (name, s_src), (latent, mae, psnr, own) in sorted(found.items(), key=lambda kv: kv[0][1] is not None):
        lines.append(f"| {steps} | {name} | {'-' if s_src is None else f'{s_src:g}'} | {latent:.2e} | {mae:.2f} | "
                     f"{psnr:.2f} dB | {own:.2f} dB |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m tests.reconstruction", description=__doc__.split("\n")[0])
    p.add_argument("--kind", default="tiny-sd1", help="tests/hub.py model kind: tiny-sd1 (default), sd15, ...; "
                   "tiny-sd3 (tests/sd3_hub.py)")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--steps", default="50", help="inference steps, comma-separated")
    p.add_argument("--prompt", default="a photo of colourful gradients", help="the source prompt")
    p.add_argument("--guidance", default="1,3.5,7.5", help="source guidance scales, comma-separated")
    args = p.parse_args(argv)
    guidances = [float(g) for g in args.guidance.split(",")]
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = model_folder(args.kind) if args.kind in ("sd15", "sdxl") else Path(tmp) / args.kind
        if args.kind == "tiny-sd3":
            sd3_hub.make(folder)
        elif args.kind not in ("sd15", "sdxl"):
            hub.make(args.kind, folder)
        sd = minledits.load(folder)
        start = time.time()
        tables = [table(measure(sd, photo(), int(n), args.size, args.prompt, guidances), int(n))
                  for n in args.steps.split(",")]
    print(f"{args.kind} (random weights), {args.size} px, skip 0, every step regenerated with the source prompt "
          f"{args.prompt!r} at its guidance; {time.time() - start:.0f} s")
    print("\n".join([tables[0]] + [t.split("\n", 2)[2] for t in tables[1:]]))


if __name__ == "__main__":
    main()

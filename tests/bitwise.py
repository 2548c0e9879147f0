"""Where ours and the reference part, on any device: each network on equal inputs, then LEDITS++ step by step.

    python -m tests.bitwise                          # SD 1.5 architecture, random weights (tests/bench.py builds it)
    python -m tests.bitwise --device cuda --kind sd15

Prints the max |difference| of: the VAE encoder on the bench picture; CLIP on ["", "glasses", "smile"], in one
batch and one prompt at a time, and how a row moves with its batch; the UNet at batch 1 and 3 with the fused and
the explicit kernel, with and without the text K/V once; then the LEDITS++ inversion in the bit-for-bit mode
(`batch_size=1`, explicit kernel) against the pipeline's `invert`, and both edits of that same inversion, step by
step. On CPU every line reads 0.00e+00 except the batch-row lines (a row of a batch against its own call).
Not a pytest test (pytest collects test_*.py only).
"""
import argparse
import warnings

import torch

import minledits
from minledits import leditspp
from minledits.image import to_tensor
from minledits.layers import explicit_attention
from tests import bench, oracle

CONCEPTS, SIZE = ["glasses", "smile"], 256


def d(a, b) -> str:
    return f"{(a.float().cpu() - b.float().cpu()).abs().max().item():.2e}"


@torch.inference_mode()
def networks(sd, ref, folder, device):
    from diffusers.models.attention_processor import AttnProcessor
    x = to_tensor(bench.photo(), SIZE).to(device)
    print("VAE encoder:", d(sd.encode(x), ref.vae.encode(x).latent_dist.mode() * ref.vae.config.scaling_factor))
    P = ["", *CONCEPTS]
    ids = oracle.tokenizer(folder)(P, padding="max_length", max_length=77, return_tensors="pt").input_ids.to(device)
    e3 = sd.text_embeddings(P)
    print("CLIP, batch 3:", d(e3, ref.text_encoder(ids)[0]), "| one at a time:",
          [d(sd.text_embeddings([p]), ref.text_encoder(ids[i:i + 1])[0]) for i, p in enumerate(P)],
          "| a row of the batch of 3 against its own call:", [d(sd.text_embeddings([p]), e3[i:i + 1]) for i, p in
                                                               enumerate(P)])
    g = torch.Generator().manual_seed(0)
    x3 = torch.randn(3, 4, SIZE // 8, SIZE // 8, generator=g).to(device)
    c3 = torch.randn(3, 77, ref.unet.config.cross_attention_dim, generator=g).to(device)
    for name, kernel in (("fused", None), ("explicit", explicit_attention)):
        if kernel is not None:
            ref.unet.set_attn_processor(AttnProcessor())
        with sd.unet.attention_kernel(kernel):
            for b in (1, 3):
                x, c = x3[:b], c3[:b]
                r = ref.unet(x, 501, c).sample
                print(f"UNet, {name} kernel, batch {b}: {d(sd.unet(x, 501, c), r)}, with the text K/V once "
                      f"{d(sd.unet(x, 501, sd.unet.text_kv(c)), r)} | row 0 against its own call: ours "
                      f"{d(sd.unet(x, 501, c)[:1], sd.unet(x[:1], 501, c[:1]))}, the reference's "
                      f"{d(r[:1], ref.unet(x[:1], 501, c[:1]).sample)}")


def leditspp_steps(sd, ref, device):
    n, f = 30, 0.15
    steps = int(n * (1 + f))
    pipe = oracle.leditspp_invert(oracle.leditspp_pipeline(ref, copy_unet=False),
                                  to_tensor(bench.photo(), SIZE).to(device), "", n, f, seed=0)
    trace = []
    with sd.unet.attention_kernel(explicit_attention):
        inv = minledits.invert(sd, bench.photo(), sampler="dpmsolver++", steps=steps, skip=steps - n, seed=0,
                               size=SIZE, batch_size=1)
        print("LEDITS++ inversion, bit-for-bit mode: x_T", d(inv.xts[:1], pipe.init_latents), "| noise maps",
              d(inv.zs, pipe.zs[:, 0]))
        pipe.init_latents, pipe.zs = inv.xts[:1].clone().to(device), inv.zs[:, None].clone().to(device)
        ours = leditspp.edit(sd, inv, concepts=CONCEPTS, mask="intersect", callback=trace.append)
    theirs = oracle.leditspp_call(pipe, [leditspp.concept(c) for c in CONCEPTS], "intersect", steps)
    print("LEDITS++ edit of the same inversion:", d(ours, theirs), "| x_{t-1} at each step:",
          [d(st.x_prev, pipe.own[st.i:st.i + 1]) for st in trace])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kind", default="sd15", help="tests/hub.py model kind (sd15, sd21-base; tiny-sd1 fails: the "
                   "pipeline finds no 16x16 attention maps at 256 px)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    warnings.simplefilter("ignore")
    torch.backends.cudnn.allow_tf32 = False  # as the bench: fp32 means fp32
    folder = bench.model_folder(args.kind)
    ref = bench.reference_modules(argparse.Namespace(kind=args.kind, dtype="float32", device=args.device), folder)
    sd = minledits.load(folder, args.device)
    networks(sd, ref, folder, args.device)
    leditspp_steps(sd, ref, args.device)


if __name__ == "__main__":
    main()

"""Where ours and the reference part, on any device: each network on equal inputs, then LEDITS++ step by step.

    python -m tests.bitwise                                         # SD 1.5 architecture, random weights
    python -m tests.bitwise --device cuda --kind sd15
    python -m tests.bitwise --device cuda --kind sdxl --size 1024   # against LEditsPPPipelineStableDiffusionXL
    python -m tests.bitwise --kind tiny-sdxl --size 64              # the same on a tiny SDXL: seconds on CPU

The full-size models are built with random weights by tests/bench.py (once, in $TMPDIR/minledits-bench).

Prints the max |difference| of: the VAE encoder on the bench picture; each text encoder on ["", *CONCEPTS] (SD:
CLIP's last hidden states; SDXL: both encoders' penultimate ones and the second's pooled projection), in one batch
and one prompt at a time, and how a row moves with its batch; the UNet at batch 1 and 3 with the fused and the
explicit kernel, with and without the text K/V once (SDXL: with random pooled text and the picture's time_ids);
then the LEDITS++ inversion in the bit-for-bit mode (`batch_size=1`, explicit kernel) against the pipeline's
`invert`, and both edits of that same inversion, step by step (SD: intersect masks; SDXL: cross_attention, as the
bench). On CPU every line reads 0.00e+00 except the batch-row lines (a row of a batch against its own call).
Not a pytest test (pytest collects test_*.py only).
"""
import argparse
import warnings

import torch

import minledits
from minledits import leditspp
from minledits.io.image import to_tensor
from minledits.parity import explicit_attention, unet_text_kv
from tests import bench, oracle
from tests.helpers import aligned

CONCEPTS = ["glasses", "smile"]


def d(a, b) -> str:
    return f"{(a.float().cpu() - b.float().cpu()).abs().max().item():.2e}"


def text_encoders(sd, ref):
    """(name, ours, the reference's, tokenizer) per text encoder: functions of the same token ids, [B, ...] out."""
    if ref.text_encoder_2 is None:
        return [("CLIP", sd.text_encoder, lambda ids: ref.text_encoder(ids)[0], sd.tokenizer)]

    def penultimate(encoder, pooled=False):  # transformers' hidden_states[-2] (and text_embeds), a row per prompt
        def run(ids):
            out = encoder(ids, output_hidden_states=True)
            return torch.cat([out.hidden_states[-2].flatten(1), *([out.text_embeds] if pooled else [])], 1)
        return run

    def ours_2(ids):
        return torch.cat([t.flatten(1) for t in sd.text_encoder_2.penultimate_and_pooled(ids)], 1)
    return [("CLIP ViT-L, penultimate", lambda ids: sd.text_encoder.penultimate(ids).flatten(1),
             penultimate(ref.text_encoder), sd.tokenizer),
            ("OpenCLIP bigG, penultimate and pooled", ours_2, penultimate(ref.text_encoder_2, True), sd.tokenizer_2)]


@torch.inference_mode()
def networks(sd, ref, size, device):
    from diffusers.models.attention_processor import AttnProcessor
    x = to_tensor(bench.photo(), size).to(device)
    print("VAE encoder:", d(sd.encode(x), ref.vae.encode(x).latent_dist.mode() * ref.vae.config.scaling_factor))
    P = ["", *CONCEPTS]
    for name, ours, theirs, tokenizer in text_encoders(sd, ref):
        ids = tokenizer(P).to(device)
        e3 = ours(ids)
        print(f"{name}, batch 3:", d(e3, theirs(ids)), "| one at a time:",
              [d(ours(ids[i:i + 1]), theirs(ids[i:i + 1])) for i in range(3)],
              "| a row of the batch of 3 against its own call:", [d(ours(ids[i:i + 1]), e3[i:i + 1]) for i in range(3)])
    g = torch.Generator().manual_seed(0)
    x3 = torch.randn(3, 4, size // 8, size // 8, generator=g).to(device)
    c3 = torch.randn(3, 77, ref.unet.config.cross_attention_dim, generator=g).to(device)
    xl = bench.xl_inputs(ref.unet.config, 3, size, device) if ref.text_encoder_2 is not None else {}

    def added(n):  # SDXL's extra conditioning of n rows
        return {k: v[:n] for k, v in xl.items()}

    def ours(n, c):
        return sd.unet(x3[:n], 501, c, **added(n))

    def theirs(n):
        return ref.unet(x3[:n], 501, c3[:n], added_cond_kwargs=added(n) or None).sample
    for name, kernel in (("fused", None), ("explicit", explicit_attention)):
        if kernel is not None:
            ref.unet.set_attn_processor(AttnProcessor())
        with sd.unet.attention_kernel(kernel):
            for b in (1, 3):
                r = theirs(b)
                print(f"UNet, {name} kernel, batch {b}: {d(ours(b, c3[:b]), r)}, with the text K/V once "
                      f"{d(ours(b, unet_text_kv(sd.unet, c3[:b])), r)} | row 0 against its own call: ours "
                      f"{d(ours(b, c3[:b])[:1], ours(1, c3[:1]))}, the reference's {d(r[:1], theirs(1))}")


def leditspp_steps(sd, ref, size, device):
    n, f = 30, 0.15
    steps = int(n * (1 + f))
    xl = ref.text_encoder_2 is not None
    mask = "cross_attention" if xl else "intersect"
    pipe = (oracle.leditspp_xl_pipeline if xl else oracle.leditspp_pipeline)(ref, copy_unet=False)
    oracle.leditspp_invert(pipe, to_tensor(bench.photo(), size).to(device), "", n, f, seed=0)
    trace = []
    with sd.unet.attention_kernel(explicit_attention):
        inv = minledits.invert(sd, bench.photo(), sampler="dpmsolver++", steps=steps, skip=steps - n, seed=0,
                               size=size, batch_size=1)
        print("LEDITS++ inversion, bit-for-bit mode: x_T", d(inv.xts[:1], pipe.init_latents), "| noise maps",
              d(inv.zs, pipe.zs[:, 0]))
        pipe.init_latents, pipe.zs = inv.xts[:1].clone().to(device), inv.zs[:, None].clone().to(device)
        ours = leditspp.edit(sd, inv, concepts=CONCEPTS, mask=mask, callback=trace.append)
    theirs = oracle.leditspp_call(pipe, [leditspp.concept(c) for c in CONCEPTS], mask, steps)
    print(f"LEDITS++ edit ({mask}) of the same inversion:", d(ours, theirs), "| x_{t-1} at each step:",
          [d(st.x_prev, pipe.own[st.i:st.i + 1]) for st in trace])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kind", default="sd15", help="tests/hub.py model kind (sd15, sd21-base, sdxl, tiny-sdxl; "
                   "tiny-sd1 fails: the pipeline finds no 16x16 attention maps at 256 px)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", type=int, default=256)
    args = p.parse_args()
    warnings.simplefilter("ignore")
    torch.backends.cudnn.allow_tf32 = False  # as the bench: fp32 means fp32
    folder = bench.model_folder(args.kind)
    ref = bench.reference_modules(argparse.Namespace(kind=args.kind, dtype="float32", device=args.device), folder)
    sd = minledits.load(folder, args.device)
    aligned(sd.unet), aligned(ref.unet)  # both in fresh memory (tests/helpers.aligned: tiny models on CPU)
    networks(sd, ref, args.size, args.device)
    leditspp_steps(sd, ref, args.size, args.device)


if __name__ == "__main__":
    main()

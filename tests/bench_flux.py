"""Benchmark: RF-Inversion and FlowEdit on FLUX.1-dev through minledits and through their references, the same random
weights: RF-Inversion (rfinversion.invert + edit) against the community pipeline's semantics
(tests/oracle_rfinversion.py), FlowEdit (flowedit.edit, FLUX_DEFAULTS) against the authors' FlowEditFLUX
(tests/oracle_flowedit.py), both references on diffusers' FluxPipeline.

    python -m tests.bench_flux                                # the mid-size FLUX, both methods, 256 px, 4 steps, fp32
    python -m tests.bench_flux --method rf-inversion --steps 28 --size 512 --repeat 3
    python -m tests.bench_flux --config full --device cuda --size 1024 --steps 28 --offload-text    # bf16: a GPU's run
                                                                # (tests/device_flux.sh runs it on a lent machine)

The model (--config): mid, FLUX.1-dev's layout, scheduler and VAE with a transformer of FLUX's head width (128), 8
heads, 2 double- and 4 single-stream blocks and the guidance embedding, CLIP-L's width with 4 layers, a T5 of 2 layers
whose width is the transformer's joint_attention_dim (1024); full, FLUX.1-dev's architecture (full_configs: the
transformer 11.9e9 parameters, T5-XXL's encoder 4.76e9, CLIP-L 0.12e9, the VAE 0.08e9; 31.4 GiB in bf16).
The weights: the reference's networks (diffusers' and transformers' classes) built where they run and in the run's
dtype, seeded, by their own initialisation, the tensors that start constant randomised (as tests/flux_hub.py does);
ours built on the meta device from the same configs (minledits.io.load.build) and filled with those very tensors
(load.fill): one copy of the weights on the device, no file written (writing and reading back the full size's 33 GB
would take minutes of a GPU's lease). The prompts' tokenizers and nothing else are files (a temporary folder).
What is timed: RF-Inversion's invert + edit, FlowEdit's edit: text encoders, VAE encoder and transformer, no decoding;
on the same preprocessed picture, seed and prompts, the paths alternating, --warmup runs first (by default one on
CUDA, none on the CPU), each path's fastest of --repeat kept; on CUDA synchronised around each run, and each run's
peak of allocated device memory (max_memory_allocated after reset_peak_memory_stats): the one copy of the weights
both share (what the other path's networks hold beyond it is printed: a few MiB) plus what the run allocates.
The reference off the CPU: the oracles make their position ids, timesteps, guidance values and token ids on the CPU,
so a forward pre-hook on each of its networks moves its tensor inputs to the network's device (what moves per call:
those and the text embeddings that encode_prompt(device=cpu) hands back, a few MiB). Its draws (torch.randn_like and
the VAE posterior's randn_tensor) are taken on the CPU in float32 and cast, as ours are on every device: on the CPU in
float32 these are the reference's own numbers.
The edited latents' relative difference ||ours - reference|| / ||reference||: in float32 at most 1e-4, or the run
fails; in bf16 (or fp16) printed only: each path rounds its intermediates to 8 (11) significant bits at its own places
(its own kernels, casts and orders of operations), and 2 x 28 evaluations of a random network in a closed loop carry
those differences forward, so that figure measures rounding, not whether the methods agree (the float32 runs and the
parity tests check that).
--offload-text (ours only), after the comparison: the reference's networks deleted, ours with offload_text() (as
load(offload_text=True) and the command line's --offload-text leave it: the text encoders on the CPU, swapped with the
transformer while they encode); each method once: seconds and peak allocated / reserved device memory, against a 24 GB
card. The reference has no such option (FluxPipeline's enable_model_cpu_offload moves every network, the transformer
too): no reference figure.
Not a pytest test (pytest collects test_*.py only); tests/test_flux_full_config.py checks full_configs' sizes.
"""
import argparse
import contextlib
import copy
import gc
import json
import tempfile
import time
from pathlib import Path

import torch

from minledits import flowedit, rfinversion
from minledits.flux import T5_TOKENS, Flux, schedule_of
from minledits.io import load
from minledits.io.image import to_tensor
from minledits.nets import t5
from minledits.nets.flux import unpack
from tests import flux_hub, hub, oracle_flowedit, oracle_rfinversion, sd3_hub, t5_hub
from tests.bench import photo

WIDTH = 1024            # mid: T5's d_model = the transformer's joint_attention_dim
METHODS = ("rf-inversion", "flowedit")
PROMPTS = dict(source_prompt="a photo of a cat", target_prompt="a photo of a tiger")
GiB = 2 ** 30
CARD_24GB = 23.5 * GiB  # what a 24 GB card leaves to PyTorch's tensors, roughly (its CUDA context takes the rest)


def mid_configs() -> dict:
    c = copy.deepcopy(flux_hub.TINY)
    c["transformer"].update(attention_head_dim=128, num_attention_heads=8, num_layers=2, num_single_layers=4,
                            axes_dims_rope=[16, 56, 56], joint_attention_dim=WIDTH, pooled_projection_dim=768)
    c["text_encoder"].update(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=4,
                             projection_dim=768)
    c["text_encoder_2"].update(d_model=WIDTH, d_kv=64, d_ff=2816, num_heads=16, num_layers=2)
    c["vae"].update(block_out_channels=[128, 256, 512, 512], layers_per_block=2, norm_num_groups=32)
    return c


def full_configs() -> dict:
    """black-forest-labs/FLUX.1-dev's config.json files: the transformer's (19 double- and 38 single-stream blocks of 24
    heads x 128, guidance embedding), CLIP-L's text model (12 layers of 768), T5 v1.1 XXL's encoder (24 layers of 4096,
    64 heads x 64, gated-GELU feed-forward of 10240), the VAE's (16 latent channels, 2 resnets per level)."""
    c = copy.deepcopy(flux_hub.TINY)
    c["transformer"].update(attention_head_dim=128, num_attention_heads=24, num_layers=19, num_single_layers=38,
                            axes_dims_rope=[16, 56, 56], joint_attention_dim=4096, pooled_projection_dim=768,
                            in_channels=64, guidance_embeds=True, patch_size=1)
    c["text_encoder"].update(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                             projection_dim=768, max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu")
    c["text_encoder_2"].update(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                               feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
                               relative_attention_max_distance=128, layer_norm_epsilon=1e-6)
    c["vae"].update(block_out_channels=[128, 256, 512, 512], layers_per_block=2, norm_num_groups=32, latent_channels=16,
                    scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
    return c


CONFIGS = {"mid": mid_configs, "full": full_configs}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=list(CONFIGS), default="mid")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=list(load.ALIASES), default=None, help="default float32 (cpu), bfloat16 (cuda)")
    p.add_argument("--method", choices=[*METHODS, "both"], default="both")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=4, help="RF-Inversion's inversion and edit steps; FlowEdit's steps "
                                                        "(n_max: FLUX_DEFAULTS' 24 of 28, in proportion)")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--warmup", type=int, default=None, help="runs of each path first, not counted (default: 1 on "
                                                           "cuda, 0 on cpu)")
    p.add_argument("--offload-text", action="store_true", help="then ours with its text encoders offloaded")
    p.add_argument("--gamma", type=float, default=rfinversion.GAMMA)
    p.add_argument("--eta", type=float, default=0.9)
    p.add_argument("--stop", type=float, default=0.38)
    p.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = p.parse_args(argv)
    args.dtype = load.dtype_of(args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
    args.warmup = (1 if args.device == "cuda" else 0) if args.warmup is None else args.warmup
    args.n_max = max(1, round(args.steps * flowedit.FLUX_DEFAULTS["n_max"] / flowedit.FLUX_DEFAULTS["steps"]))
    args.methods = METHODS if args.method == "both" else (args.method,)
    return args


# --------------------------------------------------------------------------------------------- the weights
@contextlib.contextmanager
def made_as(device, dtype):
    """Within: new tensors on `device` in `dtype` (modules built there, initialised there)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(before)


def makers(c: dict) -> dict:
    """{name: a function building the reference's network of that name from c}, in the current device and dtype."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel
    return {"text_encoder": lambda: CLIPTextModel(CLIPTextConfig(**c["text_encoder"])),
            "text_encoder_2": lambda: T5EncoderModel(T5Config(**c["text_encoder_2"])),
            "transformer": lambda: FluxTransformer2DModel(**sd3_hub._clean(c["transformer"])),
            "vae": lambda: AutoencoderKL(**sd3_hub._clean(c["vae"]))}


def networks(c: dict, device, dtype, seed: int = 0) -> dict:
    """The reference's networks {text_encoder, text_encoder_2, transformer, vae}, built on `device` in `dtype`, seeded
    (each network its own seed), eval; the tensors that start constant randomised (flux_hub's recipe). T5 in fp16
    keeps its feed-forward output weights in fp32, as transformers loads it."""
    mods = {}
    with made_as(device, dtype):
        for i, (name, make) in enumerate(makers(c).items()):
            torch.manual_seed(seed + 10 * i)
            module = make().eval().requires_grad_(False)
            sd3_hub._randomise_constants(module, torch.Generator(device).manual_seed(seed + 10 * i + 1))
            mods[name] = load.keep_wo_fp32(module) if name == "text_encoder_2" and dtype == torch.float16 else module
    return mods


def write_files(folder: Path) -> Path:
    """The files the networks do not hold: CLIP's tokenizer/ and T5's tokenizer_2/ (tests/hub.py, tests/t5_hub.py)."""
    hub.write_tokenizer(folder / "tokenizer", hub.EOS)
    t5_hub.write_tokenizer(folder / "tokenizer_2")
    return folder


def ours_from(mods: dict, c: dict, files: Path, device, dtype) -> Flux:
    """minledits' Flux on the reference's tensors: each network built on meta from its config and filled with them
    under the names the Hub's files give them (what load reads from a folder, without the folder)."""
    nets = {}
    for name, module in mods.items():
        net, want = load.build(name, c[name], f"the reference's {name}", load.FLUX_CLASSES), dtype
        if name == "text_encoder_2" and dtype == torch.float16:
            net, want = load.keep_wo_fp32(net), None
        nets[name] = load.fill(net, getters(name, module), name, want, device)
    return Flux(tokenizer=load.folder_tokenizer(files, c["text_encoder"]), text_encoder=nets["text_encoder"],
                tokenizer_2=load.t5_tokenizer(files / load.FLUX_T5_TOKENIZER, T5_TOKENS),
                text_encoder_2=nets["text_encoder_2"], transformer=nets["transformer"], vae=nets["vae"],
                schedule=schedule_of(c["scheduler"]), model_id="random FLUX.1-dev", fingerprint="bench",
                device=torch.device(device), dtype=dtype)


def getters(name: str, module: torch.nn.Module) -> dict:
    """{our key: its tensor} of a reference network's state dict, under the names load reads a file's keys by."""
    component = "t5" if name == "text_encoder_2" else name
    found = {key: (lambda t=t: t) for stored, t in module.state_dict().items()
             if (key := load.rename(component, stored)) is not None}
    return t5.tied_keys(found) if component == "t5" else found


def reference_pipe(mods: dict, c: dict, files: Path):
    """diffusers' FluxPipeline on the networks, each moving its tensor inputs to its device (module docstring)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTokenizer, T5TokenizerFast
    for module in mods.values():
        module.register_forward_pre_hook(inputs_to(next(module.parameters()).device), with_kwargs=True)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_config(c["scheduler"]),
                        tokenizer=CLIPTokenizer.from_pretrained(files / "tokenizer"),
                        tokenizer_2=T5TokenizerFast.from_pretrained(files / "tokenizer_2"), **mods)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def inputs_to(device: torch.device):
    def hook(_, args, kwargs):
        move = lambda v: v.to(device) if torch.is_tensor(v) else v  # noqa: E731
        return tuple(map(move, args)), {k: move(v) for k, v in kwargs.items()}
    return hook


def tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


def extra_bytes(flux: Flux, mods: dict) -> tuple[int, int]:
    """(bytes of ours not shared with the reference's tensors, bytes of the reference's not shared with ours)."""
    ours = [t for m in (flux.text_encoder, flux.text_encoder_2, flux.transformer, flux.vae) for t in tensors(m)]
    theirs = [t for m in mods.values() for t in tensors(m)]
    own = lambda a, b: sum(t.nbytes for t in a if t.data_ptr() not in {u.data_ptr() for u in b})  # noqa: E731
    return own(ours, theirs), own(theirs, ours)


# --------------------------------------------------------------------------------------------- the runs
def ours_rf(args, flux, picture, x):
    inv = rfinversion.invert(flux, picture, gamma=args.gamma, steps=args.steps, size=args.size)
    return rfinversion.edit(flux, inv, prompt=PROMPTS["target_prompt"], eta=args.eta, stop_timestep=args.stop)


def reference_rf(args, pipe, picture, x):
    Y, y_0, ids, _ = oracle_rfinversion.invert(pipe, x, num_inversion_steps=args.steps, gamma=args.gamma, seed=0)
    out = oracle_rfinversion.edit(pipe, Y, y_0, ids, height=args.size, width=args.size,
                                  prompt=PROMPTS["target_prompt"], eta=args.eta, stop_timestep=args.stop,
                                  num_inference_steps=args.steps)
    return unpack(out, args.size // 8, args.size // 8)


def ours_flowedit(args, flux, picture, x):
    options = dict(flowedit.FLUX_DEFAULTS, steps=args.steps, n_max=args.n_max)
    return flowedit.edit(flux, picture, size=args.size, **PROMPTS, **options)


def reference_flowedit(args, pipe, picture, x):
    x_src = oracle_flowedit.encode_image(pipe, x)
    return oracle_flowedit.flowedit_flux(pipe, x_src, PROMPTS["source_prompt"], PROMPTS["target_prompt"],
                                         T_steps=args.steps, n_max=args.n_max, seed=0)


RUNS = {"rf-inversion": (ours_rf, reference_rf), "flowedit": (ours_flowedit, reference_flowedit)}


@contextlib.contextmanager
def drawn_as_ours():
    """Within: torch.randn_like and the VAE posterior's randn_tensor draw on the CPU in float32 from torch's global
    generator, then cast to their tensor's device and dtype (module docstring)."""
    from diffusers.models.autoencoders import vae
    randn_like, randn_tensor = torch.randn_like, vae.randn_tensor
    torch.randn_like = lambda u: torch.randn(u.shape, dtype=torch.float32).to(u)
    vae.randn_tensor = lambda shape, generator=None, device=None, dtype=None, **_: torch.randn(
        shape, generator=generator, dtype=torch.float32).to(device, dtype)
    try:
        yield
    finally:
        torch.randn_like, vae.randn_tensor = randn_like, randn_tensor


def measured(device: torch.device, run) -> dict:
    """run()'s seconds (synchronised on CUDA) and, on CUDA, what was allocated before it (resident) and its peaks of
    allocated and reserved memory; its result."""
    cuda, resident = device.type == "cuda", None
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        torch.cuda.synchronize(device)
        resident = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    out = run()
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)) if cuda else (None, None)
    return dict(seconds=seconds, resident=resident, peak=peak[0], reserved=peak[1], out=out)


def compare(args, flux, pipe, picture, x) -> dict:
    """{method: {ours, reference: {seconds (fastest), peak (highest)}, difference}} (module docstring)."""
    rows = {}
    for method in args.methods:
        runs = dict(zip(("ours", "reference"), RUNS[method]))
        best, last = {}, {}
        for k in range(args.warmup + args.repeat):
            for name in (("ours", "reference") if k % 2 == 0 else ("reference", "ours")):
                model = flux if name == "ours" else pipe
                with drawn_as_ours() if name == "reference" else contextlib.nullcontext():
                    m = measured(args.device, lambda: runs[name](args, model, picture, x))
                last[name] = m.pop("out")
                print(f"  {method} {name} run {k + 1}{' (warm-up)' if k < args.warmup else ''}: "
                      f"{m['seconds']:.2f} s{peak_text(m)}", flush=True)
                if k >= args.warmup:
                    b = best.setdefault(name, dict(seconds=float("inf"), peak=None, resident=m["resident"]))
                    b["seconds"] = min(b["seconds"], m["seconds"])
                    b["peak"] = max(b["peak"] or 0, m["peak"]) if m["peak"] is not None else None
        a, b = last["ours"].float().cpu(), last["reference"].float().cpu()
        rows[method] = dict(best, difference=((a - b).norm() / b.norm()).item())
    return rows


def offloaded(args, flux, picture, x) -> dict:
    """{method: seconds, resident, peak, reserved} of ours after flux.offload_text() (the reference's networks gone:
    resident, the transformer and the VAE)."""
    gc.collect()
    flux.offload_text()
    rows = {}
    for method in args.methods:
        m = measured(args.device, lambda: RUNS[method][0](args, flux, picture, x))
        m.pop("out")
        rows[method] = m
        print(f"  {method} ours, text encoders offloaded: {m['seconds']:.2f} s{peak_text(m)}", flush=True)
    return rows


def peak_text(m: dict) -> str:
    return "" if m["peak"] is None else f", peak {gib(m['peak'])} GiB allocated, {gib(m['reserved'])} reserved"


def ratio(a, b) -> str:
    return "-" if a is None or b is None else f"{a / b:.2f}"


def gib(v) -> str:
    return "-" if v is None else f"{v / GiB:.2f}"


def table(args, rows: dict) -> list[str]:
    dtype = load.dtype_name(args.dtype)
    lines = ["method       | ours s | reference s | ratio | ours peak GiB | reference peak GiB | ratio | latents' "
             "relative difference"]
    for method, r in rows.items():
        o, ref = r["ours"], r["reference"]
        lines.append(f"{method:<12} | {o['seconds']:6.2f} | {ref['seconds']:11.2f} | "
                     f"{ratio(o['seconds'], ref['seconds']):>5} | {gib(o['peak']):>13} | {gib(ref['peak']):>18} | "
                     f"{ratio(o['peak'], ref['peak']):>5} | {r['difference']:.1e}"
                     + (" (fp32: at most 1e-4)" if dtype == "fp32" else f" ({dtype}: printed, not checked)"))
    for method, r in rows.items():
        o, ref = r["ours"], r["reference"]
        if o["peak"] is not None:
            above = [p["peak"] - p["resident"] for p in (o, ref)]
            lines.append(f"{method}: peaks above the {gib(o['resident'])} / {gib(ref['resident'])} GiB resident "
                         f"before the run (the shared weights): ours {gib(above[0])} GiB, reference {gib(above[1])} "
                         f"GiB, ratio {ratio(*above)}")
    return lines


def offload_lines(offload: dict) -> list[str]:
    lines = []
    for method, m in offload.items():
        fits = "" if m["peak"] is None else (" - fits a 24 GB card" if m["reserved"] <= CARD_24GB else
                                             " - does not fit a 24 GB card") + f" (<= {CARD_24GB / GiB} GiB reserved)"
        lines.append(f"ours with --offload-text, {method}: {m['seconds']:.2f} s, {gib(m['resident'])} GiB resident, "
                     f"peak {gib(m['peak'])} GiB allocated, {gib(m['reserved'])} GiB reserved{fits}; the reference "
                     "has no such option")
    return lines


def main(argv=None):
    args = parse(argv)
    cuda = args.device == "cuda"
    args.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    if args.dtype == torch.float32:   # fp32 means fp32: no TF32 convolutions or matrix products on the GPU
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    c = CONFIGS[args.config]()
    t = time.perf_counter()
    mods = networks(c, args.device, args.dtype)
    build_s = time.perf_counter() - t
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in mods.items()}
    with tempfile.TemporaryDirectory(prefix="minledits-bench-flux-") as tmp:
        files = write_files(Path(tmp))
        t = time.perf_counter()
        flux = ours_from(mods, c, files, args.device, args.dtype)
        ours_s = time.perf_counter() - t
        pipe = reference_pipe(mods, c, files)
    own, theirs = extra_bytes(flux, mods)
    where = torch.cuda.get_device_name(args.device) if cuda else f"cpu, {torch.get_num_threads()} threads"
    print(f"FLUX.1-dev {args.config} ({' + '.join(f'{n / 1e9:.3g}e9' for n in counts.values())} parameters), "
          f"{load.dtype_name(args.dtype)} on {where}: built in {build_s:.1f} s, ours filled with its tensors in "
          f"{ours_s:.1f} s (ours holds {own / 2**20:.1f} MiB of its own, the reference {theirs / 2**20:.1f} MiB)",
          flush=True)
    picture = photo((args.size, args.size))
    x = to_tensor(picture, args.size).to(args.device, args.dtype)
    figures = dict(config=args.config, device=where, dtype=load.dtype_name(args.dtype), size=args.size,
                   steps=args.steps, n_max=args.n_max, repeat=args.repeat, warmup=args.warmup, parameters=counts,
                   build_s=build_s, rows=compare(args, flux, pipe, picture, x))
    print(f"{', '.join(args.methods)}, FLUX.1-dev {args.config}, {args.size} px, {args.steps} steps (RF-Inversion: "
          f"{args.steps} + {args.steps}; FlowEdit: n_max {args.n_max}), {load.dtype_name(args.dtype)} on {where}, "
          f"fastest of {args.repeat} after {args.warmup} warm-up:")
    print("\n".join(table(args, figures["rows"])), flush=True)
    save(args.json, figures)
    if args.offload_text:
        del pipe, mods
        figures["offload_text"] = offloaded(args, flux, picture, x)
        print("\n".join(offload_lines(figures["offload_text"])))
        save(args.json, figures)
    bad = {m: r["difference"] for m, r in figures["rows"].items() if not r["difference"] <= 1e-4}
    if args.dtype == torch.float32 and bad:
        raise SystemExit(f"the two paths disagree: relative difference {bad} > 1e-4")


def save(path: Path | None, figures: dict) -> None:
    if path:
        path.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()

"""Shared test helpers (the tests never import each other): the small inversion setting, a test photo, our
edit beside the reference pipeline's on the same inversion, and the package's import graph."""
import ast
import contextlib
import fnmatch
import shutil
import sys
import weakref
from pathlib import Path
from unittest import mock

import torch
from PIL import Image

import minledits
from minledits import Concept, cli
from minledits.io import load as load_module
from tests import hub, oracle

N, SKIP, SIZE = 10, 3, 64  # 10 steps, 7 of them edited, 64 px (8x8 latents): tiny models run in milliseconds
CONCEPTS = [Concept("glasses", scale=5.0, threshold=0.9, warmup=1, cooldown=6, weight=1.5),
            Concept("beard", scale=3.0, threshold=0.8, warmup=3, reverse=True, weight=0.5)]


def deep(kind, folder, sample_size=16):
    """A tiny model with 3 UNet levels (latent side h, h/2, h/4), all with cross-attention, in the Hub layout. The
    standard tiny UNets have attention only at the latent size; LEDITS++' and Prompt-to-Prompt's attention masks
    read the layers at 1/4 of the latent side (16x16 at 512 px), which this one has."""
    configs = hub.configs

    def three_levels(k):
        c = configs(k)
        c["unet"].update(block_out_channels=[32, 32, 64], down_block_types=["CrossAttnDownBlock2D"] * 3,
                         up_block_types=["CrossAttnUpBlock2D"] * 3, sample_size=sample_size,
                         attention_head_dim=4 if k == "tiny-sd1" else [2, 2, 4])
        return c
    with mock.patch.object(hub, "configs", three_levels):
        return hub.make(kind, folder)


def aligned(module: torch.nn.Module) -> torch.nn.Module:
    """module with its parameters copied to fresh memory. minledits.load leaves them in the file's memory map, at
    the offsets the safetensors header gives; MKL rounds some small matrix products (the tiny models', a batch-1
    time embedding) by the operands' alignment, so a bit-for-bit comparison with the reference's own freshly
    allocated weights copies them first (the full-size bench's products agree either way)."""
    for m in module.modules():
        for name, p in list(m.named_parameters(recurse=False)):
            setattr(m, name, torch.nn.Parameter(p.clone(), requires_grad=False))
    return module


def fake_snapshot_download(monkeypatch, folder: Path, snapshot: Path) -> list:
    """huggingface_hub.snapshot_download replaced by a copy of the files of `folder` that match allow_patterns
    into `snapshot` (whose name is the revision's hash); returns the list its calls are appended to."""
    calls = []

    def snapshot_download(repo_id, allow_patterns=None, revision=None, local_dir=None, **kw):
        calls.append((repo_id, list(allow_patterns), revision))
        for p in folder.rglob("*"):
            rel = p.relative_to(folder).as_posix()
            if p.is_file() and any(fnmatch.fnmatch(rel, pat) for pat in allow_patterns):
                (snapshot / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(p, snapshot / rel)
        return str(snapshot)
    monkeypatch.setattr("huggingface_hub.snapshot_download", snapshot_download)
    return calls


def photo(seed=0, size=(80, 64)):
    """A random RGB picture (W x H = size), the same for a seed."""
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy())


@contextlib.contextmanager
def batch_dependent(*text_encoders):
    """Within: every token embedding of these text encoders (ours and the reference's alike) moved by its batch size
    x 1e-2 x a ramp over the channels (not a constant: the layer norms would take that away), so that a prompt's
    embedding depends on the batch it is computed in - as on CUDA, where cuBLAS picks its kernels by shape (SD 1.5's
    CLIP: 7.6e-6 apart on an H100), not on CPU. Paths that embed their prompts in the same groups still agree."""
    embeddings = [m for te in text_encoders for name, m in te.named_modules() if name.endswith("token_embedding")]
    assert len(embeddings) == len(text_encoders), "one token embedding per text encoder"

    def move(module, args, out):
        return out + 1e-2 * len(out) * torch.linspace(-1, 1, out.shape[-1], device=out.device, dtype=out.dtype)
    hooks = [m.register_forward_hook(move) for m in embeddings]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def run_both(ref, sd, inv, target_prompt, concepts, s_tar=7.5, forced=False):
    """(ours, theirs, pipe, trace): our edit and SemanticStableDiffusionPipeline's on the same inversion.

    forced=True starts every step of the pipeline from our x_t (teacher forcing, see oracle.InjectedDDIM);
    then theirs [S, 1, 4, h, w] holds the pipeline's own result of each step, to compare with ours step by
    step. SEGA needs this for a strict comparison: its quantile mask is discontinuous, and float32 rounding
    of a different operation order (~1e-7) can swap two |g| values that straddle a quantile; the two free
    runs then drift apart by ~0.05 (seen on 3 of 24 small edits), though every step computes the same."""
    trace = []
    ours = minledits.edit(sd, inv, target_prompt=target_prompt, target_guidance=s_tar, concepts=concepts,
                          momentum_scale=0.3, momentum_beta=0.6, callback=trace.append)
    steps, skip = inv.settings.steps, inv.settings.skip
    # the oracle indexes from k = 0: pad the skipped steps
    xts = torch.cat([torch.zeros(skip, *inv.xts.shape[1:], dtype=inv.xts.dtype), inv.xts])
    force = [st.x_prev for st in trace] if forced else None
    theirs, pipe = oracle.edit(ref, xts, inv.zs, steps, skip, target_prompt, s_tar, concepts, 0.3, 0.6, force)
    return ours, torch.stack(pipe.scheduler.own) if forced else theirs, pipe, trace


# --------------------------------------------------------------------------------------------- import graph
PACKAGE = Path(minledits.__file__).parent


def module_name(path: Path) -> str:
    """minledits/nets/layers.py -> "nets.layers"; minledits/cli/__init__.py -> "cli"."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


FILES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if p != PACKAGE / "__init__.py"}
MODULES = sorted(FILES)


def package_imports(tree: ast.AST, module: str) -> list[tuple[str, ast.AST]]:
    """(module, node) for every import of a minledits module anywhere in `tree`, the tree of `module`."""
    here = module.split(".")[:-1] if FILES[module].name != "__init__.py" else module.split(".")
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("minledits")):
            if node.level:
                base = here[:len(here) - (node.level - 1)] + (node.module.split(".") if node.module else [])
            else:
                base = node.module.split(".")[1:]
            for a in node.names:
                name = ".".join(base + [a.name])
                found = name if name in FILES else ".".join(base) if ".".join(base) in FILES else None
                if found:
                    out.append((found, node))
        elif isinstance(node, ast.Import):
            out += [(a.name.removeprefix("minledits."), node) for a in node.names if a.name.startswith("minledits.")]
    return out


def graph() -> dict[str, set[str]]:
    """{module: the package modules it imports}."""
    return {m: {name for name, _ in package_imports(ast.parse(FILES[m].read_text()), m)} - {m} for m in MODULES}


# --------------------------------------------------------------------------------------------- the command line
def run(capsys, *argv):
    """(exit code, stdout, stderr) of `minledits argv...` run in-process."""
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def console_script() -> str | None:
    """The installed `minledits` command (None where the package is not installed)."""
    found = Path(sys.executable).parent / "minledits"
    return str(found) if found.exists() else shutil.which("minledits")


def watch_fp32_reads(monkeypatch, fp16: bool = False) -> list:
    """io.load's _read wrapped: each fp32 tensor read is recorded (key, weak reference); reading one while a tensor
    read before the last is still alive fails (fill holds the last one while reading the next): no fp32 copy of a model
    loaded in half precision. fp16: T5's wo, kept in fp32 under fp16 on purpose, is let through."""
    read, alive = load_module._read, []

    def watched(f, key, squeeze=False):
        kept = [k for k, r in alive[:-1] if r() is not None and not (fp16 and k.endswith(".wo.weight"))]
        assert not kept, kept
        tensor = read(f, key, squeeze)
        if tensor.dtype == torch.float32:
            alive.append((key, weakref.ref(tensor)))
        return tensor

    monkeypatch.setattr(load_module, "_read", watched)
    return alive

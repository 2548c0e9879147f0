"""Load Stable Diffusion from a diffusers-layout folder, a Hub repo id, or one original-format file.

    sd = load("stable-diffusion-v1-5/stable-diffusion-v1-5", device="cuda", dtype=torch.float16)

Where `model` is looked for, in order ("random-tiny" builds a tiny random model instead, see tiny.py):
  1. an existing path: a diffusers-layout folder, or a single `.safetensors` file (see convert.py);
  2. `weights/<model>`, then `weights/<last part of model>` (e.g. weights/stable-diffusion-v1-5), where
     weights/ is relative to the working directory, or $MINLEDITS_WEIGHTS when set;
  3. a Hub repo id: only the files needed are fetched into the Hugging Face cache (snapshot_download).
A folder holds model_index.json, unet/, vae/, text_encoder/, scheduler/ and usually tokenizer/. Without
tokenizer/ the CLIP vocabulary shipped in the package is used, padded as SD2 when the text encoder is
OpenCLIP-like (gelu, or 1024 wide), else as SD1.

Each network is built on the `meta` device (no memory, no random init) from its config.json and then
filled tensor by tensor from safetensors (`fill`), cast to `dtype` on the way, so loading needs about one
copy of the weights. Pickle checkpoints (.bin, .ckpt) are refused: unpickling can run arbitrary code.
Tensors needing no cast or move stay backed by safetensors' copy-on-write memory map of the file: loading
is quick and pages are read on first use; so replace weight files atomically (write, then rename), never
overwrite one in place while a model loaded from it is in use.

`StableDiffusion.fingerprint` identifies the weights, for files that must be used with the same model:
  * Hub: the commit sha of the snapshot;
  * local folder or file: "sha256-" + 16 hex digits over the config files and, per weight file loaded,
    its name, size and three 1 MiB samples (start, middle, end) - cheap, unchanged by copying the
    folder, but different for a fine-tune of the same architecture (a single file adds its prediction type).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from functools import partial
from pathlib import Path
from typing import Callable, Mapping

import torch
from safetensors import safe_open

from .clip import TextEncoder
from .convert import read_single_file
from .errors import LoadError
from .files import PICKLES, refuse_pickle
from .model import StableDiffusion, dtype_of
from .schedule import Schedule
from .tiny import random_tiny
from .tokenizer import SD1_PAD_ID, SD2_PAD_ID, Tokenizer
from .unet import UNet
from .vae import VAE

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
NETWORKS = ("unet", "vae", "text_encoder")
WEIGHT_STEM = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}
CONFIGS = ["model_index.json", "scheduler/scheduler_config.json", *(f"{n}/config.json" for n in NETWORKS)]
TOKENIZER_FILES = ["vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"]

# The only alternative key names accepted in a folder (docs/design.md §6). component: [(stored key regex, ours)].
# Applied in order; None drops the key.
RENAMES = {
    "vae": [  # diffusers < 0.14 named the VAE mid-block attention query/key/value/proj_attn (and some
              # files store them as 1x1 conv kernels [C, C, 1, 1]: squeezed to [C, C] when read)
        (r"\.query\.", ".to_q."), (r"\.key\.", ".to_k."), (r"\.value\.", ".to_v."), (r"\.proj_attn\.", ".to_out.0.")],
    "text_encoder": [
        (r"^(?!text_model\.)", "text_model."),           # transformers 5.x writes CLIP keys without the prefix
        (r"^text_model\.embeddings\.position_ids$", None)],  # a stored arange(77); ours is implicit
}


# --------------------------------------------------------------------------------------------- filling
def fill(module: torch.nn.Module, getters: Mapping[str, Callable[[], torch.Tensor]], source: str,
         dtype: torch.dtype | None = None, device=None) -> torch.nn.Module:
    """Load a meta-built `module` strictly, one tensor at a time: getters[key]() reads the tensor for our
    state-dict `key`; floating tensors are cast to `dtype` (None: the dtype the module was built with) and
    moved to `device`. Missing, unexpected or wrong-shape keys raise one LoadError naming `source`."""
    expected = module.state_dict()          # on meta: names, shapes and dtypes only
    missing, unexpected = sorted(expected.keys() - getters.keys()), sorted(getters.keys() - expected.keys())
    state, wrong = {}, []
    for key in sorted(expected.keys() & getters.keys()):
        tensor, want = getters[key](), expected[key]
        if tensor.shape != want.shape:
            wrong.append(f"{key} {list(tensor.shape)} in file, {list(want.shape)} in model")
        elif not (missing or unexpected or wrong):    # after a problem, only the shapes are still checked
            cast = (dtype or want.dtype) if tensor.is_floating_point() else tensor.dtype
            state[key] = tensor.to(device=device, dtype=cast)
    if missing or unexpected or wrong:
        raise LoadError(f"{source} does not fit {type(module).__name__}: " + "; ".join(
            f"{len(keys)} {what} ({_few(keys)})" for what, keys in
            [("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)] if keys))
    module.load_state_dict(state, strict=True, assign=True)
    if left := [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]:
        raise LoadError(f"{source}: {type(module).__name__} has tensors no file fills ({_few(left)})")
    return module.eval().requires_grad_(False)


def _few(items: list, n: int = 4) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def rename(component: str, stored: str) -> str | None:
    """Our key for a key stored in `component`'s file (RENAMES); None for a key that is ignored."""
    key = stored
    for pattern, ours in RENAMES.get(component, []):
        if re.search(pattern, key):
            if ours is None:
                return None
            key = re.sub(pattern, ours, key)
    return key


def safetensors_getters(f, component: str) -> dict[str, Callable[[], torch.Tensor]]:
    """{our key: reader} for an open safe_open file of `component`."""
    getters = {}
    for stored in f.keys():
        if (key := rename(component, stored)) is not None:
            getters[key] = partial(_read, f, stored, squeeze=component == "vae" and key != stored)
    return getters


def _read(f, key: str, squeeze: bool = False) -> torch.Tensor:
    tensor = f.get_tensor(key)
    return tensor.flatten(1) if squeeze and tensor.ndim == 4 else tensor   # legacy 1x1 conv -> linear


class SkipInit(torch.overrides.TorchFunctionMode):
    """Skip torch.nn.init on meta tensors: they hold no values to initialise, and the first meta normal_
    (nn.Embedding's) imports torch._dynamo, 1.5-4 s of a first load. fill() fills every tensor and checks it."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        tensor = args[0] if args else (kwargs or {}).get("tensor")
        if getattr(func, "__module__", None) == "torch.nn.init" and getattr(tensor, "is_meta", False):
            return tensor
        return func(*args, **(kwargs or {}))


def build(component: str, config: dict, source: str) -> torch.nn.Module:
    """Our network for `component`, built from its config on the meta device (instant, no memory)."""
    cls = {"unet": UNet, "vae": VAE, "text_encoder": TextEncoder}[component]
    try:
        with torch.device("meta"), SkipInit():
            return cls(config)
    except (KeyError, ValueError, TypeError) as e:
        raise LoadError(f"{source}: cannot build {cls.__name__} from it ({type(e).__name__}: {e})") from None


def load_file(module: torch.nn.Module, path: Path, component: str, dtype=None, device=None) -> torch.nn.Module:
    """fill() `module` from one safetensors file of `component`."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return fill(module, safetensors_getters(f, component), str(path), dtype, device)
    except LoadError:
        raise
    except Exception as e:  # SafetensorError, OSError: a truncated download, a file that is not safetensors
        raise LoadError(f"{path} is not a readable safetensors file, maybe a truncated download "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


# --------------------------------------------------------------------------------------------- a folder
def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LoadError(f"{path.parent.parent} has no {path.parent.name}/{path.name}: a diffusers-layout model "
                        "folder holds unet/, vae/, text_encoder/, scheduler/ (and tokenizer/)") from None
    except (ValueError, OSError) as e:
        raise LoadError(f"{path} is not a readable JSON file ({e})") from None


def weight_file(folder: Path, component: str, variant: str | None = None) -> Path:
    """`<stem>.<variant>.safetensors` if asked for and present, else `<stem>.safetensors`, else any other
    `<stem>.*.safetensors` variant (cast on loading). Pickle files are refused."""
    stem, d = WEIGHT_STEM[component], folder / component
    names = ([f"{stem}.{variant}.safetensors"] if variant else []) + [f"{stem}.safetensors"]
    for path in [d / n for n in names] + sorted(d.glob(f"{stem}.*.safetensors")):
        if path.is_file():
            return path
    for pickle in sorted(p for p in d.glob("*") if p.suffix in PICKLES):
        refuse_pickle(pickle)
    raise LoadError(f"{d} has no {names[-1]} (found: {', '.join(p.name for p in d.glob('*')) or 'nothing'})")


def load_networks(folder: Path, variant=None, dtype=None, device=None) -> tuple[dict, list[Path]]:
    """{component: filled module} for the three networks of a folder, and the files read."""
    if absent := [f"{c}/" for c in (*NETWORKS, "scheduler") if not (folder / c).is_dir()]:
        raise LoadError(f"{folder} has no {', '.join(absent)}: a diffusers-layout model folder holds unet/, vae/, "
                        "text_encoder/, scheduler/ (and tokenizer/)")
    nets, files = {}, []
    for component in NETWORKS:
        config_path = folder / component / "config.json"
        module = build(component, read_json(config_path), str(config_path))
        path = weight_file(folder, component, variant)
        nets[component] = load_file(module, path, component, dtype, device)
        files += [config_path, path]
    return nets, files


def folder_tokenizer(folder: Path, text_config: dict) -> Tokenizer:
    """tokenizer/ when present, else the shipped vocabulary (SD2 padding for an OpenCLIP-like encoder)."""
    if (folder / "tokenizer" / "vocab.json").is_file():
        try:
            return Tokenizer.from_folder(folder / "tokenizer")
        except Exception as e:  # a malformed vocab.json / merges.txt
            raise LoadError(f"{folder / 'tokenizer'} cannot be read ({type(e).__name__}: {e})") from None
    sd2 = text_config.get("hidden_act") == "gelu" or text_config.get("hidden_size") == 1024
    return Tokenizer.builtin(SD2_PAD_ID if sd2 else SD1_PAD_ID)


def make_schedule(config: dict, source: str, prediction_type: str | None = None) -> Schedule:
    """The Schedule of a scheduler config; `prediction_type` overrides the config's."""
    config = dict(config, prediction_type=prediction_type or config.get("prediction_type", "epsilon"))
    if config["prediction_type"] not in ("epsilon", "v_prediction"):
        raise LoadError(f"{source}: prediction_type {config['prediction_type']!r} is not supported "
                        "(epsilon or v_prediction)")
    try:
        return Schedule(config)
    except ValueError as e:
        raise LoadError(f"{source}: {e}") from None


def content_hash(paths: list[Path], extra: str = "") -> str:
    """"sha256-" + 16 hex over each file's folder/name, size and three 1 MiB samples (start, middle, end)."""
    h, mib = hashlib.sha256(extra.encode()), 1 << 20
    for p in paths:
        size = p.stat().st_size
        h.update(f"\0{p.parent.name}/{p.name}\0{size}\0".encode())
        with open(p, "rb") as f:
            for start in sorted({0, max(size // 2 - mib // 2, 0), max(size - mib, 0)}):
                f.seek(start)
                h.update(f.read(mib))
    return "sha256-" + h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------- where
def weights_dir() -> Path:
    return Path(os.environ.get("MINLEDITS_WEIGHTS", "weights"))


def locate(model: str, variant: str | None = None, revision: str | None = None) -> tuple[Path, str | None]:
    """(local folder or file, Hub commit sha or None), searched as the module docstring says."""
    if (path := Path(model).expanduser()).exists():
        return path, None
    for candidate in (weights_dir() / model, weights_dir() / model.rstrip("/").rsplit("/", 1)[-1]):
        if candidate.exists():
            return candidate, None
    if model.startswith((".", "/", "~")) or model.count("/") > 1 or "\\" in model or \
            model.endswith(("safetensors", *PICKLES)):
        raise LoadError(f"{model} does not exist (no such folder or file)")
    folder = download(model, variant, revision)
    return folder, folder.name


def download(repo_id: str, variant: str | None = None, revision: str | None = None, local_dir=None) -> Path:
    """Fetch only the files `load` reads (configs, tokenizer, one weight file per network) into the HF cache,
    or into `local_dir`; the `variant` weights (e.g. "fp16") when the repo has them. Returns the folder."""
    from huggingface_hub import snapshot_download
    files = CONFIGS + [f"tokenizer/{n}" for n in TOKENIZER_FILES]
    weights = [f"{c}/{WEIGHT_STEM[c]}{'.' + variant if variant else ''}.safetensors" for c in NETWORKS]
    fetch = partial(_hub, snapshot_download, repo_id, revision=revision, local_dir=local_dir)
    folder = Path(fetch(allow_patterns=files + weights))
    if variant and (absent := [w for w in weights if not (folder / w).is_file()]):
        folder = Path(fetch(allow_patterns=[w.replace(f".{variant}.", ".") for w in absent]))
    return folder


def _hub(fn, repo_id: str, **kwargs):
    """Call a huggingface_hub function; its errors become one-line LoadErrors that say what to do."""
    from huggingface_hub import constants
    from huggingface_hub.utils import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    name = repo_id.rstrip("/").rsplit("/", 1)[-1]
    try:
        return fn(repo_id, **kwargs)
    except GatedRepoError:
        msg = (f"{repo_id} is a gated Hub repo: accept its terms on https://huggingface.co/{repo_id}, then log in "
               "(`hf auth login`, formerly `huggingface-cli login`) or set HF_TOKEN")
    except RepositoryNotFoundError:
        msg = (f"{repo_id} is not a local folder, not in {weights_dir() / name}, and not a Hub repo: check the "
               "name (a private repo also needs HF_TOKEN or `hf auth login`)")
    except RevisionNotFoundError:
        msg = f"{repo_id} has no revision {kwargs.get('revision')!r} on the Hub: check the branch, tag or commit"
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hub cannot be reached"
        msg = (f"{repo_id} is not in the Hugging Face cache and {why}: go online and run "
               f"`minledits download --model {repo_id}`, or put the model folder in {weights_dir() / name}")
    except HFValidationError:
        msg = f"{repo_id!r} is neither an existing folder or file nor a valid Hub repo id (owner/name)"
    except (HfHubHTTPError, OSError) as e:
        msg = f"downloading {repo_id} failed ({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e) else ''})"
    raise LoadError(msg)


# --------------------------------------------------------------------------------------------- load
def load(model: str | os.PathLike = DEFAULT_MODEL, device=None, *, dtype=None, variant: str | None = None,
         revision: str | None = None, prediction_type: str | None = None) -> StableDiffusion:
    """Stable Diffusion from a folder, a Hub repo id or a single .safetensors file (module docstring).

    device: default "cpu".  dtype: torch dtype or "fp32"/"fp16"/"bf16", default float32.
    variant: weight files `<name>.<variant>.safetensors` to prefer; "fp16" is implied by dtype float16.
    revision: Hub branch, tag or commit.  prediction_type: override (required for SD 2.x single files).
    """
    device, dtype = torch.device(device or "cpu"), dtype_of(dtype)
    if os.fspath(model) == "random-tiny":  # an offline smoke-test model with random weights (tiny.py)
        return random_tiny(device, dtype)
    variant = variant or ("fp16" if dtype == torch.float16 else None)
    path, sha = locate(os.fspath(model), variant, revision)
    if path.is_file():
        return _single_file(path, os.fspath(model), device, dtype, prediction_type)
    nets, files = load_networks(path, variant, dtype, device)
    text_config = read_json(path / "text_encoder" / "config.json")
    schedule = make_schedule(read_json(path / "scheduler" / "scheduler_config.json"), str(path / "scheduler"),
                             prediction_type)
    tokenizer = folder_tokenizer(path, text_config)
    files += [path / "scheduler" / "scheduler_config.json"] + \
        [p for n in TOKENIZER_FILES if (p := path / "tokenizer" / n).is_file()]
    return StableDiffusion(tokenizer, nets["text_encoder"], nets["unet"], nets["vae"], schedule, os.fspath(model),
                           sha or content_hash(files), device, dtype)


def _single_file(path: Path, model_id: str, device, dtype, prediction_type) -> StableDiffusion:
    """An original-format checkpoint: convert.read_single_file gives configs and getters (key renaming)."""
    refuse_pickle(path)
    parts = read_single_file(path, prediction_type)
    nets = {c: fill(build(c, parts[c][0], f"{path} [{c}]"), parts[c][1], f"{path} [{c}]", dtype, device)
            for c in NETWORKS}
    schedule = make_schedule(parts["scheduler"], str(path))
    return StableDiffusion(Tokenizer.builtin(parts["pad_id"]), nets["text_encoder"], nets["unet"], nets["vae"],
                           schedule, model_id, content_hash([path], schedule.prediction_type), device, dtype)

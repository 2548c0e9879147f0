"""Load Stable Diffusion from a diffusers-layout folder, a Hub repo id, or one original-format file.

    sd = load("stable-diffusion-v1-5/stable-diffusion-v1-5", device="cuda", dtype=torch.float16)

Where `model` is looked for, in order ("random-tiny" builds a tiny random model instead, see tiny.py):
  1. an existing path: a diffusers-layout folder, or a single `.safetensors` file (see convert.py);
  2. `weights/<model>`, then `weights/<last part of model>` (e.g. weights/stable-diffusion-v1-5), where
     weights/ is relative to the working directory, or $MINLEDITS_WEIGHTS when set;
  3. a Hub repo id: only the files needed are fetched into the Hugging Face cache (snapshot_download).
A folder holds model_index.json, unet/, vae/, text_encoder/, scheduler/ and usually tokenizer/. Without
tokenizer/ the CLIP vocabulary shipped in the package is used, padded as SD2 when the text encoder is
OpenCLIP-like (gelu, or 1024 wide), else as SD1. An SDXL folder (model_index.json names a text_encoder_2, or
the folder has one) also holds text_encoder_2/ and tokenizer_2/, and gives a StableDiffusionXL; its VAE stays in
fp32 when loaded in fp16 unless its config says force_upcast false (SDXL's VAE overflows in fp16), as diffusers'
SDXL pipelines do. `vae=` swaps in another VAE: a folder with config.json and the weights, or a model folder's vae/.
An SD3 / SD3.5 folder (model_index.json's _class_name StableDiffusion3Pipeline) holds transformer/, vae/,
text_encoder/ and text_encoder_2/ (both CLIPs projected), text_encoder_3/ (T5), tokenizer/ .. tokenizer_3/ and
scheduler/, and gives a StableDiffusion3; `t5=False` leaves text_encoder_3/ and tokenizer_3/ unread (and not
downloaded): SD3's zeros stand for T5's tokens. Its VAE runs in the model's dtype, as StableDiffusion3Pipeline's.
A FLUX.1 folder (model_index.json's _class_name FluxPipeline, as black-forest-labs/FLUX.1-dev and FLUX.1-schnell)
holds transformer/, vae/, text_encoder/ (CLIP-L, its pooled output), text_encoder_2/ (T5), tokenizer/, tokenizer_2/
and scheduler/, and gives a flux.Flux; T5 is not optional there. FLUX.1-dev is gated on the Hub: accept its licence
there and log in before the first download.
A network's weights are one file or, as the Hub stores the large ones (T5, SD3.5-large's and FLUX.1's transformer),
shards named by `<stem>.safetensors.index[.<variant>].json`. In fp16, T5's feed-forward output weights (wo) stay
in fp32, as transformers keeps them (nets/t5.py).

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
    folder, but different for a fine-tune of the same architecture (a single file adds its prediction type);
  * SD3 loaded with t5=False: either, with "-no-t5" appended (without T5 the same weights are another model).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from functools import partial
from pathlib import Path
from typing import Callable, Mapping

import torch
from safetensors import safe_open

from ..errors import LoadError, shorten
from ..flowmatch import flow_config
from ..flux import T5_TOKENS, Flux, schedule_of
from ..model import StableDiffusion, StableDiffusionXL
from ..nets import t5
from ..nets.clip import TextEncoder, TextEncoderWithProjection
from ..nets.flux import FluxTransformer
from ..nets.mmdit import MMDiT
from ..nets.tokenizer import SD1_PAD_ID, SD2_PAD_ID, Tokenizer
from ..nets.unet import UNet
from ..nets.vae import VAE
from ..schedule import Schedule
from ..sd3 import StableDiffusion3
from .convert import read_single_file
from .files import PICKLES, refuse_pickle
from .tiny import random_tiny

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
NETWORKS = ("unet", "vae", "text_encoder")
XL_NETWORKS = (*NETWORKS, "text_encoder_2")
SD3_NETWORKS = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
WEIGHT_STEM = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model",
               "text_encoder_2": "model", "transformer": "diffusion_pytorch_model", "text_encoder_3": "model"}
ALL_NETWORKS = (*XL_NETWORKS, "transformer", "text_encoder_3")
CONFIGS = ["model_index.json", "scheduler/scheduler_config.json", *(f"{n}/config.json" for n in ALL_NETWORKS)]
TOKENIZER_FILES = ["vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"]
TOKENIZERS = ("tokenizer", "tokenizer_2")
T5_TOKENIZER_FILES = ["tokenizer_3/tokenizer.json", "tokenizer_3/special_tokens_map.json",
                      "tokenizer_3/tokenizer_config.json"]
SD3_PIPELINE = "StableDiffusion3Pipeline"
FLUX_PIPELINE, FLUX_TRANSFORMER = "FluxPipeline", "FluxTransformer2DModel"
FLUX_NETWORKS = ("transformer", "vae", "text_encoder", "text_encoder_2")   # text_encoder_2: T5
FLUX_T5_TOKENIZER = "tokenizer_2/tokenizer.json"

# The only alternative key names accepted in a folder (docs/design.md §6). component: [(stored key regex, ours)].
# Applied in order; None drops the key.
RENAMES = {
    "vae": [  # diffusers < 0.14 named the VAE mid-block attention query/key/value/proj_attn (and some
              # files store them as 1x1 conv kernels [C, C, 1, 1]: squeezed to [C, C] when read)
        (r"\.query\.", ".to_q."), (r"\.key\.", ".to_k."), (r"\.value\.", ".to_v."), (r"\.proj_attn\.", ".to_out.0.")],
    "text_encoder": [                                     # (SD3's CLIP-L also has a text_projection)
        (r"^(?!text_model\.|text_projection\.)", "text_model."),  # transformers 5.x writes CLIP keys without the prefix
        (r"^text_model\.embeddings\.position_ids$", None)],  # a stored arange(77); ours is implicit
    "text_encoder_2": [                                       # the same, beside SDXL's text_projection
        (r"^(?!text_model\.|text_projection\.)", "text_model."), (r"^text_model\.embeddings\.position_ids$", None)],
}


# --------------------------------------------------------------------------------------------- dtypes
# The dtypes a model runs in, by the names the CLI and load() take (load also accepts float32/float16/bfloat16).
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ALIASES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def dtype_of(dtype) -> torch.dtype:
    """A torch dtype from a torch dtype, None (float32) or one of the names of DTYPES / ALIASES."""
    if dtype is None or isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype or torch.float32
    if isinstance(dtype, str) and (name := ALIASES.get(dtype.lower(), dtype.lower())) in DTYPES:
        return DTYPES[name]
    raise LoadError(f"dtype {dtype!r} is not one of {', '.join([*DTYPES, *ALIASES])}")


def dtype_name(dtype: torch.dtype) -> str:
    """fp32 / fp16 / bf16."""
    return {v: k for k, v in DTYPES.items()}[dtype]


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
    (nn.Embedding's) imports torch._dynamo, seconds of a first load. fill() fills every tensor and checks it."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        tensor = args[0] if args else (kwargs or {}).get("tensor")
        if getattr(func, "__module__", None) == "torch.nn.init" and getattr(tensor, "is_meta", False):
            return tensor
        return func(*args, **(kwargs or {}))


CLASSES = {"unet": UNet, "vae": VAE, "text_encoder": TextEncoder, "text_encoder_2": TextEncoderWithProjection}
SD3_CLASSES = {"transformer": MMDiT, "vae": VAE, "text_encoder": TextEncoderWithProjection,
               "text_encoder_2": TextEncoderWithProjection, "text_encoder_3": t5.T5Encoder}
FLUX_CLASSES = {"transformer": FluxTransformer, "vae": VAE, "text_encoder": TextEncoder,
                "text_encoder_2": t5.T5Encoder}


def build(component: str, config: dict, source: str, classes: dict = CLASSES) -> torch.nn.Module:
    """Our network for `component` (classes: CLASSES, SD3_CLASSES or FLUX_CLASSES), built from its config on the
    meta device (instant, no memory)."""
    cls = classes[component]
    try:
        with torch.device("meta"), SkipInit():
            return cls(config)
    except (KeyError, ValueError, TypeError) as e:
        raise LoadError(f"{source}: cannot build {cls.__name__} from it ({type(e).__name__}: {e})") from None


def load_file(module: torch.nn.Module, path: Path | list[Path], component: str, dtype=None,
              device=None) -> torch.nn.Module:
    """fill() `module` from the safetensors file(s) of `component` (several: the shards of one state dict).
    A T5 (SD3's text_encoder_3, FLUX's text_encoder_2) takes its keys as stored, its tied embedding under either name
    (t5.tied_keys)."""
    is_t5 = isinstance(module, t5.T5Encoder)
    paths = path if isinstance(path, list) else [path]
    source = str(paths[0] if len(paths) == 1 else paths[0].parent)
    try:
        with contextlib.ExitStack() as files:
            getters = {}
            for p in paths:
                f = files.enter_context(safe_open(str(p), framework="pt", device="cpu"))
                getters.update(safetensors_getters(f, "t5" if is_t5 else component))
            if is_t5:
                getters = t5.tied_keys(getters)
            return fill(module, getters, source, dtype, device)
    except LoadError:
        raise
    except Exception as e:  # SafetensorError, OSError: a truncated download, a file that is not safetensors
        what = "is not a readable safetensors file" if len(paths) == 1 else "has a shard that is not readable"
        raise LoadError(f"{source} {what}, maybe a truncated download "
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


def weight_file(folder: Path, component: str, variant: str | None = None, stem: str | None = None) -> Path:
    """`<stem>.<variant>.safetensors` if asked for and present, else `<stem>.safetensors`, else any other
    `<stem>.*.safetensors` variant (cast on loading), in folder/component. Pickle files are refused."""
    stem, d = stem or WEIGHT_STEM[component], folder / component
    names = ([f"{stem}.{variant}.safetensors"] if variant else []) + [f"{stem}.safetensors"]
    for path in [d / n for n in names] + sorted(d.glob(f"{stem}.*.safetensors")):
        if path.is_file():
            return path
    for pickle in sorted(p for p in d.glob("*") if p.suffix in PICKLES):
        refuse_pickle(pickle)
    raise LoadError(f"{d} has no {names[-1]} (found: {', '.join(p.name for p in d.glob('*')) or 'nothing'})")


def weight_files(folder: Path, component: str, variant: str | None = None) -> list[Path]:
    """The shards named by `<stem>.safetensors.index[.<variant>].json` in folder/component (the variant's index if
    asked for and present, else the plain one), else [weight_file(...)]."""
    d, stem = folder / component, WEIGHT_STEM[component]
    for index in ([d / f"{stem}.safetensors.index.{variant}.json"] if variant else []) + \
            [d / f"{stem}.safetensors.index.json"]:
        if index.is_file():
            names = read_json(index).get("weight_map")
            if not isinstance(names, dict) or not names:
                raise LoadError(f"{index} has no weight_map: not a safetensors shard index")
            shards = [d / n for n in sorted(set(names.values()))]
            if absent := [p.name for p in shards if not p.is_file()]:
                raise LoadError(f"{d} lacks the shards {index.name} names ({_few(absent)}): an incomplete download")
            return [index, *shards]
    return [weight_file(folder, component, variant)]


def load_networks(folder: Path, variant=None, dtype=None, device=None, networks=NETWORKS,
                  classes: dict = CLASSES) -> tuple[dict, list[Path]]:
    """{component: filled module} for the networks of a folder (require_subfolders), and the files read. dtype and
    device: one, or {component: one}."""
    nets, files = {}, []
    for component in networks:
        config_path = folder / component / "config.json"
        module = build(component, read_json(config_path), str(config_path), classes)
        paths = weight_files(folder, component, variant)
        want = dtype.get(component) if isinstance(dtype, dict) else dtype
        if isinstance(module, t5.T5Encoder) and want == torch.float16:
            module, want = keep_wo_fp32(module), None     # fill casts each tensor to the dtype it has on meta
        nets[component] = load_file(module, [p for p in paths if p.suffix != ".json"], component, want,
                                    device.get(component) if isinstance(device, dict) else device)
        files += [config_path, *paths]
    return nets, files


def keep_wo_fp32(module: torch.nn.Module) -> torch.nn.Module:
    """A meta-built T5 in fp16 but its feed-forward output weights wo, in fp32 (as transformers loads it)."""
    module.half()
    for name, sub in module.named_modules():
        if name.endswith(".wo"):
            sub.float()
    return module


def is_flux(folder: Path) -> bool:
    """model_index.json names FluxPipeline (or, without model_index.json, transformer/config.json names
    FluxTransformer2DModel)."""
    if (index := folder / "model_index.json").is_file():
        return read_json(index).get("_class_name") == FLUX_PIPELINE
    config = folder / "transformer" / "config.json"
    return config.is_file() and read_json(config).get("_class_name") == FLUX_TRANSFORMER


def is_sd3(folder: Path) -> bool:
    """model_index.json names StableDiffusion3Pipeline (or, without model_index.json, the folder has transformer/
    and text_encoder_2/)."""
    if (index := folder / "model_index.json").is_file():
        return read_json(index).get("_class_name") == SD3_PIPELINE
    return (folder / "transformer").is_dir() and (folder / "text_encoder_2").is_dir()


def is_xl(folder: Path) -> bool:
    """SDXL: model_index.json names a text_encoder_2 (or, without model_index.json, the folder has one)."""
    if (index := folder / "model_index.json").is_file():
        return bool((read_json(index).get("text_encoder_2") or [None])[0])
    return (folder / "text_encoder_2").is_dir()


def folder_tokenizer(folder: Path, text_config: dict, name: str = "tokenizer") -> Tokenizer:
    """<name>/ when present, else the shipped vocabulary (SD2 padding for an OpenCLIP-like encoder)."""
    if (folder / name / "vocab.json").is_file():
        try:
            return Tokenizer.from_folder(folder / name)
        except Exception as e:  # a malformed vocab.json / merges.txt
            raise LoadError(f"{folder / name} cannot be read ({type(e).__name__}: {e})") from None
    sd2 = text_config.get("hidden_act") == "gelu" or text_config.get("hidden_size") == 1024
    return Tokenizer.builtin(SD2_PAD_ID if sd2 else SD1_PAD_ID)


def make_schedule(config: dict, source: str, prediction_type: str | None = None) -> Schedule:
    """The Schedule of a scheduler config; `prediction_type` overrides the config's."""
    config = dict(config, prediction_type=prediction_type or config.get("prediction_type", "epsilon"))
    if config["prediction_type"] not in ("epsilon", "v_prediction"):
        raise LoadError(f"{source}: prediction_type {shorten(config['prediction_type'])} is not supported "
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


def locate(model: str, variant: str | None = None, revision: str | None = None,
           t5: bool = True) -> tuple[Path, str | None]:
    """(local folder or file, Hub commit sha or None), searched as the module docstring says."""
    if (path := Path(model).expanduser()).exists():
        return path, None
    for candidate in (weights_dir() / model, weights_dir() / model.rstrip("/").rsplit("/", 1)[-1]):
        if candidate.exists():
            return candidate, None
    if model.startswith((".", "/", "~")) or model.count("/") > 1 or "\\" in model or \
            model.endswith(("safetensors", *PICKLES)):
        raise LoadError(f"{model} does not exist (no such folder or file)")
    folder = download(model, variant, revision, t5=t5)
    return folder, folder.name


def download(repo_id: str, variant: str | None = None, revision: str | None = None, local_dir=None,
             t5: bool = True, command: bool = False) -> Path:
    """Fetch only the files `load` reads (configs, tokenizers, each network's weight file or shards) into the HF
    cache, or into `local_dir`; the `variant` weights (e.g. "fp16") when the repo has them. t5=False leaves out
    text_encoder_3/ and tokenizer_3/ (SD3's T5; FLUX's, text_encoder_2/, is always fetched). Returns the folder.
    command: `minledits download` itself calls (an offline failure then says to run it again online)."""
    from huggingface_hub import snapshot_download
    networks = [c for c in ALL_NETWORKS if t5 or c != "text_encoder_3"]
    files = [f for f in CONFIGS if t5 or not f.startswith("text_encoder_3/")] + \
        [f"{t}/{n}" for t in TOKENIZERS for n in TOKENIZER_FILES] + (T5_TOKENIZER_FILES if t5 else []) + \
        [FLUX_T5_TOKENIZER]
    weights = [w for c in networks for w in weight_patterns(c, variant)]
    plain_indexes = [weight_patterns(c, None)[1] for c in networks] if variant else []  # to know the fallback
    fetch = partial(_hub, snapshot_download, repo_id, command, revision=revision, local_dir=local_dir)
    folder = Path(fetch(allow_patterns=files + weights + plain_indexes))
    absent = [c for c in networks if variant and (folder / c / "config.json").is_file()   # networks the repo has
              and not any((folder / w).is_file() for w in weight_patterns(c, variant)[:2])]
    if absent:      # no variant files: the plain ones (the shards where the repo stores them so)
        folder = Path(fetch(allow_patterns=[weight_patterns(c, None)[2 if (folder / weight_patterns(c, None)[1])
                                                                     .is_file() else 0] for c in absent]))
    return folder


def weight_patterns(component: str, variant: str | None) -> list[str]:
    """[single file, shard index, shards] of a network as the Hub names them (Hub paths; the last a glob)."""
    stem, v = f"{component}/{WEIGHT_STEM[component]}", f".{variant}" if variant else ""
    return [f"{stem}{v}.safetensors", f"{stem}.safetensors.index{v}.json", f"{stem}{v}-*-of-*.safetensors"]


def _hub(fn, repo_id: str, command: bool = False, **kwargs):
    """Call a huggingface_hub function; its errors become one-line LoadErrors that say what to do (command: for
    `minledits download` itself)."""
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
        msg = f"{repo_id} has no revision {shorten(kwargs.get('revision'))} on the Hub: check the branch, tag or commit"
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hub cannot be reached"
        online = "unset HF_HUB_OFFLINE" if constants.HF_HUB_OFFLINE else "go online"
        then = f"{online} and run this again" if command else \
            f"{online} and run `minledits download --model {repo_id}`"
        msg = (f"{repo_id} is not in the Hugging Face cache and {why}: {then}, or put the model folder in "
               f"{weights_dir() / name}")
    except HFValidationError:
        msg = f"{repo_id!r} is neither an existing folder or file nor a valid Hub repo id (owner/name)"
    except (HfHubHTTPError, OSError) as e:
        msg = f"downloading {repo_id} failed ({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e) else ''})"
    raise LoadError(msg)


# --------------------------------------------------------------------------------------------- load
def load(model: str | os.PathLike = DEFAULT_MODEL, device=None, *, dtype=None, variant: str | None = None,
         revision: str | None = None, prediction_type: str | None = None,
         vae: str | os.PathLike | None = None, t5: bool = True,
         offload_text: bool = False) -> StableDiffusion | StableDiffusion3 | Flux:
    """Stable Diffusion (1.x, 2.x, XL or 3) or FLUX.1 from a folder, a Hub repo id or a single .safetensors file
    (module docstring).

    device: default "cpu".  dtype: torch dtype or "fp32"/"fp16"/"bf16", default float32.
    variant: weight files `<name>.<variant>.safetensors` to prefer; "fp16" is implied by dtype float16.
    revision: Hub branch, tag or commit.  prediction_type: override (required for SD 2.x single files).
    vae: another VAE (a folder with config.json and its weights, or a model folder with vae/) instead of the model's.
    t5: SD3 only: False runs without the T5 encoder (neither read nor downloaded; its tokens are zeros).
    offload_text: SD3 and FLUX.1 only: the text encoders are read to the CPU and kept there (offload_text), so
    the device never holds them beside the transformer, not even while loading.
    """
    device, dtype = torch.device(device or "cpu"), dtype_of(dtype)
    if os.fspath(model) == "random-tiny":  # an offline smoke-test model with random weights (tiny.py)
        return random_tiny(device, dtype)
    variant = variant or ("fp16" if dtype == torch.float16 else None)
    vae_folder = vae_location(vae) if vae is not None else None   # a bad --vae fails before any loading
    path, sha = locate(os.fspath(model), variant, revision, t5)
    if path.is_dir() and is_flux(path):
        sd = _flux_folder(path, os.fspath(model), sha, variant, dtype, device, t5, offload_text)
    elif path.is_dir() and is_sd3(path):
        sd = _sd3_folder(path, os.fspath(model), sha, variant, dtype, device, t5, offload_text)
    elif path.is_dir():
        sd = _folder(path, os.fspath(model), sha, variant, dtype, device, prediction_type)
    else:  # a file: a named pipe or device is refused before anything opens it
        sd = _single_file(path, os.fspath(model), device, dtype, prediction_type)
    return swap_vae(sd, vae_folder, variant) if vae_folder else sd


def _folder(path: Path, model_id: str, sha, variant, dtype, device, prediction_type) -> StableDiffusion:
    xl = is_xl(path)
    networks = require_subfolders(path, XL_NETWORKS if xl else NETWORKS)
    vae_dtype = upcast_vae_dtype(read_json(path / "vae" / "config.json"), dtype, xl)
    nets, files = load_networks(path, variant, {**{c: dtype for c in networks}, "vae": vae_dtype}, device, networks)
    schedule = make_schedule(read_json(path / "scheduler" / "scheduler_config.json"), str(path / "scheduler"),
                             prediction_type)
    tokenizers = [folder_tokenizer(path, read_json(path / t.replace("tokenizer", "text_encoder") / "config.json"), t)
                  for t in TOKENIZERS[:2 if xl else 1]]
    files += [path / "scheduler" / "scheduler_config.json"] + \
        [p for t in TOKENIZERS for n in TOKENIZER_FILES if (p := path / t / n).is_file()]
    if xl:
        files.append(path / "model_index.json")
    common = (nets["unet"], nets["vae"], schedule, model_id, sha or content_hash(files), device, dtype)
    if not xl:
        return StableDiffusion(tokenizers[0], nets["text_encoder"], *common)
    index = read_json(path / "model_index.json") if (path / "model_index.json").is_file() else {}
    return StableDiffusionXL(tokenizers[0], nets["text_encoder"], *common, tokenizers[1], nets["text_encoder_2"],
                             bool(index.get("force_zeros_for_empty_prompt", True)))


def _sd3_folder(path: Path, model_id: str, sha, variant, dtype, device, t5_asked: bool,
                offload_text: bool) -> StableDiffusion3:
    """SD3 / SD3.5 from a diffusers-layout folder (module docstring)."""
    index = read_json(path / "model_index.json") if (path / "model_index.json").is_file() else {}
    has_t5 = (path / "text_encoder_3").is_dir() and (index.get("text_encoder_3") or ["?"])[0] is not None
    if t5_asked and not has_t5:
        raise LoadError(f"{path} has no text_encoder_3/ (T5): load it with t5=False (the command line's --no-t5) "
                        "to run without T5, as SD3 can")
    networks = SD3_NETWORKS if t5_asked else SD3_NETWORKS[:-1]
    if absent := [f"{c}/" for c in (*networks, "scheduler", "tokenizer", "tokenizer_2") if not (path / c).is_dir()]:
        raise LoadError(f"{path} has no {', '.join(absent)}: an SD3 model folder holds transformer/, vae/, "
                        "text_encoder/ .. text_encoder_3/, tokenizer/ .. tokenizer_3/, scheduler/")
    nets, files = load_networks(path, variant, dtype, text_where(networks, device, offload_text), networks,
                                SD3_CLASSES)
    scheduler, schedule = flow_schedule(path, flow_config)
    if schedule["use_dynamic_shifting"]:
        raise LoadError(f"{scheduler}: use_dynamic_shifting is not supported for Stable Diffusion 3 (only FLUX.1's); "
                        "remove it from the scheduler config")
    tokenizers = [folder_tokenizer(path, read_json(path / t.replace("tokenizer", "text_encoder") / "config.json"), t)
                  for t in TOKENIZERS]
    files += [scheduler, path / "model_index.json"] + \
        [p for t in TOKENIZERS for n in TOKENIZER_FILES if (p := path / t / n).is_file()]
    tokenizer_3 = None
    if t5_asked:
        if not (tokenizer_json := path / "tokenizer_3" / "tokenizer.json").is_file():
            raise LoadError(f"{path} has no tokenizer_3/tokenizer.json (T5's tokenizer): load it with t5=False "
                            "(the command line's --no-t5) to run without T5")
        tokenizer_3 = t5_tokenizer(tokenizer_json, t5.SD3_MAX_LENGTH)
        files.append(tokenizer_json)
    fingerprint = (sha or content_hash([p for p in files if p.is_file()])) + ("" if t5_asked else "-no-t5")
    return StableDiffusion3(tokenizer=tokenizers[0], text_encoder=nets["text_encoder"], tokenizer_2=tokenizers[1],
                            text_encoder_2=nets["text_encoder_2"], tokenizer_3=tokenizer_3,
                            text_encoder_3=nets.get("text_encoder_3"), transformer=nets["transformer"], vae=nets["vae"],
                            schedule=schedule, model_id=model_id, fingerprint=fingerprint, device=device, dtype=dtype,
                            text_offloaded=offload_text)


def _flux_folder(path: Path, model_id: str, sha, variant, dtype, device, t5_asked: bool, offload_text: bool) -> Flux:
    """FLUX.1-dev or -schnell from a diffusers-layout folder (module docstring)."""
    if not t5_asked:
        raise LoadError(f"{model_id} is a FLUX.1 model: it cannot run without T5 (t5=False, the command line's "
                        "--no-t5, is for SD3 only)")
    if absent := [f"{c}/" for c in (*FLUX_NETWORKS, "scheduler", "tokenizer") if not (path / c).is_dir()]:
        raise LoadError(f"{path} has no {', '.join(absent)}: a FLUX.1 model folder holds transformer/, vae/, "
                        "text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/, scheduler/")
    if not (tokenizer_json := path / FLUX_T5_TOKENIZER).is_file():
        raise LoadError(f"{path} has no {FLUX_T5_TOKENIZER} (T5's tokenizer): a FLUX.1 model folder holds it")
    nets, files = load_networks(path, variant, dtype, text_where(FLUX_NETWORKS, device, offload_text), FLUX_NETWORKS,
                                FLUX_CLASSES)
    scheduler, schedule = flow_schedule(path, schedule_of)
    tokenizer = folder_tokenizer(path, read_json(path / "text_encoder" / "config.json"))
    tokenizer_2 = t5_tokenizer(tokenizer_json, T5_TOKENS)
    files += [scheduler, path / "model_index.json", tokenizer_json] + \
        [p for n in TOKENIZER_FILES if (p := path / "tokenizer" / n).is_file()]
    fingerprint = sha or content_hash([p for p in files if p.is_file()])
    return Flux(tokenizer=tokenizer, text_encoder=nets["text_encoder"], tokenizer_2=tokenizer_2,
                text_encoder_2=nets["text_encoder_2"], transformer=nets["transformer"], vae=nets["vae"],
                schedule=schedule, model_id=model_id, fingerprint=fingerprint, device=device, dtype=dtype,
                text_offloaded=offload_text)


def t5_tokenizer(tokenizer_json: Path, max_length: int) -> t5.T5Tokenizer:
    """T5's tokenizer from its tokenizer.json, padding / truncating to max_length tokens; a malformed file refused in
    one line (LoadError)."""
    try:
        return t5.T5Tokenizer(tokenizer_json, max_length)
    except Exception as e:
        raise LoadError(f"{tokenizer_json} cannot be read ({type(e).__name__}: {e})") from None


def text_where(networks: tuple, device: torch.device, offload_text: bool) -> dict:
    """{component: device}: the text encoders on the CPU when offload_text, the rest on `device`."""
    return {c: torch.device("cpu") if offload_text and c.startswith("text_") else device for c in networks}


def flow_schedule(path: Path, make: Callable[[dict], dict]) -> tuple[Path, dict]:
    """(scheduler/scheduler_config.json, make(its config)): a flow schedule, a bad value a one-line LoadError."""
    scheduler = path / "scheduler" / "scheduler_config.json"
    try:
        return scheduler, make(read_json(scheduler))
    except ValueError as e:
        raise LoadError(f"{scheduler}: {e}") from None


def require_subfolders(folder: Path, networks: tuple) -> tuple:
    """networks, if folder has a subfolder for each of them and scheduler/; else a one-line LoadError."""
    if absent := [f"{c}/" for c in (*networks, "scheduler") if not (folder / c).is_dir()]:
        tokenizers = ", ".join(f"{t}/" for t in TOKENIZERS[:len(networks) - 2])
        raise LoadError(f"{folder} has no {', '.join(absent)}: a diffusers-layout model folder holds "
                        f"{', '.join(f'{c}/' for c in networks)}, scheduler/ (and {tokenizers})")
    return networks


def upcast_vae_dtype(config: dict, dtype: torch.dtype, xl: bool) -> torch.dtype:
    """fp32 for an SDXL VAE asked in fp16 whose config has force_upcast (diffusers' default: true), else dtype."""
    return torch.float32 if xl and dtype == torch.float16 and config.get("force_upcast", True) else dtype


def vae_location(vae) -> Path:
    """The folder holding the VAE's config.json: `vae` itself, or its vae/."""
    folder = Path(vae).expanduser().resolve()
    for candidate in (folder, folder / "vae"):
        if (candidate / "config.json").is_file():
            return candidate
    raise LoadError(f"--vae {vae}: no config.json in it or in its vae/ (a VAE folder holds config.json and "
                    "diffusion_pytorch_model.safetensors)")


def swap_vae(sd: StableDiffusion, folder: Path, variant=None) -> StableDiffusion:
    """sd with the VAE of `folder` (vae_location), its scaling factor and force_upcast; a new fingerprint."""
    config_path = folder / "config.json"
    config = read_json(config_path)
    module = build("vae", config, str(config_path))
    path = weight_file(folder.parent, folder.name, variant, stem=WEIGHT_STEM["vae"])
    sd.vae = load_file(module, path, "vae", upcast_vae_dtype(config, sd.dtype, isinstance(sd, StableDiffusionXL)),
                       sd.device)
    sd.fingerprint = content_hash([config_path, path], sd.fingerprint)
    return sd


def _single_file(path: Path, model_id: str, device, dtype, prediction_type) -> StableDiffusion:
    """An original-format checkpoint: convert.read_single_file gives configs and getters (key renaming)."""
    parts = read_single_file(path, prediction_type)
    xl = parts["family"] == "sdxl"
    dtypes = {c: dtype for c in parts["networks"]} | {"vae": upcast_vae_dtype(parts["vae"][0], dtype, xl)}
    nets = {c: fill(build(c, parts[c][0], f"{path} [{c}]"), parts[c][1], f"{path} [{c}]", dtypes[c], device)
            for c in parts["networks"]}
    schedule = make_schedule(parts["scheduler"], str(path))
    common = (nets["unet"], nets["vae"], schedule, model_id, content_hash([path], schedule.prediction_type), device,
              dtype)
    if not xl:
        return StableDiffusion(Tokenizer.builtin(parts["pad_id"]), nets["text_encoder"], *common)
    return StableDiffusionXL(Tokenizer.builtin(parts["pad_id"]), nets["text_encoder"], *common,
                             Tokenizer.builtin(parts["pad_id_2"]), nets["text_encoder_2"])

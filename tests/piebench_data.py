"""A synthetic PIE-Bench in exactly the benchmark's layout (mapping_file.json with its seven keys and run-length masks,
annotation_images/<type folder>/[...]/<id>.jpg, 512 x 512 RGB JPEGs, bracketed edit words), for the tests and the
bench: `write(folder, n)` -> the ids written."""
import json
from pathlib import Path

import numpy as np
from PIL import Image

SIDE = 512
FOLDERS = ["0_random_140", "1_change_object_80", "2_add_object_80", "3_delete_object_80",
           "4_change_attribute_content_40", "5_change_attribute_pose_40", "6_change_attribute_color_40",
           "7_change_attribute_material_40", "8_change_background_80", "9_change_style_80"]
PROMPTS = [  # (original_prompt, editing_prompt, editing_instruction, blended_word) per edit type
    ("a [cat] sitting on a wooden bench", "a [dog] sitting on a wooden bench", "Make the cat a dog", "cat dog"),
    ("a [red] car parked on the street", "a [blue] car parked on the street", "Change the car to blue", "car car"),
    ("a woman standing in a field", "a woman standing in a field [with flowers]", "Add flowers", ""),
    ("a [bird] on a branch in the rain", "a on a branch in the rain", "Remove the bird", "bird bird"),
    ("a cup of [coffee] on a table", "a cup of [tea] on a table", "Make the coffee tea", "coffee tea"),
    ("a [sitting] horse in a meadow", "a [running] horse in a meadow", "Make the horse run", "horse horse"),
    ("a [green] apple on a plate", "a [yellow] apple on a plate", "Make the apple yellow", "apple apple"),
    ("a [wooden] chair in a room", "a [metal] chair in a room", "Make the chair metal", "chair chair"),
    ("a dog on a [beach]", "a dog on a [snowy mountain]", "Put the dog on a mountain", "beach mountain"),
    ("a photo of a house", "a [watercolor painting] of a house", "Make it a watercolor", ""),
]


def rle(mask: np.ndarray) -> list[int]:
    """The benchmark's run-length code of a bool [512, 512] mask: [start, length, ...] over the row-major pixels."""
    flat = np.concatenate([[0], mask.reshape(-1).astype(np.int8), [0]])
    edges = np.flatnonzero(np.diff(flat))
    return [int(v) for s, e in zip(edges[::2], edges[1::2]) for v in (s, e - s)]


def photo(seed: int) -> Image.Image:
    """A smooth random 512 x 512 picture (a few colour blobs: JPEG keeps it, unlike noise)."""
    r = np.random.default_rng(seed)
    y, x = np.mgrid[0:SIDE, 0:SIDE] / SIDE
    img = np.zeros((SIDE, SIDE, 3))
    for _ in range(4):
        cy, cx, s = r.uniform(0, 1), r.uniform(0, 1), r.uniform(0.1, 0.4)
        img += r.uniform(0, 1, 3) * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * s * s))[..., None]
    return Image.fromarray((255 * img / img.max()).astype(np.uint8))


def entry_mask(t: int, seed: int) -> np.ndarray:
    """A rectangle (the whole frame for style edits, type 9), as the benchmark's annotators drew."""
    m = np.zeros((SIDE, SIDE), dtype=bool)
    if t == 9:
        m[:] = True
        return m
    r = np.random.default_rng(seed)
    y0, x0 = r.integers(40, 200, 2)
    m[y0:y0 + r.integers(100, 260), x0:x0 + r.integers(100, 260)] = True
    return m


def entry_id(t: int, i: int) -> str:
    return f"{t}{i:011d}" if t == 0 else f"{t}{1 + i % 2}{1 + i % 4}{i:09d}"


def image_path(t: int, i: int) -> str:
    if t == 0:
        return f"{FOLDERS[0]}/{entry_id(t, i)}.jpg"
    return (f"{FOLDERS[t]}/{1 + i % 2}_{['artificial', 'natural'][i % 2]}/"
            f"{1 + i % 4}_{['animal', 'human', 'indoor', 'outdoor'][i % 4]}/{entry_id(t, i)}.jpg")


def write(folder, n: int = 10, types=range(10)) -> list[str]:
    """n entries (edit types cycling through `types`) under folder/: the ids, in the file's order."""
    folder, mapping = Path(folder), {}
    for k in range(n):
        t = list(types)[k % len(types)]
        i = k // len(types)
        key, path = entry_id(t, i), image_path(t, i)
        src, tar, instruction, blended = PROMPTS[t]
        (folder / "annotation_images" / path).parent.mkdir(parents=True, exist_ok=True)
        photo(k).save(folder / "annotation_images" / path, quality=95)
        mapping[key] = {"image_path": path, "original_prompt": src, "editing_prompt": tar,
                        "editing_instruction": instruction, "editing_type_id": str(t), "blended_word": blended,
                        "mask": rle(entry_mask(t, k))}
    (folder / "mapping_file.json").write_text(json.dumps(mapping), encoding="utf-8")
    return list(mapping)


# --------------------------------------------------------------------------------------------- metric weights
DINO_TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=224,
                 patch_size=8, layer_norm_eps=1e-6)
SQUEEZE_FIRES = {3: (64, 16, 64), 4: (128, 16, 64), 6: (128, 32, 128), 7: (256, 32, 128), 9: (256, 48, 192),
                 10: (384, 48, 192), 11: (384, 64, 256), 12: (512, 64, 256)}  # torchvision squeezenet1_1's Fire modules


def write_dino(folder, seed: int = 0, config: dict = DINO_TINY) -> Path:
    """A random ViT in the layout of facebook/dino-vitb8 on the Hub (transformers' ViTModel, its pooler included),
    with randomised norms: config.json and model.safetensors."""
    import torch
    from transformers import ViTConfig, ViTModel

    from tests import hub
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = ViTModel(ViTConfig(**config)).eval()
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if "norm" in name or "token" in name or "position" in name:
                t.copy_(torch.randn(t.shape) * 0.2 + (1 if name.endswith("norm.weight") else 0))
    hub.save_safetensors([(hub_key(k), t) for k, t in model.state_dict().items()], folder / "model.safetensors",
                         metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2, default=str))
    return folder


def hub_key(key: str) -> str:
    """transformers 5's ViTModel key -> the Hub file's (facebook/dino-vitb8 was saved by transformers 4)."""
    for old, new in [("layers.", "encoder.layer."), (".attention.q_proj.", ".attention.attention.query."),
                     (".attention.k_proj.", ".attention.attention.key."),
                     (".attention.v_proj.", ".attention.attention.value."),
                     (".attention.o_proj.", ".attention.output.dense."), (".mlp.fc1.", ".intermediate.dense."),
                     (".mlp.fc2.", ".output.dense.")]:
        key = key.replace(old, new) if key.startswith("layers.") or old != "layers." else key
    return key


def squeezenet_state(seed: int = 0) -> dict:
    """Random tensors under torchvision's squeezenet1_1 state-dict names and shapes (classifier included)."""
    import torch
    g = torch.Generator().manual_seed(seed)

    def conv(c_out, c_in, k):
        return {"weight": torch.randn(c_out, c_in, k, k, generator=g) * (2 / (c_in * k * k)) ** 0.5,
                "bias": torch.randn(c_out, generator=g) * 0.1}
    state = {f"features.0.{k}": v for k, v in conv(64, 3, 3).items()}
    for i, (c_in, s, e) in SQUEEZE_FIRES.items():
        for name, c in [("squeeze", conv(s, c_in, 1)), ("expand1x1", conv(e, s, 1)), ("expand3x3", conv(e, s, 3))]:
            state.update({f"features.{i}.{name}.{k}": v for k, v in c.items()})
    state.update({f"classifier.1.{k}": v for k, v in conv(1000, 512, 1).items()})
    return state


def write_squeezenet(path, seed: int = 0) -> Path:
    import torch
    torch.save(squeezenet_state(seed), path)
    return Path(path)

"""What keeps minledits.load quick, without giving up its strictness or its one copy of the weights (load.py):
tensors are views of the file's memory map made without reading it (safe_open's get_tensor reads the first pages
of every tensor), networks are built on meta without running torch.nn.init (whose meta normal_ imports
torch._dynamo, seconds in a fresh process), the tokenizer's files are read in Rust."""
import json
import subprocess
import sys

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers.models import BPE

from minledits.load import safetensors_getters
from minledits.tokenizer import Tokenizer, pad_token

TENSORS = {"f64": torch.randn(2, 3, dtype=torch.float64), "f32": torch.randn(5, 7), "f16": torch.randn(3).half(),
           "bf16": torch.randn(4, 1).bfloat16(), "i64": torch.arange(3), "i32": torch.arange(5, dtype=torch.int32),
           "i16": torch.arange(3, dtype=torch.int16), "i8": torch.arange(-3, 4, dtype=torch.int8),
           "u8": torch.arange(3, dtype=torch.uint8), "bool": torch.tensor([True, False, True]),
           "empty": torch.zeros(0, 4), "scalar": torch.tensor(2.5),
           "f8": torch.randn(6).to(torch.float8_e4m3fn)}  # not in load's table: read by get_tensor


def same(x, t):
    """Same dtype, shape and bytes."""
    return x.dtype == t.dtype and x.shape == t.shape and torch.equal(x.reshape(-1).view(torch.uint8),
                                                                     t.reshape(-1).view(torch.uint8))


def test_mapped_tensors_are_the_files_tensors(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(TENSORS, str(path))
    with safe_open(str(path), framework="pt", device="cpu") as f:
        got = {k: get() for k, get in safetensors_getters(f, "unet", path).items()}
    assert got.keys() == TENSORS.keys()
    for k, t in TENSORS.items():
        assert same(got[k], t), k
        assert got[k].untyped_storage().nbytes() == t.numel() * t.element_size(), k  # its own bytes, not the file


def test_unaligned_offsets(tmp_path):
    """A hand-written file whose float32 tensor starts at an odd offset (safetensors itself writes aligned ones)."""
    a, b = torch.arange(3, dtype=torch.uint8), torch.randn(2, 2)
    header = {"a": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
              "b": {"dtype": "F32", "shape": [2, 2], "data_offsets": [3, 19]}}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path = tmp_path / "odd.safetensors"
    path.write_bytes(len(text).to_bytes(8, "little") + text + a.numpy().tobytes() + b.numpy().tobytes())
    with safe_open(str(path), framework="pt", device="cpu") as f:
        getters = safetensors_getters(f, "unet", path)
        assert same(getters["a"](), a) and same(getters["b"](), b) and same(getters["b"](), f.get_tensor("b"))


def test_loading_neither_initialises_nor_imports_dynamo(tiny_sd1):
    code = ("import sys, minledits; before = 'torch._dynamo' in sys.modules; minledits.load(sys.argv[1]); "
            "print(before, 'torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(tiny_sd1.folder)], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"], "importing torch._dynamo costs 1.5-4 s of a first load"


def test_tokenizer_read_in_rust_is_the_one_built_in_python(tiny_sd1, tiny_sd2):
    for folder in (tiny_sd1.folder / "tokenizer", tiny_sd2.folder / "tokenizer"):
        vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        _, merges = BPE.read_file(str(folder / "vocab.json"), str(folder / "merges.txt"))
        python, rust = Tokenizer(vocab, merges, vocab[pad_token(folder)]), Tokenizer.from_folder(folder)
        assert rust.backend.to_str() == python.backend.to_str()
        assert (rust.pad_id, rust.bos_id, rust.eos_id) == (python.pad_id, python.bos_id, python.eos_id)
        prompts = ["a photo of a cat", "wow!!! <|endoftext|> café", "x" * 300]
        assert torch.equal(rust(prompts), python(prompts))

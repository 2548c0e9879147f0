"""What keeps minledits.load quick (load.py): networks are built on meta without running torch.nn.init (whose
meta normal_ imports torch._dynamo, seconds in a fresh process), and the tokenizer's files are read in Rust."""
import json
import subprocess
import sys

import torch
from tokenizers.models import BPE

from minledits.nets.tokenizer import Tokenizer, pad_token


def test_loading_neither_initialises_nor_imports_dynamo(tiny_sd1):
    code = ("import sys, minledits; before = 'torch._dynamo' in sys.modules; minledits.load(sys.argv[1]); "
            "print(before, 'torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(tiny_sd1.folder)], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"], "importing torch._dynamo costs seconds of a first load"


def test_tokenizer_read_in_rust_is_the_one_built_in_python(tiny_sd1, tiny_sd2):
    for folder in (tiny_sd1.folder / "tokenizer", tiny_sd2.folder / "tokenizer"):
        vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        _, merges = BPE.read_file(str(folder / "vocab.json"), str(folder / "merges.txt"))
        python, rust = Tokenizer(vocab, merges, vocab[pad_token(folder)]), Tokenizer.from_folder(folder)
        assert rust.backend.to_str() == python.backend.to_str()
        assert (rust.pad_id, rust.bos_id, rust.eos_id) == (python.pad_id, python.bos_id, python.eos_id)
        prompts = ["a photo of a cat", "wow!!! <|endoftext|> café", "x" * 300]
        assert torch.equal(rust(prompts), python(prompts))

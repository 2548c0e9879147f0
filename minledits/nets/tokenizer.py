"""CLIP byte-pair-encoding tokenizer, built from the `tokenizers` library (no hand-written BPE).

    prompt --normalize--> NFC, whitespace runs -> " ", lowercase
           --pre-tokenize--> split on the CLIP regex (words, single digits, punctuation runs), then map
                             every byte to a printable symbol (GPT-2 "byte level" alphabet)
           --BPE--> merge symbols, the last one of each word carries "</w>"
           --> [BOS] + first 75 tokens + [EOS] + padding to 77            (LongTensor [B, 77])

Vocabulary (49408): 256 byte symbols, the same 256 + "</w>", one token per merge (48,894),
<|startoftext|> = 49406, <|endoftext|> = 49407.  SD1 pads with 49407, SD2 with 0 (the token "!").

The SD2 "!" quirk: SD2's tokenizer files name "!" as pad token, and transformers then treats every "!"
in a prompt as a special token, so "wow!!!" becomes "wow", "!", "!", "!" (ids 0 0 0). The model was
trained with open_clip's tokenizer, where "!" is ordinary text ("!!!" is one token, 995). We follow the
training tokenization: "!" is never special here; only the padding uses id 0.
Special-token text typed in a prompt ("<|endoftext|>", any case) maps to its id, as the tokenizer files
declare ("normalized": true). transformers' SD1 tokenizer matches "<|endoftext|>" case-sensitively (its pad
token re-registers it), so "<|ENDOFTEXT|>" is the one SD1 prompt where we differ from it.
Like transformers, and unlike open_clip, we do not run ftfy / html.unescape on the prompt.
"""
from __future__ import annotations

import gzip
import json
import warnings
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, normalizers, pre_tokenizers
from tokenizers import Tokenizer as _Backend
from tokenizers.models import BPE

from ..errors import shorten

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
CONTEXT_LENGTH = 77                            # BOS + 75 tokens + EOS
SD1_PAD_ID, SD2_PAD_ID = 49407, 0
CLIP_REGEX = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
BUILTIN_BPE = Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")   # open_clip's file (MIT)
N_MERGES = 49152 - 256 - 2                     # merges used by CLIP: lines 1..48894 of that file


def byte_symbols() -> list[str]:
    """The 256 byte symbols in vocabulary order: printable bytes (as themselves) first, then the rest
    (bytes 0-32, 127-160, 173), which get the code points 256, 257, ... in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


class Tokenizer:
    """``tok(prompts) -> LongTensor [B, 77]``; one prompt (str) or a list of them."""

    def __init__(self, vocab: dict[str, int] | str, merges: list[tuple[str, str]] | str, pad_id: int = SD1_PAD_ID):
        """vocab and merges: as dict and list, or the paths of vocab.json and merges.txt (then read in Rust, quicker
        than reading them in Python and handing them over)."""
        bpe = BPE(vocab, merges, end_of_word_suffix="</w>", continuing_subword_prefix="", unk_token=EOS)
        self.backend = _Backend(bpe)
        self.pad_id, self.bos_id, self.eos_id = pad_id, self.token_id(BOS), self.token_id(EOS)
        self.backend.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        self.backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(CLIP_REGEX), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False)])
        # "<|startoftext|>" / "<|endoftext|>" typed in a prompt map to their ids, matched after lowercasing
        self.backend.add_special_tokens([AddedToken(BOS, normalized=True), AddedToken(EOS, normalized=True)])

    @classmethod
    def from_files(cls, vocab_json, merges_txt, pad_id: int = SD1_PAD_ID) -> "Tokenizer":
        """From a Hub tokenizer folder's vocab.json and merges.txt ("#version" header line allowed)."""
        return cls(str(vocab_json), str(merges_txt), pad_id)

    @classmethod
    def from_folder(cls, folder) -> "Tokenizer":
        """From a Hub ``tokenizer/`` folder; the pad token comes from special_tokens_map / tokenizer_config."""
        folder = Path(folder)
        tok = cls.from_files(folder / "vocab.json", folder / "merges.txt")
        tok.pad_id = tok.token_id(pad_token(folder))
        return tok

    @classmethod
    def builtin(cls, pad_id: int = SD1_PAD_ID) -> "Tokenizer":
        """From the CLIP vocabulary shipped in the package (for single files / folders without tokenizer/)."""
        lines = gzip.open(BUILTIN_BPE, "rt", encoding="utf-8").read().split("\n")
        merges = [tuple(line.split()) for line in lines[1:1 + N_MERGES]]   # line 0 is a "#version" header
        symbols = byte_symbols()
        words = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
        return cls({w: i for i, w in enumerate(words)}, merges, pad_id)

    def token_id(self, token: str) -> int:
        """The id of `token` in the vocabulary (KeyError if it has none)."""
        if (i := self.backend.model.token_to_id(token)) is None:
            raise KeyError(token)
        return i

    def normalize(self, text: str) -> str:
        """The text as the tokenizer reads it: NFC, whitespace runs as one space, lowercase."""
        return self.backend.normalizer.normalize_str(text)

    def tokenize(self, prompt: str) -> list[str]:
        """The BPE tokens of one prompt, without BOS/EOS (handy to see how a prompt is split)."""
        return self.backend.encode(prompt, add_special_tokens=False).tokens

    def __call__(self, prompts: str | list[str]) -> torch.LongTensor:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return torch.tensor([self._encode_one(p) for p in prompts], dtype=torch.long)

    def _encode_one(self, prompt: str) -> list[int]:
        enc = self.backend.encode(prompt, add_special_tokens=False)
        ids, keep = enc.ids, CONTEXT_LENGTH - 2
        if len(ids) > keep:
            dropped = prompt[enc.offsets[keep][0]:]
            warnings.warn(f"prompt longer than {keep} CLIP tokens ({len(ids)}); dropped: {shorten(dropped)}",
                          stacklevel=3)
            ids = ids[:keep]
        ids = [self.bos_id, *ids, self.eos_id]
        return ids + [self.pad_id] * (CONTEXT_LENGTH - len(ids))


def pad_token(folder) -> str:
    """The pad token named in a Hub tokenizer folder (special_tokens_map.json, else tokenizer_config.json);
    "<|endoftext|>" when neither names one (SD1's choice)."""
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = Path(folder) / name
        pad = json.loads(path.read_text(encoding="utf-8")).get("pad_token") if path.exists() else None
        if pad is not None:
            return pad["content"] if isinstance(pad, dict) else pad
    return EOS

"""A random T5 text encoder and a T5-shaped tokenizer in the Hub layout of SD3's third text encoder:

    text_encoder_3/config.json, text_encoder_3/model.safetensors     (transformers' T5EncoderModel.save_pretrained)
    tokenizer_3/tokenizer.json, tokenizer_config.json, special_tokens_map.json

The tokenizer has T5's shape but not its vocabulary (no download): a Unigram model of 32,100 pieces, <pad> 0,
</s> 1, <unk> 2, "▁" 3, characters, words and letter runs with and without the "▁" word start, then
<extra_id_99> .. <extra_id_0> at 32000 .. 32099 (T5's order); WhitespaceSplit + Metaspace pre-tokenizer, Metaspace
decoder, a template appending </s>. No normalizer: T5's precompiled SentencePiece charsmap cannot be written here.
The encoder is tiny (width 32, 2 layers, 4 heads) with SD3's vocabulary size 32128 and gated-GELU feed-forward.

    folder = t5_hub.write(tmp_path / "sd3")     # folder/text_encoder_3, folder/tokenizer_3
    reference = t5_hub.reference(folder)        # transformers' T5EncoderModel on those weights (fp32, eval)
"""
import itertools
import json
import string
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import Unigram

SPECIALS = ["<pad>", "</s>", "<unk>"]
EXTRA_IDS = [f"<extra_id_{i}>" for i in range(99, -1, -1)]          # <extra_id_99> = 32000 .. <extra_id_0> = 32099
WORDS = ("a an the of and to in is on with at by for from photo picture painting cat dog house tree car red blue "
         "green yellow white black small big old new man woman girl boy sky sun water mountain city street sitting "
         "standing running wearing hat glasses style oil watercolor sketch high quality detailed portrait").split()
TINY = dict(vocab_size=32128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=32,
            relative_attention_max_distance=128, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
            use_cache=False, dropout_rate=0.0)


def pieces(n: int = 32000) -> list[tuple[str, float]]:
    """n Unigram (piece, log-probability) pairs: the specials, then longer pieces scoring higher per character."""
    chars = string.ascii_letters + string.digits + string.punctuation + "éüß"
    words = [w for w in WORDS] + [w + s for w in WORDS for s in ("s", "ing", "ed")]
    runs = ["".join(p) for k in (2, 3) for p in itertools.product(string.ascii_lowercase, repeat=k)]
    vocab, seen = [(s, 0.0) for s in SPECIALS] + [("▁", -2.0)], set(SPECIALS) | {"▁"}
    for i, p in enumerate([*("▁" + w for w in words), *words, *("▁" + c for c in chars), *chars,
                           *("▁" + r for r in runs), *runs]):
        if p not in seen and len(vocab) < n:
            seen.add(p)
            vocab.append((p, -3.0 - 0.0001 * i - 4.0 / len(p.lstrip("▁") or "x")))
    assert len(vocab) == n, len(vocab)
    return vocab


def tokenizer() -> Tokenizer:
    tok = Tokenizer(Unigram(pieces() + [(t, 0.0) for t in EXTRA_IDS], unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="always", split=True)])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.post_processor = processors.TemplateProcessing(single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"],
                                                       special_tokens=[("</s>", 1)])
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIALS + EXTRA_IDS])
    return tok


def write_tokenizer(folder) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer().save(str(folder / "tokenizer.json"))
    special = dict(eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                   additional_special_tokens=EXTRA_IDS[::-1])
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        dict(tokenizer_class="T5Tokenizer", model_max_length=512, extra_ids=100, **special), indent=2))
    return folder


def write(folder, seed: int = 0, config: dict = TINY) -> Path:
    """folder/text_encoder_3 (a seeded random T5EncoderModel, norms randomised too) and folder/tokenizer_3."""
    from transformers import T5Config, T5EncoderModel
    folder = Path(folder)
    torch.manual_seed(seed)
    model = T5EncoderModel(T5Config(**config)).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, t in model.state_dict().items():   # norms start at 1 and the bias at small values: vary them
            if "norm" in name or "relative_attention_bias" in name:
                t.add_(0.3 * torch.randn(t.shape, generator=gen))
    model.save_pretrained(folder / "text_encoder_3")
    write_tokenizer(folder / "tokenizer_3")
    return folder


def reference(folder):
    from transformers import T5EncoderModel
    return T5EncoderModel.from_pretrained(Path(folder) / "text_encoder_3", torch_dtype=torch.float32).eval()

"""Tokenizer parity with transformers' CLIPTokenizer on the real CLIP vocabulary (the shipped open_clip BPE)."""
import json
import warnings

import pytest
import torch

from minledits.nets.tokenizer import SD1_PAD_ID, SD2_PAD_ID, Tokenizer, pad_token
from tests import hub

TRICKY = [
    "a photo of a cat", "A PHOTO of A CaT", "MiXeD CaSe WoRdS", "   leading and trailing spaces   ",
    "tabs\tand\nnewlines\r\nhere", "multiple     spaces\t\t\tand tabs", "hello, world? how's it going",
    "it's, they're, we've, I'm, you'll, he'd", "IT'S THEY'RE WE'VE", "1234567890", "3.14159 and 2,718",
    "emoji 🙂😀🎉 party", "👨‍👩‍👧‍👦 family with zero-width joiners", "café naïve résumé façade",
    "combining e\u0301 accent (NFC)", "Ｆｕｌｌｗｉｄｔｈ ｌｅｔｔｅｒｓ", "東京タワー 夜景", "한국어 텍스트",
    "русский текст",
    "العربية", "&amp; &lt;b&gt; &quot;quoted&quot; &#39;", "<b>bold</b> <i>html</i>",
    "email@example.com https://example.com/path?q=1&x=2", "snake_case camelCase kebab-case",
    "(parentheses) [brackets] {braces}", "$100 #hashtag @mention ^caret ~tilde", "...ellipsis… — em dash – en dash",
    "“smart quotes” ‘single’", "a", "", " ", "<|startoftext|>", "<|endoftext|>", "before <|endoftext|> after",
    "<|STARTOFTEXT|> upper-case special text", "<|startoftext|><|endoftext|>", "\u00a0non-breaking\u2003spaces",
    "zero\u200bwidth space", "ﬁ ligature ß", "\x00 control \x07 chars", "masterpiece, best quality, (detailed:1.2), 8k",
    "ÜNÏCÖDÉ ÀÉÎÕÜ", "x" * 300, "a photo of an astronaut riding a horse on mars, " * 10, "1 2 3 " * 40, "🙂" * 100,
]
SD1_DIFFERS = ["<|ENDOFTEXT|> upper-case special text", "a <|EndOfText|> b"]
BANG = ["wow!!!", "hello, world!", "year 2023: 50% off!!!", "¡¿spanish?!", "!", "a ! b !! c", "!" * 100]


def reference_ids(ref_tok, prompts):
    return ref_tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def quiet(tok, prompts):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tok(prompts)


@pytest.fixture(scope="module")
def ours(tiny_sd1, tiny_sd2):
    return {"sd1": Tokenizer.from_folder(tiny_sd1.folder / "tokenizer"),
            "sd2": Tokenizer.from_folder(tiny_sd2.folder / "tokenizer")}


def test_enough_tricky_strings():
    assert len(TRICKY) + len(BANG) >= 40 and len(set(TRICKY)) == len(TRICKY)


@pytest.mark.parametrize("prompt", TRICKY + BANG)
def test_sd1_matches_transformers(ours, clip_tokenizer_sd1, prompt):
    ids = quiet(ours["sd1"], prompt)
    assert ids.shape == (1, 77) and ids.dtype == torch.long
    assert ids.tolist() == reference_ids(clip_tokenizer_sd1, [prompt]).tolist()


@pytest.mark.parametrize("prompt", TRICKY + SD1_DIFFERS)
def test_sd2_matches_transformers(ours, clip_tokenizer_sd2, prompt):
    assert quiet(ours["sd2"], prompt).tolist() == reference_ids(clip_tokenizer_sd2, [prompt]).tolist()


def test_pad_ids(ours):
    assert ours["sd1"].pad_id == SD1_PAD_ID == 49407 and ours["sd2"].pad_id == SD2_PAD_ID == 0
    sd1, sd2 = ours["sd1"]("a cat")[0], ours["sd2"]("a cat")[0]
    assert sd1[:4].tolist() == sd2[:4].tolist() == [49406, 320, 2368, 49407]
    assert (sd1[4:] == 49407).all() and (sd2[4:] == 0).all()


@pytest.mark.parametrize("prompt", BANG)
def test_sd2_bang_is_ordinary_text(ours, clip_tokenizer_sd1, prompt):
    """Our documented choice: for SD2, "!" tokenizes as in training (open_clip), i.e. as SD1 does; only the
    padding differs. transformers instead makes every "!" a special token (id 0) because it is the pad token."""
    sd1, sd2 = quiet(ours["sd1"], prompt)[0], quiet(ours["sd2"], prompt)[0]
    n = int((sd1 == 49407).nonzero()[0]) + 1          # BOS ... EOS
    assert sd2[:n].tolist() == sd1[:n].tolist() and (sd2[n:] == 0).all()


def test_sd2_bang_differs_from_transformers(ours, clip_tokenizer_sd2):
    assert ours["sd2"].tokenize("wow!!!") == ["wow</w>", "!!!</w>"]
    assert ours["sd2"]("wow!!!")[0, :4].tolist() == [49406, 2781, 995, 49407]
    assert reference_ids(clip_tokenizer_sd2, ["wow!!!"])[0, :6].tolist() == [49406, 2781, 0, 0, 0, 49407]


@pytest.mark.parametrize("prompt", SD1_DIFFERS)
def test_uppercase_special_text_is_special(ours, clip_tokenizer_sd1, prompt):
    """Special-token text matches in any case (files say normalized: true; transformers' SD1 tokenizer
    matches <|endoftext|> case-sensitively because its pad token re-registers it)."""
    ids = ours["sd1"](prompt)[0]
    assert int((ids == 49407).nonzero()[0]) in (1, 2)                # the typed text became EOS
    assert ids.tolist() != reference_ids(clip_tokenizer_sd1, [prompt])[0].tolist()
    assert ids.tolist() == [i if i else 49407 for i in ours["sd2"](prompt)[0].tolist()]


def test_batch(ours, clip_tokenizer_sd1):
    prompts = ["a photo", "", "Two  words"]
    ids = ours["sd1"](prompts)
    assert ids.shape == (3, 77) and ids.dtype == torch.long
    assert torch.equal(ids, reference_ids(clip_tokenizer_sd1, prompts))
    assert ours["sd1"]([]).shape == (0,) or ours["sd1"]([]).numel() == 0


def test_truncation_warns_with_dropped_text(ours, clip_tokenizer_sd1):
    prompt = "a " * 80 + "tail end"
    with pytest.warns(UserWarning, match="dropped") as record:
        ids = ours["sd1"](prompt)
    message = str(record[0].message)
    assert "tail end" in message and "82" in message          # 82 tokens, the last 7 dropped
    assert message.count("a ") == 5
    assert ids[0, 76] == 49407 and (ids[0, 1:76] == 320).all()
    assert torch.equal(ids, reference_ids(clip_tokenizer_sd1, [prompt]))


def test_truncation_warning_quotes_a_long_prompt_shortened(ours):
    """A 10,000-character prompt: the warning quotes the start of what is dropped, and stays one short line."""
    with pytest.warns(UserWarning, match="dropped") as record:
        ours["sd1"]("word " * 2000)
    message = str(record[0].message)
    assert message.endswith("…") and len(message) < 160 and "\n" not in message, message


def test_exactly_75_tokens_no_warning(ours):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ids = ours["sd1"]("a " * 75)
    assert ids[0, 76] == 49407 and ids[0, 75] == 320


def test_builtin_equals_files(ours, tiny_sd1):
    built = Tokenizer.builtin()
    files = ours["sd1"]
    assert built.backend.get_vocab() == files.backend.get_vocab()
    assert len(built.backend.get_vocab()) == 49408
    merges = lambda t: json.loads(t.backend.to_str())["model"]["merges"]  # noqa: E731
    assert merges(built) == merges(files) and len(merges(built)) == 48894
    assert torch.equal(quiet(built, TRICKY), quiet(files, TRICKY))
    assert Tokenizer.builtin(SD2_PAD_ID)("a")[0, -1] == 0


def test_from_files_takes_pad_id(tiny_sd2):
    folder = tiny_sd2.folder / "tokenizer"
    tok = Tokenizer.from_files(folder / "vocab.json", folder / "merges.txt", pad_id=0)
    assert tok("a")[0, 3:].eq(0).all()
    assert Tokenizer.from_files(folder / "vocab.json", folder / "merges.txt")("a")[0, 3:].eq(49407).all()


def test_pad_token_lookup(tmp_path):
    assert pad_token(tmp_path) == "<|endoftext|>"                 # neither file: SD1 default
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"pad_token": "!"}))
    assert pad_token(tmp_path) == "!"
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"pad_token": {"content": "<|endoftext|>"}}))
    assert pad_token(tmp_path) == "<|endoftext|>"                 # special_tokens_map wins
    hub.write_tokenizer(tmp_path / "sd2", pad_token="!")
    assert Tokenizer.from_folder(tmp_path / "sd2").pad_id == 0

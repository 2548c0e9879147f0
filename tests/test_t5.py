"""T5 (SD3's third text encoder): our tokenizer against transformers' T5 tokenizer, our encoder against
transformers' T5EncoderModel on the same random weights (tests/t5_hub.py), and fill's strictness."""
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from minledits.errors import LoadError
from minledits.io.load import SkipInit, fill, read_json, safetensors_getters
from minledits.nets import t5
from tests import t5_hub

PROMPTS = ["a photo of a cat", "", "   ", "A Photo  OF a\tcat,  sitting on the  mat!!", "Café über straße ✨ 東京",
           "<extra_id_0> dog <extra_id_99> tree", "<extra_id_5>", "photo " * 300, "x" * 1000, "0123 456.78 $%&",
           "watercolor painting of an old man wearing glasses, high quality"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return t5_hub.write(tmp_path_factory.mktemp("sd3"))


@pytest.fixture(scope="module")
def reference(folder):
    return t5_hub.reference(folder)


def ours(folder, dtype=None):
    with torch.device("meta"), SkipInit():
        model = t5.T5Encoder(read_json(folder / "text_encoder_3" / "config.json"))
    path = folder / "text_encoder_3" / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        return fill(model, t5.tied_keys(safetensors_getters(f, "text_encoder_3")), str(path), dtype)


def test_tokenizer_matches_transformers(folder):
    from transformers import T5TokenizerFast
    theirs = T5TokenizerFast.from_pretrained(folder / "tokenizer_3")
    tok = t5.T5Tokenizer(folder / "tokenizer_3" / "tokenizer.json")
    ids, mask = tok(PROMPTS)
    ref = theirs(PROMPTS, padding="max_length", max_length=256, truncation=True, add_special_tokens=True,
                 return_tensors="pt")
    assert ids.shape == (len(PROMPTS), 256)
    assert torch.equal(ids, ref.input_ids) and torch.equal(mask, ref.attention_mask)
    assert ids[1, 0] == 1 and mask[1].sum() == 1 and (ids[1, 1:] == 0).all()       # "" -> </s>, then <pad>s
    assert ids[7, -1] == 1 and mask[7].all() and tok.truncated(PROMPTS)[7:9] == [True, True]
    assert not any(tok.truncated(PROMPTS[:7])) and ids[5, 0] == 32099 and 32000 in ids[5]


def test_bucket_matches_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention
    r = torch.arange(-300, 300)
    for n, d in [(32, 128), (16, 64)]:
        expected = T5Attention._relative_position_bucket(r, bidirectional=True, num_buckets=n, max_distance=d)
        assert torch.equal(t5.bucket(r, n, d), expected)


def test_encoder_matches_transformers(folder, reference):
    model = ours(folder)
    tok = t5.T5Tokenizer(folder / "tokenizer_3" / "tokenizer.json", max_length=40)
    ids, mask = tok(PROMPTS[:6])
    with torch.no_grad():
        for m in (None, mask):                  # SD3 passes no mask: padded tokens attend everything
            expected = reference(input_ids=ids, attention_mask=m).last_hidden_state
            got = model(ids, m)
            err = ((got - expected).norm() / expected.norm()).item()
            assert err <= 1e-5, err
        assert not torch.allclose(model(ids), model(ids, mask), atol=1e-3)   # the mask matters
        one = torch.tensor([tok.backend.encode(PROMPTS[3]).ids[:int(mask[3].sum())]])   # no padding at all
        expected = reference(input_ids=one).last_hidden_state
        assert ((model(one) - expected).norm() / expected.norm()).item() <= 1e-5


def test_tied_copy_alone_loads(folder, tmp_path, reference):
    path = folder / "text_encoder_3" / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        state = {("encoder.embed_tokens.weight" if k == "shared.weight" else k): f.get_tensor(k) for k in f.keys()}
    (tmp_path / "text_encoder_3").mkdir()
    save_file(state, str(tmp_path / "text_encoder_3" / "model.safetensors"))
    (tmp_path / "text_encoder_3" / "config.json").write_text((folder / "text_encoder_3" / "config.json").read_text())
    assert torch.equal(ours(tmp_path).shared.weight, reference.shared.weight)


def test_fill_names_missing_and_unexpected(folder, tmp_path):
    path = folder / "text_encoder_3" / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    state["encoder.embed_tokens.weight"] = state["shared.weight"].clone()     # the tied copy alone is not a problem
    del state["encoder.block.1.layer.1.DenseReluDense.wi_1.weight"]
    state["encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"] = torch.zeros(32, 4)
    bad = tmp_path / "text_encoder_3"
    bad.mkdir()
    save_file(state, str(bad / "model.safetensors"))
    (bad / "config.json").write_text((folder / "text_encoder_3" / "config.json").read_text())
    with pytest.raises(LoadError, match=r"1 missing \(encoder\.block\.1\.layer\.1\.DenseReluDense\.wi_1\.weight\); "
                                        r"1 unexpected \(encoder\.block\.1\.layer\.0\.SelfAttention\.relative_"):
        ours(tmp_path)

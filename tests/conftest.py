"""Session fixtures: tiny random models written in the official Hub layout (see tests/hub.py).

    tiny_sd1, tiny_sd2, tiny_sd2v  -> hub.Reference: .folder (model folder), .unet .vae .text_encoder
                                      (reference modules, fp32 eval), .configs, .scheduler_config, .pad_id
    tiny                           -> the same, parametrised over the three tiny kinds
    clip_tokenizer_sd1 / _sd2      -> transformers' CLIPTokenizer on the real CLIP vocabulary (the oracle)

Each tiny folder holds fp32 and fp16 (``*.fp16.safetensors``) weights, CLIP keys ``text_model.``-prefixed.
Treat them as read-only: a test that needs a modified folder copies it (``shutil.copytree``) first.
"""
import pytest

from tests import hub


def _tiny(kind, tmp_path_factory):
    return hub.make(kind, tmp_path_factory.mktemp(kind), fp16=True)


@pytest.fixture(scope="session")
def tiny_sd1(tmp_path_factory):
    return _tiny("tiny-sd1", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_sd2(tmp_path_factory):
    return _tiny("tiny-sd2", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_sd2v(tmp_path_factory):
    return _tiny("tiny-sd2v", tmp_path_factory)


@pytest.fixture(params=hub.TINY_KINDS)
def tiny(request):
    return request.getfixturevalue(request.param.replace("-", "_"))


@pytest.fixture(scope="session")
def clip_tokenizer_sd1(tiny_sd1):
    return hub.reference_tokenizer(tiny_sd1.folder / "tokenizer")


@pytest.fixture(scope="session")
def clip_tokenizer_sd2(tiny_sd2):
    return hub.reference_tokenizer(tiny_sd2.folder / "tokenizer")

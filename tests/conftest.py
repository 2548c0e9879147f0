"""Session fixtures: tiny random models written in the official Hub layout (see tests/hub.py).

    tiny_sd1, tiny_sd2, tiny_sd2v  -> hub.Reference: .folder (model folder), .unet .vae .text_encoder
                                      (reference modules, fp32 eval), .configs, .scheduler_config, .pad_id
    tiny                           -> the same, parametrised over the three tiny kinds
    sd1, inv1                      -> minledits.load(tiny_sd1.folder), and its inversion of helpers.photo()
                                      (N steps, SKIP, SIZE px, seed 1); one per test module
    clip_tokenizer_sd1 / _sd2      -> transformers' CLIPTokenizer on the real CLIP vocabulary (the oracle)

Each tiny folder holds fp32 and fp16 (``*.fp16.safetensors``) weights, CLIP keys ``text_model.``-prefixed.
Treat them as read-only: a test that needs a modified folder copies it (``shutil.copytree``) first.
"""
import pytest
import torch

import minledits
from tests import hub
from tests.helpers import SIZE, SKIP, N, photo


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


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models' ops are so small that a second thread only adds synchronisation (10x slower on a busy 2-core
    machine). A module opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def sd1(tiny_sd1):
    return minledits.load(tiny_sd1.folder)


@pytest.fixture(scope="module")
def inv1(sd1):
    return minledits.invert(sd1, photo(), steps=N, skip=SKIP, size=SIZE, seed=1)

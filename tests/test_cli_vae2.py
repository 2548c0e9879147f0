"""The command line end to end on a model whose VAE downscales by 2, not 8: tiny-vae2 (tests/hub.py), the two-level
VAE of diffusers' own tiny test pipelines. 64 px pictures have 32x32 latents; every command works on them."""
import json

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from minledits.io import store
from tests import hub
from tests.helpers import photo, run

FAST = ["--steps", "4", "--skip", "1", "--size", "64", "-q"]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_vae2(tmp_path_factory):
    return hub.make("tiny-vae2", tmp_path_factory.mktemp("tiny-vae2"))


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    photo(size=(64, 80)).save(path := tmp_path_factory.mktemp("input") / "photo.png")
    return path


def test_every_command_on_a_vae_that_downscales_by_2(tiny_vae2, image, tmp_path, capsys):
    model, inv = ["--model", tiny_vae2.folder], tmp_path / "inv.safetensors"
    rc, _, err = run(capsys, "invert", image, "-o", inv, *model, *FAST, "--source-prompt", "a photo")
    assert rc == 0, err
    assert store.load(inv).xts.shape[-2:] == (32, 32)
    for name, argv in [("ledits", ["edit", inv, *model, "-e", "hat", "--target-prompt", "a cat", "--trace",
                                   tmp_path / "t"]),
                       ("leditspp", ["edit", inv, *model, "--method", "leditspp", "-e", "hat"]),
                       ("p2p", ["edit", inv, *model, "--method", "p2p", "--target-prompt", "a cat"]),
                       ("reconstruct", ["reconstruct", inv, *model]),
                       ("image", ["edit", image, *model, *FAST, "-e", "hat", "--save-inversion",
                                  tmp_path / "saved.safetensors", "--compare"])]:
        rc, _, err = run(capsys, *argv, "-o", tmp_path / f"{name}.png", "-q")
        assert rc == 0 and err == "", (name, err)
        assert Image.open(tmp_path / f"{name}.png").size == (64, 64), name
    rc, _, err = run(capsys, "edit", tmp_path / "saved.safetensors", *model, "-o", tmp_path / "again.png", "-e", "hat",
                     "-q")
    assert rc == 0, err
    pixels = [np.asarray(Image.open(tmp_path / name)) for name in ("again.png", "image.png")]
    assert np.array_equal(*pixels)
    assert load_file(tmp_path / "t.safetensors")["x"].shape[-2:] == (32, 32)
    assert Image.open(tmp_path / "image-compare.png").size == (3 * 64, 64)


def test_sweep_and_compare_on_a_vae_that_downscales_by_2(tiny_vae2, image, tmp_path, capsys):
    model = ["--model", tiny_vae2.folder]
    rc, _, err = run(capsys, "sweep", image, "-o", tmp_path / "g.png", *model, *FAST, "-e", "hat", "--vary",
                     "skip=1,2", "--clip-model", "none")
    assert rc == 0, err
    assert Image.open(tmp_path / "g.png").size == (3 * 64, 2 * 64)
    rc, _, err = run(capsys, "compare", image, "-o", tmp_path / "c.png", *model, *FAST, "--source-prompt", "a photo",
                     "--target-prompt", "a cat", "-e", "hat", "--clip-model", "none")
    assert rc == 0, err
    record = json.loads((tmp_path / "c.json").read_text())
    assert len(record["panels"]) == 6 and Image.open(tmp_path / "c.png").size == (6 * 64, 64 + 16)

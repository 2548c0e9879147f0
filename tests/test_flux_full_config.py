"""tests/bench_flux.py's full_configs is FLUX.1-dev's architecture, checked on the meta device (no memory, no values):
the reference's networks have FLUX.1-dev's parameter counts (the transformer 11.9e9, 22.17 GiB in bf16; T5-XXL's
encoder 4.76e9, 8.87 GiB; CLIP-L's text model; the VAE), and ours, built from the same configs as minledits.io.load
builds them, takes every tensor of the reference under the name load reads it by, with its shape (what the benchmark's
load.fill needs on the GPU)."""
import pytest
import torch

from minledits.io import load
from tests import bench_flux

COUNTS = {"transformer": 11_901_408_320, "text_encoder_2": 4_762_310_656, "text_encoder": 123_060_480,
          "vae": 83_819_683}


@pytest.fixture(scope="module")
def full():
    c = bench_flux.full_configs()
    with bench_flux.made_as("meta", torch.bfloat16):
        return c, {name: make() for name, make in bench_flux.makers(c).items()}


def test_parameter_counts_are_flux_1_dev(full):
    _, mods = full
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in mods.items()}
    assert counts == COUNTS
    gib = {name: round(n * torch.bfloat16.itemsize / 2**30, 2) for name, n in counts.items()}
    assert (gib["transformer"], gib["text_encoder_2"]) == (22.17, 8.87)
    transformer = mods["transformer"]
    assert (len(transformer.transformer_blocks), len(transformer.single_transformer_blocks)) == (19, 38)
    assert transformer.config.num_attention_heads * transformer.config.attention_head_dim == 3072


@pytest.mark.parametrize("name", list(COUNTS))
def test_ours_takes_every_tensor_of_the_reference(full, name):
    c, mods = full
    ours = load.build(name, c[name], name, load.FLUX_CLASSES).state_dict()
    theirs = bench_flux.getters(name, mods[name])
    assert {k: tuple(t.shape) for k, t in ours.items()} == {k: tuple(get().shape) for k, get in theirs.items()}

"""Bad input and faults through the Python API: one clear error before any UNet work, never a black picture."""
import dataclasses
import io
import json
import math

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import minledits
from minledits import Concept, InversionError, InversionFileError, MinleditsError
from minledits.cli import commands
from minledits.io import store
from minledits.io.image import to_tensor
from tests.helpers import SIZE, SKIP, N, photo


@pytest.fixture
def no_unet(sd1, monkeypatch):
    monkeypatch.setattr(sd1, "unet", lambda *a: pytest.fail("the UNet ran"))


# ------------------------------------------------------------------------------------------- images
def test_invert_takes_file_objects_and_arrays(sd1, inv1, tmp_path):
    photo().save(tmp_path / "p.png")
    kw = dict(steps=N, skip=SKIP, size=SIZE, seed=1)
    with open(tmp_path / "p.png", "rb") as f:
        from_file = minledits.invert(sd1, f, **kw)
    from_bytes = minledits.invert(sd1, io.BytesIO((tmp_path / "p.png").read_bytes()), **kw)
    from_array = minledits.invert(sd1, np.asarray(photo()), **kw)
    for inv in (from_file, from_bytes, from_array):
        assert torch.equal(inv.xts, inv1.xts) and torch.equal(inv.zs, inv1.zs)


@pytest.mark.parametrize("bad", [None, b"\x89PNG", torch.zeros(3, 64, 64), np.zeros((64, 64, 3)), 5])
def test_invert_says_what_an_image_is(sd1, no_unet, bad):
    with pytest.raises(TypeError, match="path, a binary file object, a PIL image|uint8"):
        minledits.invert(sd1, bad, steps=N, skip=SKIP, size=SIZE)


# ------------------------------------------------------------------------------------------- edit arguments
def test_edit_takes_an_inversion_or_its_path(sd1, inv1, tmp_path):
    store.save(inv1, tmp_path / "inv.safetensors")
    assert torch.equal(minledits.edit(sd1, tmp_path / "inv.safetensors", concepts="glasses"),
                       minledits.edit(sd1, inv1, concepts="glasses"))
    for bad in (None, 3, {"xts": 1}):
        with pytest.raises(TypeError, match="takes an Inversion"):
            minledits.edit(sd1, bad)


def test_a_bare_string_is_one_concept(sd1, inv1, monkeypatch):
    rows, forward = [], sd1.unet.forward
    monkeypatch.setattr(sd1.unet, "forward", lambda x, t, c: rows.append(len(x)) or forward(x, t, c))
    minledits.edit(sd1, inv1, concepts="glasses")
    assert set(rows) == {2}  # "" and "glasses", not seven one-letter concepts


def test_edit_refuses_an_inversion_of_another_model(inv1, no_unet):
    tiny = minledits.load("random-tiny")
    with pytest.raises(InversionError, match="was made with model .* invert again"):
        minledits.edit(tiny, inv1)


def test_edit_refuses_latents_of_another_shape(sd1, inv1, no_unet):
    three = dataclasses.replace(inv1, xts=inv1.xts[:, :3], zs=inv1.zs[:, :3])
    with pytest.raises(InversionError, match="3-channel latents; this model's take 4"):
        minledits.edit(sd1, three)


def test_numbers_are_checked_in_the_dtype_they_are_used_in():
    check = minledits.ledits.check_options
    assert check(7.5, ["x:scale=1e38"], 0.3, 0.6, torch.float32)  # fine in fp32 ...
    with pytest.raises(ValueError, match="scale 1e\\+38 overflows float16"):  # ... not in fp16
        check(7.5, ["x:scale=1e38"], 0.3, 0.6, torch.float16)
    with pytest.raises(ValueError, match="momentum scale 1e\\+30 overflows bfloat16|overflows float16"):
        check(7.5, [], 1e30, 0.6, torch.float16)


@pytest.mark.parametrize("options", [dict(concepts=["x:scale=1e38"]), dict(concepts=["x"], momentum_scale=1e30)])
def test_overflowing_guidance_is_an_error_not_a_black_picture(sd1, inv1, options):
    with pytest.raises(MinleditsError, match="inf or NaN at step .*guidance overflowed"):
        minledits.edit(sd1, inv1, **{"target_guidance": 7.5, **options})


def test_a_model_that_outputs_nan_is_named(sd1, inv1, monkeypatch):
    forward = sd1.unet.forward
    monkeypatch.setattr(sd1.unet, "forward", lambda x, t, c: forward(x, t, c) * math.nan)
    with pytest.raises(MinleditsError, match="UNet's output is not finite"):
        minledits.edit(sd1, inv1, concepts=["x"])
    with pytest.raises(MinleditsError, match="noise maps hold inf or NaN.*damaged weights"):
        minledits.invert(sd1, photo(), steps=N, skip=SKIP, size=SIZE)


@pytest.mark.parametrize("concept, why", [(Concept("x", warmup=7), "warmup 7 >= the 7 edit steps"),
                                          (Concept("x", warmup=2, cooldown=0), "cooldown 0 <= warmup 2"),
                                          (Concept("x", scale=0.0), "its scale is 0")])
def test_concepts_that_cannot_act_are_named(sd1, inv1, concept, why):
    with pytest.warns(UserWarning, match=f"concept 'x' never acts \\({why}\\)"):
        minledits.edit(sd1, inv1, concepts=[concept, "glasses"])


# ------------------------------------------------------------------------------------------- limits
@pytest.mark.parametrize("steps", [1000, 1001, 5000])
def test_more_steps_than_the_model_has_are_refused_before_any_work(sd1, no_unet, steps):
    with pytest.raises(ValueError, match=str(steps)):
        minledits.invert(sd1, photo(), steps=steps, skip=steps - 4, size=SIZE)


def test_a_size_that_cannot_fit_is_refused_with_the_figure(sd1, no_unet, monkeypatch):
    monkeypatch.setattr(minledits.inversion, "to_tensor", lambda *a: pytest.fail("the image was resized"))
    with pytest.raises(MinleditsError, match=r"65536x65536 px needs at least [\d.]+ GiB .* GiB of cpu"):
        minledits.invert(sd1, photo(), steps=N, skip=SKIP, size=65536)


# ------------------------------------------------------------------------------------------- inversion files
def tampered(inv, tmp_path, name="t.safetensors", tensors=None, **meta):
    """inv saved, then its metadata and tensors changed as given."""
    store.save(inv, tmp_path / name)
    with safe_open(str(tmp_path / name), "pt") as f:
        old = {k: json.loads(v) for k, v in f.metadata().items()}
        ts = {k: f.get_tensor(k) for k in f.keys()}
    save_file({**ts, **(tensors or {})}, str(tmp_path / name), {k: json.dumps(v) for k, v in {**old, **meta}.items()})
    return tmp_path / name


@pytest.mark.parametrize("change, words", [
    (dict(steps="six"), "steps must be an integer"),
    (dict(size="big"), "size must be a multiple of 64"),
    (dict(source_guidance=math.nan), "source guidance must be finite"),
    (dict(keep_aspect="yes"), "keep_aspect must be bool"),
    (dict(resolution="128x128"), "resolution '128x128' disagrees with its image"),
    (dict(size=128), "disagree with each other or with its settings"),
])
def test_tampered_metadata_is_refused(inv1, tmp_path, change, words):
    with pytest.raises(InversionFileError, match=words):
        store.load(tampered(inv1, tmp_path, **change))


def other(inv, name, change):
    """{name: inv's tensor `name` changed}"""
    t = torch.tensor(inv.timesteps) if name == "timesteps" else getattr(inv, name)
    return {name: change(t).contiguous()}


@pytest.mark.parametrize("name, change, words", [
    ("zs", lambda t: t > 0, r"its zs is \[7, 4, 8, 8\] bool, not \[7, 4, 8, 8\] float32"),
    ("xts", lambda t: t.to(torch.int32), r"its xts is \[8, 4, 8, 8\] int32, not \[8, C, h, w\] float32"),
    ("xts", lambda t: t.half(), r"its xts is \[8, 4, 8, 8\] float16, not \[8, C, h, w\] float32"),
    ("image", lambda t: t[:, :1], r"its image is \[1, 1, 64, 64\] float32, not \[1, 3, H, W\] float32"),
    ("image", lambda t: t[0], r"its image is \[3, 64, 64\] float32, not \[1, 3, H, W\] float32"),
    ("zs", lambda t: t[None], r"its zs is \[1, 7, 4, 8, 8\] float32, not \[7, 4, 8, 8\] float32"),
    ("zs", lambda t: t[:, :, :4], r"its zs is \[7, 4, 4, 8\] float32, not \[7, 4, 8, 8\]"),
    ("timesteps", lambda t: t.to(torch.int32), r"its timesteps is \[7\] int32, not \[7\] int64"),
    ("timesteps", lambda t: t.flip(0), "its timesteps are not descending"),
    ("timesteps", lambda t: t - 1000, "its timesteps are not descending whole numbers from 0"),
    ("timesteps", lambda t: t[:-1], r"its timesteps is \[6\] int64, not \[7\] int64"),
])
def test_every_tensor_of_an_inversion_file_is_checked_by_name(inv1, no_unet, tmp_path, name, change, words):
    path = tampered(inv1, tmp_path, tensors=other(inv1, name, change))
    with pytest.raises(InversionFileError, match=words) as e:
        minledits.edit(minledits.load(inv1.model_id), path, concepts="glasses")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("tensors, meta, words", [
    ({"extra": torch.zeros(1)}, {}, "a tensor 'extra' that the format does not have"),
    ({}, {"dtype": "int8"}, "dtype 'int8' is not one of float32, float16, bfloat16"),
    ({}, {"dtype": ["float32"]}, "dtype .* is not one of"),
])
def test_an_inversion_file_holds_the_format_s_tensors_only(inv1, tmp_path, tensors, meta, words):
    with pytest.raises(InversionFileError, match=words):
        store.load(tampered(inv1, tmp_path, tensors=tensors, **meta))


def test_nan_in_an_inversion_file_is_refused(inv1, tmp_path):
    zs = inv1.zs.clone()
    zs[1, 0, 0, 0] = math.nan
    with pytest.raises(InversionFileError, match="zs hold inf or NaN"):
        store.load(tampered(inv1, tmp_path, tensors={"zs": zs}))
    three = {"xts": inv1.xts[:, :3].contiguous(), "zs": inv1.zs[:, :3].contiguous()}
    inv = store.load(tampered(inv1, tmp_path, "three.safetensors", tensors=three))  # consistent, but 3 channels:
    with pytest.raises(InversionError, match="3-channel"):                        # refused by the model
        commands.check_made_with(inv, minledits.load(inv1.model_id))


def test_in_memory_inversions_are_checked_too(sd1, inv1, no_unet):
    bad = dataclasses.replace(inv1, zs=inv1.zs * math.inf)
    with pytest.raises(InversionError, match="zs hold inf or NaN"):
        minledits.edit(sd1, bad)
    assert to_tensor(photo(), SIZE).shape == inv1.image.shape

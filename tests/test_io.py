"""Files in and out (io/, tools/trace.py): inversion files of another version, inputs that are not regular files,
the traces of every method, and a VAE that does not downscale by 8."""
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

import minledits
from minledits import Concept, ledits, p2p
from minledits.cli import commands
from minledits.errors import InversionFileError
from minledits.io import store
from minledits.nets.vae import VAE
from minledits.tools.trace import AttentionTrace, Trace
from tests.helpers import SIZE, SKIP, N, photo

pytestmark = pytest.mark.usefixtures("one_thread")


def rewritten(path, out, **metadata):
    """A copy of a safetensors file with some metadata values replaced (given as JSON text)."""
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(out), {**meta, **metadata})
    return out


@pytest.mark.parametrize("version", ["1", "3", '"2"'])
def test_an_inversion_file_of_another_version_is_refused_in_one_line(inv1, tmp_path, version):
    store.save(inv1, tmp_path / "inv.safetensors")
    other = rewritten(tmp_path / "inv.safetensors", tmp_path / "other.safetensors", version=version)
    with pytest.raises(InversionFileError, match="made by another minledits version .*: invert again") as e:
        store.load(other)
    assert "\n" not in str(e.value)
    assert store.load(tmp_path / "inv.safetensors").settings == inv1.settings


def test_quoted_file_values_and_settings_are_shortened(inv1, tmp_path):
    """A long value in an inversion file's metadata, or a long prompt given against it: the message stays short."""
    store.save(inv1, tmp_path / "inv.safetensors")
    other = rewritten(tmp_path / "inv.safetensors", tmp_path / "other.safetensors", sampler=json.dumps("x" * 10000))
    with pytest.raises(InversionFileError, match="sampler 'x+'…, which this minledits does not have") as e:
        store.load(other)
    assert len(str(e.value)) < 300
    with pytest.raises(InversionFileError, match="not 'y+'…: leave the option out") as e:
        commands.check_made_with(inv1, source_prompt="y" * 10000, skip=inv1.settings.skip)
    assert len(str(e.value)) < 300 and f"skip={inv1.settings.skip}" not in str(e.value)


FIFO_CHECKS = """
import sys
from pathlib import Path
import minledits
from minledits.io import convert, image, store
from minledits.tools import metrics
fifo = Path(sys.argv[1])
print("is_inversion", store.is_inversion(fifo), flush=True)
for name, call in [("open_rgb", lambda: image.open_rgb(fifo)), ("store.load", lambda: store.load(fifo)),
                   ("metrics.psnr", lambda: metrics.psnr(fifo, fifo)), ("load", lambda: minledits.load(fifo)),
                   ("read_single_file", lambda: convert.read_single_file(fifo))]:
    try:
        call()
        print(name, "opened it", flush=True)
    except Exception as e:
        print(name, type(e).__name__, str(e), flush=True)
"""


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes on this system")
def test_a_named_pipe_is_refused_before_anything_opens_it(tmp_path):
    """Opening a named pipe for reading blocks until a writer comes: each reader refuses it (is_inversion says
    False) in one line without opening it. In a child process with a time limit, so that a regression fails."""
    fifo = tmp_path / "in.safetensors"
    os.mkfifo(fifo)
    try:
        done = subprocess.run([sys.executable, "-c", FIFO_CHECKS, str(fifo)], capture_output=True, text=True,
                              timeout=120)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"a reader opened the named pipe and waited for a writer; it had said: {e.stdout}")
    lines = done.stdout.splitlines()
    assert done.returncode == 0 and lines[0] == "is_inversion False", done.stdout + done.stderr
    assert [line.split()[:2] for line in lines[1:]] == [
        ["open_rgb", "MinleditsError"], ["store.load", "InversionFileError"], ["metrics.psnr", "MinleditsError"],
        ["load", "SingleFileError"], ["read_single_file", "SingleFileError"]], done.stdout
    assert all(f"{fifo} is a named pipe: give a regular file" in line for line in lines[1:]), done.stdout


def test_every_trace_keeps_the_same_tensors_and_names_its_axis(sd1, tmp_path):
    """LEDITS' Trace and Prompt-to-Prompt's AttentionTrace are one recorder: per step x0_hat, mu, t and every
    tensor of the method's EditStep (x_prev as x); the file names its per-concept axis (concepts or words)."""
    inv = minledits.invert(sd1, photo(), steps=N, skip=SKIP, size=SIZE, seed=1, source_prompt="a cat sitting on a mat")
    target = "a dog sitting on a mat"
    words = p2p.word_positions(sd1.tokenizer, target)
    traces = {"ledits": Trace(sd1, inv), "p2p": AttentionTrace(sd1, inv, words)}
    ledits.edit(sd1, inv, concepts=[Concept("glasses")], callback=traces["ledits"])
    p2p.edit(sd1, inv, target, reweight="dog=2", callback=traces["p2p"])
    for method, trace in traces.items():
        trace.save(tmp_path / f"{method}.safetensors", tmp_path / f"{method}.png", concepts=["glasses"])
        with safe_open(str(tmp_path / f"{method}.safetensors"), "pt") as f:
            keys, meta = set(f.keys()), f.metadata()
        assert {"x0_hat", "mu", "t", "x", "eps_u", "eps_c", "eps"} <= keys and "x_t" not in keys, (method, keys)
        labels = {"ledits": {"concepts": ["glasses"]}, "p2p": {"words": [w for w, _ in words]}}[method]
        assert {k: json.loads(v) for k, v in meta.items()} == labels
        rows = 1 + (len(words) if method == "p2p" else 1)   # x0, then one map per word (P2P) or the mask (LEDITS)
        assert Image.open(tmp_path / f"{method}.png").size == ((N - SKIP) * 66, rows * 66)


def test_the_trace_pictures_a_vae_that_downscales_by_2(sd1):
    """A two-level VAE (diffusers' tiny test pipelines have one): latents half the picture's size; the trace's
    latent -> RGB map is fitted at the latent's size, and its tiles are that size."""
    config = dict(sd1.vae.config, block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D"] * 2,
                  up_block_types=["UpDecoderBlock2D"] * 2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = VAE(config).eval().requires_grad_(False)
    old, sd1.vae = sd1.vae, vae
    try:
        assert sd1.latent_scale == 2
        inv = minledits.invert(sd1, photo(), steps=N, skip=SKIP, size=SIZE, seed=1)
        assert inv.w0.shape[-2:] == (SIZE // 2, SIZE // 2)
        trace = Trace(sd1, inv)
        ledits.edit(sd1, inv, concepts=[Concept("glasses")], callback=trace)
        picture = trace.picture()
    finally:
        sd1.vae = old
    assert picture.size == ((N - SKIP) * 66, 2 * 66)   # 32 px tiles shown at 64, framed

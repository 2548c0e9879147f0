"""The command line end to end, on a tiny model in the official Hub layout (fixture tiny_sd1) and on random-tiny.

main([...]) runs in-process; one test runs the installed `minledits` console script in a subprocess.
Small pictures and few steps: 64 px, 6 steps, skip 2.
"""
import filecmp
import json
import os
import re
import shutil
import subprocess
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from minledits import cli
from minledits.cli import commands as cli_commands
from minledits.io import store
from minledits.io.image import to_pil
from tests.helpers import console_script, run

FAST = ["--steps", "6", "--skip", "2", "--size", "64", "-q"]
TINY = ["--model", "random-tiny", *FAST]


pytestmark = pytest.mark.usefixtures("one_thread")


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    """An 80x96 JPEG with some structure (a gradient and a square)."""
    y, x = np.mgrid[0:96, 0:80]
    a = np.stack([x * 3, y * 2, (x + y) % 256], -1).astype(np.uint8)
    a[30:60, 20:50] = [200, 40, 40]
    path = tmp_path_factory.mktemp("photo") / "photo.jpg"
    Image.fromarray(a).save(path, quality=95)
    return path


@pytest.fixture(scope="module")
def flow(tiny_sd1, photo, tmp_path_factory):
    """invert -> edit (from the inversion, with --trace and --compare) -> reconstruct, on the tiny SD1 folder."""
    d, model = tmp_path_factory.mktemp("flow"), ["--model", tiny_sd1.folder]
    concepts = ["-e", "glasses", "-e", "-beard", "-e", "smile:scale=5,threshold=0.9,warmup=1,cooldown=3,weight=2"]
    assert cli.main(map(str, ["invert", photo, "-o", d / "inv.safetensors", *model, *FAST, "--seed", 3])) == 0
    assert cli.main(map(str, ["edit", d / "inv.safetensors", *model, "-o", d / "edit.png", *concepts,
                              "--target-prompt", "a man", "--trace", d / "trace", "--compare", "-q"])) == 0
    assert cli.main(map(str, ["reconstruct", d / "inv.safetensors", *model, "-o", d / "rec.png", "-q"])) == 0
    return types.SimpleNamespace(dir=d, model=model, concepts=concepts)


def test_inversion_file(flow, tiny_sd1):
    inv = store.load(flow.dir / "inv.safetensors")
    s = inv.settings
    with safe_open(str(flow.dir / "inv.safetensors"), "pt") as f:
        meta = {k: json.loads(v) for k, v in f.metadata().items()}
    assert (s.steps, s.skip, s.seed, s.size, meta["resolution"], meta["dtype"]) == (6, 2, 3, 64, "64x64", "float32")
    assert inv.model_id == meta["model_id"] == str(tiny_sd1.folder) and inv.fingerprint.startswith("sha256-")
    assert meta["version"] == store.VERSION == 2 and meta["steps"] == 6
    assert inv.xts.shape == (5, 4, 8, 8) and inv.zs.shape == (4, 4, 8, 8) and len(inv.timesteps) == 4
    assert inv.image.shape == (1, 3, 64, 64) and torch.all(inv.zs[-1] == 0)  # the reference zeroes the last map


def test_png_carries_the_parameters(flow):
    text = Image.open(flow.dir / "edit.png").text
    p = json.loads(text["minledits"])
    assert p["command"] == "edit" and p["steps"] == 6 and p["skip"] == 2 and p["seed"] == 3
    assert p["target_prompt"] == "a man" and p["target_guidance"] == 15.0 and p["momentum_beta"] == 0.6
    assert p["concepts"] == ["glasses:scale=7.0,threshold=0.95,warmup=2,weight=1.0",
                             "-beard:scale=7.0,threshold=0.95,warmup=2,weight=1.0",
                             "smile:scale=5.0,threshold=0.9,warmup=1,cooldown=3,weight=2.0"]
    assert text["parameters"].startswith("minledits edit ") and "--concept=-beard:" in text["parameters"]
    assert json.loads(Image.open(flow.dir / "rec.png").text["minledits"])["command"] == "reconstruct"


def test_the_png_command_reproduces_the_edit(flow, capsys):
    """The `parameters` chunk is a command line: run it (plus -o) and get the same pixels."""
    import shlex
    argv = shlex.split(Image.open(flow.dir / "edit.png").text["parameters"])[1:]
    assert run(capsys, *argv, "-o", flow.dir / "again.png", "-q")[0] == 0
    assert np.array_equal(pixels(flow.dir / "again.png"), pixels(flow.dir / "edit.png"))


def test_edit_from_the_image_equals_edit_from_the_inversion(flow, photo, capsys):
    out = flow.dir / "from-image.png"
    rc, stdout, _ = run(capsys, "edit", photo, "-o", out, *flow.model, *FAST, "--seed", 3, *flow.concepts,
                        "--target-prompt", "a man", "--save-inversion", flow.dir / "inv2.safetensors")
    assert rc == 0 and str(out) in stdout and " s" in stdout and len(stdout.splitlines()) == 1
    assert np.array_equal(pixels(out), pixels(flow.dir / "edit.png"))
    a, b = store.load(flow.dir / "inv.safetensors"), store.load(flow.dir / "inv2.safetensors")
    assert torch.equal(a.xts, b.xts) and torch.equal(a.zs, b.zs)


def test_same_seed_gives_identical_files(flow, photo, capsys):
    outs = [flow.dir / f"seed-{i}.png" for i in range(3)]
    for out, seed in zip(outs, [4, 4, 5]):
        assert run(capsys, "edit", photo, "-o", out, *flow.model, *FAST, "--seed", seed, "-e", "hat")[0] == 0
    assert filecmp.cmp(outs[0], outs[1], shallow=False)
    assert not np.array_equal(pixels(outs[0]), pixels(outs[2]))


def test_compare_is_input_reconstruction_edit(flow):
    compare = pixels(flow.dir / "edit-compare.png")
    assert compare.shape == (64, 192, 3)
    assert np.array_equal(compare[:, 64:128], pixels(flow.dir / "rec.png"))
    assert np.array_equal(compare[:, 128:], pixels(flow.dir / "edit.png"))
    inv = store.load(flow.dir / "inv.safetensors")
    assert np.array_equal(compare[:, :64], np.asarray(to_pil(inv.image)[0]))


def test_trace(flow):
    from safetensors.torch import load_file
    t = load_file(flow.dir / "trace.safetensors")
    S, C = 4, 3
    assert t["acts"].shape == (S, C, 1, 4, 8, 8) and t["acts"].dtype == torch.bool
    assert t["x0_hat"].shape == t["x"].shape == (S, 1, 4, 8, 8) and t["eps_c"].shape == (S, C, 1, 4, 8, 8)
    assert t["t"].tolist() == store.load(flow.dir / "inv.safetensors").timesteps
    # thresholds 0.95 / 0.95 / 0.9 keep about 5% / 5% / 10% of each channel; "smile" stops at step 3 (cooldown)
    kept = t["acts"][:3].float().mean(dim=(0, 2, 3, 4, 5))
    assert 0 < kept[0] <= 0.1 and 0.05 < kept[2] <= 0.2 and not t["acts"][3, 2].any()
    picture = Image.open(flow.dir / "trace.png")  # 4 steps in a row, x0 + 3 masks per step, 8 px tiles shown at 64
    assert picture.size == (4 * 66, (1 + C) * 66)


def test_batch_resumes(tiny_sd1, photo, tmp_path, capsys, monkeypatch):
    inverted, invert = [], cli_commands.invert
    monkeypatch.setattr(cli_commands, "invert", lambda *a, **k: inverted.append(1) or invert(*a, **k))
    shutil.copy(photo, tmp_path / "a.jpg")
    jobs = {"defaults": {"model": str(tiny_sd1.folder), "steps": 6, "skip": 2, "size": 64},
            "jobs": [{"input": "a.jpg", "output": "glasses.png", "concepts": ["glasses"]},
                     {"input": "a.jpg", "concepts": ["-beard", "hat:scale=3"], "target_prompt": "a man"},
                     {"input": "b.jpg", "output": "sub/b.png", "keep_aspect": True}]}
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    rc, out, err = run(capsys, "batch", tmp_path / "jobs.json", "--outdir", tmp_path / "out", "-q")
    assert rc == 1 and "2 done, 0 skipped (output exists), 1 failed (job 2)" in out
    assert err.startswith("minledits: job 2 (b.jpg) failed: the input") and "b.jpg does not exist" in err
    assert len(inverted) == 1  # two edits of one inversion: inverted once
    done = {p: p.stat().st_mtime_ns for p in [tmp_path / "out" / "glasses.png", tmp_path / "out" / "001-a.png"]}
    shutil.copy(photo, tmp_path / "b.jpg")
    rc, out, err = run(capsys, "batch", tmp_path / "jobs.json", "--outdir", tmp_path / "out", "-q")
    assert rc == 0 and "1 done, 2 skipped (output exists), 0 failed" in out and not err
    assert all(p.stat().st_mtime_ns == t for p, t in done.items())
    assert Image.open(tmp_path / "out" / "sub" / "b.png").size == (64, 64)  # keep_aspect: 80x96 -> 64x64 at size 64
    text = json.loads(Image.open(tmp_path / "out" / "001-a.png").text["minledits"])
    assert text["concepts"][1].startswith("hat:scale=3.0")


def test_an_unknown_option_is_the_command_s_error_with_its_nearest_option(capsys):
    rc, out, err = run(capsys, "edit", "p.png", "-o", "x.png", "--stepz", "3", "--mask-image=m.png")
    assert rc == 2 and out == "" and err == ("minledits edit: error: unrecognized arguments: --stepz 3 "
                                             "--mask-image=m.png; did you mean --steps and --mask? (usage: minledits "
                                             "edit --help)\n")
    rc, out, err = run(capsys, "invert", "p.png", "-o", "i.safetensors", "--zzz", "extra")
    assert rc == 2 and err == ("minledits invert: error: unrecognized arguments: --zzz extra (usage: minledits invert "
                               "--help)\n")


def test_batch_bad_job_is_reported_and_others_run(tmp_path, photo, capsys):
    jobs = [{"input": str(photo), "output": "ok.png"}, {"input": str(photo), "output": "bad.png", "stepz": 3},
            {"output": "no-input.png"}]
    (tmp_path / "jobs.json").write_text(json.dumps({"defaults": {"model": "random-tiny", "steps": 4, "skip": 1,
                                                                 "size": 64}, "jobs": jobs}))
    rc, out, err = run(capsys, "batch", tmp_path / "jobs.json", "--outdir", tmp_path, "-q")
    assert rc == 1 and "1 done, 0 skipped (output exists), 2 failed" in out
    assert f"job 1 ({photo}) failed: unrecognized arguments: --stepz=3; did you mean --steps?" in err
    assert 'job 2 failed: a job is an object with at least an "input"' in err
    assert (tmp_path / "ok.png").exists() and not (tmp_path / "bad.png").exists()


def test_random_tiny_every_command(photo, tmp_path, capsys):
    rc, out, err = run(capsys, "download", "--model", "random-tiny")
    assert rc == 0 and "nothing to download" in out
    rc, out, err = run(capsys, "invert", photo, "-o", tmp_path / "inv.safetensors", "--model", "random-tiny",
                       "--steps", "6", "--skip", "2", "--size", "64")
    assert rc == 0 and "noise" in err and "noise" in out  # the note, and the summary line
    for argv in [["edit", tmp_path / "inv.safetensors", "-o", tmp_path / "e.png", "-e", "cat", "-q"],
                 ["edit", photo, "-o", tmp_path / "f.png", *TINY, "-e", "-dog", "--trace", tmp_path / "t.safetensors",
                  "--compare", "--keep-aspect", "--keep-last-noise", "--batch-size", "3"],
                 ["reconstruct", tmp_path / "inv.safetensors", "-o", tmp_path / "r.png", "-q"],
                 ["reconstruct", photo, "-o", tmp_path / "r2.png", *TINY]]:
        assert run(capsys, *argv)[0] == 0, argv
    (tmp_path / "jobs.json").write_text(json.dumps([{"input": "inv.safetensors", "concepts": ["sky"]}]))
    rc = run(capsys, "batch", tmp_path / "jobs.json", "--outdir", tmp_path / "b", "--model", "random-tiny", "-q")[0]
    assert rc == 0
    assert {p.name for p in tmp_path.glob("**/*.png")} == {"e.png", "f.png", "f-compare.png", "t.png", "r.png",
                                                           "r2.png", "000-inv.png"}
    assert np.isfinite(pixels(tmp_path / "e.png")).all()


def test_help_documents_the_concept_syntax_and_defaults(capsys):
    rc, out, _ = run(capsys, "edit", "--help")
    assert rc == 0
    for text in ["-e -beard", "scale=7", "threshold=0.95", "warmup=2", "cooldown=none", "weight=1",
                 "(default: 100)", "36 of 100", "(default: 3.5)", "(default: 15.0)", "(default: 0.3)",
                 "(default: 0.6)", "the model's, 512", "--trace", "--compare", "--save-inversion", "random-tiny"]:
        assert text in " ".join(out.split()), text
    assert run(capsys, "--help")[0] == 0


@pytest.mark.parametrize("command", sorted(cli.HANDLERS))
def test_no_help_text_shows_code(command, capsys):
    """An f-string written without its f shows its braces: '{NAME[...]}' or '{x:g}' in a help text."""
    rc, out, _ = run(capsys, command, "--help")
    assert rc == 0 and not re.search(r"\{[A-Za-z_][\w.]*(\[[^\]]*\])*(:[^}]*)?\}", out), out


# --------------------------------------------------------------------------------------------- errors
def _truncated_png(d: Path) -> Path:
    Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 90).save(d / "full.png")
    data = (d / "full.png").read_bytes()
    (d / "truncated.png").write_bytes(data[: len(data) // 2])
    return d / "truncated.png"


def _foreign(d: Path) -> Path:
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(3)}, str(d / "foreign.safetensors"))
    return d / "foreign.safetensors"


def existing(path):
    """path, after writing a file there."""
    path.write_bytes(b"x")
    return path


ERRORS = {  # name: (argv builder (d, photo, inv, model) -> argv, words the message must contain)
    "truncated image": (lambda d, p, i, m: ["edit", _truncated_png(d), *m], ["cannot read image", "truncated"]),
    "not an image": (lambda d, p, i, m: ["invert", (d / "x.jpg", (d / "x.jpg").write_text("hi"))[0], *m],
                     ["cannot read image", "x.jpg"]),
    "missing image": (lambda d, p, i, m: ["edit", d / "nope.jpg", *m], ["nope.jpg", "does not exist"]),
    "missing model": (lambda d, p, i, m: ["edit", p, "--model", d / "no-model"], ["no-model", "does not exist"]),
    "model folder without unet": (lambda d, p, i, m: ["edit", p, "--model", d], ["unet"]),
    "bad concept syntax": (lambda d, p, i, m: ["edit", i, *m, "-e", "smile:scale"],
                           ["bad concept option", "smile:scale"]),
    "bad concept value": (lambda d, p, i, m: ["edit", i, *m, "-e", "smile:warmup=soon"], ["warmup", "soon"]),
    "concept threshold out of range": (lambda d, p, i, m: ["edit", i, *m, "-e", "a:threshold=1.5"], ["threshold"]),
    "skip out of range": (lambda d, p, i, m: ["edit", p, *m, "--steps", "6", "--skip", "6"], ["skip"]),
    "size not a multiple of 64": (lambda d, p, i, m: ["invert", p, *m, "--size", "100"], ["size", "64"]),
    "momentum beta out of range": (lambda d, p, i, m: ["edit", i, *m, "--momentum-beta", "2"], ["momentum"]),
    "concepts without guidance": (lambda d, p, i, m: ["edit", i, *m, "-e", "a", "--target-guidance", "1"],
                                  ["target-guidance"]),
    "output folder a file": (lambda d, p, i, m: ["edit", i, *m, "-o", p / "out.png"], ["photo.jpg is not a folder"]),
    "output exists": (lambda d, p, i, m: ["reconstruct", i, *m, "-o", existing(d / "old.png")], ["exists", "--force"]),
    "inversion of a model not named": (lambda d, p, i, m: ["edit", i, "-e", "glasses"],
                                       ["was made with model", "loads only a model you name: add --model"]),
    "inversion of another model": (lambda d, p, i, m: ["edit", i, "--model", "random-tiny"],
                                   ["was made with model", "random-tiny"]),
    "inversion at another resolution": (lambda d, p, i, m: ["edit", i, *m, "--size", "128"], ["size=64", "not 128"]),
    "corrupt inversion file": (lambda d, p, i, m: ["edit", (d / "c.safetensors", (d / "c.safetensors")
                                                            .write_bytes(i.read_bytes()[:300]))[0]],
                               ["not a readable inversion file"]),
    "foreign safetensors": (lambda d, p, i, m: ["reconstruct", _foreign(d)], ["not a minledits inversion"]),
    "no such device": (lambda d, p, i, m: ["edit", i, *m, "--device", "mps"] if not torch.backends.mps.is_available()
                       else ["edit", i, *m, "--device", "cuda"], ["no such device"]),
}


@pytest.mark.parametrize("case", ERRORS)
def test_errors_are_one_line(case, flow, photo, tmp_path, capsys):
    make, words = ERRORS[case]
    argv = [str(a) for a in make(tmp_path, photo, flow.dir / "inv.safetensors", flow.model)]
    out = tmp_path / ("out.safetensors" if argv[0] == "invert" else "out.png")
    if "-o" not in argv:
        argv += ["-o", str(out)]
    before = set(tmp_path.iterdir()) | set(photo.parent.iterdir())
    rc, stdout, err = run(capsys, *argv, "-q")
    assert rc == 1, (rc, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("minledits: error: "), err
    assert all(w in lines[0] for w in words), lines[0]
    assert set(tmp_path.iterdir()) | set(photo.parent.iterdir()) == before  # nothing written, no temp files
    assert not stdout


def test_verbose_shows_the_traceback(photo, tmp_path, capsys):
    rc, _, err = run(capsys, "edit", photo, "-o", tmp_path / "o.png", *TINY, "-e", "x:scale=", "-v")
    assert rc == 1 and "Traceback" in err and err.strip().splitlines()[-1].startswith("minledits: error: bad value")


def test_usage_errors_exit_2(capsys, photo):
    for argv in [["edit", photo, "-o", "x.png", "--steps", "many"], ["edit", photo], ["frobnicate"],
                 ["edit", photo, "-o", "x.png", "--dtype", "fp8"]]:
        rc, _, err = run(capsys, *argv)
        assert rc == 2 and "usage:" in err, argv
    assert not Path("x.png").exists()


def test_gated_repo_hints_at_hf_token(photo, tmp_path, capsys, monkeypatch):
    import huggingface_hub
    from huggingface_hub.utils import GatedRepoError

    def gated(*a, **k):
        raise GatedRepoError("403", response=types.SimpleNamespace(headers={}, request=None))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", gated)
    monkeypatch.chdir(tmp_path)  # no weights/ folder here
    for argv in [["edit", photo, "-o", tmp_path / "o.png", "--model", "someone/gated-model"],
                 ["download", "--model", "someone/gated-model"]]:
        rc, _, err = run(capsys, *argv, "-q")
        assert rc == 1 and len(err.strip().splitlines()) == 1 and "gated" in err and "HF_TOKEN" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(console_script() is None, reason="the minledits console script is not installed (pip install .)")
def test_console_script(photo, tmp_path):
    """The installed `minledits` command, as a user runs it: one edit, then one offline failure."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), MINLEDITS_WEIGHTS=str(tmp_path))
    cmd = [console_script(), "edit", str(photo), "-o", str(tmp_path / "o.png"), *TINY, "-e", "-beard"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "o.png" in done.stdout and json.loads(Image.open(tmp_path / "o.png").text["minledits"])["concepts"]
    cmd[cmd.index("random-tiny")] = "nobody/not-cached"
    done = subprocess.run(cmd[:-2] + ["-o", str(tmp_path / "p.png")], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "not in the Hugging Face cache" in done.stderr and "HF_HUB_OFFLINE" in done.stderr
    assert not (tmp_path / "p.png").exists()


def test_inversion_file_checks(flow, tmp_path):
    """A newer format version and tensors that disagree with the settings are refused with one line."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(flow.dir / "inv.safetensors"), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    for name, change, words in [("newer", lambda m, t: m.update(version="3"), "format version 3"),
                                ("short", lambda m, t: t.update(zs=t["zs"][:-1]), "damaged"),
                                ("no xts", lambda m, t: t.pop("xts"), "missing 'xts'")]:
        m, t = dict(meta), dict(tensors)
        change(m, t)
        save_file(t, str(tmp_path / f"{name}.safetensors"), m)
        with pytest.raises(store.InversionFileError, match=words):
            store.load(tmp_path / f"{name}.safetensors")


def test_leditspp_from_the_command_line(photo, tmp_path, capsys):
    """--sampler dpmsolver++ then --method leditspp: the PNG equals the Python API's edit, its parameters line
    reproduces it, and what LEDITS++ does not take is refused before any work."""
    import shlex

    import minledits
    from minledits import leditspp
    inv = tmp_path / "inv.safetensors"
    assert run(capsys, "invert", photo, "-o", inv, *TINY, "--sampler", "dpmsolver++")[0] == 0
    rc, _, err = run(capsys, "edit", inv, "-o", tmp_path / "a.png", "--method", "leditspp", "-e", "glasses",
                     "-e", "-beard:threshold=0.8", "--mask", "cross_attention", "-q")
    assert rc == 0, err
    sd = minledits.load("random-tiny")
    w0 = leditspp.edit(sd, store.load(inv), concepts=["glasses", "-beard:threshold=0.8"], mask="cross_attention")
    assert np.array_equal(pixels(tmp_path / "a.png"), np.asarray(minledits.decode(sd, w0)))
    argv = shlex.split(Image.open(tmp_path / "a.png").text["parameters"])[1:]
    assert "--method=leditspp" in argv and "--concept=glasses:scale=5.0,threshold=0.9,warmup=0,weight=1.0" in argv
    assert run(capsys, *argv, "-o", tmp_path / "b.png", "-q")[0] == 0
    assert np.array_equal(pixels(tmp_path / "a.png"), pixels(tmp_path / "b.png"))
    for extra, words in [(["-e", "x:weight=2"], "no concept weights"),
                         (["-e", "x", "--guidance-rescale", "2"], "guidance_rescale must be in [0, 1]")]:
        rc, _, err = run(capsys, "edit", inv, "-o", tmp_path / "c.png", "--method", "leditspp", *extra, "-q")
        assert rc == 1 and words in err and not (tmp_path / "c.png").exists(), err


def test_leditspp_user_mask_and_trace(photo, tmp_path, capsys, monkeypatch):
    """--user-mask (a picture of the input's size) is the API's leditspp.user_mask; --trace keeps every LEDITS++
    tensor and draws per step the x0 prediction and, per concept, its attention map, noise mask and mask."""
    import minledits
    from minledits import leditspp
    y, x = np.mgrid[0:96, 0:80]
    Image.fromarray(np.where(x < 40, 255, 0).astype(np.uint8)).save(tmp_path / "m.png")  # left half: edit
    concepts = ["glasses", "-beard:threshold=0.8"]
    rc, _, err = run(capsys, "edit", photo, "-o", tmp_path / "a.png", *TINY, "--sampler", "dpmsolver++",
                     "--method", "leditspp", "-e", concepts[0], "-e", concepts[1], "--user-mask", tmp_path / "m.png",
                     "--trace", tmp_path / "t")
    assert rc == 0, err
    sd = minledits.load("random-tiny")
    inv = minledits.invert(sd, photo, steps=6, skip=2, size=64, sampler="dpmsolver++")
    u = leditspp.user_mask(tmp_path / "m.png", inv)
    assert u.shape == (8, 8) and u[:, :3].eq(1).all() and u[:, 5:].eq(0).all()
    w0 = leditspp.edit(sd, inv, concepts=concepts, user_mask=u)
    assert np.array_equal(pixels(tmp_path / "a.png"), np.asarray(minledits.decode(sd, w0)))
    assert not np.array_equal(pixels(tmp_path / "a.png"),
                              np.asarray(minledits.decode(sd, leditspp.edit(sd, inv, concepts=concepts))))
    from safetensors.torch import load_file
    t, S, C = load_file(tmp_path / "t.safetensors"), 4, 2
    assert t["M"].shape == t["m_noise"].shape == t["g"].shape == (S, C, 1, 4, 8, 8)
    assert t["attn"].shape[:2] == (S, C) and t["on"].shape == (S, C) and t["x"].shape == (S, 1, 4, 8, 8)
    assert not t["g"][..., 5:].any()  # the user mask zeroes the guidance on the right
    assert Image.open(tmp_path / "t.png").size == (S * 66, (1 + 3 * C) * 66)
    monkeypatch.setattr(cli_commands, "invert", lambda *a, **k: pytest.fail("inverted before refusing"))
    Image.new("L", (64, 64)).save(tmp_path / "small.png")
    for extra, words in [(["--user-mask", tmp_path / "small.png"], "is 64x64 px, the input 80x96"),
                         (["--user-mask", tmp_path / "nope.png"], "nope.png does not exist"),
                         (["--method", "ledits", "--user-mask", tmp_path / "m.png"], "ledits takes no --user-mask")]:
        rc, _, err = run(capsys, "edit", photo, "-o", tmp_path / "c.png", *TINY, "--method", "leditspp", "-e", "x",
                         *extra)
        assert rc == 1 and words in err and err.count("\n") == 1 and not (tmp_path / "c.png").exists(), err

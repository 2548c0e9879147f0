"""What a new user types, taken as typed: --steps without --skip keeps each method's share of the steps, random-tiny's
defaults make a first try quick, 10,000 characters of text give a short message, a named pipe is refused instead of
read for ever, and a command adds nothing to the arguments it is given (what it needs it is passed)."""
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import minledits
from minledits import cli
from minledits.cli import commands
from minledits.cli.options import COMMON, EDIT, INVERT, dest, parser
from tests.helpers import photo, run

TINY = ["--model", "random-tiny", "-q"]
LONG = "cat " * 2500  # 10,000 characters
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    photo(size=(80, 64)).save(path := tmp_path_factory.mktemp("input") / "photo.png")
    return path


def parameters(path) -> str:
    return Image.open(path).text["parameters"]


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


# --------------------------------------------------------------------------------------------- --steps, --skip
@pytest.mark.parametrize("method, extra, skip", [
    ("ledits", ["-e", "hat"], 4),                                               # 36 of 100: round(3.6)
    ("p2p", ["--source-prompt", "a photo", "--target-prompt", "a cat"], 1),     # 12 of 100: round(1.2)
    ("leditspp", ["--sampler", "dpmsolver++", "-e", "hat"], 1),                 # diffusers' 0.15: int(9 * 1.15) = 10
])
def test_steps_without_skip_keep_the_methods_share(image, tmp_path, capsys, method, extra, skip):
    rc, _, err = run(capsys, "edit", image, "-o", tmp_path / "a.png", *TINY, "--steps", "10", "--method", method,
                     *extra)
    assert rc == 0, err
    assert f" --steps=10 --skip={skip} " in parameters(tmp_path / "a.png")
    rc, _, err = run(capsys, "edit", image, "-o", tmp_path / "b.png", *TINY, "--steps", "10", "--skip", "3",
                     "--method", method, *extra)
    assert rc == 0 and " --steps=10 --skip=3 " in parameters(tmp_path / "b.png"), err


def test_steps_without_skip_in_invert_sweep_and_help(image, tmp_path, capsys):
    rc, out, err = run(capsys, "invert", image, "-o", tmp_path / "i.safetensors", *TINY, "--steps", "10")
    assert rc == 0 and "(6 steps)" in out, err
    rc, _, err = run(capsys, "sweep", image, "-o", tmp_path / "g.png", *TINY, "--vary", "steps=5,20", "--clip-model",
                     "none")
    assert rc == 0, err
    cells = json.loads((tmp_path / "g.json").read_text())["cells"]
    assert [tuple(c["settings"][k] for k in ("steps", "skip", "size")) for c in cells] == [(5, 2, 64), (20, 7, 64)]
    help_text = " ".join(run(capsys, "edit", "--help")[1].split())
    assert "the method's share of N: 36 of 100; --method p2p: 12 of 100; --sampler dpmsolver++: 13 of 100" in help_text


# --------------------------------------------------------------------------------------------- the parameters line
def rerun_parameters(capsys, png: Path, out: Path) -> list:
    """The PNG's `parameters` line run again, to `out`: its argv."""
    argv = shlex.split(parameters(png))
    assert argv[0] == "minledits"
    rc, _, err = run(capsys, *argv[1:], "-o", out, "-q")
    assert rc == 0, err
    return argv


def test_the_parameters_line_carries_the_batch_size(image, tmp_path, capsys):
    """--batch-size changes pixels (the inversion's UNet calls group timesteps): the line that remakes the file
    names it; from an inversion file it changes nothing and is left out."""
    rc, _, err = run(capsys, "edit", image, "-o", tmp_path / "a.png", *TINY, "--steps", "6", "--batch-size", "1",
                     "-e", "hat", "--save-inversion", tmp_path / "i.safetensors")
    assert rc == 0, err
    assert "--batch-size=1" in rerun_parameters(capsys, tmp_path / "a.png", tmp_path / "b.png")
    assert (pixels(tmp_path / "a.png") == pixels(tmp_path / "b.png")).all()
    assert json.loads(Image.open(tmp_path / "a.png").text["minledits"])["batch_size"] == 1
    assert run(capsys, "edit", tmp_path / "i.safetensors", "-o", tmp_path / "c.png", *TINY, "-e", "hat")[0] == 0
    argv = rerun_parameters(capsys, tmp_path / "c.png", tmp_path / "d.png")
    assert not any(a.startswith("--batch-size") for a in argv)
    assert (pixels(tmp_path / "c.png") == pixels(tmp_path / "d.png")).all()


# --------------------------------------------------------------------------------------------- --user-mask
@pytest.mark.parametrize("size, keep_aspect, says", [
    ((64, 64), False, None),                                                  # the inversion's picture: silent
    ((1, 1), False, "is 1x1 px, the inversion's picture 64x64: it is centre-cropped and resized"),
    ((64, 4096), False, "is 64x4096 px, the inversion's picture 64x64: it is centre-cropped and resized"),
    ((80, 64), False, "is 80x64 px, the inversion's picture 64x64"),           # the image it was made from
    ((1, 1), True, "is 1x1 px, the inversion's picture 128x128: it is resized"),
    ((64, 4096), True, "m.png is 64x4096 px, which cannot line up with the inversion's picture, 128x128 px (made "
                       "with --keep-aspect)"),
])
def test_a_user_mask_of_another_size_than_an_inversion_is_not_taken_silently(image, tmp_path, capsys, monkeypatch,
                                                                             size, keep_aspect, says):
    inv = tmp_path / "i.safetensors"
    keep = ["--keep-aspect", "--size", "128"] if keep_aspect else []
    assert run(capsys, "invert", image, "-o", inv, *TINY, "--steps", "6", "--sampler", "dpmsolver++", *keep)[0] == 0
    Image.new("L", size, 255).save(tmp_path / "m.png")
    refused = "cannot" in (says or "")
    if refused:  # before the model is loaded
        monkeypatch.setattr(commands, "model_of", lambda *a, **k: pytest.fail("loaded the model before refusing"))
    rc, _, err = run(capsys, "edit", inv, "-o", tmp_path / "e.png", *TINY, "--method", "leditspp", "-e", "hat",
                     "--user-mask", tmp_path / "m.png")
    assert rc == (1 if refused else 0) and err.count("\n") == (says is not None), err
    assert says is None or says in err and err.startswith("minledits: "), err
    assert (tmp_path / "e.png").exists() != refused


# --------------------------------------------------------------------------------------------- options ignored
P2P = ["--source-prompt", "a cat", "--target-prompt", "a dog"]


@pytest.mark.parametrize("method, option", [
    ("ledits", ["--mask", "noise"]), ("ledits", ["--negative-prompt", "x"]), ("ledits", ["--guidance-rescale", "0.5"]),
    ("ledits", ["--cross-replace", "0.3"]), ("ledits", ["--self-replace", "0.3"]), ("ledits", ["--reweight", "hat=2"]),
    ("ledits", ["--local-blend", "cat,dog"]), ("ledits", ["--user-mask", "m.png"]),
    ("leditspp", ["--momentum-scale", "0.9"]), ("leditspp", ["--momentum-beta", "0.1"]),
    ("leditspp", ["--target-prompt", "a dog"]), ("leditspp", ["--target-guidance", "3"]),
    ("p2p", ["--momentum-scale", "0.9"]), ("p2p", ["--mask", "noise"]), ("p2p", ["-e", "hat"]),
])
def test_an_option_of_another_method_is_refused_before_any_work(image, tmp_path, capsys, monkeypatch, method, option):
    """edit --method M with an option only another method takes: it used to be ignored without a word."""
    monkeypatch.setattr(commands, "model_of", lambda *a, **k: pytest.fail("loaded the model before refusing"))
    extra = P2P if method == "p2p" else [] if option[0] == "-e" else ["-e", "hat"]
    rc, _, err = run(capsys, "edit", image, "-o", tmp_path / "o.png", *TINY, "--method", method, *extra, *option)
    what = "concepts (-e)" if option[0] == "-e" else option[0]
    assert rc == 1 and err.count("\n") == 1, err
    assert f"error: --method {method} takes no {what}: it is an option of --method " in err, err


def test_options_at_their_defaults_and_the_methods_own_are_taken(image, tmp_path, capsys):
    for i, argv in enumerate([["--method", "leditspp", "-e", "hat", "--target-guidance", "15", "--mask", "noise"],
                              ["--method", "p2p", *P2P, "--reweight", "dog=2", "--mask", "intersect"],
                              ["--target-prompt", "a dog", "--momentum-scale", "0.3", "--negative-prompt", ""]]):
        rc, _, err = run(capsys, "edit", image, "-o", tmp_path / f"{i}.png", *TINY, "--steps", "4", *argv)
        assert rc == 0, err


def test_size_zero_is_refused_not_the_default(image, tmp_path, capsys):
    rc, _, err = run(capsys, "edit", image, "-o", tmp_path / "o.png", *TINY, "--size", "0", "-e", "hat")
    assert rc == 1 and "size must be a multiple of 64 (at least 64), got 0" in err and err.count("\n") == 1, err


@pytest.mark.parametrize("argv, says", [([], "no -e, no --target-prompt"), (["--method", "leditspp"], "no -e"),
                                        (["-e", "hat"], None), (["--target-prompt", "a dog"], None)])
def test_an_edit_with_nothing_to_edit_says_so(image, tmp_path, capsys, argv, says):
    rc, printed, err = run(capsys, "edit", image, "-o", tmp_path / "o.png", *TINY, "--steps", "4", *argv)
    assert rc == 0 and printed.count("\n") == 1, err
    assert (f"(nothing to edit: {says}: a reconstruction)" in printed) if says else "(nothing to" not in printed


def test_keep_last_noise_with_zero_noise_steps_is_refused(image, tmp_path, capsys):
    """--keep-last-noise zeroes no noise map: --zero-noise-steps beside it used to be ignored without a word."""
    rc, _, err = run(capsys, "invert", image, "-o", tmp_path / "i.safetensors", *TINY, "--steps", "4",
                     "--keep-last-noise", "--zero-noise-steps", "2")
    assert rc == 1 and "--zero-noise-steps and --keep-last-noise" in err and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, says", [
    (["--clip-model", "none", "--text", "a cat"], "--text is for the CLIP score, which --clip-model none leaves out"),
    (["--clip-model", "none", "--device", "gpu"], "argument --device: invalid choice: 'gpu'")])
def test_metrics_refuses_what_it_would_ignore(image, capsys, argv, says):
    rc, printed, err = run(capsys, "metrics", image, image, *argv)
    assert rc == 2 and printed == "" and says in err and err.count("\n") == 1, err


def test_an_output_name_too_long_for_the_folder_is_refused_before_any_work(image, tmp_path, capsys, monkeypatch):
    """A name the folder takes, but not with the temporary's 20-odd bytes more, used to fail once the work was done."""
    monkeypatch.setattr(commands, "model_of", lambda *a, **k: pytest.fail("loaded the model before refusing"))
    most = os.pathconf(tmp_path, "PC_NAME_MAX") if hasattr(os, "pathconf") else 255
    name = "x" * (most - 8) + ".png"
    rc, _, err = run(capsys, "edit", image, "-o", tmp_path / name, *TINY, "-e", "hat")
    assert rc == 1 and f"its name is {most - 4} bytes, and {tmp_path} takes names up to {most} bytes" in err, err
    assert err.count("\n") == 1 and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("option", [["--vae", "nope"], ["--variant", "fp16"], ["--revision", "main"],
                                    ["--prediction-type", "v_prediction"]])
def test_random_tiny_refuses_the_options_of_real_weights(image, tmp_path, capsys, option):
    """random-tiny is made on the fly: --vae, --variant, ... used to be ignored (and written in the PNG's line)."""
    rc, _, err = run(capsys, "edit", image, "-o", tmp_path / "o.png", *TINY, "-e", "hat", *option)
    assert rc == 1 and f"random-tiny is built on the fly from random weights: it takes no {option[0]}" in err, err
    assert err.count("\n") == 1 and list(tmp_path.iterdir()) == []


def test_invert_refuses_an_inversion_file(image, tmp_path, capsys):
    """It used to copy the file and say "inverted"."""
    assert run(capsys, "invert", image, "-o", tmp_path / "i.safetensors", *TINY, "--steps", "4")[0] == 0
    rc, _, err = run(capsys, "invert", tmp_path / "i.safetensors", "-o", tmp_path / "j.safetensors", *TINY)
    assert rc == 1 and "i.safetensors is an inversion file already: edit or reconstruct it" in err, err
    assert err.count("\n") == 1 and not (tmp_path / "j.safetensors").exists()


# --------------------------------------------------------------------------------------------- random-tiny
def test_random_tiny_defaults_fit_a_first_try(image, tmp_path, capsys):
    """The README's offline try, `edit photo -o out.png -e glasses --model random-tiny`: 64 px, not 512."""
    sd = minledits.load("random-tiny")
    assert sd.default_size == 64 and minledits.invert(sd, photo(), steps=4).image.shape[-2:] == (64, 64)
    rc, _, err = run(capsys, "edit", image, "-o", tmp_path / "e.png", "-e", "glasses", *TINY)
    assert rc == 0, err
    meta = json.loads(Image.open(tmp_path / "e.png").text["minledits"])
    assert Image.open(tmp_path / "e.png").size == (64, 64) and (meta["size"], meta["steps"]) == (64, 100)
    assert "random-tiny: 64" in " ".join(run(capsys, "edit", "--help")[1].split())


# --------------------------------------------------------------------------------------------- long text
LONG_TEXT = {  # argv after the command and its input/output: each quotes user text in a warning or an error
    "target prompt": ["edit", "--target-prompt", LONG],
    "concept": ["edit", "-e", LONG],
    "bad concept": ["edit", "-e", LONG + ":scale=x"],
    "concept value": ["edit", "-e", "hat:scale=" + "x" * 10_000],
    "source prompt": ["invert", "--source-prompt", LONG],
    "p2p source prompt": ["edit", "--method", "p2p", "--source-prompt", LONG, "--target-prompt", "a dog"],
    "p2p word": ["edit", "--method", "p2p", "--source-prompt", "a cat", "--target-prompt", "a dog", "--reweight",
                 "x" * 10_000 + "=2"],
    "p2p blend": ["edit", "--method", "p2p", "--source-prompt", "a cat", "--target-prompt", "a dog", "--local-blend",
                  "x" * 10_000 + ",dog"],
    "number": ["edit", "--steps", "x" * 10_000],
    "unknown option": ["edit", "--colour=" + "x" * 10_000],
    "vary value": ["sweep", "--vary", "skip=2," + "x" * 10_000],
    "vary number": ["sweep", "--vary", "target_guidance=2," + "x" * 10_000],
    "vary key": ["sweep", "--vary", "x" * 10_000 + "=2"],
    "vary choice": ["sweep", "--vary", "mask=" + "x" * 10_000],
    "compare": ["compare", "--source-prompt", LONG, "--target-prompt", LONG, "-e", LONG],
}


def run_apart(cases: dict, cwd: Path, timeout: int = 300) -> dict:
    """{name: [exit code, stderr]} of `minledits ARGV` for each case, in one other process (warnings reach stderr
    there, shown once per case as in a process of its own); a hang fails them all (subprocess.TimeoutExpired)
    instead of stopping the tests."""
    script = ("import contextlib, io, json, sys, warnings\nfrom minledits import cli\nfound = {}\n"
              "for name, argv in json.load(sys.stdin).items():\n"
              "    warnings.simplefilter('default')  # a new filter: each warning is shown again\n"
              "    with contextlib.redirect_stderr(io.StringIO()) as err:\n"
              "        found[name] = [cli.main(argv), err.getvalue()]\n"
              "print(json.dumps(found))\n")
    root = str(Path(minledits.__file__).parents[1])  # the package this test imported, not another install
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script], input=json.dumps(cases), cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_ten_thousand_characters_give_a_short_message(image, tmp_path):
    fast, found = [*TINY, "--steps", "6", "--skip", "2"], {}
    cases = {name: [command, str(image), "-o", "i.safetensors" if command == "invert" else f"{n}.png", *fast, *argv,
                    *(["--clip-model", "none"] if command in ("sweep", "compare") else [])]
             for n, (name, (command, *argv)) in enumerate(LONG_TEXT.items())}
    jobs = [{"input": str(image), "concepts": [LONG + ":scale=x"]}, {"input": str(image), "colour": LONG},
            {"input": [LONG]}, {"input": str(image), "target_prompt": LONG, "steps": 6, "skip": 2}]
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    cases["batch"] = ["batch", "jobs.json", "--outdir", "out", *TINY]
    for name, (rc, err) in run_apart(cases, tmp_path).items():
        found[name] = len(err.splitlines()), len(err)
        assert 1 <= found[name][0] <= (4 if name == "batch" else 3) and len(err) < 1000, (name, err[:3000])
    assert found["batch"][0] == 4  # three jobs fail, the fourth warns of its long prompt


# --------------------------------------------------------------------------------------------- named pipes


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_a_named_pipe_is_refused_in_one_line(image, tmp_path):
    for name in ("pipe.png", "pipe.safetensors", "jobs.json"):
        os.mkfifo(tmp_path / name)
    Image.open(image).save(tmp_path / "photo.png")
    (tmp_path / "pipe-job.json").write_text(json.dumps([{"input": "pipe.png"}]))
    tiny = ["--model", "random-tiny", "--steps", "4", "--skip", "1", "-q"]
    cases = {"edit": ["edit", "pipe.png", "-o", "a.png", *tiny, "-e", "hat"],
             "inversion file": ["edit", "pipe.safetensors", "-o", "b.png", "-q"],
             "p2p": ["edit", "pipe.png", "-o", "c.png", *tiny, "--method", "p2p", "--source-prompt", "a",
                     "--target-prompt", "b"],
             "invert": ["invert", "pipe.png", "-o", "i.safetensors", *tiny],
             "reconstruct": ["reconstruct", "pipe.png", "-o", "d.png", *tiny],
             "user mask": ["edit", "photo.png", "-o", "e.png", *tiny, "--method", "leditspp", "-e", "hat",
                           "--user-mask", "pipe.png"],
             "sweep": ["sweep", "pipe.png", "-o", "g.png", *tiny, "--vary", "skip=1,2"],
             "compare": ["compare", "pipe.png", "-o", "h.png", *tiny],
             "jobs file": ["batch", "jobs.json", "--outdir", "out", "-q"],
             "job input": ["batch", "pipe-job.json", "--outdir", "out", "--model", "random-tiny", "-q"],
             "metrics": ["metrics", "photo.png", "pipe.png"],
             "an output": ["edit", "photo.png", "-o", "f.png", *tiny, "--save-inversion", "pipe.safetensors"],
             "a sweep's record": ["sweep", "photo.png", "-o", "pipe.png", *tiny, "--vary", "skip=1,2"]}
    (tmp_path / "pipe").mkdir()
    os.mkfifo(tmp_path / "pipe" / "000.json")
    Image.new("RGB", (8, 8)).save(tmp_path / "pipe" / "000.png")
    for name, (rc, err) in run_apart(cases, tmp_path).items():
        assert rc in (1, 2) and len(err.splitlines()) == 1, (name, err)
        assert ("is a named pipe: minledits writes only regular files" if name in ("an output", "a sweep's record")
                else "is a named pipe: give a regular file") in err, (name, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["jobs.json", "out", "photo.png", "pipe", "pipe-job.json",
                                                          "pipe.png", "pipe.safetensors"]


# --------------------------------------------------------------------------------------------- the arguments
@pytest.mark.parametrize("argv", [
    ["edit", "{image}", "-o", "{d}/a.png", "-e", "hat", "--method", "p2p"],  # refused: p2p takes no concepts
    ["edit", "{image}", "-o", "{d}/b.png", "--method", "p2p", "--source-prompt", "a cat", "--target-prompt", "a dog",
     "--local-blend", "cat,dog", "--steps", "4"],
    ["reconstruct", "{inv}", "-o", "{d}/c.png"],
    ["compare", "{image}", "-o", "{d}/d.png", "-e", "hat", "--steps", "4", "--clip-model", "none"],
    ["sweep", "{inv}", "-o", "{d}/e.png", "-e", "hat", "--vary", "concept.0.scale=2,4", "--clip-model", "none"],
])
def test_a_command_writes_nothing_into_its_arguments(argv, image, tmp_path, capsys):
    inv = tmp_path / "inv.safetensors"
    assert run(capsys, "invert", image, "-o", inv, *TINY, "--steps", "4")[0] == 0
    args = parser().parse_args([a.format(image=image, inv=inv, d=tmp_path) for a in argv] + TINY)
    given = dict(vars(args))
    try:
        cli.HANDLERS[args.cmd](args)
    except Exception:
        pass  # refused or not: either way
    options = {dest(flags, o) for flags, _, _, o in COMMON + INVERT + EDIT}  # resolve() fills in their defaults
    assert set(vars(args)) <= set(given) | options and args.cmd == given["cmd"]
    assert all(vars(args)[k] == v for k, v in given.items() if v is not None)  # what was given stays as given

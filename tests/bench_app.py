"""Benchmark: the same edit from `minledits app` (through its /edit endpoint, the inversion cached), from the command
in this process (`cmd_edit`, the model and the inversion in its cache) and from the command as a user runs it (a new
process editing the photo's inversion file: start, load, edit), alternating.

    python -m tests.bench_app                          # random-tiny, 256 px, 100 steps, skip 36
    python -m tests.bench_app --sd15 1                 # and, in the same run, the SD 1.5 architecture (random
                                                       # weights, tests.bench's folder) at 256 px, 20 steps, skip 6
    python -m tests.bench_app --model FOLDER --size 512 --steps 20 --skip 6
    python -m tests.bench_app --split --repeat 9       # the app's cost in two parts (its server in this process)

All run PyTorch on one thread (the server as tests/app_server starts it; this process sets it), edit
examples/photo.jpg with two concepts, and must give the same pixels. Prints, per model, each way's fastest and median
seconds and the app's share on top of the others (other work on the machine only slows a run down: the fastest is
the steadier figure), and the median of each app run against the command run just before it (a pair shares the
machine's state of the moment). The first edit of each (the inversion, the model's warm-up) is not timed.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from minledits.cli import MORE, webapp
from minledits.cli.commands import cmd_edit
from minledits.cli.options import parser
from tests.app_server import client_temporaries, free_port, running

PHOTO = Path(__file__).parents[1] / "examples" / "photo.jpg"
CONCEPTS = ["glasses", "-beard"]


def main():
    a = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    a.add_argument("--model", default="random-tiny")
    a.add_argument("--size", type=int, default=256)
    a.add_argument("--steps", type=int, default=100)
    a.add_argument("--skip", type=int, default=36)
    a.add_argument("--repeat", type=int, default=5)
    a.add_argument("--sd15", type=int, default=0, metavar="REPEAT",
                   help="then the SD 1.5 architecture at --size, 20 steps, skip 6, REPEAT times (~4 min each)")
    a.add_argument("--split", action="store_true", help="the app's cost in two parts, its server in this process")
    o = a.parse_args()
    torch.set_num_threads(1)
    if o.split:
        return split(o.model, o.size, o.steps, o.skip, o.repeat)
    measure(o.model, o.size, o.steps, o.skip, o.repeat)
    if o.sd15:
        from tests.bench import model_folder
        measure(str(model_folder("sd15")), o.size, 20, 6, o.sd15, "SD 1.5 architecture (random weights)")


def measure(model: str, size: int, steps: int, skip: int, repeat: int, name: str = ""):
    """The three ways alternating, repeat times each after one untimed edit; prints one line of medians."""
    import gradio_client  # the app's test extra
    options = ["--model", model, "--size", str(size), "--steps", str(steps), "--skip", str(skip)]
    with tempfile.TemporaryDirectory() as folder, running(Path(folder), "--model", model) as server, \
            client_temporaries(Path(folder) / "client"):
        client = gradio_client.Client(server.url, verbose=False, download_files=str(Path(folder) / "downloads"))
        cli_png, cache = Path(folder) / "cli.png", {}

        def by_app():
            return client.predict(photo=gradio_client.handle_file(str(PHOTO)), api_name="/edit", size=str(size),
                                  steps=steps, skip=str(skip), concepts="\n".join(CONCEPTS))[1]

        def by_command():
            argv = ["edit", str(PHOTO), "-o", str(cli_png), "--force", "-q", *options,
                    *(f"--concept={c}" for c in CONCEPTS)]
            cmd_edit(parser(MORE).parse_args(argv), cache)

        inv = Path(folder) / "photo.safetensors"

        def by_process():
            subprocess.run([sys.executable, "-m", "minledits", "edit", str(inv), "-o", str(cli_png), "--force", "-q",
                            "--model", model, *(f"--concept={c}" for c in CONCEPTS)], check=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True)

        app_png = by_app()
        subprocess.run([sys.executable, "-m", "minledits", "invert", str(PHOTO), "-o", str(inv), "-q", *options],
                       check=True, capture_output=True)
        by_command()
        same = np.array_equal(np.asarray(Image.open(app_png).convert("RGB")),
                              np.asarray(Image.open(cli_png).convert("RGB")))
        times = {"command": [], "app": [], "process": []}
        for _ in range(repeat):
            for way, fn in (("command", by_command), ("app", by_app), ("process", by_process)):
                start = time.perf_counter()
                fn()
                times[way].append(time.perf_counter() - start)
    print(f"{name or model}, {size} px, {steps} steps, skip {skip}, {len(CONCEPTS)} concepts, 1 thread, "
          f"{repeat} alternating runs; same pixels: {same}")
    for what, of in (("fastest", min), ("median", statistics.median)):
        c, p, q = (of(times[k]) for k in ("command", "app", "process"))
        print(f"  {what}: command in this process {c:.3f} s   app {p:.3f} s ({(p / c - 1) * 100:+.1f}%)   "
              f"command as a process {q:.3f} s (the app {(p / q - 1) * 100:+.1f}%)")
    pairs = [a / c - 1 for a, c in zip(times["app"], times["command"])]  # each app run against the command just before
    print(f"  the app against the command run just before it, median of {repeat} pairs: "
          f"{statistics.median(pairs) * 100:+.1f}% (from {min(pairs) * 100:+.1f}% to {max(pairs) * 100:+.1f}%)")


def split(model: str, size: int, steps: int, skip: int, repeat: int):
    """--split: the app served from this process, so that each /edit call's own App.edit is timed inside it: the
    call's time beyond its App.edit (Gradio's queue, upload and pictures, the client fetching them), measured within
    one call, and App.edit against the command in this process (cmd_edit, alternating); both on the same pixels."""
    import gradio_client  # the app's test extra
    with tempfile.TemporaryDirectory() as folder, client_temporaries(Path(folder)):  # (the app's files inside it)
        os.environ["GRADIO_TEMP_DIR"] = str(Path(folder) / "gradio")  # as `minledits app` sets it, before gradio
        app = webapp.App(parser(MORE).parse_args(["app", "--model", model]), folder)
        inner, plain = [], app.edit

        def timed(*args, **kw):
            start = time.perf_counter()
            out = plain(*args, **kw)
            inner.append(time.perf_counter() - start)
            return out
        app.edit = timed
        demo = webapp.page(app)
        demo.queue(default_concurrency_limit=1)
        port = free_port()
        demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, ssr_mode=False)
        try:
            client = gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False,
                                          download_files=str(Path(folder) / "downloads"))
            argv = ["edit", str(PHOTO), "-o", str(Path(folder) / "cli.png"), "--force", "-q", "--model", model,
                    "--size", str(size), "--steps", str(steps), "--skip", str(skip),
                    *(f"--concept={c}" for c in CONCEPTS)]
            cache, times = {}, {"command": [], "call": [], "App.edit": []}
            for i in range(repeat + 1):  # the first of each untimed
                start = time.perf_counter()
                cmd_edit(parser(MORE).parse_args(argv), cache)
                times["command"].append(time.perf_counter() - start)
                start = time.perf_counter()
                png = client.predict(photo=gradio_client.handle_file(str(PHOTO)), api_name="/edit", size=str(size),
                                     steps=steps, skip=str(skip), concepts="\n".join(CONCEPTS))[1]
                times["call"].append(time.perf_counter() - start)
                times["App.edit"].append(inner[-1])
            same = np.array_equal(np.asarray(Image.open(png).convert("RGB")),
                                  np.asarray(Image.open(Path(folder) / "cli.png").convert("RGB")))
        finally:
            demo.close()
    times = {k: v[1:] for k, v in times.items()}
    beyond = [c - e for c, e in zip(times["call"], times["App.edit"])]
    c, e = min(times["command"]), min(times["App.edit"])
    print(f"{model}, {size} px, {steps} steps, skip {skip}, {len(CONCEPTS)} concepts, 1 thread, the app's server in "
          f"this process, {repeat} alternating runs; same pixels: {same}")
    print(f"  a call beyond its App.edit: median {statistics.median(beyond):.3f} s (from {min(beyond):.3f} to "
          f"{max(beyond):.3f}); fastest App.edit {e:.3f} s, fastest command {c:.3f} s ({(e / c - 1) * 100:+.1f}%)")
    print(f"  the app's cost on top of the command: {(e + statistics.median(beyond)) / c * 100 - 100:+.1f}%")


if __name__ == "__main__":
    main()

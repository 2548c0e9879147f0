"""`minledits app` in a child process on a free port of 127.0.0.1, for the API and browser tests.

    with running(folder, "--model", "random-tiny") as server:   # server.url, server.log(), server.process
        ...
    with client_temporaries(folder / "client"): ...             # gradio_client's leftovers kept in there
The server runs PyTorch on one thread (env may say otherwise), is stopped (SIGTERM, then SIGKILL) on leaving, and
writes its output to folder/app.log.
"""
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

START_S = 120  # loading the model and starting Gradio, on a busy 2-core machine
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # random-tiny's ops are too small to share: 2 threads made edits 10x slower


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextlib.contextmanager
def client_temporaries(folder: Path):
    """Within: Python's temporary folder is `folder`. gradio_client downloads each file through a folder of its own in
    the temporary folder and leaves it there, empty: a test's client litters its folder, not the machine's /tmp."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    before, tempfile.tempdir = tempfile.tempdir, str(folder)
    try:
        yield
    finally:
        tempfile.tempdir = before


@contextlib.contextmanager
def running(folder: Path, *argv: str, env=None):
    port = free_port()
    log = Path(folder) / "app.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "minledits", "app", "--port", str(port), *argv], stdout=out,
                                   stderr=subprocess.STDOUT, env={**os.environ, **ONE_THREAD, **(env or {})})
    server = Server(f"http://127.0.0.1:{port}/", process, log)
    try:
        deadline = time.time() + START_S
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"minledits app exited ({process.returncode}): {server.log()}")
            try:
                urllib.request.urlopen(server.url, timeout=5).close()
                break
            except OSError:
                if time.time() > deadline:
                    raise RuntimeError(f"minledits app did not answer in {START_S} s: {server.log()}") from None
                time.sleep(0.5)
        yield server
    finally:
        stop(process)


def stop(process: subprocess.Popen) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode

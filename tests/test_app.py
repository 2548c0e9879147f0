"""`minledits app` through its API, as gradio_client calls it, against one running app on random-tiny: the /edit
endpoint's PNG equals `minledits edit` with the same options (decoded pixels), and the command line the page shows
makes it again; a second edit of the photo reuses its inversion; bad input is one line and the app goes on; Cancel
stops an edit; without Gradio the command says how to install it; --host warns; the temporary folder goes at exit."""
import importlib.util
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from minledits import cli
from minledits.cli import app as cli_app
from minledits.cli import webapp
from minledits.errors import MinleditsError
from minledits.io import store
from tests.app_server import client_temporaries, running
from tests.helpers import photo

gradio_client = pytest.importorskip("gradio_client")
Status = pytest.importorskip("gradio_client.utils").Status
pytest.importorskip("gradio")
pytestmark = pytest.mark.usefixtures("one_thread")
STEPS = dict(steps=10, skip=3)  # 7 edit steps at random-tiny's 64 px: a fraction of a second


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = tmp_path_factory.mktemp("app")
    photo().save(folder / "p.png")
    with running(folder, "--model", "random-tiny") as server, client_temporaries(folder / "client"):
        client = gradio_client.Client(server.url, verbose=False, download_files=str(folder / "downloads"))
        yield server, client, folder
    temporary = re.search(r"its files, in (\S+), are removed", server.log())[1]
    assert not Path(temporary).exists(), "the app's temporary folder is removed when it stops"
    assert any((folder / "client").iterdir()), "gradio_client's leftover folders went to the test's folder"


def edit(client, folder, name="p.png", **options):
    return client.predict(photo=gradio_client.handle_file(str(folder / name)), api_name="/edit",
                          **{**STEPS, **options})


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_the_endpoints_carry_the_command_options(served):
    _, client, _ = served
    api = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    names = {e: {p["parameter_name"] for p in api[e]["parameters"]} for e in ("/invert", "/edit")}
    assert {"photo", "source_prompt", "steps", "skip", "seed", "size", "sampler", "keep_aspect"} <= names["/invert"]
    assert {"method", "target_prompt", "target_guidance", "concepts", "mask", "cross_replace", "reweight",
            "user_mask", "compare", "momentum_scale"} <= names["/edit"]
    assert not names["/invert"] & {"method", "concepts"}


@pytest.mark.parametrize("method, options", [
    ("ledits", dict(concepts="glasses\n-beard:scale=3,warmup=1", target_prompt="a man")),
    ("leditspp", dict(concepts="glasses:scale=4", sampler="dpmsolver++", guidance_rescale=0.5)),
    ("p2p", dict(source_prompt="a cat", target_prompt="a dog", cross_replace=0.5))])
def test_the_edit_is_the_command_s_bit_for_bit(served, tmp_path, method, options):
    _, client, folder = served
    said, png, _, _, tiles, files, line = edit(client, folder, method=method, **options)
    assert line.startswith("minledits edit p.png ") and line.endswith(" -o edit.png")
    argv = shlex.split(line)[1:]
    argv[1], argv[-1] = str(folder / "p.png"), str(tmp_path / "cli.png")
    assert cli.main(argv) == 0
    assert np.array_equal(pixels(png), pixels(tmp_path / "cli.png")), "the page's picture is the command's"
    by_hand = ["edit", str(folder / "p.png"), "-o", str(tmp_path / "by-hand.png"), "--model", "random-tiny",
               "--steps", "10", "--skip", "3", "--method", method]
    by_hand += [a for k, v in options.items() if k != "concepts" for a in (f"--{k.replace('_', '-')}", str(v))]
    by_hand += [f"--concept={c}" for c in options.get("concepts", "").splitlines()]
    assert cli.main(by_hand) == 0
    assert np.array_equal(pixels(png), pixels(tmp_path / "by-hand.png"))
    assert [Path(f).name for f in files] == ["edit.png"]
    assert "parameters" in Image.open(files[0]).text
    files = client.predict(api_name="/files")
    assert [Path(f).name for f in files] == ["edit.png", "inversion.safetensors", "trace.safetensors", "trace.png"]
    assert store.load(files[1]).settings.steps == 10
    captions = [t["caption"] for t in tiles["value"]]  # an update: the tiles and the step in the label
    assert tiles["label"].startswith("step 7 of 7: ")
    assert captions == {"ledits": ["x0 prediction", "glasses: mask", "-beard: mask"],
                        "leditspp": ["x0 prediction", "glasses: attention", "glasses: noise mask",
                                     "glasses: applied mask"],
                        "p2p": ["x0 prediction", "a: attention", "dog: attention"]}[method]


def test_a_second_edit_reuses_the_inversion(served):
    _, client, folder = served
    photo(seed=5).save(folder / "q.png")
    first = edit(client, folder, "q.png", concepts="glasses", seed=7)[0]
    assert first.startswith("inverted 'q.png' in "), first
    again = edit(client, folder, "q.png", concepts="-glasses:scale=2", seed=7)[0]
    assert again.startswith("reused the inversion of 'q.png'"), again
    other = edit(client, folder, "q.png", concepts="glasses", seed=8)[0]
    assert other.startswith("inverted"), "another inversion setting inverts again"


def test_invert_then_edit_the_inversion_file(served, tmp_path):
    _, client, folder = served
    photo(seed=6).save(folder / "r.png")
    said, preview, files = client.predict(photo=gradio_client.handle_file(str(folder / "r.png")), api_name="/invert",
                                          **STEPS)
    assert said.startswith("inverted 'r.png'") and "(7 steps to edit)" in said
    inv = store.load(files[0])
    assert (inv.settings.steps, inv.settings.skip) == (10, 3)
    assert client.predict(photo=gradio_client.handle_file(str(folder / "r.png")), api_name="/invert",
                          **STEPS)[0].startswith("reused")
    said, png, *_ = client.predict(photo=gradio_client.handle_file(files[0]), concepts="glasses", api_name="/edit")
    assert "edited 7 steps" in said
    assert cli.main(["edit", files[0], "-o", str(tmp_path / "cli.png"), "-e", "glasses"]) == 0
    assert np.array_equal(pixels(png), pixels(tmp_path / "cli.png"))


@pytest.mark.parametrize("name, options, expected", [
    ("text.png", {}, "cannot read image 'text.png': 'text.png' is not a picture Pillow can read"),
    ("p.png", dict(skip=10), "skip must be an integer with 0 <= skip < steps (10), got 10"),
    ("p.png", dict(concepts="glasses:colour=3"), "bad concept option 'colour=3'"),
    ("p.png", dict(method="leditspp", target_prompt="a dog", concepts="glasses"), "--method leditspp takes no "
     "--target-prompt"),
    ("p.png", dict(method="painting"), "'painting' (type: <class 'str'>) is not in the list of choices")])
def test_bad_input_is_one_line_and_the_app_goes_on(served, name, options, expected):
    server, client, folder = served
    (folder / "text.png").write_text("not a picture\n")
    with pytest.raises(gradio_client.exceptions.AppError) as e:
        edit(client, folder, name, **options)
    assert expected in str(e.value) and "\n" not in str(e.value) and "Traceback" not in str(e.value), str(e.value)
    assert str(folder) not in str(e.value) and "minledits-app-" not in str(e.value), "no path of the server's"
    assert edit(client, folder, concepts="glasses")[0].startswith(("inverted", "reused")), "the app still answers"
    assert server.process.poll() is None


def test_uploads_over_the_limits_are_refused(served, tmp_path, monkeypatch):
    _, client, folder = served
    Image.new("L", (6000, 6000)).save(folder / "huge.png")  # 36 megapixels in a few kilobytes
    with pytest.raises(gradio_client.exceptions.AppError) as e:
        edit(client, folder, "huge.png")
    assert "cannot read image 'huge.png': 'huge.png' is 6000x6000 px (36 megapixels), over the limit" in str(e.value)
    with open(folder / "big.png", "wb") as f:
        f.truncate(51 * 2**20)  # over the page's 50 MB (sparse: no disk)
    with pytest.raises(ValueError, match="exceeds the maximum file size of 52428800 bytes"):
        edit(client, folder, "big.png")  # the server tells its clients (and browsers) the limit
    page = webapp.App.__new__(webapp.App)  # and refuses it itself: App.stored, no model needed
    page.folder = tmp_path
    monkeypatch.setattr(webapp, "MAX_UPLOAD_MB", 1)
    (tmp_path / "two.png").write_bytes(bytes(2 * 2**20))
    with pytest.raises(MinleditsError, match=r"^the photo is 2 MB, over the page's limit of 1 MB$"):
        page.stored(tmp_path / "two.png")
    assert edit(client, folder, concepts="glasses")[0], "the app still answers"


def test_one_edit_at_a_time_and_cancel_stops_it(served):
    server, client, folder = served
    job = client.submit(photo=gradio_client.handle_file(str(folder / "p.png")), steps=999, skip=0,
                        concepts="glasses", api_name="/edit")
    deadline = time.time() + 60
    while job.status().progress_data is None and time.time() < deadline and not job.done():
        time.sleep(0.1)
    assert not job.done(), "the long edit runs"
    other = gradio_client.Client(server.url, verbose=False)
    waiting = other.submit(photo=gradio_client.handle_file(str(folder / "p.png")), concepts="glasses",
                           api_name="/edit", **STEPS)
    while waiting.status().code not in (Status.IN_QUEUE, Status.FINISHED) and time.time() < deadline:
        time.sleep(0.05)
    assert waiting.status().code == Status.IN_QUEUE and waiting.status().rank == 0, "the second user waits, first"
    start = time.time()
    assert client.predict(api_name="/cancel") == "cancelled"
    with pytest.raises(Exception):
        job.result(timeout=60)
    assert waiting.result(timeout=60)[0], "the waiting edit runs"
    assert time.time() - start < 30, "the cancelled edit stopped (999 steps take many times longer)"
    assert cpu_seconds(server.process.pid, 1.0) < 0.3, "nothing runs on in the server after the cancel"


def cpu_seconds(pid: int, during: float) -> float:
    """The CPU time the process takes in the next `during` seconds (Linux's /proc)."""
    def used():
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    before = used()
    time.sleep(during)
    return used() - before


def test_without_gradio_one_line_says_how_to_install(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else real(name, *a))
    assert cli.main(["app", "--model", "random-tiny"]) == 1
    err = capsys.readouterr().err
    assert err == 'minledits: the app needs Gradio: pip install "minledits[app]"\n'


def test_an_address_that_cannot_be_served_is_one_line_before_the_model_loads(monkeypatch, capsys):
    def load(*_):
        raise AssertionError("the model loads only once the address is known to serve")
    monkeypatch.setattr(cli_app.webapp, "App", load)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli.main(["app", "--model", "random-tiny", "--port", str(port)]) == 1
    assert capsys.readouterr().err == (f"minledits: error: cannot serve on --host '127.0.0.1' --port {port}: Address "
                                       "already in use (another program listens there: choose another --port)\n")
    assert cli.main(["app", "--model", "random-tiny", "-q", "--host", "192.0.2.1"]) == 1  # TEST-NET-1: no one's
    assert capsys.readouterr().err.splitlines()[-1] == (
        "minledits: error: cannot serve on --host '192.0.2.1' --port 7860: Cannot assign requested address (not an "
        "address of this machine: choose another --host)")
    for bad, why in [("70000", "must be 1 to 65535, got 70000"), ("0", "must be 1 to 65535, got 0"),
                     ("x", "invalid port value: 'x'")]:
        assert cli.main(["app", "--model", "random-tiny", "--port", bad]) == 2
        err = capsys.readouterr().err
        assert err == f"minledits app: error: argument --port: {why} (usage: minledits app --help)\n"


def test_another_host_is_warned_of(monkeypatch, capsys):
    served_on, checked = [], []
    monkeypatch.setattr(cli_app.webapp, "serve", lambda page, host, port: served_on.append((host, port)))
    monkeypatch.setattr(cli_app, "check_address", lambda host, port: checked.append((host, port)))
    assert cli.main(["app", "--model", "random-tiny", "-q", "--host", "0.0.0.0", "--port", "7999"]) == 0
    assert served_on == [("0.0.0.0", 7999)]
    warning = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warning == ["minledits: warning: --host 0.0.0.0 serves the page, without a password, to every machine "
                       "that reaches this one"]
    assert cli.main(["app", "--model", "random-tiny", "-q"]) == 0
    assert "warning" not in capsys.readouterr().err and served_on[-1] == ("127.0.0.1", 7860)
    assert checked == served_on, "the address is checked before the model loads"
    assert "GRADIO_TEMP_DIR" not in os.environ and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, "as it was"


def test_the_package_and_its_command_import_without_gradio():
    code = "import sys, minledits.cli, minledits.cli.webapp; print('gradio' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stderr

"""`minledits app`: the browser page (webapp.py), served on this machine by default, until Ctrl+C.

Gradio is the app extra: without it the command says how to install it, in one line. An address the page cannot be
served on (a port in use, a host that is not this machine's) is refused in one line before the model loads. Every
file the page writes, Gradio's uploads included, lives in one temporary folder, removed when the command ends.
"""
import argparse
import errno
import importlib.util
import os
import signal
import socket
import sys
import tempfile

from ..errors import MinleditsError, shorten
from . import webapp
from .options import COMMON, resolve

INSTALL = 'minledits: the app needs Gradio: pip install "minledits[app]"'


def add_arguments(s):
    s.add_argument("--host", default="127.0.0.1", help="address to serve on (default: 127.0.0.1, this machine only)")
    s.add_argument("--port", type=port, default=7860, help="port, 1 to 65535 (default: 7860)")


def port(text: str) -> int:
    n = int(text)  # not an integer: argparse's "invalid port value"
    if not 1 <= n <= 65535:
        raise argparse.ArgumentTypeError(f"must be 1 to 65535, got {n}")
    return n


def check_address(host: str, port: int) -> None:
    """A MinleditsError line where nothing can listen on host:port now (bound as the server binds: SO_REUSEADDR)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(address)
    except OSError as e:
        what = {errno.EADDRINUSE: "another program listens there: choose another --port",
                errno.EACCES: "this user may not listen there: choose another --port"}
        raise MinleditsError(f"cannot serve on --host {shorten(host)} --port {port}: {e.strerror or e} ("
                             f"{what.get(e.errno, 'not an address of this machine: choose another --host')})") from None


def cmd_app(args):
    if importlib.util.find_spec("gradio") is None:  # the app extra; imported once GRADIO_TEMP_DIR is set
        print(INSTALL, file=sys.stderr)
        return 1
    resolve(args, COMMON)
    if args.host not in webapp.LOCAL:
        print(f"minledits: warning: --host {args.host} serves the page, without a password, to every machine that "
              "reaches this one", file=sys.stderr)
    check_address(args.host, args.port)
    keys = ("GRADIO_TEMP_DIR", "GRADIO_ANALYTICS_ENABLED")
    environ, sigterm = [os.environ.get(k) for k in keys], signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        with tempfile.TemporaryDirectory(prefix="minledits-app-") as folder:
            os.environ["GRADIO_TEMP_DIR"] = os.path.join(folder, "gradio")  # before gradio's modules read it
            os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
            page = webapp.App(args, folder)
            print(f"minledits app: {page.sd.model_id} on http://{args.host}:{args.port} (Ctrl+C stops; its files, "
                  f"in {folder}, are removed then)", flush=True)
            webapp.serve(page, args.host, args.port)
    finally:
        signal.signal(signal.SIGTERM, sigterm)  # as they were (`kill` above: the folder is removed too)
        for k, v in zip(keys, environ):
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

"""`minledits app`: the browser page (webapp.py), served on this machine by default, until Ctrl+C.

Gradio is the app extra: without it the command says how to install it, in one line. Every file the page writes,
Gradio's uploads included, lives in one temporary folder, removed when the command ends.
"""
import importlib.util
import os
import signal
import sys
import tempfile

from . import webapp
from .options import COMMON, resolve

INSTALL = 'minledits: the app needs Gradio: pip install "minledits[app]"'


def add_arguments(s):
    s.add_argument("--host", default="127.0.0.1", help="address to serve on (default: 127.0.0.1, this machine only)")
    s.add_argument("--port", type=int, default=7860, help="port (default: 7860)")


def cmd_app(args):
    if importlib.util.find_spec("gradio") is None:  # the app extra; imported once GRADIO_TEMP_DIR is set
        print(INSTALL, file=sys.stderr)
        return 1
    resolve(args, COMMON)
    if args.host not in webapp.LOCAL:
        print(f"minledits: warning: --host {args.host} serves the page, without a password, to every machine that "
              "reaches this one", file=sys.stderr)
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

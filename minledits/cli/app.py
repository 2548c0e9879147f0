"""`minledits app`: the browser page (placeholder: issue 28)."""


def add_arguments(s):
    s.add_argument("--host", default="127.0.0.1", help="address to serve on (default: 127.0.0.1, this machine only)")
    s.add_argument("--port", type=int, default=7860, help="port (default: 7860)")


def cmd_app(args):
    raise NotImplementedError("minledits app is not written yet")

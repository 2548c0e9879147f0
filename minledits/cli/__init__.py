"""The `minledits` command line (argparse): one small handler per command, options in three tables.

Errors print one line and exit 1 (usage errors exit 2); --verbose adds the traceback. Every input is
checked before the work starts; outputs are written to a temporary file then renamed, never overwritten
without --force. The options and the parser are in options.py, the commands on one picture in
commands.py, those of many edits (batch, sweep, compare) in many.py.
"""
import io
import sys
import warnings
from contextlib import contextmanager

from . import app, evaluate
from .commands import cmd_download, cmd_edit, cmd_invert, cmd_metrics, report
from .many import cmd_batch, cmd_compare, cmd_sweep
from .options import UsageError, parser

HANDLERS = {"download": cmd_download, "invert": cmd_invert, "edit": cmd_edit, "reconstruct": cmd_edit,
            "batch": cmd_batch, "sweep": cmd_sweep, "compare": cmd_compare, "metrics": cmd_metrics,
            "evaluate": evaluate.cmd_evaluate, "app": app.cmd_app}
MORE = {"evaluate": evaluate.add_arguments, "app": app.add_arguments}  # their modules' own arguments


def main(argv=None) -> int:
    with escaped_output():
        return run_command(argv)


@contextmanager
def escaped_output():
    """stdout and stderr write what their encoding lacks as \\xNN (a non-ASCII file name under LC_ALL=C: ASCII)
    instead of failing once the work is done; as they were after."""
    streams = [(s, s.errors) for s in (sys.stdout, sys.stderr) if isinstance(s, io.TextIOWrapper)]
    for s, _ in streams:
        s.reconfigure(errors="backslashreplace")
    try:
        yield
    finally:
        for s, errors in streams:
            s.reconfigure(errors=errors)


def run_command(argv) -> int:
    argv, it = [], iter(sys.argv[1:] if argv is None else argv)
    for a in map(str, it):  # `-e -beard`: argparse would take "-beard" for an option
        argv.append(f"--concept={next(it, '')}" if a in ("-e", "--concept") else a)
    warnings.formatwarning = lambda message, *_, **__: f"minledits: warning: {message}\n"  # one line, no source
    try:
        args = parser(MORE).parse_args(argv)
    except UsageError as e:
        print(e, file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return e.code or 0
    try:
        return HANDLERS[args.cmd](args) or 0
    except KeyboardInterrupt:
        print("minledits: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        report(e, args.verbose)
        return 1

if __name__ == "__main__":
    sys.exit(main())

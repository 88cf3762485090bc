"""The command line, used like make. A thin layer: parse arguments, call build.py, report.

Exit codes: 0 ok, 1 the build failed, 2 usage, Mergefile or input error, 130 / 143 / 129
stopped by SIGINT / SIGTERM / SIGHUP. Every failure is one line on stderr; -v adds the traceback.
"""

from __future__ import annotations

import sys

from mergebuild.cli.parser import parser
from mergebuild.failures import Stopped, describe, install_stop_handlers

SUBCOMMANDS = ("build", "status", "explain", "graph", "lineage", "inspect", "diff", "cache", "clean", "methods", "tune",
               "report", "import")
TAKES_VALUE = {"-f", "--file", "--cache-dir", "--remote-cache", "--device", "--format", "--keep", "--trials", "--plot", "--lock-timeout",
               "-o", "--output", "--models", "--parallel"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = ["--ray=" if a == "--ray" else a for a in argv]  # --ray[=ADDRESS]: a bare one takes no TARGET
    args = parser().parse_args(_with_subcommand(argv))
    restore = install_stop_handlers()
    try:
        return args.run(args)
    except Stopped as e:
        _error(f"{e.why}: finished work is kept in the cache; no output was left half-written")
        return e.exit_code
    except KeyboardInterrupt:
        _error("interrupted: finished work is kept in the cache; no output was left half-written")
        return 130
    except BaseException as e:  # noqa: BLE001 - one line, never a traceback (unless -v)
        if isinstance(e, SystemExit):
            raise
        message, code = describe(e)
        _error(message)
        if getattr(args, "verbose", False):
            import traceback

            traceback.print_exception(e, file=sys.stderr)
        return code
    finally:
        restore()


def run() -> None:
    """The console script and `python -m mergebuild`: main(), then an exit without the
    interpreter's teardown, which takes half a second once torch is imported (0.52-0.63 s after
    a build's last line, measured; 0.04 s without it)."""
    exit_now(main())


def exit_now(code: int) -> None:
    """End the process with `code` once its output is out and the atexit handlers have run,
    skipping the teardown of modules and objects (nothing of mergebuild's is left to it: files
    are closed when written, the stores here). With a thread still at work, a normal exit."""
    import atexit
    import os
    import threading

    from mergebuild.store.fingerprints import close_user_store

    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        raise SystemExit(code)
    close_user_store()
    atexit._run_exitfuncs()  # what libraries registered (logging's flush, Ray's shutdown, finalizers)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe, a closed stream: nothing more can be said
            pass
    os._exit(code)


def _with_subcommand(argv: list[str]) -> list[str]:
    """`mergebuild [opts] [TARGET...]` means `mergebuild build ...`, as make builds by default;
    options written before a subcommand (`mergebuild -f x.toml status`) go after it."""
    skip = False
    for i, token in enumerate(argv):
        if skip:
            skip = False
        elif token in TAKES_VALUE:
            skip = True
        elif token in ("-h", "--help", "--version"):
            return argv
        elif not token.startswith("-"):
            if token in SUBCOMMANDS:
                return [token, *argv[:i], *argv[i + 1:]]
            return ["build", *argv]
    return ["build", *argv]



def _error(message: str) -> None:
    from rich.markup import escape

    from mergebuild.render import console as report

    # soft_wrap: one line whatever its length, on a terminal or through a pipe
    report.err.print(f"[bold red]mergebuild: error:[/] {escape(' '.join(message.split()))}", highlight=False,
                     soft_wrap=True)

"""Every failure as one line: OS errors, SQLite errors and the rest, with what to do; and the
signals that stop a build (SIGINT, SIGTERM, SIGHUP) as exceptions with make-like exit codes.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import sqlite3
import threading

from mergebuild.errors import MergebuildError
from mergebuild.portable import stop_signals

HINTS = {
    errno.ENOSPC: "the disk is full: free space, or put the cache or the output elsewhere (--cache-dir)",
    getattr(errno, "EDQUOT", -1): "the disk quota is exhausted: free space, or put the cache or the output elsewhere",
    errno.EACCES: "permission denied: check the folder's permissions, or name another (--cache-dir)",
    errno.EPERM: "not permitted: check the folder's permissions, or name another (--cache-dir)",
    errno.EROFS: "the file system is read-only: name a writable cache (--cache-dir) or output",
    errno.ENAMETOOLONG: "the path is too long for this file system",
    errno.ENOTDIR: "a file stands where a folder is expected: move it away",
    errno.EISDIR: "a folder stands where a file is expected: move it away",
    errno.ENOENT: "no such file or folder",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n)",
    errno.EIO: "an I/O error: the disk or the file system reported a fault",
    errno.ELOOP: "too many levels of symbolic links",
}


class Stopped(KeyboardInterrupt):
    """A signal asked the build to stop. A KeyboardInterrupt, so whatever handles Ctrl-C (tune
    ends its study cleanly) handles SIGTERM and SIGHUP the same way; exit_code is 128 + the
    signal number, as shells report it."""

    def __init__(self, signum: int, why: str):
        super().__init__(why)
        self.signum, self.why = signum, why
        self.exit_code = 128 + signum


def install_stop_handlers():
    """SIGINT, SIGTERM and SIGHUP raise Stopped in the main thread, once: a second signal while
    the build shuts down is ignored (it would tear the cleanup). Returns a function restoring
    the previous handlers."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    reasons = stop_signals()
    previous = {}
    stopping: list[int] = []

    def handler(signum, _frame):
        if stopping:
            return  # already shutting down: let it finish
        stopping.append(signum)
        raise Stopped(signum, reasons[signum])

    for signum in reasons:
        try:
            previous[signum] = signal.signal(signum, handler)
        except (OSError, ValueError):  # not settable here
            continue

    def restore():
        # once stopping, stay deaf to more stop signals until the process is gone: one
        # arriving during the interpreter's shutdown would print a traceback or kill it
        for signum, old in previous.items():
            try:
                signal.signal(signum, signal.SIG_IGN if stopping else old)
            except (OSError, ValueError):
                pass

    return restore


def describe(error: BaseException) -> tuple[str, int]:
    """(the one line to print, the exit code) for any exception."""
    if isinstance(error, MergebuildError):
        return str(error), error.exit_code
    if isinstance(error, OSError):
        return _os_error(error), 1
    if isinstance(error, sqlite3.Error):
        where = getattr(error, "index_path", None)
        return (f"{where or 'the cache index'}: the cache index cannot be used ({error}); if it is damaged, "
                "delete index.sqlite* in the cache folder (the next build recomputes what it needs)", 1)
    if isinstance(error, RecursionError):
        return "the input is nested too deeply to process", 2
    if isinstance(error, MemoryError):
        return "out of memory: lower [settings] staging, or merge on a machine with more memory", 1
    if isinstance(error, ValueError) and "null byte" in str(error):
        return f"a path contains a NUL character ({error})", 2
    return f"internal error: {type(error).__name__}: {error} (run with -v for the traceback, and please report it)", 1


TEMP_NAME = re.compile(r"\.([^/\\]+?)\.mergebuild-(?:tmp|old)-[\w-]+")


def _os_error(error: OSError) -> str:
    where = str(error.filename) if error.filename is not None else ""
    if error.filename2 is not None:
        where = f"{where} -> {error.filename2}"
    where = TEMP_NAME.sub(r"\1", where)  # name the output, not the temp file it was being written as
    what = error.strerror or str(error)
    hint = HINTS.get(error.errno)
    text = f"{where}: {what}" if where else what
    if hint and hint.split(":")[0].lower() not in what.lower():
        text += f" ({hint})"
    elif hint and ":" in hint:
        text += f" ({hint.split(':', 1)[1].strip()})"
    return text.replace(os.linesep, " ")

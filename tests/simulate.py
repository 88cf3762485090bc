"""Make this process see the OS the way mergebuild sees Windows, on Linux: the portability run.

MERGEBUILD_SIMULATE=no-unix takes away what Python offers only on Unix, so every fallback in
mergebuild/portable.py runs: no fcntl for mergebuild to import (the filelock library keeps the
one it loaded first: it does the locking on each OS, mergebuild must not), no os.pread / pwrite /
preadv / copy_file_range / posix_fallocate, hard links that fail (FAT and exFAT drives), and
folders that cannot be fsynced (on Windows os.open refuses a folder before that; portable.py
treats both refusals alike).
"""

from __future__ import annotations

import errno
import os
import sys

UNIX_ONLY = ("pread", "pwrite", "preadv", "pwritev", "copy_file_range", "posix_fallocate")


def apply(mode: str) -> None:
    if mode != "no-unix":
        raise SystemExit(f"MERGEBUILD_SIMULATE={mode!r}: only 'no-unix' exists")
    import filelock  # noqa: F401 - bound to the real fcntl before it disappears

    sys.modules["fcntl"] = None  # `import fcntl` now fails, as on Windows
    for name in UNIX_ONLY:
        if hasattr(os, name):
            delattr(os, name)

    def link(src, dst, *args, **kwargs):
        raise OSError(errno.EPERM, "hard links are not supported on this file system", str(src))

    real_fsync = os.fsync

    def fsync(fd):
        import stat

        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_fsync(fd)

    os.link = link
    os.fsync = fsync
    os.environ["MERGEBUILD_SIMULATED"] = mode

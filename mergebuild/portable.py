"""The one place for OS-level calls that differ between Linux, macOS and Windows.

Everything else in mergebuild reads and writes files through these functions, so a platform
difference is handled once, here: positional reads and writes (Unix has pread/pwrite, Windows
does not), kernel-side copies (copy_file_range exists on Linux only), advisory locks (flock on
Unix, msvcrt.locking on Windows), directory fsync (Unix only) and the stamp that says a file is
unchanged. docs/portability.md says what is tested where.
"""

from __future__ import annotations

import errno
import os
import stat as stat_module
import sys
import threading
from pathlib import Path

import numpy

WINDOWS = sys.platform == "win32"
COPY_CHUNK = 64 << 20

if WINDOWS:  # pragma: no cover - exercised by the Windows CI job
    import msvcrt
else:
    import fcntl


class ShortRead(OSError):
    """A file ended before the bytes its header promised: it was truncated or rewritten."""


# --- stamps: has a file changed? -------------------------------------------------------------
def stamp(st: os.stat_result) -> tuple[int, int, int, int]:
    """What says a file is unchanged: (size, mtime_ns, ctime_ns, inode). ctime changes on every
    write and cannot be set back by `touch -d` or `cp -p`, so an in-place rewrite that restores
    the mtime is still seen."""
    return (st.st_size, st.st_mtime_ns, _change_time_ns(st), st.st_ino)


def _change_time_ns(st: os.stat_result) -> int:
    # On Windows st_ctime is the creation time; the change time is not exposed by os.stat, so
    # the mtime stands in (documented in docs/portability.md).
    return st.st_mtime_ns if WINDOWS else st.st_ctime_ns


def is_regular_file(st: os.stat_result) -> bool:
    return stat_module.S_ISREG(st.st_mode)


def disk_usage(st: os.stat_result) -> int:
    """Bytes a file really takes on disk (blocks allocated), as `du` counts them."""
    blocks = getattr(st, "st_blocks", None)
    if blocks is not None:
        return blocks * 512
    return (st.st_size + 4095) // 4096 * 4096  # Windows: whole clusters


# --- positional I/O ---------------------------------------------------------------------------
class RandomAccess:
    """One open file read (and written) at explicit offsets from several threads at once.

    Unix: pread/pwrite on one descriptor (thread-safe, no shared position). Windows: a lock
    around seek + read/write. Reads go into caller-owned buffers and never map the file, so a
    file truncated under a build gives ShortRead, never SIGBUS."""

    def __init__(self, path: Path, writable: bool = False, create: bool = False):
        self.path = Path(path)
        flags = os.O_RDWR if writable else os.O_RDONLY
        if create:
            flags |= os.O_CREAT | os.O_TRUNC
        flags |= getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
        self.fd = os.open(self.path, flags, 0o644)
        self._lock = threading.Lock() if WINDOWS else None

    def read_into(self, view, offset: int) -> None:
        """Fill `view` (a writable buffer) from `offset`; ShortRead if the file ends first."""
        view = memoryview(view).cast("B")
        done = 0
        while done < len(view):
            with self._named():
                n = self._read_at(view[done : done + COPY_CHUNK], offset + done)
            if n == 0:
                raise ShortRead(errno.EIO, f"the file ended at byte {offset + done}, "
                                f"{len(view) - done} bytes short (truncated or rewritten?)", str(self.path))
            done += n

    def _named(self):
        """OS errors raised by calls on the descriptor name this file (they carry no name)."""
        return _NamedErrors(self.path)

    def read(self, size: int, offset: int):
        """`size` bytes from `offset`, in a fresh buffer that is not zeroed first (numpy's empty:
        no memset; large sizes reuse freed heap memory rather than faulting in new pages)."""
        buf = numpy.empty(size, dtype=numpy.uint8)
        self.read_into(buf, offset)
        return buf

    def write_at(self, data, offset: int) -> None:
        view = memoryview(data).cast("B")
        with self._named():
            while view:
                n = self._write_at(view, offset)
                view, offset = view[n:], offset + n

    def truncate(self, size: int) -> None:
        with self._named():
            os.ftruncate(self.fd, size)

    def preallocate(self, size: int) -> None:
        with self._named():
            preallocate(self.fd, size)

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def fsync(self) -> None:
        with self._named():
            os.fsync(self.fd)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    if WINDOWS:  # pragma: no cover
        def _read_at(self, view, offset: int) -> int:
            with self._lock:
                os.lseek(self.fd, offset, os.SEEK_SET)
                return os.readv(self.fd, [view]) if hasattr(os, "readv") else _readinto(self.fd, view)

        def _write_at(self, view, offset: int) -> int:
            with self._lock:
                os.lseek(self.fd, offset, os.SEEK_SET)
                return os.write(self.fd, view)
    else:
        def _read_at(self, view, offset: int) -> int:
            return os.preadv(self.fd, [view], offset)

        def _write_at(self, view, offset: int) -> int:
            return os.pwrite(self.fd, view, offset)


class _NamedErrors:
    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        if isinstance(error, OSError) and error.filename is None and not isinstance(error, ShortRead):
            raise OSError(error.errno, error.strerror or str(error), str(self.path)) from error
        return False


def _readinto(fd: int, view) -> int:  # pragma: no cover - Windows
    chunk = os.read(fd, len(view))
    view[: len(chunk)] = chunk
    return len(chunk)


def preallocate(fd: int, size: int) -> None:
    """Reserve a file's blocks up front where the OS can, so a full disk fails at once rather
    than after the compute. Where it cannot (Windows, macOS, some file systems) the writes
    themselves report a full disk."""
    if size <= 0 or not hasattr(os, "posix_fallocate"):
        return
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)):
            raise


def copy_range(src: RandomAccess, src_offset: int, dst: RandomAccess, dst_offset: int, size: int) -> None:
    """Copy bytes between files, inside the kernel where it can (copy_file_range on Linux,
    which also makes reflinks on btrfs and XFS), else through a bounded buffer."""
    done = 0
    kernel = hasattr(os, "copy_file_range")
    while done < size:
        n = 0
        if kernel:
            try:
                n = os.copy_file_range(src.fd, dst.fd, size - done, src_offset + done, dst_offset + done)
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EIO, errno.EDQUOT):
                    raise
                kernel = False  # not supported between these files: copy through memory
        if n == 0:
            chunk = src.read(min(COPY_CHUNK, size - done), src_offset + done)
            dst.write_at(chunk, dst_offset + done)
            n = len(chunk)
        done += n


# --- directories ------------------------------------------------------------------------------
def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable. Windows has no directory fsync (NTFS journals renames)."""
    if WINDOWS:  # pragma: no cover
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:  # some file systems (network, FUSE) refuse fsync on a directory
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def same_device(a: Path, b: Path) -> bool:
    """Whether a rename from a to b can work (same file system)."""
    try:
        return os.stat(a).st_dev == os.stat(b).st_dev
    except OSError:
        return False


# --- locks ------------------------------------------------------------------------------------
class FileLock:
    """An exclusive advisory lock on an open file, released when the file is closed or the
    process dies (so a killed build never leaves a lock behind)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.fd: int | None = None

    def acquire(self, blocking: bool = True) -> bool:
        if self.fd is None:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            _lock(self.fd, blocking)
            return True
        except (BlockingIOError, PermissionError):
            if blocking:
                raise
            return False
        except OSError as e:
            if not blocking and e.errno in (errno.EAGAIN, errno.EACCES, errno.EDEADLK):
                return False
            raise

    def release(self) -> None:
        if self.fd is not None:
            try:
                _unlock(self.fd)
            finally:
                os.close(self.fd)
                self.fd = None


def lock_fd(fd: int, blocking: bool = True) -> bool:
    """Lock an already open file (a temp file being written); False if another holds it."""
    try:
        _lock(fd, blocking)
        return True
    except (BlockingIOError, PermissionError):
        return False
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES, errno.EDEADLK):
            return False
        raise


def is_locked(path: Path) -> bool:
    """Whether a live process holds the lock on `path` (a temp file being written, a process's
    liveness file). A dead process's lock is gone, whatever its PID became since."""
    try:
        fd = os.open(path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return False
    except OSError:
        return True  # cannot tell: assume it is in use
    try:
        if lock_fd(fd, blocking=False):
            _unlock(fd)
            return False
        return True
    finally:
        os.close(fd)


if WINDOWS:  # pragma: no cover
    def _lock(fd: int, blocking: bool) -> None:
        # msvcrt locks a byte range from the current position; lock one byte far past any data
        os.lseek(fd, 1 << 40, os.SEEK_SET)
        mode = msvcrt.LK_LOCK if blocking else msvcrt.LK_NBLCK
        while True:
            try:
                msvcrt.locking(fd, mode, 1)
                return
            except OSError:
                if not blocking:
                    raise BlockingIOError(errno.EAGAIN, "locked") from None

    def _unlock(fd: int) -> None:
        os.lseek(fd, 1 << 40, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
        except OSError:
            pass
else:
    def _lock(fd: int, blocking: bool) -> None:
        fcntl.flock(fd, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)

    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)


# --- signals ----------------------------------------------------------------------------------
def stop_signals() -> dict[int, str]:
    """The signals that ask a build to stop, with the exit code's name: SIGINT (Ctrl-C), SIGTERM
    (kill, timeout, docker stop) and, where the OS has it, SIGHUP (a closed terminal)."""
    import signal

    names = {"SIGINT": "interrupted", "SIGTERM": "terminated", "SIGHUP": "hung up", "SIGBREAK": "interrupted"}
    return {getattr(signal, n): why for n, why in names.items() if hasattr(signal, n)}

"""The one place for OS-level calls that differ between Linux, macOS and Windows.

Everything else in mergebuild reads, writes, copies, locks and replaces files through this
module, and `tests/unit/test_portable.py` fails if anything else calls a platform-specific
function. Each primitive picks what the running OS offers by what exists, not by its name, so the
fallbacks run here too (`make test` runs a part of the suite a second time with the Unix-only
calls taken away, docs/portability.md):

- positional reads and writes: `os.preadv`/`os.pwrite` where present; else a per-file lock
  around seek + read/write (Windows);
- kernel-side copies: `os.copy_file_range` (Linux; reflinks on btrfs and XFS), else a bounded
  buffer;
- locks: the `filelock` library (kept: torch already depends on it; flock on Unix,
  msvcrt.locking on Windows, released by the OS when the holder dies, so a lock tells a live
  process from a dead one where a PID cannot);
- directory fsync where the OS has it (not Windows: NTFS journals renames);
- atomic replace with `os.replace`, retried while Windows reports the target open elsewhere;
- change detection: a stamp that includes the change time (ctime on Unix, NTFS's ChangeTime on
  Windows).
"""

from __future__ import annotations

import errno
import os
import stat as stat_module
import sys
import threading
import time
from pathlib import Path


WINDOWS = sys.platform == "win32"
COPY_CHUNK = 64 << 20
REPLACE_TRIES = 10  # Windows: a file open in another program cannot be replaced; it may close soon


class ShortRead(OSError):
    """A file ended before the bytes its header promised: it was truncated or rewritten."""


# --- stamps: has a file changed? -------------------------------------------------------------
def file_stamp(path) -> tuple[int, int, int, int]:
    """What says a file is unchanged: (size, mtime_ns, change time, file id). The change time
    moves on every write and cannot be set back (`touch -d`, `cp -p` restore the mtime, not it),
    so an in-place rewrite that puts the mtime back is still seen."""
    st = os.stat(path)
    return (st.st_size, st.st_mtime_ns, _change_time_ns(path, st), st.st_ino)


def _change_time_ns(path, st: os.stat_result) -> int:
    if not WINDOWS:
        return st.st_ctime_ns
    # on Windows st_ctime is the creation time; NTFS keeps a change time reachable through the
    # Win32 API; where it is not (FAT, exFAT), the mtime stands in (docs/portability.md)
    return _windows_change_time(path) or st.st_mtime_ns  # pragma: no cover


def _windows_change_time(path) -> int | None:  # pragma: no cover - Windows only
    try:
        import ctypes
        from ctypes import wintypes

        class FileBasicInfo(ctypes.Structure):
            _fields_ = [("CreationTime", ctypes.c_longlong), ("LastAccessTime", ctypes.c_longlong),
                        ("LastWriteTime", ctypes.c_longlong), ("ChangeTime", ctypes.c_longlong),
                        ("FileAttributes", wintypes.DWORD)]

        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
        handle = kernel32.CreateFileW(str(path), 0x80, 0x7, None, 3, 0x02000000, None)  # read attributes
        if handle in (None, -1, ctypes.c_void_p(-1).value):
            return None
        try:
            info = FileBasicInfo()
            if not kernel32.GetFileInformationByHandleEx(handle, 0, ctypes.byref(info), ctypes.sizeof(info)):
                return None
            return (info.ChangeTime - 116444736000000000) * 100 if info.ChangeTime else None
        finally:
            kernel32.CloseHandle(handle)
    except (OSError, AttributeError, ValueError):
        return None


def is_regular_file(st: os.stat_result) -> bool:
    return stat_module.S_ISREG(st.st_mode)


def disk_usage(st: os.stat_result) -> int:
    """Bytes a file really takes on disk (blocks allocated), as `du` counts them."""
    blocks = getattr(st, "st_blocks", None)
    if blocks is not None:
        return blocks * 512
    return (st.st_size + 4095) // 4096 * 4096  # Windows: whole clusters


# --- positional I/O ---------------------------------------------------------------------------
def _positional() -> bool:
    return hasattr(os, "preadv") and hasattr(os, "pwrite")


class RandomAccess:
    """One open file read (and written) at explicit offsets from several threads at once.

    With pread/pwrite one descriptor serves every thread (no shared position); without them a
    lock around seek + read/write does. Reads go into caller-owned buffers and never map the
    file, so a file truncated under a build gives ShortRead, never SIGBUS."""

    def __init__(self, path: Path, writable: bool = False, create: bool = False):
        self.path = Path(path)
        flags = os.O_RDWR if writable else os.O_RDONLY
        if create:
            flags |= os.O_CREAT | os.O_TRUNC
        flags |= getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
        self.fd = os.open(self.path, flags, 0o644)
        self._seek_lock = None if _positional() else threading.Lock()

    def read_into(self, view, offset: int) -> None:
        """Fill `view` (a writable buffer) from `offset`; ShortRead if the file ends first."""
        view = memoryview(view).cast("B")
        done = 0
        while done < len(view):
            with _NamedErrors(self.path):
                n = self._read_at(view[done : done + COPY_CHUNK], offset + done)
            if n == 0:
                raise ShortRead(errno.EIO, f"the file ended at byte {offset + done}, "
                                f"{len(view) - done} bytes short (truncated or rewritten?)", str(self.path))
            done += n

    def read(self, size: int, offset: int):
        """`size` bytes from `offset`, in a fresh buffer that is not zeroed first (numpy's empty:
        no memset; large sizes reuse freed heap memory rather than faulting in new pages)."""
        import numpy  # here, not at the top: a no-op build reads no tensor bytes

        buf = numpy.empty(size, dtype=numpy.uint8)
        self.read_into(buf, offset)
        return buf

    def write_at(self, data, offset: int) -> None:
        view = memoryview(data).cast("B")
        with _NamedErrors(self.path):
            while view:
                n = self._write_at(view, offset)
                view, offset = view[n:], offset + n

    def truncate(self, size: int) -> None:
        with _NamedErrors(self.path):
            os.ftruncate(self.fd, size)

    def preallocate(self, size: int) -> None:
        with _NamedErrors(self.path):
            preallocate(self.fd, size)

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def fsync(self) -> None:
        with _NamedErrors(self.path):
            os.fsync(self.fd)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _read_at(self, view, offset: int) -> int:
        if self._seek_lock is None:
            return os.preadv(self.fd, [view], offset)
        with self._seek_lock:
            os.lseek(self.fd, offset, os.SEEK_SET)
            chunk = os.read(self.fd, len(view))
        view[: len(chunk)] = chunk
        return len(chunk)

    def _write_at(self, view, offset: int) -> int:
        if self._seek_lock is None:
            return os.pwrite(self.fd, view, offset)
        with self._seek_lock:
            os.lseek(self.fd, offset, os.SEEK_SET)
            return os.write(self.fd, view)


class _NamedErrors:
    """OS errors raised by calls on a descriptor carry no file name: attach this file's."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        if isinstance(error, OSError) and error.filename is None and not isinstance(error, ShortRead):
            raise OSError(error.errno, error.strerror or str(error), str(self.path)) from error
        return False


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


_SYNC_FILE_RANGE_WRITE = 2  # Linux: start writing the range's dirty pages back, without waiting
_sync_file_range = []  # [the function, or None], looked up once


def start_writeback(fd: int) -> None:
    """Ask the OS to start writing a file's dirty pages to disk now, without waiting for it
    (Linux's sync_file_range; a no-op elsewhere). Left alone, the kernel starts only once 10% of
    memory is dirty or after 30 s, so the fsync at commit writes a whole output while the build
    waits; started as the file is written, that writing overlaps the compute."""
    if not _sync_file_range:
        _sync_file_range.append(_find_sync_file_range())
    if _sync_file_range[0] is not None:
        _sync_file_range[0](fd, 0, 0, _SYNC_FILE_RANGE_WRITE)  # an error changes nothing: fsync reports it


def _find_sync_file_range():
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    function = _libc_function("sync_file_range")
    if function is not None:  # (fd, offset, nbytes, flags): 64-bit offsets on every platform
        function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return function


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
                if e.errno in (errno.ENOSPC, errno.EIO, getattr(errno, "EDQUOT", errno.ENOSPC)):
                    raise OSError(e.errno, e.strerror, str(dst.path)) from e
                kernel = False  # not supported between these files: copy through memory
        if n == 0:
            chunk = src.read(min(COPY_CHUNK, size - done), src_offset + done)
            dst.write_at(chunk, dst_offset + done)
            n = len(chunk)
        done += n


# --- files and folders ------------------------------------------------------------------------
def replace(src: Path, dst: Path) -> None:
    """os.replace, which is atomic; on Windows a target open in another program (a UI that has
    the model loaded) refuses it for a while: retry, then say so."""
    for attempt in range(REPLACE_TRIES):
        try:
            os.replace(src, dst)
            return
        except PermissionError as e:
            if not WINDOWS or attempt == REPLACE_TRIES - 1:  # pragma: no cover - Windows
                if WINDOWS:
                    raise OSError(e.errno, "it is open in another program (close it there, or name another "
                                  "output)", str(dst)) from e
                raise
            time.sleep(0.05 * (attempt + 1))  # pragma: no cover - Windows


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable where the OS can fsync a folder (not Windows, whose
    os.open refuses folders; NTFS journals renames)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except (PermissionError, IsADirectoryError, OSError):
        return
    try:
        os.fsync(fd)
    except OSError as e:  # some file systems (network, FUSE) refuse fsync on a folder
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES, errno.EPERM, errno.EISDIR):
            raise
    finally:
        os.close(fd)


def file_identity(path) -> tuple[int, int, int, int, int]:
    """A file's identity across paths: (device, file id, size, mtime_ns, change time). What the
    per-user fingerprint store keys on (store/fingerprints.py): the same file named by any
    project, any cache; a rewrite in place changes the change time."""
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, _change_time_ns(path, st))


def user_cache_dir(app: str) -> Path:
    """The user's cache folder for `app`: %LOCALAPPDATA% on Windows, ~/Library/Caches on macOS,
    $XDG_CACHE_HOME (when absolute, as the XDG spec asks) or ~/.cache elsewhere."""
    if WINDOWS:
        base = os.environ.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = str(Path.home() / "Library" / "Caches")
    else:
        xdg = os.environ.get("XDG_CACHE_HOME", "")
        base = xdg if os.path.isabs(xdg) else str(Path.home() / ".cache")
    return Path(base) / app


def same_device(a: Path, b: Path) -> bool:
    """Whether a rename from a to b can work (same file system)."""
    try:
        return os.stat(a).st_dev == os.stat(b).st_dev
    except OSError:
        return False


# --- locks ------------------------------------------------------------------------------------
class FileLock:
    """An exclusive lock on a lock file, released when released, or by the OS when the process
    dies (so a killed build never leaves a lock behind). The `filelock` library does the locking
    on each OS."""

    def __init__(self, path: Path):
        import filelock

        self.path = Path(path)
        self._lock = filelock.FileLock(str(self.path), thread_local=False)
        self._timeout = filelock.Timeout

    def acquire(self, blocking: bool = True) -> bool:
        try:
            self._lock.acquire(timeout=-1 if blocking else 0)
            return True
        except self._timeout:
            return False

    def release(self) -> None:
        if self._lock.is_locked:
            self._lock.release()

    @property
    def held(self) -> bool:
        return self._lock.is_locked


def is_locked(path: Path) -> bool:
    """Whether a live process holds the lock on `path` (a temp being written, a process's
    liveness file). A dead process's lock is gone, whatever its PID became since."""
    if not Path(path).exists():
        return False
    probe = FileLock(path)
    try:
        if probe.acquire(blocking=False):
            probe.release()
            return False
        return True
    except OSError:
        return True  # cannot tell: assume it is in use


# --- signals ----------------------------------------------------------------------------------
def stop_signals() -> dict[int, str]:
    """The signals that ask a build to stop, with what they mean: SIGINT (Ctrl-C), SIGTERM
    (kill, timeout, docker stop), SIGHUP (a closed terminal) and SIGBREAK (Ctrl-Break) where
    the OS has them."""
    import signal

    names = {"SIGINT": "interrupted", "SIGTERM": "terminated", "SIGHUP": "hung up", "SIGBREAK": "interrupted"}
    return {getattr(signal, n): why for n, why in names.items() if hasattr(signal, n)}


# --- memory -----------------------------------------------------------------------------------
def release_freed_memory() -> None:
    """Hand the heap's free pages back to the OS (glibc's malloc_trim; a no-op elsewhere). After
    a phase that freed many mid-sized tensors (a statistic's read window), glibc keeps their
    pages (its mmap threshold grows to 32 MB), so the next phase's peak would stack on top."""
    trim = _libc_function("malloc_trim")  # glibc only (not macOS, musl, Windows)
    if trim is not None:
        trim(0)


STREAMING_MMAP = 4 << 20  # bytes: while tensors stream, blocks this large get pages of their own
WHOLE_TENSOR_MMAP = 32 << 20  # while whole-tensor methods run: glibc's own ceiling
HEAP_KEEP = 64 << 20  # bytes of freed blocks the heap keeps for the next ones (glibc's trim threshold)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
_mallopt = []  # [the function, or None], looked up once


def set_mmap_threshold(size: int) -> None:
    """Fix glibc's mmap threshold: blocks of `size` bytes or more get pages of their own, returned
    to the OS when freed (a no-op off glibc, or where the user set MALLOC_MMAP_THRESHOLD_ or a
    glibc tunable). Left to itself glibc raises it to up to 32 MB as big blocks are freed; then a
    streaming build's 4-32 MB results come from the heap, whose freed pages stay there,
    fragmented: a cold SD1.5 weighted sum peaked at 0.91-1.05 GB, against 0.62-0.66 GB with 4 MB,
    at about the same time. Whole-tensor methods (TIES' float32 working copies) would pay a page
    fault per page for every fresh block at 4 MB (98.7 s against 54.4 s, 82 s of system time):
    they run at 32 MB, where glibc would have put it (docs/caching.md#memory).

    The heap keeps HEAP_KEEP bytes (at least twice `size`) of freed blocks instead of handing
    them back: at glibc's 128 KB a streaming build's 4 MB chunk results went back to the OS and
    were faulted in again, page by page, at the next chunk (a cold SD1.5 weighted sum: 0.69-0.81
    million page faults with the streaming threshold alone, 0.46-0.52 million with this too)."""
    if not _mallopt:
        _mallopt.append(_find_mallopt())
    if _mallopt[0] is not None:
        _mallopt[0](_M_MMAP_THRESHOLD, size)
        if "MALLOC_TRIM_THRESHOLD_" not in os.environ:  # else the user's choice
            _mallopt[0](_M_TRIM_THRESHOLD, max(HEAP_KEEP, 2 * size))


def _find_mallopt():
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "GLIBC_TUNABLES" in os.environ or not sys.platform.startswith("linux"):
        return None  # the user's choice; elsewhere, another allocator (and other parameter numbers)
    return _libc_function("mallopt")


def _libc_function(name: str):
    """A function of the C library this process runs on, or None (Windows has no process-wide
    symbol table; another libc may lack it)."""
    import ctypes

    try:
        return getattr(ctypes.CDLL(None), name, None)
    except (OSError, TypeError):
        return None


# --- cores ------------------------------------------------------------------------------------
def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity where the OS has one (Linux; a
    container or `taskset` narrows it), else every core."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS, Windows
        return max(1, os.cpu_count() or 1)

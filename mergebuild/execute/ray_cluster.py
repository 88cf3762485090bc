"""Reaching a Ray cluster, for `mergebuild --ray` and `mergebuild tune --ray` (docs/cluster.md).

Ray is an optional extra (`pip install mergebuild[ray]`): only this module and the modules that
run work on Ray import it, and only when --ray is given, so a plain build never loads it.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

from mergebuild.errors import UsageError

INSTALL = "pip install mergebuild[ray]"


def import_ray():
    """The ray module, or one line saying how to install it (exit 2)."""
    try:
        import ray
    except ImportError:
        raise UsageError(f"--ray needs Ray, which is not installed here: {INSTALL}") from None
    return ray


def connect(address: str | None):
    """Join the cluster at `address` (None or "": RAY_ADDRESS, else a local Ray started for this
    run); a process already connected (a test's session, a notebook) keeps its connection.
    Returns the ray module. An unreachable cluster is one line (exit 2)."""
    ray = import_ray()
    if ray.is_initialized():
        return ray
    where = address or os.environ.get("RAY_ADDRESS") or None
    _probe(where)
    try:
        ray.init(address=where, include_dashboard=False, logging_level=logging.ERROR,
                 configure_logging=True, log_to_driver=False)
        sys.stdout = MainThreadStdout(sys.stdout, sys.stderr)
    except Exception as e:  # noqa: BLE001 (ConnectionError, ValueError, RuntimeError, TimeoutError: all one line)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"--ray: cannot reach the Ray cluster at {where or 'a new local instance'}: {first}") from None
    return ray


class MainThreadStdout:
    """stdout while this process is a Ray driver: Ray's listener threads print what the cluster
    says ("(raylet) A worker died ...") to sys.stdout, which would break `--json`; writes from
    any thread but the main one go to stderr, where messages for people belong."""

    def __init__(self, out, err):
        self._out, self._err = out, err

    def _target(self):
        return self._out if threading.current_thread() is threading.main_thread() else self._err

    def write(self, text: str) -> int:
        return self._target().write(text)

    def flush(self) -> None:
        self._out.flush()
        self._err.flush()

    def __getattr__(self, name):
        return getattr(self._out, name)


PROBE_SECONDS = 3.0


def _probe(address: str | None) -> None:
    """A HOST:PORT that nothing listens on is one line at once: ray.init would retry for
    minutes, printing as it goes. ("auto" and None are Ray's to resolve; it fails fast there.)"""
    import socket

    if not address or address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise UsageError(f"--ray={address}: expected HOST:PORT (or ray://HOST:PORT, auto)")
    try:
        socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=PROBE_SECONDS).close()
    except OSError as e:
        raise UsageError(f"--ray: cannot reach the Ray cluster at {address}: {e.strerror or e}") from None


def cluster_slots(ray, gpus: bool = False) -> int:
    """How many tasks the cluster runs at once: its CPUs (its GPUs for a GPU build), at least 1."""
    resources = ray.cluster_resources()
    return max(1, int(resources.get("GPU" if gpus else "CPU", 0)))


def task_error(ray, error: BaseException) -> BaseException:
    """The error a worker raised, as the driver reports it: a mergebuild error stays itself (its
    one line, its exit code); a worker that died is a BuildError naming Ray."""
    from mergebuild.errors import BuildError, MergebuildError

    if isinstance(error, ray.exceptions.RayTaskError):
        cause = getattr(error, "cause", None)
        if isinstance(cause, MergebuildError):
            return cause
        if isinstance(cause, BaseException):
            return BuildError(f"a Ray worker failed: {type(cause).__name__}: {cause}")
    if isinstance(error, (ray.exceptions.WorkerCrashedError, ray.exceptions.RayActorError,
                          ray.exceptions.NodeDiedError, ray.exceptions.ObjectLostError)):
        return BuildError(f"a Ray worker died: {type(error).__name__}")
    return error

"""A lazily imported torch: modules can name torch at import time, and only pay its import
(about a second) when a tensor is really touched. A no-op build never does.

A small proxy rather than importlib's LazyLoader, which is not thread-safe before Python 3.12
(reader threads may be the first to touch torch). Torch is never imported ahead in a thread of
its own: a Ctrl-C that lands while the main thread is inside an import leaves that import's
module lock held, the other thread waits on it forever and the process hangs at exit (seen:
tests/e2e/test_robustness.py's Ctrl-C test).
"""

from __future__ import annotations

import importlib
import os
import threading


class _LazyModule:
    def __init__(self, name: str):
        self._name = name
        self._module = None
        self._lock = threading.Lock()

    def _load(self):
        with self._lock:
            if self._module is None:
                # OpenMP's worker threads spin between the many small tensor ops of a merge,
                # burning the cores the reader, writer and hasher threads need (measured: user
                # time doubled on 2 cores). Passive waiting must be set before torch loads OpenMP.
                os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
                self._module = importlib.import_module(self._name)
        return self._module

    def __getattr__(self, attr: str):
        module = self._module or self._load()
        return getattr(module, attr)


torch = _LazyModule("torch")
numpy = _LazyModule("numpy")  # for modules a no-op imports (the method modules) but only a merge uses


def torch_dtype(code: str):
    """The torch dtype of a safetensors dtype code ("F16" -> torch.float16)."""
    from mergebuild.dtypes import TORCH_NAMES

    return getattr(torch, TORCH_NAMES[code])


def dtype_code(dtype) -> str:
    """The safetensors dtype code of a torch dtype."""
    from mergebuild.dtypes import FROM_TORCH_NAME

    return FROM_TORCH_NAME[str(dtype).removeprefix("torch.")]

"""A lazily imported torch: modules can name torch at import time, and only pay its import
(about a second) when a tensor is really touched. A no-op build never does."""

from __future__ import annotations

import importlib.util
import sys


def _lazy(name: str):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    if spec is None:  # pragma: no cover - torch is a hard requirement
        raise ImportError(f"{name} is not installed")
    spec.loader = importlib.util.LazyLoader(spec.loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


torch = _lazy("torch")


def torch_dtype(code: str):
    """The torch dtype of a safetensors dtype code ("F16" -> torch.float16)."""
    from mergebuild.dtypes import TORCH_NAMES

    return getattr(torch, TORCH_NAMES[code])


def dtype_code(dtype) -> str:
    """The safetensors dtype code of a torch dtype."""
    from mergebuild.dtypes import FROM_TORCH_NAME

    return FROM_TORCH_NAME[str(dtype).removeprefix("torch.")]

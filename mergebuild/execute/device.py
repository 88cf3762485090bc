"""Device and dtype choices. Importing this module does not import torch; calling it does."""

from __future__ import annotations

from mergebuild.errors import UsageError
from mergebuild.torchlazy import torch


def resolve_device(name: str):
    """auto -> cuda when available, else cpu; a cuda request without CUDA is a usage error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"device {name!r} asked for, but CUDA is not available here")
    return torch.device(name)

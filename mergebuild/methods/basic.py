"""The three methods of A1111's checkpoint merger (../docs/methods.md)."""

from __future__ import annotations

from mergebuild.methods.registry import Method, Param
from mergebuild.torchlazy import torch


def weighted_sum(a, b, *, alpha: float):
    """(1 - alpha) * A + alpha * B: alpha is B's share, as in A1111 and supermerger.

    torch.lerp is one fused pass; it differs from A1111's two products only in float32 rounding."""
    return torch.lerp(a, b, alpha)


def add_difference(a, b, c, *, alpha: float):
    """A + alpha * (B - C): add the difference B - C (a fine-tune minus its base) to A."""
    return torch.add(a, b - c, alpha=alpha)


def copy(a):
    """A itself; used to convert formats, cast dtypes and discard keys."""
    return a


ALPHA = Param("alpha", float, doc="B's share (weighted_sum) or the difference's multiplier (add_difference)")

# whose numbers these methods reproduce (shown by `mergebuild methods NAME`)
FOLLOWS = "A1111's checkpoint merger"
METHODS = [
    Method("weighted_sum", 1, weighted_sum, ("A", "B"), (ALPHA,), weighted_sum.__doc__, elementwise=True),
    Method("add_difference", 1, add_difference, ("A", "B", "C"), (ALPHA,), add_difference.__doc__, elementwise=True),
    Method("copy", 1, copy, ("A",), (), copy.__doc__, merges_tensors=False, elementwise=True),
]

"""The three methods of A1111's checkpoint merger (../docs/methods.md)."""

from __future__ import annotations

from mergebuild.methods.registry import Method, Param
from mergebuild.torchlazy import torch, torch_dtype

ARITHMETIC = ("exact", "a1111")
A1111_DTYPES = ("F16", "BF16", "F32", "F64")  # the dtypes A1111's arithmetic can be done in


def weighted_sum(a, b, *, alpha: float, arithmetic: str = "exact", dtypes=None):
    """(1 - alpha) * A + alpha * B: alpha is B's share, as in A1111 and supermerger.

    arithmetic "exact": one fused torch.lerp in the compute dtype. "a1111": A1111's
    ((1 - alpha) * A) + (alpha * B), each op in the inputs' own dtypes (float16 for float16 files)
    and rounded there, as A1111 does."""
    if _a1111(arithmetic):
        x, y = _as_stored((a, b), dtypes)
        return (((1 - alpha) * x) + (alpha * y)).to(a.dtype)
    return torch.lerp(a, b, alpha)


def add_difference(a, b, c, *, alpha: float, arithmetic: str = "exact", dtypes=None):
    """A + alpha * (B - C): add the difference B - C (a fine-tune minus its base) to A.

    arithmetic "a1111": A1111's A + (alpha * (B - C)), each op in the inputs' own dtypes."""
    if _a1111(arithmetic):
        x, y, z = _as_stored((a, b, c), dtypes)
        return (x + (alpha * (y - z))).to(a.dtype)
    return torch.add(a, b - c, alpha=alpha)


def copy(a):
    """A itself; used to convert formats, cast dtypes and discard keys."""
    return a


def _a1111(arithmetic: str) -> bool:
    if arithmetic not in ARITHMETIC:
        raise ValueError(f"arithmetic must be one of {ARITHMETIC}, got {arithmetic!r}")
    return arithmetic == "a1111"


# which dtypes each compute dtype holds exactly: the stored values come back unchanged
_HOLDS = {"float64": {"F64", "F32", "F16", "BF16"}, "float32": {"F32", "F16", "BF16"},
          "float16": {"F16"}, "bfloat16": {"BF16"}}


def _as_stored(xs, dtypes):
    """The tensors back in the dtypes they are stored in (None: as they are given). They reach
    the method converted to the compute dtype, which must hold them exactly."""
    if dtypes is None:
        return xs
    out = []
    for x, code in zip(xs, dtypes):
        if code not in A1111_DTYPES:
            raise ValueError(f"arithmetic = 'a1111' computes in the files' own dtypes: float16, bfloat16, "
                             f"float32 or float64, not {code}")
        if code not in _HOLDS.get(str(x.dtype).removeprefix("torch."), ()):
            raise ValueError(f"arithmetic = 'a1111' needs a compute_dtype that holds {code} exactly "
                             f"(float32 or float64), not {str(x.dtype).removeprefix('torch.')}")
        out.append(x.to(torch_dtype(code)))
    return out


ALPHA = Param("alpha", float, doc="B's share (weighted_sum) or the difference's multiplier (add_difference)")
ARITHMETIC_PARAM = Param("arithmetic", str, "exact", "exact: in the compute dtype, fused; a1111: A1111's "
                         "ops in the inputs' own dtypes (float16 files in float16), each rounded",
                         choices=ARITHMETIC, implicit=True)


def _wants_dtypes(params: dict) -> bool:
    return params.get("arithmetic") == "a1111"


def _always(params: dict) -> bool:
    return True  # torch.lerp computes in float and rounds once; A1111's ops are float16 either way


# whose numbers these methods reproduce (shown by `mergebuild methods NAME`)
FOLLOWS = "A1111's checkpoint merger"
METHODS = [
    Method("weighted_sum", 1, weighted_sum, ("A", "B"), (ALPHA, ARITHMETIC_PARAM), weighted_sum.__doc__,
           elementwise=True, input_dtypes=_wants_dtypes, stored_dtype=_always),
    Method("add_difference", 1, add_difference, ("A", "B", "C"), (ALPHA, ARITHMETIC_PARAM), add_difference.__doc__,
           elementwise=True, input_dtypes=_wants_dtypes,
           stored_dtype=_wants_dtypes),  # A1111's ops only: the exact one is two ops, two roundings on halves
    Method("copy", 1, copy, ("A",), (), copy.__doc__, merges_tensors=False, elementwise=True),
]

"""Two- and three-model methods of supermerger and sd-meh, and slerp (../../docs/methods.md).

As in A1111, alpha is B's share in every interpolation unless the method says otherwise. Each
function sees one tensor of each input (already in the compute dtype) and never changes them.
"""

from __future__ import annotations

import math

from mergebuild.methods.common import as_1d, check_range
from mergebuild.methods.registry import Method, Param
from mergebuild.torchlazy import torch

COLINEAR = 0.9995  # slerp falls back to lerp when |cos| of the angle is above this (mergekit's threshold)
NORM_EPS = 1e-8  # a tensor whose norm is at most this counts as zero


# --- linear mixes and slice swaps (supermerger modes, meh) --------------------------------


# methods whose output element i depends on element i of the inputs only
ELEMENTWISE = {"sum_twice", "triple_sum", "weighted_subtraction"}

def sum_twice(a, b, c, *, alpha: float, beta: float):
    """lerp(lerp(A, B, alpha), C, beta): B mixed into A, then C into that (supermerger "Sum Twice")."""
    return torch.lerp(torch.lerp(a, b, alpha), c, beta)


def triple_sum(a, b, c, *, alpha: float, beta: float):
    """(1 - alpha - beta) * A + alpha * B + beta * C (supermerger "Triple sum", meh)."""
    out = a * (1.0 - alpha - beta)
    out.add_(b, alpha=alpha)
    out.add_(c, alpha=beta)
    return out


def weighted_subtraction(a, b, *, alpha: float, beta: float):
    """(A - alpha*beta*B) / (1 - alpha*beta): remove B's share from A (meh).

    meh nudges beta by 1e-10 when alpha = beta = 1 and so returns huge numbers; mergebuild refuses
    every alpha*beta == 1 instead."""
    ab = alpha * beta
    if ab == 1:
        raise ValueError(f"weighted_subtraction is undefined for alpha*beta == 1 (alpha={alpha}, beta={beta})")
    return (a - ab * b) / (1.0 - ab)


def tensor_sum(a, b, *, alpha: float, beta: float, variant: str = "tensor"):
    """A with a slice of B: rows n*beta up to n*(alpha+beta) of dim 0 come from B (supermerger "tensor", meh).

    Bounds are truncated to ints. When alpha + beta > 1 the band wraps: start from B and copy rows
    [n*(alpha+beta-1), n*beta) from A. variant "tensor2" slices dim 1 when it has more than 100
    entries, as supermerger's tensor2 does. A 0-d tensor is A."""
    if a.dim() == 0:
        return a
    dim = 1 if variant == "tensor2" and a.dim() > 1 and a.shape[1] > 100 else 0
    n = a.shape[dim]
    if alpha + beta <= 1:
        out, src = a.clone(), b
        start, end = int(n * beta), int(n * (alpha + beta))
    else:
        out, src = b.clone(), a
        start, end = int(n * (alpha + beta - 1)), int(n * beta)
    index = (slice(None),) * dim + (slice(start, end),)
    out[index] = src[index]
    return out


# --- slerp --------------------------------------------------------------------------------


def slerp(a, b, *, alpha: float, variant: str = "mergekit"):
    """Spherical interpolation from A (alpha=0) to B (alpha=1) over the whole tensor.

    The angle comes from the normalised tensors: cos(omega) = <A/|A|, B/|B|>, and
    s_a = sin((1-alpha) omega) / sin(omega), s_b = sin(alpha omega) / sin(omega).
    variant "mergekit": s_a*A + s_b*B (the raw tensors, as mergekit does).
    variant "mecha": (s_a*A/|A| + s_b*B/|B|) * lerp(|A|, |B|, alpha) (as sd-mecha does).
    Both fall back to lerp(A, B, alpha) when a norm is zero or |cos| > 0.9995."""
    na = torch.linalg.vector_norm(a).item()
    nb = torch.linalg.vector_norm(b).item()
    if na <= NORM_EPS or nb <= NORM_EPS:
        return torch.lerp(a, b, alpha)
    dot = (torch.sum(a * b).item() / na) / nb
    if abs(dot) > COLINEAR or not math.isfinite(dot):
        return torch.lerp(a, b, alpha)
    omega = math.acos(max(-1.0, min(1.0, dot)))
    s_a = math.sin((1.0 - alpha) * omega) / math.sin(omega)
    s_b = math.sin(alpha * omega) / math.sin(omega)
    if variant == "mecha":
        scale = na + alpha * (nb - na)
        s_a, s_b = s_a * scale / na, s_b * scale / nb
    out = a * s_a
    out.add_(b, alpha=s_b)
    return out


# --- supermerger calcmodes ----------------------------------------------------------------


def train_difference(a, b, c, *, alpha: float):
    """A + 1.8*alpha*(B - C) * |B - A| / (|B - C| + |B - A|) (supermerger "trainDifference").

    The fraction is 0 where its denominator is 0; B == C everywhere returns A."""
    if torch.equal(b, c):
        return a
    diff = b - c
    to_a = (b - a).abs()
    total = diff.abs() + to_a
    nonzero = total != 0
    scale = torch.where(nonzero, to_a / torch.where(nonzero, total, torch.ones_like(total)), torch.zeros_like(total))
    return a + diff * scale * (alpha * 1.8)


def _percentile_midpoint(sorted_values, q: float):
    """numpy's percentile(method="midpoint") of an ascending 1-D tensor."""
    pos = q / 100.0 * (sorted_values.numel() - 1)
    return (sorted_values[math.floor(pos)] + sorted_values[math.ceil(pos)]) / 2


def _trimmed_range(sims) -> tuple[float, float]:
    """(min, max) of the similarities after dropping those below the 1st percentile, then those
    above the 99th percentile of what is left (supermerger's trimming, per tensor). Falls back to
    (-1, 1), the range of a cosine, when fewer than two distinct values remain."""
    values = torch.sort(sims.reshape(-1)).values
    values = values[values >= _percentile_midpoint(values, 1)]
    values = values[values <= _percentile_midpoint(values, 99)]
    low, high = values[0].item(), values[-1].item()
    if not high > low:
        return -1.0, 1.0
    return low, high


def _whole_cosine(x, y):
    """<x, y> / (|x| |y|) over the whole tensors; 0 when either is zero."""
    nx, ny = torch.linalg.vector_norm(x), torch.linalg.vector_norm(y)
    denom = nx * ny
    return torch.where(denom > 0, torch.sum(x * y) / torch.where(denom > 0, denom, torch.ones_like(denom)), torch.zeros_like(denom))


def _cosine_mix(a, b, alpha: float, normalise: bool):
    shape = a.shape
    a, b = as_1d(a), as_1d(b)
    x, y = a, b
    if normalise:
        x = torch.nn.functional.normalize(a, p=2, dim=0)
        y = torch.nn.functional.normalize(b, p=2, dim=0)
    column = torch.nn.functional.cosine_similarity(x, y, dim=0)  # shape[1:]
    sims = (column + _whole_cosine(x, y)) / 2
    low, high = _trimmed_range(sims)
    k = ((sims - low) / (high - low) - alpha).clamp(0.0, 1.0)
    return torch.lerp(b, a, k).reshape(shape)


def cosine_a(a, b, *, alpha: float):
    """lerp(B, A, k): the more similar a column of A and B, the more of A (supermerger "cosineA").

    Both tensors are L2-normalised along dim 0; s = (cos along dim 0 + cos of the whole tensors) / 2;
    k = clip((s - min) / (max - min) - |alpha|, 0, 1). min and max come from this tensor's s after
    trimming the 1st and 99th percentiles (supermerger takes them over all keys)."""
    return _cosine_mix(a, b, abs(alpha), normalise=True)


def cosine_b(a, b, *, alpha: float):
    """As cosine_a, on the raw tensors and with alpha instead of |alpha| (supermerger "cosineB")."""
    return _cosine_mix(a, b, alpha, normalise=False)


def extract(a, b, c, *, alpha: float, beta: float, gamma: float = 1.0):
    """A + lerp(B-A, C-A, alpha) * lerp(d, 1-d, beta): similar or dissimilar features (supermerger "extract").

    d = ((cos(B-A, C-A) + 1) / 2) ** gamma, the cosine taken along the last dim. beta = 0 keeps
    what B and C agree on, beta = 1 what they disagree on."""
    check_range("alpha", alpha, 0.0, 1.0)
    check_range("beta", beta, 0.0, 1.0)
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    shape = a.shape
    base = as_1d(a)
    x, y = as_1d(b) - base, as_1d(c) - base
    cos = torch.nn.functional.cosine_similarity(x, y, dim=-1).clamp(-1.0, 1.0).unsqueeze(-1)
    d = ((cos + 1) / 2) ** gamma
    return (base + torch.lerp(x, y, alpha) * torch.lerp(d, 1 - d, beta)).reshape(shape)


ALPHA = Param("alpha", float, doc="B's share (see docs/methods.md for each method)")
BETA = Param("beta", float, doc="the second ratio: C's share, or the slice offset")


def _method(fn, inputs, *params, version=1):
    return Method(fn.__name__, version, fn, inputs, params, fn.__doc__, elementwise=fn.__name__ in ELEMENTWISE)


# whose numbers these methods reproduce (shown by `mergebuild methods NAME`)
FOLLOWS = "supermerger and sd-meh (where they differ: docs/methods.md)"
METHODS = [
    _method(sum_twice, ("A", "B", "C"), ALPHA, BETA),
    _method(triple_sum, ("A", "B", "C"), ALPHA, BETA),
    _method(weighted_subtraction, ("A", "B"), ALPHA, BETA),
    _method(tensor_sum, ("A", "B"), Param("alpha", float, doc="width of B's slice, a fraction of the dim"),
            Param("beta", float, doc="start of B's slice, a fraction of the dim"),
            Param("variant", str, "tensor", "tensor: slice dim 0; tensor2: slice dim 1 when it has > 100 entries",
                  choices=("tensor", "tensor2"))),
    _method(slerp, ("A", "B"), Param("alpha", float, doc="B's share (mergekit's t)"),
            Param("variant", str, "mergekit", "mergekit: combine the raw tensors; mecha: combine the "
                  "normalised tensors and rescale to lerp(|A|, |B|, alpha)", choices=("mergekit", "mecha"))),
    _method(train_difference, ("A", "B", "C"), Param("alpha", float, doc="multiplier of the trained difference")),
    _method(cosine_a, ("A", "B"), Param("alpha", float, doc="shifts k toward B (|alpha| is used)")),
    _method(cosine_b, ("A", "B"), Param("alpha", float, doc="shifts k toward B")),
    _method(extract, ("A", "B", "C"), Param("alpha", float, doc="C-A's share of the difference, 0..1"),
            Param("beta", float, doc="0 keeps similar features, 1 keeps dissimilar ones, 0..1"),
            Param("gamma", float, 1.0, "sharpness of the similarity weight d, >= 0")),
]

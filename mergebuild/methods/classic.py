"""Two- and three-model methods of supermerger and sd-meh, and slerp (../../docs/methods.md).

As in A1111, alpha is B's share in every interpolation unless the method says otherwise. Each
function sees one tensor of each input (already in the compute dtype) and never changes them.
"""

from __future__ import annotations

import math

from mergebuild.methods.common import as_1d, check_range
from mergebuild.methods.registry import Method, Param
from mergebuild.torchlazy import torch

COLINEAR = 0.9995  # mergekit's slerp lerps when |cos| of the angle is above this (its DOT_THRESHOLD)
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

MERGEKIT_CHUNK = 1024 * 1024  # elements: mergekit 0.1.5 reduces a weight's norms and dot in chunks this long


def slerp(a, b, *, alpha: float, variant: str = "mergekit"):
    """Spherical interpolation from A (alpha=0) to B (alpha=1) over the whole tensor.

    The angle comes from the normalised tensors: cos(omega) = <A/|A|, B/|B|>, and
    s_a = sin((1-alpha) omega) / sin(omega), s_b = sin(alpha omega) / sin(omega).
    variant "mergekit": s_a*A + s_b*B (the raw tensors), with mergekit 0.1.5's ops: float32 (float64
    for float64 inputs) tensors throughout, (1-alpha)*A + alpha*B where |cos| > 0.9995, a zero
    tensor counted as orthogonal to the other.
    variant "mecha": (s_a*A/|A| + s_b*B/|B|) * lerp(|A|, |B|, alpha), with sd-mecha 1.1.8's ops in
    the compute dtype: it slerps however parallel the tensors, and lerps only where that gives NaN."""
    if variant == "mecha":
        return _slerp_mecha(a, b, alpha)
    if variant != "mergekit":
        raise ValueError(f"variant must be 'mergekit' or 'mecha', got {variant!r}")
    return _slerp_mergekit(a, b, alpha)


def _slerp_mergekit(v0, v1, alpha: float, dot_threshold: float = COLINEAR, eps: float = NORM_EPS):
    """mergekit 0.1.5's slerp (merge_methods/slerp.py) of one weight: a batch of one output."""
    dtype = torch.float64 if v0.dtype == torch.float64 else torch.float32
    a, b = v0.reshape(1, -1), v1.reshape(1, -1)
    t = torch.tensor([alpha], dtype=dtype, device=v0.device).reshape(-1, 1)
    if not a.shape[1]:
        return ((1 - t) * a + t * b).reshape(v0.shape).to(v0.dtype)
    n = a.shape[1]
    chunks = [(i, min(i + MERGEKIT_CHUNK, n)) for i in range(0, n, MERGEKIT_CHUNK)]
    norm_a = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(a[:, i:j].to(dtype), dim=1, keepdim=True)
                                                   for i, j in chunks]), dim=0)
    norm_b = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(b[:, i:j].to(dtype), dim=1, keepdim=True)
                                                   for i, j in chunks]), dim=0)
    norm_a = torch.where(norm_a > eps, norm_a, 1)
    norm_b = torch.where(norm_b > eps, norm_b, 1)
    dot = torch.stack([(a[:, i:j].to(dtype) / norm_a * (b[:, i:j].to(dtype) / norm_b)).sum(dim=1, keepdim=True)
                       for i, j in chunks]).sum(dim=0).clamp(-1, 1)
    linear = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(linear, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(linear, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
    coef_b = torch.where(linear, t, torch.sin(t * theta) / sin_theta)
    result = torch.empty_like(a)
    for i, j in chunks:
        result[:, i:j] = coef_a * a[:, i:j].to(dtype) + coef_b * b[:, i:j].to(dtype)
    return result.reshape(v0.shape)


def _slerp_mecha(a, b, alpha: float):
    """sd-mecha 1.1.8's slerp (extensions/builtin/merge_methods/linear.py), alpha a float32 tensor
    as sd-mecha casts it."""
    alpha = torch.tensor(alpha, dtype=torch.float32, device=a.device)
    a_normalized = a / a.norm()
    b_normalized = b / b.norm()
    ab_dot = (a_normalized * b_normalized).sum().clamp(-1, 1)
    omega = torch.arccos(ab_dot)
    a_contrib = a_normalized * torch.sin((1 - alpha) * omega)
    b_contrib = b_normalized * torch.sin(alpha * omega)
    res = (a_contrib + b_contrib) / torch.sin(omega)
    res *= torch.lerp(a.norm(), b.norm(), alpha)
    if res.isnan().any():
        return torch.lerp(a, b, alpha)
    return res


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
    # version 2: each variant is its tool's own ops (mergekit 0.1.5, sd-mecha 1.1.8), near-parallel pairs included
    _method(slerp, ("A", "B"), Param("alpha", float, doc="B's share (mergekit's t)"),
            Param("variant", str, "mergekit", "mergekit: combine the raw tensors, as mergekit 0.1.5; mecha: "
                  "combine the normalised tensors and rescale to lerp(|A|, |B|, alpha), as sd-mecha 1.1.8",
                  choices=("mergekit", "mecha")), version=2),
    _method(train_difference, ("A", "B", "C"), Param("alpha", float, doc="multiplier of the trained difference")),
    _method(cosine_a, ("A", "B"), Param("alpha", float, doc="shifts k toward B (|alpha| is used)")),
    _method(cosine_b, ("A", "B"), Param("alpha", float, doc="shifts k toward B")),
    _method(extract, ("A", "B", "C"), Param("alpha", float, doc="C-A's share of the difference, 0..1"),
            Param("beta", float, doc="0 keeps similar features, 1 keeps dissimilar ones, 0..1"),
            Param("gamma", float, 1.0, "sharpness of the similarity weight d, >= 0")),
]

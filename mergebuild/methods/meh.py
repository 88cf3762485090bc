"""The non-linear two- and three-model methods of sd-meh (../../docs/methods.md).

C is the common ancestor where there is one; alpha is B's share unless the method says otherwise.
"""

from __future__ import annotations

import math

from mergebuild.methods.registry import Method, Param
from mergebuild.torchlazy import torch

EPSILON = 1e-10  # below this, distribution_crossover's filter width counts as zero (meh's constant)


def multiply_difference(a, b, c, *, alpha: float, beta: float):
    """C + sign(lerp(A, B, beta) - C) * |A - C|^(1-alpha) * |B - C|^alpha (meh).

    A geometric mean of the two differences' magnitudes. The sign is copysign's, so a zero
    difference counts as +."""
    magnitude = (a - c).abs().pow(1.0 - alpha) * (b - c).abs().pow(alpha)
    return c + torch.copysign(magnitude, torch.lerp(a, b, beta) - c)


def similarity_add_difference(a, b, c, *, alpha: float, beta: float):
    """Average A and B where they agree, add B - C where they differ (meh).

    (1 - s) * (A + alpha (B - C)) + s * ((1 - alpha/2) A + alpha/2 B), where
    s = beta * (A B / max(|A|, |B|)^2 + 1) / 2 per element, and s = beta where A = B = 0 (meh):
    where A and B agree, average them; where they disagree, add the difference."""
    t = torch.maximum(a.abs(), b.abs())
    zero = t == 0
    safe = torch.where(zero, torch.ones_like(t), t)
    s = torch.where(zero, torch.full_like(t, beta), ((a / safe) * (b / safe) + 1) / 2 * beta)
    add = a + alpha * (b - c)
    mix = (1 - alpha / 2) * a + (alpha / 2) * b
    return (1 - s) * add + s * mix


def euclidean_add_difference(a, b, c, *, alpha: float):
    """C + d * |s| / |d|: the difference rebuilt from the normalised differences' RMS (meh).

    s = lerp(A, B, alpha) - C and d is the element-wise root mean
    square of the unit differences x = (A-C)/|A-C|, y = (B-C)/|B-C| (a zero difference stays zero):
    d = copysign(sqrt((1-alpha) x^2 + alpha y^2), s). Norms are over the whole tensor. When d is
    zero (A = B = C), the result is lerp(A, B, alpha) instead of meh's NaN."""
    x, y = a - c, b - c
    nx, ny = torch.linalg.vector_norm(x), torch.linalg.vector_norm(y)
    x = x / nx if nx > 0 else torch.zeros_like(x)
    y = y / ny if ny > 0 else torch.zeros_like(y)
    s = torch.lerp(a, b, alpha) - c
    d = torch.copysign(((1 - alpha) * x * x + alpha * y * y).sqrt(), s)
    nd = torch.linalg.vector_norm(d)
    if not nd > 0:
        return torch.lerp(a, b, alpha)
    return c + d * (torch.linalg.vector_norm(s) / nd)


def _band(width: float, offset: float, n: int) -> tuple[int, int, bool]:
    """The rank band [start, end) of top_k_tensor_sum, and whether it wraps past 1 (meh's rule)."""
    if width < 0:
        offset += width
        width = -width
    width = min(width, 1)
    if offset < 0:
        offset = 1 + offset - int(offset)
    offset = math.fmod(offset, 1.0)
    if width + offset <= 1:
        return round(offset * n), round((width + offset) * n), False
    return round((width + offset - 1) * n), round(offset * n), True


def top_k_tensor_sum(a, b, *, alpha: float, beta: float):
    """A's values re-ordered like B's, within a band of magnitudes (meh).

    Sort A's values; element i of the
    result is the sorted A value at B[i]'s rank, when that value's magnitude lies in the band
    (k_start-th, k_end-th smallest |A|], and A[i] elsewhere. The band is alpha wide starting at beta,
    as fractions of the element count, and wraps around past 1 (then its complement is taken)."""
    flat = a.reshape(-1)
    n = flat.numel()
    values = torch.sort(flat).values
    ranks = torch.argsort(torch.argsort(b.reshape(-1), stable=True))
    start, end, wraps = _band(alpha, beta, n)
    magnitude = values.abs()
    ordered = torch.sort(magnitude).values
    low = ordered[start - 1] if start > 0 else torch.tensor(-1.0, dtype=a.dtype, device=a.device)
    high = ordered[end - 1] if end > 0 else torch.tensor(-1.0, dtype=a.dtype, device=a.device)
    in_band = (magnitude > low) & (magnitude <= high)
    if wraps:
        in_band = ~in_band
    return torch.where(in_band[ranks], values[ranks], flat).reshape(a.shape)


def distribution_crossover(a, b, c, *, alpha: float, beta: float):
    """A's low and B's high frequencies, over the elements in C's order (meh).

    Order the elements by C
    (stable sort), take the real FFTs of A and B in that order, keep A's low frequencies and B's
    high ones: f_k = k / K, f = clamp((f - alpha) / beta + 1/2, 0, 1) (a hard step f >= alpha when
    beta <= 1e-10), inverse FFT of (1-f) FFT(A) + f FFT(B), and restore the order. A 0-d tensor gets
    alpha*A + (1-alpha)*B: alpha is A's share there, as in meh."""
    if a.dim() == 0:
        return alpha * a + (1 - alpha) * b
    work = a.dtype if a.dtype in (torch.float32, torch.float64) else torch.float32
    order = torch.argsort(c.reshape(-1), stable=True)
    fa = torch.fft.rfft(a.reshape(-1)[order].to(work))
    fb = torch.fft.rfft(b.reshape(-1)[order].to(work))
    freq = torch.arange(fa.numel(), device=a.device, dtype=work) / fa.numel()
    if beta > EPSILON:
        f = ((freq - alpha) / beta + 0.5).clamp(0.0, 1.0)
    else:
        f = (freq >= alpha).to(work)
    mixed = torch.fft.irfft((1 - f) * fa + f * fb, n=order.numel())
    out = torch.empty(order.numel(), dtype=a.dtype, device=a.device)
    out[order] = mixed.to(a.dtype)
    return out.reshape(a.shape)


# elementwise, and bit-identical at any offset in a longer tensor (multiply_difference is not:
# torch's vectorised pow and its scalar tail round differently)
ELEMENTWISE = {"similarity_add_difference"}


def _method(fn, inputs, *params):
    return Method(fn.__name__, 1, fn, inputs, params, fn.__doc__, elementwise=fn.__name__ in ELEMENTWISE)


ALPHA = Param("alpha", float, doc="B's share")
BETA = Param("beta", float, doc="see docs/methods.md")

# whose numbers these methods reproduce (shown by `mergebuild methods NAME`)
FOLLOWS = "sd-meh"
METHODS = [
    _method(multiply_difference, ("A", "B", "C"), Param("alpha", float, doc="exponent of |B - C| (0..1)"),
            Param("beta", float, doc="B's share in the lerp that gives the sign")),
    _method(similarity_add_difference, ("A", "B", "C"), Param("alpha", float, doc="multiplier of B - C"),
            Param("beta", float, doc="how much similar elements are averaged instead")),
    _method(euclidean_add_difference, ("A", "B", "C"), ALPHA),
    _method(top_k_tensor_sum, ("A", "B"), Param("alpha", float, doc="width of the magnitude band, a fraction"),
            Param("beta", float, doc="start (offset) of the band, a fraction")),
    _method(distribution_crossover, ("A", "B", "C"), Param("alpha", float, doc="crossover frequency, 0..1"),
            Param("beta", float, doc="width of the crossover ramp")),
]

"""sd-meh's methods (multiply_difference, similarity / euclidean add_difference, top_k tensor sum,
distribution crossover), each against a float64 reference written here. Split from test_classic.py,
whose helpers it shares."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.methods.test_classic import close, lerp, np64, run, trio

# --- sd-meh -------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha,beta", [(0.4, 0.5), (0.0, 1.0), (1.0, 0.0)])
def test_multiply_difference(alpha, beta):
    a, b, c = trio(6, 5)
    x, y, z = np64(a, b, c)
    ref = z + np.copysign(np.abs(x - z) ** (1 - alpha) * np.abs(y - z) ** alpha, lerp(x, y, beta) - z)
    close(run("multiply_difference", a, b, c, alpha=alpha, beta=beta), ref)


def test_multiply_difference_edges():
    a, b, c = trio(6, 5)
    assert torch.allclose(run("multiply_difference", a, a.clone(), a.clone(), alpha=0.5, beta=0.5), a)
    out = run("multiply_difference", a, b, a.clone(), alpha=0.0, beta=0.5)  # |A-C|^1 * |B-C|^0 = 0 * 1
    assert torch.equal(out, a)


def ref_similarity(x, y, z, alpha, beta):
    t = np.maximum(np.abs(x), np.abs(y))
    s = np.where(t == 0, beta, beta * (x * y / np.where(t == 0, 1, t) ** 2 + 1) / 2)
    return (1 - s) * (x + alpha * (y - z)) + s * ((1 - alpha / 2) * x + alpha / 2 * y)


def test_similarity_add_difference():
    a, b, c = trio(6, 5)
    close(run("similarity_add_difference", a, b, c, alpha=0.6, beta=0.8), ref_similarity(*np64(a, b, c), 0.6, 0.8))


def test_similarity_add_difference_zeros():
    a, b, c = trio(6, 5)
    a[0], b[0] = 0, 0  # max(|A|, |B|) = 0: s = beta there instead of 0/0
    out = run("similarity_add_difference", a, b, c, alpha=0.6, beta=0.8)
    assert not torch.isnan(out).any()
    close(out, ref_similarity(*np64(a, b, c), 0.6, 0.8))
    assert torch.allclose(run("similarity_add_difference", a, b, b.clone(), alpha=0.0, beta=0.3), a)


def ref_euclidean(x, y, z, alpha):
    u, v = x - z, y - z
    u = u / np.linalg.norm(u) if np.linalg.norm(u) > 0 else np.zeros_like(u)
    v = v / np.linalg.norm(v) if np.linalg.norm(v) > 0 else np.zeros_like(v)
    s = lerp(x, y, alpha) - z
    d = np.copysign(np.sqrt((1 - alpha) * u ** 2 + alpha * v ** 2), s)
    return z + d / np.linalg.norm(d) * np.linalg.norm(s)


@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
def test_euclidean_add_difference(alpha):
    a, b, c = trio(6, 5)
    close(run("euclidean_add_difference", a, b, c, alpha=alpha), ref_euclidean(*np64(a, b, c), alpha))


def test_euclidean_add_difference_edges():
    a, b, c = trio(6, 5)
    assert torch.equal(run("euclidean_add_difference", a, a.clone(), a.clone(), alpha=0.5), a)  # meh: NaN
    out = run("euclidean_add_difference", c.clone(), b, c, alpha=0.4)  # A == C: a zero difference stays zero
    close(out, ref_euclidean(*np64(c, b, c), 0.4))


def ref_band(width, offset, n):
    if width < 0:
        offset, width = offset + width, -width
    width = min(width, 1)
    if offset < 0:
        offset = 1 + offset - int(offset)
    offset = math.fmod(offset, 1.0)
    if width + offset <= 1:
        return round(offset * n), round((width + offset) * n), False
    return round((width + offset - 1) * n), round(offset * n), True


def ref_top_k(x, y, alpha, beta):
    flat = x.ravel()
    n = flat.size
    values = np.sort(flat)
    rank_b = np.empty(n, dtype=np.int64)
    rank_b[np.argsort(y.ravel(), kind="stable")] = np.arange(n)
    start, end, wraps = ref_band(alpha, beta, n)
    mags = np.sort(np.abs(values))
    low = mags[start - 1] if start > 0 else -1
    high = mags[end - 1] if end > 0 else -1
    band = (np.abs(values) > low) & (np.abs(values) <= high)
    if wraps:
        band = ~band
    return np.where(band[rank_b], values[rank_b], flat).reshape(x.shape)


@pytest.mark.parametrize("alpha,beta", [(0.5, 0.2), (0.3, 0.9), (-0.2, 0.5), (0.4, -0.3), (1.0, 0.0)])
def test_top_k_tensor_sum(alpha, beta):
    a, b, _ = trio(7, 6)
    out = run("top_k_tensor_sum", a, b, alpha=alpha, beta=beta)
    np.testing.assert_array_equal(out.double().numpy(), ref_top_k(*np64(a, b), alpha, beta))


def test_top_k_tensor_sum_extremes():
    a, b, _ = trio(7, 6)
    assert torch.equal(run("top_k_tensor_sum", a, b, alpha=0.0, beta=0.3), a)  # empty band
    out = run("top_k_tensor_sum", a, b, alpha=1.0, beta=0.0)  # full band: A's values in B's order
    assert torch.equal(torch.sort(out.flatten()).values, torch.sort(a.flatten()).values)
    assert torch.equal(torch.argsort(out.flatten()), torch.argsort(b.flatten()))


def ref_crossover(x, y, z, alpha, beta):
    order = np.argsort(z.ravel(), kind="stable")
    fx, fy = np.fft.rfft(x.ravel()[order]), np.fft.rfft(y.ravel()[order])
    f = np.arange(fx.size) / fx.size
    f = np.clip((f - alpha) / beta + 0.5, 0, 1) if beta > 1e-10 else (f >= alpha).astype(float)
    out = np.empty(x.size)
    out[order] = np.fft.irfft((1 - f) * fx + f * fy, n=x.size)
    return out.reshape(x.shape)


@pytest.mark.parametrize("alpha,beta", [(0.3, 0.2), (0.5, 0.0), (0.1, 1.0)])
@pytest.mark.parametrize("shape", [(6, 5), (7, 3)])  # even and odd element counts
def test_distribution_crossover(alpha, beta, shape):
    a, b, c = trio(*shape)
    close(run("distribution_crossover", a, b, c, alpha=alpha, beta=beta), ref_crossover(*np64(a, b, c), alpha, beta))


def test_distribution_crossover_extremes():
    a, b, c = trio(6, 5)
    assert torch.allclose(run("distribution_crossover", a, b, c, alpha=0.0, beta=0.0), b, atol=1e-6)  # all B
    assert torch.allclose(run("distribution_crossover", a, b, c, alpha=1.5, beta=0.0), a, atol=1e-6)  # all A
    assert torch.allclose(run("distribution_crossover", a, a.clone(), torch.zeros_like(c), alpha=0.3, beta=0.1),
                          a, atol=1e-6)  # equal inputs, and a constant C (all ties)
    s = run("distribution_crossover", torch.tensor(2.0), torch.tensor(4.0), torch.tensor(0.0), alpha=0.25, beta=0.1)
    assert s.item() == pytest.approx(0.25 * 2 + 0.75 * 4)  # scalars: alpha is A's share, as in meh

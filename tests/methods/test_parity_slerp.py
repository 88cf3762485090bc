"""slerp's parity variants (docs/methods.md), each against a transcription of the peer's own rule:
mergekit 0.1.5 `merge_methods/slerp.py` (float32 ops, norms reduced over chunks) and sd-mecha
1.1.8 `slerp`; far-apart pairs against the float64 formula. Split from test_parity_modes.py, whose
helpers it shares."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.methods.test_parity_modes import fine_tunes, run, same_bytes


def mergekit_slerp(t: torch.Tensor, v0: torch.Tensor, v1: torch.Tensor, dot_threshold=0.9995, eps=1e-8):
    """mergekit 0.1.5 merge_methods/slerp.py: inputs [output, *weight_shape], float32 ops, norms and
    the dot reduced over chunks of 1024 * 1024 elements per output."""
    dtype = torch.float64 if v0.dtype == torch.float64 else torch.float32
    a, b = v0.reshape(v0.shape[0], -1), v1.reshape(v1.shape[0], -1)
    t = t.reshape(-1, 1).to(dtype)
    chunk = max(1, (1024 * 1024) // a.shape[0])
    starts = range(0, a.shape[1], chunk)
    norm_a = torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(a[:, s:s + chunk].to(dtype), dim=1, keepdim=True) for s in starts]), dim=0)
    norm_b = torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(b[:, s:s + chunk].to(dtype), dim=1, keepdim=True) for s in starts]), dim=0)
    norm_a = torch.where(norm_a > eps, norm_a, 1)
    norm_b = torch.where(norm_b > eps, norm_b, 1)
    parts = []
    for s in starts:
        x = a[:, s:s + chunk].to(dtype) / norm_a
        y = b[:, s:s + chunk].to(dtype) / norm_b
        parts.append((x * y).sum(dim=1, keepdim=True))
    dot = torch.stack(parts).sum(dim=0).clamp(-1, 1)
    linear = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(linear, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(linear, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
    coef_b = torch.where(linear, t, torch.sin(t * theta) / sin_theta)
    result = torch.empty_like(a)
    for s in starts:
        result[:, s:s + chunk] = coef_a * a[:, s:s + chunk].to(dtype) + coef_b * b[:, s:s + chunk].to(dtype)
    return result.reshape(v0.shape)


def mecha_slerp(a: torch.Tensor, b: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """sd-mecha 1.1.8 extensions/builtin/merge_methods/linear.py slerp; alpha as sd-mecha casts a
    float parameter: torch.tensor(value, dtype=torch.float32)."""
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


def slerp_pairs():
    base, (near,) = fine_tunes((96, 80), 1, seed=3, dtype=torch.float32, scale=0.0012)  # cos ~ 0.9997
    _, (tuned,) = fine_tunes((96, 80), 1, seed=3, dtype=torch.float32, scale=0.05)
    _, (other,) = fine_tunes((96, 80), 1, seed=4, dtype=torch.float32, scale=0.05)
    zero = torch.zeros_like(base)
    return {"far": (tuned, other), "fine-tune": (base, tuned), "near-parallel": (base, near),
            "parallel": (base, 2 * base), "same": (base, base.clone()), "opposite": (base, -base),
            "zero": (zero, base), "zeros": (zero, zero), "scalar": (torch.tensor(0.3), torch.tensor(-0.7)),
            "float16-stored": (tuned.half().float(), other.half().float())}


def cosine(a, b) -> float:
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    return float(a @ b / (a.norm() * b.norm())) if a.norm() and b.norm() else 0.0


@pytest.mark.parametrize("case", list(slerp_pairs()))
@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
def test_slerp_variants_write_their_tools_bytes(case, alpha):
    a, b = slerp_pairs()[case]
    out = run("slerp", a, b, alpha=alpha, variant="mergekit")
    expected = mergekit_slerp(torch.tensor([alpha]), a.unsqueeze(0), b.unsqueeze(0)).squeeze(0)
    assert same_bytes(out, expected)
    out = run("slerp", a, b, alpha=alpha, variant="mecha")
    assert same_bytes(out, mecha_slerp(a, b, torch.tensor(alpha, dtype=torch.float32)))


def test_slerp_mergekit_chunks_like_mergekit():
    """Past 1024 * 1024 elements mergekit sums its norms and dot chunk by chunk."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(1100, 1000, generator=g) * 0.05
    b = a + torch.randn(1100, 1000, generator=g) * 0.05
    expected = mergekit_slerp(torch.tensor([0.4]), a.unsqueeze(0), b.unsqueeze(0)).squeeze(0)
    assert same_bytes(run("slerp", a, b, alpha=0.4), expected)


def test_slerp_near_parallel_pairs():
    """Past |cos| > 0.9995 mergekit lerps, as (1 - t) A + t B; sd-mecha still slerps (the float64
    formula, up to its float32 angle) and keeps the interpolated norm."""
    a, b = slerp_pairs()["near-parallel"]
    assert 0.9995 < cosine(a, b) < 0.99999
    t = torch.tensor(0.3)
    assert torch.equal(run("slerp", a, b, alpha=0.3), (1 - t) * a + t * b)
    mecha = run("slerp", a, b, alpha=0.3, variant="mecha")
    assert not torch.equal(mecha, torch.lerp(a, b, 0.3))
    x, y = a.double().numpy(), b.double().numpy()
    nx, ny = np.linalg.norm(x), np.linalg.norm(y)
    omega = math.acos(float(np.sum(x * y)) / (nx * ny))
    ref = (math.sin(0.7 * omega) * x / nx + math.sin(0.3 * omega) * y / ny) / math.sin(omega) * (0.7 * nx + 0.3 * ny)
    np.testing.assert_allclose(mecha.double().numpy(), ref, rtol=0, atol=2e-3 * np.abs(ref).max())
    assert abs(float(np.linalg.norm(mecha.double().numpy())) / (0.7 * nx + 0.3 * ny) - 1) < 1e-5


def test_slerp_far_pairs_follow_the_float64_formula():
    a, b = slerp_pairs()["far"]
    x, y = a.double().numpy(), b.double().numpy()
    nx, ny = np.linalg.norm(x), np.linalg.norm(y)
    omega = math.acos(float(np.sum(x * y)) / (nx * ny))
    sa, sb = math.sin(0.6 * omega) / math.sin(omega), math.sin(0.4 * omega) / math.sin(omega)
    np.testing.assert_allclose(run("slerp", a, b, alpha=0.4).double().numpy(), sa * x + sb * y, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(run("slerp", a, b, alpha=0.4, variant="mecha").double().numpy(),
                               (sa * x / nx + sb * y / ny) * (0.6 * nx + 0.4 * ny), rtol=1e-5, atol=1e-7)

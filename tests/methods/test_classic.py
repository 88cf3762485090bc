"""Two- and three-model methods (mergebuild/methods/classic.py and meh.py) against float64 numpy
references written from the formulas in docs/methods.md, plus determinism and edge cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mergebuild.methods import get_method
from mergebuild.methods.registry import REQUIRED

RTOL = ATOL = 2e-5


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def trio(*shape, seed=0):
    return rand(*shape, seed=seed), rand(*shape, seed=seed + 1), rand(*shape, seed=seed + 2)


def np64(*xs):
    return [x.double().numpy() for x in xs]


def run(name, *xs, **params):
    """Call a method as the executor does: defaults filled in, then the given parameters."""
    method = get_method(name)
    kwargs = method.defaults()
    kwargs.update(params)
    return method.fn(*xs, **kwargs)


def close(out, ref):
    assert out.dtype == torch.float32
    assert not torch.isnan(out).any()
    np.testing.assert_allclose(out.double().numpy(), ref, rtol=RTOL, atol=ATOL)


def lerp(x, y, t):
    return (1 - t) * x + t * y


# --- registry -----------------------------------------------------------------------------

EXPECTED = {
    "sum_twice": (("A", "B", "C"), {"alpha": REQUIRED, "beta": REQUIRED}),
    "triple_sum": (("A", "B", "C"), {"alpha": REQUIRED, "beta": REQUIRED}),
    "weighted_subtraction": (("A", "B"), {"alpha": REQUIRED, "beta": REQUIRED}),
    "tensor_sum": (("A", "B"), {"alpha": REQUIRED, "beta": REQUIRED, "variant": "tensor"}),
    "slerp": (("A", "B"), {"alpha": REQUIRED, "variant": "mergekit"}),
    "train_difference": (("A", "B", "C"), {"alpha": REQUIRED}),
    "cosine_a": (("A", "B"), {"alpha": REQUIRED}),
    "cosine_b": (("A", "B"), {"alpha": REQUIRED}),
    "extract": (("A", "B", "C"), {"alpha": REQUIRED, "beta": REQUIRED, "gamma": 1.0}),
    "multiply_difference": (("A", "B", "C"), {"alpha": REQUIRED, "beta": REQUIRED}),
    "similarity_add_difference": (("A", "B", "C"), {"alpha": REQUIRED, "beta": REQUIRED}),
    "euclidean_add_difference": (("A", "B", "C"), {"alpha": REQUIRED}),
    "top_k_tensor_sum": (("A", "B"), {"alpha": REQUIRED, "beta": REQUIRED}),
    "distribution_crossover": (("A", "B", "C"), {"alpha": REQUIRED, "beta": REQUIRED}),
}


VERSIONS = {"slerp": 2}  # slerp 2: each variant is its tool's own ops (tests/methods/test_parity_slerp.py)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_registered(name):
    method = get_method(name)
    assert method is not None, name
    inputs, params = EXPECTED[name]
    assert method.inputs == inputs
    assert {p.name: p.default for p in method.params} == params
    assert not method.variadic and not method.takes_key
    assert method.version == VERSIONS.get(name, 1) and method.doc


def test_choices_are_declared():
    assert get_method("slerp").param("variant").choices == ("mergekit", "mecha")
    assert get_method("tensor_sum").param("variant").choices == ("tensor", "tensor2")


# --- determinism and purity, for every method ---------------------------------------------

CALLS = [
    ("sum_twice", 3, dict(alpha=0.3, beta=0.6)),
    ("triple_sum", 3, dict(alpha=0.3, beta=0.2)),
    ("weighted_subtraction", 2, dict(alpha=0.5, beta=0.4)),
    ("tensor_sum", 2, dict(alpha=0.4, beta=0.3)),
    ("slerp", 2, dict(alpha=0.3)),
    ("slerp", 2, dict(alpha=0.3, variant="mecha")),
    ("train_difference", 3, dict(alpha=0.7)),
    ("cosine_a", 2, dict(alpha=0.1)),
    ("cosine_b", 2, dict(alpha=0.1)),
    ("extract", 3, dict(alpha=0.3, beta=0.6, gamma=2.0)),
    ("multiply_difference", 3, dict(alpha=0.4, beta=0.5)),
    ("similarity_add_difference", 3, dict(alpha=0.5, beta=0.7)),
    ("euclidean_add_difference", 3, dict(alpha=0.4)),
    ("top_k_tensor_sum", 2, dict(alpha=0.5, beta=0.2)),
    ("distribution_crossover", 3, dict(alpha=0.3, beta=0.2)),
]


@pytest.mark.parametrize("name,n,params", CALLS, ids=[f"{c[0]}-{i}" for i, c in enumerate(CALLS)])
def test_deterministic_and_pure(name, n, params):
    xs = trio(6, 5, 3, seed=7)[:n]
    before = [x.clone() for x in xs]
    first = run(name, *xs, **params)
    second = run(name, *xs, **params)
    assert first.shape == xs[0].shape
    assert first.numpy().tobytes() == second.numpy().tobytes()
    assert all(torch.equal(x, y) for x, y in zip(xs, before)), "an input was modified in place"
    assert torch.isfinite(first).all()


@pytest.mark.parametrize("name,n,params", CALLS, ids=[f"{c[0]}-{i}" for i, c in enumerate(CALLS)])
def test_identical_inputs_give_that_input(name, n, params):
    """Every method here maps (X, X[, X]) to X: no difference, nothing to merge."""
    x = rand(6, 5, 3, seed=11)
    out = run(name, *[x.clone() for _ in range(n)], **params)
    assert not torch.isnan(out).any()
    assert torch.allclose(out, x, atol=1e-6)


@pytest.mark.parametrize("name,n,params", CALLS, ids=[f"{c[0]}-{i}" for i, c in enumerate(CALLS)])
def test_all_zero_inputs_give_zeros(name, n, params):
    """Zero norms everywhere: no 0/0 reaches the result."""
    out = run(name, *[torch.zeros(6, 5) for _ in range(n)], **params)
    assert torch.equal(out, torch.zeros(6, 5))


@pytest.mark.parametrize("name,n,params", CALLS, ids=[f"{c[0]}-{i}" for i, c in enumerate(CALLS)])
def test_scalars_and_vectors(name, n, params):
    """0-d and 1-element tensors, which real checkpoints have, go through without error or NaN."""
    for shape in ((), (1,), (7,)):
        xs = [x.reshape(shape) if shape else x.reshape(()) for x in (rand(*(shape or (1,)), seed=s) for s in range(n))]
        out = run(name, *xs, **params)
        assert out.shape == xs[0].shape
        assert not torch.isnan(out).any(), (name, shape)


# --- linear mixes ---------------------------------------------------------------------------


def test_sum_twice():
    a, b, c = trio(5, 4)
    x, y, z = np64(a, b, c)
    close(run("sum_twice", a, b, c, alpha=0.3, beta=0.6), (1 - 0.6) * ((1 - 0.3) * x + 0.3 * y) + 0.6 * z)


def test_triple_sum():
    a, b, c = trio(5, 4)
    x, y, z = np64(a, b, c)
    close(run("triple_sum", a, b, c, alpha=0.25, beta=0.35), 0.4 * x + 0.25 * y + 0.35 * z)


def test_weighted_subtraction():
    a, b, _ = trio(5, 4)
    x, y = np64(a, b)
    close(run("weighted_subtraction", a, b, alpha=0.5, beta=0.8), (x - 0.4 * y) / 0.6)


@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (2.0, 0.5)])
def test_weighted_subtraction_refuses_a_zero_denominator(alpha, beta):
    a, b, _ = trio(3)
    with pytest.raises(ValueError, match="alpha\\*beta == 1"):
        run("weighted_subtraction", a, b, alpha=alpha, beta=beta)


def _slice_swap(x, y, alpha, beta, axis):
    n = x.shape[axis]
    if alpha + beta <= 1:
        out, src, lo, hi = x.copy(), y, math.floor(n * beta), math.floor(n * (alpha + beta))
    else:
        out, src, lo, hi = y.copy(), x, math.floor(n * (alpha + beta - 1)), math.floor(n * beta)
    index = [slice(None)] * x.ndim
    index[axis] = slice(lo, hi)
    out[tuple(index)] = src[tuple(index)]
    return out


@pytest.mark.parametrize("alpha,beta", [(0.4, 0.3), (0.5, 0.7), (0.0, 0.2), (1.0, 0.0)])
def test_tensor_sum(alpha, beta):
    a, b, _ = trio(10, 3)
    x, y = np64(a, b)
    out = run("tensor_sum", a, b, alpha=alpha, beta=beta)
    np.testing.assert_array_equal(out.double().numpy(), _slice_swap(x, y, alpha, beta, 0))


def test_tensor_sum_rows_come_from_b():
    a, b = torch.zeros(10, 2), torch.ones(10, 2)
    out = run("tensor_sum", a, b, alpha=0.3, beta=0.2)
    assert out[:, 0].tolist() == [0, 0, 1, 1, 1, 0, 0, 0, 0, 0]


def test_tensor2_slices_dim_1_only_when_wide():
    a, b, _ = trio(4, 120)
    x, y = np64(a, b)
    out = run("tensor_sum", a, b, alpha=0.3, beta=0.5, variant="tensor2")
    np.testing.assert_array_equal(out.double().numpy(), _slice_swap(x, y, 0.3, 0.5, 1))
    a, b, _ = trio(10, 50)  # 50 <= 100: dim 0, as "tensor"
    assert torch.equal(run("tensor_sum", a, b, alpha=0.3, beta=0.5, variant="tensor2"),
                       run("tensor_sum", a, b, alpha=0.3, beta=0.5))


def test_tensor_sum_of_a_scalar_is_a():
    a, b = torch.tensor(1.0), torch.tensor(2.0)
    assert run("tensor_sum", a, b, alpha=1.0, beta=0.0).item() == 1.0


# --- slerp --------------------------------------------------------------------------------


def ref_slerp(x, y, t, variant):
    nx, ny = np.linalg.norm(x), np.linalg.norm(y)
    if nx <= 1e-8 or ny <= 1e-8:
        return lerp(x, y, t)
    ux, uy = x / nx, y / ny
    cos = float(np.sum(ux * uy))
    if abs(cos) > 0.9995:
        return lerp(x, y, t)
    omega = math.acos(cos)
    sa, sb = math.sin((1 - t) * omega) / math.sin(omega), math.sin(t * omega) / math.sin(omega)
    if variant == "mergekit":
        return sa * x + sb * y
    return (sa * ux + sb * uy) * ((1 - t) * nx + t * ny)


@pytest.mark.parametrize("variant", ["mergekit", "mecha"])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
def test_slerp(variant, alpha):
    a, b, _ = trio(6, 4)
    b = b * 3  # different norms, so the two variants differ
    x, y = np64(a, b)
    close(run("slerp", a, b, alpha=alpha, variant=variant), ref_slerp(x, y, alpha, variant))


def test_slerp_variants_differ_and_mecha_keeps_the_lerped_norm():
    a, b, _ = trio(6, 4)
    b = b * 3
    k = run("slerp", a, b, alpha=0.5)
    m = run("slerp", a, b, alpha=0.5, variant="mecha")
    assert not torch.allclose(k, m)
    expected = 0.5 * (a.norm() + b.norm())
    assert torch.isclose(m.norm(), expected, rtol=1e-5)


@pytest.mark.parametrize("variant", ["mergekit", "mecha"])
def test_slerp_of_parallel_tensors_is_close_to_lerp(variant):
    """Bit by bit each variant follows its tool (tests/methods/test_parity_slerp.py)."""
    a, b, _ = trio(6, 4)
    ys = (2 * a, -a, a + 1e-4 * b) if variant == "mergekit" else (2 * a, a + 1e-4 * b)  # sd-mecha: -a is noise
    for y in ys:  # colinear, opposite, nearly colinear
        assert torch.allclose(run("slerp", a, y, alpha=0.3, variant=variant), torch.lerp(a, y, 0.3))
    zero = torch.zeros_like(a)
    for x, y in ((zero, b), (a, zero), (zero, zero)):
        out = run("slerp", x, y, alpha=0.3, variant=variant)
        if variant == "mecha":  # 0/0 is NaN: sd-mecha lerps
            assert torch.equal(out, torch.lerp(x, y, 0.3))
        else:  # mergekit counts a zero tensor as orthogonal to the other
            assert torch.allclose(out, math.cos(0.3 * math.pi / 2) * x + math.sin(0.3 * math.pi / 2) * y)
    assert torch.allclose(run("slerp", a, a.clone(), alpha=0.7, variant=variant), a)


# --- supermerger calcmodes ----------------------------------------------------------------


def ref_train_difference(x, y, z, alpha):
    total = np.abs(y - z) + np.abs(y - x)
    frac = np.divide(np.abs(y - x), total, out=np.zeros_like(total), where=total != 0)
    return x + 1.8 * alpha * (y - z) * frac


def test_train_difference():
    a, b, c = trio(6, 5)
    close(run("train_difference", a, b, c, alpha=0.7), ref_train_difference(*np64(a, b, c), 0.7))


def test_train_difference_edges():
    a, b, c = trio(6, 5)
    assert torch.equal(run("train_difference", a, b, b.clone(), alpha=1.0), a)  # B == C: A
    b2, c2 = b.clone(), c.clone()
    b2[0], c2[0] = a[0], a[0]  # A == B == C on row 0: a 0/0 there
    out = run("train_difference", a, b2, c2, alpha=1.0)
    assert not torch.isnan(out).any()
    assert torch.equal(out[0], a[0])
    close(out, ref_train_difference(*np64(a, b2, c2), 1.0))


def ref_cosine_k(x, y, alpha, normalise):
    """supermerger's k, one per column (the slices along dim 0), from this tensor's statistics."""
    shape = x.shape
    x, y = x.reshape(shape[0], -1), y.reshape(shape[0], -1)
    if normalise:
        x = x / np.maximum(np.linalg.norm(x, axis=0), 1e-12)
        y = y / np.maximum(np.linalg.norm(y, axis=0), 1e-12)
    col = np.sum(x * y, axis=0) / (np.linalg.norm(x, axis=0) * np.linalg.norm(y, axis=0))
    whole = np.sum(x * y) / (np.linalg.norm(x) * np.linalg.norm(y))
    s = (col + whole) / 2
    v = np.sort(s)
    v = v[v >= np.percentile(v, 1, method="midpoint")]
    v = v[v <= np.percentile(v, 99, method="midpoint")]
    low, high = v.min(), v.max()
    if not high > low:
        low, high = -1.0, 1.0
    return np.clip((s - low) / (high - low) - (abs(alpha) if normalise else alpha), 0, 1)


def ref_cosine_mix(x, y, alpha, normalise):
    """lerp(B, A, k) column by column."""
    k = ref_cosine_k(x, y, alpha, normalise)
    shape = x.shape
    xs, ys = x.reshape(shape[0], -1), y.reshape(shape[0], -1)
    return (ys + k * (xs - ys)).reshape(shape)


@pytest.mark.parametrize("name,normalise", [("cosine_a", True), ("cosine_b", False)])
@pytest.mark.parametrize("shape", [(8, 60), (5, 4, 3, 3)])
@pytest.mark.parametrize("alpha", [0.0, 0.2, -0.3])
def test_cosine(name, normalise, shape, alpha):
    a, b, _ = trio(*shape, seed=3)
    b = a + 0.8 * b  # correlated, so the similarities spread
    close(run(name, a, b, alpha=alpha), ref_cosine_mix(*np64(a, b), alpha, normalise))


def test_cosine_k_spans_zero_to_one_within_a_tensor():
    """The per-tensor statistic: with alpha = 0 the least similar column is B's, the most similar A's."""
    a, b, _ = trio(8, 60, seed=3)
    b = a + 0.8 * b
    k = ref_cosine_k(*np64(a, b), 0.0, True)
    assert k.min() == 0 and k.max() == 1
    out = run("cosine_a", a, b, alpha=0.0)
    assert torch.allclose(out[:, int(np.argmax(k))], a[:, int(np.argmax(k))])
    assert torch.allclose(out[:, int(np.argmin(k))], b[:, int(np.argmin(k))])


def test_cosine_of_a_vector_uses_the_cosine_range():
    """One similarity per tensor (1-D): min == max, so k = (s + 1) / 2 - alpha."""
    a, b, _ = trio(16)
    x, y = np64(a, b)
    s = float(np.dot(x, y) / (np.linalg.norm(x) * np.linalg.norm(y)))  # column and whole cosine agree
    k = min(max((s + 1) / 2 - 0.1, 0), 1)
    close(run("cosine_b", a, b, alpha=0.1), y + k * (x - y))


@pytest.mark.parametrize("name", ["cosine_a", "cosine_b"])
def test_cosine_edges(name):
    a, b, _ = trio(6, 5)
    assert torch.allclose(run(name, a, a.clone(), alpha=0.3), a)
    zero = torch.zeros_like(a)
    for x, y in ((zero, b), (a, zero), (zero, zero)):
        assert torch.isfinite(run(name, x, y, alpha=0.3)).all()
    a2 = a.clone()
    a2[:, 0] = 0  # one zero column
    assert torch.isfinite(run(name, a2, b, alpha=0.0)).all()


def ref_extract(x, y, z, alpha, beta, gamma):
    u, v = y - x, z - x
    cos = np.sum(u * v, axis=-1) / (np.linalg.norm(u, axis=-1) * np.linalg.norm(v, axis=-1))
    d = ((np.clip(cos, -1, 1)[..., None] + 1) / 2) ** gamma
    return x + lerp(u, v, alpha) * lerp(d, 1 - d, beta)


@pytest.mark.parametrize("alpha,beta,gamma", [(0.3, 0.0, 1.0), (0.7, 1.0, 2.5), (0.5, 0.4, 0.0)])
def test_extract(alpha, beta, gamma):
    a, b, c = trio(4, 3, 8)
    close(run("extract", a, b, c, alpha=alpha, beta=beta, gamma=gamma), ref_extract(*np64(a, b, c), alpha, beta, gamma))


def test_extract_edges():
    a, b, c = trio(4, 8)
    assert torch.equal(run("extract", a, a.clone(), a.clone(), alpha=0.5, beta=0.5), a)
    out = run("extract", a, a.clone(), c, alpha=0.5, beta=0.5)  # B - A is zero: cos 0, d = 1/2
    assert torch.isfinite(out).all()
    close(out, a.double().numpy() + 0.5 * (c - a).double().numpy() * 0.5)
    for bad in (dict(alpha=1.5, beta=0.0), dict(alpha=0.5, beta=-0.1), dict(alpha=0.5, beta=0.5, gamma=-1.0)):
        with pytest.raises(ValueError):
            run("extract", a, b, c, **bad)

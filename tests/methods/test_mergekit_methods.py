"""mergekit 0.1.5's methods (mergebuild/methods/mergekit_methods.py): nuslerp, multislerp, karcher,
sce, nearswap.

Each is held to a float64 numpy reference written here from mergekit's published formula (its
docs and merge_methods/<name>.py), not from mergebuild's code; then edge cases, determinism, and
one build through the real CLI on a tiny Llama trio, checked against the references and against
mergekit 0.1.5's own output on the same trio (tests/data/mergekit_0.1.5, made by its make.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mergebuild.methods import get_method
from mergebuild.methods.mergekit_methods import sce_mask
from mergebuild.testing.fabricate import llama_trio, tensor_sha256
from tests.conftest import mergefile, mergekit_digests, run_cli, write_model

DATA = Path(__file__).resolve().parent.parent / "data" / "mergekit_0.1.5"
TRIO_SHAPE = dict(layers=1, hidden=16, intermediate=24, vocab=32)  # make.py's SHAPE
NAMES = ("nuslerp", "multislerp", "karcher", "sce", "nearswap")


def rand(*shape, seed=0, scale=1.0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


def trio(shape=(6, 5), seed=0, n=2):
    """A base ~ N(0, 0.05) and n fine-tunes of it (deltas ~ N(0, 0.01))."""
    base = rand(*shape, seed=seed, scale=0.05)
    return base, [base + rand(*shape, seed=seed + 1 + i, scale=0.01) for i in range(n)]


def np64(x):
    return x.double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)


def run(name, *xs, **params):
    method = get_method(name)
    return method.fn(*xs, **{**method.defaults(), **params})


def close(out, ref, tol=2e-5):
    assert torch.isfinite(out).all()
    np.testing.assert_allclose(out.double().numpy(), ref, rtol=tol, atol=tol)


# --- float64 references of mergekit's formulas --------------------------------------------


def ref_slerp_vec(t, x, y):
    """slerp of two vectors as mergekit's nuslerp defines it: unit vectors with norms floored at
    1e-7, lerp where the vectors are parallel or anti-parallel. mergekit's test, 1 - cos^2 <=
    1e-16, holds in float32 where cos^2 rounds to 1; in float64 a parallel pair's cos is a few
    ulps from 1, so this reference lerps below 1e-12."""
    xu = x / max(np.linalg.norm(x), 1e-7)
    yu = y / max(np.linalg.norm(y), 1e-7)
    cos = float(np.clip(xu @ yu, -1.0, 1.0))
    if 1 - cos * cos <= 1e-12:
        return (1 - t) * x + t * y
    theta = np.arccos(cos)
    return (np.sin((1 - t) * theta) * x + np.sin(t * theta) * y) / np.sin(theta)


def ref_nuslerp(a, b, w=(1.0, 1.0), flatten=True, row_wise=False, base=None):
    a, b = np64(a), np64(b)
    if base is not None:
        a, b = a - np64(base), b - np64(base)
    t = 0.5 if abs(w[0] + w[1]) < 1e-6 else w[1] / (w[0] + w[1])
    if flatten or a.ndim <= 1:
        out = ref_slerp_vec(t, a.reshape(-1), b.reshape(-1)).reshape(a.shape)
    else:
        axis = 0 if row_wise else a.ndim - 1
        am, bm = np.moveaxis(a, axis, -1), np.moveaxis(b, axis, -1)
        rows = [ref_slerp_vec(t, x, y) for x, y in zip(am.reshape(-1, am.shape[-1]), bm.reshape(-1, bm.shape[-1]))]
        out = np.moveaxis(np.stack(rows).reshape(am.shape), -1, axis)
    return out + np64(base) if base is not None else out


def ref_multislerp(xs, w, base=None, normalize=True, eps=1e-8):
    """Goddard's multislerp as mergekit 0.1.5 writes it: tangent-space mean at the weighted
    mean direction, exponential map back, scaled to the weighted mean norm."""
    if len(xs) == 1:
        return np64(xs[0])
    b = np64(base) if base is not None else 0.0
    shape = xs[0].shape
    X = [(np64(x) - b).reshape(-1) for x in xs]
    w = np.asarray(w, dtype=np.float64)
    if normalize:
        w = w / w.sum()
    norms = [np.linalg.norm(x) for x in X]
    units = [x / (n + eps) for x, n in zip(X, norms)]
    m = sum(wi * u for wi, u in zip(w, units))
    if np.linalg.norm(m) < eps:  # mergebuild: the weighted sum, for any number of inputs
        return sum(wi * x for wi, x in zip(w, X)).reshape(shape) + b
    m = m / np.linalg.norm(m)
    v = sum(wi * (u - (u @ m) * m) for wi, u in zip(w, units))
    length = np.linalg.norm(v) + eps
    r = m * np.cos(length) + v * np.sin(length) / length
    return (r * sum(wi * n for wi, n in zip(w, norms))).reshape(shape) + b


def ref_karcher(xs, alphas=None, max_iter=10, tol=1e-5):
    """The weighted Karcher mean on the unit sphere by mergekit 0.1.5's iteration, times the
    weighted mean norm."""
    X = [np64(x).reshape(-1) for x in xs]
    shape = xs[0].shape
    alphas = np.full(len(X), 1 / len(X)) if alphas is None else np.asarray(alphas, dtype=np.float64)
    norms = np.array([np.linalg.norm(x) for x in X])
    units = [x / n if n > 0 else np.zeros_like(x) for x, n in zip(X, norms)]
    valid = [i for i in range(len(X)) if norms[i] > tol]
    if not valid:
        return np.zeros(shape)
    a = alphas[valid] / alphas[valid].sum()
    us = [units[i] for i in valid]
    m = sum(ai * u for ai, u in zip(a, us))
    m = us[0].copy() if np.linalg.norm(m) < tol else m / np.linalg.norm(m)
    for _ in range(max_iter):
        T = np.zeros_like(m)
        for ai, u in zip(a, us):
            c = float(np.clip(m @ u, -1, 1))
            theta = np.arccos(c)
            if theta >= tol:
                T += ai * theta / np.sin(theta) * (u - c * m)
        nt = np.linalg.norm(T)
        if nt < tol:
            break
        m = np.cos(nt) * m + np.sin(nt) * T / nt
        if np.linalg.norm(m) > tol:
            m = m / np.linalg.norm(m)
    return (float(alphas @ norms) * m).reshape(shape)


def ref_sce(base, models, select_topk=1.0):
    """SCE (Wan et al. 2024) as mergekit 0.1.5 writes it; among equal variances at the cut the
    lower flat index is kept (mergebuild's rule)."""
    b = np64(base)
    D = np.stack([np64(m) - b for m in models])
    if select_topk < 1:
        var = D.var(axis=0).reshape(-1)
        k = int(np.count_nonzero(var) * select_topk) if select_topk > 0 else 0
        mask = np.zeros(var.size)
        mask[np.argsort(-var, kind="stable")[:k]] = 1
        D = D * mask.reshape(b.shape)
    w = np.array([np.mean(d**2) for d in D])
    w = np.full(len(D), 1 / len(D)) if abs(w.sum()) < 1e-6 else w / w.sum()
    elected = np.where(D.sum(axis=0) >= 0, 1.0, -1.0)
    keep = np.sign(D) == elected
    kept_w = np.stack([wi * k for wi, k in zip(w, keep)])
    return b + (kept_w * D).sum(axis=0) / np.maximum(kept_w.sum(axis=0), 1e-6)


def ref_nearswap(base, model, t):
    b, m = np64(base), np64(model)
    w = np.clip(t / np.maximum(np.abs(b - m), 1e-6), 0, 1)
    return w * m + (1 - w) * b


# --- declarations -------------------------------------------------------------------------

EXPECTED = {
    "nuslerp": (("A", "B"), {"weights": (), "nuslerp_flatten": True, "nuslerp_row_wise": False}),
    "multislerp": (("A", "B"), {"weights": (), "base": False, "normalize_weights": True, "eps": 1e-8}),
    "karcher": (("A", "B"), {"weights": (), "max_iter": 10, "tol": 1e-5}),
    "sce": (("Base", "A"), {"select_topk": 1.0, "select_rules": "mergebuild"}),
    "nearswap": (("Base", "A"), {"t": None}),
}


@pytest.mark.parametrize("name", NAMES)
def test_registered(name):
    method = get_method(name)
    inputs, params = EXPECTED[name]
    assert method.inputs == inputs and method.follows == "mergekit 0.1.5" and method.version == 1
    assert {p.name: (None if p.required else p.default) for p in method.params} == params
    assert all(p.doc for p in method.params) and method.doc


def test_arity():
    nuslerp = get_method("nuslerp")
    assert [nuslerp.arity_ok(n) for n in range(1, 5)] == [False, True, True, False]
    assert nuslerp.arity_text() == "2 inputs (A, B) or 3 (Base, A, B)"
    assert get_method("nearswap").arity_ok(2) and not get_method("nearswap").arity_ok(3)
    assert get_method("sce").arity_ok(5) and not get_method("sce").arity_ok(1)
    assert get_method("karcher").arity_ok(7) and get_method("multislerp").arity_ok(7)
    assert get_method("nearswap").elementwise and not any(get_method(n).elementwise for n in NAMES[:4])


# --- nuslerp ------------------------------------------------------------------------------

SHAPES = [(7,), (6, 5), (3, 4, 5)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("flatten,row_wise", [(True, False), (False, False), (False, True), (True, True)])
def test_nuslerp_matches_the_formula(shape, flatten, row_wise):
    base, (a, b) = trio(shape)
    p = dict(nuslerp_flatten=flatten, nuslerp_row_wise=row_wise)
    close(run("nuslerp", a, b, weights=[0.3, 0.9], **p), ref_nuslerp(a, b, (0.3, 0.9), flatten, row_wise))
    close(run("nuslerp", base, a, b, weights=[1.0, 2.0], **p),
          ref_nuslerp(a, b, (1.0, 2.0), flatten, row_wise, base=base))
    out64 = run("nuslerp", a.double(), b.double(), weights=[0.3, 0.9], **p)
    np.testing.assert_allclose(out64.numpy(), ref_nuslerp(a, b, (0.3, 0.9), flatten, row_wise), rtol=1e-12, atol=1e-14)


def test_nuslerp_weights_and_ends():
    a, b = rand(5, 4, seed=1), rand(5, 4, seed=2)
    assert torch.equal(run("nuslerp", a, b, weights=[2.0, 6.0]), run("nuslerp", a, b, weights=[0.25, 0.75]))
    close(run("nuslerp", a, b, weights=[2.0, 6.0]), ref_nuslerp(a, b, (0.25, 0.75)))
    assert torch.equal(run("nuslerp", a, b, weights=[1.0, -1.0]), run("nuslerp", a, b))  # |sum| < 1e-6: t = 0.5
    close(run("nuslerp", a, b, weights=[1.0, 0.0]), np64(a), tol=1e-6)
    close(run("nuslerp", a, b, weights=[0.0, 1.0]), np64(b), tol=1e-6)
    close(run("nuslerp", a, b, weights=[-1.0, 3.0]), ref_nuslerp(a, b, (-1.0, 3.0)))  # t = 1.5: extrapolates
    with pytest.raises(ValueError, match="3 values"):
        run("nuslerp", a, b, weights=[1, 2, 3])


def test_nuslerp_parallel_antiparallel_and_zero():
    a = rand(12, seed=3)
    for b in (2.5 * a, -a, -3 * a):  # lerp, as mergekit
        close(run("nuslerp", a, b, weights=[0.6, 0.4]), 0.6 * np64(a) + 0.4 * np64(b), tol=1e-6)
        close(run("nuslerp", a, b, weights=[0.6, 0.4]), ref_nuslerp(a, b, (0.6, 0.4)), tol=1e-6)
    zero = torch.zeros_like(a)  # a zero vector counts as orthogonal: sin(t pi/2) * b
    close(run("nuslerp", zero, a, weights=[0.5, 0.5]), np.sin(np.pi / 4) * np64(a))
    close(run("nuslerp", zero, zero), np.zeros(12))
    base, (m1, m2) = trio((4, 3))  # a fine-tune equal to the base: its delta is zero
    close(run("nuslerp", base, base.clone(), m2), ref_nuslerp(base, m2, base=base))
    rows = torch.stack([a[:4], -a[:4], a[4:8]])  # per row: anti-parallel, then a general pair
    other = torch.stack([-2 * a[:4], -a[:4], a[8:12]])
    out = run("nuslerp", rows, other, nuslerp_flatten=False)
    close(out, ref_nuslerp(rows, other, flatten=False))
    close(out[:2], 0.5 * np64(rows[:2]) + 0.5 * np64(other[:2]), tol=1e-6)


# --- multislerp ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES + [()])
def test_multislerp_matches_the_formula(shape):
    base, models = trio(shape, n=3)
    w = [1.0, 0.5, 2.0]
    close(run("multislerp", *models, weights=w), ref_multislerp(models, w))
    close(run("multislerp", base, *models, base=True, weights=w), ref_multislerp(models, w, base=base))
    close(run("multislerp", *models, weights=[0.2, 0.5, 0.1], normalize_weights=False),
          ref_multislerp(models, [0.2, 0.5, 0.1], normalize=False))
    close(run("multislerp", *models), ref_multislerp(models, [1, 1, 1]))
    out64 = run("multislerp", *[m.double() for m in models], weights=w)
    np.testing.assert_allclose(out64.numpy(), ref_multislerp(models, w), rtol=1e-12, atol=1e-14)


def test_multislerp_edges():
    x, y = rand(10, seed=4), rand(10, seed=5)
    assert torch.equal(run("multislerp", x, y, weights=[2.0, 6.0]), run("multislerp", x, y, weights=[0.25, 0.75]))
    # parallel inputs: the weighted mean; two opposed with equal weights: mergekit's lerp (zero)
    close(run("multislerp", x, 2 * x, 3 * x, weights=[1, 1, 2]), np64(x) * (1 + 2 + 6) / 4, tol=1e-6)
    close(run("multislerp", x, -x), np.zeros(10), tol=1e-6)
    # three that cancel: mergekit raises; mergebuild gives the weighted sum
    close(run("multislerp", x, -x, y, weights=[1, 1, 0]), np.zeros(10), tol=1e-6)
    close(run("multislerp", x, -x, y, weights=[1, 1, 0]), ref_multislerp([x, -x, y], [1, 1, 0]), tol=1e-6)
    base = rand(10, seed=6)  # every delta zero (an untouched tensor): the base, for any count
    close(run("multislerp", base, base.clone(), base.clone(), base.clone(), base=True), np64(base))
    assert torch.equal(run("multislerp", base, x, base=True), x)  # one model: that model
    with pytest.raises(ValueError, match="sum to 0"):
        run("multislerp", x, y, weights=[1.0, -1.0])
    close(run("multislerp", x, y, weights=[1.0, -1.0], normalize_weights=False),
          ref_multislerp([x, y], [1.0, -1.0], normalize=False))
    with pytest.raises(ValueError, match="2 values but there are 3"):
        run("multislerp", base, x, y, y, base=True, weights=[1, 2])


def test_multislerp_float16_gives_the_limits_not_nan():
    """eps = 1e-8 is 0 in float16: mergekit's ops give NaN for a zero model (0/0) and for
    parallel inputs (sin(0)/0); mergebuild takes the limits, as float32 computes them."""
    zero_and_ones = [torch.zeros(4), torch.ones(4)]
    scalars = [torch.tensor(0.5), torch.tensor(0.25)]  # 0-d tensors are always parallel
    for xs in (zero_and_ones, scalars, [torch.ones(3), 2 * torch.ones(3)]):
        half = run("multislerp", *[x.half() for x in xs])
        assert torch.isfinite(half).all()
        torch.testing.assert_close(half.float(), run("multislerp", *xs), rtol=1e-3, atol=1e-3)


# --- karcher ------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES + [()])
def test_karcher_matches_the_formula(shape):
    _, models = trio(shape, n=4)
    close(run("karcher", *models), ref_karcher(models))
    close(run("karcher", *models, max_iter=50, tol=1e-9), ref_karcher(models, max_iter=50, tol=1e-9))
    close(run("karcher", *models, max_iter=0), ref_karcher(models, max_iter=0))
    w = [1.0, 3.0, 0.5, 0.5]
    close(run("karcher", *models, weights=w), ref_karcher(models, np.array(w) / 5))
    out64 = run("karcher", *[m.double() for m in models], max_iter=50, tol=1e-12)
    np.testing.assert_allclose(out64.numpy(), ref_karcher(models, max_iter=50, tol=1e-12), rtol=1e-10, atol=1e-13)


def test_karcher_is_the_geodesic_midpoint():
    """For two inputs of equal norm, the Karcher mean is the slerp midpoint."""
    a = rand(20, seed=7)
    b = rand(20, seed=8)
    b = b / b.norm() * a.norm()
    close(run("karcher", a, b, max_iter=100, tol=1e-9), ref_slerp_vec(0.5, np64(a), np64(b)), tol=1e-5)


def test_karcher_edges():
    x, y = rand(9, seed=9), rand(9, seed=10)
    assert torch.equal(run("karcher", x), x)
    close(run("karcher", x, x.clone(), x.clone()), np64(x), tol=1e-6)
    zero = torch.zeros_like(x)  # a zero input: left out of the direction, in the norm
    close(run("karcher", x, y, zero), ref_karcher([x, y, zero]))
    close(run("karcher", zero, zero), np.zeros(9))
    close(run("karcher", x, -x), np64(x), tol=1e-6)  # antipodal: the first direction
    assert torch.equal(run("karcher", x, y, weights=[2, 2]), run("karcher", x, y))
    with pytest.raises(ValueError, match="max_iter"):
        run("karcher", x, y, max_iter=-1)
    with pytest.raises(ValueError, match="sum to 0"):
        run("karcher", x, y, weights=[1, -1])


# --- sce ----------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("topk", [1.0, 0.5, 0.1, 0.0])
def test_sce_matches_the_formula(shape, topk):
    base, models = trio(shape, n=3)
    close(run("sce", base, *models, select_topk=topk), ref_sce(base, models, topk))
    out64 = run("sce", base.double(), *[m.double() for m in models], select_topk=topk)
    np.testing.assert_allclose(out64.numpy(), ref_sce(base, models, topk), rtol=1e-12, atol=1e-14)


def test_sce_ties_at_the_cut():
    base = torch.zeros(6)
    d1 = torch.tensor([1.0, -1.0, 1.0, -1.0, 2.0, 0.0])
    d2 = torch.tensor([-1.0, 1.0, -1.0, 1.0, 0.0, 0.0])  # variances 1, 1, 1, 1, 1, 0
    tvs = torch.stack([d1, d2])
    # 5 nonzero variances, k = int(5 * 0.4) = 2: all five tie, the lower indices win
    assert sce_mask(tvs, 0.4).tolist() == [1, 1, 0, 0, 0, 0]
    expected = torch.zeros(6)
    expected[torch.topk(torch.tensor([1.0, 1, 1, 1, 1, 0]), 2).indices] = 1  # torch's choice among equal values
    assert sce_mask(tvs, 0.4, "mergekit").tolist() == expected.tolist()
    close(run("sce", base, d1, d2, select_topk=0.4), ref_sce(base, [d1, d2], 0.4))
    # many ties: small integers over 4 models, whose variances float32 and float64 both compute exactly
    g = torch.Generator().manual_seed(11)
    base = torch.zeros(40, 7)
    models = [torch.randint(-2, 3, (40, 7), generator=g).float() for _ in range(4)]
    tvs = torch.stack(models)
    var = torch.var(tvs, dim=0, unbiased=False).reshape(-1)
    differ = []
    for topk in (0.5, 0.3, 0.05):
        close(run("sce", base, *models, select_topk=topk), ref_sce(base, models, topk))
        k = int(torch.count_nonzero(var) * topk)
        expected = torch.zeros(var.numel())
        expected[torch.topk(var, k).indices] = 1
        assert torch.equal(sce_mask(tvs, topk, "mergekit").reshape(-1), expected)
        assert int(sce_mask(tvs, topk).sum()) == k
        differ.append(not torch.equal(sce_mask(tvs, topk), sce_mask(tvs, topk, "mergekit")))
    assert any(differ)  # the rule matters here: some cut falls among equal variances
    with pytest.raises(ValueError, match="select_rules"):
        run("sce", base, *models, select_rules="stable")


def test_sce_edges():
    base, (a, b) = trio((5, 4))
    close(run("sce", base, a), np64(a))  # one fine-tune: its delta, all kept
    close(run("sce", base, a, select_topk=0.5), np64(base))  # one fine-tune: no variance, nothing selected
    close(run("sce", base, base.clone(), base.clone()), np64(base))  # zero deltas
    close(run("sce", base, a, b, select_topk=0.0), np64(base))
    # mean squared deltas summing below 1e-6: equal weights, so the kept deltas are averaged
    tiny = [base + rand(5, 4, seed=20 + i, scale=1e-4) for i in range(2)]
    d = np.stack([np64(t) - np64(base) for t in tiny])
    keep = np.sign(d) == np.where(d.sum(axis=0) >= 0, 1.0, -1.0)
    equal = np64(base) + (d * keep).sum(axis=0) / keep.sum(axis=0)
    close(run("sce", base, *tiny), equal, tol=1e-7)
    close(run("sce", base, *tiny), ref_sce(base, tiny), tol=1e-7)


# --- nearswap -----------------------------------------------------------------------------


@pytest.mark.parametrize("t", [0.0, 0.001, 0.005, 0.02, 1.0, -0.5])
def test_nearswap_matches_the_formula(t):
    base, (a,) = trio((8, 6), n=1)
    close(run("nearswap", base, a, t=t), ref_nearswap(base, a, t), tol=1e-6)


def test_nearswap_ends():
    base, (a,) = trio((8, 6), n=1)
    assert torch.equal(run("nearswap", base, a, t=0.0), base)
    assert torch.equal(run("nearswap", base, a, t=-1.0), base)
    assert torch.equal(run("nearswap", base, a, t=10.0), a)  # every entry within t
    assert torch.equal(run("nearswap", base, base.clone(), t=0.01), base)


# --- all of them --------------------------------------------------------------------------

CALLS = [("nuslerp", 2, {"weights": [0.3, 0.7]}), ("nuslerp", 3, {"nuslerp_flatten": False}),
         ("multislerp", 3, {}), ("multislerp", 4, {"base": True}), ("karcher", 3, {}),
         ("sce", 3, {"select_topk": 0.3}), ("nearswap", 2, {"t": 0.004})]


@pytest.mark.parametrize("name,n,params", CALLS, ids=[f"{c[0]}-{i}" for i, c in enumerate(CALLS)])
def test_deterministic_and_pure(name, n, params):
    base, models = trio((7, 3, 2), n=n - 1)
    xs = [base, *models]
    before = [x.clone() for x in xs]
    first, second = run(name, *xs, **params), run(name, *xs, **params)
    assert first.shape == base.shape and first.dtype == base.dtype
    assert first.numpy().tobytes() == second.numpy().tobytes()
    assert all(torch.equal(x, y) for x, y in zip(xs, before))


# --- through the CLI, against mergekit 0.1.5's own output -----------------------------------

# each case of tests/data/mergekit_0.1.5/cases.json as a mergebuild merge: inputs, parameters
CASES = {
    "nuslerp": (["a", "b"], {"weights": [0.3, 0.7]}),
    "nuslerp_rows_base": (["base", "a", "b"], {"weights": [1.0, 2.0], "nuslerp_flatten": False}),
    "nuslerp_row_wise": (["a", "b"], {"nuslerp_flatten": False, "nuslerp_row_wise": True}),
    "multislerp": (["a", "b", "base"], {"weights": [1.0, 2.0, 0.5]}),
    "multislerp_base": (["base", "a", "b"], {"base": True, "weights": [0.4, 0.9]}),
    "karcher": (["a", "b", "base"], {}),
    "karcher_tight": (["a", "b", "base"], {"max_iter": 50, "tol": 1e-9}),
    "sce": (["base", "a", "b"], {}),
    "sce_topk": (["base", "a", "b"], {"select_topk": 0.3, "select_rules": "mergekit"}),
    "nearswap": (["base", "a"], {"t": 0.005}),
}


def reference(case: str, m: dict, key: str) -> np.ndarray:
    inputs, p = CASES[case]
    xs = [m[name][key].float() for name in inputs]
    method = case.split("_")[0]
    if method == "nuslerp":
        base = xs.pop(0) if len(xs) == 3 else None
        return ref_nuslerp(*xs, tuple(p.get("weights", (1.0, 1.0))), p.get("nuslerp_flatten", True),
                           p.get("nuslerp_row_wise", False), base=base)
    if method == "multislerp":
        base = xs.pop(0) if p.get("base") else None
        return ref_multislerp(xs, p["weights"], base=base)
    if method == "karcher":
        return ref_karcher(xs, max_iter=p.get("max_iter", 10), tol=p.get("tol", 1e-5))
    if method == "sce":
        return ref_sce(xs[0], xs[1:], p.get("select_topk", 1.0))
    return ref_nearswap(*xs, p["t"])


def toml_value(v) -> str:
    return str(v).lower() if isinstance(v, bool) else json.dumps(v)


def test_build_matches_mergekit_and_the_references(tmp_path):
    made = json.loads((DATA / "cases.json").read_text())
    assert set(made["cases"]) == set(CASES)
    m = llama_trio(seed=17, **TRIO_SHAPE)  # the inputs mergekit merged (make.py)
    text = ""
    for name, sd in m.items():
        write_model(tmp_path / f"{name}.safetensors", sd)
        text += f'[models.{name}]\npath = "{name}.safetensors"\n'
    for case, (inputs, params) in CASES.items():
        text += (f'[merges.{case}]\nmethod = "{case.split("_")[0]}"\ninputs = {json.dumps(inputs)}\n'
                 f'dtype = "float32"\noutput = "out/{case}.safetensors"\n')
        text += "".join(f"{k} = {toml_value(v)}\n" for k, v in params.items())
    mergefile(tmp_path / "mergefile.toml", text)
    run_cli("build", "-q", cwd=tmp_path, check=True)
    theirs = json.loads((DATA / "outputs.json").read_text())  # sha256 of mergekit's tensors
    same_torch = made["torch"] == torch.__version__
    for case in CASES:
        ours = load_file(str(tmp_path / "out" / f"{case}.safetensors"))
        assert set(ours) == set(m["base"])
        for key, t in ours.items():
            assert t.dtype == torch.float32
            close(t, reference(case, m, key), tol=1e-5)
            if same_torch:  # mergekit's bytes, on the torch that made them (else the float64 formula only)
                assert tensor_sha256(t) in mergekit_digests(theirs[case][key]), f"{case} {key}"


def test_mergefile_errors(tmp_path):
    base, (a, b) = trio((4, 4))
    for name, t in (("base", base), ("a", a), ("b", b)):
        write_model(tmp_path / f"{name}.safetensors", {"w": t})
    models = "".join(f'[models.{n}]\npath = "{n}.safetensors"\n' for n in ("base", "a", "b"))
    mergefile(tmp_path / "mergefile.toml", models + '[merges.m]\nmethod = "nuslerp"\n'
              'inputs = ["base", "a", "b", "a"]\noutput = "m.safetensors"\n')
    proc = run_cli("build", cwd=tmp_path)
    assert proc.returncode != 0 and "nuslerp takes 2 inputs (A, B) or 3 (Base, A, B), got 4" in proc.stderr
    mergefile(tmp_path / "mergefile.toml", models + '[merges.m]\nmethod = "nearswap"\n'
              'inputs = ["base", "a"]\noutput = "m.safetensors"\n')
    proc = run_cli("build", cwd=tmp_path)
    assert proc.returncode != 0 and "nearswap needs t" in proc.stderr

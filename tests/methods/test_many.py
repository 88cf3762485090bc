"""Many-model methods (mergebuild/methods/many.py) against float64 numpy references written
from the formulas in docs/methods.md, plus determinism and edge cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mergebuild.methods import get_method
from mergebuild.methods.registry import REQUIRED


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def models(n=4, shape=(5, 6), seed=0):
    return [rand(*shape, seed=seed + i) for i in range(n)]


def np64(xs):
    return [x.double().numpy() for x in xs]


def run(name, *xs, **params):
    method = get_method(name)
    kwargs = method.defaults()
    kwargs.update(params)
    return method.fn(*xs, **kwargs)


def close(out, ref, tol=2e-5):
    assert not torch.isnan(out).any()
    np.testing.assert_allclose(out.double().numpy(), ref, rtol=tol, atol=tol)


EXPECTED = {
    "soup": (("A", "B"), {"weights": ()}),
    "fisher": (("Model", "Fisher"), {"weights": (), "eps": 1e-8}),
    "geometric_median": (("A", "B"), {"eps": 1e-6, "maxiter": 100, "ftol": 1e-20}),
    "ema": (("A", "B"), {"decay": REQUIRED}),
    "tail_average": (("A", "B"), {"k": 0, "scorer": None}),  # scorer: with k = "auto" only (tune/two_tailed.py)
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_registered(name):
    method = get_method(name)
    inputs, params = EXPECTED[name]
    assert method.inputs == inputs and method.variadic and not method.takes_key
    assert {p.name: p.default for p in method.params} == params
    assert method.arity_ok(7) and not method.arity_ok(1)


CALLS = [("soup", 4, {}), ("soup", 3, dict(weights=[1, 2, 3])), ("fisher", 6, {}), ("geometric_median", 4, {}),
         ("ema", 4, dict(decay=0.7)), ("tail_average", 4, dict(k=2))]


@pytest.mark.parametrize("name,n,params", CALLS, ids=[f"{c[0]}-{i}" for i, c in enumerate(CALLS)])
def test_deterministic_and_pure(name, n, params):
    xs = [x.abs() if name == "fisher" and i >= n // 2 else x for i, x in enumerate(models(n, (4, 3, 2)))]
    before = [x.clone() for x in xs]
    first, second = run(name, *xs, **params), run(name, *xs, **params)
    assert first.shape == xs[0].shape
    assert first.numpy().tobytes() == second.numpy().tobytes()
    assert all(torch.equal(x, y) for x, y in zip(xs, before))


@pytest.mark.parametrize("name,n,params", CALLS, ids=[f"{c[0]}-{i}" for i, c in enumerate(CALLS)])
def test_identical_inputs_give_that_input(name, n, params):
    x = rand(4, 3)
    xs = [x.clone() for _ in range(n)]
    if name == "fisher":
        xs[n // 2:] = [torch.zeros_like(x)] * (n // 2)  # all-zero Fishers, too
    assert torch.allclose(run(name, *xs, **params), x, atol=1e-6)


@pytest.mark.parametrize("name,n,params", CALLS, ids=[f"{c[0]}-{i}" for i, c in enumerate(CALLS)])
def test_scalars(name, n, params):
    xs = [torch.tensor(float(i) + 0.5) for i in range(n)]
    out = run(name, *xs, **params)
    assert out.shape == () and torch.isfinite(out)


# --- soup ---------------------------------------------------------------------------------


def test_uniform_soup():
    xs = models(5)
    close(run("soup", *xs), np.mean(np64(xs), axis=0))


def test_weighted_soup_normalises_the_weights():
    xs = models(3)
    w = np.array([1.0, 3.0, -0.5])
    close(run("soup", *xs, weights=list(w)), sum(wi * x for wi, x in zip(w / w.sum(), np64(xs))))
    assert torch.allclose(run("soup", *xs, weights=[2, 2, 2]), run("soup", *xs))


def test_soup_weight_errors():
    xs = models(3)
    with pytest.raises(ValueError, match="3 models"):
        run("soup", *xs, weights=[1, 2])
    with pytest.raises(ValueError, match="sum to 0"):
        run("soup", *xs, weights=[1, -1, 0])


# --- Fisher -------------------------------------------------------------------------------


def ref_fisher(thetas, fishers, w, eps):
    num = sum(wi * np.maximum(f, eps) * t for wi, f, t in zip(w, fishers, thetas))
    den = sum(wi * np.maximum(f, eps) for wi, f in zip(w, fishers))
    return num / den


@pytest.mark.parametrize("n", [1, 2, 3])
def test_fisher(n):
    thetas = models(n)
    fishers = [x.abs() ** 2 for x in models(n, seed=50)]
    w = [1.0, 0.5, 2.0][:n]
    close(run("fisher", *thetas, *fishers, weights=w), ref_fisher(np64(thetas), np64(fishers), w, 1e-8))
    close(run("fisher", *thetas, *fishers), ref_fisher(np64(thetas), np64(fishers), [1.0] * n, 1e-8))


def test_fisher_edges():
    thetas = models(2)
    zero = torch.zeros_like(thetas[0])
    big = torch.full_like(thetas[0], 1e6)
    # a Fisher far larger than the other wins; all-zero Fishers give the weighted mean
    assert torch.allclose(run("fisher", *thetas, big, zero), thetas[0])
    close(run("fisher", *thetas, zero, zero, weights=[1.0, 3.0]), 0.25 * np64(thetas)[0] + 0.75 * np64(thetas)[1])
    close(run("fisher", *thetas, zero, zero, eps=0.0), np.mean(np64(thetas), axis=0))  # no 0/0
    tiny = torch.full_like(zero, 1e-12)  # below the floor: both count as eps
    close(run("fisher", *thetas, zero, tiny), np.mean(np64(thetas), axis=0))
    close(run("fisher", *thetas, zero, tiny, eps=1e-20), np64(thetas)[1])
    with pytest.raises(ValueError, match="even count"):
        run("fisher", *thetas, zero)
    with pytest.raises(ValueError, match=">= 0"):
        run("fisher", *thetas, zero, zero, weights=[1.0, -1.0])
    with pytest.raises(ValueError, match="2 models"):
        run("fisher", *thetas, zero, zero, weights=[1.0])


# --- geometric median ---------------------------------------------------------------------


def ref_weiszfeld(points, eps, iterations):
    median = np.mean(points, axis=0)
    for _ in range(iterations):
        w = np.array([1 / max(np.linalg.norm(p - median), eps) for p in points])
        median = sum(wi * p for wi, p in zip(w, points)) / w.sum()
    return median


def test_geometric_median_matches_weiszfeld():
    xs = models(5, (3, 4))
    close(run("geometric_median", *xs, maxiter=7, ftol=0.0), ref_weiszfeld(np64(xs), 1e-6, 7), tol=1e-4)
    close(run("geometric_median", *xs, maxiter=0), np.mean(np64(xs), axis=0))


def test_geometric_median_minimises_the_distance_sum():
    xs = models(5, (3, 4))
    out = run("geometric_median", *xs)

    def cost(p):
        return sum(torch.linalg.vector_norm(x - p).item() for x in xs)

    assert cost(out) < cost(torch.stack(xs).mean(0))
    for i in range(20):  # no nearby point does better
        assert cost(out) <= cost(out + 1e-2 * rand(3, 4, seed=200 + i)) + 1e-6


def test_geometric_median_of_numbers_is_the_median_and_resists_outliers():
    xs = [torch.tensor([v]) for v in (0.0, 1.0, 2.0, 3.0, 1000.0)]
    assert run("geometric_median", *xs).item() == pytest.approx(2.0, abs=1e-3)
    with pytest.raises(ValueError):
        run("geometric_median", *xs, maxiter=-1)


# --- EMA and tail averages ----------------------------------------------------------------


@pytest.mark.parametrize("decay", [0.0, 0.3, 0.9, 1.0])
def test_ema(decay):
    xs = models(4)
    e = np64(xs)[0]
    for x in np64(xs)[1:]:
        e = decay * e + (1 - decay) * x
    close(run("ema", *xs, decay=decay), e)


def test_ema_ends():
    xs = models(3)
    assert torch.equal(run("ema", *xs, decay=1.0), xs[0])
    assert torch.equal(run("ema", *xs, decay=0.0), xs[-1])
    with pytest.raises(ValueError, match="decay"):
        run("ema", *xs, decay=1.5)


@pytest.mark.parametrize("k", [0, 1, 3, 5])
def test_tail_average(k):
    xs = models(5)
    close(run("tail_average", *xs, k=k), np.mean(np64(xs)[-(k or 5):], axis=0))


def test_tail_average_checks_k():
    xs = models(3)
    for k in (-1, 4):
        with pytest.raises(ValueError, match="k must be"):
            run("tail_average", *xs, k=k)

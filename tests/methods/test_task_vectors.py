"""Task-vector methods (mergebuild/methods/task_vectors.py) against float64 numpy references
written from the papers' formulas (docs/methods.md), plus seeds, determinism and edge cases.

The random masks of DARE and DELLA are regenerated here from their documented stream: a CPU
torch.Generator seeded with xxh3_64(f"{seed}:{key}"), one torch.rand(shape) per fine-tune in
input order."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xxhash

from mergebuild.methods import get_method
from mergebuild.methods.registry import REQUIRED
from mergebuild.methods.task_vectors import generalized_task_arithmetic

KEY = "model.diffusion_model.input_blocks.1.1.proj_in.weight"


def rand(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def family(shape=(6, 10), n=3, seed=0):
    """A base and n fine-tunes of it."""
    base = rand(*shape, seed=seed)
    return base, [base + rand(*shape, seed=seed + 1 + i, scale=0.1) for i in range(n)]


def run(name, *xs, **params):
    method = get_method(name)
    kwargs = method.defaults()
    kwargs.update(params)
    if method.takes_key:
        kwargs.setdefault("key", KEY)
    return method.fn(*xs, **kwargs)


def close(out, ref):
    assert not torch.isnan(out).any()
    np.testing.assert_allclose(out.double().numpy(), ref, rtol=2e-5, atol=2e-6)


def np_deltas(base, models):
    b = base.double().numpy()
    return b, [m.double().numpy() - b for m in models]


def ref_merge(base, deltas, weights, lam, sign, normalize):
    """base + lam * (elected, optionally normalised) sum of w_i * delta_i."""
    w = np.array(weights, dtype=np.float64).reshape((-1,) + (1,) * base.ndim)
    wd = np.stack(deltas) * w
    if sign is None:
        mixed, divisor = wd.sum(0), w.sum()
        divisor = divisor if abs(divisor) >= 1e-8 else 1.0
    else:
        votes = wd.sum(0) if sign == "mass" else np.sign(wd).sum(0)
        # "count" (sd-meh, sd-mecha): a tied vote elects 0, which keeps nothing; the others elect + on a tie
        elected = np.sign(votes) if sign == "count" else np.where(votes >= 0, 1.0, -1.0)
        agree = (np.sign(wd) == elected) & (elected != 0)
        mixed = (wd * agree).sum(0)
        divisor = (np.broadcast_to(w, wd.shape) * agree).sum(0)
        divisor[divisor == 0] = 1
    if normalize:
        mixed = mixed / divisor
    return base + lam * mixed


def ref_trim(d, density):
    if density >= 1:
        return d
    keep = np.argsort(-np.abs(d).ravel(), kind="stable")[: int(density * d.size)]
    out = np.zeros(d.size)
    out[keep] = d.ravel()[keep]
    return out.reshape(d.shape)


def stream(seed, key=KEY):
    return torch.Generator().manual_seed(xxhash.xxh3_64_intdigest(f"{seed}:{key}".encode()))


def dare_masks(shape, n, density, seed, key=KEY):
    g = stream(seed, key)
    return [(torch.rand(shape, generator=g) < density).numpy() for _ in range(n)]


# --- registry -----------------------------------------------------------------------------

EXPECTED = {
    "task_arithmetic": (("Base", "A"), {"weights": (), "lambda": 1.0}, False),
    "ties": (("Base", "A"), {"density": 0.2, "weights": (), "lambda": 1.0, "sign": "mass", "normalize": True,
                             "ties_rules": "mergebuild"}, False),
    "dare": (("Base", "A"), {"density": 0.5, "seed": 0, "weights": (), "lambda": 1.0, "rescale": True}, True),
    "dare_ties": (("Base", "A"), {"density": 0.5, "seed": 0, "weights": (), "lambda": 1.0, "sign": "mass",
                                  "normalize": False, "rescale": True}, True),
    "breadcrumbs": (("Base", "A"), {"density": 0.9, "gamma": 0.01, "weights": (), "lambda": 1.0, "sign": "none",
                                    "normalize": False}, False),
    "della": (("Base", "A"), {"density": 0.5, "epsilon": 0.15, "seed": 0, "weights": (), "lambda": 1.0, "sign": "mass",
                              "normalize": True, "rescale": True}, True),
    "model_stock": (("Base", "A", "B"), {"filter_wise": False}, False),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_registered(name):
    method = get_method(name)
    inputs, params, takes_key = EXPECTED[name]
    assert method.inputs == inputs
    assert {p.name: p.default for p in method.params} == params
    assert all(p.default is not REQUIRED for p in method.params)
    assert method.variadic and method.takes_key == takes_key
    assert method.arity_ok(len(inputs) + 3) and not method.arity_ok(len(inputs) - 1)
    if "sign" in params:
        assert set(method.param("sign").choices) >= {"mass", "count"}
    if "weights" in params:
        assert method.param("weights").kind is list and method.param("weights").accepts([0.5, 1])


# --- determinism and purity ---------------------------------------------------------------

NAMES = sorted(EXPECTED)


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_and_pure(name):
    base, models = family((5, 4, 3))
    xs = [base, *models]
    before = [x.clone() for x in xs]
    first, second = run(name, *xs), run(name, *xs)
    assert first.shape == base.shape and first.dtype == base.dtype
    assert first.numpy().tobytes() == second.numpy().tobytes()
    assert all(torch.equal(x, y) for x, y in zip(xs, before))


@pytest.mark.parametrize("name", NAMES)
def test_fine_tunes_equal_to_the_base_give_the_base(name):
    base, _ = family()
    out = run(name, base, base.clone(), base.clone(), base.clone())
    assert not torch.isnan(out).any()
    assert torch.equal(out, base)


@pytest.mark.parametrize("name", NAMES)
def test_scalars_and_vectors(name):
    for shape in ((), (1,), (9,)):
        base, models = family(shape or (1,))
        if not shape:
            base, models = base.reshape(()), [m.reshape(()) for m in models]
        out = run(name, base, *models)
        assert out.shape == base.shape and not torch.isnan(out).any(), (name, shape)


@pytest.mark.parametrize("name", [n for n in NAMES if "weights" in EXPECTED[n][1]])
def test_weights_must_match_the_fine_tunes(name):
    base, models = family()
    with pytest.raises(ValueError, match="3 fine-tunes"):
        run(name, base, *models, weights=[1.0, 1.0])


# --- task arithmetic and TIES ---------------------------------------------------------------


def test_task_arithmetic():
    base, models = family()
    b, ds = np_deltas(base, models)
    w = [0.5, 1.5, -0.3]
    close(run("task_arithmetic", base, *models, weights=w, **{"lambda": 0.8}), b + 0.8 * sum(wi * d for wi, d in zip(w, ds)))
    close(run("task_arithmetic", base, *models), b + sum(ds))


@pytest.mark.parametrize("sign", ["mass", "count", "count_mergekit"])
@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
@pytest.mark.parametrize("normalize", [True, False])
def test_ties(sign, density, normalize):
    base, models = family((8, 9), n=4)
    b, ds = np_deltas(base, models)
    w = [1.0, 0.7, 1.3, 0.4]
    ref = ref_merge(b, [ref_trim(d, density) for d in ds], w, 1.2, sign, normalize)
    out = run("ties", base, *models, density=density, weights=w, sign=sign, normalize=normalize, **{"lambda": 1.2})
    close(out, ref)


def test_ties_by_hand():
    """density 1, weights 1: deltas (1, -2, 3) and (-1, 1, 1)."""
    base = torch.zeros(3)
    m1, m2 = torch.tensor([1.0, -2.0, 3.0]), torch.tensor([-1.0, 1.0, 1.0])
    # mass: sums (0, -1, 4) elect (+, -, +); agreeing means: 1/1, -2/1, (3+1)/2
    assert run("ties", base, m1, m2, density=1.0).tolist() == [1.0, -2.0, 2.0]
    # count: sign sums (0, 0, 2) elect (none, none, +); agreeing means: 0, 0, 4/2
    assert run("ties", base, m1, m2, density=1.0, sign="count").tolist() == [0.0, 0.0, 2.0]
    # count_mergekit: the tied votes elect +: 1/1, 1/1, 4/2
    assert run("ties", base, m1, m2, density=1.0, sign="count_mergekit").tolist() == [1.0, 1.0, 2.0]
    # trim to the top third: delta 1 keeps its 3, delta 2 its -1 (three equal magnitudes: the
    # first position wins); each element then has one non-zero delta, which elects its own sign
    assert run("ties", base, m1, m2, density=1 / 3 + 1e-9).tolist() == [-1.0, 0.0, 3.0]


def test_family_members_are_configured_instances():
    base, models = family()
    assert torch.equal(run("ties", base, *models),
                       generalized_task_arithmetic(base, *models, sparsify="magnitude", sign="mass", normalize=True,
                                                   density=0.2))
    assert torch.equal(run("task_arithmetic", base, *models), generalized_task_arithmetic(base, *models))


def test_ties_zero_density_is_the_base():
    base, models = family()
    assert torch.equal(run("ties", base, *models, density=0.0), base)


# --- DARE -----------------------------------------------------------------------------------


@pytest.mark.parametrize("rescale", [True, False])
def test_dare(rescale):
    base, models = family((10, 12))
    b, ds = np_deltas(base, models)
    masks = dare_masks(base.shape, 3, 0.3, seed=5)
    kept = [d * m / (0.3 if rescale else 1.0) for d, m in zip(ds, masks)]
    w = [1.0, 0.5, 2.0]
    close(run("dare", base, *models, density=0.3, seed=5, weights=w, rescale=rescale, **{"lambda": 0.9}),
          ref_merge(b, kept, w, 0.9, None, False))


@pytest.mark.parametrize("sign", ["mass", "count"])
@pytest.mark.parametrize("normalize", [False, True])
def test_dare_ties(sign, normalize):
    base, models = family((10, 12))
    b, ds = np_deltas(base, models)
    masks = dare_masks(base.shape, 3, 0.6, seed=1)
    kept = [d * m / 0.6 for d, m in zip(ds, masks)]
    out = run("dare_ties", base, *models, density=0.6, seed=1, sign=sign, normalize=normalize)
    close(out, ref_merge(b, kept, [1, 1, 1], 1.0, sign, normalize))


@pytest.mark.parametrize("name", ["dare", "dare_ties", "della"])
def test_seeded_masks_depend_on_seed_and_key_only(name):
    base, models = family((20, 30))
    out = run(name, base, *models, seed=3, key="a.weight")
    assert torch.equal(out, run(name, base, *models, seed=3, key="a.weight"))
    assert not torch.equal(out, run(name, base, *models, seed=3, key="b.weight"))
    assert not torch.equal(out, run(name, base, *models, seed=4, key="a.weight"))
    # the mask does not depend on the compute dtype (nor, by construction, on the device)
    out64 = run(name, base.double(), *(m.double() for m in models), seed=3, key="a.weight")
    assert torch.equal(out64 == base.double(), out == base)


@pytest.mark.parametrize("name", ["dare", "della"])
def test_seeded_methods_need_the_key(name):
    base, models = family()
    method = get_method(name)
    with pytest.raises(ValueError, match="key"):
        method.fn(base, *models, **method.defaults())


def test_dare_keeps_about_density_and_preserves_the_sum():
    base = torch.zeros(200, 100)
    delta = torch.ones(200, 100)
    out = run("dare", base, delta, density=0.25, seed=0)
    kept = (out != 0).float().mean().item()
    assert abs(kept - 0.25) < 0.01
    assert abs(out.mean().item() - 1.0) < 0.05  # each kept entry is 1 / 0.25
    assert torch.equal(run("dare", base, delta, density=1.0), delta)
    assert torch.equal(run("dare", base, delta, density=0.0), base)


# --- breadcrumbs --------------------------------------------------------------------------


def ref_breadcrumbs(d, density, gamma):
    if density >= 1:
        return d
    n = d.size
    keep = int(density * n)
    top = min(int(gamma * n), n - keep)
    order = np.argsort(-np.abs(d).ravel(), kind="stable")[top: top + keep]
    out = np.zeros(n)
    out[order] = d.ravel()[order]
    return out.reshape(d.shape)


@pytest.mark.parametrize("density,gamma", [(0.9, 0.01), (0.5, 0.1), (0.7, 0.5), (0.8, 0.0)])
@pytest.mark.parametrize("sign", ["none", "mass"])
def test_breadcrumbs(density, gamma, sign):
    base, models = family((20, 15))
    b, ds = np_deltas(base, models)
    ref = ref_merge(b, [ref_breadcrumbs(d, density, gamma) for d in ds], [1, 1, 1], 0.5, None if sign == "none" else sign,
                    False)
    close(run("breadcrumbs", base, *models, density=density, gamma=gamma, sign=sign, **{"lambda": 0.5}), ref)


def test_breadcrumbs_keeps_density_when_gamma_rounds_to_nothing():
    """gamma * n < 1 removes no outlier but still drops the smallest (mergekit keeps none there)."""
    base = torch.zeros(30)
    delta = torch.arange(1.0, 31.0)
    out = run("breadcrumbs", base, delta, density=0.9, gamma=0.01)
    assert out.tolist() == [0.0] * 3 + list(range(4, 31))
    out = run("breadcrumbs", base, delta, density=0.5, gamma=0.1)  # drops the 3 largest and the 12 smallest
    assert out.tolist() == [0.0] * 12 + list(range(13, 28)) + [0.0] * 3


# --- DELLA --------------------------------------------------------------------------------


def ref_della_probabilities(d, density, epsilon):
    rows = d.reshape(d.shape[0], -1) if d.ndim > 1 else d.reshape(1, -1)
    m = rows.shape[1]
    ranks = np.empty(rows.shape)
    for r in range(rows.shape[0]):
        ranks[r, np.argsort(np.abs(rows[r]), kind="stable")] = np.arange(m)
    spread = ranks / (m - 1) if m > 1 else np.full(rows.shape, 0.5)
    return (density - epsilon + 2 * epsilon * spread).reshape(d.shape)


@pytest.mark.parametrize("sign,normalize,rescale", [("mass", True, True), ("none", False, True), ("count", True, False)])
@pytest.mark.parametrize("shape", [(6, 20), (4, 3, 2, 2)])
def test_della(sign, normalize, rescale, shape):
    base, models = family(shape)
    b, ds = np_deltas(base, models)
    g = stream(9)
    kept = []
    for d in ds:
        p = ref_della_probabilities(d, 0.4, 0.15)
        mask = torch.rand(d.shape, generator=g).double().numpy() < p
        kept.append(np.where(mask, d / p if rescale else d, 0.0))
    out = run("della", base, *models, density=0.4, epsilon=0.15, seed=9, sign=sign, normalize=normalize,
              rescale=rescale, weights=[1.0, 2.0, 0.5])
    close(out, ref_merge(b, kept, [1.0, 2.0, 0.5], 1.0, None if sign == "none" else sign, normalize))


def test_della_keeps_large_magnitudes_more_often():
    base = torch.zeros(400, 50)
    delta = torch.arange(1.0, 51.0).repeat(400, 1)  # each row ranks its entries 1..50
    out = run("della", base, delta, density=0.5, epsilon=0.4, seed=0, rescale=False)
    kept = (out != 0).float().mean(dim=0)
    assert kept[:10].mean() < 0.2 and kept[-10:].mean() > 0.8
    assert abs(kept.mean().item() - 0.5) < 0.02


def test_della_checks_epsilon():
    base, models = family()
    for density, epsilon in ((0.5, 0.6), (0.9, 0.2), (0.5, -0.1)):
        with pytest.raises(ValueError, match="epsilon"):
            run("della", base, *models, density=density, epsilon=epsilon)


# --- Model Stock --------------------------------------------------------------------------


def ref_model_stock(base, models, filter_wise):
    b = base.double().numpy()
    ms = [m.double().numpy() for m in models]
    rows = (lambda x: x.reshape(x.shape[0], -1)) if filter_wise and b.ndim > 1 else (lambda x: x.reshape(1, -1))
    ds = [rows(m - b) for m in ms]
    k = len(ds)
    cos = []
    for i in range(k):
        for j in range(i + 1, k):
            cos.append(np.sum(ds[i] * ds[j], axis=1) / (np.linalg.norm(ds[i], axis=1) * np.linalg.norm(ds[j], axis=1)))
    c = np.clip(np.mean(cos, axis=0), 0, 1)[:, None]
    t = k * c / (1 + (k - 1) * c)
    return (t * rows(np.mean(ms, axis=0)) + (1 - t) * rows(b)).reshape(b.shape)


@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("n", [2, 3, 4])
def test_model_stock(filter_wise, n):
    base, models = family((6, 4, 3), n=n)
    shared = rand(6, 4, 3, seed=99, scale=0.1)  # a common direction, so cos > 0
    models = [m + shared for m in models]
    close(run("model_stock", base, *models, filter_wise=filter_wise), ref_model_stock(base, models, filter_wise))


def test_model_stock_edges():
    base, models = family(n=2)
    assert torch.allclose(run("model_stock", base, models[0], models[0].clone()), models[0])  # cos 1: t = 1
    opposite = 2 * base - models[0]
    assert torch.equal(run("model_stock", base, models[0], opposite), base)  # cos -1 clamps to 0: t = 0
    with pytest.raises(ValueError, match="at least 2"):
        get_method("model_stock").fn(base, models[0])


@pytest.mark.parametrize("density", [0.1, 0.35, 0.5, 0.9])
def test_trimming_with_tied_magnitudes(density):
    """Many equal magnitudes: exactly int(density * n) survive, the lower positions first."""
    base = torch.zeros(6, 7)
    models = [torch.randint(-3, 4, (6, 7), generator=torch.Generator().manual_seed(i)).float() for i in range(2)]
    b, ds = np_deltas(base, models)
    close(run("ties", base, *models, density=density), ref_merge(b, [ref_trim(d, density) for d in ds], [1, 1], 1.0,
                                                                 "mass", True))
    close(run("breadcrumbs", base, *models, density=density, gamma=0.1),
          ref_merge(b, [ref_breadcrumbs(d, density, 0.1) for d in ds], [1, 1], 1.0, None, False))

"""Parity modes (docs/methods.md), each against an independent implementation of the peer's rule
written here from the peer's source: A1111 1.x `modules/extras.py` (`run_modelmerger`), sd-meh 0.9.5
and sd-mecha 1.1.8 (`ties_sum`, `slerp`), mergekit 0.1.5 (`sparsify.py`, `generalized_task_arithmetic.py`,
`merge_methods/slerp.py`).

Where the point is the peer's bytes, the reference runs in the peer's dtype: A1111's float16 ops
are emulated in numpy (each op exact in float64, then rounded to float32, torch's op math, then to
the tensor's dtype), mergekit's and sd-mecha's float32 torch ops are transcribed op for op. Where
the point is the rule, the reference is float64. The defaults are held to frozen copies of the
code before the modes were added (`frozen_*`); the Mergefile side (aliases, unknown modes, cache
keys) runs through the real CLI in tests/e2e/test_parity_modes_cli.py."""

from __future__ import annotations


import numpy as np
import pytest
import torch
import xxhash

from mergebuild.methods import get_method
from mergebuild.methods.common import bernoulli_mask, generator_for
from mergebuild.methods.task_vectors import breadcrumbs_sparsify, della_keep_probabilities, magnitude_sparsify

KEY = "model.diffusion_model.input_blocks.1.1.proj_in.weight"


def run(name, *xs, **params):
    """Call a method as the executor does: the planner's defaults, then the given parameters."""
    method = get_method(name)
    kwargs = {**method.defaults(), **params}
    if method.takes_key:
        kwargs.setdefault("key", KEY)
    return method.fn(*xs, **kwargs)


def fine_tunes(shape, n, seed=0, dtype=torch.float16, scale=0.01):
    """A base ~ N(0, 0.05) and n fine-tunes of it (deltas ~ N(0, scale)), stored in dtype, as float32."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(shape, generator=g) * 0.05).to(dtype)
    models = [(base.float() + torch.randn(shape, generator=g) * scale).to(dtype) for _ in range(n)]
    return base.float(), [m.float() for m in models]


def same_bytes(x: torch.Tensor, y: torch.Tensor) -> bool:
    return x.dtype == y.dtype and x.shape == y.shape and x.reshape(-1).view(torch.uint8).equal(
        y.reshape(-1).view(torch.uint8))


# --- A1111 arithmetic -----------------------------------------------------------------------

NP = {"F16": np.float16, "F32": np.float32, "BF16": "bf16"}
TORCH = {"F16": torch.float16, "F32": torch.float32, "BF16": torch.bfloat16}


def to_bf16_bits(x32: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, round to nearest even (finite values)."""
    bits = x32.astype(np.float32).view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def from_bf16_bits(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


class Emulated:
    """A tensor in a stored dtype, as float64 values that the dtype holds exactly."""

    def __init__(self, values: np.ndarray, code: str):
        self.values, self.code = values.astype(np.float64), code

    @staticmethod
    def rounded(exact: np.ndarray, code: str) -> "Emulated":
        """One torch op's result: the exact value rounded to float32 (op math), then to code."""
        x32 = exact.astype(np.float32)
        if code == "F16":
            return Emulated(x32.astype(np.float16).astype(np.float64), code)
        if code == "BF16":
            return Emulated(from_bf16_bits(to_bf16_bits(x32)), code)
        return Emulated(x32.astype(np.float64), code)

    def scale(self, s: float) -> "Emulated":  # tensor * Python float: the scalar becomes float32
        return Emulated.rounded(self.values * np.float64(np.float32(s)), self.code)

    def __add__(self, other: "Emulated") -> "Emulated":
        return Emulated.rounded(self.values + other.values, promote(self.code, other.code))

    def __sub__(self, other: "Emulated") -> "Emulated":
        return Emulated.rounded(self.values - other.values, promote(self.code, other.code))


def promote(x: str, y: str) -> str:
    if x == y:
        return x
    return "F32"  # F16 with F32, BF16 with F32, F16 with BF16: torch promotes all three to float32


def a1111_weighted_sum(a: Emulated, b: Emulated, alpha: float) -> Emulated:
    return a.scale(1 - alpha) + b.scale(alpha)  # ((1 - alpha) * theta0) + (alpha * theta1)


def a1111_add_difference(a: Emulated, b: Emulated, c: Emulated, alpha: float) -> Emulated:
    return a + (b - c).scale(alpha)  # theta1 - theta2 first, then theta0 + (alpha * diff)


def stored(t: torch.Tensor, code: str) -> Emulated:
    return Emulated(t.to(TORCH[code]).double().numpy(), code)


def as_torch(e: Emulated) -> torch.Tensor:
    return torch.from_numpy(e.values).to(TORCH[e.code])  # exact: the values are e.code's


def pair_sets():
    """Fine-tunes of one base, and unrelated weights (where (1 - a)A and aB cancel)."""
    base, (a, b) = fine_tunes((64, 80), 2, seed=1)
    _, (u,) = fine_tunes((64, 80), 1, seed=2, scale=0.05)
    _, (v,) = fine_tunes((64, 80), 1, seed=3, scale=0.05)
    return [("fine-tunes", a, b, base), ("unrelated", u, v, base)]


@pytest.mark.parametrize("codes", [("F16",) * 3, ("F32",) * 3, ("BF16",) * 3, ("F32", "F16", "F16")])
@pytest.mark.parametrize("alpha", [0.3, 0.05, 0.5, 0.7, 1 / 3, 1.0])
def test_a1111_arithmetic_writes_a1111s_bytes(codes, alpha):
    for _, a, b, c in pair_sets():
        xs = [x.to(TORCH[k]) for x, k in zip((a, b, c), codes)]
        compute = [x.float() for x in xs]  # what the method receives: the compute dtype (exact)
        ws = run("weighted_sum", *compute[:2], alpha=alpha, arithmetic="a1111", dtypes=list(codes[:2]))
        expected = as_torch(a1111_weighted_sum(stored(xs[0], codes[0]), stored(xs[1], codes[1]), alpha))
        assert ws.dtype == torch.float32 and same_bytes(ws.to(expected.dtype), expected)
        assert torch.equal(ws.to(expected.dtype).float(), ws)  # the cast to the output dtype is exact
        ad = run("add_difference", *compute, alpha=alpha, arithmetic="a1111", dtypes=list(codes))
        expected = as_torch(a1111_add_difference(*(stored(x, k) for x, k in zip(xs, codes)), alpha))
        assert same_bytes(ad.to(expected.dtype), expected)


def test_a1111_arithmetic_differs_from_exact_as_documented():
    """docs/methods.md quotes benchmarks/parity.py: on float16 fine-tunes of one base, alpha 0.3,
    about 23 % of the elements differ, by up to a hundred ulps and more where the result is small;
    never by more than an ulp of the larger input."""
    _, a, b, _ = pair_sets()[0]
    exact = run("weighted_sum", a, b, alpha=0.3).half()
    a1111 = run("weighted_sum", a, b, alpha=0.3, arithmetic="a1111", dtypes=["F16", "F16"]).half()
    differ = (exact != a1111).float().mean().item()
    assert 0.15 < differ < 0.32
    ulp_of_input = torch.from_numpy(np.spacing(np.maximum(a.abs().half().numpy(), b.abs().half().numpy())))
    assert ((exact.float() - a1111.float()).abs() <= ulp_of_input.float()).all()


def test_a1111_without_dtypes_computes_in_the_tensors_own_dtype():
    _, a, b, c = pair_sets()[1]
    a, b, c = a.half(), b.half(), c.half()
    assert torch.equal(run("weighted_sum", a, b, alpha=0.3, arithmetic="a1111"), ((1 - 0.3) * a) + (0.3 * b))
    assert torch.equal(run("add_difference", a, b, c, alpha=0.7, arithmetic="a1111"), a + (0.7 * (b - c)))


def test_a1111_refuses_a_compute_dtype_that_rounded_the_inputs():
    x = torch.randn(10, dtype=torch.float16)
    with pytest.raises(ValueError, match="holds F32 exactly"):
        run("weighted_sum", x, x, alpha=0.5, arithmetic="a1111", dtypes=["F32", "F32"])
    with pytest.raises(ValueError, match="not F8_E4M3"):
        run("weighted_sum", x.float(), x.float(), alpha=0.5, arithmetic="a1111", dtypes=["F8_E4M3", "F16"])


@pytest.mark.parametrize("name", ["weighted_sum", "add_difference"])
def test_a1111_is_elementwise_at_any_offset(name):
    """The executor runs elementwise methods on chunks and batches (tests/methods/test_elementwise.py)."""
    n_in = len(get_method(name).inputs)
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(37, generator=g).half().float() for _ in range(n_in)]
    params = dict(alpha=0.3, arithmetic="a1111", dtypes=["F16"] * n_in)
    alone = run(name, *xs, **params)
    for offset in (0, 1, 5, 13):
        pads = [torch.randn(offset + 9, generator=g).half().float() for _ in range(n_in)]
        longer = [torch.cat([p[:offset], x, p[offset:]]) for p, x in zip(pads, xs)]
        assert torch.equal(run(name, *longer, **params)[offset:offset + 37], alone)


# --- sign election on a tie ----------------------------------------------------------------


def mecha_ties(base, deltas, alpha):
    """sd-mecha 1.1.8 add_difference_ties with vote_sgn = False (count) and k = 1 (keep all), float64:
    final_sign = sign(sum(signs)); keep signs == final_sign; sum / count, NaN -> 0."""
    signs = np.sign(deltas)
    final = np.sign(signs.sum(0))
    filters = (signs == final).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        merged = np.nan_to_num((deltas * filters).sum(0) / filters.sum(0), nan=0, posinf=0, neginf=0)
    return base + alpha * merged


def meh_ties_add_difference(a, b, c, alpha):
    """sd-meh 0.9.5 ties_add_difference with beta = 1 (no trim), float64."""
    deltas = [a - c, b - c]
    signs = np.stack([np.sign(d) for d in deltas])
    final = np.sign(signs.sum(0))
    filters = (signs == final).astype(np.float64)
    res = sum(f * d for f, d in zip(filters, deltas))
    with np.errstate(invalid="ignore", divide="ignore"):
        return c + alpha * np.nan_to_num(res / filters.sum(0))


def mergekit_count(base, deltas, weights, lam, normalize):
    """mergekit 0.1.5 get_mask(method="count") and merge_group, float64."""
    w = np.array(weights, dtype=np.float64).reshape((-1,) + (1,) * base.ndim)
    wd = deltas * w
    sign = np.sign(wd)
    majority = (sign.sum(0) >= 0) * 2 - 1
    mask = sign == majority
    mixed = (wd * mask).sum(0)
    divisor = (np.broadcast_to(w, wd.shape) * mask).sum(0)
    divisor[divisor == 0] = 1
    return base + lam * (mixed / divisor if normalize else mixed)


def tied_family():
    """Three fine-tunes; the third has zero deltas (no vote) at a third of the elements, so votes tie."""
    base, models = fine_tunes((40, 50), 3, seed=11, dtype=torch.float32)
    models[2] = torch.where(torch.arange(2000).reshape(40, 50) % 3 == 0, base, models[2])  # a zero delta votes 0
    return base, models


def test_sign_count_follows_sd_mecha_and_sd_meh_on_a_tie():
    base, models = tied_family()
    b = base.double().numpy()
    ds = np.stack([m.double().numpy() - b for m in models])
    out = run("ties", base, *models, density=1.0, sign="count", **{"lambda": 0.8})
    np.testing.assert_allclose(out.double().numpy(), mecha_ties(b, ds, 0.8), rtol=1e-6, atol=1e-7)
    tied = np.sign(np.sign(ds).sum(0)) == 0
    assert tied.mean() > 0.1 and torch.equal(out[torch.from_numpy(tied)], base[torch.from_numpy(tied)])
    # sd-meh's ties_add_difference: A, B against C, alpha = lambda, no trim
    a, bb = models[0], models[1]
    out = run("ties", base, a, bb, density=1.0, sign="count", **{"lambda": 0.6})
    ref = meh_ties_add_difference(a.double().numpy(), bb.double().numpy(), b, 0.6)
    np.testing.assert_allclose(out.double().numpy(), ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("density,normalize", [(1.0, True), (0.5, True), (0.5, False)])
def test_sign_count_mergekit_is_mergekits_count(density, normalize):
    base, models = tied_family()
    b = base.double().numpy()
    trimmed = np.stack([magnitude_sparsify(m - base, density).double().numpy() for m in models])
    out = run("ties", base, *models, density=density, sign="count_mergekit", normalize=normalize,
              weights=[1.0, 0.5, 2.0], **{"lambda": 1.1})
    ref = mergekit_count(b, trimmed, [1.0, 0.5, 2.0], 1.1, normalize)
    np.testing.assert_allclose(out.double().numpy(), ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["ties", "dare_ties", "della", "breadcrumbs"])
def test_every_family_member_keeps_nothing_on_a_tied_count(name):
    base = torch.zeros(4)
    m1, m2 = torch.tensor([1.0, -2.0, 3.0, 0.5]), torch.tensor([-1.0, 1.0, 1.0, 0.5])
    params = dict(density=1.0, sign="count")
    assert run(name, base, m1, m2, **params).tolist()[:2] == [0.0, 0.0]
    assert run(name, base, m1, m2, **{**params, "sign": "count_mergekit"}).tolist()[:2] != [0.0, 0.0]


# --- DARE / DELLA rescale ------------------------------------------------------------------


def dare_masks(shape, n, density, seed, key=KEY):
    g = torch.Generator().manual_seed(xxhash.xxh3_64_intdigest(f"{seed}:{key}".encode()))
    return [torch.rand(shape, generator=g) < density for _ in range(n)]


def mergekit_l1(tensor: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mergekit 0.1.5 sparsify.rescaled_masked_tensor(norm=RescaleNorm.l1), its float32 ops."""
    masked = tensor * mask
    before_scale = tensor.abs().sum()
    after_scale = masked.abs().sum()
    if before_scale < 1e-7 or after_scale < 1e-7:
        return masked
    return masked * (before_scale / after_scale)


@pytest.mark.parametrize("shape", [(48, 40), (7,), (3, 5, 2, 2)])
def test_rescale_l1_is_mergekits_rule_on_the_seeded_masks(shape):
    base, models = fine_tunes(shape, 3, seed=4, dtype=torch.float32)
    masks = dare_masks(base.shape, 3, 0.3, seed=8)
    weights = [1.0, 0.5, 2.0]
    # mergekit's dare_linear merge_group (no consensus, no normalisation, lambda 1): deltas rescaled,
    # multiplied by their weights, summed over the models, added to the base; float32 throughout
    deltas = torch.stack([mergekit_l1(m - base, mask.float()) for m, mask in zip(models, masks)])
    w = torch.tensor(weights).reshape((-1,) + (1,) * base.dim())
    expected = base + deltas.mul_(w).sum(dim=0)
    out = run("dare", base, *models, density=0.3, seed=8, weights=weights, rescale="l1")
    assert torch.equal(out, expected)
    # the rule in float64: each kept delta carries the whole delta's L1 norm (one fine-tune: the first mask)
    mask = masks[0].numpy()
    for m in models:
        d = (m - base).double().numpy()
        kept = np.where(mask, d, 0.0)
        ref = kept * np.abs(d).sum() / np.abs(kept).sum() if mask.any() else kept
        got = run("dare", base, m, density=0.3, seed=8, rescale="l1") - base
        np.testing.assert_allclose(got.double().numpy(), ref, rtol=1e-5, atol=1e-8)


def test_rescale_l1_for_della_scales_each_delta_by_its_l1_ratio():
    base, (model,) = fine_tunes((6, 20), 1, seed=6, dtype=torch.float32)
    d = (model - base).double().numpy()
    g = torch.Generator().manual_seed(xxhash.xxh3_64_intdigest(f"9:{KEY}".encode()))
    p = della_keep_probabilities(model - base, 0.4, 0.15)
    mask = (torch.rand(d.shape, generator=g) < p).numpy()
    kept = np.where(mask, d, 0.0)
    out = run("della", base, model, density=0.4, epsilon=0.15, seed=9, sign="none", normalize=False, rescale="l1")
    np.testing.assert_allclose((out - base).double().numpy(), kept * np.abs(d).sum() / np.abs(kept).sum(),
                               rtol=1e-5, atol=1e-8)


def test_rescale_l1_leaves_tiny_deltas_alone():
    base = torch.zeros(100)
    model = torch.full((100,), 1e-10)  # sum |delta| = 1e-8 < mergekit's 1e-7
    masks = dare_masks(base.shape, 1, 0.5, seed=0)
    assert torch.equal(run("dare", base, model, density=0.5, rescale="l1"), torch.where(masks[0], model, 0.0))


@pytest.mark.parametrize("name", ["dare", "dare_ties", "della"])
def test_rescale_true_and_false_are_density_and_none(name):
    base, models = fine_tunes((20, 30), 2, seed=3, dtype=torch.float32)
    assert torch.equal(run(name, base, *models, rescale=True), run(name, base, *models, rescale="density"))
    assert torch.equal(run(name, base, *models, rescale=False), run(name, base, *models, rescale="none"))
    assert not torch.equal(run(name, base, *models, rescale="l1"), run(name, base, *models, rescale="density"))
    param = get_method(name).param("rescale")
    assert param.default is True  # as before the words: the cache keys of old Mergefiles hold
    assert all(param.accepts(v) for v in (True, False, "density", "l1", "none"))
    assert not any(param.accepts(v) for v in (1, 0, "L1", "true", None))
    assert param.canonical(True) == "density" and param.canonical(False) == "none" and param.canonical("l1") == "l1"


# --- TIES edge rules ------------------------------------------------------------------------


def mergekit_ties(base, models, density, weights, lam, method="sum", normalize=True):
    """mergekit 0.1.5 ties: sparsify.magnitude (no rescale) and merge_group with get_mask, float32."""
    deltas = base.new_empty((len(models), *base.shape))
    for i, m in enumerate(models):
        delta = m - base
        if density >= 1:
            pass
        elif density <= 0 or delta.numel() == 0:
            delta = torch.zeros_like(delta)
        else:
            k = max(1, int(density * delta.numel()))
            mask = torch.zeros(delta.numel(), dtype=delta.dtype)
            w = delta.abs().reshape(-1).float()
            mask[torch.argsort(w, descending=True)[:k]] = 1
            delta = delta * mask.reshape_as(delta)
        deltas[i] = delta
    w = torch.tensor(weights, dtype=deltas.dtype)
    while deltas.dim() > w.dim():
        w.unsqueeze_(-1)
    deltas.mul_(w)
    sign = deltas.sign().to(base.dtype)
    votes = deltas.sum(dim=0) if method == "sum" else sign.sum(dim=0)
    mask = sign == (votes >= 0).to(base.dtype) * 2 - 1
    mixed = (deltas * mask).sum(dim=0)
    divisor = (w * mask).sum(dim=0)
    divisor[divisor == 0] = 1
    if normalize:
        mixed /= divisor
    if lam != 1:
        mixed *= lam
    return (base + mixed).to(base.dtype)


@pytest.mark.parametrize("shape,density", [((64, 50), 0.2), ((64, 50), 0.5), ((5,), 0.1), ((3, 2), 0.05),
                                           ((300,), 0.003), ((64, 50), 0.0), ((64, 50), 1.0)])
@pytest.mark.parametrize("sign", ["mass", "count_mergekit"])
def test_ties_rules_mergekit_writes_mergekits_bytes(shape, density, sign):
    # float16 deltas: many equal magnitudes at the cut, where the tie order decides
    base, models = fine_tunes(shape, 3, seed=21, scale=0.002)
    weights = [1.0, 0.7, 1.3]
    out = run("ties", base, *models, density=density, weights=weights, sign=sign, ties_rules="mergekit",
              **{"lambda": 1.2})
    expected = mergekit_ties(base, models, density, weights, 1.2, "sum" if sign == "mass" else "count")
    assert same_bytes(out, expected)


def test_ties_rules_mergekit_keeps_one_entry_where_the_default_keeps_none():
    base = torch.zeros(4)
    model = torch.tensor([0.1, -0.4, 0.2, 0.3])
    assert torch.equal(run("ties", base, model, density=0.2), base)  # int(0.8) = 0 entries (the default)
    assert run("ties", base, model, density=0.2, ties_rules="mergekit").tolist() == pytest.approx([0, -0.4, 0, 0])
    assert torch.equal(run("ties", base, model, density=0.0, ties_rules="mergekit"), base)


def test_ties_rules_mergekit_is_the_default_where_nothing_ties():
    """Distinct magnitudes and density * n >= 1: the same entries survive, the same sums (to the
    sign of a zero)."""
    base, models = fine_tunes((30, 40), 3, seed=2, dtype=torch.float32)
    out = run("ties", base, *models, density=0.3, ties_rules="mergekit")
    assert torch.equal(out, run("ties", base, *models, density=0.3))


# --- the defaults are unchanged: frozen copies of the code before the modes ------------------


def frozen_elect(weighted, sign):
    votes = weighted.sum(dim=0) if sign == "mass" else torch.sign(weighted).sum(dim=0)
    return torch.where(votes >= 0, 1.0, -1.0).to(weighted.dtype)


def frozen_dare(delta, density, generator, rescale=True):
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    mask = bernoulli_mask(delta.shape, density, generator, delta.device)
    kept = torch.where(mask, delta, torch.zeros_like(delta))
    return kept / density if rescale else kept


def frozen_della(delta, density, epsilon, generator, rescale=True):
    if density >= 1:
        return delta
    p = della_keep_probabilities(delta, density, epsilon)
    mask = bernoulli_mask(delta.shape, p, generator, delta.device)
    kept = torch.where(mask, delta, torch.zeros_like(delta))
    if not rescale:
        return kept
    p = p.to(delta.dtype).to(delta.device)
    return torch.where(mask, kept / torch.where(mask, p, torch.ones_like(p)), kept)


def frozen_gta(base, *models, sparsify="none", sign="none", normalize=False, rescale=True, weights=(), lam=1.0,
               density=1.0, gamma=0.01, epsilon=0.15, seed=0, key=KEY):
    ws = [float(w) for w in weights] if len(weights) else [1.0] * len(models)
    generator = generator_for(seed, key) if sparsify in ("random", "della") else None
    deltas = []
    for model in models:
        delta = model - base
        if sparsify == "magnitude":
            delta = magnitude_sparsify(delta, density)
        elif sparsify == "random":
            delta = frozen_dare(delta, density, generator, rescale)
        elif sparsify == "breadcrumbs":
            delta = breadcrumbs_sparsify(delta, density, gamma)
        elif sparsify == "della":
            delta = frozen_della(delta, density, epsilon, generator, rescale)
        deltas.append(delta)
    w = torch.tensor(ws, dtype=base.dtype).reshape((-1,) + (1,) * base.dim())
    weighted = torch.stack(deltas).mul_(w)
    if sign == "none":
        mixed = weighted.sum(dim=0)
        divisor = sum(ws) if abs(sum(ws)) >= 1e-8 else 1.0
    else:
        agree = torch.sign(weighted) == frozen_elect(weighted, sign)
        divisor = torch.where(agree, w, 0.0).sum(dim=0)
        divisor = torch.where(divisor == 0, 1.0, divisor)
        mixed = weighted.masked_fill_(~agree, 0.0).sum(dim=0)
    if normalize:
        mixed.div_(divisor)
    return mixed.mul_(lam).add_(base)


FROZEN = [  # (method, new parameters, frozen configuration): the old default bytes, and old count = count_mergekit
    ("ties", {}, dict(sparsify="magnitude", sign="mass", normalize=True, density=0.2)),
    ("ties", {"sign": "count_mergekit", "density": 0.5}, dict(sparsify="magnitude", sign="count", normalize=True,
                                                             density=0.5)),
    ("dare", {}, dict(sparsify="random", density=0.5)),
    ("dare", {"rescale": False, "density": 0.3}, dict(sparsify="random", density=0.3, rescale=False)),
    ("dare_ties", {}, dict(sparsify="random", sign="mass", density=0.5)),
    ("dare_ties", {"sign": "count_mergekit"}, dict(sparsify="random", sign="count", density=0.5)),
    ("della", {}, dict(sparsify="della", sign="mass", normalize=True, density=0.5)),
    ("della", {"rescale": False, "sign": "none"}, dict(sparsify="della", sign="none", normalize=True, density=0.5,
                                                       rescale=False)),
    ("breadcrumbs", {}, dict(sparsify="breadcrumbs", density=0.9)),
    ("breadcrumbs", {"sign": "mass"}, dict(sparsify="breadcrumbs", sign="mass", density=0.9)),
]


@pytest.mark.parametrize("name,params,frozen", FROZEN, ids=[f"{n}-{sorted(p)}" for n, p, _ in FROZEN])
def test_task_vector_defaults_are_unchanged(name, params, frozen):
    base, models = fine_tunes((24, 30), 3, seed=17)
    out = run(name, base, *models, weights=[1.0, 0.6, 1.4], **params)
    assert torch.equal(out, frozen_gta(base, *models, weights=[1.0, 0.6, 1.4], **frozen))


def test_arithmetic_and_slerp_defaults():
    base, (a, b) = fine_tunes((50, 60), 2, seed=9)
    assert torch.equal(run("weighted_sum", a, b, alpha=0.3), torch.lerp(a, b, 0.3))
    assert torch.equal(run("add_difference", a, b, base, alpha=0.7), torch.add(a, b - base, alpha=0.7))
    assert torch.equal(run("weighted_sum", a, b, alpha=0.3, arithmetic="exact"), torch.lerp(a, b, 0.3))
    assert "arithmetic" not in get_method("weighted_sum").defaults()  # an implicit parameter: keys unchanged


def test_versions():
    """A method whose bytes changed has a new version (part of every cache key); the others keep theirs."""
    versions = {m: get_method(m).version for m in ("weighted_sum", "add_difference", "slerp", "ties", "dare",
                                                   "dare_ties", "della", "breadcrumbs", "task_arithmetic")}
    assert versions == {"weighted_sum": 1, "add_difference": 1, "slerp": 2, "ties": 2, "dare": 1, "dare_ties": 2,
                        "della": 2, "breadcrumbs": 2, "task_arithmetic": 1}

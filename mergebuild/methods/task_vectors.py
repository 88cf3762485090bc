"""Task-vector merges against a base: task arithmetic, TIES, DARE, breadcrumbs, DELLA, Model Stock.

The first input is the base; the others are fine-tunes of it, and delta_i = model_i - base is a
task vector. Task arithmetic, TIES, DARE, breadcrumbs and DELLA are configured instances of one
function, generalized_task_arithmetic (the idea of mergekit's GeneralizedTaskArithmeticMerge):

    1. sparsify each delta (none | magnitude top-k | random DARE | breadcrumbs band | DELLA),
    2. weight it: w_i * delta_i,
    3. optionally elect a sign per element (sign "mass", "count" or "count_mergekit") and keep the
       agreeing deltas,
    4. sum them, optionally dividing by the summed weights of those kept (normalize),
    5. base + lambda * that.

See ../../docs/methods.md for each member's defaults and where they differ from mergekit.
"""

from __future__ import annotations

from mergebuild.methods.common import and_bits, bernoulli_mask, bits_dtype, generator_for, model_weights, zero_unless
from mergebuild.methods.draws import keep_mask
from mergebuild.methods.registry import Method, Param
from mergebuild.methods.selection import chunk_size, kept_bits, select, top_k_mask
from mergebuild.torchlazy import torch

SPARSIFIERS = ("none", "magnitude", "random", "breadcrumbs", "della")
SIGNS = ("none", "mass", "count", "count_mergekit")
RESCALES = ("density", "l1", "none")  # how DARE and DELLA rescale what they keep; true / false mean density / none
TIES_RULES = ("mergebuild", "mergekit")
L1_EPS = 1e-7  # mergekit's rescaled_masked_tensor leaves the kept entries alone when an L1 norm is below this


# --- sparsification: each returns the kept (and possibly rescaled) delta ------------------


def magnitude_sparsify(delta, density: float):
    """Keep the int(density * n) entries of largest |delta| (TIES "trim"); density >= 1 keeps all."""
    if density >= 1:
        return delta
    k = max(int(density * delta.numel()), 0)
    return torch.where(top_k_mask(delta.abs(), k), delta, 0.0)


def breadcrumbs_sparsify(delta, density: float, gamma: float):
    """Drop the int(gamma * n) largest |delta| and then the smallest, keeping int(density * n)
    (Model Breadcrumbs, as mergekit counts it). If density + gamma > 1, fewer large ones go."""
    if density >= 1:
        return delta
    n = delta.numel()
    keep = max(int(density * n), 0)
    top = min(max(int(gamma * n), 0), n - keep)
    magnitude = delta.abs()
    mask = top_k_mask(magnitude, top + keep) & ~top_k_mask(magnitude, top)
    return torch.where(mask, delta, torch.zeros_like(delta))


def magnitude_sparsify_mergekit(delta, density: float):
    """mergekit 0.1.5's TIES trim (sparsify.magnitude, no rescaling): keep max(1, int(density * n))
    entries, those first in torch.argsort(|delta|, descending=True) (float32 on the CPU), so a
    positive density keeps at least one; density <= 0 keeps none. The mask multiplies."""
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    k = max(1, int(density * delta.numel()))
    mask = torch.zeros(delta.numel(), dtype=delta.dtype, device=delta.device)
    w = delta.abs().reshape(-1)
    if w.device.type == "cpu":
        w = w.float()
    mask[torch.argsort(w, descending=True)[:k]] = 1
    return delta * mask.reshape_as(delta)


def rescale_rule(rescale) -> str:
    """"density", "l1" or "none"; the Mergefile's true and false mean "density" and "none"."""
    rule = ("density" if rescale else "none") if isinstance(rescale, bool) else rescale
    if rule not in RESCALES:
        raise ValueError(f"rescale must be one of {RESCALES} (or true / false), got {rescale!r}")
    return rule


def l1_rescaled(delta, mask):
    """mergekit 0.1.5's RescaleNorm.l1 (sparsify.rescaled_masked_tensor): delta * mask, times
    sum|delta| / sum|delta * mask|, so the kept entries have the whole delta's L1 norm; left as it
    is when either sum is below 1e-7."""
    masked = delta * mask.to(delta.dtype)
    before = delta.abs().sum()
    after = masked.abs().sum()
    if before < L1_EPS or after < L1_EPS:
        return masked
    return masked * (before / after)


def dare_sparsify(delta, density: float, generator, rescale="density"):
    """Keep each entry with probability density (DARE's drop rate p = 1 - density), then rescale:
    "density" divides by density, so the expectation is unchanged (the paper); "l1" restores the
    delta's L1 norm (mergekit 0.1.5); "none" keeps the entries as they are. density >= 1 keeps
    all, <= 0 drops all."""
    rule = rescale_rule(rescale)
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    mask = bernoulli_mask(delta.shape, density, generator, delta.device)
    if rule == "l1":
        return l1_rescaled(delta, mask)
    kept = torch.where(mask, delta, torch.zeros_like(delta))
    return kept / density if rule == "density" else kept


def della_keep_probabilities(delta, density: float, epsilon: float):
    """DELLA's per-entry keep probability, on the CPU (float64): within each row (dim 0; a 1-D
    tensor is one row), ranks by |delta| map linearly onto [density - epsilon, density + epsilon],
    the smallest magnitude lowest. Ties rank by position (a stable sort)."""
    rows = delta.reshape(delta.shape[0], -1) if delta.dim() > 1 else delta.reshape(1, -1)
    order = torch.sort(rows.abs(), dim=1, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(rows.shape[1], device=order.device).expand_as(order))
    ranks = ranks.cpu().to(torch.float64)
    m = rows.shape[1]
    spread = ranks / (m - 1) if m > 1 else torch.full_like(ranks, 0.5)
    return ((density - epsilon) + 2 * epsilon * spread).reshape(delta.shape)


def della_sparsify(delta, density: float, epsilon: float, generator, rescale="density"):
    """DELLA's MagPrune: keep each entry with its della_keep_probabilities p_i, then rescale:
    "density" divides each kept one by its p_i (the paper), "l1" restores the delta's L1 norm
    (mergekit 0.1.5), "none" leaves them. density >= 1 keeps all."""
    rule = rescale_rule(rescale)
    if density >= 1:
        return delta
    if epsilon < 0 or density - epsilon < 0 or density + epsilon > 1:
        raise ValueError(f"della needs 0 <= density - epsilon and density + epsilon <= 1 "
                         f"(density={density}, epsilon={epsilon})")
    p = della_keep_probabilities(delta, density, epsilon)
    mask = bernoulli_mask(delta.shape, p, generator, delta.device)
    if rule == "l1":
        return l1_rescaled(delta, mask)
    kept = torch.where(mask, delta, torch.zeros_like(delta))
    if rule == "none":
        return kept
    p = p.to(delta.dtype).to(delta.device)
    return torch.where(mask, kept / torch.where(mask, p, torch.ones_like(p)), kept)


# --- the general function -----------------------------------------------------------------


def elect_sign(weighted, sign: str):
    """The elected sign per element of the stacked weighted deltas: "mass" takes the sign of their
    sum (TIES; a zero sum elects +1, as mergekit), "count" the sign of the sum of their signs, 0
    on a tied vote, which keeps nothing (sd-meh, sd-mecha), "count_mergekit" the same vote with a
    tie electing +1 (mergekit's "count")."""
    if sign == "mass":
        votes = weighted.sum(dim=0)
    else:
        votes = torch.sign(weighted).sum(dim=0)
        if sign == "count":
            return torch.sign(votes).to(weighted.dtype)
    # +1 or -1; compared into the float dtype: a comparison into bool is a scalar loop on a CPU
    return torch.ge(votes, 0, out=torch.empty_like(votes)).mul_(2).sub_(1)


def generalized_task_arithmetic(base, *models, sparsify: str = "none", sign: str = "none",
                                normalize: bool = False, rescale="density", weights=(),
                                lam: float = 1.0, density: float = 1.0, gamma: float = 0.01,
                                epsilon: float = 0.15, seed: int = 0, key: str | None = None,
                                ties_rules: str = "mergebuild"):
    """base + lam * merge(sparsified w_i * delta_i); see the module docstring. ties_rules
    "mergekit" trims as mergekit 0.1.5 does (magnitude_sparsify_mergekit) and masks by
    multiplying, as it does."""
    if sparsify not in SPARSIFIERS:
        raise ValueError(f"sparsify must be one of {SPARSIFIERS}, got {sparsify!r}")
    if sign not in SIGNS:
        raise ValueError(f"sign must be one of {SIGNS}, got {sign!r}")
    if ties_rules not in TIES_RULES:
        raise ValueError(f"ties_rules must be one of {TIES_RULES}, got {ties_rules!r}")
    rescale = rescale_rule(rescale)
    mergekit = ties_rules == "mergekit"
    if not models:
        raise ValueError("a task-vector merge needs the base and at least one fine-tune")
    ws = model_weights(weights, len(models), "fine-tune")
    generator = None
    if sparsify in ("random", "della"):
        if key is None:
            raise ValueError(f"{sparsify} sparsification needs the tensor's key for its random stream")
        generator = generator_for(seed, key)
    flat_base = base.reshape(-1)
    flat_models = [m.reshape(-1) for m in models]
    step = chunk_size(base.device)
    options = dict(density=density, gamma=gamma, epsilon=epsilon, rescale=rescale, mergekit=mergekit, step=step)
    # in input order: DARE's and DELLA's masks are drawn from one stream, model after model
    trims = [_trim(sparsify, flat_base, m, generator, base.shape, **options) for m in flat_models]
    w = torch.tensor(ws, dtype=base.dtype, device=base.device).reshape(-1, 1)
    out = torch.empty_like(flat_base)
    for i in range(0, flat_base.numel(), step):  # chunk by chunk: no whole-tensor copies
        j = min(i + step, flat_base.numel())
        deltas = [trim(m[i:j] - flat_base[i:j], i) for trim, m in zip(trims, flat_models)]
        out[i:j] = _combine(torch.stack(deltas).mul_(w), w, ws, flat_base[i:j], sign, normalize, lam, mergekit)
    return out.reshape(base.shape)


def _trim(sparsify: str, base, model, generator, shape, *, density, gamma, epsilon, rescale, mergekit, step):
    """A flat model's sparsifier as trim(delta_chunk, start) -> the kept (rescaled) chunk, the
    same numbers as the whole-tensor *_sparsify functions above. Selections (top-k thresholds,
    DARE's masks) are made here, over the whole tensor, before the first chunk is merged."""
    n = base.numel()
    if sparsify == "none" or density >= 1 and sparsify != "della":
        return lambda delta, start: delta
    magnitudes = lambda i, j: (model[i:j] - base[i:j]).abs_()  # noqa: E731 - |delta| of a chunk, recomputed
    if sparsify == "magnitude" and not mergekit:
        top = select(magnitudes, n, max(int(density * n), 0), step)
        return lambda delta, start: and_bits(delta, kept_bits(top, delta.abs(), start))
    if sparsify == "breadcrumbs":
        keep = max(int(density * n), 0)
        large = min(max(int(gamma * n), 0), n - keep)
        band, dropped = select(magnitudes, n, large + keep, step), select(magnitudes, n, large, step)
        return lambda delta, start: and_bits(delta, kept_bits(band, (m := delta.abs()), start)
                                             & ~kept_bits(dropped, m, start))
    if sparsify == "random" and rescale != "l1" and density > 0:
        mask = keep_mask(n, density, generator).to(base.device)
        if rescale == "density":
            return lambda delta, start: zero_unless(delta, mask[start : start + delta.numel()]).div_(density)
        return lambda delta, start: zero_unless(delta, mask[start : start + delta.numel()])
    # the rest trim whole tensors (in their shape: DELLA ranks by row), as the functions above do:
    # mergekit's argsort, DELLA, L1 rescaling
    delta = (model - base).reshape(shape)
    if sparsify == "magnitude":
        whole = magnitude_sparsify_mergekit(delta, density)
    elif sparsify == "random":
        whole = dare_sparsify(delta, density, generator, rescale)
    else:
        whole = della_sparsify(delta, density, epsilon, generator, rescale)
    whole = whole.reshape(-1)
    del delta
    return lambda chunk, start: whole[start : start + chunk.numel()]


def _combine(weighted, w, ws, base, sign: str, normalize: bool, lam: float, mergekit: bool):
    """base + lam * the elected (and normalised) sum of the stacked weighted deltas of a chunk."""
    if sign == "none":
        mixed = weighted.sum(dim=0)
        total = sum(ws)
        divisor = total if abs(total) >= 1e-8 else 1.0
    else:
        agree = _agreeing(weighted, elect_sign(weighted, sign))
        if mergekit:
            mixed = (weighted * agree).sum(dim=0)
        agree = agree.view(bits_dtype(agree)).neg_().bitwise_right_shift_(agree.element_size() * 8 - 1)  # 1.0 -> -1, 0.0 -> 0
        weights = w.expand_as(weighted).clone(memory_format=torch.contiguous_format)  # a copy, always
        divisor = and_bits(weights, agree).sum(dim=0)
        divisor.add_(torch.eq(divisor, 0, out=torch.empty_like(divisor)))  # 0 -> 1.0; d + 0.0 is d
        if not mergekit:
            mixed = and_bits(weighted, agree).sum(dim=0)
    if normalize:
        mixed.div_(divisor)
    return mixed.mul_(lam).add_(base)  # base + lam * mixed, in mixed's own memory


def _agreeing(weighted, elected):
    """1.0 where a weighted delta's sign is the elected one and that is not 0 (a zero delta is
    never kept), else 0.0: sign * elected == +1 exactly (NaN never is), compared into the float
    dtype (a vector loop, where one into bool is a scalar loop)."""
    product = torch.sign(weighted).mul_(elected)
    return torch.eq(product, 1.0, out=product)


def _member(name: str, doc: str, *, sparsify: str, params: tuple, fixed: dict | None = None,
            takes_key: bool = False, version: int = 1) -> Method:
    """A Method that calls generalized_task_arithmetic with its own configuration and parameters."""
    defaults = {p.name: p.default for p in params}
    fixed = dict(fixed or {})

    def fn(base, *models, **kwargs):
        p = {**defaults, **kwargs}
        if "lambda" in p:
            p["lam"] = p.pop("lambda")
        return generalized_task_arithmetic(base, *models, sparsify=sparsify, **fixed, **p)

    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = doc
    return Method(name, version, fn, ("Base", "A"), params, doc, takes_key=takes_key, variadic=True)


WEIGHTS = Param("weights", list, (), "one weight per fine-tune (the base has none); empty: 1.0 each",
                count=lambda n: n - 1)
LAMBDA = Param("lambda", float, 1.0, "multiplier of the merged task vector")
SEED = Param("seed", int, 0, "seed of the drop masks; with the tensor's name it gives each tensor its own stream")
# the default stays true (= "density"), so the cache keys of Mergefiles from before the words stay as they were
RESCALE = Param("rescale", str, True, "density (or true, the default): divide kept entries by their keep "
                "probability (the papers); l1: restore each delta's L1 norm (mergekit 0.1.5); none (or false): "
                "keep them as they are",
                choices=RESCALES, aliases=((True, "density"), (False, "none")))


def _density(default: float) -> Param:
    return Param("density", float, default, "fraction of each task vector's entries kept")


def _sign(default: str, choices=("mass", "count", "count_mergekit")) -> Param:
    return Param("sign", str, default, "sign election: mass = sign of the summed deltas (TIES), "
                 "count = majority of signs, a tie keeping nothing (sd-meh, sd-mecha), count_mergekit = "
                 "the same with a tie electing + (mergekit)" + (", none = no election" if "none" in choices else ""),
                 choices=choices)


def _normalize(default: bool) -> Param:
    return Param("normalize", bool, default, "divide by the summed weights of the deltas kept at each element")


# whose numbers these methods reproduce (shown by `mergebuild methods NAME`)
FOLLOWS = "mergekit's generalized task arithmetic (where mergebuild differs: docs/methods.md)"
METHODS = [
    _member("task_arithmetic", "base + lambda * sum_i w_i (model_i - base) (Ilharco et al.; mergekit task_arithmetic).",
            sparsify="none", fixed={"sign": "none", "normalize": False}, params=(WEIGHTS, LAMBDA)),
    _member("ties", "TIES-merging: keep each delta's top density fraction by magnitude, elect a sign per "
            "element, average the agreeing weighted deltas, add lambda times that to the base.",
            sparsify="magnitude", version=2,
            params=(_density(0.2), WEIGHTS, LAMBDA, _sign("mass"), _normalize(True),
                    Param("ties_rules", str, "mergebuild", "mergebuild: keep exactly int(density * n) entries, "
                          "equal magnitudes by position; mergekit: mergekit 0.1.5's trim (at least one entry, "
                          "torch.argsort's order)", choices=TIES_RULES))),
    _member("dare", "DARE (mergekit dare_linear): drop each delta entry with probability 1 - density, divide the "
            "rest by density, base + lambda * sum_i w_i delta_i.", sparsify="random", takes_key=True,
            fixed={"sign": "none", "normalize": False}, params=(_density(0.5), SEED, WEIGHTS, LAMBDA, RESCALE)),
    _member("dare_ties", "DARE drop and rescale, then TIES sign election (mergekit dare_ties: no normalisation by "
            "default).", sparsify="random", takes_key=True, version=2,
            params=(_density(0.5), SEED, WEIGHTS, LAMBDA, _sign("mass"), _normalize(False), RESCALE)),
    _member("breadcrumbs", "Model Breadcrumbs: drop each delta's gamma largest and its smallest entries, keeping "
            "density, then task arithmetic (sign mass|count = mergekit breadcrumbs_ties).", sparsify="breadcrumbs",
            version=2,
            params=(_density(0.9), Param("gamma", float, 0.01, "fraction of largest-magnitude entries dropped"),
                    WEIGHTS, LAMBDA, _sign("none", SIGNS), _normalize(False))),
    _member("della", "DELLA: keep entries with probabilities ranked by magnitude within each row, from "
            "density - epsilon to density + epsilon, rescale (by 1/p), elect signs, merge (sign none = della_linear).",
            sparsify="della", takes_key=True, version=2,
            params=(_density(0.5), Param("epsilon", float, 0.15, "half-width of the keep-probability range"), SEED,
                    WEIGHTS, LAMBDA, _sign("mass", SIGNS), _normalize(True), RESCALE)),
]


# --- Model Stock --------------------------------------------------------------------------


def model_stock(base, *models, filter_wise: bool = False):
    """Model Stock (Jang et al. 2024): t * mean(models) + (1-t) * base, t = k cos / (1 + (k-1) cos).

    cos is the mean pairwise cosine of the k deltas (whole tensor, or per row of dim 0 with filter_wise).
    cos is clamped to [0, 1], so deltas pointing apart give the base."""
    if len(models) < 2:
        raise ValueError(f"model_stock needs the base and at least 2 fine-tunes, got {len(models)} fine-tune(s)")
    k = len(models)
    rows = (lambda x: x.reshape(x.shape[0], -1)) if filter_wise and base.dim() > 1 else (lambda x: x.reshape(1, -1))
    deltas = [rows(m - base) for m in models]
    cosines = []
    for i in range(k):
        for j in range(i + 1, k):
            norms = torch.linalg.vector_norm(deltas[i], dim=1) * torch.linalg.vector_norm(deltas[j], dim=1)
            dots = (deltas[i] * deltas[j]).sum(dim=1)
            cosines.append(torch.where(norms > 0, dots / torch.where(norms > 0, norms, torch.ones_like(norms)),
                                       torch.zeros_like(norms)))
    cos = torch.stack(cosines).mean(dim=0).clamp(0.0, 1.0)
    t = (k * cos / (1 + (k - 1) * cos)).unsqueeze(1)
    mean = rows(torch.stack(models).mean(dim=0))
    return (t * mean + (1 - t) * rows(base)).reshape(base.shape)


METHODS.append(Method("model_stock", 1, model_stock, ("Base", "A", "B"),
                      (Param("filter_wise", bool, False, "one t per row of dim 0 instead of per tensor"),),
                      model_stock.__doc__, variadic=True))

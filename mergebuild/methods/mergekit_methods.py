"""mergekit 0.1.5's nuslerp, multislerp, karcher, sce and nearswap, with its parameter names.

Each function follows mergekit 0.1.5's op sequence (mergekit/merge_methods/<name>.py), in the
compute dtype. On the same torch build and device it writes mergekit's bytes
(tests/methods/test_mergekit_methods.py holds it to mergekit's own output, stored in tests/data/).
It departs from mergekit where mergekit would raise or divide by zero, and where mergekit leaves
the outcome to torch's internal order; docs/methods.md ("mergekit's methods") lists each case.

Inputs follow mergebuild's order: a base, where there is one, comes first, as for `ties`.
mergekit's per-model `weight` becomes one `weights` list, one number per non-base model; an
empty list means 1.0 each.
"""

from __future__ import annotations

from dataclasses import dataclass

from mergebuild.methods.common import model_weights
from mergebuild.methods.registry import Method, Param
from mergebuild.methods.selection import top_k_mask
from mergebuild.torchlazy import torch

SUM_EPS = 1e-6  # nuslerp takes t = 0.5 when |w_A + w_B| < this; sce: the floor of its weight sums
NEAR_EPS = 1e-6  # nearswap's floor of |base - model|
SELECT_RULES = ("mergebuild", "mergekit")  # how sce's top-k chooses among equal variances


@dataclass(frozen=True)
class _Bounded(Method):
    """A Method that takes between len(inputs) and `most` inputs (nuslerp: A, B or Base, A, B)."""

    most: int = 0

    def arity_ok(self, n: int) -> bool:
        return len(self.inputs) <= n <= self.most

    def arity_text(self) -> str:
        return f"{len(self.inputs)} inputs ({', '.join(self.inputs)}) or {self.most} (Base, {', '.join(self.inputs)})"


# --- nuslerp ------------------------------------------------------------------------------


def _nuslerp(t: float, v0, v1, dim: int, flatten: bool):
    """mergekit 0.1.5's nuslerp(): slerp of the vectors along `dim` (the whole tensor when
    flatten), lerp where they are parallel or anti-parallel (1 - cos^2 <= 1e-16)."""
    out_shape = v0.shape
    eps = 1e-8
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    v0_u = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    v1_u = v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    cos_theta = torch.sum(v0_u * v1_u, dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos_theta.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, 0, cos_theta))
    sin_theta = torch.sin(theta)
    result = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin_theta
    result = torch.where(colinear, (1 - t) * v0 + t * v1, result)
    if dim != -1 and not flatten:
        result = result.transpose(dim, -1)
    return result.reshape(out_shape)


def nuslerp(*tensors, weights=(), nuslerp_flatten: bool = True, nuslerp_row_wise: bool = False):
    """Slerp of A and B at t = w_B / (w_A + w_B); with a base first (Base, A, B), of their deltas.

    Inputs A, B, or Base, A, B (mergekit's base_model). t is 0.5 when |w_A + w_B| < 1e-6.
    nuslerp_flatten (the default): one angle for the whole tensor; else one per vector along the
    last dim (rows of a matrix), or along dim 0 with nuslerp_row_wise. Parallel or anti-parallel
    vectors are lerped; a zero vector counts as orthogonal to the other (mergekit 0.1.5)."""
    if len(tensors) not in (2, 3):
        raise ValueError(f"nuslerp takes A, B or Base, A, B: 2 or 3 inputs, got {len(tensors)}")
    w_a, w_b = model_weights(weights, 2, "model to interpolate (the base has none)")
    total = w_a + w_b
    t = 0.5 if abs(total) < SUM_EPS else w_b / total
    dim = 0 if nuslerp_row_wise else -1
    a, b = tensors[-2], tensors[-1]
    if len(tensors) == 2:
        return _nuslerp(t, a, b, dim, nuslerp_flatten)
    base = tensors[0]
    return base + _nuslerp(t, a - base, b - base, dim, nuslerp_flatten)


# --- multislerp ---------------------------------------------------------------------------


def multislerp(*tensors, weights=(), base: bool = False, normalize_weights: bool = True, eps: float = 1e-8):
    """Barycentric slerp of any number of models; with base = true, of their deltas from the first input.

    Whole-tensor vectors x_i (the models, or their deltas from the base) are scaled to unit
    length u_i = x_i / (|x_i| + eps); m = sum w_i u_i normalised; the tangent vectors
    u_i - <u_i, m> m are averaged with the weights (v) and mapped back: m cos|v| + v sin|v| / |v|
    (|v| plus eps); the result has the weighted mean norm sum w_i |x_i| (plus the base).
    normalize_weights divides the weights by their sum. Where |sum w_i u_i| < eps (opposed
    inputs, all-zero deltas) the result is the weighted sum of the x_i (plus the base), for any
    number of models; mergekit lerps two and raises for more. One model: that model."""
    base_tensor = tensors[0] if base else None
    models = tensors[1:] if base else tensors
    if not models:
        raise ValueError("multislerp with base = true needs the base and at least one model")
    ws = model_weights(weights, len(models), "model (the base has none)" if base else "model")
    if len(models) == 1:
        return models[0].clone()
    stacked = torch.stack(models, dim=0)
    if base_tensor is not None:
        stacked -= base_tensor
    flat = stacked.view(stacked.shape[0], -1)
    w = torch.tensor(ws, dtype=stacked.dtype, device=stacked.device)
    if normalize_weights:
        total = w.sum()
        if float(total) == 0:
            raise ValueError(f"multislerp weights {ws} sum to 0 and cannot be normalised "
                             "(set normalize_weights = false, or change the weights)")
        w = w / total
    norms = torch.norm(flat, dim=-1, keepdim=True)
    lengths = norms + eps
    # eps vanishes in float16 (below its smallest subnormal): a zero model's 0/0 and a zero tangent's
    # sin(0)/0 get their limits, 0 and 1, where mergekit's ops give NaN; no other value changes
    unit = flat / torch.where(lengths == 0, 1, lengths)
    mean = (unit * w.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps or mean_norm == 0:
        result = stacked[0] * w[0]
        for i in range(1, stacked.shape[0]):
            result = result + stacked[i] * w[i]
        return result + base_tensor if base_tensor is not None else result
    mean = mean / mean_norm
    dots = (unit * mean).sum(-1, keepdim=True)
    tangent = ((unit - dots * mean) * w.view(-1, 1)).sum(0)
    tangent_norm = torch.norm(tangent) + eps
    ratio = torch.sin(tangent_norm) / tangent_norm if tangent_norm > 0 else torch.ones_like(tangent_norm)
    result = mean * torch.cos(tangent_norm) + tangent * ratio
    result = (result * (norms.squeeze(-1) * w).sum()).view(stacked.shape[1:])
    return result + base_tensor if base_tensor is not None else result


# --- karcher ------------------------------------------------------------------------------


def karcher(*models, weights=(), max_iter: int = 10, tol: float = 1e-5):
    """The Karcher mean of the models' directions on the unit sphere, times their weighted mean norm.

    Directions u_i = x_i / |x_i| (whole tensor); those with |x_i| <= tol are left out of the
    mean (their norms still count in the scale). Start from the normalised weighted mean of the
    u_i; each step moves along T = sum a_i theta_i / sin(theta_i) (u_i - cos(theta_i) m),
    theta_i the angle to the current m (skipping theta_i < tol), by the exponential map; stop
    after max_iter steps or when |T| < tol. Result: (sum a_i |x_i|) m. Weights a_i are 1/n each
    (mergekit), or `weights` normalised to sum 1. All-zero inputs give zeros."""
    if max_iter < 0:
        raise ValueError(f"max_iter must be >= 0, got {max_iter}")
    if tol < 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    n = len(models)
    if weights is None or len(weights) == 0:
        alphas = [1.0 / n] * n
    else:
        ws = model_weights(weights, n)
        total = sum(ws)
        if total == 0:
            raise ValueError(f"karcher weights {ws} sum to 0 and cannot be normalised")
        alphas = [w / total for w in ws]
    if n == 1:
        return models[0].clone()
    dtype = torch.float64 if models[0].dtype == torch.float64 else torch.float32
    norms, units = [], []
    for x in models:
        norm = torch.linalg.vector_norm(x.to(dtype))
        norms.append(norm)
        units.append(torch.zeros_like(x) if norm.item() == 0.0 else (x / norm).to(x.dtype))
    valid = [i for i, norm in enumerate(norms) if norm.item() > tol]
    if not valid:
        return sum(x * 0 for x in models)
    valid_alphas = [alphas[i] for i in valid]
    alpha_sum = sum(valid_alphas)
    a_valid = [a / alpha_sum for a in valid_alphas]
    u_valid = [units[i] for i in valid]
    mean = torch.zeros_like(u_valid[0])
    for a, u in zip(a_valid, u_valid):
        mean += a * u
    mean_norm = torch.linalg.vector_norm(mean.to(dtype))
    mean = u_valid[0].clone() if mean_norm.item() < tol else (mean / mean_norm).to(mean.dtype)
    step = torch.empty_like(mean)  # (u - cos(theta) m), in place: mergekit's values, fewer allocations
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for a, u in zip(a_valid, u_valid):
            dot = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            torch.sub(u, torch.mul(mean, dot, out=step), out=step)
            tangent += step.mul_(a * (theta / torch.sin(theta)))
        tangent_norm = torch.linalg.vector_norm(tangent.to(dtype))
        if tangent_norm.item() < tol:
            break
        mean = (torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)).to(mean.dtype)
        unit_norm = torch.linalg.vector_norm(mean.to(dtype))
        if unit_norm.item() > tol:
            mean = (mean / unit_norm).to(mean.dtype)
    scale = sum(a * norm for a, norm in zip(alphas, norms))
    return scale * mean


# --- sce ----------------------------------------------------------------------------------


def sce_mask(task_vectors, select_topk: float, select_rules: str = "mergebuild"):
    """SCE's select step (mergekit 0.1.5 sce_mask): 1 at the int(nonzero * select_topk)
    elements of largest variance across the task vectors (population variance; nonzero = how
    many elements have a nonzero variance), 0 elsewhere, in the task vectors' dtype. Among equal
    variances, select_rules "mergebuild" keeps the lower flat index, "mergekit" torch.topk's choice."""
    if select_rules not in SELECT_RULES:
        raise ValueError(f"select_rules must be one of {SELECT_RULES}, got {select_rules!r}")
    shape = task_vectors.shape[1:]
    if select_topk <= 0:
        return torch.zeros(shape, dtype=task_vectors.dtype, device=task_vectors.device)
    if select_topk >= 1:
        return torch.ones(shape, dtype=task_vectors.dtype, device=task_vectors.device)
    var = torch.var(task_vectors, dim=0, unbiased=False)
    k = int(torch.count_nonzero(var) * select_topk)
    if k == 0:
        return torch.zeros_like(var)
    if select_rules == "mergebuild":
        return top_k_mask(var.abs(), k).to(var.dtype)
    mask = torch.zeros_like(var)
    mask.view(-1)[torch.topk(var.abs().view(-1), k=k, largest=True).indices] = 1
    return mask


def sce(base, *models, select_topk: float = 1.0, select_rules: str = "mergebuild"):
    """SCE: select the elements whose deltas vary most, weight by mean squared delta, erase minority signs.

    delta_i = model_i - base, masked by sce_mask when select_topk < 1 (among equal variances
    at the cut, select_rules decides). w_i = mean(delta_i^2), normalised to sum 1 (1/n each
    when that sum is below 1e-6). At each element the elected sign is that of sum_i delta_i
    (+ for 0); a delta of the other sign, or 0, is erased. Result:
    base + sum_i w_i delta_i / max(sum of the kept w_i, 1e-6) (mergekit 0.1.5's sce)."""
    if not models:
        raise ValueError("sce needs the base and at least one fine-tune")
    if select_rules not in SELECT_RULES:
        raise ValueError(f"select_rules must be one of {SELECT_RULES}, got {select_rules!r}")
    task_vectors = torch.stack([m - base for m in models], dim=0)
    if select_topk < 1:
        task_vectors = task_vectors * sce_mask(task_vectors, select_topk, select_rules).unsqueeze(0)
    sign = task_vectors.sign()
    majority = (task_vectors.sum(dim=0) >= 0).to(task_vectors.dtype) * 2 - 1
    erase_mask = sign == majority
    tv_weights = task_vectors.square().reshape(task_vectors.shape[0], -1).mean(dim=1)
    weight_sum = torch.sum(tv_weights).item()
    if abs(weight_sum) < SUM_EPS:
        tv_weights = torch.ones_like(tv_weights) / tv_weights.shape[0]
    else:
        tv_weights = tv_weights / weight_sum
    while tv_weights.dim() < task_vectors.dim():
        tv_weights = tv_weights.unsqueeze(-1)
    erased_weights = tv_weights * erase_mask
    merged = (task_vectors * erased_weights).sum(dim=0)
    return base + merged / torch.sum(erased_weights, dim=0).clamp(min=SUM_EPS)


# --- nearswap -----------------------------------------------------------------------------


def nearswap(base, model, *, t: float):
    """A's value where it lies within t of the base's; farther away, blended towards the base.

    w = clamp(t / max(|base - model|, 1e-6), 0, 1); result = w * model + (1 - w) * base
    (mergekit 0.1.5's nearswap). t <= 0 gives the base."""
    weight = (t / torch.abs(base - model).clamp(min=NEAR_EPS)).clamp(min=0, max=1)
    return weight * model + (1 - weight) * base


# --- declarations -------------------------------------------------------------------------

PAIR_WEIGHTS = Param("weights", list, (), "mergekit's per-model weight: one for A and one for B (the base has "
                     "none); t = w_B / (w_A + w_B); empty: 1.0 each (t = 0.5)", count=lambda n: 2)

# whose numbers these methods reproduce (shown by `mergebuild methods NAME`)
FOLLOWS = "mergekit 0.1.5"
METHODS = [
    _Bounded("nuslerp", 1, nuslerp, ("A", "B"), (
        PAIR_WEIGHTS,
        Param("nuslerp_flatten", bool, True, "one angle for the whole tensor (false: one per vector, see "
              "nuslerp_row_wise)"),
        Param("nuslerp_row_wise", bool, False, "with nuslerp_flatten = false: slerp the vectors along dim 0 "
              "(columns of a matrix) instead of along the last dim (rows)"),
    ), nuslerp.__doc__, most=3),
    Method("multislerp", 1, multislerp, ("A", "B"), (
        Param("weights", list, (), "mergekit's per-model weight: one per model (the base, with base = true, has "
              "none); empty: 1.0 each"),
        Param("base", bool, False, "the first input is the base (mergekit's base_model): slerp the others' "
              "deltas from it and add it back"),
        Param("normalize_weights", bool, True, "divide the weights by their sum"),
        Param("eps", float, 1e-8, "added to norms before dividing by them; below it the weighted mean direction "
              "counts as zero (then the weighted sum is used)"),
    ), multislerp.__doc__, variadic=True),
    Method("karcher", 1, karcher, ("A", "B"), (
        Param("weights", list, (), "one weight per model, normalised to sum 1 (not in mergekit); empty: equal",
              count=lambda n: n),
        Param("max_iter", int, 10, "most iterations of the mean"),
        Param("tol", float, 1e-5, "stop when the step is shorter than this; also the smallest norm and angle "
              "taken into account"),
    ), karcher.__doc__, variadic=True),
    Method("sce", 1, sce, ("Base", "A"), (
        Param("select_topk", float, 1.0, "fraction of the elements (of those that vary at all) kept, those of "
              "largest variance across the task vectors; 1: all"),
        Param("select_rules", str, "mergebuild", "among equal variances at the cut: mergebuild keeps the lower "
              "flat index (the same on any device); mergekit: torch.topk's choice, mergekit 0.1.5's bytes on the "
              "same torch build and device", choices=SELECT_RULES),
    ), sce.__doc__, variadic=True),
    Method("nearswap", 1, nearswap, ("Base", "A"), (
        Param("t", float, doc="distance below which A's value is taken whole; farther, its share is "
              "t / |Base - A|"),
    ), nearswap.__doc__, elementwise=True),
]

"""Merges of any number of models: soups, Fisher merging, geometric median, EMA, tail averages.

All inputs are full models (no base); see ../../docs/methods.md.
"""

from __future__ import annotations

from mergebuild.methods.common import check_range, model_weights, normalised_weights
from mergebuild.methods.registry import Method, Param
from mergebuild.torchlazy import torch


def _weighted_sum(models, ws):
    out = models[0] * ws[0]
    for model, w in zip(models[1:], ws[1:]):
        out.add_(model, alpha=w)
    return out


def soup(*models, weights=()):
    """sum_i w_i model_i, the weights normalised to sum 1; no weights: the uniform model soup.

    Wortsman et al. 2022."""
    return _weighted_sum(models, normalised_weights(weights, len(models)))


def fisher(*tensors, weights=(), eps: float = 1e-8):
    """sum_i w_i F_i theta_i / sum_i w_i F_i: diagonal Fisher merging (Matena & Raffel 2022).

    Inputs are n models then their n Fisher tensors; result sum_i w_i F_i theta_i / sum_i w_i F_i per element, with every F_i floored at eps
    (so where all Fishers vanish it is the weighted average of the models)."""
    if len(tensors) % 2 or len(tensors) < 2:
        raise ValueError(f"fisher takes n models followed by their n Fisher tensors: an even count, got {len(tensors)}")
    n = len(tensors) // 2
    models, fishers = tensors[:n], tensors[n:]
    ws = model_weights(weights, n)
    if any(w < 0 for w in ws) or not any(w > 0 for w in ws):
        raise ValueError(f"fisher weights must be >= 0 and not all 0, got {ws}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    num = torch.zeros_like(models[0])
    den = torch.zeros_like(models[0])
    for model, f, w in zip(models, fishers, ws):
        wf = f.clamp(min=eps) * w
        num.add_(wf * model)
        den.add_(wf)
    zero = den == 0
    if bool(zero.any()):  # only with eps = 0
        mean = _weighted_sum(models, [w / sum(ws) for w in ws])
        return torch.where(zero, mean, num / torch.where(zero, torch.ones_like(den), den))
    return num / den


def geometric_median(*models, eps: float = 1e-6, maxiter: int = 100, ftol: float = 1e-20):
    """The geometric median: the point minimising sum_i |x - model_i| (Weiszfeld's algorithm).

    Distances are whole-tensor Euclidean. Weiszfeld's iteration starts from the mean: weights
    1 / max(|model_i - x|, eps), x = their weighted mean; it stops after maxiter steps or when the
    mean distance changes by at most ftol times itself (as sd-mecha)."""
    if maxiter < 0:
        raise ValueError(f"maxiter must be >= 0, got {maxiter}")

    def mean_distance(x) -> float:
        return sum(torch.linalg.vector_norm(m - x).item() for m in models) / len(models)

    median = _weighted_sum(models, [1.0 / len(models)] * len(models))
    objective = mean_distance(median)
    for _ in range(maxiter):
        previous = objective
        ws = [1.0 / max(torch.linalg.vector_norm(m - median).item(), eps) for m in models]
        total = sum(ws)
        median = _weighted_sum(models, [w / total for w in ws])
        objective = mean_distance(median)
        if abs(previous - objective) <= ftol * objective:
            break
    return median


def ema(*models, decay: float):
    """Exponential moving average of the checkpoints in the order given (oldest first).

    e_0 = x_0, e_i = decay * e_(i-1) + (1 - decay) * x_i."""
    check_range("decay", decay, 0.0, 1.0)
    e = models[0]
    for x in models[1:]:
        e = e * decay
        e.add_(x, alpha=1.0 - decay)
    return e


def tail_average(*models, k: int = 0):
    """Polyak (tail) averaging: the uniform mean of the last k checkpoints (k = 0: all).

    The order is the order of the inputs, oldest first."""
    n = len(models)
    if k == 0:
        k = n
    if not 1 <= k <= n:
        raise ValueError(f"k must be 0 (all) or between 1 and the number of checkpoints ({n}), got {k}")
    tail = models[n - k:]
    return _weighted_sum(tail, [1.0 / k] * k)


def _scorer_table(value) -> tuple[str, str] | None:
    """tail_average's scorer: a table of command or python (and direction), checked in full by tune."""
    fields = ("command", "python", "direction")
    bad = next((k for k in value if k not in fields), None)
    if bad is not None:
        return f".{bad}", f"unknown field of a scorer (it takes {', '.join(fields)})"
    if ("command" in value) == ("python" in value):
        return "", "give exactly one of command = \"...\" or python = \"module:function\""
    return None


WEIGHTS = Param("weights", list, (), "one weight per model; empty: 1.0 each", count=lambda n: n // 2)


ELEMENTWISE = {"soup", "fisher", "ema", "tail_average"}  # geometric_median's distances span the tensor


def _method(fn, inputs, *params):
    return Method(fn.__name__, 1, fn, inputs, params, fn.__doc__, variadic=True,
                  elementwise=fn.__name__ in ELEMENTWISE)


# whose numbers these methods reproduce (shown by `mergebuild methods NAME`)
FOLLOWS = "the model-soup and Fisher-merging papers; mergekit's linear for soups"
METHODS = [
    _method(soup, ("A", "B"), Param("weights", list, (), "one weight per model, normalised to sum 1; empty: uniform",
                                    count=lambda n: n)),
    _method(fisher, ("Model", "Fisher"), WEIGHTS,
            Param("eps", float, 1e-8, "floor of every Fisher value (keeps the denominator positive)")),
    _method(geometric_median, ("A", "B"), Param("eps", float, 1e-6, "smallest distance used in a weight"),
            Param("maxiter", int, 100, "most Weiszfeld iterations"),
            Param("ftol", float, 1e-20, "stop when the mean distance changes by at most ftol times itself")),
    _method(ema, ("A", "B"), Param("decay", float, doc="weight of the running average at each step, 0..1")),
    _method(tail_average, ("A", "B"),
            Param("k", int, 0, "how many of the last checkpoints to average; 0: all; \"auto\": the tail the "
                  "two-tailed rule keeps (Melis 2022), judged by scorer", words=("auto",)),
            Param("scorer", dict, None, "with k = \"auto\": how to score a candidate average, as [tune]'s: "
                  "{ command = \"...\" } or { python = \"module:function\" }, direction", implicit=True,
                  check=_scorer_table)),
]

"""rebasin and permute: merge after aligning B's units to A's (git re-basin, weight matching).

Both are two-phase merges. The statistic (planning/statistics.py) is the permutation of every
group of the architecture's permutation spec (layouts/permutations.py), found by weight matching
(methods/weight_matching.py, run by the executor, cached by the digests of the tensors it reads,
`iterations` and `seed`). Each tensor's task then reads the permutations of its axes as inputs:
`permute` writes B with them applied, `rebasin` the weighted sum of A and that aligned B. So a
rebuild after changing only alpha recomputes the sums, never the permutation.
"""

from __future__ import annotations

from mergebuild.dtypes import is_float
from mergebuild.layouts.permutations import groups_from_doc, has_spec, permutation_groups, tensor_axes
from mergebuild.methods.registry import STATISTIC, Method, Param, PlannedStatistic, PlannedTensor
from mergebuild.torchlazy import torch

STATISTIC_NAME = "rebasin.weight_matching"
STATISTIC_VERSION = 1


def permute_axis(t, perm, axis: int, repeat: int = 1):
    """t with units `perm` taken along `axis` (each of `repeat` equal chunks alike): t'[i] = t[perm[i]]."""
    perm = perm.long().to(t.device)
    if repeat > 1:
        n = perm.numel()
        perm = torch.cat([perm + k * n for k in range(repeat)])
    return t.index_select(axis, perm)


def apply_permutations(t, perms, axes):
    """t with each [axis, repeat] of `axes` permuted by the matching entry of `perms`."""
    for perm, (axis, repeat) in zip(perms, axes):
        t = permute_axis(t, perm, axis, repeat)
    return t


def permute(b, *perms, axes: list):
    """B with its units permuted to match A's (weight matching): the same model as B, aligned to A."""
    return apply_permutations(b, perms, axes)  # each [axis, repeat] of `axes` by one permutation


def rebasin(a, b, *perms, alpha: float, axes: list):
    """(1 - alpha) * A + alpha * P(B), P(B) being B aligned to A by weight matching."""
    return torch.lerp(a, apply_permutations(b, perms, axes), alpha)


def _compute(reader, **params):
    from mergebuild.methods.weight_matching import weight_matching  # numpy and scipy: only when it runs

    return weight_matching(reader, **params)


def _groups(ctx):
    """The spec's groups on A's keys; B must have every permuted key, with the same shape."""
    if not has_spec(ctx.arch):
        raise ValueError(f"architecture {ctx.arch.name} has no permutation spec (`permutations` in its "
                         "architecture file), so there is nothing to align")
    substring_rule = ctx.arch.rule_applies(ctx.names(0))
    shapes = {n: tuple(ctx.ref(0, n).shape) for n in ctx.names(0)
              if is_float(ctx.ref(0, n).dtype) and ctx.arch.merges_key(n, substring_rule)}
    groups = permutation_groups(ctx.arch, shapes)
    if not groups:
        raise ValueError(f"the {ctx.arch.name} permutation spec matches no keys of {ctx.spec.inputs[0]}")
    b_names = set(ctx.names(1))
    for key in sorted({a.key for g in groups.values() for a in g.axes}):
        if key not in b_names:
            raise ValueError(f"{ctx.spec.inputs[1]} has no key {key!r}, which the permutation spec aligns")
        if tuple(ctx.ref(1, key).shape) != shapes[key]:
            raise ValueError(f"key {key!r}: shapes differ: {ctx.spec.inputs[0]} {list(shapes[key])} vs "
                             f"{ctx.spec.inputs[1]} {list(ctx.ref(1, key).shape)}")
    return groups


def _statistic(ctx) -> PlannedStatistic:
    groups = _groups(ctx)
    iterations = ctx.spec.params.get("iterations", 100)
    seed = ctx.spec.params.get("seed", 0)
    keys = sorted({a.key for g in groups.values() for a in g.axes})
    return PlannedStatistic(
        STATISTIC_NAME, STATISTIC_VERSION, _compute,
        reads=tuple((i, k) for i in (0, 1) for k in keys),
        outputs={name: ("I64", (g.size,)) for name, g in groups.items()},
        params={"groups": [g.as_doc() for g in groups.values()], "iterations": iterations, "seed": seed})


def _tasks(ctx, aligned_only: bool):
    """One task per key of A: permuted keys read their groups' permutations (STATISTIC inputs)."""
    stat = next(s for s in ctx.plan.statistics.values() if s.merge == ctx.spec.name and not s.where)  # planned first
    groups = groups_from_doc(stat.spec.params["groups"])
    axes_of = tensor_axes(groups)
    substring_rule = ctx.arch.rule_applies(ctx.names(0))
    b_names = set(ctx.names(1))
    for name in ctx.names(0):
        a = ctx.ref(0, name)
        dtype = ctx.out_dtype(a.dtype)
        params = None
        if name in b_names and is_float(a.dtype) and ctx.arch.merges_key(name, substring_rule) \
                and ctx.resolver.selected(name):
            params = ctx.resolver.merge_params(name)
        axes = axes_of.get(name, [])
        perms = tuple((STATISTIC, group) for group, _, _ in axes)
        extra = {"axes": [[axis, repeat] for _, axis, repeat in axes]}
        if aligned_only:  # permute: B aligned, every key B has
            if name not in b_names:
                yield PlannedTensor(name, dtype, a.shape, ((0, name),))
            elif axes:
                yield PlannedTensor(name, ctx.out_dtype(ctx.ref(1, name).dtype), a.shape, ((1, name),) + perms, extra)
            else:
                yield PlannedTensor(name, ctx.out_dtype(ctx.ref(1, name).dtype), ctx.ref(1, name).shape, ((1, name),))
        elif params is None:
            yield PlannedTensor(name, dtype, a.shape, ((0, name),))
        else:
            if tuple(ctx.ref(1, name).shape) != tuple(a.shape):
                raise ValueError(f"key {name!r}: shapes differ: {ctx.spec.inputs[0]} {list(a.shape)} vs "
                                 f"{ctx.spec.inputs[1]} {list(ctx.ref(1, name).shape)}")
            yield PlannedTensor(name, dtype, a.shape, ((0, name), (1, name)) + perms,
                                {"alpha": params["alpha"], **extra})


def _at_least_one(value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return "", f"expected a whole number of sweeps, at least 1, got {value!r}"
    return None


def _an_int(value):
    return None if isinstance(value, int) and not isinstance(value, bool) else ("", f"expected int, got {value!r}")


ITERATIONS = Param("iterations", int, 100, "sweeps over all permutation groups at most (fewer when one "
                   "improves none)", check=_at_least_one, whole_model=True)
SEED = Param("seed", int, 0, "the groups' random order in each sweep", check=_an_int, whole_model=True)
ALPHA = Param("alpha", float, doc="aligned B's share: (1 - alpha) * A + alpha * P(B)")

FOLLOWS = "Ainsworth et al. 2022 (git re-basin, weight matching)"
METHODS = [
    Method("rebasin", 1, rebasin, ("A", "B"), (ALPHA, ITERATIONS, SEED), rebasin.__doc__,
           plan_tasks=lambda ctx: _tasks(ctx, aligned_only=False), statistic=_statistic),
    Method("permute", 1, permute, ("A", "B"), (ITERATIONS, SEED), permute.__doc__,
           plan_tasks=lambda ctx: _tasks(ctx, aligned_only=True), statistic=_statistic),
]

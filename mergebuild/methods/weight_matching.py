"""Git re-basin's weight matching (Ainsworth, Hayase & Srinivasa 2022, algorithm 2).

Find permutations of B's units that make B's weights most like A's: coordinate descent over the
permutation groups (in a random order from `seed`), each step a linear assignment
(scipy.optimize.linear_sum_assignment) that maximises sum_w <A_w, P B_w> over the weights the
group touches, with the other groups' current permutations applied to B. At most `iterations`
sweeps; it stops after a sweep in which no group improved. Groups whose units fall in blocks
(GroupNorm groups, attention heads) are solved over block-keeping permutations only, exactly:
each block pair's best assignment, then the best assignment of blocks (planning never gets
here; this runs in the executor as the statistic's compute).
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

from mergebuild.layouts.permutations import Group, groups_from_doc
from mergebuild.methods.rebasin import permute_axis
from mergebuild.torchlazy import torch

TOLERANCE = 1e-12  # relative: an improvement smaller than this is rounding, not progress


def _units(t, axis: int, repeat: int):
    """[n units, everything else] of t along axis (a repeated axis: its chunks side by side)."""
    t = torch.movedim(t, axis, 0)
    n = t.shape[0] // repeat
    t = t.reshape(repeat, n, -1).transpose(0, 1)
    return t.reshape(n, -1)


def assign(cost: np.ndarray, blocks: int = 1, move_blocks: bool = False) -> np.ndarray:
    """perm maximising sum_i cost[i, perm[i]] over the permutations that keep `blocks` equal
    consecutive blocks whole (and, with move_blocks, may map a block onto another)."""
    n = cost.shape[0]
    if blocks <= 1:
        return linear_sum_assignment(cost, maximize=True)[1]
    s = n // blocks
    tiles = cost.reshape(blocks, s, blocks, s)
    perm = np.empty(n, dtype=np.int64)
    if not move_blocks:
        for g in range(blocks):
            perm[g * s:(g + 1) * s] = g * s + linear_sum_assignment(tiles[g, :, g, :], maximize=True)[1]
        return perm
    inner = np.empty((blocks, blocks, s), dtype=np.int64)
    value = np.empty((blocks, blocks))
    for g in range(blocks):
        for h in range(blocks):
            rows, cols = linear_sum_assignment(tiles[g, :, h, :], maximize=True)
            inner[g, h], value[g, h] = cols, tiles[g, rows, h, cols].sum()
    outer = linear_sum_assignment(value, maximize=True)[1]
    for g, h in enumerate(outer):
        perm[g * s:(g + 1) * s] = h * s + inner[g, h]
    return perm


class WeightMatching:
    """The state of one run: the groups, which groups touch each key, the current permutations."""

    def __init__(self, reader, groups: dict[str, Group]):
        self.reader, self.groups = reader, groups
        self.of_key: dict[str, list[tuple[str, int, int]]] = {}
        for group in groups.values():
            for a in group.axes:
                self.of_key.setdefault(a.key, []).append((group.name, a.axis, a.repeat))
        self.perms = {name: torch.arange(g.size) for name, g in groups.items()}
        self.sweeps = 0

    def cost(self, name: str) -> np.ndarray:
        """sum over the group's axes of A's units against B's (other groups' permutations applied)."""
        group = self.groups[name]
        total = torch.zeros(group.size, group.size, dtype=torch.float64)
        for ax in group.axes:
            a = self.reader.load(0, ax.key)
            b = self.reader.load(1, ax.key)
            for other, axis, repeat in self.of_key[ax.key]:
                if axis != ax.axis:
                    b = permute_axis(b, self.perms[other], axis, repeat)
            total += (_units(a, ax.axis, ax.repeat) @ _units(b, ax.axis, ax.repeat).T).double()  # compute dtype
        return total.numpy()

    def sweep(self, order: list[str]) -> bool:
        """One pass over the groups; whether any improved."""
        improved = False
        for name in order:
            cost = self.cost(name)
            group = self.groups[name]
            old = self.perms[name].numpy()
            new = assign(cost, group.blocks, group.move_blocks)
            before, after = cost[np.arange(group.size), old].sum(), cost[np.arange(group.size), new].sum()
            if after > before + TOLERANCE * max(abs(before), 1.0):
                self.perms[name] = torch.from_numpy(np.ascontiguousarray(new))
                improved = True
        self.sweeps += 1
        return improved

    def run(self, iterations: int, seed: int) -> dict:
        rng = np.random.default_rng(seed)
        names = sorted(self.groups)
        for _ in range(iterations):
            order = [names[i] for i in rng.permutation(len(names))]
            if not self.sweep(order):
                break
        return self.perms


def weight_matching(reader, *, groups: list, iterations: int, seed: int) -> dict:
    """The statistic's compute (PlannedStatistic): {group name: int64 permutation of B's units}."""
    perms = WeightMatching(reader, groups_from_doc(groups)).run(iterations, seed)
    return {name: p.to(torch.int64) for name, p in perms.items()}

"""ZipIt!'s matching of features (Stoica et al. 2023, "ZipIt! Merging Models from Different
Tasks without Training", section 4): pure numpy, float64.

Two models' features at one layer, n each, side by side: 2n features. Their correlation matrix
over the same inputs says which features carry the same signal, whether across the models or
within one. The greedy zip reduces 2n features to n by repeatedly merging the most correlated
pair of features still allowed:

- a merged feature is the average of its members; its correlation with every other feature is
  the smaller of its two parts' (the least similar member decides), times `alpha`: alpha < 1
  makes a feature that was already merged less eager to merge again; alpha = 0 merges each
  feature at most once (the pair is then final);
- `beta` bounds the merges of two features of the same model: each model may make
  floor(floor(n / 2) * beta) of them (n merges are made in all); once a model has used its
  budget, no two of its features merge any more (beta = 0: cross-model merges only, a
  permutation when alpha is 0: the reference lets one more same-model merge
  through before the budget closes). A merged feature counts as the model of its first member (A's
  before B's), as in the authors' reference implementation (github.com/gstoica27/ZipIt,
  match_tensors_zipit, whose defaults alpha = 0.3, beta = 0.125 these are).
Should every allowed pair be used up first (alpha = 0 with a budget that leaves odd features
out), the most correlated remaining pair merges regardless of the rules, so n features remain.

The result: U, the unmerge matrix [2n, n] (U[f, c] = 1 when feature f is in merged feature c),
and M, the merge matrix [n, 2n] (each row averages its members): merged = M @ [a; b] and
[a; b] ~ U @ merged. Merged features are in the order of their first member.
"""

from __future__ import annotations

import numpy as np

EPS = 1e-7  # a feature whose deviation is below this (a dead ReLU) correlates 0 with everything


class FeatureMoments:
    """Running first and second moments of a stream of feature vectors (rows), in float64."""

    def __init__(self, width: int):
        self.count = 0
        self.total = np.zeros(width)
        self.outer = np.zeros((width, width))

    def add(self, rows) -> None:
        rows = np.asarray(rows, dtype=np.float64)
        self.count += rows.shape[0]
        self.total += rows.sum(axis=0)
        self.outer += rows.T @ rows

    def covariance(self) -> np.ndarray:
        if self.count < 2:
            raise ValueError(f"the data holds {self.count} sample(s): correlations need at least 2")
        mean = self.total / self.count
        return (self.outer - self.count * np.outer(mean, mean)) / (self.count - 1)

    def correlation(self) -> np.ndarray:
        return correlation(self.covariance())


def correlation(covariance: np.ndarray) -> np.ndarray:
    """Pearson correlations from a covariance matrix (0 for a constant feature)."""
    std = np.sqrt(np.clip(np.diag(covariance), 0, None))
    return covariance / np.maximum(np.outer(std, std), EPS)


def zip_features(corr: np.ndarray, alpha: float = 0.3, beta: float = 0.125) -> tuple[np.ndarray, np.ndarray]:
    """(M [n, 2n], U [2n, n]) zipping the 2n features whose correlation matrix is `corr` (A's n
    first, then B's) into n."""
    size = corr.shape[0]
    if corr.shape != (size, size) or size % 2:
        raise ValueError(f"expected the square correlation matrix of two models' features, got {list(corr.shape)}")
    if not np.isfinite(corr).all():
        raise ValueError("the features' correlations hold NaN or Inf (NaN or Inf in the models or the data)")
    n = size // 2
    sims = np.array(corr, dtype=np.float64)
    np.fill_diagonal(sims, -np.inf)
    plain = sims.copy()  # the same min-linkage without the rules: the fallback when they forbid all
    origin = np.repeat([0, 1], n)
    budget = [int((n // 2) * beta + 1e-4)] * 2
    members = [[f] for f in range(size)]
    alive = np.ones(size, dtype=bool)
    for model in (0, 1):
        if budget[model] <= 0:
            _forbid_within(sims, alive & (origin == model))
    for _ in range(n):
        i, j = _best_pair(sims)
        if not np.isfinite(sims[i, j]):
            i, j = _best_pair(plain)
        i, j = min(i, j), max(i, j)
        same = origin[i] == origin[j]
        members[i] += members[j]
        for matrix in (sims, plain):
            _merge_rows(matrix, i, j)
        sims[i, :] = sims[:, i] = -np.inf if alpha <= 0 else sims[i, :] * alpha
        sims[i, i] = -np.inf
        alive[j] = False
        if same:
            budget[origin[i]] -= 1
            if budget[origin[i]] <= 0:
                _forbid_within(sims, alive & (origin == origin[i]))
    unmerge = np.zeros((size, n))
    for column, first in enumerate(np.flatnonzero(alive)):
        unmerge[members[first], column] = 1.0
    merge = (unmerge / unmerge.sum(axis=0, keepdims=True)).T
    return merge, unmerge


def _best_pair(sims: np.ndarray) -> tuple[int, int]:
    flat = int(np.argmax(sims))
    return divmod(flat, sims.shape[1])


def _forbid_within(sims: np.ndarray, own: np.ndarray) -> None:
    sims[np.ix_(own, own)] = -np.inf


def _merge_rows(sims: np.ndarray, i: int, j: int) -> None:
    """Feature j joins feature i: i's similarities become the smaller of the two; j is gone."""
    merged = np.minimum(sims[i, :], sims[j, :])
    sims[i, :] = merged
    sims[:, i] = merged
    sims[i, i] = -np.inf
    sims[j, :] = -np.inf
    sims[:, j] = -np.inf

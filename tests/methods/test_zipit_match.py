"""ZipIt!'s matching (methods/zipit_match.py) against independent references: numpy's corrcoef,
a one-shot covariance, a slow re-statement of the paper's greedy rule that removes merged
columns as the authors' code does, and planted structure (a permuted copy is matched back)."""

from __future__ import annotations

import numpy as np
import pytest

from mergebuild.methods.zipit_match import FeatureMoments, correlation, zip_features


def test_correlation_is_pearsons_and_a_dead_feature_correlates_zero():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 6))
    x[:, 2] = 0.0  # a dead ReLU unit
    got = correlation(np.cov(x, rowvar=False))
    live = [0, 1, 3, 4, 5]
    np.testing.assert_allclose(got[np.ix_(live, live)], np.corrcoef(x[:, live], rowvar=False), atol=1e-12)
    assert not got[2].any() and not got[:, 2].any()


def test_streamed_moments_equal_the_one_shot_covariance():
    rng = np.random.default_rng(1)
    x = rng.normal(loc=3.0, size=(257, 5))
    moments = FeatureMoments(5)
    for chunk in np.array_split(x, 7):
        moments.add(chunk)
    np.testing.assert_allclose(moments.covariance(), np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="at least 2"):
        FeatureMoments(2).covariance()


def reference_zip(corr, alpha, beta):
    """The greedy rule, restated slowly: a list of clusters, the similarity matrix shrunk by one
    row and column per merge (the merged feature stays where the lower index was)."""
    n = corr.shape[0] // 2
    sims = [[(-np.inf if r == c else float(corr[r, c])) for c in range(2 * n)] for r in range(2 * n)]
    clusters = [[f] for f in range(2 * n)]
    origin = [0] * n + [1] * n
    budget = [int((n // 2) * beta + 1e-4)] * 2
    closed = [b <= 0 for b in budget]

    def forbid(model):
        for r in range(len(clusters)):
            for c in range(len(clusters)):
                if origin[r] == model and origin[c] == model:
                    sims[r][c] = -np.inf

    for model in (0, 1):
        if closed[model]:
            forbid(model)
    while len(clusters) > n:
        best, pair = -np.inf, None
        for r in range(len(clusters)):
            for c in range(len(clusters)):
                if sims[r][c] > best:
                    best, pair = sims[r][c], (r, c)
        assert pair is not None, "the test's cases never need the fallback"
        i, j = sorted(pair)
        same = origin[i] == origin[j]
        row = [min(sims[i][k], sims[j][k]) for k in range(len(clusters))]
        row = [-np.inf if alpha <= 0 else v * alpha for v in row]
        row[i] = -np.inf
        for k in range(len(clusters)):
            sims[i][k] = sims[k][i] = row[k]
        clusters[i] = clusters[i] + clusters[j]
        for r in sims:
            del r[j]
        del sims[j], clusters[j], origin[j]
        if same:
            budget[origin[i]] -= 1
            if budget[origin[i]] <= 0:
                forbid(origin[i])
    unmerge = np.zeros((2 * n, n))
    for c, members in enumerate(clusters):
        unmerge[members, c] = 1
    return unmerge


def random_correlation(rng, n):
    x = rng.normal(size=(64, 2 * n)) @ rng.normal(size=(2 * n, 2 * n))
    return np.corrcoef(x, rowvar=False)


@pytest.mark.parametrize("alpha,beta", [(0.5, 1.0), (0.3, 0.125), (1.0, 0.5), (0.0, 1.0), (0.5, 0.0), (0.01, 0.3)])
def test_the_zip_is_the_papers_greedy_rule(alpha, beta):
    rng = np.random.default_rng(int(alpha * 100 + beta * 10))
    for n in (2, 3, 5, 8):
        corr = random_correlation(rng, n)
        merge, unmerge = zip_features(corr, alpha, beta)
        np.testing.assert_array_equal(unmerge, reference_zip(corr, alpha, beta))
        assert unmerge.shape == (2 * n, n) and (unmerge.sum(axis=1) == 1).all()  # each feature in one
        np.testing.assert_allclose(merge @ unmerge, np.eye(n), atol=1e-12)  # merging the unmerged is exact
        np.testing.assert_allclose(merge.sum(axis=1), 1.0)  # each merged feature averages its members


def test_without_same_model_merges_a_permuted_copy_is_matched_back():
    rng = np.random.default_rng(3)
    n = 12
    a = rng.normal(size=(500, n))
    perm = rng.permutation(n)
    b = a[:, perm] + 0.05 * rng.normal(size=(500, n))
    merge, unmerge = zip_features(np.corrcoef(np.hstack([a, b]), rowvar=False), alpha=0.0, beta=0.0)
    for column in unmerge.T:
        members = np.flatnonzero(column)
        assert len(members) == 2 and members[0] < n <= members[1]  # one of A's and one of B's
        assert perm[members[1] - n] == members[0]  # B's copy of A's feature


def test_same_model_merges_take_redundant_features_of_one_model():
    """A model with a duplicated feature: with a budget, the two copies merge within it."""
    rng = np.random.default_rng(4)
    n = 4
    a = rng.normal(size=(400, n))
    a[:, 1] = a[:, 0] + 0.01 * rng.normal(size=400)
    b = rng.normal(size=(400, n))  # unrelated to A
    merge, unmerge = zip_features(np.corrcoef(np.hstack([a, b]), rowvar=False), alpha=0.5, beta=1.0)
    assert any({0, 1} <= set(np.flatnonzero(c)) for c in unmerge.T)
    _, plain = zip_features(np.corrcoef(np.hstack([a, b]), rowvar=False), alpha=0.5, beta=0.0)
    assert not any({0, 1} <= set(np.flatnonzero(c)) for c in plain.T)  # no budget: never within A


def test_rules_that_leave_no_allowed_pair_still_give_n_features():
    """alpha = 0 and a budget of one same-model merge in A only is impossible to satisfy by pairs
    alone; the most correlated remaining pair merges anyway."""
    rng = np.random.default_rng(5)
    corr = random_correlation(rng, 4)
    merge, unmerge = zip_features(corr, alpha=0.0, beta=0.5)
    assert unmerge.shape == (8, 4) and (unmerge.sum(axis=1) == 1).all()


def test_a_matrix_that_is_not_two_models_is_refused():
    with pytest.raises(ValueError, match="square"):
        zip_features(np.eye(3))
    with pytest.raises(ValueError, match="NaN or Inf"):
        zip_features(np.full((4, 4), np.nan))

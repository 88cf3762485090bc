"""The scorer of the two-tailed example (two_tailed.py): a candidate average's cross-entropy on
the validation digits (held out from training; the test digits are never scored)."""

import functools

import torch

from mergebuild.testing import digits

VALIDATION = 0.2  # the last share of the training digits, kept out of training


@functools.lru_cache(maxsize=1)
def validation_split():
    """(training part, validation part) of the digits' training split."""
    split = digits.digits()
    n = split.x_train.shape[0]
    cut = n - int(n * VALIDATION)
    train = digits.Split(split.x_train[:cut], split.y_train[:cut], split.x_test, split.y_test)
    return train, (split.x_train[cut:], split.y_train[cut:])


def loss(path):
    state = digits.load(path)
    _, (x, y) = validation_split()
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(digits.forward(state, x), y))

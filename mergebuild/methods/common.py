"""Helpers shared by the merge-method modules: parameter checks and per-tensor random streams.

Not a method module (it has no METHODS list); the method modules import from it.
"""

from __future__ import annotations

import math

import xxhash

from mergebuild.methods.draws import keep_mask
from mergebuild.torchlazy import torch


def model_weights(weights, n: int, what: str = "model") -> list[float]:
    """The per-model weights as floats: an empty list (the default) means 1.0 for each model.

    A list of another length is an error that names both counts."""
    if weights is None or len(weights) == 0:
        return [1.0] * n
    if len(weights) != n:
        k = len(weights)
        raise ValueError(f"weights has {k} value{'' if k == 1 else 's'} but there {'is' if n == 1 else 'are'} "
                         f"{n} {what}{'' if n == 1 else 's'}; give one weight per {what}")
    return [float(w) for w in weights]


def normalised_weights(weights, n: int, what: str = "model") -> list[float]:
    """model_weights scaled to sum to 1; a zero sum is an error."""
    ws = model_weights(weights, n, what)
    total = sum(ws)
    if total == 0:
        raise ValueError(f"weights {ws} sum to 0 and cannot be normalised")
    return [w / total for w in ws]


def check_range(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}, got {value}")


def generator_for(seed: int, key: str):
    """A CPU torch.Generator seeded from (seed, tensor name): every tensor has its own stream, so
    one tensor can be recomputed alone, and the stream does not depend on the compute device."""
    return torch.Generator(device="cpu").manual_seed(xxhash.xxh3_64_intdigest(f"{seed}:{key}".encode()))


def bernoulli_mask(shape, keep, generator, device):
    """A bool mask of `shape`, True with probability `keep` (a float, or a CPU float tensor of
    `shape`), drawn on the CPU from `generator` and then moved to `device`: the same bytes on any
    device."""
    if isinstance(keep, float | int):
        return keep_mask(math.prod(shape), float(keep), generator).reshape(shape).to(device)
    u = torch.rand(shape, generator=generator, dtype=torch.float32, device="cpu")
    return (u < keep).to(device)


def as_1d(x):
    """x viewed as a 1-element vector when it is a 0-d scalar, else x itself."""
    return x.reshape(1) if x.dim() == 0 else x


def bits_dtype(x):
    """The integer dtype of x's element width: x.view() as it reads x's bits."""
    return {8: torch.int64, 4: torch.int32, 2: torch.int16}[x.element_size()]


def and_bits(x, mask_bits):
    """x (contiguous) with +0.0 wherever mask_bits (integers of x's width) is 0 and x's bits where
    it is -1, in place (selection.kept_bits makes such masks)."""
    x.view(mask_bits.dtype).bitwise_and_(mask_bits)
    return x


def zero_unless(x, mask):
    """x (contiguous) with +0.0 wherever mask is False, in place: torch.where(mask, x, 0.0)'s bits,
    by an integer AND (a bool-masked where or masked_fill costs ~10x more on a CPU)."""
    return and_bits(x, mask.to(bits_dtype(x)).neg_())

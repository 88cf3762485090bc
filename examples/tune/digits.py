"""The data of the example: scikit-learn's bundled 8x8 digits (no download), split once, the same
way for training (make_models.py) and scoring (score.py). make_models.py saves the splits in
data/digits.npz, so that a scorer only needs numpy (importing scikit-learn takes a second)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

SPLITS = {"train": (0, 1000), "val": (1000, 1400), "test": (1400, 1797)}
SAVED = Path(__file__).resolve().parent / "data" / "digits.npz"


def save_splits() -> Path:
    from sklearn.datasets import load_digits

    data = load_digits()
    order = np.random.default_rng(0).permutation(len(data.target))
    arrays = {}
    for name, (lo, hi) in SPLITS.items():
        pick = order[lo:hi]
        arrays[f"{name}_x"] = (data.data[pick] / 16.0).astype(np.float32)
        arrays[f"{name}_y"] = data.target[pick].astype(np.int64)
    SAVED.parent.mkdir(exist_ok=True)
    np.savez(SAVED, **arrays)
    return SAVED


def split(name: str) -> tuple[np.ndarray, np.ndarray]:
    """(x float32 in [0, 1], y int64) of a split: train (1000), val (400) or test (397)."""
    if not SAVED.exists():
        save_splits()
    with np.load(SAVED) as data:
        return data[f"{name}_x"], data[f"{name}_y"]


def predict(weights: dict, x: np.ndarray) -> np.ndarray:
    """The classifier, in numpy: 64 -> 64 (ReLU) -> 10."""
    h = np.maximum(x @ weights["fc1.weight"].T + weights["fc1.bias"], 0.0)
    return (h @ weights["fc2.weight"].T + weights["fc2.bias"]).argmax(axis=1)

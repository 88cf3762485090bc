"""Score a classifier file: its accuracy on the held-out validation split (or --split test).

    python score.py out/ties.safetensors            -> "val accuracy 0.9525"

`mergebuild tune` reads the last number printed. No GPU, no download.
"""

from __future__ import annotations

import argparse

import numpy as np
from safetensors.numpy import load_file

from digits import predict, split


def accuracy(path: str, which: str = "val") -> float:
    weights = {k: v.astype(np.float32) for k, v in load_file(path).items()}
    x, y = split(which)
    return float((predict(weights, x) == y).mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("path")
    p.add_argument("--split", default="val", choices=("val", "test"))
    args = p.parse_args()
    print(f"{args.split} accuracy {accuracy(args.path, args.split):.4f}")


if __name__ == "__main__":
    main()

"""How far each merged tensor moved from each of its inputs, recorded as the build computes it,
so `mergebuild report` draws per-block heatmaps without reading a model again.

Per tensor and input: sums over a fixed subsample of at most SAMPLE elements (an even stride from
the first one: deterministic, and cheap beside the merge itself), kept in float64:
    n, r.r, x.x, r.x, (r - x).(r - x)
from which a block's cosine similarity and relative L2 distance follow by adding the sums of
its tensors. Only inputs of the result's shape count (a LoRA's factors do not; inpainting's
extra channels neither).
"""

from __future__ import annotations

import math

SAMPLE = 1 << 16  # elements per tensor at most


def sample_stats(result, inputs: list, nodes: list[str]) -> dict | None:
    """{"n", "rr", "by": {node: [xx, rx, dd]}} for one tensor, or None."""
    from mergebuild.torchlazy import torch

    pairs = [(node, x) for node, x in zip(nodes, inputs) if x.shape == result.shape and x.is_floating_point()]
    n = result.numel()
    if not result.is_floating_point() or not pairs or n == 0:
        return None
    stride = max(1, n // SAMPLE)
    r = result.reshape(-1)[::stride].to(torch.float64)
    out = {"n": r.numel(), "rr": float(torch.dot(r, r)), "by": {}}
    for node, x in pairs:
        x = x.reshape(-1)[::stride].to(torch.float64)
        d = r - x
        out["by"][node] = [float(torch.dot(x, x)), float(torch.dot(r, x)), float(torch.dot(d, d))]
    return out


def add(total: dict, stats: dict) -> None:
    """Accumulate one tensor's sums into a block's."""
    total["n"] = total.get("n", 0) + stats["n"]
    total["rr"] = total.get("rr", 0.0) + stats["rr"]
    for node, sums in stats["by"].items():
        into = total.setdefault("by", {}).setdefault(node, [0.0, 0.0, 0.0])
        for i, v in enumerate(sums):
            into[i] += v


def metrics(total: dict) -> dict[str, dict]:
    """Per input: cosine similarity of the result with it, and the relative L2 distance."""
    out = {}
    rr = total.get("rr", 0.0)
    for node, (xx, rx, dd) in total.get("by", {}).items():
        cosine = rx / math.sqrt(rr * xx) if rr > 0 and xx > 0 else (1.0 if rr == xx == 0 else 0.0)
        out[node] = {"cosine": max(-1.0, min(1.0, cosine)), "rel_l2": math.sqrt(dd / xx) if xx > 0 else 0.0}
    return out

"""How far each merged tensor moved from each of its inputs, recorded as the build computes it,
so `mergebuild report` draws per-block heatmaps without reading a model again.

Per tensor and input: sums over a fixed subsample of at most SAMPLE elements (RUNS runs of RUN
contiguous elements, evenly spaced from the first one to the last: deterministic, and cheap
beside the merge itself; a strided gather of single elements cost a cache miss per element,
2 s of an SD1.5 merge), kept in float64:
    n, r.r, x.x, r.x, (r - x).(r - x)
from which a block's cosine similarity and relative L2 distance follow by adding the sums of
its tensors. Only inputs of the result's shape count (a LoRA's factors do not; inpainting's
extra channels neither).
"""

from __future__ import annotations

import math

SAMPLE = 1 << 16  # elements per tensor at most
RUN = 1 << 10  # contiguous elements per run
RUNS = SAMPLE // RUN


def sample_stats(result, inputs: list, nodes: list[str]) -> dict | None:
    """{"n", "rr", "by": {node: [xx, rx, dd]}} for one tensor, or None."""
    from mergebuild.torchlazy import torch

    pairs = [(node, x) for node, x in zip(nodes, inputs) if x.shape == result.shape and x.is_floating_point()]
    n = result.numel()
    if not result.is_floating_point() or not pairs or n == 0:
        return None
    return sums(_sample(result, n), torch.stack([_sample(x, n) for _, x in pairs]), [node for node, _ in pairs])


def sums(r, xs, nodes: list[str]) -> dict:
    """The sums of sample_stats from the float64 subsamples of a result (r) and of its inputs
    (the rows of xs), however they were gathered (execute/pieces.py gathers them a piece at a time)."""
    from mergebuild.torchlazy import torch

    rows = torch.cat([r[None], xs, r[None] - xs])  # r, each input, r minus each input
    gram = (rows @ rows.T).tolist()  # every sum in one product
    p = len(nodes)
    by = {node: [gram[1 + i][1 + i], gram[0][1 + i], gram[1 + p + i][1 + p + i]] for i, node in enumerate(nodes)}
    return {"n": r.numel(), "rr": gram[0][0], "by": by}


def _sample(tensor, n: int):
    """The subsample of a tensor, in float64."""
    from mergebuild.torchlazy import torch

    flat = tensor.reshape(-1)
    if n > SAMPLE:
        flat = flat.unfold(0, RUN, run_step(n))[:RUNS]
    return flat.to(torch.float64).reshape(-1)


def run_step(n: int) -> int:
    """The distance between the starts of a subsample's runs, for a tensor of n > SAMPLE elements."""
    return (n - RUN) // (RUNS - 1)


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

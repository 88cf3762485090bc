"""Embedding and lm_head rows put in the output vocabulary's order before a method runs
(vocab = "base" | "union" | "truncate", planning/vocab.py; mergekit's PermutedEmbeddings).

Not a method of the registry: the planner wraps the merge's own method for its vocabulary keys,
and the alignment's digest joins each such tensor's parameters (so its cache key).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from mergebuild.methods.registry import Method
from mergebuild.torchlazy import torch

PARAM = "vocab_rows"  # the parameter that carries the alignment's digest (ignored by the function)


@dataclass(frozen=True, eq=False)
class Rows:
    """Where each output row of each input comes from (integer arrays, or nested sequences).

    src[i][r]: input i's row for output row r, or -1 where input i lacks that token: its row
    is then the fill of r. fill_rows: the output rows some input lacks. contrib[i][f]: input
    i's row that joins the mean of fill f (-1: it does not); a fill nothing joins is zero."""

    rows: int
    src: object  # (inputs, rows)
    fill_rows: object  # (fills,)
    contrib: object  # (inputs, fills)

    def arrays(self) -> tuple:
        """(src, fill, contrib) as int64 numpy arrays."""
        import numpy as np  # here, not at the top: a no-op build never imports numpy
        n = len(self.src)
        src = np.asarray(self.src, dtype=np.int64).reshape(n, self.rows)
        fill = np.asarray(self.fill_rows, dtype=np.int64).reshape(-1)
        return src, fill, np.asarray(self.contrib, dtype=np.int64).reshape(n, len(fill))


def align_rows(xs, rows: Rows) -> list:
    """Each input's matrix with rows.rows rows, in the output vocabulary's order."""
    x0 = xs[0]
    device, dtype, tail = x0.device, x0.dtype, tuple(x0.shape[1:])
    src, fill_rows, contrib = (torch.from_numpy(a).to(device) for a in rows.arrays())
    fill = torch.zeros((len(fill_rows), *tail), dtype=dtype, device=device)
    if len(fill_rows):
        count = torch.zeros(len(fill_rows), dtype=dtype, device=device)
        for x, idx in zip(xs, contrib):
            have = idx >= 0
            fill[have] += x[idx[have]]
            count[have] += 1
        fill /= count.clamp(min=1).reshape(-1, *([1] * len(tail)))
    where_fill = torch.full((rows.rows,), -1, dtype=torch.long, device=device)
    where_fill[fill_rows] = torch.arange(len(fill_rows), device=device)
    out = []
    for x, idx in zip(xs, src):
        have = idx >= 0
        y = torch.empty((rows.rows, *tail), dtype=dtype, device=device)
        y[have] = x[idx[have]]
        missing = ~have
        if bool(missing.any()):
            y[missing] = fill[where_fill[missing]]
        out.append(y)
    return out


def aligned(inner: Method, rows: Rows, reads: tuple[int, ...] | None, clip: bool) -> Method:
    """`inner` run on the aligned rows of its inputs (only those in `reads`, when given); clip:
    the result clamped to the aligned inputs' elementwise range (clip_to_inputs)."""

    def fn(*xs, **kwargs):
        kwargs.pop(PARAM, None)
        ys = align_rows(xs, rows)
        picked = [ys[i] for i in reads] if reads is not None else ys
        result = inner.fn(*picked, **kwargs)
        if clip:
            stacked = torch.stack(ys)
            result = torch.clamp(result, stacked.amin(0), stacked.amax(0))
        return result

    fn.__wrapped__ = inner.fn
    return replace(inner, fn=fn, elementwise=False, reads=None)

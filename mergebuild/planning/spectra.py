"""Singular values of tuned - base, computed while planning.

lora_extract's `energy` and `sv_epsilon` choose each module's rank from its singular values, and
a rank is a shape, which the plan must know before anything runs. So these two options, and
only they, compute while planning: the singular values of each changed layer (on the CPU),
once per pair of tensors. They are remembered in the cache's index under the two tensors'
digests, so a later plan (a no-op build, `plan`, `explain`) reads them back and computes
nothing. An input computed in this same build has no digest yet: that is an error that says
to build it first.
"""

from __future__ import annotations

import json

from mergebuild.dtypes import nbytes
from mergebuild.planning.sources import TensorRef
from mergebuild.store.hashing import text_digest

ROW = "lora-extract-spectrum"  # the fingerprint rows' prefix (never a file path)
STAMP = (0, 0, 0, 0)


def _bytes(ref: TensorRef, cache):
    size = nbytes(ref.dtype, ref.shape)
    if ref.file is None:
        data = cache.get(ref.digest, ref.dtype, ref.shape, size)
        if data is None:
            raise ValueError(f"a tensor ({ref.digest}) is missing from the cache; run the build again")
        return bytearray(data)
    with open(ref.file, "rb") as f:
        f.seek(ref.begin)
        data = bytearray(f.read(size))
    if len(data) != size:
        raise ValueError(f"{ref.file}: shorter than its header says; the file changed while it was read")
    return data


def singular_values(plan, tuned: TensorRef, base: TensorRef, rows, swap: bool, count: int,
                    what: str) -> tuple[float, list[float]]:
    """(sum of all s_i^2, the `count` largest s_i) of tuned - base, cut to rows [start, stop)
    and with its halves swapped as lora_formats.extract_part cuts it, as [out, in * k * k]."""
    if tuned.digest is None or base.digest is None:
        raise ValueError(f"{what} is computed in this build, and energy / sv_epsilon choose ranks while planning "
                         "from the layers' singular values: build that merge first, then this one")
    key = f"{ROW}:{text_digest(json.dumps([tuned.digest, base.digest, rows, bool(swap)]))}"
    cache = plan.cache
    known = cache.index.fingerprint(key, STAMP) if cache is not None else None
    if known is not None:
        doc = json.loads(known[1])
        if len(doc["s"]) >= count or doc["all"]:
            return doc["total"], doc["s"][:count]
    from mergebuild.methods.lora_formats import swap_halves
    from mergebuild.tensors.convert import from_bytes
    from mergebuild.torchlazy import torch

    dtype = torch.float64 if plan.compute_dtype == "F64" else torch.float32
    a = from_bytes(_bytes(tuned, cache), tuned.dtype, tuned.shape).to(dtype)
    b = from_bytes(_bytes(base, cache), base.dtype, base.shape).to(dtype)
    d = a - b
    if rows:
        d = d[rows[0]:rows[1]]
    if swap:
        d = swap_halves(d)
    s = torch.linalg.svdvals(d.reshape(d.shape[0], -1)).double()
    total = float((s * s).sum())
    top = [float(v) for v in s[:count]]
    if cache is not None:
        doc = {"total": total, "s": top, "all": count >= s.shape[0]}
        cache.index.save_fingerprint(key, STAMP, {}, json.dumps(doc), None)
    return total, top

"""How two checkpoints differ, per block (SD) or layer (generic models) and per component.

Both files are streamed: one tensor pair at a time, and within a tensor a bounded number of
elements at a time, so memory stays small whatever the models' size. Sums are kept in float64.

For each group (the flattened concatenation of its tensors):
- cosine: dot(a, b) / (|a| |b|);
- rel_l2: |a - b| / |a|;
- changed: the share of elements where a != b.
Only tensors present in both files with equal shapes and floating-point dtypes are compared.
"""

from __future__ import annotations

import heapq
import math
from pathlib import Path

from mergebuild.dtypes import is_float, itemsize
from mergebuild.portable import RandomAccess
from mergebuild.analyze.inspect import component_of, component_order, group_of, group_order, grouping
from mergebuild.layouts.blocks import detect
from mergebuild.tensors.convert import from_bytes
from mergebuild.tensors.header import read_header
from mergebuild.torchlazy import torch

CHUNK_ELEMENTS = 1 << 22  # per side, converted to float64: 32 MiB each
TOP = 10
METRICS = ("cosine", "rel_l2", "changed")


class _Sums:
    __slots__ = ("tensors", "elements", "dot", "aa", "bb", "dd", "changed")

    def __init__(self):
        self.tensors = self.elements = self.changed = 0
        self.dot = self.aa = self.bb = self.dd = 0.0

    def add(self, other: _Sums) -> None:
        for name in self.__slots__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def row(self, name: str | None = None) -> dict:
        out = {"name": name} if name is not None else {}
        out.update(tensors=self.tensors, elements=self.elements, **metrics(self.dot, self.aa, self.bb, self.dd,
                                                                             self.changed, self.elements))
        return out


def metrics(dot: float, aa: float, bb: float, dd: float, changed: int, elements: int) -> dict:
    """The three metrics from the sums; None where a metric is undefined (a zero vector)."""
    if aa > 0 and bb > 0:
        cosine = max(-1.0, min(1.0, dot / math.sqrt(aa * bb)))
    elif aa == 0 and bb == 0:
        cosine = 1.0  # both all zeros: the same direction-less vector
    else:
        cosine = None
    if aa > 0:
        rel_l2 = math.sqrt(dd) / math.sqrt(aa)
    else:
        rel_l2 = 0.0 if dd == 0 else None
    return {"cosine": cosine, "rel_l2": rel_l2, "changed": changed / elements if elements else 0.0}


def diff_files(a, b) -> dict:
    """Compare two safetensors files (the architecture is detected from A's keys).

    Returns {"a", "b", "architecture": {"name", "how"}, "grouping": "block" | "layer",
    "total": row, "blocks": [row], "components": [row], "top": [{"key", "block", "component",
    "elements", "cosine", "rel_l2", "changed"}] (the most changed tensors by rel_l2),
    "only_in_a": [key], "only_in_b": [key], "shape_mismatch": [{"key", "a": shape, "b": shape}],
    "not_compared": [key] (common keys with a non-float dtype), "architecture_b": {"name", "how"}
    (detected from B's keys), "mismatch": why the numbers mean nothing ("different architectures:
    sd1 vs sdxl", "no tensors in common") or None}, where a row is
    {"name", "tensors", "elements", "cosine", "rel_l2", "changed"}.
    """
    a, b = Path(a), Path(b)
    ha, hb = read_header(a), read_header(b)
    arch, how = detect(ha.tensors)
    arch_b, how_b = detect(hb.tensors)
    only_a = [k for k in ha.tensors if k not in hb.tensors]
    only_b = [k for k in hb.tensors if k not in ha.tensors]
    mismatch, not_compared = [], []
    groups: dict[str, _Sums] = {}
    components: dict[str, _Sums] = {}
    total = _Sums()
    top: list[tuple[float, int, dict]] = []
    for i, (key, ea) in enumerate(ha.tensors.items()):
        eb = hb.tensors.get(key)
        if eb is None:
            continue
        if ea.shape != eb.shape:
            mismatch.append({"key": key, "a": list(ea.shape), "b": list(eb.shape)})
            continue
        if not (is_float(ea.dtype) and is_float(eb.dtype)):
            not_compared.append(key)
            continue
        sums = tensor_sums(a, ea, b, eb)
        group, component = group_of(arch, key), component_of(arch, key)
        groups.setdefault(group, _Sums()).add(sums)
        components.setdefault(component, _Sums()).add(sums)
        total.add(sums)
        row = {"key": key, "block": group, "component": component, **sums.row()}
        del row["tensors"]
        score = row["rel_l2"] if row["rel_l2"] is not None else math.inf
        if score > 0:
            item = (score, -i, row)
            if len(top) < TOP:
                heapq.heappush(top, item)
            else:
                heapq.heappushpop(top, item)
    return {
        "a": str(a),
        "b": str(b),
        "architecture": {"name": arch.name, "how": how},
        "grouping": grouping(arch),
        "total": total.row("total"),
        "blocks": [groups[g].row(g) for g in group_order(arch, groups)],
        "components": [components[c].row(c) for c in component_order(arch, components)],
        "top": [row for _, _, row in sorted(top, key=lambda t: (-t[0], -t[1]))],
        "only_in_a": only_a,
        "only_in_b": only_b,
        "shape_mismatch": mismatch,
        "not_compared": not_compared,
        "architecture_b": {"name": arch_b.name, "how": how_b},
        "mismatch": _mismatch(arch.name, arch_b.name, total.tensors),
    }


def _mismatch(name_a: str, name_b: str, compared: int) -> str | None:
    """Why a comparison means nothing, in the user's words, or None. Two architectures share a
    few keys (SD1 and SDXL: the VAE), but per-block numbers across them compare unlike things."""
    if name_a != name_b:
        return f"different architectures: {name_a} vs {name_b}"
    return "no tensors in common" if compared == 0 else None


def tensor_sums(path_a: Path, ea, path_b: Path, eb, chunk: int | None = None) -> _Sums:
    """The sums of one tensor pair (header entries of both files), reading both in slices of
    `chunk` elements (CHUNK_ELEMENTS by default)."""
    chunk = chunk or CHUNK_ELEMENTS
    n = 1
    for d in ea.shape:
        n *= d
    sums = _Sums()
    sums.tensors, sums.elements = 1, n
    sa, sb = itemsize(ea.dtype), itemsize(eb.dtype)
    for start in range(0, n, chunk):
        count = min(chunk, n - start)
        x = _slice(path_a, ea.begin + start * sa, count * sa, ea.dtype, count)
        y = _slice(path_b, eb.begin + start * sb, count * sb, eb.dtype, count)
        sums.dot += float(torch.dot(x, y))
        sums.aa += float(torch.dot(x, x))
        sums.bb += float(torch.dot(y, y))
        d = x - y
        sums.dd += float(torch.dot(d, d))
        sums.changed += int(torch.count_nonzero(x != y))
    return sums


def _slice(path: Path, begin: int, size: int, dtype: str, count: int):
    with RandomAccess(path) as f:
        data = f.read(size, begin)
    return from_bytes(data, dtype, (count,)).to(torch.float64)

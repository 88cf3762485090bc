"""Exact top-k selection by magnitude without sorting: a radix select on the float bits.

The rule (TIES' trim, breadcrumbs' band, SCE's select) keeps the k largest magnitudes, and among
equal ones the lower flat index first, as a stable descending sort would. A sort, or
torch.kthvalue, costs ~100 ns an element on a CPU; this costs a few passes of cheap integer ops:

  1. a non-negative float's bit pattern, read as an integer, orders as the float does, so a
     histogram (torch.bincount) of the high bits finds the bin that holds the k-th largest;
  2. a second histogram of the low bits of that bin's members gives the k-th largest exactly;
  3. of the values equal to it, the first `room` by index are kept: `last` is the index of the
     last one kept.

So a selection is a Threshold (bits, last): keep a magnitude when its bits > bits, or == bits at
an index <= last. The magnitudes come chunk by chunk from a function, so a caller never holds a
whole-tensor copy of them (the peak memory of a merge stays a few chunks above its inputs).
Dtypes without a radix here (float64), or magnitudes holding Inf or NaN, take torch.kthvalue
over the whole tensor: the same rule, the same set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from mergebuild.methods.common import bits_dtype
from mergebuild.torchlazy import torch

CHUNK = 1 << 20  # elements of magnitudes at a time on a CPU (4 MB in float32: stays in cache)
DEVICE_CHUNK = 1 << 24  # on an accelerator, where each op costs a launch
CANDIDATES = 1 << 21  # members of the threshold's bin collected by index at most; beyond, a scan
HI_BINS = 1 << 15  # a non-negative float32's top 16 bits (sign 0) or a 16-bit float's bits


@dataclass(frozen=True)
class Threshold:
    """Which magnitudes a selection keeps: bits > `bits`, or == `bits` at a flat index <= `last`.
    `mask` instead, when the selection fell back to a whole-tensor rule."""

    bits: int
    last: int
    int_dtype: object = None
    mask: object = None


def chunk_size(device) -> int:
    return CHUNK if torch.device(device).type == "cpu" else DEVICE_CHUNK


def top_k_mask(magnitude, k: int):
    """True at the k largest of `magnitude` (>= 0, as abs() gives); among equal ones the lower
    flat index wins, as in a stable descending sort."""
    flat = magnitude.reshape(-1)
    n = flat.numel()
    step = chunk_size(flat.device)
    threshold = select(lambda i, j: flat[i:j], n, k, step)
    mask = torch.empty(n, dtype=torch.bool, device=flat.device)
    for i in range(0, n, step):
        mask[i : i + step] = kept(threshold, flat[i : i + step], i)
    return mask.reshape(magnitude.shape)


def kept(threshold: Threshold, magnitude, start: int):
    """The keep mask of magnitudes[start : start + len] (a flat chunk) under `threshold`."""
    if threshold.mask is not None:
        return threshold.mask[start : start + magnitude.numel()]
    bits = magnitude.view(threshold.int_dtype)
    mask = bits > threshold.bits
    if threshold.last >= start:
        ties = bits == threshold.bits
        ties[threshold.last - start + 1 :] = False
        mask |= ties
    return mask


def kept_bits(threshold: Threshold, magnitude, start: int):
    """kept() as integers of the magnitudes' width: -1 (every bit set) where kept, 0 elsewhere,
    ready to AND with the values' bits (methods/common.py and_bits). Integer arithmetic only, no
    bool tensors (a comparison into bool is a scalar loop on a CPU, ~2.5x an integer op): on
    integers, keeping bits == t up to index `last` is keeping bits > t - 1 there, and x > t is
    the sign bit of t - x (both are >= 0, so the difference cannot overflow)."""
    if threshold.mask is not None:
        return threshold.mask[start : start + magnitude.numel()].to(bits_dtype(magnitude)).neg_()
    bits = magnitude.view(threshold.int_dtype)
    width = bits.element_size() * 8 - 1
    ties = min(max(threshold.last - start + 1, 0), bits.numel())  # the chunk's first `ties` keep their equals
    out = torch.empty_like(bits)
    for begin, end, t in ((0, ties, threshold.bits - 1), (ties, bits.numel(), threshold.bits)):
        if end > begin:
            torch.sub(torch.tensor(t, dtype=bits.dtype, device=bits.device), bits[begin:end], out=out[begin:end])
    return out.bitwise_right_shift_(width)


def select(part: Callable, n: int, k: int, step: int) -> Threshold:
    """The Threshold of the k largest of n magnitudes; part(i, j) gives magnitudes i..j-1 (a
    flat tensor, >= 0), and is called a few times over for each chunk of `step`."""
    first = part(0, min(step, n))
    radix = {torch.float32: (torch.int32, 16), torch.float16: (torch.int16, 0),
             torch.bfloat16: (torch.int16, 0)}.get(first.dtype)
    if k <= 0:
        return Threshold(bits=0, last=-1, mask=torch.zeros(n, dtype=torch.bool, device=first.device))
    if k >= n:
        return Threshold(bits=0, last=-1, mask=torch.ones(n, dtype=torch.bool, device=first.device))
    if radix is None:
        return _whole(part, n, k, step)
    int_dtype, shift = radix
    chunks = lambda: ((i, part(i, min(i + step, n)).view(int_dtype)) for i in range(0, n, step))  # noqa: E731
    high = lambda bits: (bits >> shift).to(torch.int32) if shift else bits.to(torch.int32)  # noqa: E731
    counts = sum(torch.bincount(high(bits), minlength=HI_BINS) for _, bits in chunks())
    # Inf or NaN (exponent all ones) from here on; bfloat16's start higher, so a few of its finite
    # values take the fallback too, which selects the same set
    special = 0x7F80 if shift else 0x7C00
    if int(counts[special:].sum()):
        return _whole(part, n, k, step)
    b, above = _bin_of(counts, k)
    if not shift:
        return _ties(chunks, int_dtype, b, k - above)
    need = k - above  # how many of bin b's members are kept, 1 <= need <= counts[b]
    if int(counts[b]) <= CANDIDATES:
        index, low = _members(chunks, shift, b)
        low_bin, low_above = _bin_of(torch.bincount(low, minlength=1 << shift), need)
        ties = index[low == low_bin]
        return Threshold(bits=(b << shift) | low_bin, last=int(ties[need - low_above - 1]), int_dtype=int_dtype)
    low_counts = sum(torch.bincount((bits[(bits >> shift) == b] & ((1 << shift) - 1)).to(torch.int32),
                                    minlength=1 << shift) for _, bits in chunks())
    low_bin, low_above = _bin_of(low_counts, need)
    return _ties(chunks, int_dtype, (b << shift) | low_bin, need - low_above)


def _bin_of(counts, k: int) -> tuple[int, int]:
    """The bin holding the k-th largest (bins ordered by value) and how many lie in higher bins."""
    from_top = counts.flip(0).cumsum(0)
    j = int(torch.searchsorted(from_top, torch.tensor([k], dtype=from_top.dtype, device=from_top.device)))
    b = counts.numel() - 1 - j
    return b, int(from_top[j]) - int(counts[b])


def _members(chunks, shift: int, b: int):
    """The flat indices of bin b's members (ascending) and their low bits."""
    index, low = [], []
    for i, bits in chunks():
        at = ((bits >> shift) == b).nonzero().squeeze(1)
        index.append(at + i)
        low.append((bits[at] & ((1 << shift) - 1)).to(torch.int32))
    return torch.cat(index), torch.cat(low)


def _ties(chunks, int_dtype, bits: int, room: int) -> Threshold:
    """The value `bits` is the k-th largest and `room` of its equals fit: find the last index kept."""
    for i, chunk in chunks():
        at = (chunk == bits).nonzero().squeeze(1)
        if at.numel() >= room:
            return Threshold(bits=bits, last=i + int(at[room - 1]), int_dtype=int_dtype)
        room -= at.numel()
    raise AssertionError("fewer equal magnitudes than the histogram counted")  # pragma: no cover


def _whole(part, n: int, k: int, step: int) -> Threshold:
    """torch.kthvalue over the whole tensor, then the first ties that fit: the same rule."""
    flat = torch.cat([part(i, min(i + step, n)) for i in range(0, n, step)])
    threshold = torch.kthvalue(flat, n - k + 1).values
    keep = flat > threshold
    room = k - int(keep.sum())  # >= 1: fewer than k values lie above the k-th largest
    keep[(flat == threshold).nonzero().squeeze(1)[:room]] = True
    return Threshold(bits=0, last=-1, mask=keep)

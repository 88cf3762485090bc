"""Elementwise methods run on the files' own float16 / bfloat16, without float32 chunks.

An elementwise method's chunk is copied into float32 scratch, computed and cast back
(Executor.chunks_into): two conversions per input and one per result. Some torch ops on half
tensors already compute each element in float and round once (torch.lerp: its "opmath" is
float32), and a method made of such ops gives, on the stored halves, the bits the float32 path
gives: the same float arithmetic and the same one rounding. In a weighted sum's chunk loop
that saves about a third of the time (docs/benchmarks.md).

Same bits only where both runs take torch's vectorised loop: at the end of an op the float32
loop and the half one differ (measured on torch 2.13, AVX-512: `lerp(x, -0.0, 1.0)` gives zeros
of opposite signs in the last n mod 32 elements when those are 16 or more). So a chunk is split: a prefix that is a multiple of ALIGN elements runs on the
halves, the rest takes the float32 path exactly as before (its tail is the same elements as the
whole chunk's was). With more than one torch thread an op is split where torch chooses, each
piece with its own tail, so the fast path is taken with one thread only (compute_threads gives
elementwise merges one thread on up to three cores; more threads are worth more than this).

The method's word (Method.stored_dtype) is checked, not trusted: once per process for each
method, parameters and dtype, a probe runs it both ways on values chosen to break it (signed
zeros, infinities, NaN, the largest finite values, subnormals, normals at several scales); one
differing bit and that combination keeps the float32 path. tests/methods/test_native.py holds
every method that says it can to the same rule over longer random inputs.
"""

from __future__ import annotations

import math
import threading

from mergebuild.torchlazy import torch

ALIGN = 1024  # a multiple of every vector width torch uses for float16, bfloat16 and float32
PROBE = 4096  # elements per probe: a multiple of ALIGN, below torch's grain for splitting an op

_probed: dict[tuple, bool] = {}
_lock = threading.Lock()


def eligible(method, params: dict, flat_in: list, flat_out, compute_dtype) -> bool:
    """Whether this task's chunks may run on their stored halves (the module's rules)."""
    if method.stored_dtype is None or compute_dtype != torch.float32 or torch.get_num_threads() != 1:
        return False
    dtype = flat_out.dtype
    if dtype not in (torch.float16, torch.bfloat16) or flat_out.device.type != "cpu":
        return False
    if not flat_in or any(x.dtype != dtype or x.device.type != "cpu" for x in flat_in):
        return False
    if not method.stored_dtype(params):
        return False
    return same_bits(method, params, dtype, len(flat_in))


def aligned_end(begin: int, end: int) -> int:
    """The end of the chunk's prefix that runs on the halves: a multiple of ALIGN from begin."""
    return begin + (end - begin) // ALIGN * ALIGN


def compute(fn, params: dict, halves: list, out) -> float:
    """fn on the halves, into out; the result's sum (the caller's check that it is finite)."""
    result = fn(*halves, **params)
    out.copy_(result)
    total = float(result.sum())  # accumulated in float, rounded to the half: 5x faster than sum(dtype=float32)
    if not math.isfinite(total):  # a float16 sum past 65504 is inf from finite values: ask float32
        total = float(result.sum(dtype=torch.float32))
    return total


def same_bits(method, params: dict, dtype, n_inputs: int) -> bool:
    """The probe, once per (method, parameters, dtype): the halves' result against the float32
    path's, bit for bit."""
    key = (method.name, method.version, repr(sorted(params.items())), str(dtype), n_inputs)
    with _lock:
        known = _probed.get(key)
    if known is None:
        known = _probe(method.fn, params, dtype, n_inputs)
        with _lock:
            _probed[key] = known
    return known


def _probe(fn, params: dict, dtype, n_inputs: int) -> bool:
    inputs = [_tricky(dtype, seed) for seed in range(n_inputs)]
    try:
        native = fn(*inputs, **params)
        wide = fn(*(x.to(torch.float32) for x in inputs), **params).to(dtype)
    except Exception:  # noqa: BLE001 - the float32 path will report it, with the tensor's name
        return False
    if native.dtype != dtype or native.shape != wide.shape:
        return False
    return bool(torch.equal(native.view(torch.int16), wide.view(torch.int16)))


def _tricky(dtype, seed: int):
    """PROBE values of `dtype` that tell roundings apart, in an order set by seed (each input of
    the probe meets the others' values in different pairs)."""
    info = torch.finfo(dtype)
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), info.max, -info.max,
                            info.tiny, -info.tiny, info.tiny / 4, -info.tiny / 4, info.eps, 1.0, -1.0,
                            0.5, 2.0, 65504.0, -65504.0], dtype=torch.float32)
    generator = torch.Generator().manual_seed(1234 + seed)
    scales = torch.tensor([1e-6, 1e-3, 0.02, 1.0, 30.0, 1e3])
    normal = torch.randn(PROBE, generator=generator) * scales[torch.randint(len(scales), (PROBE,), generator=generator)]
    normal[: len(special) * 8] = special.repeat(8)
    return normal[torch.randperm(PROBE, generator=generator)].to(dtype)

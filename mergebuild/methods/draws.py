"""Keep masks drawn from a torch CPU generator's stream, by numpy when it gives the same bits.

`torch.rand(n, generator=g) < keep` is what DARE's masks have always been. On a CPU torch draws
those floats one at a time under the generator's lock (~8 ns an element here) and compares them
into bool in a scalar loop; on SD1.5 that was a quarter of a DARE build's CPU time, all of it on
the merging thread. torch's CPU generator is a standard MT19937, and float32 rand keeps the low
24 bits of each 32-bit output (u = (x & 0xFFFFFF) * 2**-24), so numpy's MT19937, put in the same
state, gives the same x faster and without the GIL, and `u < keep` is `x & 0xFFFFFF < T` for one
integer T. The generator's state is read from `get_state()` and written back after the draw, so
the stream goes on exactly as if torch had drawn. Both rest on torch internals (the state's byte
layout, the rand rule): the first use checks them against torch itself, and a mismatch (another
torch) leaves every draw to torch.
"""

from __future__ import annotations

import math
import struct

from mergebuild.torchlazy import numpy as np
from mergebuild.torchlazy import torch

DRAW = 1 << 20  # draws at a time: bounded temporary memory
STATE_N = 624  # MT19937's state words
# CPUGeneratorImplState: u64 seed, i32 left, i32 seeded, u64 next, u64 state[624], then normal samples
_HEAD = struct.Struct("<QiiQ")
_STATE_BYTES = _HEAD.size + 8 * STATE_N
_checked: bool | None = None


def keep_mask(n: int, keep: float, generator) -> "torch.Tensor":
    """A flat bool CPU tensor of n entries: torch.rand(n, generator=generator) < keep (float32),
    drawn DRAW entries at a time, the generator advanced by n draws as torch.rand would."""
    mask = torch.empty(n, dtype=torch.bool)
    if n and math.isfinite(keep) and _numpy_agrees() and _draw_by_numpy(mask.numpy(), keep, generator):
        return mask
    return _torch_mask(mask, keep, generator)


def _draw_by_numpy(out, keep: float, generator) -> bool:
    """out (a numpy bool array) filled from generator's stream by numpy, the generator moved on
    past the draws; False (nothing drawn) when its state is not the layout this module knows."""
    bits = _read_state(generator)
    if bits is None:
        return False
    rng, state = bits
    _numpy_mask(out, _threshold(keep), rng)
    _write_state(generator, state, rng)
    return True


def _torch_mask(mask, keep: float, generator):
    for i in range(0, mask.numel(), DRAW):
        j = min(i + DRAW, mask.numel())
        torch.lt(torch.rand(j - i, generator=generator, dtype=torch.float32), keep, out=mask[i:j])
    return mask


def _threshold(keep: float) -> int:
    """T with (m * 2**-24 < float32(keep)) == (m < T) for every 24-bit integer m."""
    scaled = float(np.float32(keep)) * 2.0**24  # exact: a float32 times a power of two
    return int(min(max(math.ceil(scaled), 0), 1 << 24))


def _numpy_mask(out, threshold: int, rng) -> None:
    for i in range(0, out.size, DRAW):
        j = min(i + DRAW, out.size)
        raw = rng.integers(0, 1 << 32, size=j - i, dtype=np.uint32)  # one MT output each, as drawn
        np.bitwise_and(raw, 0xFFFFFF, out=raw)
        np.less(raw, threshold, out=out[i:j])


def _read_state(generator):
    """(a numpy Generator on an MT19937 in generator's state, the state's bytes), or None when
    the bytes are not the layout this module knows."""
    state = bytes(generator.get_state().numpy())
    if len(state) < _STATE_BYTES:
        return None
    _seed, left, _seeded, nxt = _HEAD.unpack_from(state)
    words = np.frombuffer(state, dtype="<u8", count=STATE_N, offset=_HEAD.size)
    if not 1 <= left <= STATE_N + 1 or not 0 <= nxt <= STATE_N or words.max() >= 1 << 32:
        return None
    bit_generator = np.random.MT19937(0)
    # torch twists when `left` falls to 0 (left == 1: the next draw twists); numpy when pos == 624
    bit_generator.state = {"bit_generator": "MT19937",
                           "state": {"key": words.astype(np.uint32), "pos": STATE_N if left == 1 else nxt}}
    return np.random.Generator(bit_generator), state


def _write_state(generator, state: bytes, rng) -> None:
    """generator's state moved to where rng's MT19937 is (the normal samples' cache kept)."""
    now = rng.bit_generator.state["state"]
    pos = int(now["pos"])
    seed, _left, seeded, _next = _HEAD.unpack_from(state)
    head = _HEAD.pack(seed, STATE_N + 1 - pos, seeded, pos)
    words = np.asarray(now["key"], dtype="<u8").tobytes()
    new = head + words + state[_STATE_BYTES:]
    generator.set_state(torch.frombuffer(bytearray(new), dtype=torch.uint8))


def _numpy_agrees() -> bool:
    """Once per process: numpy's draws and the state written back equal torch's own, from a
    fresh generator and from one part-way through a block."""
    global _checked
    if _checked is None:
        _checked = _same_as_torch()
    return _checked


def _same_as_torch() -> bool:
    try:
        for seed, before, n in ((0, 0, 3000), (2**40 + 7, 700, 1900), (2**64 - 1, 623, 625)):
            ours, theirs = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
            torch.rand(before, generator=ours), torch.rand(before, generator=theirs)
            mask = np.empty(n, dtype=np.bool_)
            if not _draw_by_numpy(mask, 0.3, ours):
                return False
            if not np.array_equal(mask, (torch.rand(n, generator=theirs) < 0.3).numpy()):
                return False
            if not torch.equal(torch.rand(50, generator=ours), torch.rand(50, generator=theirs)):
                return False
        return True
    except (RuntimeError, ValueError, TypeError, KeyError):
        return False

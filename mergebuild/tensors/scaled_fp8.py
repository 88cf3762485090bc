"""ComfyUI's "scaled fp8" safetensors (flux1-dev-fp8 scaled, t5xxl_fp8_e4m3fn_scaled, ...) read
as the float weights they stand for.

Such a file carries a marker tensor `<prefix>scaled_fp8` (an empty or 2-element tensor whose dtype
names the fp8 format) and, beside each scaled weight `<module>.weight` under that prefix, a float32
`<module>.scale_weight`, sometimes also `<module>.scale_input`. ComfyUI finds the marker by that key
(comfy/utils.py convert_old_quants; the text encoders' *_detect) and computes the weight as
`weight.to(dtype) * scale_weight.to(dtype)` (comfy/ops.py scaled_fp8_ops: convert_weight and
forward_comfy_cast_weights). Here dtype is float32: the product of an fp8 value and a float32 scale
rounds once there, while bfloat16 or float16 would drop most of the scale's bits.

The source then has the dequantised weights and none of the marker, scale_weight or scale_input
tensors: merged as tensors they would mix scales of unrelated weights, and the weights without
them would be read unscaled. scale_input scales activations (fp8 matmuls), never a weight.
A plain fp8 file (no marker, no scales) is read as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from mergebuild.dtypes import is_float, nbytes
from mergebuild.errors import InputError
from mergebuild.portable import RandomAccess

MARKER = "scaled_fp8"
READER = "scaled-fp8-1"  # what such a file reads as; a change re-imports what was imported before
SCALE = ".scale_weight"
INPUT_SCALE = ".scale_input"
FP8 = ("F8_E4M3", "F8_E5M2")


@dataclass(frozen=True)
class ScaledLayout:
    scales: dict[str, str]  # weight name -> the name of its scale_weight
    hidden: frozenset[str]  # the marker, scale_weight and scale_input tensors: not tensors to merge


def is_marker(name: str) -> bool:
    return name == MARKER or name.endswith("." + MARKER)


def scaled_layout(path: Path, refs: dict) -> ScaledLayout | None:
    """Which weights a file scales, from its tensors' names, dtypes and shapes (`refs`: name ->
    anything with .dtype and .shape); None for a file that is not scaled fp8."""
    prefixes = [n[: -len(MARKER)] for n in refs if is_marker(n)]
    scale_names = [n for n in refs if n.endswith((SCALE, INPUT_SCALE))]
    if not prefixes:
        _refuse_unmarked(path, refs, scale_names)
        return None
    scales = {}
    for name in scale_names:
        if not any(name.startswith(p) for p in prefixes):
            raise InputError(f"{path}: tensor {name!r} is a scale outside every scaled_fp8 marker's prefix "
                             f"({', '.join(repr(p + MARKER) for p in prefixes)}); ComfyUI would not apply it")
        if name.endswith(SCALE):
            weight = name[: -len(SCALE)] + ".weight"
            _check_scale(path, refs, weight, name)
            scales[weight] = name
    hidden = frozenset(scale_names) | {n for n in refs if is_marker(n)}
    return ScaledLayout(scales, hidden)


def _refuse_unmarked(path: Path, refs: dict, scale_names: list[str]) -> None:
    """Scales beside fp8 weights but no marker: ComfyUI would read the weights unscaled, and so
    would a merge; refuse rather than guess which is meant."""
    for name in scale_names:
        weight = refs.get(name.rsplit(".", 1)[0] + ".weight")
        if name.endswith(SCALE) and weight is not None and weight.dtype in FP8:
            raise InputError(f"{path}: tensor {name!r} scales an fp8 weight, but the file has no scaled_fp8 marker "
                             "tensor, so it is not ComfyUI's scaled fp8 format; add the marker or dequantise it first")


def _check_scale(path: Path, refs: dict, weight: str, scale: str) -> None:
    if weight not in refs:
        raise InputError(f"{path}: tensor {scale!r} scales {weight!r}, which the file does not have")
    w, s = refs[weight], refs[scale]
    if not is_float(s.dtype):
        raise InputError(f"{path}: tensor {scale!r} is {s.dtype}, not a floating-point scale")
    if _broadcast(tuple(w.shape), tuple(s.shape)) != tuple(w.shape):
        raise InputError(f"{path}: tensor {scale!r} of shape {list(s.shape)} does not scale {weight!r} of shape "
                         f"{list(w.shape)} element by element (a scalar or a broadcastable shape is)")


def _broadcast(a: tuple, b: tuple) -> tuple | None:
    """numpy's (and torch's) broadcast shape of a and b; None when they do not broadcast."""
    out = []
    for x, y in zip(reversed((1,) * (len(b) - len(a)) + a), reversed((1,) * (len(a) - len(b)) + b)):
        if x != y and 1 not in (x, y):
            return None
        out.append(max(x, y) if 0 not in (x, y) else 0)
    return tuple(reversed(out))


def dequantized(path: Path, refs: dict, layout: ScaledLayout) -> Iterator[tuple[str, str, tuple, memoryview]]:
    """(name, "F32", shape, bytes) of each scaled weight, read and dequantised one at a time
    (`refs`: name -> anything with .dtype, .shape and .begin, the byte offset in the file)."""
    from mergebuild.tensors.convert import from_bytes, to_bytes
    from mergebuild.torchlazy import torch

    with RandomAccess(path) as f:
        for weight, scale in layout.scales.items():
            w, s = _read(path, f, weight, refs[weight]), _read(path, f, scale, refs[scale])
            values = from_bytes(w, refs[weight].dtype, tuple(refs[weight].shape)).to(torch.float32)
            # in place: one float32 copy of the weight in memory, not two
            values.mul_(from_bytes(s, refs[scale].dtype, tuple(refs[scale].shape)).to(torch.float32))
            yield weight, "F32", tuple(refs[weight].shape), to_bytes(values)


def _read(path: Path, f: RandomAccess, name: str, ref):
    try:
        return f.read(nbytes(ref.dtype, tuple(ref.shape)), ref.begin)
    except OSError as e:
        raise InputError(f"{path}: tensor {name!r}: {e.strerror or e}") from None

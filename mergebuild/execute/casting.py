"""The cast of a result, computed in the compute dtype, to the dtype it is written in.

Within a format's range this is torch's own cast (round to nearest, ties to even). float8 has no
room above its largest finite value, and torch's cast sends what lies beyond it to inf (e5m2) or,
depending on the version and device, to NaN or the maximum (e4m3fn, which has no inf); so values
beyond it, infinities included, are clamped to it, sign kept, before the cast: 448 for
float8_e4m3fn, 57344 for float8_e5m2. That covers values that would round up past the maximum
too (464 is halfway between 448 and e4m3fn's missing 480; 61440 between 57344 and e5m2's inf).
NaN stays NaN. Other dtypes are cast as torch casts them; so are non-floating tensors.
"""

from __future__ import annotations

from mergebuild.dtypes import FLOAT8_MAX
from mergebuild.torchlazy import torch_dtype


def saturate(tensor, code: str):
    """The tensor, still in its own dtype, clamped to the finite range of `code` where that is a
    float8 format; the tensor itself otherwise. Never in place: a result may be an input's view."""
    top = FLOAT8_MAX.get(code)
    if top is None or not tensor.is_floating_point():
        return tensor
    return tensor.clamp(-top, top)  # NaN passes through clamp unchanged


def cast(tensor, code: str):
    """The tensor in the dtype of safetensors code `code`, saturating for float8."""
    return saturate(tensor, code).to(torch_dtype(code))


"""float8 outputs: torch's own cast within range, saturation beyond it, NaN kept.

The reference is written from the formats' definitions (OCP 8-bit floating point: e4m3fn has no
inf and one NaN per sign, e5m2 is IEEE-like) with exact rational arithmetic, so it checks torch's
rounding as well as ours.
"""

from __future__ import annotations

import bisect
import math
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergebuild.dtypes import COMPUTE_DTYPES, FLOAT8_MAX, OUTPUT_DTYPES, TORCH_NAMES, USER_DTYPES
from mergebuild.errors import MergefileError
from mergebuild.execute.casting import cast, saturate
from mergebuild.execute.device import CpuTransfer
from mergebuild.mergefile.parse import parse_mergefile

# code -> (exponent bits, mantissa bits, exponent bias, torch dtype)
FORMATS = {
    "F8_E4M3": (4, 3, 7, torch.float8_e4m3fn),
    "F8_E5M2": (5, 2, 15, torch.float8_e5m2),
}
CODES = list(FORMATS)
E4M3, E5M2 = CODES


def decode(code: str, byte: int) -> float:
    """The value of one byte of a float8 format, from the format's definition."""
    e_bits, m_bits, bias, _ = FORMATS[code]
    sign = -1.0 if byte & 0x80 else 1.0
    e, m = (byte >> m_bits) & ((1 << e_bits) - 1), byte & ((1 << m_bits) - 1)
    top = (1 << e_bits) - 1
    if code == E4M3 and e == top and m == (1 << m_bits) - 1:
        return math.nan
    if code == E5M2 and e == top:
        return sign * math.inf if m == 0 else math.nan
    if e == 0:
        return sign * m * 2.0 ** (1 - bias - m_bits)
    return sign * (1 + m / (1 << m_bits)) * 2.0 ** (e - bias)


def _positive_finite(code: str) -> list[tuple[float, int]]:
    values = [(decode(code, b), b) for b in range(0x80)]
    return sorted((v, b) for v, b in values if math.isfinite(v))


POSITIVE = {code: _positive_finite(code) for code in CODES}


def reference(code: str, x: float) -> int:
    """The byte of finite x: nearest value, ties to the even byte, beyond the maximum the maximum,
    the sign kept (a negative value too small for the format is -0)."""
    table = POSITIVE[code]
    values = [v for v, _ in table]
    mag = Fraction(min(abs(x), FLOAT8_MAX[code]))
    i = bisect.bisect_left(values, mag)
    if i < len(values) and values[i] == mag:
        byte = table[i][1]
    else:
        (lo, lo_byte), (hi, hi_byte) = table[i - 1], table[i]
        below, above = mag - Fraction(lo), Fraction(hi) - mag
        byte = lo_byte if below < above or (below == above and lo_byte % 2 == 0) else hi_byte
    return byte | (0x80 if math.copysign(1.0, x) < 0 else 0)


def bits(t) -> list[int]:
    return t.view(torch.uint8).tolist()


@pytest.mark.parametrize("code", CODES)
def test_the_reference_decodes_as_torch_does(code):
    raw = torch.arange(256, dtype=torch.uint8).view(FORMATS[code][3]).to(torch.float64).tolist()
    ours = [decode(code, b) for b in range(256)]
    assert [math.isnan(v) for v in raw] == [math.isnan(v) for v in ours]
    assert [v for v in raw if not math.isnan(v)] == [v for v in ours if not math.isnan(v)]
    assert POSITIVE[code][-1][0] == FLOAT8_MAX[code] == torch.finfo(FORMATS[code][3]).max


def test_dtype_names():
    for name in ("float8_e4m3fn", "float8_e5m2"):
        assert name in OUTPUT_DTYPES and name not in COMPUTE_DTYPES
        assert TORCH_NAMES[USER_DTYPES[name]] == name
    assert set(FLOAT8_MAX) == {USER_DTYPES["float8_e4m3fn"], USER_DTYPES["float8_e5m2"]}


E4M3_MAX, E5M2_MAX = FLOAT8_MAX[E4M3], FLOAT8_MAX[E5M2]
F32_EPS = 2.0**-23

# (format, value, expected value): the edges of the range, the halfway points, subnormals
BOUNDARIES = [
    (E4M3, E4M3_MAX, 448.0),
    (E4M3, E4M3_MAX * (1 + F32_EPS), 448.0),
    (E4M3, 432.0, 448.0),  # halfway 416 | 448: to the even mantissa (448)
    (E4M3, 400.0, 384.0),  # halfway 384 | 416: to 384
    (E4M3, 447.0, 448.0),
    (E4M3, 464.0, 448.0),  # halfway to the missing 480 (its byte is NaN)
    (E4M3, 465.0, 448.0),  # rounds past the maximum: torch's cast gives NaN here (c10)
    (E4M3, 480.0, 448.0),
    (E4M3, 1e30, 448.0),
    (E4M3, math.inf, 448.0),
    (E4M3, 2.0**-6, 2.0**-6),  # the smallest normal
    (E4M3, 7 * 2.0**-9, 7 * 2.0**-9),  # the largest subnormal
    (E4M3, 2.0**-9, 2.0**-9),  # the smallest subnormal
    (E4M3, 1.5 * 2.0**-9, 2.0**-8),  # halfway 1 | 2 subnormal steps: to 2
    (E4M3, 2.0**-10, 0.0),  # halfway 0 | the smallest: to 0
    (E4M3, 2.0**-10 * (1 + F32_EPS), 2.0**-9),
    (E4M3, 1e-30, 0.0),
    (E5M2, E5M2_MAX, 57344.0),
    (E5M2, E5M2_MAX * (1 + F32_EPS), 57344.0),
    (E5M2, 53248.0, 49152.0),  # halfway 49152 | 57344: to the even mantissa (49152)
    (E5M2, 61439.0, 57344.0),
    (E5M2, 61440.0, 57344.0),  # halfway to inf: torch's cast gives inf
    (E5M2, 65536.0, 57344.0),
    (E5M2, 3e38, 57344.0),
    (E5M2, math.inf, 57344.0),
    (E5M2, 2.0**-14, 2.0**-14),  # the smallest normal
    (E5M2, 2.0**-16, 2.0**-16),  # the smallest subnormal
    (E5M2, 2.0**-17, 0.0),  # halfway 0 | the smallest: to 0
    (E5M2, 2.0**-17 * (1 + F32_EPS), 2.0**-16),
    (E5M2, 3 * 2.0**-17, 2.0**-15),  # halfway 1 | 2 subnormal steps: to 2
    (E5M2, 1e-30, 0.0),
]


@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("code, value, expected", BOUNDARIES)
def test_boundaries(code, value, expected, sign):
    x = torch.tensor([sign * value], dtype=torch.float32)
    out = cast(x, code)
    assert out.dtype == FORMATS[code][3]
    assert out.to(torch.float64).item() == sign * expected
    assert math.copysign(1.0, out.to(torch.float64).item()) == sign  # -0.0 stays negative
    if math.isfinite(value):
        assert bits(out) == [reference(code, sign * value)]


@pytest.mark.parametrize("code", CODES)
def test_nan_stays_nan(code):
    x = torch.tensor([math.nan, 1.0, -math.nan], dtype=torch.float32)
    out = cast(x, code).to(torch.float32)
    assert math.isnan(out[0].item()) and out[1].item() == 1.0 and math.isnan(out[2].item())
    assert torch.isnan(saturate(x, code)[0])


def test_torchs_own_cast_does_not_saturate_e5m2():
    """Why the clamp: e5m2 has inf, and torch's cast rounds to it."""
    raw = torch.tensor([61440.0, 1e6, math.inf]).to(torch.float8_e5m2).to(torch.float32)
    assert torch.isinf(raw).all()
    assert cast(torch.tensor([61440.0, 1e6, math.inf]), E5M2).to(torch.float32).tolist() == [57344.0] * 3


@pytest.mark.parametrize("compute", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("code", CODES)
def test_in_range_it_is_torchs_cast(code, compute):
    """Bit for bit torch's cast of the compute-dtype result, over every binade of the format."""
    g = torch.Generator().manual_seed(7)
    top = math.log2(FLOAT8_MAX[code])
    scale = torch.exp2(torch.empty(20000).uniform_(-20, top, generator=g))
    x = (torch.empty(20000).uniform_(-1, 1, generator=g) * scale).to(compute)
    x = x.clamp(-FLOAT8_MAX[code], FLOAT8_MAX[code])  # in range, also after rounding to `compute`
    assert bits(cast(x, code)) == bits(x.to(FORMATS[code][3]))


@pytest.mark.parametrize("code", CODES)
def test_every_float8_value_survives_the_round_trip(code):
    values = torch.arange(256, dtype=torch.uint8).view(FORMATS[code][3])
    finite = values[torch.isfinite(values.to(torch.float32))]
    assert bits(cast(finite.to(torch.float32), code)) == bits(finite)


def test_other_dtypes_and_non_floating_tensors_are_left_to_torch():
    x = torch.tensor([1e6, -1e6, 0.1])
    assert saturate(x, "F16") is x and saturate(x, "F32") is x
    assert torch.isinf(cast(x, "F16")[:2]).all()  # the float16 cast as before
    ids = torch.arange(1000)
    assert saturate(ids, E4M3) is ids
    assert saturate(torch.tensor([True, False]), E5M2).dtype == torch.bool


def test_saturate_never_writes_its_input():
    x = torch.tensor([1000.0, -1000.0, 1.0])
    saturate(x, E4M3)
    assert x.tolist() == [1000.0, -1000.0, 1.0]


@pytest.mark.parametrize("code", CODES)
def test_the_cpu_download_saturates(code):
    transfer = CpuTransfer(torch.device("cpu"), "F32")
    out = transfer.fetch(transfer.download(torch.tensor([1e9, -1e9, math.inf, -math.inf, 1.0]), code))
    top = FLOAT8_MAX[code]
    assert out.dtype == FORMATS[code][3] and out.to(torch.float32).tolist() == [top, -top, top, -top, 1.0]


FINITE = st.one_of(
    st.floats(width=32, allow_nan=False, allow_infinity=False),
    st.floats(min_value=-70000.0, max_value=70000.0, width=32),  # around both maxima
    st.floats(min_value=-2.0**-6, max_value=2.0**-6, width=32),  # subnormals and the flush to 0
)


@settings(max_examples=300, deadline=None)
@given(st.lists(FINITE, min_size=1, max_size=40), st.sampled_from(CODES))
def test_property_clamp_then_torchs_cast(xs, code):
    x = torch.tensor(xs, dtype=torch.float32)
    top = FLOAT8_MAX[code]
    out = cast(x, code)
    assert bits(out) == bits(torch.clamp(x, -top, top).to(FORMATS[code][3]))
    assert bits(out) == [reference(code, v) for v in x.tolist()]


# the Mergefile


def parse(dtype: str, compute: str = "float32"):
    return parse_mergefile(f"""
[settings]
compute_dtype = "{compute}"
[models.a]
path = "a.safetensors"
[merges.m]
method = "copy"
inputs = ["a"]
dtype = "{dtype}"
output = "m.safetensors"
""", Path("/p/mergefile.toml"))


@pytest.mark.parametrize("name", ["float8_e4m3fn", "float8_e5m2"])
def test_mergefile_takes_float8_outputs_but_not_float8_compute(name):
    assert parse(name).merges["m"].dtype == name
    with pytest.raises(MergefileError) as e:
        parse("float16", compute=name)
    assert "compute_dtype" in str(e.value) and "float64" in str(e.value)


def test_mergefile_names_the_float8_choices():
    with pytest.raises(MergefileError) as e:
        parse("fp8")
    assert "float8_e4m3fn, float8_e5m2" in str(e.value)

"""Tensor dtypes by name, without importing torch (planning must stay torch-free)."""

from __future__ import annotations

# safetensors dtype code -> (bytes per element, is floating point)
SAFETENSORS_DTYPES: dict[str, tuple[int, bool]] = {
    "F64": (8, True),
    "F32": (4, True),
    "F16": (2, True),
    "BF16": (2, True),
    "F8_E4M3": (1, True),
    "F8_E5M2": (1, True),
    "I64": (8, False),
    "I32": (4, False),
    "I16": (2, False),
    "I8": (1, False),
    "U8": (1, False),
    "U16": (2, False),
    "U32": (4, False),
    "U64": (8, False),
    "BOOL": (1, False),
}

# the names a Mergefile uses for output and compute dtypes
USER_DTYPES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32", "float64": "F64",
               "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}
COMPUTE_DTYPES = ("float16", "bfloat16", "float32", "float64")
OUTPUT_DTYPES = ("float16", "bfloat16", "float32", "float8_e4m3fn", "float8_e5m2")

# the largest finite value of each float8 format: a result beyond it is written as it, sign kept
# (execute/casting.py), where torch's own cast gives inf or NaN
FLOAT8_MAX = {"F8_E4M3": 448.0, "F8_E5M2": 57344.0}

TORCH_NAMES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "U16": "uint16",
    "U32": "uint32",
    "U64": "uint64",
    "BOOL": "bool",
}
FROM_TORCH_NAME = {v: k for k, v in TORCH_NAMES.items()}


def itemsize(code: str) -> int:
    return SAFETENSORS_DTYPES[code][0]


def is_float(code: str) -> bool:
    return SAFETENSORS_DTYPES[code][1]


def nbytes(code: str, shape: tuple[int, ...]) -> int:
    n = itemsize(code)
    for d in shape:
        n *= d
    return n

"""What a quantized tensor can be: the bits, group sizes and dtypes mixq supports, and their sizes."""

from __future__ import annotations

import math
from dataclasses import dataclass

BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
QUANT_DTYPES = ("float32", "float16", "bfloat16")   # dtypes a weight (and its scales/biases) may have
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int64": 8, "int32": 4,
               "uint32": 4, "int16": 2, "uint16": 2, "int8": 1, "uint8": 1, "bool": 1,
               "float8_e4m3fn": 1, "float8_e5m2": 1}


@dataclass(frozen=True)
class Spec:
    """An MLX affine quantization: `bits` per weight, one scale and bias per `group_size` weights."""
    bits: int
    group_size: int

    def __str__(self):
        return f"{self.bits}-bit g{self.group_size}"


def precision(spec: Spec | None):
    """Sort key: larger = more precise (keep, i.e. None, beats every spec)."""
    return (99, 0) if spec is None else (spec.bits, -spec.group_size)


def quantized_nbytes(shape, bits: int, group_size: int, scale_bytes: int = 2) -> int:
    """Bytes of a quantized tensor of `shape`: packed uint32 words + scales + biases."""
    numel = math.prod(shape)
    return numel * bits // 8 + 2 * (numel // group_size) * scale_bytes


def bits_per_weight(nbytes: int, params: int) -> float:
    """Stored bits per parameter: 8 * bytes / parameters (0.0 for no parameters)."""
    return 8 * nbytes / params if params else 0.0

"""What a quantized tensor can be: the modes, bits, group sizes and dtypes mixq supports, and their sizes.

mlx 0.32 quantizes in four modes (`mx.quantize(w, group_size, bits, mode=...)`; measured, not read
from a table): `affine` takes bits 1-8 except 7 (mixq uses 2, 3, 4, 5, 6, 8) and group 32, 64 or 128,
and stores a scale and a bias per group in the weight's dtype; the float modes take exactly one
(bits, group size) each and store one uint8 scale per group and no bias: `mxfp4` (4, 32: E2M1 codes,
E8M0 power-of-two scales), `nvfp4` (4, 16: E2M1 codes, E4M3 scales) and `mxfp8` (8, 32: E4M3
codes, E8M0 scales). See `quant.quantize` for the arithmetic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

BITS = (2, 3, 4, 5, 6, 8)            # affine
GROUP_SIZES = (32, 64, 128)          # affine
MODES = ("affine", "mxfp4", "nvfp4", "mxfp8")
FLOAT_MODES = {"mxfp4": (4, 32), "nvfp4": (4, 16), "mxfp8": (8, 32)}   # mode -> its one (bits, group_size)
QUANT_DTYPES = ("float32", "float16", "bfloat16")   # dtypes a weight (and its scales/biases) may have
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int64": 8, "int32": 4,
               "uint32": 4, "int16": 2, "uint16": 2, "int8": 1, "uint8": 1, "bool": 1,
               "float8_e4m3fn": 1, "float8_e5m2": 1}


def spec_error(bits, group_size, mode="affine") -> str | None:
    """Why (bits, group_size, mode) is not a quantization mlx 0.32 and mixq support; None if it is."""
    if mode not in MODES:
        return f"mode {mode!r} is not one of {', '.join(MODES)}"
    if mode in FLOAT_MODES:
        b, g = FLOAT_MODES[mode]
        if (bits, group_size) != (b, g):
            return (f"mode {mode} takes bits = {b} and group_size = {g} only, "
                    f"got bits = {bits}, group_size = {group_size}")
        return None
    if type(bits) is not int or bits not in BITS:
        return f"bits {bits!r} not in {{2, 3, 4, 5, 6, 8}}"
    if type(group_size) is not int or group_size not in GROUP_SIZES:
        return f"group_size {group_size!r} not in {{32, 64, 128}}"
    return None


@dataclass(frozen=True)
class Spec:
    """An MLX quantization: `bits` per weight, one scale (and for affine one bias) per `group_size` weights,
    in `mode` ("affine", or one of the float modes with their fixed bits and group size)."""
    bits: int
    group_size: int
    mode: str = "affine"

    def __str__(self):
        return f"{self.bits}-bit g{self.group_size}" if self.mode == "affine" else self.mode

    @property
    def has_biases(self) -> bool:
        return self.mode == "affine"

    def config(self) -> dict:
        """The entry mlx-lm reads from config.json's quantization dict (a module's entry without "mode" is
        affine to mlx-lm, so affine entries leave it out)."""
        d = {"group_size": self.group_size, "bits": self.bits}
        if self.mode != "affine":
            d["mode"] = self.mode
        return d


def precision(spec: Spec | None):
    """Sort key: larger = more precise (keep, i.e. None, beats every spec; at equal bits and group an
    affine spec, whose scales are in the weight's dtype, beats a float mode's)."""
    return (99, 0, 0) if spec is None else (spec.bits, -spec.group_size, spec.mode == "affine")


def quantized_nbytes(shape, bits: int, group_size: int, scale_bytes: int = 2, mode: str = "affine") -> int:
    """Bytes of a quantized tensor of `shape`: packed uint32 words + scales + biases (affine: both in the
    tensor's dtype, `scale_bytes` each; float modes: one uint8 scale per group, no biases)."""
    numel = math.prod(shape)
    if mode != "affine":
        return numel * bits // 8 + numel // group_size
    return numel * bits // 8 + 2 * (numel // group_size) * scale_bytes


def spec_nbytes(shape, spec: Spec, scale_bytes: int = 2) -> int:
    """`quantized_nbytes` of a Spec."""
    return quantized_nbytes(shape, spec.bits, spec.group_size, scale_bytes, spec.mode)


def bits_per_weight(nbytes: int, params: int) -> float:
    """Stored bits per parameter: 8 * bytes / parameters (0.0 for no parameters)."""
    return 8 * nbytes / params if params else 0.0

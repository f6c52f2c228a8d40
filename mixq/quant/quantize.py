"""MLX quantization in torch (affine and the float modes), bit-exact with `mx.quantize` / `mx.dequantize`.

The algorithm (established by experiment against mlx 0.32 on CPU, see tests/test_quantize.py):

* Each row of the last dimension is cut into groups of `group_size`. Per group, in float32:
  `w_max`, `w_min`; `scale = max((w_max - w_min) / (2**bits - 1), 1e-7)`.
  The "edge" is the end of the range with the larger magnitude (`w_min` if `|w_min| > |w_max|`,
  else `w_max`, in which case the scale is negated). `q0 = rint(edge / scale)`; if `q0 != 0` the
  scale becomes `edge / q0` and the bias is `edge`, so that 0.0 is exactly representable;
  otherwise the bias is 0.
* Codes: `clip(rint((w - bias) / scale), 0, 2**bits - 1)`, using the float32 scale and bias
  (before they are rounded to the weight's dtype). `rint` rounds half to even.
* Scales and biases are then rounded to the weight's dtype.
* Packing: the codes of a row form one little-endian bit stream (code k at bits
  `[k*bits, (k+1)*bits)`) stored as uint32 words, for every bit width (3/5/6 included), so a row of
  `n` codes takes `n * bits / 32` words.
* Dequantization, in the scales' dtype: `(scale * q)` rounded to that dtype, plus `bias`, rounded
  again (two separate operations, no fused multiply-add).

Packed weights are `torch.uint32`; safetensors >= 0.4.3 saves and loads them (dtype "U32") and
`mx.load` reads them back as `mx.uint32`, so no conversion is needed.

The float modes (`mode="mxfp4" | "nvfp4" | "mxfp8"`), also established by experiment against mlx
0.32 on CPU (tests/test_modes.py). `T` is the weight's dtype; M is 6 (E2M1's largest) or 448 (E4M3's).

* Per group: `amax = max|w|`; `s = amax / M` computed in T (in float16 it underflows to 0 for
  small groups, as in mlx).
* mxfp4 / mxfp8 (group 32, E8M0 scale): the scale is the smallest power of two >= s, 2**n with
  n = ceil(log2 s) (n = 0 when s is 0). The stored byte is `(n + 127) mod 256`: mlx does not clamp,
  so a group whose s is below 2**-127 (|w| < 3.5e-38 for mxfp4) stores a wrapped byte (2**-128 is
  stored as 255, which reads back as inf); its codes use the true 2**n.
* nvfp4 (group 16, E4M3 scale): the scale is s rounded to E4M3 (nearest, ties to even,
  saturating at 448; below 2**-10 it is 0, so a group with max |w| < 6 * 2**-10 ~ 0.006 is all
  zeros, and below 2**-6 the scale is an E4M3 subnormal with fewer bits). A group with |w| > 2**32
  is refused: with the scale saturated, mlx's own E2M1 rounding of x > 2**25 returns arbitrary
  codes. No global (per-tensor) scale: mlx_lm.convert never writes one (only
  `quantize_model(..., global_scale=True)` does, for nvfp4 switch layers); mixq neither writes nor
  reads it.
* Codes from `x = w / scale` in float32 (0 when the scale is 0). E2M1 (4 bits: sign, then the
  magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6 as codes 0-7): the nearest magnitude with ties toward
  zero (0.75 -> 0.5, 1.75 -> 1.5, 3.5 -> 3, 5 -> 4; x > 5 -> 6), and a zero code never has its sign
  bit set. E4M3 (8 bits): PyTorch's float8_e4m3fn rounding (nearest, ties to even) after clamping to
  +-448; the sign of a zero is kept (-1e-9 -> 0x80).
* Packing: as affine (4-bit codes little-endian, 8 per uint32 word; 8-bit codes 4 per word).
  Scales are uint8 [..., in/group]; there are no biases (`quantize` returns None for them).
* Dequantization in a dtype D (mlx's default, and `dequantize`'s, is bfloat16): the scale
  (E8M0 byte b: 2**(b - 127), b = 0 -> 2**-127, b = 255 -> inf; or the E4M3 value) and the code's
  value are each cast to D, then multiplied in D. In bfloat16 and float32 this is the exact product
  for any scale a real weight gets; in float16 small scales underflow to 0, as in mlx.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mixq.errors import MixqError
from mixq.quant.spec import Spec, spec_error
from mixq.threads import torch_threads

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Elements per processing chunk: 1 MB of float32, so the chain of element-wise passes stays in cache.
_CHUNK = 1 << 18
# Torch threads used inside quantize/dequantize. The chunks are small, so each op is one short parallel
# region; on a busy machine every region waits for a descheduled worker thread (measured: 20-100x slower
# with 2 threads than with 1 under load average 4 on 2 cores). One thread is ~400-600 M elements/s.
_THREADS = 1
# Masks for squeezing 8 one-byte codes in an int64 into one 8*bits-bit stream (and back).
_B8, _B16, _B32 = 0x00FF00FF00FF00FF, 0x0000FFFF0000FFFF, 0xFFFFFFFF


def _label(name):
    return f"tensor {name}" if name else "tensor"


def _check_spec(bits, group_size, name=None, mode="affine"):
    err = spec_error(bits, group_size, mode)
    if err is None:
        return
    if mode == "affine" and err.startswith("bits"):
        raise MixqError(f"{_label(name)}: bits={bits} not supported; use one of [2, 3, 4, 5, 6, 8]")
    if mode == "affine" and err.startswith("group_size"):
        raise MixqError(f"{_label(name)}: group_size={group_size} not supported; use one of [32, 64, 128]")
    raise MixqError(f"{_label(name)}: {err}")


def _row_chunks(rows, cols):
    step = max(1, _CHUNK // max(cols, 1))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def _pack_into(out: torch.Tensor, q: torch.Tensor, bits: int) -> None:
    """uint8 codes [r, n] (n % 8 == 0) -> `out`, uint32 words [r, n * bits / 32] (little-endian bit stream)."""
    r, n = q.shape
    dst = out.view(torch.uint8)
    if bits == 8:
        dst.copy_(q)
        return
    # 8 codes -> one int64 (code k in byte k) -> squeeze pairs of fields: 8 x 8 bits -> 4 x 16 -> 2 x 32 -> 1 x 64,
    # leaving the 8 * bits stream bits in the low `bits` bytes of the word
    x = q.view(torch.int64)
    x = (x & _B8) | (((x >> 8) & _B8) << bits)
    x = (x & _B16) | (((x >> 16) & _B16) << (2 * bits))
    x = (x & _B32) | ((x >> 32) << (4 * bits))
    dst.view(r, n // 8, bits).copy_(x.view(torch.uint8).view(r, n // 8, 8)[..., :bits])


def _unpack(wq: torch.Tensor, bits: int) -> torch.Tensor:
    """uint32 words [r, w] -> uint8 codes [r, w * 32 / bits] (the inverse of `_pack_into`)."""
    r = wq.shape[0]
    by = wq.contiguous().view(torch.uint8)
    if bits == 8:
        return by
    n = by.shape[1] * 8 // bits
    x = torch.zeros(r, n // 8, dtype=torch.int64)
    x.view(torch.uint8).view(r, n // 8, 8)[..., :bits].copy_(by.view(r, n // 8, bits))
    m1, m2 = (1 << bits) - 1, (1 << (2 * bits)) - 1
    x = (x & ((1 << (4 * bits)) - 1)) | ((x >> (4 * bits)) << 32)
    x = (x & (m2 * 0x0000000100000001)) | (((x >> (2 * bits)) & (m2 * 0x0000000100000001)) << 16)
    x = (x & (m1 * 0x0001000100010001)) | (((x >> bits) & (m1 * 0x0001000100010001)) << 8)
    return x.view(torch.uint8).view(r, n)


@dataclass
class Quantized:
    """A tensor that arrives already quantized (a source format kept as it is): what `quantize` returns, with
    its spec. Scales and biases are cast to the planned dtype when written."""
    wq: torch.Tensor
    scales: torch.Tensor
    biases: torch.Tensor | None
    spec: Spec


def _affine_params(w_max: torch.Tensor, w_min: torch.Tensor, n_bins: float):
    """float32 (scale, bias) of groups with these max/min, as mx.quantize computes them (module docstring)."""
    mask = w_min.abs() > w_max.abs()
    scale = ((w_max - w_min) / n_bins).clamp_(min=1e-7)
    scale = torch.where(mask, scale, -scale)
    edge = torch.where(mask, w_min, w_max)
    q0 = torch.round(edge / scale)
    nz = q0 != 0
    scale = torch.where(nz, edge / torch.where(nz, q0, 1.0), scale)
    bias = torch.where(nz, edge, 0.0)
    return scale, bias


def affine_params(g: torch.Tensor, bits: int):
    """float32 (scale, bias) [..., 1] of the groups `g` [..., group_size] as mx.quantize computes them (before they
    are rounded to the stored dtype); calibrated methods (tune/gptq.py) use it to stay on MLX's grid."""
    g = g.to(torch.float32)
    return _affine_params(g.amax(-1, keepdim=True), g.amin(-1, keepdim=True), float((1 << bits) - 1))


def pack_codes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [rows, n] (each < 2**bits, n * bits % 32 == 0) -> uint32 words [rows, n * bits / 32], packed
    as mlx packs them."""
    rows, n = q.shape
    if n % 8 or (n * bits) % 32:
        raise MixqError(f"cannot pack {n} codes of {bits} bits per row into uint32 words")
    out = torch.empty(rows, n * bits // 32, dtype=torch.uint32)
    q = q.to(torch.uint8)
    with torch_threads(_THREADS, at_most=True):   # in chunks: the int64 temporaries stay in cache (6x faster)
        for a, b in _row_chunks(rows, n):
            _pack_into(out[a:b], q[a:b].contiguous(), bits)
    return out


def unpack_codes(wq: torch.Tensor, bits: int) -> torch.Tensor:
    """uint32 words [rows, w] -> uint8 codes [rows, w * 32 / bits] (the inverse of `pack_codes`)."""
    return _unpack(wq, bits)


def quantize(w: torch.Tensor, bits: int, group_size: int, *, mode: str = "affine", name: str | None = None):
    """Quantize `w` [..., in] -> (packed uint32 [..., in*bits/32], scales, biases [..., in/group]) like mx.quantize.

    Affine: scales and biases in w's dtype. Float modes: scales uint8, biases None."""
    _check_spec(bits, group_size, name, mode)
    if not isinstance(w, torch.Tensor) or w.dtype not in DTYPES:
        dt = getattr(w, "dtype", type(w).__name__)
        raise MixqError(f"{_label(name)}: dtype {dt} cannot be quantized; use float32, float16 or bfloat16")
    if w.ndim < 2:
        raise MixqError(f"{_label(name)}: shape {tuple(w.shape)} has fewer than 2 dimensions; "
                        f"only matrices (or stacks of them) are quantized")
    if w.shape[-1] % group_size != 0:
        dim = w.shape[-1]
        raise MixqError(f"{_label(name)}: last dimension {dim} (shape {tuple(w.shape)}) is not divisible by "
                        f"group size {group_size}; keep it unquantized or use a smaller group")
    if mode != "affine":
        return _quantize_float(w, bits, group_size, mode, name)
    lead, cols = tuple(w.shape[:-1]), w.shape[-1]
    rows = math.prod(lead)
    ng = cols // group_size
    w2 = w.reshape(rows, cols)
    packed = torch.empty(rows, cols * bits // 32, dtype=torch.uint32)
    scales = torch.empty(rows, ng, dtype=w.dtype)
    biases = torch.empty(rows, ng, dtype=w.dtype)
    n_bins = float((1 << bits) - 1)
    with torch_threads(_THREADS, at_most=True):
        for a, b in _row_chunks(rows, cols):
            g = w2[a:b].to(torch.float32, copy=True).view(b - a, ng, group_size)
            w_max = g.amax(-1, keepdim=True)
            w_min = g.amin(-1, keepdim=True)
            # a NaN in a group makes its max and min NaN, an Inf makes one of them infinite
            if not (bool(torch.isfinite(w_max).all()) and bool(torch.isfinite(w_min).all())):
                raise MixqError(f"{_label(name)}: holds NaN or Inf values; "
                                f"fix the checkpoint or keep this tensor unquantized")
            scale, bias = _affine_params(w_max, w_min, n_bins)
            # clamping before rounding equals rounding before clamping: the bounds are integers
            q = g.sub_(bias).div_(scale).clamp_(0.0, n_bins).round_().to(torch.uint8)
            _pack_into(packed[a:b], q.view(b - a, cols), bits)
            scales[a:b] = scale.view(b - a, ng)
            biases[a:b] = bias.view(b - a, ng)
    return (packed.view(*lead, cols * bits // 32), scales.view(*lead, ng), biases.view(*lead, ng))


def dequantize(wq: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor | None, bits: int, group_size: int,
               *, mode: str = "affine", name: str | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Inverse of `quantize`, bit-exact with mx.dequantize (same `dtype`).

    Affine: computed in `scales.dtype` (then cast to `dtype` if given, as mlx does). Float modes:
    `biases` must be None; the result is in `dtype`, by default bfloat16 as in mlx."""
    _check_spec(bits, group_size, name, mode)
    if wq.dtype != torch.uint32:
        raise MixqError(f"{_label(name)}: packed weights must be uint32, got {wq.dtype}")
    if mode != "affine":
        return _dequantize_float(wq, scales, biases, bits, group_size, mode, name, dtype)
    if biases is None:
        raise MixqError(f"{_label(name)}: affine quantization needs biases")
    if scales.dtype not in DTYPES or biases.dtype != scales.dtype:
        raise MixqError(f"{_label(name)}: scales/biases must share a float dtype, got {scales.dtype}/{biases.dtype}")
    lead, words = tuple(wq.shape[:-1]), wq.shape[-1]
    cols = words * 32 // bits
    ng = cols // group_size
    if words * 32 % bits or cols % group_size or tuple(scales.shape) != (*lead, ng) \
            or tuple(biases.shape) != (*lead, ng):
        raise MixqError(f"{_label(name)}: packed shape {tuple(wq.shape)} does not match scales "
                        f"{tuple(scales.shape)} / biases {tuple(biases.shape)} "
                        f"for bits={bits}, group_size={group_size}")
    rows = math.prod(lead)
    dt = scales.dtype
    wq2 = wq.reshape(rows, words)
    s2 = scales.reshape(rows, ng, 1)
    b2 = biases.reshape(rows, ng, 1)
    out = torch.empty(rows, cols, dtype=dt)
    with torch_threads(_THREADS, at_most=True):
        for a, b in _row_chunks(rows, cols):
            q = _unpack(wq2[a:b], bits).to(dt).view(b - a, ng, group_size)
            o = out[a:b].view(b - a, ng, group_size)
            torch.mul(q, s2[a:b], out=o)
            o.add_(b2[a:b])  # two roundings, as mlx (no fma)
    out = out.view(*lead, cols)
    return out if dtype is None or dtype == dt else out.to(dtype)


# ---------------------------------------------------------------- float modes (mxfp4, nvfp4, mxfp8)

_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# E2M1 rounding: magnitude code k + 1 for x > _E2M1_UP[k] (ties go toward zero)
_E2M1_UP = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_FP_MAX = {4: 6.0, 8: 448.0}
# nvfp4 groups with |w| above this are refused: their E4M3 scale saturates at 448, and mlx's E2M1 rounding of
# w / 448 goes wrong above about 2**25 (measured: codes 4, 7 and 0 instead of the saturated 7)
_NVFP4_MAX = 2.0 ** 32


def _fp4_codes(x: torch.Tensor) -> torch.Tensor:
    """float32 -> E2M1 codes (uint8, 0-15) as mlx rounds: nearest, ties toward zero, no sign on a zero code."""
    a = x.abs()
    c = torch.zeros(x.shape, dtype=torch.uint8)
    for thr in _E2M1_UP:
        c += a > thr
    return c | ((x < 0) & (c != 0)).to(torch.uint8) << 3


def _e4m3_bytes(x: torch.Tensor) -> torch.Tensor:
    """float32 -> E4M3 bytes: nearest, ties to even, saturating at +-448 (sign of zero kept)."""
    return x.clamp(-448.0, 448.0).to(torch.float8_e4m3fn).view(torch.uint8)


def float_scales(amax: torch.Tensor, bits: int, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(stored uint8 scale bytes, float32 scales) of float-mode groups whose max |w| is `amax` (in the weight's
    dtype), as mx.quantize computes them (module docstring); calibrated methods (tune/gptq.py, tune/awq.py) use it
    to stay on MLX's grid."""
    s = (amax / _FP_MAX[bits]).float()   # in w's dtype, as mlx
    if mode == "nvfp4":
        sbyte = _e4m3_bytes(s)
        return sbyte, sbyte.view(torch.float8_e4m3fn).float()
    # E8M0: the smallest power of two >= s; byte n + 127 without clamping (as mlx)
    m, e = torch.frexp(s)
    n = torch.where(m == 0.5, e - 1, e).masked_fill_(s == 0, 0)
    sbyte = (n + 127).bitwise_and_(0xFF).to(torch.uint8)
    # 2**n as float32 bits (s >= 2**-149, so -149 <= n <= 126; below -126 it is subnormal)
    return sbyte, torch.where(n >= -126, (n + 127) << 23, 1 << (n + 149).clamp_(min=0)).view(torch.float32)


def float_codes(g: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes of the values `g` (float32, or the weight's dtype) under float32 `scale` (broadcast), rounded as
    mx.quantize rounds them (0 where the scale is 0)."""
    x = g.to(torch.float32, copy=True).div_(scale).masked_fill_(scale == 0, 0.0)
    return _fp4_codes(x) if bits == 4 else _e4m3_bytes(x)


def float_values(bits: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The value of every float-mode code [2**bits] in `dtype` (E2M1 or E4M3): dequantized = value * scale."""
    if bits == 4:
        return torch.tensor(_E2M1 + tuple(-v for v in _E2M1), dtype=torch.float32).to(dtype)
    return torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float().to(dtype)


def _quantize_float(w: torch.Tensor, bits: int, group_size: int, mode: str, name):
    lead, cols = tuple(w.shape[:-1]), w.shape[-1]
    rows = math.prod(lead)
    ng = cols // group_size
    w2 = w.reshape(rows, cols)
    packed = torch.empty(rows, cols * bits // 32, dtype=torch.uint32)
    scales = torch.empty(rows, ng, dtype=torch.uint8)
    with torch_threads(_THREADS, at_most=True):
        for a, b in _row_chunks(rows, cols):
            g = w2[a:b].view(b - a, ng, group_size)
            amax = g.abs().amax(-1, keepdim=True)
            if not bool(torch.isfinite(amax).all()):
                raise MixqError(f"{_label(name)}: holds NaN or Inf values; "
                                f"fix the checkpoint or keep this tensor unquantized")
            if mode == "nvfp4" and bool((amax > _NVFP4_MAX).any()):
                raise MixqError(f"{_label(name)}: holds values above {_NVFP4_MAX:.3g} in magnitude, which mlx's "
                                f"nvfp4 quantizer mis-rounds; keep this tensor unquantized or use another mode")
            sbyte, scale = float_scales(amax, bits, mode)
            q = float_codes(g, scale, bits)
            _pack_into(packed[a:b], q.view(b - a, cols), bits)
            scales[a:b] = sbyte.view(b - a, ng)
    return packed.view(*lead, cols * bits // 32), scales.view(*lead, ng), None


def _dequantize_float(wq, scales, biases, bits: int, group_size: int, mode: str, name, dtype):
    if biases is not None:
        raise MixqError(f"{_label(name)}: mode {mode} has no biases (got a biases tensor)")
    if scales.dtype != torch.uint8:
        raise MixqError(f"{_label(name)}: mode {mode} scales must be uint8, got {scales.dtype}")
    dt = torch.bfloat16 if dtype is None else dtype
    if dt not in DTYPES:
        raise MixqError(f"{_label(name)}: cannot dequantize to {dt}; use float32, float16 or bfloat16")
    lead, words = tuple(wq.shape[:-1]), wq.shape[-1]
    cols = words * 32 // bits
    ng = cols // group_size
    if cols % group_size or tuple(scales.shape) != (*lead, ng):
        raise MixqError(f"{_label(name)}: packed shape {tuple(wq.shape)} does not match scales "
                        f"{tuple(scales.shape)} for mode {mode} (bits={bits}, group_size={group_size})")
    values = float_values(bits, dt)
    sb = scales.reshape(-1, ng)
    if mode == "nvfp4":
        sv = sb.view(torch.float8_e4m3fn).float()
    else:  # E8M0: byte b -> 2**(b - 127) as float32 bits (b = 0: 2**-127, b = 255: inf)
        sv = torch.where(sb == 0, 2.0 ** -127, (sb.to(torch.int32) << 23).view(torch.float32))
    sv = sv.to(dt).view(-1, ng, 1)
    rows = math.prod(lead)
    wq2 = wq.reshape(rows, words)
    out = torch.empty(rows, cols, dtype=dt)
    with torch_threads(_THREADS, at_most=True):
        for a, b in _row_chunks(rows, cols):
            q = values[_unpack(wq2[a:b], bits).long()].view(b - a, ng, group_size)
            torch.mul(sv[a:b], q, out=out[a:b].view(b - a, ng, group_size))
    return out.view(*lead, cols)


def round_trip(w: torch.Tensor, spec, name: str | None = None) -> torch.Tensor:
    """`w` quantized to `spec` and dequantized again (what convert stores, read back as the engine reads it:
    affine in w's dtype, the float modes in bfloat16, exact for them), in w's dtype."""
    b, g, m = spec.bits, spec.group_size, spec.mode
    return dequantize(*quantize(w, b, g, mode=m, name=name), b, g, mode=m, name=name).to(w.dtype)

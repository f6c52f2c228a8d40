"""MLX affine quantization in torch, bit-exact with `mx.quantize` / `mx.dequantize`.

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
"""

from __future__ import annotations

import math

import torch

from mixq.errors import MixqError
from mixq.quant.spec import BITS, GROUP_SIZES
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


def _check_spec(bits, group_size, name=None):
    if bits not in BITS:
        raise MixqError(f"{_label(name)}: bits={bits} not supported; use one of {list(BITS)}")
    if group_size not in GROUP_SIZES:
        raise MixqError(f"{_label(name)}: group_size={group_size} not supported; use one of {list(GROUP_SIZES)}")


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


def quantize(w: torch.Tensor, bits: int, group_size: int, *, name: str | None = None):
    """Quantize `w` [..., in] -> (packed uint32 [..., in*bits/32], scales, biases [..., in/group]) like mx.quantize."""
    _check_spec(bits, group_size, name)
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
            mask = w_min.abs() > w_max.abs()
            scale = ((w_max - w_min) / n_bins).clamp_(min=1e-7)
            scale = torch.where(mask, scale, -scale)
            edge = torch.where(mask, w_min, w_max)
            q0 = torch.round(edge / scale)
            nz = q0 != 0
            scale = torch.where(nz, edge / torch.where(nz, q0, 1.0), scale)
            bias = torch.where(nz, edge, 0.0)
            # clamping before rounding equals rounding before clamping: the bounds are integers
            q = g.sub_(bias).div_(scale).clamp_(0.0, n_bins).round_().to(torch.uint8)
            _pack_into(packed[a:b], q.view(b - a, cols), bits)
            scales[a:b] = scale.view(b - a, ng)
            biases[a:b] = bias.view(b - a, ng)
    return (packed.view(*lead, cols * bits // 32), scales.view(*lead, ng), biases.view(*lead, ng))


def dequantize(wq: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, bits: int, group_size: int,
               *, name: str | None = None) -> torch.Tensor:
    """Inverse of `quantize`, bit-exact with mx.dequantize; returns a tensor in `scales.dtype`."""
    _check_spec(bits, group_size, name)
    if wq.dtype != torch.uint32:
        raise MixqError(f"{_label(name)}: packed weights must be uint32, got {wq.dtype}")
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
    return out.view(*lead, cols)

"""mixq.quantize against mlx as the oracle: packed words, scales, biases and dequantized values bit-exact."""

import numpy as np
import pytest
import torch

from mixq.errors import MixqError
from mixq.quant import quantize as Q
from mixq.quant.quantize import dequantize, quantize
from mixq.quant.spec import quantized_nbytes

try:
    import mlx.core as mx
except ImportError:  # tests that need it are marked mlx and skipped
    mx = None

torch.set_num_threads(2)
BITS = [2, 3, 4, 5, 6, 8]
GROUPS = [32, 64, 128]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
MX_DT = {torch.float32: mx.float32, torch.float16: mx.float16, torch.bfloat16: mx.bfloat16}


def to_mx(t):
    return mx.array(t.float().numpy()).astype(MX_DT[t.dtype])


def to_t(a):
    return torch.from_numpy(np.array(a.astype(mx.float32)))


def assert_exact(w, bits, gs):
    wq, s, b = quantize(w, bits, gs)
    mq, ms, mb = mx.quantize(to_mx(w), group_size=gs, bits=bits)
    assert wq.dtype == torch.uint32 and s.dtype == w.dtype and b.dtype == w.dtype
    assert tuple(wq.shape) == tuple(mq.shape) and tuple(s.shape) == tuple(ms.shape)
    assert np.array_equal(wq.numpy(), np.array(mq)), f"packed words differ ({w.dtype}, {bits}b, g{gs})"
    assert torch.equal(s.float(), to_t(ms)), f"scales differ ({w.dtype}, {bits}b, g{gs})"
    assert torch.equal(b.float(), to_t(mb)), f"biases differ ({w.dtype}, {bits}b, g{gs})"
    d = dequantize(wq, s, b, bits, gs)
    md = mx.dequantize(mq, ms, mb, group_size=gs, bits=bits)
    assert d.dtype == w.dtype and d.shape == w.shape
    assert torch.equal(d.float(), to_t(md)), f"dequantized values differ ({w.dtype}, {bits}b, g{gs})"
    return d


@pytest.mark.mlx
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("gs", GROUPS)
def test_random_matches_mlx(dtype, bits, gs):
    g = torch.Generator().manual_seed(bits * 1000 + gs)
    # rows with magnitudes from 1e-6 to 1e3, some rows shifted to be all positive / all negative
    w = torch.randn(6, 7, 384, generator=g) * torch.logspace(-6, 3, 7).view(1, 7, 1)
    w[1] += 5 * w[1].abs().amax()
    w[2] -= 5 * w[2].abs().amax()
    d = assert_exact(w.to(dtype), bits, gs)
    if dtype == torch.float32 and bits == 8:  # sanity: 8-bit is accurate (above the 1e-7 scale floor)
        err = ((d - w).abs().amax(-1) / w.abs().amax(-1))[:, 3:]
        assert float(err.max()) < 0.01


@pytest.mark.mlx
@pytest.mark.parametrize("shape", [(1, 32), (5, 96), (3, 2, 128), (2, 3, 4, 256), (11, 640)])
@pytest.mark.parametrize("bits", BITS)
def test_shapes(shape, bits):
    g = torch.Generator().manual_seed(len(shape) + bits)
    w = torch.randn(*shape, generator=g, dtype=torch.float32).to(torch.bfloat16)
    assert_exact(w, bits, 32)


def _special_groups(gs):
    """Groups that stress the scale/bias edge handling: constant, zero, huge, tiny, one-signed."""
    rows = [
        torch.zeros(gs),
        torch.full((gs,), 0.5),
        torch.full((gs,), -3.0),
        torch.full((gs,), 1e4),
        torch.full((gs,), -1e4),
        torch.full((gs,), 1e-8),
        torch.linspace(-1e4, 1e4, gs),
        torch.linspace(1e-8, 2e-8, gs),
        torch.linspace(-2e-8, 1e-8, gs),
        -torch.rand(gs, generator=torch.Generator().manual_seed(1)) - 0.1,   # negative only
        torch.rand(gs, generator=torch.Generator().manual_seed(2)) + 0.1,    # positive only
        torch.linspace(-1.0, 3.0, gs),   # max edge dominates (negated scale)
        torch.linspace(-3.0, 1.0, gs),   # min edge dominates
        torch.linspace(-1.0, 1.0, gs),   # tie |min| == |max|
        torch.cat([torch.zeros(gs - 1), torch.tensor([1e4])]),
        torch.cat([torch.zeros(gs - 1), torch.tensor([-1e-8])]),
        torch.cat([torch.full((gs - 1,), 1e-8), torch.tensor([1e4])]),
    ]
    return torch.stack(rows)


@pytest.mark.mlx
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("gs", GROUPS)
def test_special_groups(dtype, bits, gs):
    w = _special_groups(gs).repeat(1, 2)  # two groups per row
    assert_exact(w.to(dtype), bits, gs)


def test_constant_and_zero_groups_roundtrip():
    w = torch.stack([torch.zeros(64), torch.full((64,), 0.25), torch.full((64,), -2.0)])
    for bits in BITS:
        wq, s, b = quantize(w, bits, 64)
        assert torch.equal(dequantize(wq, s, b, bits, 64), w)


@pytest.mark.mlx
def test_chunked_processing_matches(monkeypatch):
    w = torch.randn(40, 256, dtype=torch.float32).to(torch.bfloat16)
    ref = quantize(w, 5, 64)
    monkeypatch.setattr(Q, "_CHUNK", 300)  # forces one row per chunk
    out = quantize(w, 5, 64)
    for a, b in zip(ref, out):
        assert torch.equal(a.view(torch.int32) if a.dtype == torch.uint32 else a,
                           b.view(torch.int32) if b.dtype == torch.uint32 else b)
    assert torch.equal(dequantize(*out, 5, 64), dequantize(*ref, 5, 64))
    assert_exact(w, 5, 64)


def test_packing_layout():
    """Code k of a row sits at bits [k*bits, (k+1)*bits) of one little-endian bit stream."""
    for bits in BITS:
        n = (1 << bits) - 1
        codes = (torch.arange(64) * 37) % (n + 1)
        codes[0], codes[1] = 0, n
        w = (codes - n).float().view(1, 64)  # range [-n, 0]: scale 1, bias -n, code = w + n
        wq, s, b = quantize(w, bits, 64)
        stream = np.unpackbits(wq.numpy().view(np.uint8), bitorder="little").reshape(64, bits)
        got = (stream * (1 << np.arange(bits))).sum(-1)
        assert np.array_equal(got, codes.numpy()), bits


@pytest.mark.mlx
def test_safetensors_roundtrip_uint32(tmp_path):
    from safetensors.torch import load_file, save_file

    w = torch.randn(8, 128).to(torch.bfloat16)
    wq, s, b = quantize(w, 6, 32)
    path = tmp_path / "q.safetensors"
    save_file({"w.weight": wq, "w.scales": s, "w.biases": b}, str(path))
    back = load_file(str(path))
    assert back["w.weight"].dtype == torch.uint32
    assert torch.equal(back["w.weight"].view(torch.int32), wq.view(torch.int32))
    m = mx.load(str(path))
    assert m["w.weight"].dtype == mx.uint32
    md = mx.dequantize(m["w.weight"], m["w.scales"], m["w.biases"], group_size=32, bits=6)
    assert torch.equal(to_t(md), dequantize(wq, s, b, 6, 32).float())


def test_nbytes():
    for bits in BITS:
        for gs in GROUPS:
            wq, s, b = quantize(torch.randn(4, 2, 256).to(torch.float16), bits, gs)
            real = wq.numel() * 4 + s.numel() * 2 + b.numel() * 2
            assert quantized_nbytes((4, 2, 256), bits, gs) == real
    # 4-bit g64 with 2-byte scales is 4.5 bits per weight
    assert quantized_nbytes((4096, 4096), 4, 64) * 8 / (4096 * 4096) == 4.5
    assert quantized_nbytes((64, 64), 8, 32, scale_bytes=4) == 64 * 64 + 2 * 128 * 4


def test_errors_name_the_tensor():
    with pytest.raises(MixqError, match="model.x.weight.*100.*group size 64"):
        quantize(torch.randn(4, 100), 4, 64, name="model.x.weight")
    bad = torch.randn(4, 64)
    bad[1, 3] = float("nan")
    with pytest.raises(MixqError, match="lm_head.weight.*NaN"):
        quantize(bad, 4, 64, name="lm_head.weight")
    bad[1, 3] = float("inf")
    with pytest.raises(MixqError, match="NaN or Inf"):
        quantize(bad, 4, 64)
    with pytest.raises(MixqError, match="2 dimensions"):
        quantize(torch.randn(64), 4, 64, name="model.norm.weight")
    with pytest.raises(MixqError, match="bits=7"):
        quantize(torch.randn(4, 64), 7, 64)
    with pytest.raises(MixqError, match="group_size=16"):
        quantize(torch.randn(4, 64), 4, 16)
    with pytest.raises(MixqError, match="dtype"):
        quantize(torch.randn(4, 64, dtype=torch.float64), 4, 64)
    wq, s, b = quantize(torch.randn(4, 64), 4, 64)
    with pytest.raises(MixqError, match="does not match"):
        dequantize(wq, s, b, 4, 32)


def test_nan_inf_found_in_any_chunk(monkeypatch):
    """Finiteness is checked per group (max/min) in every chunk, not only the first."""
    monkeypatch.setattr(Q, "_CHUNK", 128)  # one row per chunk
    for bad in (float("nan"), float("inf"), float("-inf")):
        for dtype in DTYPES:
            w = torch.randn(6, 128).to(dtype)
            w[5, 77] = bad
            with pytest.raises(MixqError, match="layer.w.*NaN or Inf"):
                quantize(w, 4, 32, name="layer.w")


def test_input_untouched_and_threads_restored():
    w = torch.randn(9, 256)  # float32: the working copy must not alias the input
    ref = w.clone()
    before = torch.get_num_threads()
    out = quantize(w, 3, 32)
    dequantize(*out, 3, 32)
    assert torch.equal(w, ref)
    assert torch.get_num_threads() == before
    with Q.torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before

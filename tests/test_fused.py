"""The fused int4 path of generation (mixq.eval.packed.FusedInt4, `fuse_int4`): torch's CPU int4 kernel computes
w = (q - 8) * scale + zero; with zero = bias + 8 * scale that is MLX's affine w = q * scale + bias. Its inputs go
in as bfloat16, so it is close to, not bit-exact with, the dense engine; evaluation never takes it."""

import pytest
import torch

from mixq.eval import packed as pk
from mixq.eval.engine import load_model
from mixq.eval.packed import (
    DENSE_PATH,
    FUSED_GROUPS,
    FUSED_PATH,
    JIT_PATH,
    ROWS_PATH,
    FusedInt4,
    JitParam,
    Packed,
    fusable,
    packed_weights,
    path_lines,
    weight_paths,
)
from mixq.quant.quantize import quantize, unpack_codes
from mixq.quant.spec import GROUP_SIZES

U = 2.0 ** -8   # twice bfloat16's unit roundoff (2**-9): each bfloat16 rounding moves a value by at most U/2 of it


def _packed(n, k, g, dtype=torch.float32, seed=0) -> Packed:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)).to(dtype)
    wq, s, b = quantize(w, bits=4, group_size=g)
    return Packed(wq, s, b, 4, g)


def _bf(t):
    return t.to(torch.bfloat16).double()


@pytest.mark.parametrize("g", [g for g in FUSED_GROUPS if g in GROUP_SIZES])   # 256: the kernel's, not MLX's
@pytest.mark.parametrize("scales", [torch.float32, torch.bfloat16])
def test_fused_linear_matches_dequantized_matmul(g, scales):
    """float32 input, every group size the kernel takes, float32 or bfloat16 scales (mixq writes the source's dtype).

    The convention: given its bfloat16 inputs (x, scale, zero = bias + 8 * scale), the kernel's output is the
    real-arithmetic (q - 8) * scale + zero matmul within one bfloat16 step of the result (|err| <= U |y|; measured
    up to 0.98 U |y|, about twice the one rounding of a float32 sum: the weights themselves are not rounded to
    bfloat16, that would be ~100x further off). Against the dense engine's `x @ dense().T` (float32): on top of
    that, x, scale and zero are rounded to bfloat16 (each at most U/2 relative), so per output
    |err| <= U * (|x| @ (|w| + 2 |zero|).T + |y|): |x| @ |w| bounds x's rounding, |(q - 8) scale| <= |w| + |zero|
    the scale's and |zero| the zero's."""
    n, k = 48, 2 * 256
    p = _packed(n, k, g, scales)
    x = torch.randn(3, 5, k, generator=torch.Generator().manual_seed(1))
    y = FusedInt4.of(p)(x)
    assert y.shape == (3, 5, n) and y.dtype == torch.float32

    q = unpack_codes(p.wq, 4).double()
    s, b = p.scales.double(), p.biases.double()
    zero = _bf(b + 8 * s).repeat_interleave(g, 1)
    exact = _bf(x) @ ((q - 8) * _bf(s).repeat_interleave(g, 1) + zero).T
    assert ((y.double() - exact).abs() <= U * exact.abs() + 1e-4).all()

    w = p.dense().float()
    ref = x @ w.T
    bound = U * (x.abs() @ (w.abs() + 2 * zero.float().abs()).T + ref.abs())
    err = (y - ref).abs()
    assert (err <= bound).all()
    assert 0 < err.max() < 0.05 * ref.abs().max()   # a real difference (bfloat16), far below the outputs


def test_kernel_refuses_what_fusable_refuses():
    """Group 16, N not a multiple of 16: the kernel refuses them, `fusable` does not offer them; nor bits other
    than 4, the float modes, embeddings, other devices."""
    lin = torch.nn.Linear(64, 48, bias=False)

    def jp(p, shape=None, device="cpu"):
        return JitParam("w", [p], None, shape or p.shape, device=torch.device(device))

    assert fusable(lin, jp(_packed(48, 64, 32)))
    assert not fusable(lin, jp(_packed(40, 64, 32)))      # N % 16
    p = _packed(48, 64, 32)
    p16 = Packed(p.wq, p.scales.repeat_interleave(2, 1), p.biases.repeat_interleave(2, 1), 4, 16)  # no MLX affine spec
    assert not fusable(lin, jp(p16))
    codes = unpack_codes(p16.wq, 4).to(torch.int32)
    w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    with pytest.raises(RuntimeError, match="qGroupSize"):
        torch.ops.aten._weight_int4pack_mm_for_cpu(torch.randn(1, 64, dtype=torch.bfloat16), w, 16,
                                                   torch.zeros(4, 48, 2, dtype=torch.bfloat16))
    wq, s, b = quantize(torch.randn(48, 64), bits=6, group_size=32)
    assert not fusable(lin, jp(Packed(wq, s, b, 6, 32)))
    for mode, g in (("mxfp4", 32), ("nvfp4", 16)):
        wq, s, b = quantize(torch.randn(48, 64), bits=4, group_size=g, mode=mode)
        assert not fusable(lin, jp(Packed(wq, s, b, 4, g, extra={"mode": mode})))
    assert not fusable(torch.nn.Embedding(48, 64), jp(_packed(48, 64, 32)))
    assert not fusable(lin, jp(_packed(48, 64, 32), device="meta"))


def _steps(lm, ids, tokens):
    """Logits after the prompt `ids` and after each of `tokens` fed one at a time on the KV cache (a decode)."""
    from mixq.infer.generate import TorchSession

    s = TorchSession(lm.model, lm.tokenizer)
    with torch.no_grad():
        return torch.stack([s.prefill(ids + tokens[:i]) for i in range(len(tokens) + 1)])


_LOADED: dict = {}


def _q4(tiny_model, arch):
    """A tiny `arch` at q4-hi: the dense engine, and generation's load with --max-memory 0 (fused), made once."""
    from mixq.infer.generate import load

    if arch not in _LOADED:
        ref = f"{tiny_model(arch)}@q4-hi"
        dense = load_model(ref, packed=False, progress=False)
        _LOADED[arch] = (dense, *load(ref, backend="torch", max_memory=0))
    return _LOADED[arch]


@pytest.fixture
def llama_q4(tiny_model):
    return _q4(tiny_model, "llama")


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3_text"])   # tied head; q/k/v biases, untied; scaled
def test_fused_decode_close_to_dense(tiny_model, arch, monkeypatch):   # embedding, tied
    """A decode with every linear layer fused (a tied head too) gives the dense engine's logits within 3% of their
    range, step after step. Logits rather than sampled tokens: a random tiny model's top two logits can be closer
    than bfloat16's rounding, so equal greedy tokens would be luck. (Measured: llama 0.7%, qwen2 0.5%, gemma3 1.2%;
    each fused layer rounds its input and output to bfloat16, up to 0.4% of an output, and ~30 such layers feed the
    logits.) During the decode no weight is dequantized: only the embedding's rows of the tokens looked up."""
    dense, model, tok = _q4(tiny_model, arch)
    state = packed_weights(model)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(state.fused) == len(linears) > 8 and not [h for h in state.hooks if not h.rows]
    ids = tok("The quick brown fox")["input_ids"]
    tokens = [int(t) for t in torch.randint(0, 300, (6,), generator=torch.Generator().manual_seed(0))]
    want = _steps(dense, ids, tokens)

    rows = []
    real = pk.dequantize
    monkeypatch.setattr(pk, "dequantize", lambda wq, *a, **kw: rows.append(wq.shape[0]) or real(wq, *a, **kw))
    got = _steps(type("LM", (), {"model": model, "tokenizer": tok}), ids, tokens)
    assert set(rows) == {1} or max(rows) <= len(set(ids))   # embedding rows only, never a weight
    err = (got - want).abs().max() / (want.max() - want.min())
    assert 0 < err < 0.03, err


def test_weight_paths_reported(tiny_model, llama_q4, capsys):
    """generate prints one line per spec and records the paths in its last response; evaluation's load fuses
    nothing (its logits stay the dense engine's, bit for bit: tests/test_packed.py)."""
    from mixq.cli import main
    from mixq.infer.generate import load, stream_generate

    _, model, tok = llama_q4
    want = {"4-bit g32 affine": {ROWS_PATH: 1, FUSED_PATH: 29}}
    assert weight_paths(model) == want
    last = list(stream_generate(model, tok, "Hello", max_tokens=3))[-1]
    assert last.weight_paths == want
    assert path_lines(want) == [f"4-bit g32 affine: 30 tensors, 1 {ROWS_PATH}, 29 {FUSED_PATH}"]

    ref = f"{tiny_model('llama')}@qx86-hi"
    assert main(["generate", ref, "-p", "Hi", "-m", "2", "--max-memory", "0", "--backend", "torch"]) == 0
    err = capsys.readouterr().err
    assert f"6-bit g32 affine: 24 tensors, {JIT_PATH}" in err     # not fusable: dequantized per forward
    assert f"8-bit g32 affine: 6 tensors, 1 {ROWS_PATH}, 5 {JIT_PATH}" in err
    model, _ = load(ref, backend="torch")    # auto: all dense but the embedding's rows
    assert weight_paths(model)["6-bit g32 affine"] == {DENSE_PATH: 24}
    mx, _ = load(f"{tiny_model('llama')}@mxfp4", backend="torch", max_memory=0)
    assert set(weight_paths(mx)["4-bit g32 mxfp4"]) == {ROWS_PATH, JIT_PATH}   # a float mode: not fused
    assert not packed_weights(load_model(f"{tiny_model('llama')}@q4-hi", progress=False, max_memory=0).model).fused

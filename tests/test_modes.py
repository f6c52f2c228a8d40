"""The float quantization modes (mxfp4, nvfp4, mxfp8) against mlx as the oracle: packed codes, scales and
dequantized values bit-exact; recipes and plans with modes; converted folders with mixed modes open in
mlx_lm.load with matching logits, read back, and evaluate exactly (MODEL@RECIPE equals the folder)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from oracles import mlx_logits, rel_err, torch_logits
from tiny_models import ARCHS

from mixq.errors import MixqError
from mixq.quant import quantize as Q
from mixq.quant.artifact import module_spec, read_artifact
from mixq.quant.plan import plan_model
from mixq.quant.quantize import dequantize, quantize
from mixq.quant.recipe import load_recipe, parse_recipe, uniform_recipe
from mixq.quant.spec import FLOAT_MODES, Spec, quantized_nbytes, spec_error
from mixq.quant.tensors import TensorInfo

try:
    import mlx.core as mx
except ImportError:  # tests that need it are marked mlx and skipped
    mx = None

torch.set_num_threads(2)
MODES = [(m, *FLOAT_MODES[m]) for m in ("mxfp4", "nvfp4", "mxfp8")]   # (mode, bits, group_size)
MODE_IDS = [m for m, _, _ in MODES]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
OUT_DTYPES = [None, torch.float32, torch.float16, torch.bfloat16]


def _mx_dtype(dt):
    return {torch.float32: mx.float32, torch.float16: mx.float16, torch.bfloat16: mx.bfloat16}[dt]


def to_mx(t):
    return mx.array(t.float().numpy()).astype(_mx_dtype(t.dtype))


def to_t(a):
    return torch.from_numpy(np.array(a.astype(mx.float32)))


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, NaN where the other has NaN, and the same sign of zero."""
    a, b = a.float(), b.float()
    return bool(((a == b) & (torch.signbit(a) == torch.signbit(b)) | (a.isnan() & b.isnan())).all())


def assert_exact(w, mode, bits, gs):
    """Our quantize/dequantize equal mx.quantize/mx.dequantize (every output dtype) on `w`."""
    wq, s, b = quantize(w, bits, gs, mode=mode)
    mq, ms = mx.quantize(to_mx(w), group_size=gs, bits=bits, mode=mode)
    assert b is None and wq.dtype == torch.uint32 and s.dtype == torch.uint8
    assert tuple(wq.shape) == tuple(mq.shape) and tuple(s.shape) == tuple(ms.shape)
    assert np.array_equal(wq.numpy(), np.array(mq)), f"codes differ ({w.dtype}, {mode})"
    assert np.array_equal(s.numpy(), np.array(ms)), f"scales differ ({w.dtype}, {mode})"
    for dt in OUT_DTYPES:
        d = dequantize(wq, s, None, bits, gs, mode=mode, dtype=dt)
        kw = {} if dt is None else {"dtype": _mx_dtype(dt)}
        md = mx.dequantize(mq, ms, None, group_size=gs, bits=bits, mode=mode, **kw)
        assert d.dtype == (dt or torch.bfloat16) and d.shape == w.shape
        assert same(d, to_t(md)), f"dequantized values differ ({w.dtype} -> {dt}, {mode})"
    return dequantize(wq, s, None, bits, gs, mode=mode, dtype=torch.float32)


# ------------------------------------------------------------------ the arithmetic, bit-exact

@pytest.mark.mlx
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode,bits,gs", MODES, ids=MODE_IDS)
def test_random_matches_mlx(dtype, mode, bits, gs):
    g = torch.Generator().manual_seed(bits * 100 + gs)
    # rows with magnitudes from 1e-7 to 1e3 (float16: subnormal scales, underflow), some rows one-signed
    w = torch.randn(6, 9, 512, generator=g) * torch.logspace(-7, 3, 9).view(1, 9, 1)
    w[1] += 3 * w[1].abs().amax()
    w[2] -= 3 * w[2].abs().amax()
    d = assert_exact(w.to(dtype), mode, bits, gs)
    if dtype != torch.float16:  # sanity: relative error of a float format (float16 underflows at 1e-7)
        err = ((d - w.to(dtype).float()).abs().amax(-1) / w.abs().amax(-1))
        if mode == "nvfp4":  # no global scale: E4M3 scales flush groups with max |w| < 6 * 2**-10 to zero
            assert not d[0, :4].any()                   # and saturate at 448: |w| > 6 * 448 is clipped
            err = err[[0, 3, 4, 5], 5:8]
        assert float(err.max()) < (0.34 if bits == 4 else 0.07)


@pytest.mark.mlx
@pytest.mark.parametrize("shape", [(2, 32), (5, 96), (3, 2, 128), (2, 3, 4, 256), (11, 640), (4, 4096)])
@pytest.mark.parametrize("mode,bits,gs", MODES, ids=MODE_IDS)
def test_shapes(shape, mode, bits, gs):
    g = torch.Generator().manual_seed(len(shape) + bits)
    w = torch.randn(*shape, generator=g).to(torch.bfloat16)
    assert_exact(w, mode, bits, gs)


def _special_rows(gs):
    """Groups that stress the scale and rounding edges: zeros, huge, tiny (down to float32 subnormals, where the
    E8M0 byte wraps), exact powers of two, every E2M1 tie and midpoint, signed zeros, one-signed groups."""
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 5.5])
    rows = [
        torch.zeros(gs), -torch.zeros(gs),
        torch.full((gs,), 1e-30), torch.full((gs,), 1e-38), torch.full((gs,), 1e-40), torch.full((gs,), 1e-45),
        torch.full((gs,), 2.0 ** -126 * 6), torch.full((gs,), 2.0 ** -127 * 6), torch.full((gs,), 2.0 ** -128 * 6),
        torch.full((gs,), 3e38), torch.full((gs,), -1e30), torch.full((gs,), 2.0 ** 127 * 0.75),
        torch.full((gs,), 6e4), torch.full((gs,), -1e-8), torch.full((gs,), 448.0), torch.full((gs,), 2688.0),
        torch.linspace(-1, 1, gs), torch.linspace(-3e4, 1e-3, gs), torch.linspace(1e-8, 2e-8, gs),
        torch.cat([torch.zeros(gs - 1), torch.tensor([1e4])]),
        torch.cat([torch.full((gs - 1,), -1e-9), torch.tensor([1.0])]),       # tiny negatives: signed zeros
        (ties.repeat(gs // 16) * torch.tensor([1.0, -1.0]).repeat(gs // 2)),   # ties at scale 1 (amax 6)
        (ties.repeat(gs // 16) * 0.375),                                      # ties at a non-power-of-two scale
        -torch.rand(gs, generator=torch.Generator().manual_seed(1)) - 0.1,
        torch.rand(gs, generator=torch.Generator().manual_seed(2)) * 1e-3,
    ]
    return torch.stack(rows)


@pytest.mark.mlx
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode,bits,gs", MODES, ids=MODE_IDS)
def test_special_groups(dtype, mode, bits, gs):
    w = _special_rows(gs).repeat(1, 2).to(dtype)   # two groups per row
    w = w[torch.isfinite(w).all(1)]                 # float16 turns the huge rows into inf (refused, below)
    if mode == "nvfp4":
        w = w[w.abs().amax(1) <= Q._NVFP4_MAX]
    if w.shape[0] % 2:                              # mlx's nvfp4 CPU kernel needs a multiple of 32 weights
        w = w[:-1]
    assert_exact(w, mode, bits, gs)


@pytest.mark.mlx
@pytest.mark.parametrize("mode,bits,gs", MODES, ids=MODE_IDS)
def test_every_code_and_scale_byte_dequantizes_like_mlx(mode, bits, gs):
    """All 256 scale bytes (E8M0 0 = 2**-127, 255 = inf; E4M3 with NaN) times every code, in every dtype."""
    n_codes = 1 << bits
    codes = torch.arange(n_codes, dtype=torch.int32).repeat(max(1, gs // n_codes)).to(torch.uint8)  # >= one group
    if bits == 4:
        packed = (codes[0::2] | (codes[1::2] << 4)).contiguous()
    else:
        packed = codes
    groups = packed.numel() * 8 // bits // gs
    wq = packed.view(torch.uint32).view(1, -1).repeat(256, 1)
    s = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(256, 1).repeat(1, groups)
    for dt in OUT_DTYPES:
        d = dequantize(wq, s, None, bits, gs, mode=mode, dtype=dt)
        kw = {} if dt is None else {"dtype": _mx_dtype(dt)}
        md = mx.dequantize(mx.array(wq.numpy()), mx.array(s.numpy()), None, group_size=gs, bits=bits, mode=mode, **kw)
        assert same(d, to_t(md)), (mode, dt)


@pytest.mark.mlx
def test_chunked_processing_matches(monkeypatch):
    w = torch.randn(40, 256).to(torch.bfloat16)
    for mode, bits, gs in MODES:
        ref = quantize(w, bits, gs, mode=mode)
        monkeypatch.setattr(Q, "_CHUNK", 300)  # one row per chunk
        out = quantize(w, bits, gs, mode=mode)
        monkeypatch.undo()
        assert torch.equal(ref[0].view(torch.int32), out[0].view(torch.int32)) and torch.equal(ref[1], out[1])
        assert torch.equal(dequantize(*out, bits, gs, mode=mode), dequantize(*ref, bits, gs, mode=mode))
        assert_exact(w, mode, bits, gs)


def test_e2m1_rounding_and_packing():
    """E2M1: nearest magnitude, ties toward zero, no sign on a zero code; code k at bits [4k, 4k + 4)."""
    x = torch.tensor([6.0, 0.25, 0.26, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.01, -0.2, -0.0, -1.0, -6.0, 0.5, 3.0])
    wq, s, _ = quantize(x.view(1, 16).repeat(2, 2), 4, 32, mode="mxfp4")      # amax 6: scale 2**0
    assert int(s[0, 0]) == 127
    nib = wq.view(torch.uint8)[0]
    codes = torch.stack([nib & 15, nib >> 4], -1).flatten()[:16].tolist()
    assert codes == [7, 0, 1, 1, 2, 3, 4, 5, 6, 7, 0, 0, 10, 15, 1, 5]
    d = dequantize(wq, s, None, 4, 32, mode="mxfp4", dtype=torch.float32)[0, :16]
    assert d.tolist() == [6, 0, 0.5, 0.5, 1, 1.5, 2, 3, 4, 6, 0, 0, -1, -6, 0.5, 3]


def test_scale_rules():
    """E8M0: smallest power of two >= amax / max (zero group: 2**0), byte n + 127 (wrapping below 2**-127)."""
    def byte(v, mode="mxfp4", dtype=torch.float32):
        bits, gs = FLOAT_MODES[mode]
        w = torch.zeros(2, gs)
        w[:, 0] = v
        return int(quantize(w.to(dtype), bits, gs, mode=mode)[1][0, 0])
    assert byte(6.0) == 127 and byte(6.01) == 128 and byte(3.0) == 126 and byte(0.0) == 127
    assert byte(448.0, "mxfp8") == 127 and byte(449.0, "mxfp8") == 128
    assert byte(2.0 ** -127 * 6) == 0 and byte(2.0 ** -128 * 6) == 255              # wraps, as mlx
    assert byte(1e-5, "mxfp8", torch.float16) == 127                            # 1e-5 / 448 underflows in float16
    e4m3 = lambda v: float(torch.tensor([v]).to(torch.float8_e4m3fn).float())  # noqa: E731
    assert byte(6.0, "nvfp4") == 0x38 and byte(0.001, "nvfp4") == 0 and byte(1e4, "nvfp4") == 0x7E
    assert torch.tensor([byte(2.25, "nvfp4")], dtype=torch.uint8).view(torch.float8_e4m3fn).item() == e4m3(0.375)


def test_sizes_per_mode():
    for mode, bits, gs in MODES:
        wq, s, b = quantize(torch.randn(4, 2, 256), bits, gs, mode=mode)
        assert b is None
        assert quantized_nbytes((4, 2, 256), bits, gs, 4, mode) == wq.numel() * 4 + s.numel()
    assert quantized_nbytes((4096, 4096), 4, 32, 2, "mxfp4") * 8 / 4096 ** 2 == 4.25
    assert quantized_nbytes((4096, 4096), 4, 16, 2, "nvfp4") * 8 / 4096 ** 2 == 4.5
    assert quantized_nbytes((4096, 4096), 8, 32, 2, "mxfp8") * 8 / 4096 ** 2 == 8.25
    assert quantized_nbytes((64, 64), 4, 64) == 64 * 64 // 2 + 2 * 64 * 2      # affine unchanged


def test_errors_name_the_tensor():
    w = torch.randn(4, 64)
    with pytest.raises(MixqError, match="blk.w.*mode mxfp4 takes bits = 4 and group_size = 32 only"):
        quantize(w, 4, 64, mode="mxfp4", name="blk.w")
    with pytest.raises(MixqError, match="mode 'fp4' is not one of"):
        quantize(w, 4, 32, mode="fp4")
    with pytest.raises(MixqError, match="nvfp4.*group_size = 16 only"):
        quantize(w, 4, 32, mode="nvfp4")
    bad = w.clone()
    bad[2, 5] = float("nan")
    for mode, bits, gs in MODES:
        with pytest.raises(MixqError, match="lm_head.weight.*NaN or Inf"):
            quantize(bad, bits, gs, mode=mode, name="lm_head.weight")
    with pytest.raises(MixqError, match="NaN or Inf"):
        quantize(torch.full((2, 32), float("-inf")), 8, 32, mode="mxfp8")
    with pytest.raises(MixqError, match="x.w.*above 4.29e\\+09.*nvfp4"):
        quantize(torch.full((2, 16), 1e10), 4, 16, mode="nvfp4", name="x.w")
    with pytest.raises(MixqError, match="last dimension 48.*group size 32"):
        quantize(torch.randn(2, 48), 4, 32, mode="mxfp4")
    wq, s, _ = quantize(w, 4, 32, mode="mxfp4")
    with pytest.raises(MixqError, match="has no biases"):
        dequantize(wq, s, torch.zeros(4, 2), 4, 32, mode="mxfp4")
    with pytest.raises(MixqError, match="does not match"):
        dequantize(wq, s[:, :1], None, 4, 32, mode="mxfp4")
    with pytest.raises(MixqError, match="uint8"):
        dequantize(wq, s.float(), None, 4, 32, mode="mxfp4")
    a = quantize(w, 4, 32)
    with pytest.raises(MixqError, match="needs biases"):
        dequantize(a[0], a[1], None, 4, 32)


def test_input_untouched_affine_unchanged():
    w = torch.randn(8, 128)
    w0 = w.clone()
    for mode, bits, gs in MODES:
        quantize(w, bits, gs, mode=mode)
        assert torch.equal(w, w0)
    # the affine path is the default and ignores no argument it had before
    a, b = quantize(w, 4, 64), quantize(w, 4, 64, mode="affine")
    assert all(torch.equal(x.view(torch.int32) if x.dtype == torch.uint32 else x,
                           y.view(torch.int32) if y.dtype == torch.uint32 else y) for x, y in zip(a, b))
    assert torch.equal(dequantize(*a, 4, 64), dequantize(*b, 4, 64, mode="affine"))
    assert dequantize(*a, 4, 64, dtype=torch.float32).dtype == torch.float32


# ------------------------------------------------------------------ specs, recipes, plans

def test_spec_defaults_and_text():
    assert Spec(6, 32) == Spec(6, 32, "affine") and str(Spec(6, 32)) == "6-bit g32"
    assert str(Spec(4, 32, "mxfp4")) == "mxfp4" and Spec(4, 32, "mxfp4") != Spec(4, 32)
    assert Spec(8, 32, "mxfp8").config() == {"group_size": 32, "bits": 8, "mode": "mxfp8"}
    assert Spec(8, 32).config() == {"group_size": 32, "bits": 8}
    assert spec_error(4, 32, "mxfp4") is None and spec_error(8, 16, "nvfp4")
    assert spec_error(6, 64) is None and spec_error(7, 64) and spec_error(4, 16)


def test_recipe_modes():
    r = parse_recipe('[recipe]\nname = "m"\nmode = "mxfp4"\n[[rule]]\npattern = "*.v_proj"\nmode = "mxfp8"\n'
                     '[[rule]]\npattern = "*.o_proj"\nbits = 8\n[[rule]]\npattern = "*.q_proj"\nmode = "nvfp4"\n'
                     'bits = 4\ngroup_size = 16\n[[rule]]\npattern = "*.k_proj"\nbits = 6\nmode = "affine"\n')
    assert r.default == Spec(4, 32, "mxfp4")
    assert r.spec_for("model.layers.0.self_attn.v_proj", n_layers=2) == Spec(8, 32, "mxfp8")
    assert r.spec_for("model.layers.0.self_attn.o_proj", n_layers=2) == Spec(8, 32)     # affine, group 32
    assert r.spec_for("model.layers.0.self_attn.q_proj", n_layers=2) == Spec(4, 16, "nvfp4")
    assert r.spec_for("model.layers.0.self_attn.k_proj", n_layers=2) == Spec(6, 32)
    nv = parse_recipe('[recipe]\nmode = "nvfp4"\n[[rule]]\npattern = "x"\nbits = 8\n')
    assert nv.rules[0].spec == Spec(8, 64)          # nvfp4's group 16 is no affine group: 64
    assert uniform_recipe(8, 32, "mxfp8").default == Spec(8, 32, "mxfp8")


@pytest.mark.parametrize("text,msg", [
    ('[recipe]\nmode = "mxfp4"\nbits = 8\n', r"\[recipe\]: mode mxfp4 takes bits = 4 and group_size = 32 only"),
    ('[recipe]\nbits = 4\n[[rule]]\npattern = "*.mlp.*"\nmode = "nvfp4"\ngroup_size = 32\n',
     r"rule 1 \(\*\.mlp\.\*\): mode nvfp4 takes bits = 4 and group_size = 16 only .*group_size = 32"),
    ('[recipe]\nbits = 4\n[[rule]]\npattern = "lm_head"\nmode = "fp8"\n', r"rule 1 \(lm_head\): mode 'fp8' not in"),
    ('[recipe]\nbits = 4\n[[rule]]\npattern = "lm_head"\nmode = "mxfp8"\nkeep = true\n', "keep = true or"),
    ('[recipe]\nbits = 4\n[[rule]]\npattern = "x"\nmode = "affine"\n', r"rule 1 \(x\): needs bits"),
    ('[recipe]\nmode = 4\n', "mode 4 not in"),
])
def test_bad_mode_is_one_line_error_naming_the_rule(text, msg):
    with pytest.raises(MixqError, match=msg) as e:
        parse_recipe(text, "r.toml")
    assert "\n" not in str(e.value) and str(e.value).startswith("r.toml")


def test_builtin_mode_recipes():
    assert load_recipe("mxfp4").default == Spec(4, 32, "mxfp4")
    assert load_recipe("nvfp4").default == Spec(4, 16, "nvfp4")
    assert load_recipe("mxfp8").default == Spec(8, 32, "mxfp8")
    r = load_recipe("qx86-mx")
    assert r.default == Spec(4, 32, "mxfp4") and "qx86-hi" in r.text and "ours" in r.text
    n = 8
    assert r.spec_for("model.embed_tokens", n_layers=n) == Spec(8, 32, "mxfp8")
    assert r.spec_for("lm_head", n_layers=n) == Spec(8, 32, "mxfp8")
    assert r.spec_for("model.layers.4.self_attn.v_proj", n_layers=n) == Spec(8, 32, "mxfp8")
    assert r.spec_for("model.layers.5.self_attn.v_proj", n_layers=n) == Spec(4, 32, "mxfp4")
    assert r.spec_for("model.layers.5.mlp.gate", n_layers=n) == Spec(8, 32)


def _llama_infos(n_layers=2, hidden=128, inter=256, vocab=320, head=True):
    ts = [TensorInfo("model.embed_tokens.weight", (vocab, hidden), "bfloat16"),
          TensorInfo("model.norm.weight", (hidden,), "bfloat16")]
    if head:
        ts.append(TensorInfo("lm_head.weight", (vocab, hidden), "bfloat16"))
    for i in range(n_layers):
        p = f"model.layers.{i}"
        ts += [TensorInfo(f"{p}.self_attn.{m}.weight", (hidden, hidden), "bfloat16") for m in ("q_proj", "o_proj")]
        ts += [TensorInfo(f"{p}.mlp.gate_proj.weight", (inter, hidden), "bfloat16"),
               TensorInfo(f"{p}.mlp.down_proj.weight", (hidden, inter), "bfloat16"),
               TensorInfo(f"{p}.input_layernorm.weight", (hidden,), "bfloat16")]
    return ts


def test_plan_with_modes():
    infos = _llama_infos()
    plan = plan_model(infos, "qx86-mx", {"num_hidden_layers": 2})
    by = {t.name: t for t in plan.tensors}
    emb, up = by["model.embed_tokens.weight"], by["model.layers.1.mlp.gate_proj.weight"]
    assert emb.spec == Spec(8, 32, "mxfp8") and emb.nbytes == 320 * 128 + 320 * 128 // 32
    assert up.spec == Spec(4, 32, "mxfp4") and up.nbytes == 256 * 128 // 2 + 256 * 128 // 32
    qc = plan.quantization_config()
    assert (qc["bits"], qc["group_size"], qc["mode"]) == (4, 32, "mxfp4")
    assert qc["lm_head"] == {"group_size": 32, "bits": 8, "mode": "mxfp8"}
    assert "model.layers.1.mlp.gate_proj" not in qc
    assert plan.specs()["lm_head.weight"] == {"bits": 8, "group_size": 32, "mode": "mxfp8"}
    rows = {r["path"]: r for r in plan.table_rows()}
    assert rows["lm_head.weight"]["mode"] == "mxfp8" and rows["model.norm.weight"]["mode"] is None
    assert set(plan.summary()["by_spec"]) == {"mxfp4", "mxfp8", "kept"}
    # an affine override inside a float-mode default is written without "mode" (mlx-lm reads it as affine)
    r = parse_recipe('[recipe]\nmode = "mxfp4"\n[[rule]]\npattern = "lm_head"\nbits = 6\n')
    qc = plan_model(infos, r, {}).quantization_config()
    assert qc["lm_head"] == {"group_size": 32, "bits": 6} and qc["mode"] == "mxfp4"
    assert module_spec(qc, "lm_head") == (6, 32, "affine")
    assert module_spec(qc, "model.layers.0.mlp.down_proj") == (4, 32, "mxfp4")
    # nvfp4: mlx 0.32 quantizes only multiples of 32 weights
    odd = [TensorInfo("model.layers.0.mlp.up_proj.weight", (3, 48), "bfloat16")]
    t = plan_model(odd, "nvfp4", {}).tensors[0]
    assert t.spec is None and "multiple of 32" in t.reason


def test_module_spec_refuses_bad_entries():
    q = {"group_size": 32, "bits": 4, "mode": "mxfp4", "a": {"group_size": 64, "bits": 4, "mode": "mxfp4"},
         "b": {"group_size": 32, "bits": 4, "mode": "int4"}}
    with pytest.raises(MixqError, match="f: a: mode mxfp4 takes bits = 4 and group_size = 32 only"):
        module_spec(q, "a", "f")
    with pytest.raises(MixqError, match="f: b: mode 'int4'"):
        module_spec(q, "b", "f")


def test_plan_show_prints_modes(capsys):
    from mixq.quant.plan_show import print_plan

    print_plan(plan_model(_llama_infos(), "qx86-mx", {"num_hidden_layers": 2}), source="x")
    out = capsys.readouterr().out
    assert "mode" in out and "mxfp8" in out and "mxfp4" in out
    assert "share of parameters:" in out and "mxfp4 " in out


# ------------------------------------------------------------------ converted folders

TOKENS = [[5, 17, 42, 99, 3, 250, 7, 12, 64, 31, 200, 11]]


@pytest.mark.mlx
@pytest.mark.parametrize("arch_name", ARCHS)
def test_mixed_mode_folder_logits_match(tiny_model, tmp_path, arch_name):
    """qx86-mx (mxfp4 + mxfp8 + affine routers) opens in mlx_lm.load and gives the logits torch gives on our
    dequantized weights; every stored tensor is byte-for-byte mx.quantize's."""
    from mixq.quant.convert import convert

    src = tiny_model(arch_name)
    out = convert(src, tmp_path / "out", recipe="qx86-mx", progress=False)
    art = read_artifact(out)
    modes = {t.mode for t in art.tensors if t.bits}
    assert {"mxfp4", "mxfp8"} <= modes and art.size_bytes == sum(t.nbytes for t in art.tensors)
    assert (art.default_spec, art.default_mode) == ((4, 32), "mxfp4")
    ref = torch_logits(out, TOKENS)
    assert rel_err(mlx_logits(out, TOKENS), ref) < 1e-4, arch_name
    assert rel_err(mlx_logits(out, TOKENS, dequantized=False), ref) < 0.08, arch_name

    from mixq.quant import arch
    from mixq.quant.checkpoint import Checkpoint

    stored = {}
    for f in art.files:
        stored.update(mx.load(str(f)))
    by_name = {info.name: load for info, load in arch.mlx_tensors(Checkpoint(src))}
    for t in art.tensors:
        if not t.bits:
            continue
        w = mx.array(by_name[t.name]().float().numpy()).astype(mx.bfloat16)
        want = mx.quantize(w, group_size=t.group_size, bits=t.bits, mode=t.mode)
        suffixes = ("weight", "scales", "biases")[:len(want)]
        assert (f"{t.path}.biases" in stored) == (t.mode == "affine")
        for suffix, a in zip(suffixes, want):
            have = stored[f"{t.path}.{suffix}"]
            assert have.dtype == a.dtype and mx.array_equal(have, a).item(), (t.name, suffix)


@pytest.mark.mlx
@pytest.mark.parametrize("recipe", ["nvfp4", "mxfp8"])
def test_uniform_mode_folder_logits_match(tiny_model, tmp_path, recipe):
    from mixq.quant.convert import convert

    out = convert(tiny_model("qwen3"), tmp_path / recipe, recipe=recipe, progress=False)
    art = read_artifact(out)
    assert {t.mode for t in art.tensors if t.bits} == {recipe}
    assert art.bits_per_weight_quantized == {"nvfp4": 4.5, "mxfp8": 8.25}[recipe]
    assert rel_err(mlx_logits(out, TOKENS), torch_logits(out, TOKENS)) < 1e-4


@pytest.mark.mlx
def test_matches_mlx_lm_convert_q_mode(tiny_model, tmp_path):
    """Same tensors and quantization config as `mlx_lm.convert -q --q-mode mxfp4` / nvfp4."""
    from mlx_lm.convert import convert as mlx_convert

    from mixq.quant.convert import convert

    src = tiny_model("llama", num_hidden_layers=5, tie_word_embeddings=False)
    for mode in ("mxfp4", "nvfp4", "mxfp8"):
        ours = convert(src, tmp_path / f"ours-{mode}", recipe=mode, dtype="bfloat16", progress=False)
        theirs = tmp_path / f"theirs-{mode}"
        mlx_convert(str(src), str(theirs), quantize=True, q_mode=mode, dtype="bfloat16")
        a = mx.load(str(ours / "model.safetensors"))
        b = {}
        for f in theirs.glob("*.safetensors"):
            b.update(mx.load(str(f)))
        assert set(a) == set(b), mode
        for k in a:
            assert a[k].dtype == b[k].dtype and mx.array_equal(a[k], b[k]).item(), (mode, k)
        qa = json.loads((ours / "config.json").read_text())["quantization"]
        qb = json.loads((theirs / "config.json").read_text())["quantization"]
        assert qa == qb == {"group_size": FLOAT_MODES[mode][1], "bits": FLOAT_MODES[mode][0], "mode": mode}


def test_recipe_on_the_fly_equals_converted_folder(tiny_model, tmp_path):
    """The engine evaluates modes exactly: MODEL@RECIPE gives the converted folder's weights and logits."""
    from mixq.eval.engine import load_model
    from mixq.quant.convert import convert

    for arch_name, recipe in (("llama", "qx86-mx"), ("qwen3_moe", "nvfp4")):
        src = tiny_model(arch_name)
        out = convert(str(src), tmp_path / f"{arch_name}-{recipe}", recipe=recipe, progress=False)
        folder = load_model(str(out), progress=False)
        fly = load_model(f"{src}@{recipe}", progress=False)
        x = torch.randint(0, folder.model.config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            a, b = folder.model(x).logits, fly.model(x).logits
            base = load_model(str(src), progress=False).model(x).logits
        assert torch.equal(a, b), (arch_name, recipe)
        assert 0 < (a - base).norm() < base.norm()
        assert folder.info.size_bytes == fly.info.size_bytes == read_artifact(out).size_bytes
        assert folder.info.bits_per_weight == pytest.approx(fly.info.bits_per_weight)
        # the folder's dequantized weights are our dequantize of what is stored
        dense = load_model(str(out), progress=False, packed=False)
        with torch.no_grad():
            assert torch.equal(dense.model(x).logits, a)
        if recipe == "qx86-mx":  # the model card names the modes
            from mixq.report.card import read_folder, render_card

            card = render_card(read_folder(out))
            assert "are mxfp4 (4-bit floats, group size 32)" in card and "mxfp8 (8-bit floats, group 32)" in card


def test_artifact_refuses_scales_that_do_not_fit_the_mode(tiny_model, tmp_path):
    from mixq.quant.convert import convert

    out = convert(tiny_model("llama"), tmp_path / "out", recipe="mxfp4", progress=False)
    art = read_artifact(out)
    t = art.spec("model.layers.0.mlp.down_proj")
    assert (t.bits, t.group_size, t.mode, t.dtype) == (4, 32, "mxfp4", "uint8")
    assert t.nbytes == quantized_nbytes(t.shape, 4, 32, 2, "mxfp4")
    cfg_file = out / "config.json"
    cfg = json.loads(cfg_file.read_text())
    for q in (cfg["quantization"], cfg["quantization_config"]):
        q["mode"] = "affine"
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(MixqError, match="do not fit quantization mode affine") as e:
        read_artifact(out)
    assert "\n" not in str(e.value)

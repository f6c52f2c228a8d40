"""GPTQ and AWQ on the float modes (mxfp4, nvfp4, mxfp8): the layer output error tr(E H E^T) on the calibration
inputs is below round-to-nearest's; the stored tensors are exactly `quantize(..., mode=)`'s layout (packed codes,
uint8 scales, no biases) and dequantize as mx.dequantize does; a float-mode recipe under gptq / awq converts to a
folder mlx_lm opens with the engine's logits; a dwq method on a float-mode tensor is its start."""

from __future__ import annotations

import json

import pytest
import torch
from oracles import mlx_logits, rel_err
from test_awq import _calib, fold_only, layer0_error
from test_convert import TOKENS
from test_gptq import _default_text, _inputs, _no_shared_data, _tensors  # noqa: F401 - fixtures (the default text)

from mixq.eval.engine import load_model
from mixq.quant.prepare import prepare
from mixq.quant.quantize import dequantize, quantize
from mixq.quant.recipe import parse_recipe
from mixq.quant.spec import Spec
from mixq.tune import awq, gptq
from mixq.tune.calib import CalibConfig
from mixq.tune.dwq import DwqConfig
from mixq.tune.measure import method_round_trip
from mixq.tune.methods import convert

torch.set_num_threads(1)
CALIB = CalibConfig(samples=4, length=64)
MODES = {"mxfp4": (4, 32), "nvfp4": (4, 16), "mxfp8": (8, 32)}


def _weight(rows=48, cols=256, seed=1):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def _hessian(d=256):
    x = _inputs(d=d)
    return 2 * x.T @ x / x.shape[0], x


def _err(w, parts, mode, H):
    bits, gs = MODES[mode]
    return awq.output_error(w.float(), dequantize(*parts, bits, gs, mode=mode).float(), H)


@pytest.mark.parametrize("mode", MODES)
def test_gptq_float_error_below_rtn_same_layout(mode):
    """GPTQ's output error on the calibration inputs is below RTN's; codes and scales have quantize's shapes and
    dtypes, no biases."""
    bits, gs = MODES[mode]
    H, _ = _hessian()
    w = _weight()
    g = gptq.gptq_quantize(w, H, bits, gs, dtype=torch.bfloat16, mode=mode)
    r = quantize(w, bits, gs, mode=mode)
    assert g[2] is None and r[2] is None
    assert [(t.shape, t.dtype) for t in g[:2]] == [(t.shape, t.dtype) for t in r[:2]]
    e_g, e_r = _err(w, g, mode, H), _err(w, r, mode, H)
    assert e_g < 0.9 * e_r, (e_g, e_r)


@pytest.mark.parametrize("mode", MODES)
def test_gptq_float_identity_hessian_is_rtn(mode):
    """With no correlation to exploit (H = I), GPTQ's column loop rounds each group as quantize does: byte-identical
    (the scale from each group's max |w|, codes rounded with mlx's ties)."""
    bits, gs = MODES[mode]
    w = _weight(seed=3) * 0.02
    g = gptq.gptq_quantize(w, torch.eye(256), bits, gs, dtype=torch.bfloat16, mode=mode)
    r = quantize(w, bits, gs, mode=mode)
    assert torch.equal(g[0], r[0]) and torch.equal(g[1], r[1])


@pytest.mark.mlx
@pytest.mark.parametrize("mode", MODES)
def test_gptq_float_dequantizes_as_mlx(mode):
    """mx.dequantize reads GPTQ's codes and scales as quant/quantize.py's dequantize does (bfloat16, float32)."""
    import mlx.core as mx
    import numpy as np

    bits, gs = MODES[mode]
    H, _ = _hessian()
    wq, s, _ = gptq.gptq_quantize(_weight(), H, bits, gs, dtype=torch.bfloat16, mode=mode)
    for dt, mdt in ((torch.float32, mx.float32), (torch.bfloat16, mx.bfloat16)):
        ours = dequantize(wq, s, None, bits, gs, mode=mode, dtype=dt).float().numpy()
        theirs = mx.dequantize(mx.array(wq.numpy()), mx.array(s.numpy()), None, group_size=gs, bits=bits,
                               mode=mode, dtype=mdt)
        assert np.array_equal(np.array(theirs.astype(mx.float32)), ours)


@pytest.mark.parametrize("mode", MODES)
def test_gptq_round_trip_and_measure(mode):
    """gptq_round_trip works on float specs; measure's method_round_trip uses it (and awq's) for float candidates."""
    bits, gs = MODES[mode]
    H, x = _hessian()
    w = _weight()
    spec = Spec(bits, gs, mode)
    rt = gptq.gptq_round_trip(w, H, spec)
    assert rt.dtype == w.dtype
    assert torch.equal(method_round_trip(w, spec, "t", H), rt)
    e = {k: awq.output_error(w.float(), v.float(), H) for k, v in (
        ("gptq", rt), ("rtn", method_round_trip(w, spec, "t")),
        ("awq", method_round_trip(w, spec, "t", H, x.abs().mean(0), quant="awq")))}
    assert e["gptq"] < e["rtn"] and e["awq"] < e["rtn"], e


@pytest.mark.parametrize("mode", MODES)
def test_awq_float_scale_and_clip_below_rtn(mode):
    """AWQ's scale search (alpha 0 = quantize's RTN) and clipping search on a float mode: errors below RTN's (the
    clipping search's: each group's e H_gg e^T, never above); the clipped tensor has quantize's layout, and with no
    shrink it is quantize's, byte for byte."""
    bits, gs = MODES[mode]
    H, x = _hessian()
    w = _weight().float()
    s, err, base, alpha = awq.search_scale([(w, bits, gs, torch.bfloat16, mode)], H, x.abs().mean(0))
    rtn = quantize(w.to(torch.bfloat16), bits, gs, mode=mode)
    assert base == pytest.approx(_err(w, rtn, mode, H), rel=1e-5)
    assert err < base and alpha > 0, (err, base, alpha)
    clipped = awq.quantize_clipped(w, H, bits, gs, torch.bfloat16, mode)
    assert clipped[2] is None and [(t.shape, t.dtype) for t in clipped[:2]] == [(t.shape, t.dtype) for t in rtn[:2]]
    idx = torch.arange(256) // gs   # the search's objective: each group's own share e H_gg e^T (block diagonal)
    Hb = H * (idx[:, None] == idx[None, :])
    assert _err(w, clipped, mode, Hb) <= _err(w, rtn, mode, Hb)
    shrink = awq.clip_search(w, H, bits, gs, torch.bfloat16, grid=(1.0,), mode=mode)
    _, q, sb, z = awq.fake_quant(w, bits, gs, torch.bfloat16, shrink, mode)
    assert z is None and torch.equal(sb.reshape(48, -1), rtn[1])


@pytest.mark.parametrize("mode", ["mxfp4", "nvfp4"])
def test_awq_float_folding_keeps_logits_and_lowers_layer_error(tiny_model, mode):
    """A float-mode recipe under awq: the folded float model's logits are unchanged, scales were folded; layer 0's
    output error on the calibration inputs with AWQ's scales and clipping is below RTN's."""
    src = tiny_model("llama")
    fold_only(src, mode)
    assert layer0_error(src, "awq", mode, *MODES[mode], mode) < layer0_error(src, "rtn", mode, *MODES[mode], mode)


def test_model_output_closer_with_gptq_on_mxfp4(tiny_model, tmp_path):
    """End to end: an mxfp4 folder made by gptq and by awq has logits closer to the source's than rtn's."""
    src = tiny_model("llama")
    ids = _calib(src).ids
    errs = {}
    with torch.no_grad():
        ref = load_model(str(src), progress=False).model(ids).logits
        for method in ("rtn", "gptq", "awq"):
            out = convert(src, tmp_path / method, "mxfp4", method=method, calib=CALIB, progress=False)
            errs[method] = float((load_model(str(out), progress=False).model(ids).logits - ref).square().mean())
    assert errs["gptq"] < errs["rtn"] and errs["awq"] < errs["rtn"], errs


@pytest.mark.mlx
@pytest.mark.parametrize("arch,recipe,method", [("llama", "mxfp4", "gptq"), ("llama", "nvfp4", "gptq"),
                                                ("llama", "mxfp8", "gptq"), ("llama", "nvfp4", "awq+gptq"),
                                                ("llama", "mxfp4", "awq"), ("qwen3_moe", "nvfp4", "gptq")])
def test_float_folder_opens_in_mlx_lm(tiny_model, tmp_path, arch, recipe, method):
    """A float-mode folder made by a calibrated method (qwen3_moe: its expert stacks by GPTQ per expert too): its
    tensors carry that method, and mlx_lm.load opens it with the engine's logits."""
    out = convert(tiny_model(arch), tmp_path / "out", recipe, method=method, calib=CALIB, progress=False)
    prov = json.loads((out / "mixq_provenance.json").read_text())
    got = {t["method"] for t in prov["tensors"] if t.get("method")}
    assert got & {method, "awq (clip only)"}, got
    engine = load_model(str(out), progress=False).model(torch.tensor(TOKENS)).logits.detach().numpy()
    assert rel_err(mlx_logits(out, TOKENS), engine) < 1e-4


def test_clip_and_act_order_leave_float_tensors_plain(tiny_model, tmp_path):
    """--gptq-clip (the default) and --gptq-act-order are affine only: on an mxfp4 recipe the tensors are plain
    gptq's, and the calibration record says so."""
    src = tiny_model("llama")
    prep = prepare(src, "mxfp4", method="gptq")
    plain = gptq.gptq_tensors(prep, _calib(src), progress=False, clip=False)
    both = gptq.gptq_tensors(prep, _calib(src), progress=False, clip=True, act_order=True)
    assert plain.tensors.keys() == both.tensors.keys() and plain.tensors
    assert all(torch.equal(a, b) for n in plain.tensors for a, b in zip(plain.tensors[n][:2], both.tensors[n][:2]))
    assert "float_modes" in both.calibration and "float_modes" not in plain.calibration


def test_dwq_method_on_a_float_mode_is_its_start(tiny_model):
    """dwq tunes affine scales and biases only: a float-mode tensor planned with a dwq method gets its start method
    (gptq for gptq+dwq, rtn for dwq); affine tensors keep the dwq method; calibrated methods apply to float modes."""
    text = '[recipe]\nname = "m"\nbits = 4\ngroup_size = 64\n[[rule]]\npattern = "*.mlp.*"\nmode = "nvfp4"\n'
    src = tiny_model("llama")
    for method, start in (("gptq+dwq", "gptq"), ("dwq", "rtn"), ("awq+gptq+dwq", "awq+gptq"), ("awq", "awq")):
        plan = prepare(src, parse_recipe(text), method=method).plan
        by_mode = {}
        for tp in plan.tensors:
            if tp.spec is not None:
                by_mode.setdefault(tp.spec.mode, set()).add(tp.method)
        assert by_mode == {"affine": {method}, "nvfp4": {start}}, (method, by_mode)
    rule = parse_recipe(text.replace('mode = "nvfp4"\n', 'mode = "nvfp4"\nmethod = "gptq+dwq"\n'))
    assert {tp.method for tp in prepare(src, rule).plan.tensors if tp.spec and tp.spec.mode == "nvfp4"} == {"gptq"}


def test_gptq_dwq_on_a_mixed_recipe(tiny_model, tmp_path):
    """gptq+dwq on a recipe with nvfp4 mlp tensors: the affine tensors are tuned (method gptq+dwq), the nvfp4 ones
    are GPTQ's and say so (method gptq), byte-identical to a plain gptq convert of them."""
    text = '[recipe]\nname = "m"\nbits = 4\ngroup_size = 64\n[[rule]]\npattern = "*.mlp.*"\nmode = "nvfp4"\n'
    src = tiny_model("llama")
    cal = CalibConfig(samples=8, length=64)
    out = convert(src, tmp_path / "dwq", parse_recipe(text), method="gptq+dwq", calib=cal,
                  dwq=DwqConfig(steps=4, lr=1e-4, batch=2), progress=False)
    methods = {t["name"]: t["method"] for t in json.loads((out / "mixq_provenance.json").read_text())["tensors"]
               if t.get("method")}
    mlp = {n for n in methods if ".mlp." in n}
    assert mlp and {methods[n] for n in mlp} == {"gptq"}
    assert {m for n, m in methods.items() if n not in mlp} == {"gptq+dwq"}
    ref = _tensors(convert(src, tmp_path / "gptq", parse_recipe(text), method="gptq", calib=cal, progress=False))
    got = _tensors(out)
    assert all(torch.equal(got[k], ref[k]) for k in got if ".mlp." in k)

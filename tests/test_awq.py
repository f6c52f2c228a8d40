"""AWQ (tune/awq.py): folding the scales leaves the float model's logits unchanged; AWQ's output error on the
calibration inputs is below round-to-nearest's; awq and awq+gptq folders are plain MLX affine (mlx_lm.load, the
engine); a rule's awq touches only its tensors (and the norms its scales fold into); unfoldable tensors are listed."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from oracles import mlx_logits, rel_err
from test_convert import TOKENS
from test_gptq import _default_text, _inputs, _no_shared_data, _tensors  # noqa: F401 - fixtures (the default text)

from mixq.eval.engine import load_model
from mixq.quant.prepare import prepare
from mixq.quant.quantize import dequantize, quantize
from mixq.quant.recipe import parse_recipe
from mixq.quant.spec import Spec
from mixq.tune import awq, gptq
from mixq.tune.calib import CalibConfig, calibration
from mixq.tune.methods import convert

torch.set_num_threads(1)
CALIB = CalibConfig(samples=4, length=64)


def _calib(src):
    from transformers import AutoTokenizer

    return calibration(AutoTokenizer.from_pretrained(str(src)), CALIB)


def _ids(src):
    return _calib(src).ids


# ---------------------------------------------------------------- one weight, one group

def test_scale_search_below_rtn_on_outlier_inputs():
    """On inputs with a few large channels (as a layer's are), the chosen scale's output error is below
    round-to-nearest's, and round-to-nearest is what alpha = 0 gives (bit-exact with mx.quantize)."""
    x = _inputs()
    H = 2 * x.T @ x / x.shape[0]
    w = torch.randn(96, 256, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16).float()
    for bits in (3, 4):
        s, err, base, alpha = awq.search_scale([(w, bits, 32, torch.bfloat16, "affine")], H, x.abs().mean(0))
        rtn = dequantize(*quantize(w.to(torch.bfloat16), bits, 32), bits, 32).float()
        assert base == pytest.approx(awq.output_error(w, rtn, H), rel=1e-5)
        assert err < 0.9 * base and alpha > 0, (bits, err, base, alpha)


def test_clip_search_never_worse_and_stored_as_mlx():
    """The clipping search keeps mx.quantize's format; its output error is below plain RTN's; with no range
    worth shrinking (identity H, grid (1.0,)) it stores exactly what mx.quantize stores."""
    x = _inputs(n=512, d=128)
    H = 2 * x.T @ x / 512
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(5))
    w[:, 7] *= 5
    parts = awq.quantize_clipped(w, H, 3, 32, torch.float32)
    plain = quantize(w, 3, 32)
    assert [(t.shape, t.dtype) for t in parts] == [(t.shape, t.dtype) for t in plain]
    err = {k: awq.output_error(w, dequantize(*p, 3, 32), H) for k, p in (("clip", parts), ("rtn", plain))}
    assert err["clip"] < err["rtn"], err
    shrink = awq.clip_search(w, H, 3, 32, torch.float32, grid=(1.0,))
    _, q, s, z = awq.fake_quant(w, 3, 32, torch.float32, shrink)
    assert torch.equal(s.reshape(32, -1), plain[1]) and torch.equal(z.reshape(32, -1), plain[2])


def test_awq_gptq_vs_gptq_on_one_linear():
    """awq+gptq vs gptq on GPTQ's objective ||X W^T - X Wq^T|| (synthetic outlier inputs, 2-4 bits, 3 weights): the
    RTN-chosen scale alone helps GPTQ in some cases and hurts in others (measured: 0.94 to 1.05 times gptq's error),
    so awq+gptq keeps a scale only where GPTQ's error with it is lower; then it is never above gptq's and is
    below it somewhere."""
    x = _inputs()
    H = 2 * x.T @ x / x.shape[0]
    ratios = []
    for seed in (1, 2, 3):
        w = torch.randn(96, 256, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16).float()
        for bits in (2, 3, 4):
            weights = [(w, bits, 32, torch.bfloat16, "affine")]
            s, *_ = awq.search_scale(weights, H, x.abs().mean(0))
            plain = awq.gptq_error(weights, H, torch.ones(256))
            assert plain == pytest.approx(awq.output_error(w, dequantize(*gptq.gptq_quantize(
                w, H, bits, 32, dtype=torch.bfloat16), bits, 32).float(), H), rel=1e-5)
            ratios.append(awq.gptq_error(weights, H, s) / plain)
    assert min(ratios) < 0.97 and max(ratios) > 1.0, ratios   # why the rule is needed, and that it can gain


# ---------------------------------------------------------------- folding keeps the float model

def fold_only(src, recipe: str):
    """AWQ's scales for `recipe` searched and folded into the float32 model of `src`, nothing quantized: asserts that
    the logits stay the float model's (to float32 tolerance) and that some scale other than 1 was folded (so the
    check is not vacuous); (tensor methods, run_awq's info)."""
    prep = prepare(src, recipe, dtype="float32", method="awq")
    ids = _ids(src)
    with torch.no_grad():
        model = load_model(str(src), progress=False, packed=False).model
        before = model(ids).logits
        tensors, methods, floats, info = awq.run_awq(model, prep, ids, progress=False, quantize=False)
        after = model(ids).logits
    assert not tensors and floats
    assert any(a > 0 for a, _ in info["awq_scaled_groups"].values()), info["awq_scaled_groups"]
    assert float((after - before).norm() / before.norm()) < 1e-5
    return methods, info


@pytest.mark.parametrize("arch_name,overrides", [("llama", {}), ("llama", {"num_key_value_heads": 2}),
                                                 ("qwen2", {}), ("qwen3", {}), ("gemma3_text", {}),
                                                 ("qwen3_moe", {})])
def test_folding_keeps_float_logits(tiny_model, arch_name, overrides):
    """Scales searched and folded, nothing quantized (float32 storage, so no rounding): the logits are the float
    model's to float32 tolerance, and scales other than 1 were folded (the check is not vacuous)."""
    methods, info = fold_only(tiny_model(arch_name, **overrides), "q4")
    groups = info["awq_scaled_groups"]
    if overrides.get("num_key_value_heads") == 2:  # no GQA: o_proj's scale goes into v_proj's rows
        assert any(g.endswith("self_attn.v_proj") for g in groups) and not any(
            n.endswith("o_proj.weight") for n in info["awq_not_scaled"])
    else:
        assert all(n in info["awq_not_scaled"] for n in methods if n.endswith("o_proj.weight"))
    if arch_name == "gemma3_text":  # the mlp's inputs are pre_feedforward_layernorm's outputs, (1 + w) gains
        assert any(g.endswith("pre_feedforward_layernorm") for g in groups)
        assert not any(g.endswith("post_attention_layernorm") for g in groups)
    if arch_name == "qwen3_moe":  # experts and router: no nn.Linear, no scale; said so per tensor
        moe = [n for n in methods if ".mlp." in n]
        assert moe and all(methods[n].startswith("rtn (") for n in moe)
        assert not any(".post_attention_layernorm" in g for g in groups)


def test_fold_refused_where_the_norm_feeds_more(tiny_model):
    """A norm whose output reaches more than the linears (here also the layer output) cannot take a scale: the
    fold is undone and the linears are listed as not scaled."""

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.RMSNorm(64)
            self.proj = torch.nn.Linear(64, 64, bias=False)

        def forward(self, x):
            y = self.norm(x)
            return self.proj(y) + y

    torch.manual_seed(0)
    layer = Layer()
    x = [_inputs(n=128, d=64)[None]]
    calls = [((), {})]
    with torch.no_grad():
        stats, norm_out, outs = awq.observe(layer, {"proj": layer.proj}, {"norm": layer.norm}, x, calls)
        w0, g0 = layer.proj.weight.clone(), layer.norm.weight.clone()
        sc = awq.scale_layer(layer, {"proj": layer.proj}, {"proj": "awq"}, {"proj": (4, 32, torch.float32, "affine")},
                             stats, norm_out, x[0], calls[0], outs[0])
    assert not sc.s and "output reaches more than proj" in sc.not_scaled["proj"]
    assert torch.equal(layer.proj.weight, w0) and torch.equal(layer.norm.weight, g0)


# ---------------------------------------------------------------- quantized

@pytest.mark.parametrize("arch_name,method", [("llama", "awq"), ("llama", "awq+gptq"), ("gemma3_text", "awq"),
                                              ("gemma3_text", "awq+gptq")])
def test_layer_by_layer_same_as_whole_model(tiny_model, arch_name, method):
    """awq_tensors (one decoder layer in memory at a time: tune/gptq.py's LayerLoader) gives exactly the quantized
    tensors, folded floats, methods and record that run_awq gives on the whole float model."""
    src = tiny_model(arch_name)
    prep = prepare(src, "q4-hi", method=method)
    cal = _calib(src)
    with torch.no_grad():
        model = load_model(str(src), progress=False, packed=False).model
        tensors, methods, floats, info = awq.run_awq(model, prep, cal.ids, progress=False)
    pre = awq.awq_tensors(prep, cal, progress=False)
    assert tensors and floats and info["head"] and info["awq_scaled_groups"]
    assert pre.tensors.keys() == tensors.keys() and pre.floats.keys() == floats.keys()
    assert all(torch.equal(a, b) for n in tensors for a, b in zip(pre.tensors[n], tensors[n]))
    assert all(torch.equal(pre.floats[n], floats[n]) for n in floats)
    assert pre.methods == methods and {k: pre.calibration[k] for k in info} == info


def layer0_error(src, method, recipe="q3", bits=3, gs=64, mode="affine"):
    """||layer 0's output - the float layer's||^2 on the calibration inputs, its linears quantized (`recipe`: every
    linear at bits, gs, mode) by `method` (awq or rtn)."""
    prep = prepare(src, recipe, method="awq")
    ids = _ids(src)
    with torch.no_grad():
        model = load_model(str(src), progress=False, packed=False).model
        prefix, layers = gptq._decoder_layers(model)
        hidden, calls = gptq.capture_inputs(model, layers, ids, 4)
        layer = copy.deepcopy(layers[0])
        linears = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
        stats, norm_out, ref = awq.observe(layer, linears, awq._norms(layer), hidden, calls[0])
        s = {}
        if method == "awq":
            s = awq.scale_layer(layer, linears, dict.fromkeys(linears, "awq"),
                                dict.fromkeys(linears, (bits, gs, torch.bfloat16, mode)), stats, norm_out, hidden[0],
                                calls[0][0], ref[0]).s
        for n, m in linears.items():
            tp = next(t for t in prep.plan.tensors if t.name == f"{prefix}.0.{n}.weight")
            if method == "awq":
                sn = s.get(n, torch.ones(m.in_features))
                awq.quantize_linear(m, stats[n].H / (sn[:, None] * sn[None, :]), tp, "awq", 0.01, False)
            else:
                m.weight.copy_(dequantize(*quantize(m.weight.to(torch.bfloat16), bits, gs, mode=mode), bits, gs,
                                          mode=mode).float())
        out = [gptq._layer_output(o) for o in gptq._run_layer(layer, hidden, calls[0])]
    return float(sum((a - b).square().sum() for a, b in zip(out, ref)))


@pytest.mark.parametrize("arch_name", ["llama", "gemma3_text"])
def test_awq_layer_output_error_below_rtn(tiny_model, arch_name):
    """The decoder layer's output error on the calibration inputs (3 bits, group 64): AWQ's is below RTN's."""
    src = tiny_model(arch_name)
    e_awq, e_rtn = layer0_error(src, "awq"), layer0_error(src, "rtn")
    assert e_awq < e_rtn, (e_awq, e_rtn)


def test_model_output_closer_with_awq(tiny_model, tmp_path):
    """End to end on the calibration windows: logits closer to the source's with awq than rtn, and awq+gptq's
    compared with gptq's (recorded, asserted no worse than rtn)."""
    src = tiny_model("llama")
    ids = _ids(src)
    errs = {}
    with torch.no_grad():
        ref = load_model(str(src), progress=False).model(ids).logits
        for method in ("rtn", "awq", "gptq", "awq+gptq"):
            out = convert(src, tmp_path / method.replace("+", "_"), "q3", method=method, calib=CALIB,
                          progress=False)
            errs[method] = float((load_model(str(out), progress=False).model(ids).logits - ref).square().mean())
            if method != "rtn":   # gptq's range search (on by default) is recorded where gptq runs
                cal = json.loads((out / "mixq_provenance.json").read_text())["calibration"]
                assert cal.get("clip_search") == (True if "gptq" in method else None), (method, cal)
    assert errs["awq"] < errs["rtn"] and errs["awq+gptq"] < errs["rtn"], errs


def test_recipe_rule_awq_touches_only_its_tensors(tiny_model, tmp_path):
    """A rule's awq on the mlp changes the mlp's tensors and the norm its gate/up scale folds into, nothing else;
    a rule's awq on down_proj alone cannot fold into up_proj (rtn): clipping only, said why."""
    src = tiny_model("llama")
    text = ('[recipe]\nname = "r"\nbits = 3\ngroup_size = 32\n'
            '[[rule]]\npattern = "*.mlp.*"\nbits = 3\nmethod = "awq"\n')
    rtn = _tensors(convert(src, tmp_path / "rtn", parse_recipe(text.replace('method = "awq"\n', "")),
                           progress=False))
    out = convert(src, tmp_path / "awq", parse_recipe(text), calib=CALIB, progress=False)
    got = _tensors(out)
    assert rtn.keys() == got.keys()
    changed = {k.rsplit(".", 1)[0] for k in rtn if not torch.equal(rtn[k], got[k])}
    mlp = {k.removesuffix(".weight") for k in rtn if ".mlp." in k and k.endswith(".weight")}
    norms = {k.removesuffix(".weight") for k in rtn if k.endswith("post_attention_layernorm.weight")}
    assert changed == mlp | norms, changed ^ (mlp | norms)
    prov = json.loads((out / "mixq_provenance.json").read_text())
    methods = {t["name"]: t["method"] for t in prov["tensors"] if t["method"]}
    assert {n for n, m in methods.items() if m == "awq"} == {f"{k}.weight" for k in mlp}
    assert {n for n, m in methods.items() if m == "awq-folded"} == {f"{k}.weight" for k in norms}
    readme = (out / "README.md").read_text()
    assert "awq on 12 tensors" in readme and "awq-folded on 4 tensors" in readme
    from mixq.report.card import read_folder, render_card
    assert "awq on 12 tensors" in render_card(read_folder(out))

    down = text.replace('"*.mlp.*"', '"*.mlp.down_proj"')
    out2 = convert(src, tmp_path / "down", parse_recipe(down), calib=CALIB, progress=False)
    got2 = _tensors(out2)
    changed2 = {k.rsplit(".", 1)[0] for k in rtn if not torch.equal(rtn[k], got2[k])}
    assert changed2 and all(k.endswith("mlp.down_proj") for k in changed2), changed2
    cal = json.loads((out2 / "mixq_provenance.json").read_text())["calibration"]
    assert all("its scale would go into mlp.up_proj (method rtn)" in cal["awq_not_scaled"][n]
               for n in cal["awq_not_scaled"])
    assert len(cal["awq_not_scaled"]) == 4


@pytest.mark.mlx
@pytest.mark.parametrize("arch_name,method", [("llama", "awq"), ("qwen2", "awq"), ("gemma3_text", "awq"),
                                              ("qwen3_moe", "awq"), ("llama", "awq+gptq")])
def test_awq_folder_opens_in_mlx_lm(tiny_model, tmp_path, arch_name, method):
    """An awq folder is plain MLX affine with the folded norms: mlx_lm.load opens it; its logits are the engine's."""
    out = convert(tiny_model(arch_name), tmp_path / "out", "q4-hi", method=method, calib=CALIB, progress=False)
    prov = json.loads((out / "mixq_provenance.json").read_text())
    assert any(t["method"] == method for t in prov["tensors"])
    assert any(t["method"] == "awq-folded" for t in prov["tensors"])
    engine = load_model(str(out), progress=False).model(torch.tensor(TOKENS)).logits.detach().numpy()
    assert rel_err(mlx_logits(out, TOKENS), engine) < 1e-4


@pytest.mark.parametrize("kv_heads", [None, 2])
def test_scalable_by_shape_as_the_model_pass_finds(tiny_model, kv_heads):
    """`scalable` (measure's view, names and shapes only) leaves out exactly the linears run_awq finds no op
    before: o_proj under grouped-query attention; with as many kv heads as heads, none. `awq_round_trip` without
    a mean is the clipping search's quant read back; with one, a scale goes in (a different, lower-error quant)."""
    src = tiny_model("llama", **({"num_key_value_heads": kv_heads} if kv_heads else {}))
    prep = prepare(src, "q4", dtype="float32", method="awq")
    with torch.no_grad():
        model = load_model(str(src), progress=False, packed=False).model
        linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
        left = set(linears) - awq.scalable(linears)
        info = awq.run_awq(model, prep, _ids(src), progress=False, quantize=False)[3]
    assert left == {n.removesuffix(".weight") for n, why in info["awq_not_scaled"].items() if why == awq.NO_OP}
    assert bool(left) == (kv_heads is None)
    x = _inputs()
    H = 2 * x.T @ x / x.shape[0]
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    spec = Spec(3, 32)
    clip = awq.awq_round_trip(w, H, spec)
    assert torch.equal(clip, dequantize(*awq.quantize_clipped(w.float(), H, 3, 32, torch.bfloat16), 3, 32).float())
    scaled = awq.awq_round_trip(w, H, spec, x.abs().mean(0))
    assert awq.output_error(w.float(), scaled, H) < awq.output_error(w.float(), clip, H)
    # awq+gptq (measure's): unscaled, GPTQ's quant read back; scaled only where that lowers GPTQ's error
    gq = awq.awq_round_trip(w, H, spec, then_gptq=True)
    assert torch.equal(gq, gptq.gptq_round_trip(w, H, spec).float())
    both = awq.awq_round_trip(w, H, spec, x.abs().mean(0), then_gptq=True)
    assert awq.output_error(w.float(), both, H) <= awq.output_error(w.float(), gq, H)
    assert awq.output_error(w.float(), both, H) < awq.output_error(w.float(), scaled, H)


@pytest.mark.parametrize("mode,bits", [("affine", 4), ("nvfp4", 4), ("mxfp8", 8)])
def test_quantize_clipped_by_row_chunks_is_the_whole_tensors(monkeypatch, mode, bits):
    """The clipping quantizer runs ROWS rows at a time (bounded memory on a huge tied head): same bytes as one
    chunk, rows not a multiple of the chunk included."""
    import mixq.tune.awq as A

    torch.manual_seed(3)
    w, x = torch.randn(41, 64) * 0.05, torch.randn(256, 64)
    H = x.T @ x / 256
    gs = 16 if mode == "nvfp4" else 32
    whole = A.quantize_clipped(w, H, bits, gs, torch.bfloat16, mode)
    monkeypatch.setattr(A, "ROWS", 8)
    chunked = A.quantize_clipped(w, H, bits, gs, torch.bfloat16, mode)
    assert len(whole) == len(chunked) == 3 and (whole[2] is None) == (chunked[2] is None) == (mode != "affine")
    for a, b in zip(whole, chunked):
        assert a is None or torch.equal(a, b)

"""DWQ (tune/dwq.py): tuning the scales and biases lowers the KL to the unquantized model on the calibration text
below the start quant's; the codes are the start's (only scales and biases differ); the folder is plain MLX affine
(mlx_lm.load, the engine); a rule's dwq touches only its tensors; bad options are one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from oracles import mlx_logits, rel_err
from test_convert import TOKENS
from test_gptq import _default_text, _no_shared_data, _tensors  # noqa: F401 - fixtures (the default text)

from mixq.errors import MixqError
from mixq.eval.engine import load_model
from mixq.quant.recipe import parse_recipe
from mixq.tune import dwq
from mixq.tune.calib import CalibConfig, calibration
from mixq.tune.methods import convert

torch.set_num_threads(1)
CALIB = CalibConfig(samples=8, length=64)
FAST = dwq.DwqConfig(steps=8, lr=1e-4, batch=2)


def _ids(src):
    from transformers import AutoTokenizer

    return calibration(AutoTokenizer.from_pretrained(str(src)), CALIB).ids


def _kl(folder, src, ids) -> float:
    """Mean per-token KL(source || folder's model) on `ids`, the engine's logits."""
    with torch.no_grad():
        ref = torch.log_softmax(load_model(str(src), progress=False).model(ids).logits, -1)
        got = torch.log_softmax(load_model(str(folder), progress=False).model(ids).logits, -1)
    return float(torch.nn.functional.kl_div(got, ref, reduction="sum", log_target=True)) / ids.numel()


def _prov(folder) -> dict:
    return json.loads((folder / "mixq_provenance.json").read_text())


@pytest.mark.parametrize("method,start", [("dwq", "rtn"), ("gptq+dwq", "gptq")])
def test_dwq_lowers_kl_and_keeps_codes(tiny_model, tmp_path, method, start):
    """On the calibration windows the tuned quant's KL is below its start's; the packed codes are the start's
    bit for bit, and only scales / biases differ; provenance records the run (best held-out KL <= start's)."""
    src = tiny_model("llama")
    ids = _ids(src)
    a = convert(src, tmp_path / "start", "q3", method=None if start == "rtn" else start, calib=CALIB, progress=False)
    b = convert(src, tmp_path / "dwq", "q3", method=method, calib=CALIB, dwq=FAST, progress=False)
    assert _kl(b, src, ids) < _kl(a, src, ids)
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    changed = {k for k in ta if not torch.equal(ta[k], tb[k])}
    assert changed and all(k.endswith((".scales", ".biases")) for k in changed), changed
    rec = _prov(b)["calibration"]["dwq"]
    assert rec["steps"] == 8 and rec["batch"] == 2 and rec["lr"] == 1e-4 and rec["held_out_windows"] == [4]
    assert rec["best_heldout_kl"] < rec["start_heldout_kl"] and rec["best_step"] > 0
    assert rec["head"] == "model.embed_tokens.weight"    # tied: the embedding is the head
    methods = {t["name"]: t["method"] for t in _prov(b)["tensors"] if t["bits"]}
    assert set(methods.values()) == {method}
    assert f"{method} on {len(methods)} tensors" in (b / "README.md").read_text()


def test_never_worse_than_start(tiny_model, tmp_path):
    """A learning rate far too large makes every step worse on the held-out window: the start is kept, bit for bit,
    and the method says so."""
    src = tiny_model("llama")
    a = convert(src, tmp_path / "rtn", "q4", calib=CALIB, progress=False)
    b = convert(src, tmp_path / "dwq", "q4", method="dwq", calib=CALIB, dwq=dwq.DwqConfig(2, 1.0, 2),
                progress=False)
    ta, tb = _tensors(a), _tensors(b)
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    rec = _prov(b)["calibration"]["dwq"]
    assert rec["best_step"] == 0 and rec["best_heldout_kl"] == rec["start_heldout_kl"]
    assert all(k > rec["start_heldout_kl"] for _, k in rec["heldout_kl"][1:])


def test_weight_is_what_mlx_dequantizes():
    """The forward's weight is mx.dequantize's (quant.quantize.dequantize) of the stored scales and biases, bit for
    bit, in bfloat16 and float16; the gradient reaches the float32 masters."""
    from mixq.quant.quantize import dequantize, quantize

    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    for dt in (torch.bfloat16, torch.float16):
        parts = quantize(w.to(dt), 4, 32)
        t = dwq._tuned("x", parts, 4, 32, dt)
        with torch.no_grad():
            t.s.mul_(1.01)
            t.z.add_(1e-3)
            assert torch.equal(t.weight(), dequantize(parts[0], *t.stored(), 4, 32, dtype=torch.float32))
        with torch.enable_grad():
            t.weight().sum().backward()
        assert t.s.grad is not None and t.z.grad.abs().sum() > 0


def test_held_out_windows():
    assert dwq.held_out(2) == [1] and dwq.held_out(8) == [4] and dwq.held_out(16) == [4, 12]
    assert len(dwq.held_out(128)) == 16 and len(set(dwq.held_out(128))) == 16


def test_recipe_rule_dwq_touches_only_its_tensors(tiny_model, tmp_path):
    """A rule's dwq on down_proj changes only down_proj's scales and biases; the rest is RTN, bit-exact."""
    src = tiny_model("llama")
    text = ('[recipe]\nname = "r"\nbits = 3\ngroup_size = 32\n'
            '[[rule]]\npattern = "*.mlp.down_proj"\nbits = 3\nmethod = "dwq"\n')
    a = _tensors(convert(src, tmp_path / "rtn", parse_recipe(text.replace('method = "dwq"\n', "")), progress=False))
    out = convert(src, tmp_path / "dwq", parse_recipe(text), calib=CALIB, dwq=FAST, progress=False)
    b = _tensors(out)
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert changed and all(".mlp.down_proj." in k and k.endswith((".scales", ".biases")) for k in changed), changed
    methods = {t["name"]: t["method"] for t in _prov(out)["tensors"] if t["bits"]}
    assert {n for n, m in methods.items() if m == "dwq"} == {n for n in methods if ".mlp.down_proj." in n}
    assert _prov(out)["calibration"]["dwq"]["head"] is None


def test_moe_experts_keep_their_start(tiny_model, tmp_path):
    """qwen3_moe: the expert stacks keep their start quant (said per tensor); the linears are tuned."""
    src = tiny_model("qwen3_moe")
    a = _tensors(convert(src, tmp_path / "rtn", "q4", calib=CALIB, progress=False))
    out = convert(src, tmp_path / "dwq", "q4", method="dwq", calib=CALIB, dwq=FAST, progress=False)
    b = _tensors(out)
    experts = [k for k in a if ".switch_mlp." in k]
    assert experts and all(torch.equal(a[k], b[k]) for k in experts)
    methods = {t["name"]: t["method"] for t in _prov(out)["tensors"] if t["bits"]}
    assert all(m == "rtn (dwq: MoE experts keep their start quant)" for n, m in methods.items() if ".switch_mlp." in n)
    assert any(m == "dwq" for m in methods.values())


@pytest.mark.mlx
@pytest.mark.parametrize("arch_name,method", [("llama", "dwq"), ("gemma3_text", "awq+dwq"), ("qwen2", "gptq+dwq")])
def test_dwq_folder_opens_in_mlx_lm(tiny_model, tmp_path, arch_name, method):
    """A dwq folder is plain MLX affine: mlx_lm.load opens it; its logits are the engine's."""
    out = convert(tiny_model(arch_name), tmp_path / "out", "q4-hi", method=method, calib=CALIB, dwq=FAST,
                  progress=False)
    assert any(t["method"] == method for t in _prov(out)["tensors"])
    engine = load_model(str(out), progress=False).model(torch.tensor(TOKENS)).logits.detach().numpy()
    assert rel_err(mlx_logits(out, TOKENS), engine) < 1e-4


@pytest.mark.parametrize("cfg,match", [(dwq.DwqConfig(steps=0), "--dwq-steps 0"),
                                       (dwq.DwqConfig(batch=-1), "--dwq-batch -1"),
                                       (dwq.DwqConfig(lr=float("nan")), "--dwq-lr nan"),
                                       (dwq.DwqConfig(lr=0.0), "--dwq-lr 0.0")])
def test_bad_options_are_one_line_errors(tiny_model, tmp_path, cfg, match):
    with pytest.raises(MixqError, match=match) as e:
        convert(tiny_model("llama"), tmp_path / "x", "q4", method="dwq", calib=CALIB, dwq=cfg, progress=False)
    assert "\n" not in str(e.value) and not (tmp_path / "x").exists()


def test_too_few_windows_and_cli_options(tiny_model, tmp_path, capsys):
    from mixq.cli import main

    with pytest.raises(MixqError, match="--calib-samples 1: dwq holds out"):
        convert(tiny_model("llama"), tmp_path / "x", "q4", method="dwq", calib=CalibConfig(samples=1, length=64),
                progress=False)
    rc = main(["convert", str(tiny_model("llama")), str(tmp_path / "y"), "--recipe", "q4", "--method", "dwq",
               "--dwq-lr", "-1"])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and "--dwq-lr -1.0" in err and "\n" not in err and not (tmp_path / "y").exists()

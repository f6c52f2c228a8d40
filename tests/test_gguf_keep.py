"""GGUF kept as it is (`mixq import --keep-quant`, `convert --recipe source`): the exact block formats become
MLX affine group 32 tensors whose dequantized values are the GGUF's own, bit for bit (mlx as the oracle)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tiny_gguf import random_kquant, write_tiny_gguf

from mixq.cli import main
from mixq.errors import MixqError
from mixq.quant.gguf_quants import EXACT, quantized_tensor, source_format
from mixq.quant.prepare import prepare
from mixq.quant.quantize import dequantize

EXACT_TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K"]


def _blocks(name: str, rows: int, cols: int, rng) -> np.ndarray:
    """Valid blocks of GGUF type `name`: K formats random bytes with sane d/dmin, the others gguf's quantizer."""
    import gguf

    qt = gguf.GGMLQuantizationType[name]
    if name.endswith("_K"):
        return random_kquant(rows, cols, qt, rng)
    w = rng.standard_normal((rows, cols)).astype(np.float32) * np.float32(0.05)
    w[0, :32] = 0.0  # an all-zero block (d = 0)
    return gguf.quants.quantize(w, qt)


@pytest.mark.parametrize("name", EXACT_TYPES)
def test_exact_formats_dequantize_bit_exact(name):
    """scale * code + bias (float32 scales) is GGUF's own dequantized value; mixq's dequantizer agrees."""
    import gguf
    from gguf.quants import dequantize as gguf_dequantize

    assert set(EXACT) == set(EXACT_TYPES)
    rng = np.random.default_rng(1)
    qt = gguf.GGMLQuantizationType[name]
    rows, cols = 48, 512
    raw = _blocks(name, rows, cols, rng)
    want = gguf_dequantize(raw, qt).reshape(rows, cols)
    q = quantized_tensor(raw, qt, cols)
    assert q.spec == source_format(name).spec and q.spec.group_size == 32
    got = dequantize(q.wq, q.scales, q.biases, bits=q.spec.bits, group_size=32)
    np.testing.assert_array_equal(got.numpy(), want)
    # a row order (llama's q/k permutation) moves whole rows
    order = np.arange(rows)[::-1].copy()
    qr = quantized_tensor(raw, qt, cols, order)
    np.testing.assert_array_equal(dequantize(qr.wq, qr.scales, qr.biases, bits=q.spec.bits,
                                             group_size=32).numpy(), want[order])


@pytest.mark.mlx
@pytest.mark.parametrize("name", EXACT_TYPES)
def test_exact_formats_mlx_oracle(name):
    """mx.dequantize of the kept tensor equals GGUF's dequantization exactly with float32 scales; float16
    scales lose about one float16 rounding (relative RMS < 1e-3), bfloat16 about ten times more."""
    import gguf
    import mlx.core as mx
    from gguf.quants import dequantize as gguf_dequantize

    rng = np.random.default_rng(2)
    qt = gguf.GGMLQuantizationType[name]
    raw = _blocks(name, 32, 256, rng)
    want = gguf_dequantize(raw, qt).reshape(32, 256)
    q = quantized_tensor(raw, qt, 256)
    err = {}
    for dt in (mx.float32, mx.float16, mx.bfloat16):
        w = mx.dequantize(mx.array(q.wq.numpy()), mx.array(q.scales.numpy()).astype(dt),
                          mx.array(q.biases.numpy()).astype(dt), group_size=32, bits=q.spec.bits)
        got = np.array(w.astype(mx.float32))
        err[dt] = float(np.sqrt(((got - want) ** 2).mean() / (want ** 2).mean()))
    assert err[mx.float32] == 0.0
    assert 0 < err[mx.float16] < 1e-3 and err[mx.float16] < err[mx.bfloat16] < 1e-2


def test_source_format_table():
    assert source_format("Q6_K").spec.bits == 6 and not source_format("Q6_K").exact
    assert source_format("Q2_K").spec.bits == 2 and source_format("IQ4_XS").spec.bits == 4
    assert source_format("F16").spec is None and source_format("Q4_K").exact
    with pytest.raises(MixqError, match="not known"):
        source_format("Q9_Z")


def _mlx_tensors(folder: Path) -> dict:
    import mlx.core as mx

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(mx.load(str(f)))
    return out


def _dequantized(folder: Path) -> dict:
    """{tensor name: float32 numpy} of an MLX folder, quantized tensors through mx.dequantize."""
    import mlx.core as mx

    raw = _mlx_tensors(folder)
    q = json.loads((folder / "config.json").read_text()).get("quantization", {})
    out = {}
    for name, t in raw.items():
        base = name.removesuffix(".weight")
        if name.endswith((".scales", ".biases")):
            continue
        if f"{base}.scales" in raw:
            spec = q.get(base, q)
            t = mx.dequantize(t, raw[f"{base}.scales"], raw[f"{base}.biases"], group_size=spec["group_size"],
                              bits=spec["bits"])
        out[name] = np.array(t.astype(mx.float32))
    return out


def _logits(folder: Path, ids: list[int]) -> np.ndarray:
    import mlx.core as mx
    from mlx_lm import load

    model, _ = load(str(folder))
    return np.array(model(mx.array([ids])).astype(mx.float32))


@pytest.mark.mlx
@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_keep_quant_exact_formats(arch, tmp_path, tmp_cache):
    """A tiny GGUF of exact formats (and float tensors): the MLX folder holds GGUF's values exactly and
    mlx_lm.load gives the same logits as the dequantized (float32) import."""
    from gguf import GGMLQuantizationType as T

    types = [T[n] for n in EXACT_TYPES] + [T.F16, T.F32]
    path, _, expected = write_tiny_gguf(arch, tmp_path, types=types)
    out = tmp_path / "kept"
    assert main(["import", str(path), str(out), "--keep-quant", "--scale-dtype", "float32"]) == 0
    got = _dequantized(out)
    names = {n for n in expected if not (n == "lm_head.weight" and n not in got)}
    assert set(got) == names
    for n in names:
        np.testing.assert_array_equal(got[n], expected[n], err_msg=n)
    prov = json.loads((out / "mixq_provenance.json").read_text())
    assert prov["recipe"]["name"] == "source"
    reasons = {t["name"]: t["reason"] for t in prov["tensors"]}
    assert any("GGUF Q5_K kept exactly (5-bit g32)" == r for r in reasons.values())
    assert any(r.startswith("GGUF F16 kept as float") for r in reasons.values())
    flt = tmp_path / "float"
    assert main(["import", str(path), str(flt)]) == 0
    ids = [3, 7, 11, 2, 5, 9]
    np.testing.assert_array_equal(_logits(out, ids), _logits(flt, ids))


@pytest.mark.mlx
def test_keep_quant_requantizes_the_rest(tmp_path, tmp_cache, capsys):
    """Q6_K (16-wide sub-blocks) has no exact MLX form: re-quantized to 6-bit g32 (or --requant), listed as such
    in the plan table and the provenance; the bits per weight are printed next to the GGUF's."""
    from gguf import GGMLQuantizationType as T

    path, _, _ = write_tiny_gguf("llama", tmp_path, types=[T.Q6_K, T.Q4_K])
    assert main(["convert", str(path), "unused", "--recipe", "source", "--dry-run"]) == 0
    table = capsys.readouterr().out
    assert "GGUF Q6_K has no exact MLX form: re-quantized to 6-bit g32" in table
    assert "GGUF Q4_K kept exactly" in table
    out = tmp_path / "kept"
    assert main(["import", str(path), str(out), "--keep-quant", "--requant", "q8"]) == 0
    printed = capsys.readouterr().out
    assert "(MLX folder) vs" in printed and "(GGUF)" in printed
    prov = json.loads((out / "mixq_provenance.json").read_text())
    q6 = [t for t in prov["tensors"] if "Q6_K" in t["reason"]]
    assert q6 and all(t["bits"] == 8 and "re-quantized to 8-bit" in t["reason"] for t in q6)
    assert prov["tensors"][0]["dtype"] in ("float16", "float32")
    cfg = json.loads((out / "config.json").read_text())["quantization"]
    entries = [cfg] + [v for v in cfg.values() if isinstance(v, dict)]
    assert {(e["bits"], e["group_size"]) for e in entries} == {(4, 32), (8, 64)}  # Q4_K kept, Q6_K -> recipe q8
    _logits(out, [1, 2, 3])  # opens in mlx_lm.load


def test_source_recipe_needs_a_gguf(tiny_model):
    with pytest.raises(MixqError, match="keeps a source's own quantization"):
        prepare(tiny_model("llama"), "source")
    with pytest.raises(MixqError, match="apply to --recipe source only"):
        prepare(tiny_model("llama"), "q4", scale_dtype="float32")


@pytest.mark.mlx
def test_engine_applies_source_like_convert(tmp_path, tmp_cache):
    """MODEL.gguf@source in the engine holds the tensors convert writes (float16 scales by default): its weights
    are mx.dequantize of the written folder's."""
    from gguf import GGMLQuantizationType as T

    from mixq.eval.engine import load_model

    path, _, expected = write_tiny_gguf("llama", tmp_path, types=[T.Q4_K, T.Q8_0, T.Q5_0])
    out = tmp_path / "kept"
    assert main(["convert", str(path), str(out), "--recipe", "source"]) == 0
    want = _dequantized(out)
    lm = load_model(f"{path}@source", progress=False, packed=False)
    params = dict(lm.model.named_parameters())
    for name in ("model.layers.0.mlp.down_proj.weight", "model.layers.1.self_attn.o_proj.weight"):
        np.testing.assert_array_equal(params[name].detach().float().numpy(), want[name], err_msg=name)
        assert not np.array_equal(want[name], expected[name])  # float16 scales: not GGUF's float32 values
        np.testing.assert_allclose(want[name], expected[name], rtol=0, atol=2e-3 * np.abs(expected[name]).max())


@pytest.mark.real
@pytest.mark.mlx
def test_embedded_smollm2_kept_exactly(tmp_path):
    """The embedded SmolLM2 GGUF (Q4_1 layers, Q8_0 embedding): every tensor of the --keep-quant folder equals
    the dequantized import's, and mlx_lm.load gives identical logits."""
    from mixq.sources.resolve import resolve

    out = tmp_path / "smollm2-kept"
    assert main(["import", "smollm2-135m-gguf", str(out), "--keep-quant", "--scale-dtype", "float32"]) == 0
    ref = resolve("smollm2-135m-gguf").path
    got, want = _dequantized(out), _dequantized(ref)
    assert set(got) == set(want)
    for n in want:
        np.testing.assert_array_equal(got[n], want[n], err_msg=n)
    ids = [504, 3575, 282, 4649, 314]
    np.testing.assert_array_equal(_logits(out, ids), _logits(ref, ids))

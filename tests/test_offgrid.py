"""Off-grid re-parametrization: outputs unchanged, weights moved off their 4-bit group-32 grid."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import make_tiny_hf

from mixq.errors import MixqError
from mixq.sources.offgrid import apply_offgrid, factors

torch.set_num_threads(2)
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def fake_quant(w: torch.Tensor, bits: int = 4, group: int = 32) -> torch.Tensor:
    """MLX-style affine min/max quantize-dequantize along the last axis (float64)."""
    g = w.double().reshape(-1, group)
    lo, hi = g.min(1, keepdim=True).values, g.max(1, keepdim=True).values
    scale = ((hi - lo) / (2**bits - 1)).clamp_min(1e-12)
    return (torch.round((g - lo) / scale) * scale + lo).reshape(w.shape)


def rel_err(w: torch.Tensor) -> float:
    return float((fake_quant(w) - w.double()).norm() / w.double().norm())


def grid_model(arch: str, path, seed=0):
    """A tiny float32 model whose projections lie on a 4-bit group-32 grid (like a dequantized GGUF)."""
    from transformers import AutoModelForCausalLM

    src = make_tiny_hf(arch, path, seed=seed, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.split(".")[-2] in PROJ:
                p.copy_(fake_quant(p).float())
    model.save_pretrained(src)
    return src


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "qwen2", "qwen3"])
def test_function_preserved_and_off_grid(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    raw = grid_model(arch, tmp_path / "raw")
    out = apply_offgrid(raw, tmp_path / "offgrid", seed=7, progress=False)
    a = AutoModelForCausalLM.from_pretrained(raw, dtype=torch.float32).eval()
    b = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, a.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        la = torch.log_softmax(a(ids).logits.double(), -1)
        lb = torch.log_softmax(b(ids).logits.double(), -1)
        kl = (la.exp() * (la - lb)).sum(-1)
        assert kl.max() < 1e-6, float(kl.max())
        ga = a.generate(ids[:1, :6], max_new_tokens=12, do_sample=False, min_new_tokens=12)
        gb = b.generate(ids[:1, :6], max_new_tokens=12, do_sample=False, min_new_tokens=12)
    assert ga.tolist() == gb.tolist()

    wa, wb = load_file(str(raw / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert set(wa) == set(wb)
    n_proj = 0
    for name, w in wa.items():
        kind = name.split(".")[-2]
        if kind in PROJ and name.endswith(".weight"):
            n_proj += 1
            assert rel_err(w) < 1e-6, name            # the raw weights sit on the grid
            assert rel_err(wb[name]) > 1e-3, name     # the re-parametrized ones do not
            assert rel_err(wb[name]) > 1000 * max(rel_err(w), 1e-9), name
        elif "embed" in name or name == "model.norm.weight" or kind in ("q_norm", "k_norm"):
            assert torch.equal(w, wb[name]), name     # not folded (see mixq/sources/offgrid.py)
    assert n_proj == 7 * a.config.num_hidden_layers
    prov = json.loads((out / "mixq_provenance.json").read_text())
    assert prov["offgrid"]["seed"] == 7 and "log-uniform" in prov["offgrid"]["method"]


def test_gemma_folds_only_exact_norms(tmp_path):
    raw = grid_model("gemma3_text", tmp_path / "raw")
    out = apply_offgrid(raw, tmp_path / "og", progress=False)
    wa, wb = load_file(str(raw / "model.safetensors")), load_file(str(out / "model.safetensors"))
    for kind in ("post_attention_layernorm", "post_feedforward_layernorm"):  # they normalize o/down outputs
        assert torch.equal(wa[f"model.layers.0.{kind}.weight"], wb[f"model.layers.0.{kind}.weight"])
    for kind in ("input_layernorm", "pre_feedforward_layernorm"):
        assert not torch.equal(wa[f"model.layers.0.{kind}.weight"], wb[f"model.layers.0.{kind}.weight"])


def test_seeded_and_deterministic(tmp_path):
    raw = grid_model("llama", tmp_path / "raw")
    a = apply_offgrid(raw, tmp_path / "a", seed=1, progress=False)
    b = apply_offgrid(raw, tmp_path / "b", seed=1, progress=False)
    c = apply_offgrid(raw, tmp_path / "c", seed=2, progress=False)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    f = factors(1, 0, "attn_in", 10_000)
    assert 0.5 <= float(f.min()) and float(f.max()) <= 2.0
    assert abs(float(f.log().mean())) < 0.02  # log-uniform, centred on 1
    assert torch.equal(f, factors(1, 0, "attn_in", 10_000))


def test_errors(tmp_path):
    src = make_tiny_hf("phi3", tmp_path / "phi3")
    with pytest.raises(MixqError, match="phi3"):
        apply_offgrid(src, tmp_path / "out", progress=False)
    with pytest.raises(MixqError, match="config.json"):
        apply_offgrid(tmp_path, tmp_path / "out", progress=False)
    raw = grid_model("llama", tmp_path / "raw")
    (tmp_path / "exists").mkdir()
    with pytest.raises(MixqError, match="--force"):
        apply_offgrid(raw, tmp_path / "exists", progress=False)
    assert not (tmp_path / "out").exists()
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".")] == []

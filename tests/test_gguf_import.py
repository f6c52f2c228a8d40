"""GGUF import: tiny GGUFs written with gguf.GGUFWriter round-trip exactly; bad files fail cleanly."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from tiny_gguf import write_tiny_gguf

from mixq.errors import MixqError
from mixq.sources.gguf import hf_name, import_gguf

torch.set_num_threads(2)


def _leftovers(folder):
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return write_tiny_gguf("llama", tmp_path_factory.mktemp("gguf_llama"))


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "qwen2", "qwen3"])
def test_roundtrip_tensors_config_and_logits(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    path, hf_dir, expected = write_tiny_gguf(arch, tmp_path)
    out = import_gguf(path, tmp_path / "imported", progress=False)
    got = load_file(str(out / "model.safetensors"))
    assert set(got) == set(expected)
    for name, want in expected.items():  # dequantized exactly, llama permutation and gemma +1 undone
        assert got[name].dtype == np.float32
        np.testing.assert_array_equal(got[name], want, err_msg=name)
    cfg = json.loads((out / "config.json").read_text())
    ref = json.loads((hf_dir / "config.json").read_text())
    assert cfg["model_type"] == arch
    for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings"):
        assert cfg[k] == ref[k], k
    assert ("lm_head.weight" in got) == (not ref["tie_word_embeddings"])

    # transformers runs the import exactly like the original model carrying the dequantized weights
    orig = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    orig.load_state_dict({k: torch.from_numpy(v) for k, v in expected.items()}, strict=False)
    imp = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([[5, 17, 42, 99, 120, 7, 64, 3]])
    with torch.no_grad():
        torch.testing.assert_close(imp(ids).logits, orig(ids).logits, rtol=1e-5, atol=1e-5)

    prov = json.loads((out / "mixq_provenance.json").read_text())
    assert prov["dequantized_from_gguf"] is True
    assert prov["source"]["file"] == path.name and len(prov["source"]["sha256"]) == 64
    types = prov["gguf"]["tensor_types"]
    assert sum(types.values()) == len(expected)
    assert {"Q8_0", "Q4_0", "Q4_1", "Q4_K"} <= set(types)
    assert _leftovers(tmp_path) == []


def test_tokenizer_and_chat_template(tiny_llama, tmp_path):
    from transformers import AutoTokenizer

    path, hf_dir, _ = tiny_llama
    out = import_gguf(path, tmp_path / "imported", progress=False)
    a, b = AutoTokenizer.from_pretrained(hf_dir), AutoTokenizer.from_pretrained(out)
    text = "Paris is the capital of France. def add(a, b):\n    return a + b <|im_end|>"
    assert b(text)["input_ids"] == a(text)["input_ids"]
    assert b.decode(b(text)["input_ids"]) == text
    msgs = [{"role": "user", "content": "hi"}]
    assert b.apply_chat_template(msgs, tokenize=False) == a.apply_chat_template(msgs, tokenize=False)
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == a.convert_tokens_to_ids("<|im_end|>")


def test_hf_names():
    assert hf_name("blk.3.attn_q.weight", "llama") == "model.layers.3.self_attn.q_proj.weight"
    assert hf_name("blk.0.ffn_norm.weight", "llama") == "model.layers.0.post_attention_layernorm.weight"
    assert hf_name("blk.0.ffn_norm.weight", "gemma3") == "model.layers.0.pre_feedforward_layernorm.weight"
    assert hf_name("blk.1.post_ffw_norm.weight", "gemma3") == "model.layers.1.post_feedforward_layernorm.weight"
    assert hf_name("blk.2.attn_k_norm.weight", "qwen3") == "model.layers.2.self_attn.k_norm.weight"
    assert hf_name("token_embd.weight", "qwen2") == "model.embed_tokens.weight"
    assert hf_name("output.weight", "qwen2") == "lm_head.weight"
    assert hf_name("blk.0.ssm_conv.weight", "llama") is None


def test_bfloat16_output(tiny_llama, tmp_path):
    path, _, expected = tiny_llama
    out = import_gguf(path, tmp_path / "bf16", dtype="bfloat16", progress=False)
    from safetensors.torch import load_file as load_pt

    got = load_pt(str(out / "model.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in got.values())
    name = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(got[name], torch.from_numpy(expected[name]).bfloat16())


def test_not_gguf(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 this is a zip, not a gguf" * 10)
    with pytest.raises(MixqError, match="not a GGUF file"):
        import_gguf(bad, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []
    with pytest.raises(MixqError, match="no such file"):
        import_gguf(tmp_path / "missing.gguf", tmp_path / "out", progress=False)


@pytest.mark.parametrize("keep", [0.02, 0.6, 0.999])
def test_truncated(tiny_llama, tmp_path, keep):
    path = tiny_llama[0]
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(MixqError, match="truncated|corrupt") as e:
        import_gguf(cut, tmp_path / "out", progress=False)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def _rewrite(src, dst, *, arch=None, tensor_type=None):
    """Copy a GGUF, changing its architecture name or the type of its first matrix."""
    import gguf

    r = gguf.GGUFReader(str(src))
    a = arch or r.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(str(dst), a)
    for k, f in r.fields.items():
        if k.startswith("GGUF.") or k == "general.architecture":
            continue
        if k.startswith("llama."):
            k = a + k[len("llama"):]
        vtype = f.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_key_value(k, f.contents(), vtype, sub_type=f.types[-1])
        else:
            w.add_key_value(k, f.contents(), vtype)
    first = True
    for t in r.tensors:
        data = np.array(t.data)
        if tensor_type is not None and first and len(t.shape) == 2:
            first = False
            blk, size = gguf.GGML_QUANT_SIZES[tensor_type]
            rows = int(t.shape[1])
            w.add_tensor(t.name, np.zeros((rows, int(t.shape[0]) // blk * size), np.uint8), raw_dtype=tensor_type)
            continue
        w.add_tensor(t.name, data, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_unknown_architecture(tiny_llama, tmp_path):
    src = tmp_path / "mamba.gguf"
    _rewrite(tiny_llama[0], src, arch="mamba")
    with pytest.raises(MixqError, match="architecture 'mamba' is not supported; supported: llama, qwen2"):
        import_gguf(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_unsupported_tensor_type(tiny_llama, tmp_path):
    import gguf

    src = tmp_path / "q8k.gguf"
    _rewrite(tiny_llama[0], src, tensor_type=gguf.GGMLQuantizationType.Q8_K)  # no reader for Q8_K
    with pytest.raises(MixqError, match="Q8_K"):
        import_gguf(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_existing_out_needs_force(tiny_llama, tmp_path):
    out = tmp_path / "out"
    import_gguf(tiny_llama[0], out, progress=False)
    (out / "keep.txt").write_text("x")
    with pytest.raises(MixqError, match="--force"):
        import_gguf(tiny_llama[0], out, progress=False)
    assert (out / "keep.txt").exists()
    import_gguf(tiny_llama[0], out, force=True, progress=False)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()


def test_force_refuses_foreign_folders_and_the_source(tiny_llama, tmp_path):
    """--force replaces only what mixq wrote; never a folder holding the GGUF being imported."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("x")
    with pytest.raises(MixqError, match="not written by mixq"):
        import_gguf(tiny_llama[0], mine, force=True, progress=False)
    holder = tmp_path / "holder"
    holder.mkdir()
    gguf = holder / "model.gguf"
    gguf.write_bytes(Path(tiny_llama[0]).read_bytes())
    (holder / "mixq_provenance.json").write_text("{}")  # even a folder that looks like mixq's
    with pytest.raises(MixqError, match="source"):
        import_gguf(gguf, holder, force=True, progress=False)
    assert (mine / "keep.txt").exists() and gguf.is_file()


def test_sharded_output(tiny_llama, tmp_path, monkeypatch):
    from mixq.sources import gguf

    monkeypatch.setattr(gguf, "MAX_SHARD_BYTES", 600_000)
    monkeypatch.setattr(gguf, "CHUNK_ELEMENTS", 1000)  # dequantize in blocks of a few rows
    path, _, expected = tiny_llama
    out = import_gguf(path, tmp_path / "sharded", progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and all((out / f).stat().st_size <= 600_000 + 4096 for f in files)
    got = {}
    for f in files:
        got.update(load_file(str(out / f)))
    assert set(got) == set(expected)
    for name, want in expected.items():
        np.testing.assert_array_equal(got[name], want, err_msg=name)


def test_cli_import_and_resolve(tiny_llama, tmp_path, tmp_cache, capsys):
    from mixq.cli import main
    from mixq.sources.resolve import resolve

    path = tiny_llama[0]
    assert main(["import", str(path), str(tmp_path / "cli_out")]) == 0
    assert (tmp_path / "cli_out" / "model.safetensors").exists()
    assert main(["import", str(path), str(tmp_path / "cli_out")]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["import", str(tmp_path / "nope.gguf"), str(tmp_path / "x")]) == 2

    r1 = resolve(str(path), progress=False)
    r2 = resolve(f"{path}@q4-hi", progress=False)
    assert r1.kind == "hf" and r1.path == r2.path and r2.recipe == "q4-hi"
    assert r1.path.parent == tmp_cache / "gguf-imports"
    assert r1.provenance["source"]["sha256"].startswith(r1.path.name)
    mtime = os.stat(r1.path / "model.safetensors").st_mtime
    assert resolve(str(path), progress=False).path == r1.path  # cached, not imported again
    assert os.stat(r1.path / "model.safetensors").st_mtime == mtime

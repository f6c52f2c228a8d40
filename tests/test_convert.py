"""mixq convert: every architecture opens in mlx_lm.load and computes what the dequantized weights compute in torch;
tensors byte-for-byte equal to mx.quantize; sharding, atomicity, refusal, errors; artifact read-back."""

from __future__ import annotations

import json
import math

import pytest
import torch
from oracles import mlx_logits, rel_err, source_logits, torch_logits
from tiny_models import ARCHS

from mixq.errors import MixqError
from mixq.quant import arch
from mixq.quant.artifact import is_mlx_folder, read_artifact
from mixq.quant.checkpoint import Checkpoint
from mixq.quant.convert import convert
from mixq.quant.prepare import prepare

torch.set_num_threads(2)
try:
    import mlx.core as mx
except ImportError:  # tests that need it are marked mlx and skipped
    mx = None

TOKENS = [[5, 17, 42, 99, 3, 250, 7, 12, 64, 31, 200, 11]]  # 12 tokens: past gemma3/gpt_oss's sliding window of 8


@pytest.mark.mlx
@pytest.mark.parametrize("arch_name", ARCHS)
def test_arch_logits_match(tiny_model, tmp_path, arch_name):
    """Convert with a mixed recipe; mlx_lm.load opens it and gives the logits torch gives on our dequantized weights."""
    src = tiny_model(arch_name)
    out = convert(src, tmp_path / "out", recipe="qx86-hi", progress=False)
    art = read_artifact(out)
    assert art.quantized_params > 0 and {t.bits for t in art.tensors if t.bits} == {6, 8}
    ref = torch_logits(out, TOKENS)
    got = mlx_logits(out, TOKENS)
    assert rel_err(got, ref) < 1e-4, arch_name
    # the quantized kernels (bf16, as loaded) agree too, loosely
    native = mlx_logits(out, TOKENS, dequantized=False)
    assert rel_err(native, ref) < 0.08, arch_name
    # and the quant is close to the unquantized source (layout errors would be far off)
    orig = source_logits(src, TOKENS)
    assert rel_err(ref, orig) < 0.2, arch_name


@pytest.mark.mlx
@pytest.mark.parametrize("arch_name", ["llama", "qwen3_moe", "gpt_oss", "phi3"])
def test_mixed_3_6_logits_match(tiny_model, tmp_path, arch_name):
    src = tiny_model(arch_name)
    out = convert(src, tmp_path / "out", recipe="mixed_3_6", progress=False)
    art = read_artifact(out)
    assert 3 in {t.bits for t in art.tensors if t.bits}
    assert rel_err(mlx_logits(out, TOKENS), torch_logits(out, TOKENS)) < 1e-4


@pytest.mark.mlx
@pytest.mark.parametrize("arch_name", ARCHS)
def test_tensors_equal_mx_quantize(tiny_model, tmp_path, arch_name, monkeypatch):
    """Every stored tensor is byte-for-byte what mx.quantize (or a plain cast) gives on the MLX-layout source
    (quantized here in chunks of a few rows, as convert does with big tensors)."""
    import importlib

    monkeypatch.setattr(importlib.import_module("mixq.quant.convert"), "QUANT_CHUNK", 200)
    src = tiny_model(arch_name)
    out = convert(src, tmp_path / "out", recipe="mixed_3_6", progress=False)
    stored = mx.load(str(out / "model.safetensors"))
    art = read_artifact(out)
    by_name = {info.name: load for info, load in arch.mlx_tensors(Checkpoint(src))}
    assert {t.name for t in art.tensors} == set(by_name)
    for t in art.tensors:
        w = mx.array(by_name[t.name]().float().numpy()).astype(mx.bfloat16)
        if t.bits:
            wq, s, b = mx.quantize(w, group_size=t.group_size, bits=t.bits)
            for suffix, want in (("weight", wq), ("scales", s), ("biases", b)):
                have = stored[f"{t.path}.{suffix}"]
                assert have.dtype == want.dtype and mx.array_equal(have, want).item(), (t.name, suffix)
        else:
            assert mx.array_equal(stored[t.name], w).item(), t.name


@pytest.mark.mlx
def test_matches_mlx_lm_convert(tiny_model, tmp_path):
    """Same tensors and quantization config as mlx_lm.convert --quant-predicate mixed_3_6 (llama, 5 layers)."""
    from mlx_lm.convert import convert as mlx_convert

    src = tiny_model("llama", num_hidden_layers=5, tie_word_embeddings=False)
    ours = convert(src, tmp_path / "ours", recipe="mixed_3_6", dtype="bfloat16", progress=False)
    theirs = tmp_path / "theirs"
    mlx_convert(str(src), str(theirs), quantize=True, q_group_size=64, quant_predicate="mixed_3_6", dtype="bfloat16")
    a = mx.load(str(ours / "model.safetensors"))
    b = {}
    for f in theirs.glob("*.safetensors"):
        b.update(mx.load(str(f)))
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and mx.array_equal(a[k], b[k]).item(), k
    qa = json.loads((ours / "config.json").read_text())["quantization"]
    qb = json.loads((theirs / "config.json").read_text())["quantization"]
    norm = lambda q: {k: ({kk: vv for kk, vv in v.items() if kk != "mode"} if isinstance(v, dict) else v)  # noqa: E731
                      for k, v in q.items() if k != "mode"}
    # mlx_lm lists every module (each predicate answer is a dict); we list those that differ from the default
    default = {"group_size": qa["group_size"], "bits": qa["bits"]}
    explicit_b = {k: v for k, v in norm(qb).items() if isinstance(v, dict) and v != default}
    assert {k: v for k, v in norm(qa).items() if isinstance(v, dict)} == explicit_b


def test_every_fourth_layer_visible(tiny_model, tmp_path):
    src = tiny_model("llama", num_hidden_layers=5)
    prep = prepare(src, "qx86-hi")
    bits = {tp.name: tp.spec.bits for tp in prep.plan.tensors if tp.spec}
    assert bits["model.layers.0.self_attn.q_proj.weight"] == 8
    assert bits["model.layers.4.self_attn.o_proj.weight"] == 8
    assert bits["model.layers.1.self_attn.q_proj.weight"] == 6
    assert bits["model.layers.4.mlp.down_proj.weight"] == 6
    assert bits["model.embed_tokens.weight"] == 8  # tied: the embedding is the head


@pytest.mark.mlx
def test_sharded_source_and_output(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    src = tiny_model("qwen3")
    sharded = tmp_path / "sharded"
    model = AutoModelForCausalLM.from_pretrained(str(src))
    model.save_pretrained(sharded, max_shard_size="40KB")
    for f in src.glob("tokenizer*"):
        (sharded / f.name).write_bytes(f.read_bytes())
    assert (sharded / "model.safetensors.index.json").exists() and len(list(sharded.glob("*.safetensors"))) > 2
    one = convert(src, tmp_path / "one", recipe="q4-hi", progress=False)
    many = convert(sharded, tmp_path / "many", recipe="q4-hi", shard_bytes=20_000, progress=False)
    files = sorted(many.glob("model-*.safetensors"))
    assert len(files) >= 3 and files[0].name == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((many / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {f.name for f in files}
    for f in files:  # a shard only exceeds the limit when it holds one tensor
        assert f.stat().st_size <= 20_000 + 4096 or len(mx.load(str(f))) == 1
    a = mx.load(str(one / "model.safetensors"))
    b = {}
    for f in files:
        b.update(mx.load(str(f)))
    assert set(a) == set(b) and all(mx.array_equal(a[k], b[k]).item() for k in a)
    assert rel_err(mlx_logits(many, TOKENS), torch_logits(one, TOKENS)) < 1e-4


def test_refuses_existing_then_force(tiny_model, tmp_path):
    src = tiny_model("llama")
    out = tmp_path / "out"
    convert(src, out, recipe="q6", progress=False)
    (out / "keep.txt").write_text("x")
    with pytest.raises(MixqError, match="already exists"):
        convert(src, out, recipe="q4", progress=False)
    assert (out / "keep.txt").exists()
    convert(src, out, recipe="q4", force=True, progress=False)
    assert not (out / "keep.txt").exists() and is_mlx_folder(out)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def _tree(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _copy_tree(src, dst):
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_force_never_replaces_the_source_or_foreign_folders(tiny_model, tmp_path):
    """--force replaces only a folder mixq wrote: never the source, a folder holding it, or a user's folder."""
    src = _copy_tree(tiny_model("llama"), tmp_path / "parent" / "src")
    before = _tree(tmp_path / "parent")
    for out in (src, tmp_path / "parent"):
        with pytest.raises(MixqError, match="source") as e:
            convert(src, out, recipe="q4", force=True, progress=False)
        assert "\n" not in str(e.value)
    assert _tree(tmp_path / "parent") == before
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my work")
    with pytest.raises(MixqError, match="not written by mixq"):
        convert(src, mine, recipe="q4", force=True, progress=False)
    assert (mine / "notes.txt").read_text() == "my work" and [p.name for p in mine.iterdir()] == ["notes.txt"]
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(MixqError, match="not a folder mixq wrote"):
        convert(src, afile, recipe="q4", force=True, progress=False)
    assert afile.read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "mine", "parent"]  # no temp folders left


def test_error_midway_leaves_nothing(tiny_model, tmp_path, monkeypatch):
    import mixq.quant.convert

    src = tiny_model("llama")
    calls = {"n": 0}
    real = mixq.quant.convert.quantize

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(mixq.quant.convert, "quantize", failing)
    with pytest.raises(KeyboardInterrupt):
        convert(src, tmp_path / "out", recipe="q4", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_disk_full_is_one_line_error(tiny_model, tmp_path, monkeypatch):
    import errno

    import mixq.io.safetensors

    src = tiny_model("llama")
    real = mixq.io.safetensors.SafetensorsWriter.write

    def full(self, name, t):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(mixq.io.safetensors.SafetensorsWriter, "write", full)
    with pytest.raises(MixqError, match="disk full"):
        convert(src, tmp_path / "out", recipe="q4", progress=False)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(mixq.io.safetensors.SafetensorsWriter, "write", real)


def test_unknown_architecture(tiny_model, tmp_path):
    src = tiny_model("llama")
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in src.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"] = "falcon"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MixqError) as e:
        convert(bad, tmp_path / "out", progress=False)
    msg = str(e.value)
    assert "falcon" in msg and all(a in msg for a in arch.SUPPORTED) and "\n" not in msg
    assert not (tmp_path / "out").exists()


@pytest.mark.mlx
def test_non_divisible_input_dim_kept(tiny_model, tmp_path):
    src = tiny_model("llama", intermediate_size=72)  # down_proj input 72: no group size divides it
    out = convert(src, tmp_path / "out", recipe="q4-hi", progress=False)
    art = read_artifact(out)
    down = art.spec("model.layers.0.mlp.down_proj.weight")
    gate = art.spec("model.layers.0.mlp.gate_proj.weight")
    assert down.bits is None and down.dtype == "bfloat16" and gate.bits == 4
    prov = json.loads((out / "mixq_provenance.json").read_text())
    reason = next(t["reason"] for t in prov["tensors"] if t["name"] == "model.layers.0.mlp.down_proj.weight")
    assert "72" in reason
    assert rel_err(mlx_logits(out, TOKENS), torch_logits(out, TOKENS)) < 1e-4


@pytest.mark.mlx
def test_folder_contents_and_artifact(tiny_model, tmp_path):
    src = tiny_model("qwen2")
    out = convert(src, tmp_path / "out", recipe="qx86-hi", progress=False)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "model.safetensors.index.json", "tokenizer.json",
            "tokenizer_config.json", "generation_config.json", "mixq_provenance.json", "README.md"} <= names
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization"] == cfg["quantization_config"] and cfg["quantization"]["bits"] == 6
    assert cfg["rope_theta"] == 200000.0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "np") as f:
        assert f.metadata() == {"format": "mlx"}
        assert set(f.keys()) == set(index["weight_map"])
    prov = json.loads((out / "mixq_provenance.json").read_text())
    import hashlib

    assert prov["recipe"]["name"] == "qx86-hi" and "[recipe]" in prov["recipe"]["text"]
    assert prov["source"]["files"]["model.safetensors"]["sha256"] == hashlib.sha256(
        (src / "model.safetensors").read_bytes()).hexdigest()
    art = read_artifact(out)
    assert art.size_bytes == index["metadata"]["total_size"] == prov["size_bytes"]
    assert math.isclose(art.bits_per_weight, prov["bits_per_weight"])
    assert art.recipe_name() == "qx86-hi" and art.default_spec == (6, 32)
    assert art.spec("model.layers.0.self_attn.q_proj").bits == 8
    assert "library_name: mlx" in (out / "README.md").read_text()
    # the tokenizer and chat template work from the converted folder
    from mlx_lm import load

    _, tok = load(str(out))
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n")


def test_dry_run_and_plan_show(tiny_model, tmp_path, capsys):
    import argparse
    import importlib

    from mixq.quant import plan_show

    convert_mod = importlib.import_module("mixq.quant.convert")

    src = tiny_model("qwen3_moe")
    p = argparse.ArgumentParser()
    convert_mod.add_arguments(p)
    convert_mod.cli(p.parse_args([str(src), str(tmp_path / "out"), "--recipe", "qx86-hi", "--dry-run"]))
    text = capsys.readouterr().out
    assert not (tmp_path / "out").exists()
    assert "model.layers.0.mlp.switch_mlp.down_proj" in text and "bits per weight" in text
    p = argparse.ArgumentParser()
    plan_show.add_arguments(p)
    plan_show.cli(p.parse_args([str(src), "--recipe", "mixed_3_6"]))
    text2 = capsys.readouterr().out
    assert "mixed_3_6" in text2 and "model.layers.1.mlp.gate" in text2


@pytest.mark.mlx
def test_dtype_option(tiny_model, tmp_path):
    src = tiny_model("llama")
    out = convert(src, tmp_path / "out", recipe="q8", dtype="float16", progress=False)
    art = read_artifact(out)
    assert {t.dtype for t in art.tensors} == {"float16"}
    assert rel_err(mlx_logits(out, TOKENS), torch_logits(out, TOKENS)) < 1e-4


@pytest.mark.mlx
@pytest.mark.real
@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_real_model_qx86(tmp_path, name):
    """The real small models convert with qx86-hi; mlx_lm.load computes what torch computes on the dequantized
    weights, and greedy generation says Paris."""
    from mlx_lm import generate, load

    from mixq.sources.resolve import resolve

    src = resolve(name).path
    out = convert(name, tmp_path / "out", recipe="qx86-hi", dtype="bfloat16", progress=False)
    art = read_artifact(out)
    assert art.recipe_name() == "qx86-hi" and 6.5 < art.bits_per_weight_quantized < 8.5
    prov = json.loads((out / "mixq_provenance.json").read_text())
    assert prov["source"]["provenance"].get("dequantized_from_gguf") is True
    assert rel_err(mlx_logits(out, [[1, 504, 3458, 282, 4649, 314]]),
                   torch_logits(out, [[1, 504, 3458, 282, 4649, 314]])) < 1e-4
    model, tok = load(str(out))
    # (gemma3-270m base, even unquantized, continues "The capital of France is" with " the capital of ...")
    text = generate(model, tok, prompt="The capital of France is the city of", max_tokens=8)
    assert "Paris" in text, text
    assert src.exists()


def test_second_writer_is_refused(tiny_model, tmp_path, tmp_cache):
    """While one writer holds OUT, another convert to OUT stops at once with one line and leaves nothing."""
    from mixq.io.files import output_lock

    out = tmp_path / "out"
    with output_lock(out):
        with pytest.raises(MixqError, match="another mixq process") as e:
            convert(tiny_model("llama"), out, recipe="q4", progress=False)
        assert "\n" not in str(e.value)
    assert [p.name for p in tmp_path.iterdir() if p.name != "mixq-cache"] == []
    convert(tiny_model("llama"), out, recipe="q4", progress=False)  # free again
    assert is_mlx_folder(out)

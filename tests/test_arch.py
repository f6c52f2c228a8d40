"""arch.py and checkpoint.py: MLX layouts, the inverse mapping, MXFP4 sources, configs, reader errors."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import ARCHS, mxfp4_encode

from mixq.errors import MixqError
from mixq.io.safetensors import SafetensorsWriter, read_header
from mixq.quant import arch
from mixq.quant.checkpoint import Checkpoint

torch.set_num_threads(2)


def test_tiny_models_load_in_transformers(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for a in ARCHS:
        model = AutoModelForCausalLM.from_pretrained(str(tiny_model(a)))
        assert model.config.model_type == a and model.dtype == torch.bfloat16
        assert model.config.hidden_size % 32 == 0
    tok = AutoTokenizer.from_pretrained(str(tiny_model("llama")))
    ids = tok("The capital of France")["input_ids"]
    assert tok.decode(ids) == "The capital of France" and max(ids) < model.config.vocab_size
    assert "<|im_start|>assistant" in tok.apply_chat_template([{"role": "user", "content": "x"}],
                                                             add_generation_prompt=True, tokenize=False)


@pytest.mark.parametrize("arch_name", ARCHS)
def test_round_trip_hf_mlx_hf(tiny_model, arch_name):
    """HF checkpoint -> MLX layout -> HF checkpoint gives back every tensor exactly (lm_head absent when tied)."""
    ckpt = Checkpoint(tiny_model(arch_name))
    named = [(info.name, load()) for info, load in arch.mlx_tensors(ckpt)]
    for (info, _), (name, t) in zip(arch.mlx_tensors(ckpt), named):
        assert tuple(t.shape) == info.shape and str(t.dtype).endswith(info.dtype), name
    back = arch.hf_state_dict(named, ckpt.config)
    want = set(ckpt.names()) - ({"lm_head.weight"} if arch.is_tied(ckpt) else set())
    assert set(back) == want
    for n in want:
        assert torch.equal(back[n], ckpt.get(n)), n


def test_qwen3_moe_layout(tiny_model):
    ckpt = Checkpoint(tiny_model("qwen3_moe"))
    infos = {info.name: (info, load) for info, load in arch.mlx_tensors(ckpt)}
    assert not any(".experts." in n for n in infos)
    info, load = infos["model.layers.1.mlp.switch_mlp.down_proj.weight"]
    assert info.shape == (4, 64, 64)
    t = load()
    assert torch.equal(t[2], ckpt.get("model.layers.1.mlp.experts.2.down_proj.weight"))
    assert infos["model.layers.1.mlp.switch_mlp.gate_proj.weight"][0].shape == (4, 64, 64)
    assert "model.layers.0.mlp.gate.weight" in infos  # the router


def test_gpt_oss_layout(tiny_model):
    ckpt = Checkpoint(tiny_model("gpt_oss"))
    infos = {info.name: (info, load) for info, load in arch.mlx_tensors(ckpt)}
    p = "model.layers.0.mlp.experts"
    assert infos[f"{p}.gate_proj.weight"][0].shape == (4, 64, 64)  # [E, intermediate, hidden]
    assert infos[f"{p}.down_proj.weight"][0].shape == (4, 64, 64)
    assert infos[f"{p}.gate_proj.bias"][0].shape == (4, 64)
    fused = ckpt.get(f"{p}.gate_up_proj")  # [E, hidden, 2*intermediate], gate/up interleaved
    assert torch.equal(infos[f"{p}.gate_proj.weight"][1](), fused[..., 0::2].transpose(1, 2))
    assert torch.equal(infos[f"{p}.up_proj.weight"][1](), fused[..., 1::2].transpose(1, 2))
    assert torch.equal(infos[f"{p}.up_proj.bias"][1](), ckpt.get(f"{p}.gate_up_proj_bias")[:, 1::2])
    assert torch.equal(infos[f"{p}.down_proj.weight"][1](), ckpt.get(f"{p}.down_proj").transpose(1, 2))
    assert "lm_head.weight" in infos
    with pytest.raises(ValueError, match="hf_state_dict"):
        arch.hf_tensors(f"{p}.gate_proj.weight", torch.zeros(4, 64, 64), ckpt.config)


def test_lazy_and_one_tensor_at_a_time(tiny_model, monkeypatch):
    ckpt = Checkpoint(tiny_model("qwen3_moe"))
    reads = []
    real = Checkpoint.get
    monkeypatch.setattr(Checkpoint, "get", lambda self, n, out=None: reads.append(n) or real(self, n, out))
    items = list(arch.mlx_tensors(ckpt))
    assert reads == []  # listing reads headers only
    dict((i.name, l) for i, l in items)["model.layers.0.mlp.switch_mlp.up_proj.weight"]()
    assert reads == [f"model.layers.0.mlp.experts.{e}.up_proj.weight" for e in range(4)]


def test_mxfp4_dequantize_matches_transformers():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    torch.manual_seed(0)
    blocks = torch.randint(0, 256, (3, 8, 4, 16), dtype=torch.uint8)
    scales = torch.randint(110, 135, (3, 8, 4), dtype=torch.uint8)
    ours = arch.dequantize_mxfp4(blocks, scales)  # [E, out, in]
    theirs = convert_moe_packed_tensors(blocks, scales)  # [E, in, out]
    assert torch.equal(ours, theirs.transpose(1, 2))


def test_gpt_oss_mxfp4_source(tiny_model, tmp_path):
    """A gpt-oss checkpoint with MXFP4 experts (as published) gives the MLX tensors of its dequantized weights."""
    from safetensors.torch import load_file, save_file

    src = tiny_model("gpt_oss")
    sd = load_file(str(src / "model.safetensors"))
    deq = {}
    for k in list(sd):
        if k.endswith("gate_up_proj") or k.endswith("down_proj"):
            w = sd.pop(k).transpose(1, 2)  # [E, out, in]
            blocks, scales = mxfp4_encode(w)
            sd[k + "_blocks"], sd[k + "_scales"] = blocks, scales
            deq[k] = arch.dequantize_mxfp4(blocks, scales).transpose(1, 2).contiguous()
    out = tmp_path / "mxfp4"
    out.mkdir()
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]}
    (out / "config.json").write_text(json.dumps(cfg))
    plain = tmp_path / "plain"
    plain.mkdir()
    save_file({**{k: v for k, v in sd.items() if "_blocks" not in k and "_scales" not in k}, **deq},
              str(plain / "model.safetensors"))
    (plain / "config.json").write_text((src / "config.json").read_text())
    a = {i.name: l() for i, l in arch.mlx_tensors(Checkpoint(out))}
    b = {i.name: l() for i, l in arch.mlx_tensors(Checkpoint(plain))}
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert "quantization_config" not in arch.mlx_config(cfg, tied=False)


def test_mlx_config_compat():
    cfg = {"model_type": "qwen3_moe", "num_local_experts": 8, "dtype": "bfloat16",
           "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}
    c = arch.mlx_config(cfg, tied=False)
    assert c["num_experts"] == 8 and c["rope_theta"] == 5e5 and c["torch_dtype"] == "bfloat16"
    assert "rope_scaling" not in c and c["tie_word_embeddings"] is False
    rope = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
    g = arch.mlx_config({"model_type": "gemma3_text",
                         "layer_types": ["sliding_attention"] * 5 + ["full_attention"] + ["sliding_attention"] * 2,
                         "rope_parameters": rope}, tied=True)
    assert g["sliding_window_pattern"] == 6 and g["rope_theta"] == 1e6 and g["rope_local_base_freq"] == 1e4
    assert g["rope_scaling"]["type"] == "linear" and g["rope_scaling"]["factor"] == 8.0
    with pytest.raises(MixqError, match="periodic"):
        types = ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]
        arch.mlx_config({"model_type": "gemma3_text", "layer_types": types}, tied=True)
    y = arch.mlx_config({"model_type": "gpt_oss", "rope_parameters": {"rope_type": "yarn", "factor": 32.0,
                                                                       "rope_theta": 150000.0}}, tied=False)
    assert y["rope_scaling"]["type"] == "yarn" and y["rope_theta"] == 150000.0


def test_unknown_architecture_message():
    with pytest.raises(MixqError) as e:
        arch.check_supported({"model_type": "mamba"})
    assert "mamba" in str(e.value) and "gpt_oss" in str(e.value) and "llama" in str(e.value)


def test_checkpoint_sharded_matches_single(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    src = tiny_model("mistral")
    AutoModelForCausalLM.from_pretrained(str(src)).save_pretrained(tmp_path / "s", max_shard_size="30KB")
    one, many = Checkpoint(src), Checkpoint(tmp_path / "s")
    assert len(many.files) > 2 and set(one.names()) == set(many.names())
    for n in one.names():
        assert torch.equal(one.get(n), many.get(n)), n
    infos = {t.name: t for t in many.tensor_infos()}
    assert infos["model.embed_tokens.weight"].dtype == "bfloat16"


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_checkpoint_errors(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    src = tiny_model("llama")
    with pytest.raises(MixqError, match="config.json"):
        Checkpoint(tmp_path)
    trunc = _copy(src, tmp_path / "trunc")
    data = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) - 1000])
    with pytest.raises(MixqError, match=r"model\.safetensors.*truncated or corrupt"):
        Checkpoint(trunc)
    junk = _copy(src, tmp_path / "junk")
    (junk / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(MixqError, match="not a valid safetensors file"):
        Checkpoint(junk)
    AutoModelForCausalLM.from_pretrained(str(src)).save_pretrained(tmp_path / "shards", max_shard_size="30KB")
    victim = sorted((tmp_path / "shards").glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(MixqError, match=victim.name):
        Checkpoint(tmp_path / "shards")
    binonly = tmp_path / "bin"
    binonly.mkdir()
    (binonly / "config.json").write_text((src / "config.json").read_text())
    (binonly / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(MixqError, match="safetensors"):
        Checkpoint(binonly)


def test_writer_round_trip(tmp_path):
    from safetensors.torch import load_file

    ts = {"a": torch.randn(3, 5, dtype=torch.bfloat16), "b": torch.arange(7, dtype=torch.int32).to(torch.uint32),
          "c": torch.zeros(0, 4), "d": torch.tensor(2.5, dtype=torch.float16)}
    w = SafetensorsWriter(tmp_path / "x.safetensors", [(k, tuple(v.shape), v.dtype) for k, v in ts.items()],
                          metadata={"format": "mlx"})
    for k, v in ts.items():
        w.write(k, v)
    w.close()
    back = load_file(str(tmp_path / "x.safetensors"))
    assert all(torch.equal(back[k], v) for k, v in ts.items())
    assert read_header(tmp_path / "x.safetensors")[1] == {"format": "mlx"}
    assert (tmp_path / "x.safetensors").stat().st_size == w.size

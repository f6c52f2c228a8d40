"""Tiny GGUF files written with `gguf.GGUFWriter` from tiny random HF models, for import tests.

`write_tiny_gguf(arch, tmp)` builds a tiny transformers model (tests/tiny_models.py), applies what
llama.cpp's convert_hf_to_gguf.py applies (llama q/k row permutation, Gemma's norm + 1), quantizes
its matrices into a cycle of GGUF types and returns the GGUF path together with the tensors the
import must give back (the dequantized values in transformers' layout).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tiny_models import SPECIAL, _tokenizer_json, make_tiny_hf

GGUF_ARCH = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3_text": "gemma3"}

_LAYER = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(name: str, arch: str) -> str:
    """llama.cpp's name for a transformers tensor name (the forward of mixq's mapping, written independently)."""
    glob = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    stem, _, suffix = name.rpartition(".")
    if stem in glob:
        return f"{glob[stem]}.{suffix}"
    _, _, layer, *module = stem.split(".")
    module = ".".join(module)
    if arch == "gemma3_text":
        extra = {"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
                 "post_feedforward_layernorm": "post_ffw_norm"}
    else:
        extra = {"post_attention_layernorm": "ffn_norm"}
    return f"blk.{layer}.{({**_LAYER, **extra})[module]}.{suffix}"


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute (rows of q/k for its rope layout)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def random_kquant(rows: int, cols: int, qtype, rng) -> np.ndarray:
    """Random but valid Q4_K / Q5_K / Q6_K blocks (the numpy gguf package can read but not write K-quants)."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    d = np.full((rows, cols // block), 0.002, dtype=np.float16).view(np.uint8).reshape(rows, cols // block, 2)
    if qtype in (gguf.GGMLQuantizationType.Q4_K, gguf.GGMLQuantizationType.Q5_K):  # d, dmin first
        raw[..., 0:2] = d
        raw[..., 2:4] = d
    else:  # Q6_K: d last
        raw[..., size - 2:] = d
    return raw.reshape(rows, -1)


def write_tiny_gguf(arch: str, tmp: Path, types=None, hidden: int = 256, seed: int = 0, **overrides):
    """(gguf_path, hf_dir, expected {hf_name: float32 array}) for a tiny `arch` model."""
    import gguf
    from gguf import GGMLQuantizationType as T
    from safetensors.torch import load_file

    tmp = Path(tmp)
    types = list(types or [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q4_K, T.Q6_K, T.F16, T.BF16, T.F32])
    kw = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=4, num_key_value_heads=2,
              head_dim=hidden // 4, num_hidden_layers=2)
    if arch == "gemma3_text":
        # llama.cpp fixes Gemma 3's layer pattern (5 sliding, then 1 full) and its local rope base
        kw.update(query_pre_attn_scalar=hidden // 4, num_hidden_layers=6, sliding_window=8,
                  layer_types=["sliding_attention"] * 5 + ["full_attention"],
                  rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 100000.0},
                                   "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})
    kw.update(overrides)
    hf_dir = make_tiny_hf(arch, tmp / f"hf_{arch}", seed=seed, **kw)
    cfg = json.loads((hf_dir / "config.json").read_text())
    state = {k: v.float().numpy() for k, v in load_file(str(hf_dir / "model.safetensors")).items()}
    ga = GGUF_ARCH[arch]
    path = tmp / f"tiny_{arch}.gguf"
    w = gguf.GGUFWriter(str(path), ga)
    w.add_name(f"tiny {arch}")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_key_length(cfg["head_dim"])
    w.add_value_length(cfg["head_dim"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    rope = cfg.get("rope_parameters") or {}
    theta = (rope.get("full_attention") or rope).get("rope_theta", 10000.0)
    w.add_rope_freq_base(theta)
    if arch == "gemma3_text":
        w.add_sliding_window(cfg["sliding_window"])
    # tokenizer: the tiny byte-level BPE as llama.cpp stores a gpt2-style vocabulary
    tj = json.loads(_tokenizer_json())
    vocab = dict(tj["model"]["vocab"])
    for s in SPECIAL:
        vocab.setdefault(s, len(vocab))
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    w.add_vocab_size(cfg["vocab_size"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIAL else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_eos_token_id(vocab["<|im_end|>"])
    w.add_pad_token_id(vocab["<|endoftext|>"])
    w.add_add_bos_token(False)
    w.add_chat_template(json.loads((hf_dir / "tokenizer_config.json").read_text())["chat_template"])

    rng = np.random.default_rng(seed)
    expected, i = {}, 0
    for name, x in state.items():
        g = gguf_name(name, arch)
        y = x.copy()
        if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            y = permute(y, cfg["num_attention_heads"] if ".q_proj." in name else cfg["num_key_value_heads"])
        if arch == "gemma3_text" and name.endswith("norm.weight"):
            y = y + np.float32(1.0)
        if y.ndim == 1:
            w.add_tensor(g, y.astype(np.float32))
            expected[name] = x.astype(np.float32)
            continue
        qt = types[i % len(types)]
        i += 1
        if qt in (T.Q4_K, T.Q5_K, T.Q6_K):
            raw = random_kquant(y.shape[0], y.shape[1], qt, rng)
        else:
            raw = gguf.quants.quantize(y.astype(np.float32), qt)
        w.add_tensor(g, raw, raw_dtype=qt)
        back = gguf.quants.dequantize(raw, qt).astype(np.float32).reshape(y.shape)
        if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            n = cfg["num_attention_heads"] if ".q_proj." in name else cfg["num_key_value_heads"]
            back = back.reshape(n, back.shape[0] // n // 2, 2, -1).swapaxes(1, 2).reshape(back.shape)
        expected[name] = back
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, hf_dir, expected

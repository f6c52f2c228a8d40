"""Tiny random Hugging Face checkpoints of every supported architecture, for fast tests.

`make_tiny_hf(arch, path)` writes a real `transformers` folder (config.json, model.safetensors in
bfloat16, a small working byte-level BPE tokenizer with a chat template, generation_config.json)
that both `transformers` and, after `mixq convert`, `mlx_lm.load` open. Hidden size 64, 2-4 layers,
every input dimension divisible by 32 (unless an override says otherwise). Overrides go into the
config, e.g. `make_tiny_hf("llama", p, num_hidden_layers=5)` (every-4th-layer rules become visible)
or `intermediate_size=72` (a down_proj whose input dimension no group size divides).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

ARCHS = ("llama", "qwen2", "qwen3", "mistral", "gemma3_text", "phi3", "qwen3_moe", "gpt_oss")
# Named variants: name -> (arch, overrides)
VARIANTS = {"llama-5l": ("llama", {"num_hidden_layers": 5})}  # every-4th-layer rules visible (layers 0 and 4)

_COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=1, head_dim=32, max_position_embeddings=256, rms_norm_eps=1e-5,
               initializer_range=0.06)

# Per architecture: config overrides that make it tiny but keep its characteristic features.
_CONFIGS: dict[str, dict] = {
    "llama": dict(tie_word_embeddings=True, num_hidden_layers=4,  # SmolLM2-like: tied, GQA
                  rope_parameters={"rope_type": "default", "rope_theta": 50000.0}),
    "qwen2": dict(tie_word_embeddings=False,  # q/k/v biases
                  rope_parameters={"rope_type": "default", "rope_theta": 200000.0}),
    "qwen3": dict(tie_word_embeddings=True,  # q/k norms
                  rope_parameters={"rope_type": "default", "rope_theta": 200000.0}),
    "mistral": dict(tie_word_embeddings=False, sliding_window=None,
                    rope_parameters={"rope_type": "default", "rope_theta": 100000.0}),
    "gemma3_text": dict(tie_word_embeddings=True, num_hidden_layers=4, head_dim=32, query_pre_attn_scalar=32,
                        sliding_window=8, layer_types=["sliding_attention", "full_attention"] * 2,
                        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 100000.0},
                                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
    "phi3": dict(tie_word_embeddings=False, num_key_value_heads=2,  # fused qkv_proj and gate_up_proj
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "qwen3_moe": dict(tie_word_embeddings=False, moe_intermediate_size=64, num_experts=4, num_experts_per_tok=2,
                      decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True,
                      rope_parameters={"rope_type": "default", "rope_theta": 100000.0}),
    "gpt_oss": dict(tie_word_embeddings=False, intermediate_size=64, max_position_embeddings=131072,
                    num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
                    layer_types=["sliding_attention", "full_attention"]),
}

_TEXT = """The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
Paris is the capital of France. Berlin is the capital of Germany. Rome is the capital of Italy.
Quantization maps each group of weights to a few bits with a scale and a bias per group.
def add(a, b):\n    return a + b\nprint(add(2, 3))
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Questions? Answers! "Quotes" and (parentheses) [brackets].
The model reads the prompt, computes the logits, and samples the next token from its distribution.
"""

CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
                 "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    """A byte-level BPE tokenizer trained on a few lines of text (~320 tokens), as tokenizer.json text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_TEXT.splitlines() * 4, trainer=trainer)
    return tok.to_str()


def tokenizer_vocab_size() -> int:
    return len(json.loads(_tokenizer_json())["model"]["vocab"]) + len(SPECIAL)


def write_tokenizer(path: Path) -> int:
    """Write tokenizer.json + tokenizer_config.json (with chat template) into `path`; return vocab size."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    text = _tokenizer_json()
    (path / "tokenizer.json").write_text(text)
    vocab = json.loads(text)["model"]["vocab"]
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
        "model_max_length": 256, "clean_up_tokenization_spaces": False, "add_prefix_space": False,
        "chat_template": CHAT_TEMPLATE,
    }, indent=2))
    (path / "special_tokens_map.json").write_text(json.dumps(
        {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, indent=2))
    return max(vocab.values()) + 1


def make_tiny_hf(arch: str, path, seed: int = 0, **overrides) -> Path:
    """Write a tiny random HF folder of architecture `arch` (a transformers model_type, or a VARIANTS name)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if arch in VARIANTS:
        arch, extra = VARIANTS[arch]
        overrides = {**extra, **overrides}
    if arch not in _CONFIGS:
        raise ValueError(f"unknown tiny arch {arch!r}; choose from {', '.join(ARCHS + tuple(VARIANTS))}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab_size = write_tokenizer(path)
    eos_id = json.loads(_tokenizer_json())["model"]["vocab"].get("<|im_end|>", 2)
    kw = {**_COMMON, **_CONFIGS[arch], "vocab_size": vocab_size, "eos_token_id": eos_id, "pad_token_id": 0,
          "bos_token_id": None, **overrides}
    if "num_hidden_layers" in overrides and "layer_types" in _CONFIGS[arch] and "layer_types" not in overrides:
        kw["layer_types"] = [_CONFIGS[arch]["layer_types"][i % 2] for i in range(overrides["num_hidden_layers"])]
    config = AutoConfig.for_model(arch, **kw)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.ndim == 1 or name.endswith("sinks"):  # norms, biases, sinks: not constant
                    p.add_(torch.randn_like(p) * 0.1)
    model = model.to(torch.bfloat16)
    model.generation_config.eos_token_id = eos_id
    model.save_pretrained(path)
    return path


if __name__ == "__main__":  # python tests/tiny_models.py OUT_DIR: write one of each
    import sys
    import time

    out = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/mixq_tiny")
    for a in ARCHS:
        t = time.time()
        make_tiny_hf(a, out / a)
        print(f"{a}: {time.time() - t:.2f}s -> {out / a}")


def mxfp4_encode(w):
    """A float tensor [..., n] -> (blocks [..., n/32, 16] uint8, scales [..., n/32] uint8), nearest FP4 values."""
    import torch

    from mixq.quant import arch

    lut = torch.tensor(arch._FP4_VALUES)
    *lead, n = w.shape
    g = w.float().reshape(*lead, n // 32, 32)
    exp = torch.ceil(torch.log2(g.abs().amax(-1).clamp_min(1e-30) / 6)).clamp(-127, 127)
    scaled = g / torch.exp2(exp)[..., None]
    idx = (scaled[..., None] - lut).abs().argmin(-1).to(torch.uint8)
    blocks = idx[..., 0::2] | (idx[..., 1::2] << 4)
    return blocks.contiguous(), (exp + 127).to(torch.uint8)


def make_mxfp4_gpt_oss(src: Path, out: Path) -> Path:
    """The tiny gpt_oss folder `src` as OpenAI publishes gpt-oss: experts as MXFP4 `*_blocks` / `*_scales`
    (nearest FP4 values of the bf16 weights), `quantization_config` mxfp4, and a `rope_scaling` key as the
    published config.json has (mlx-lm reads that one, not transformers 5's `rope_parameters`)."""
    import shutil

    from safetensors.torch import load_file, save_file

    sd = load_file(str(src / "model.safetensors"))
    for k in list(sd):
        if k.endswith("gate_up_proj") or k.endswith("down_proj"):
            sd[k + "_blocks"], sd[k + "_scales"] = mxfp4_encode(sd.pop(k).transpose(1, 2))  # [E, out, in]
    out.mkdir(parents=True)
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    for f in src.iterdir():
        if f.name not in ("model.safetensors", "config.json") and f.is_file():
            shutil.copy(f, out / f.name)
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]}
    rope = dict(cfg.get("rope_parameters") or {})
    if rope:
        cfg["rope_scaling"], cfg["rope_theta"] = rope, rope.get("rope_theta", 10000.0)
    (out / "config.json").write_text(json.dumps(cfg))
    return out

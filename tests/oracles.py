"""Oracles shared by the conversion tests: a converted folder's logits through mlx_lm and through torch
(transformers built from the folder's weights, dequantized by mixq's bit-exact code), and the source's own."""

from __future__ import annotations

import json

import numpy as np
import torch

from mixq.quant import arch
from mixq.quant.artifact import read_artifact
from mixq.quant.quantize import dequantize

try:
    import mlx.core as mx
except ImportError:  # tests that need it are marked mlx and skipped
    mx = None


def mlx_dequantized_named(folder):
    """(MLX name, torch tensor) of a converted folder, quantized weights dequantized (bit-exact torch code)."""
    from safetensors.torch import load_file

    art = read_artifact(folder)
    raw = {}
    for f in art.files:
        raw.update(load_file(str(f)))
    for t in art.tensors:
        if t.bits:
            m = t.path
            yield t.name, dequantize(raw[f"{m}.weight"], raw[f"{m}.scales"], raw.get(f"{m}.biases"), t.bits,
                                     t.group_size, mode=t.mode, dtype=torch.float32)
        else:
            yield t.name, raw[t.name]


def torch_logits(folder, tokens):
    """Logits of the transformers model built from the folder's dequantized weights, in float32."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    cfg = json.loads((folder / "config.json").read_text())
    config = AutoConfig.for_model(**arch.hf_config(cfg))
    sd = arch.hf_state_dict(mlx_dequantized_named(folder), cfg)
    model = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)].from_pretrained(None, config=config, state_dict=sd,
                                                                       dtype=torch.float32).eval()
    emb = model.get_input_embeddings()
    if hasattr(emb, "embed_scale"):  # gemma: mlx_lm scales by sqrt(hidden) rounded to bf16 (as transformers in bf16)
        emb.embed_scale.copy_(emb.embed_scale.to(torch.bfloat16).float())
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.float().numpy()


def source_logits(folder, tokens):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.float().numpy()


def mlx_logits(folder, tokens, dequantized=True):
    """Logits of mlx_lm.load(folder); dequantized=True: weights dequantized by mx.dequantize, run in float32."""
    from mlx.utils import tree_map
    from mlx_lm import load
    from mlx_lm.utils import dequantize_model

    model, _ = load(str(folder))
    if dequantized:
        model = dequantize_model(model)
        model.update(tree_map(lambda p: p.astype(mx.float32) if mx.issubdtype(p.dtype, mx.floating) else p,
                              model.parameters()))
    out = model(mx.array(tokens))
    return np.array(out.astype(mx.float32))


def rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())

"""Off-grid re-parametrization: move a dequantized GGUF's weights off its quantization grid.

A model dequantized from a GGUF has every projection's rows on that format's block grid (Q4_1,
Q4_K, Q5_0, Q8_0: blocks of 32 along the input dimension), so re-quantizing it with 4 bits and
group 32 is nearly lossless and every comparison of quants at those widths is distorted. This
module applies a fixed, seeded, *function-preserving* change of parameters, in the style of
SmoothQuant/AWQ equalization: per-channel factors drawn log-uniformly from [1/2, 2] scale a
projection's input columns, and the inverse factors are folded into whatever produces that input.

Folds, per layer `l` (all exact in real arithmetic; computed in float64, stored in the source dtype):

  A. q/k/v_proj columns *= a;   the norm before attention /= a
     (llama/qwen: `input_layernorm.weight` w -> w/a;  gemma3 computes x*(1+w): w -> (1+w)/a - 1)
  B. gate/up_proj columns *= b; the norm before the MLP /= b
     (llama/qwen: `post_attention_layernorm`;  gemma3: `pre_feedforward_layernorm`, same (1+w) rule)
  C. o_proj columns *= c;       v_proj rows (and v bias) /= c, per KV head: o_proj's column for
     query head h, channel d uses c[(h // (heads/kv_heads)), d] (attention is linear in V)
  D. down_proj columns *= e;    up_proj rows (and bias) /= e (act(gate) * up is linear in up)

Deliberately *not* folded, because the fold would not be exact:
  - q/k_proj rows: qwen3 and gemma3 RMS-normalize each q/k head (`q_norm`, `k_norm`), and rope
    mixes channel pairs, so a per-row factor on q or k changes the attention scores.
  - gemma3's `post_attention_layernorm` / `post_feedforward_layernorm`: they RMS-normalize the
    outputs of o_proj / down_proj, so those rows cannot be rescaled; they stay as imported, as do
    `q_norm`/`k_norm` and the final norm.
  - the embedding (and a tied head): it feeds the residual stream, which every RMSNorm reads.
So the token embedding keeps its GGUF grid (Q8_0 in both embedded models); every projection is off-grid.

The factors depend only on (seed, layer, fold), so each tensor is transformed on its own, streamed
from the source folder to the output (memory: one tensor). The seed and the method are recorded
in `mixq_provenance.json` under "offgrid".
"""

from __future__ import annotations

import json
import math
import shutil
import zlib
from pathlib import Path

import torch

from mixq.errors import MixqError
from mixq.io.files import PROVENANCE_FILE, check_output, read_provenance, staged_dir
from mixq.io.safetensors import DTYPES, INDEX_FILE, read_headers, write_sharded

DEFAULT_SEED = 20250101
LOG_RANGE = math.log(2.0)  # factors exp(U(-ln 2, ln 2)): log-uniform in [1/2, 2]
SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
METHOD = ("per-channel log-uniform [1/2, 2] factors: q/k/v columns vs the pre-attention norm, gate/up "
          "columns vs the pre-MLP norm, o_proj columns vs v_proj rows per KV head, down_proj columns vs "
          "up_proj rows; function-preserving (see mixq/sources/offgrid.py)")


def factors(seed: int, layer: int, fold: str, n: int) -> torch.Tensor:
    """The float64 factors of one fold of one layer: log-uniform in [1/2, 2], seeded."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(f"{layer}:{fold}".encode())) % (2**63))
    return torch.exp((torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1) * LOG_RANGE)


def _gemma(config: dict) -> bool:
    return config.get("model_type") == "gemma3_text"


def transform(name: str, w: torch.Tensor, config: dict, seed: int = DEFAULT_SEED) -> torch.Tensor:
    """The re-parametrized value of tensor `name` (transformers naming); unchanged if no fold touches it."""
    parts = name.split(".")
    if len(parts) < 5 or parts[:2] != ["model", "layers"]:
        return w
    layer, module, kind = int(parts[2]), ".".join(parts[3:-1]), parts[-1]
    hidden = config["hidden_size"]
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    gemma = _gemma(config)
    mlp_norm = "pre_feedforward_layernorm" if gemma else "post_attention_layernorm"
    x = w.to(torch.float64)

    def norm_div(f):  # fold 1/f into an RMSNorm weight (gemma: x * (1 + w))
        return (1.0 + x) / f - 1.0 if gemma else x / f

    if module == "input_layernorm" and kind == "weight":
        y = norm_div(factors(seed, layer, "attn_in", hidden))
    elif module == mlp_norm and kind == "weight":
        y = norm_div(factors(seed, layer, "mlp_in", hidden))
    elif module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj") and kind == "weight":
        y = x * factors(seed, layer, "attn_in", hidden)[None, :]
        if module == "self_attn.v_proj":
            y = y / factors(seed, layer, "v_out", kv * head_dim)[:, None]
    elif module == "self_attn.v_proj" and kind == "bias":
        y = x / factors(seed, layer, "v_out", kv * head_dim)
    elif module == "self_attn.o_proj" and kind == "weight":
        c = factors(seed, layer, "v_out", kv * head_dim).view(kv, head_dim)
        y = x * c.repeat_interleave(heads // kv, dim=0).reshape(-1)[None, :]
    elif module in ("mlp.gate_proj", "mlp.up_proj") and kind == "weight":
        y = x * factors(seed, layer, "mlp_in", hidden)[None, :]
        if module == "mlp.up_proj":
            y = y / factors(seed, layer, "mlp_mid", x.shape[0])[:, None]
    elif module == "mlp.up_proj" and kind == "bias":
        y = x / factors(seed, layer, "mlp_mid", x.shape[0])
    elif module == "mlp.down_proj" and kind == "weight":
        y = x * factors(seed, layer, "mlp_mid", x.shape[1])[None, :]
    else:
        return w
    return y.to(w.dtype)


def apply_offgrid(src, out, *, seed: int = DEFAULT_SEED, force: bool = False, progress: bool = True,
                  extra_provenance: dict | None = None) -> Path:
    """Write the off-grid re-parametrization of Hugging Face folder `src` to `out`; returns `out`."""
    from safetensors import safe_open

    src, out = Path(src), Path(out)
    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        raise MixqError(f"{src}: no config.json; give a Hugging Face model folder")
    config = json.loads(cfg_path.read_text())
    if config.get("model_type") not in SUPPORTED:
        raise MixqError(f"{src}: off-grid re-parametrization supports model types {', '.join(SUPPORTED)}, "
                        f"not {config.get('model_type')!r}")
    if "quantization" in config:
        raise MixqError(f"{src}: is already quantized (MLX); re-parametrize the unquantized source instead")
    check_output(out, force, protect=[src])
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise MixqError(f"{src}: no .safetensors files; give a Hugging Face model folder")
    index = read_headers(files)  # name -> (file, entry, data start)
    dtypes = {e["dtype"] for _, e, _ in index.values()}
    if len(dtypes) != 1 or next(iter(dtypes)) not in ("F32", "BF16", "F16"):
        raise MixqError(f"{src}: expected all tensors in one float dtype (F32/BF16/F16), found {sorted(dtypes)}")
    dtype = DTYPES[dtypes.pop()]
    handles = {}

    def produce(name: str) -> torch.Tensor:
        file = index[name][0]
        if file not in handles:
            handles[file] = safe_open(str(file), "pt")
        return transform(name, handles[file].get_tensor(name), config, seed)

    with staged_dir(out, force, protect=[src]) as tmp:
        for p in src.iterdir():
            if p.is_file() and not p.name.endswith(".safetensors") and p.name != INDEX_FILE:
                shutil.copy2(p, tmp / p.name)
        write_sharded(tmp, [(n, tuple(e["shape"]), dtype) for n, (_, e, _) in index.items()], produce,
                      progress=progress, desc=f"off-grid {out.name}")
        handles.clear()
        prov_path = tmp / PROVENANCE_FILE
        prov = read_provenance(tmp)
        prov["kind"] = prov.get("kind", "hf") + "+offgrid"
        prov["offgrid"] = {
            "seed": seed, "method": METHOD, "factor_range": [0.5, 2.0], "distribution": "log-uniform",
            "source_folder": src.name,
            "folds": ["q/k/v_proj columns vs pre-attention norm", "gate/up_proj columns vs pre-MLP norm",
                      "o_proj columns vs v_proj rows (per KV head)", "down_proj columns vs up_proj rows"],
            "unchanged": "embedding/head, final norm, q/k norms" + (
                ", post-attention/post-feedforward norms" if _gemma(config) else ""),
        }
        if prov.get("dequantized_from_gguf"):
            prov["note"] = (prov.get("note", "") + "; then re-parametrized off that grid "
                            "(function-preserving per-channel rescaling)").lstrip("; ")
        if extra_provenance:
            prov.update(extra_provenance)
        prov_path.write_text(json.dumps(prov, indent=2))
    return out

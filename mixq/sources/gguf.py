"""GGUF -> Hugging Face folder: dequantized safetensors, config.json, tokenizer, provenance.

`mixq import MODEL.gguf|NAME OUT`. The tensors are dequantized with the `gguf` package (every type
it can read), renamed from llama.cpp's names to transformers' names, and the transformations
llama.cpp's `convert_hf_to_gguf.py` applied are undone:

- llama: the rows of `attn_q` / `attn_k` were permuted (`LlamaModel.permute`, for its rope layout);
  we apply the inverse permutation.
- gemma3: every `*norm.weight` was stored as `w + 1` (Gemma's RMSNorm computes `x * (1 + w)`,
  llama.cpp's computes `x * w`); we subtract the 1 again.
- tied embeddings (no `output.weight`): no `lm_head.weight` is written and `tie_word_embeddings` is true.

Memory is bounded by the largest tensor: the safetensors header is planned from the GGUF's tensor
table and each tensor is dequantized (big matrices in row blocks of 64 MB) and written straight to
disk; the GGUF itself is memory-mapped. The folder is built beside OUT
and renamed at the end; `mixq_provenance.json` records the source file, its sha256 and the GGUF
quantization types: an imported model is a *dequantized* model.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mixq.errors import MixqError
from mixq.io.files import PROVENANCE_FILE, check_output, sha256_file, staged_dir
from mixq.io.safetensors import write_sharded
from mixq.version import __version__

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma3")
DTYPES = ("float32", "bfloat16", "float16")
MAX_SHARD_BYTES = 4 * 1024**3
_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# llama.cpp per-layer tensor name -> transformers per-layer module path (shared by all architectures)
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# where the norm before the MLP goes differs: gemma3 has four norms per layer
_FFN_NORM = {
    "llama": {"ffn_norm": "post_attention_layernorm"},
    "qwen2": {"ffn_norm": "post_attention_layernorm"},
    "qwen3": {"ffn_norm": "post_attention_layernorm"},
    "gemma3": {
        "post_attention_norm": "post_attention_layernorm",
        "ffn_norm": "pre_feedforward_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
    },
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_SKIPPED = {"rope_freqs.weight"}  # handled through config (or refused) rather than written


# ----------------------------------------------------------------------------------------- reading

def open_gguf(path: Path):
    """A `gguf.GGUFReader` for `path`; a one-line MixqError for anything that is not a whole GGUF."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise MixqError(f"{path}: no such file (give a .gguf file or an embedded model name; see `mixq models`)")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise MixqError(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes); give a .gguf model "
                        "file or an embedded model name (see `mixq models`)")
    try:
        reader = gguf.GGUFReader(str(path), "r")
    except Exception as e:  # the reader raises ValueError/IndexError/... on short or corrupt files
        raise MixqError(f"{path}: truncated or corrupt GGUF file ({type(e).__name__}: {str(e)[:120]}); "
                        "download it again") from None
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
            raise MixqError(f"{path}: truncated GGUF file (tensor {t.name} ends past the end of the file); "
                            "download it again")
    return reader


def gguf_metadata(reader) -> dict:
    """Scalar and string metadata, plus small arrays; the big tokenizer arrays are left out."""
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and len(field.data) > 64:
            continue
        try:
            meta[key] = field.contents()
        except Exception:
            continue
    return meta


def _type_is_readable(qtype) -> bool:
    import gguf
    from gguf.quants import dequantize

    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    try:
        dequantize(np.zeros((1, type_size), dtype=np.uint8), qtype)
        return True
    except Exception:
        return False


# ------------------------------------------------------------------------------------ config.json

def _f32(x) -> float:
    """A float32 metadata value as the short decimal it was written from (9.9999997e-06 -> 1e-05)."""
    return float(str(np.float32(x)))


def _get(meta: dict, arch: str, key: str, default=None):
    return meta.get(f"{arch}.{key}", default)


def _int(meta: dict, arch: str, key: str, path: Path, default=None) -> int:
    """A positive integer hyper-parameter `{arch}.{key}` of the GGUF metadata (a one-line MixqError otherwise)."""
    v = _get(meta, arch, key, default)
    try:
        ok = v is not None and not isinstance(v, (bool, str)) and int(v) == v and int(v) >= 1
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok:
        said = "is missing" if v is None else f"is {v!r}, not a positive integer"
        raise MixqError(f"{path}: GGUF hyper-parameter {arch}.{key} {said}; the file is incomplete or damaged: "
                        "re-export or download it again")
    return int(v)


def hf_config(meta: dict, tensor_names: set[str], vocab_size: int, path: Path) -> dict:
    """config.json for the model this GGUF holds (transformers and mlx-lm both read it)."""
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise MixqError(f"{path}: GGUF architecture {arch!r} is not supported; "
                        f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}; use a GGUF of one of these")
    hidden = _int(meta, arch, "embedding_length", path)
    heads = _int(meta, arch, "attention.head_count", path)
    kv_heads = _int(meta, arch, "attention.head_count_kv", path, heads)
    head_dim = _int(meta, arch, "attention.key_length", path, hidden // heads or None)
    n_layers = _int(meta, arch, "block_count", path)
    if heads % kv_heads:
        raise MixqError(f"{path}: GGUF hyper-parameters {arch}.attention.head_count {heads} is not a multiple of "
                        f"head_count_kv {kv_heads}; the file is damaged: re-export or download it again")
    tied = "output.weight" not in tensor_names
    if "rope_freqs.weight" in tensor_names:
        raise MixqError(f"{path}: this GGUF carries llama3-style rope frequency factors (rope_freqs.weight), "
                        "which mixq cannot map back to a rope_scaling config yet; import the original "
                        "Hugging Face checkpoint instead")
    cfg = {
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": _int(meta, arch, "feed_forward_length", path),
        "num_hidden_layers": n_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": _f32(_get(meta, arch, "attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(_get(meta, arch, "rope.freq_base", 10000.0)),
        "max_position_embeddings": _int(meta, arch, "context_length", path, 2048),
        "tie_word_embeddings": tied,
        "torch_dtype": "float32",
    }
    for name, key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                      ("pad_token_id", "padding_token_id")):
        if f"tokenizer.ggml.{key}" in meta:
            cfg[name] = int(meta[f"tokenizer.ggml.{key}"])
    scaling_type = _get(meta, arch, "rope.scaling.type")
    if scaling_type and scaling_type != "none":
        cfg["rope_scaling"] = {"rope_type": scaling_type, "type": scaling_type,
                               "factor": float(_get(meta, arch, "rope.scaling.factor", 1.0))}
        orig = _get(meta, arch, "rope.scaling.original_context_length")
        if orig:
            cfg["rope_scaling"]["original_max_position_embeddings"] = int(orig)
    has_bias = "blk.0.attn_q.bias" in tensor_names
    if arch == "llama":
        cfg.update(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu",
                   attention_bias=has_bias, mlp_bias=False)
    elif arch == "qwen2":
        cfg.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_act="silu",
                   use_sliding_window=False)
    elif arch == "qwen3":
        cfg.update(architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_act="silu",
                   attention_bias=has_bias)
    elif arch == "gemma3":
        pattern = 6  # llama.cpp hard-codes Gemma 3's 5 local : 1 global layer pattern as well
        # llama.cpp's attention scale: 1/sqrt(head_dim), except the 27B (62 layers): 1/sqrt(hidden/heads)
        scalar = hidden // heads if n_layers == 62 else head_dim
        cfg.update(
            architectures=["Gemma3ForCausalLM"], model_type="gemma3_text",
            hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=scalar,
            sliding_window=int(_get(meta, arch, "attention.sliding_window", 512)),
            sliding_window_pattern=pattern, rope_local_base_freq=10000.0,
            layer_types=["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                         for i in range(n_layers)],
            final_logit_softcapping=None, attn_logit_softcapping=None, attention_bias=False,
        )
    return cfg


# ----------------------------------------------------------------------------------- tensor names

@dataclass
class _Item:
    hf_name: str
    tensor: object  # gguf ReaderTensor
    shape: tuple[int, ...]  # Hugging Face (row-major) shape


def hf_name(gguf_name: str, arch: str) -> str | None:
    """transformers' name for a llama.cpp tensor name (None: not a tensor we know)."""
    stem, _, suffix = gguf_name.rpartition(".")
    if stem in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[stem]}.{suffix}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk":
        layer, short = parts[1], parts[2]
        module = _LAYER_NAMES.get(short) or _FFN_NORM[arch].get(short)
        if module:
            return f"model.layers.{layer}.{module}.{suffix}"
    return None


def _plan(reader, arch: str, path: Path) -> list[_Item]:
    items = []
    for t in reader.tensors:
        if t.name in _SKIPPED:
            continue
        name = hf_name(t.name, arch)
        if name is None:
            raise MixqError(f"{path}: tensor {t.name} has no known Hugging Face name for architecture {arch}; "
                            "this GGUF variant is not supported")
        items.append(_Item(name, t, tuple(int(x) for x in reversed(t.shape.tolist()))))

    def order(item: _Item):
        n = item.hf_name
        if n.startswith("model.layers."):
            return (1, int(n.split(".")[2]), n)
        return (0 if "embed" in n else 2, 0, n)

    return sorted(items, key=order)


def check_shapes(items: list[_Item], cfg: dict, path: Path) -> None:
    """Refuse a GGUF whose tensors disagree with its hyper-parameters (layer count, sizes): the folder written
    from it would hold weights its config.json does not describe."""
    hidden, inter, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv, vocab = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd, cfg["vocab_size"]
    want = {"embed_tokens": (vocab, hidden), "lm_head": (vocab, hidden), "q_proj": (q, hidden),
            "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, q), "gate_proj": (inter, hidden),
            "up_proj": (inter, hidden), "down_proj": (hidden, inter), "q_norm": (hd,), "k_norm": (hd,)}
    per_layer: dict[int, set[str]] = {}
    for it in items:
        parts = it.hf_name.split(".")
        module, leaf = parts[-2], parts[-1]
        if it.hf_name.startswith("model.layers."):
            per_layer.setdefault(int(parts[2]), set()).add(".".join(parts[3:]))
        shape = want.get(module, (hidden,)) if leaf == "weight" else (want.get(module, (hidden,))[0],)
        if it.shape != shape:
            raise MixqError(f"{path}: tensor {it.tensor.name} has shape {list(it.shape)}, the GGUF's hyper-parameters "
                            f"give {list(shape)}; the file is damaged: re-export or download it again")
    layers = sorted(per_layer)
    if layers != list(range(cfg["num_hidden_layers"])):
        raise MixqError(f"{path}: the GGUF says {cfg['num_hidden_layers']} layers (block_count) but holds tensors "
                        f"of {len(layers)} (blk.{layers[0] if layers else '-'}..{layers[-1] if layers else '-'}); "
                        "the file is damaged: re-export or download it again")
    first = per_layer[0]
    for i in layers:
        if per_layer[i] != first:
            odd = sorted(per_layer[i] ^ first)[0]
            raise MixqError(f"{path}: layer {i} and layer 0 hold different tensors ({odd}); the file is "
                            "incomplete or damaged: re-export or download it again")


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's `LlamaModel.permute` on the rows of q/k (weights or biases)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permuted_heads(hf_name: str, arch: str, cfg: dict) -> int | None:
    """The head count whose llama.cpp row permutation `hf_name` carries in the GGUF (llama q/k), else None."""
    if arch != "llama" or not (".q_proj." in hf_name or ".k_proj." in hf_name):
        return None
    return cfg["num_attention_heads"] if ".q_proj." in hf_name else cfg["num_key_value_heads"]


def source_tensors(gguf_path) -> tuple[str, dict]:
    """(architecture, {Hugging Face tensor name: the GGUF's ReaderTensor}) of a GGUF: the raw blocks, for
    keeping them as they are (`quant.gguf_quants`)."""
    path = Path(gguf_path)
    reader = open_gguf(path)
    arch = gguf_metadata(reader).get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise MixqError(f"{path}: GGUF architecture {arch!r} is not supported; "
                        f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}; use a GGUF of one of these")
    return arch, {it.hf_name: it.tensor for it in _plan(reader, arch, path)}


CHUNK_ELEMENTS = 1 << 24  # dequantize big tensors in row blocks of at most this many values (64 MB)


def _load(item: _Item, arch: str, cfg: dict, rows: slice | None = None) -> np.ndarray:
    """The tensor (or a block of its rows) dequantized to float32, in transformers' layout and convention."""
    from gguf.quants import dequantize

    t = item.tensor
    data = np.asarray(t.data)
    shape = item.shape
    if rows is not None:
        data = data[rows]
        shape = (data.shape[0],) + tuple(shape[1:])
    try:
        w = dequantize(data, t.tensor_type)
    except NotImplementedError:
        raise MixqError(f"tensor {t.name}: GGUF type {t.tensor_type.name} cannot be dequantized by the installed "
                        "gguf package; upgrade it (pip install -U gguf)") from None
    w = np.array(w, dtype=np.float32).reshape(shape)  # a copy: the reader's arrays are read-only maps
    n = item.hf_name
    n_head = permuted_heads(n, arch, cfg)
    if n_head:
        w = unpermute(w, n_head)
    if arch == "gemma3" and n.endswith("norm.weight"):
        w = w - np.float32(1.0)
    return w


def _load_blocks(item: _Item, arch: str, cfg: dict):
    """The tensor as one array, or (big matrices with no row permutation) a generator of row blocks."""
    permuted = permuted_heads(item.hf_name, arch, cfg) is not None
    if len(item.shape) < 2 or permuted or math.prod(item.shape) <= CHUNK_ELEMENTS:
        return _load(item, arch, cfg)
    step = max(1, CHUNK_ELEMENTS // math.prod(item.shape[1:]))
    return (_load(item, arch, cfg, slice(a, a + step)) for a in range(0, item.shape[0], step))


# ------------------------------------------------------------------------------------ tokenizer

def write_tokenizer(gguf_path: Path, meta: dict, out_dir: Path) -> dict:
    """tokenizer.json + tokenizer_config.json (+ chat template) rebuilt from the GGUF vocabulary.

    Uses transformers' GGUF tokenizer builders (byte-level BPE from `tokenizer.ggml.merges`; Gemma's
    SentencePiece-BPE with merges recovered from the vocabulary order), then sets the special tokens,
    the BOS behaviour and the chat template the file states. Returns a summary for the provenance.
    """
    from tokenizers import pre_tokenizers
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            add_gguf_special_tokens,
            get_gguf_tokenizer,
            select_tokenizer_builder,
            set_split_regex,
        )
    except ImportError:
        import transformers
        raise MixqError(f"{gguf_path}: transformers {transformers.__version__} has no GGUF tokenizer builders "
                        "(transformers.integrations.gguf); install transformers>=5.24") from None

    try:
        arch, tdict, tconfig = get_gguf_tokenizer(str(gguf_path))
        tok = select_tokenizer_builder(arch, tdict.get("tokenizer_type"))(tdict)
    except (KeyError, ValueError) as e:
        raise MixqError(f"{gguf_path}: cannot build a tokenizer from this GGUF's vocabulary ({e})") from None
    tok = add_gguf_special_tokens(tok, tdict)
    tok = set_split_regex(tok, tdict)
    if tdict.get("pre_tokenizer_type") == "smollm":
        # llama.cpp's "smollm" pre-tokenizer: single digits, then GPT-2's byte-level split
        tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True),
             pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        if tconfig.get(key) is not None:
            setattr(tok, key, tconfig[key])
    add_bos = str(tconfig.get("add_bos_token", False)).lower() == "true"
    add_eos = str(tconfig.get("add_eos_token", False)).lower() == "true"
    tok.add_bos_token, tok.add_eos_token = add_bos, add_eos
    if hasattr(tok, "update_post_processor"):
        tok.update_post_processor()
    if tconfig.get("chat_template"):
        tok.chat_template = tconfig["chat_template"]
    tok.save_pretrained(str(out_dir))
    return {"class": type(tok).__name__, "model": tdict.get("tokenizer_type"),
            "pre": tdict.get("pre_tokenizer_type"), "vocab": len(tdict["tokens"]),
            "add_bos_token": add_bos, "chat_template": bool(tconfig.get("chat_template"))}


def _eos_ids(meta: dict, out_dir: Path, cfg: dict) -> list[int]:
    ids = [cfg["eos_token_id"]] if "eos_token_id" in cfg else []
    for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        if key in meta and int(meta[key]) not in ids:
            ids.append(int(meta[key]))
    if cfg.get("model_type") == "gemma3_text":  # Gemma ends a chat turn with <end_of_turn>
        vocab = json.loads((out_dir / "tokenizer.json").read_text())["model"]["vocab"]
        if "<end_of_turn>" in vocab and vocab["<end_of_turn>"] not in ids:
            ids.append(vocab["<end_of_turn>"])
    return ids


# --------------------------------------------------------------------------------------- import

def import_gguf(gguf_path, out_dir, dtype: str = "float32", *, force: bool = False,
                progress: bool = True, sha256: str | None = None) -> Path:
    """Import a GGUF file as a Hugging Face folder at `out_dir`; returns `out_dir`."""

    gguf_path, out = Path(gguf_path), Path(out_dir)
    if dtype not in DTYPES:
        raise MixqError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    check_output(out, force, protect=[gguf_path])
    reader = open_gguf(gguf_path)
    meta = gguf_metadata(reader)
    arch = meta.get("general.architecture")
    names = {t.name for t in reader.tensors}
    if arch not in SUPPORTED_ARCHITECTURES:
        raise MixqError(f"{gguf_path}: GGUF architecture {arch!r} is not supported; "
                        f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}; use a GGUF of one of these")
    bad = sorted({t.tensor_type.name for t in reader.tensors if not _type_is_readable(t.tensor_type)})
    if bad:
        first = next(t.name for t in reader.tensors if t.tensor_type.name == bad[0])
        raise MixqError(f"{gguf_path}: tensor {first} has GGUF type {bad[0]}, which the installed gguf package "
                        "cannot dequantize; upgrade it (pip install -U gguf) or use another quantization")
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embd is None:
        raise MixqError(f"{gguf_path}: no token_embd.weight tensor; not a language model GGUF")
    vocab_size = int(embd.shape[-1])
    try:
        cfg = hf_config(meta, names, vocab_size, gguf_path)
    except (TypeError, ValueError, OverflowError) as e:
        raise MixqError(f"{gguf_path}: a GGUF hyper-parameter has a value of the wrong type ({e}); the file is "
                        "damaged: re-export or download it again") from None
    cfg["torch_dtype"] = dtype
    items = _plan(reader, arch, gguf_path)
    check_shapes(items, cfg, gguf_path)
    by_name = {it.hf_name: it for it in items}
    digest = sha256 or sha256_file(gguf_path)

    with staged_dir(out, force, protect=[gguf_path]) as tmp:
        write_sharded(tmp, [(it.hf_name, it.shape, _TORCH_DTYPES[dtype]) for it in items],
                      lambda name: _load_blocks(by_name[name], arch, cfg), max_shard_bytes=MAX_SHARD_BYTES,
                      progress=progress, desc=f"import {gguf_path.name}")
        tok_info = write_tokenizer(gguf_path, meta, tmp)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        gen = {k: cfg[k] for k in ("bos_token_id", "pad_token_id") if k in cfg}
        eos = _eos_ids(meta, tmp, cfg)
        if eos:
            gen["eos_token_id"] = eos[0] if len(eos) == 1 else eos
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        prov = {
            "mixq_version": __version__,
            "kind": "gguf-import",
            "dequantized_from_gguf": True,
            "source": {"file": gguf_path.name, "sha256": digest, "size_bytes": gguf_path.stat().st_size},
            "gguf": {
                "architecture": arch,
                "name": meta.get("general.name"),
                "license": meta.get("general.license"),
                "file_type": meta.get("general.file_type"),
                "tensor_types": dict(Counter(it.tensor.tensor_type.name for it in items)),
                "tensor_type_by_name": {it.hf_name: it.tensor.tensor_type.name for it in items},
            },
            "dtype": dtype,
            "tokenizer": tok_info,
            "transforms": (["llama q/k row permutation undone"] if arch == "llama" else [])
            + (["gemma norm weights: stored w+1, written w"] if arch == "gemma3" else []),
            "note": f"dequantized from a GGUF ({', '.join(sorted({it.tensor.tensor_type.name for it in items}))}); "
                    "its weights lie on that format's quantization grid",
        }
        (tmp / PROVENANCE_FILE).write_text(json.dumps(prov, indent=2))
    return out

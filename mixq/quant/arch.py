"""Supported architectures and the Hugging Face <-> MLX tensor layouts.

`mlx_tensors(ckpt)` yields each tensor as mlx-lm's model expects it after its `sanitize` (stacked
MoE experts, gpt-oss's split gate/up experts, no rotary buffers, no tied head), lazily: nothing is
read until a loader is called, and a loader builds at most one (stacked) tensor. `mlx_config` adds
the config keys mlx-lm 0.32 reads but transformers >= 5 no longer writes (rope_theta, num_experts...).
`hf_tensors` / `hf_state_dict` go back from MLX names to Hugging Face checkpoint names, for loading a
dequantized MLX folder into transformers.
"""

from __future__ import annotations

import re
from collections import defaultdict
from functools import partial
from typing import Callable, Iterable, Iterator

import torch

from mixq.errors import MixqError
from mixq.quant.quantize import Quantized
from mixq.quant.spec import Spec
from mixq.quant.tensors import TensorInfo

SUPPORTED = ("llama", "qwen2", "qwen3", "mistral", "gemma3_text", "phi3", "qwen3_moe", "gpt_oss")

_QWEN3_MOE_EXPERT = re.compile(r"^(model\.layers\.(\d+)\.mlp)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_GPT_OSS_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)(_bias|_blocks|_scales)?$")
_FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)

Loader = Callable[[], torch.Tensor]
_MXFP4 = Spec(4, 32, "mxfp4")


def model_type(config: dict) -> str:
    return config.get("model_type") or (config.get("text_config") or {}).get("model_type") or "?"


def check_supported(config: dict) -> str:
    """The config's model_type, or a MixqError listing the supported ones."""
    mt = model_type(config)
    if mt not in SUPPORTED:
        raise MixqError(f"model_type {mt!r} (config.json) is not supported; use a model of a supported type: "
                        f"{', '.join(SUPPORTED)}")
    return mt


def is_tied(ckpt) -> bool:
    """Whether the output head is the embedding (lm_head dropped, as mlx-lm's sanitize does)."""
    if model_type(ckpt.config) == "gpt_oss":
        return False  # mlx-lm's gpt_oss always has its own lm_head
    if "lm_head.weight" not in ckpt:
        return True
    return bool(ckpt.config.get("tie_word_embeddings", False))


def _natural(name: str):
    return [int(p) if p.isdigit() else p for p in name.split(".")]


def mlx_tensors(ckpt) -> Iterator[tuple[object, Loader]]:
    """(TensorInfo in MLX layout, loader) for every tensor of the MLX model, in natural name order."""

    mt = check_supported(ckpt.config)
    tied = is_tied(ckpt)
    out: dict[str, tuple[tuple[int, ...], torch.dtype, Loader]] = {}
    used: set[str] = set()

    if mt == "qwen3_moe":
        groups: dict[tuple[str, str], dict[int, str]] = defaultdict(dict)
        for n in ckpt.names():
            m = _QWEN3_MOE_EXPERT.match(n)
            if m:
                groups[(m.group(1), m.group(4))][int(m.group(3))] = n
        for (prefix, proj), experts in groups.items():
            out[f"{prefix}.switch_mlp.{proj}.weight"] = _stacked(ckpt, prefix, proj, experts)
            used.update(experts.values())
    elif mt == "gpt_oss":
        for n in ckpt.names():
            m = _GPT_OSS_EXPERT.match(n)
            if m:
                used.add(n)
                out.update(_gpt_oss_expert(ckpt, m.group(1), m.group(2), m.group(3) or ""))

    for n in ckpt.names():
        if n in used or n.endswith("rotary_emb.inv_freq") or (tied and n == "lm_head.weight"):
            continue
        out[n] = (ckpt.shape(n), ckpt.dtype(n), (lambda n=n: ckpt.get(n)))

    shipped = source_loaders(ckpt)
    for name in sorted(out, key=_natural):
        shape, dtype, loader = out[name]
        yield TensorInfo(name, tuple(shape), str(dtype).removeprefix("torch."),
                         "mxfp4" if name in shipped else None), loader


def source_loaders(ckpt) -> dict[str, Callable[[], Quantized]]:
    """{MLX tensor name: loader of the tensor as the checkpoint ships it, quantized} for tensors MLX holds as
    shipped: gpt-oss's MXFP4 experts (`*_blocks` [E, out, G, 16] uint8, low nibble first = mlx's packing; `*_scales`
    [E, out, G] E8M0 = mlx's mxfp4 scales), split and laid out as mlx-lm's gpt_oss `sanitize` does (gate/up =
    even/odd rows of gate_up)."""
    if model_type(ckpt.config) != "gpt_oss":
        return {}
    out = {}
    for n in ckpt.names():
        m = _GPT_OSS_EXPERT.match(n)
        if not m or m.group(3) != "_blocks" or f"{m.group(1)}.{m.group(2)}_scales" not in ckpt:
            continue
        prefix, kind = m.group(1), m.group(2)

        def whole(name=n, scales=f"{prefix}.{kind}_scales"):
            b = ckpt.get(name).contiguous()
            return b.view(torch.uint32).reshape(*b.shape[:-2], -1), ckpt.get(scales)

        def part(rows, whole=whole):
            wq, s = whole()
            return Quantized(wq[:, rows].contiguous(), s[:, rows].contiguous(), None, _MXFP4)

        if kind == "down_proj":
            out[f"{prefix}.down_proj.weight"] = partial(part, slice(None))
        else:
            out[f"{prefix}.gate_proj.weight"] = partial(part, slice(0, None, 2))
            out[f"{prefix}.up_proj.weight"] = partial(part, slice(1, None, 2))
    return out


def _stacked(ckpt, prefix, proj, experts: dict[int, str]):
    n = len(experts)
    if sorted(experts) != list(range(n)):
        missing = sorted(set(range(max(experts) + 1)) - set(experts))
        raise MixqError(f"{ckpt.path}: {prefix}.experts.{missing[0]}.{proj}.weight is missing; "
                        "the checkpoint is incomplete")
    names = [experts[e] for e in range(n)]
    shape, dtype = ckpt.shape(names[0]), ckpt.dtype(names[0])
    for x in names:
        if ckpt.shape(x) != shape or ckpt.dtype(x) != dtype:
            raise MixqError(f"{ckpt.path}: expert tensor {x} has shape {ckpt.shape(x)} {ckpt.dtype(x)}, "
                            f"expected {shape} {dtype} like {names[0]}")

    def load():
        t = torch.empty((n, *shape), dtype=dtype)
        for e, x in enumerate(names):
            ckpt.get(x, out=t[e])
        return t

    return (n, *shape), dtype, load


def _fp4_pairs(dtype: torch.dtype) -> torch.Tensor:
    """[256, 2]: the two E2M1 values of each byte, low nibble first (one lookup per byte, not two per nibble)."""
    lut = torch.tensor(_FP4_VALUES, dtype=dtype)
    byte = torch.arange(256)
    return torch.stack([lut[byte & 0x0F], lut[byte >> 4]], dim=1)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype=torch.bfloat16) -> torch.Tensor:
    """OpenAI MXFP4 ([..., G, 16] uint8 blocks, low nibble first; [..., G] uint8 e8m0 scales) -> [..., G*32]."""
    pairs = _fp4_pairs(dtype)
    *prefix, g, b = blocks.shape
    out = torch.empty((*prefix, g, b * 2), dtype=dtype)
    rows = 1 << 20
    flat_b, flat_s, flat_o = blocks.reshape(-1, b), scales.reshape(-1, 1).to(torch.int32) - 127, out.view(-1, b * 2)
    for r in range(0, flat_b.shape[0], rows):
        sub = flat_o[r:r + rows]
        torch.index_select(pairs, 0, flat_b[r:r + rows].reshape(-1).long(), out=sub.view(-1, 2))
        torch.ldexp(sub, flat_s[r:r + rows].to(dtype), out=sub)
    return out.view(*prefix, g * b * 2)


def _gpt_oss_expert(ckpt, prefix: str, kind: str, suffix: str) -> dict:
    """MLX entries for one of gpt-oss's fused expert tensors (bf16 [E, in, out] or MXFP4 [E, out, in])."""
    name = f"{prefix}.{kind}{suffix}"
    if suffix == "_scales":
        return {}  # consumed with its _blocks
    if suffix == "_blocks":
        scales = f"{prefix}.{kind}_scales"
        if scales not in ckpt:
            raise MixqError(f"{ckpt.path}: {name} has no {scales}; the checkpoint is incomplete")
        e, rows, g, b = ckpt.shape(name)
        shape, dtype = (e, rows, g * b * 2), torch.bfloat16

        def full(rows=slice(None)):  # [E, out, in]; only the rows asked for are decoded
            return dequantize_mxfp4(ckpt.get(name)[:, rows], ckpt.get(scales)[:, rows], dtype)
    elif suffix == "":
        e, i, o = ckpt.shape(name)
        shape, dtype = (e, o, i), ckpt.dtype(name)

        def full(rows=slice(None)):  # [E, in, out] -> [E, out, in]
            return ckpt.get(name).transpose(1, 2)[:, rows]
    else:  # _bias: [E, out]
        shape, dtype = ckpt.shape(name), ckpt.dtype(name)

        def full(rows=slice(None)):
            return ckpt.get(name)[:, rows]

    attr = "bias" if suffix == "_bias" else "weight"
    if kind == "down_proj":
        return {f"{prefix}.down_proj.{attr}": (shape, dtype, lambda: full().contiguous())}
    half = (*shape[:1], shape[1] // 2, *shape[2:])
    return {
        f"{prefix}.gate_proj.{attr}": (half, dtype, lambda: full(slice(0, None, 2)).contiguous()),
        f"{prefix}.up_proj.{attr}": (half, dtype, lambda: full(slice(1, None, 2)).contiguous()),
    }


def _sliding_pattern(layer_types: list[str]) -> int | None:
    """The period p with layer i global iff (i + 1) % p == 0 (mlx-lm's gemma3 rule), if there is one."""
    n = len(layer_types)
    for p in range(1, n + 2):
        if all((lt == "full_attention") == ((i + 1) % p == 0) for i, lt in enumerate(layer_types)):
            return p
    return None


def _set_rope(c: dict, params: dict) -> None:
    """mlx-lm's `rope_theta` / `rope_scaling` keys from one of transformers 5's `rope_parameters`."""
    if "rope_theta" in params:
        c.setdefault("rope_theta", params["rope_theta"])
    if params.get("rope_type", "default") != "default":
        c.setdefault("rope_scaling", {**params, "type": params["rope_type"]})


def mlx_config(config: dict, *, tied: bool) -> dict:
    """The source config plus what mlx-lm 0.32 needs for this architecture; source quantization dropped."""
    mt = check_supported(config)
    c = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config", "_name_or_path")}
    if mt != "gpt_oss":
        c["tie_word_embeddings"] = tied
    if "dtype" in c and "torch_dtype" not in c:
        c["torch_dtype"] = c["dtype"]
    rp = c.get("rope_parameters") or {}
    if mt == "gemma3_text":
        full = rp.get("full_attention", rp if "rope_theta" in rp else {})
        local = rp.get("sliding_attention", {})
        _set_rope(c, full)
        if "rope_theta" in local:
            c.setdefault("rope_local_base_freq", local["rope_theta"])
        if c.get("layer_types"):
            p = _sliding_pattern(c["layer_types"])
            if p is None:
                raise MixqError("config.json: gemma3_text layer_types are not periodic (every p-th layer global); "
                                "mlx-lm cannot represent this model")
            c["sliding_window_pattern"] = p
        elif "_sliding_window_pattern" in c:
            c.setdefault("sliding_window_pattern", c["_sliding_window_pattern"])
    elif "rope_theta" in rp:
        _set_rope(c, rp)
    if mt == "qwen3_moe" and "num_experts" not in c and "num_local_experts" in c:
        c["num_experts"] = c["num_local_experts"]
    if mt == "gpt_oss" and c.get("layer_types") and c.get("sliding_window") is None:
        c["sliding_window"] = 128
    return c


def hf_config(mlx_cfg: dict) -> dict:
    """An MLX folder's config.json as a Hugging Face config dict (quantization keys removed)."""
    return {k: v for k, v in mlx_cfg.items() if k not in ("quantization", "quantization_config")}


def hf_tensors(mlx_name: str, tensor: torch.Tensor, config: dict) -> list[tuple[str, torch.Tensor]]:
    """HF checkpoint (name, tensor) pairs for one MLX tensor (dequantized), inverse of `mlx_tensors`.

    gpt-oss's gate_proj/up_proj are two halves of one HF tensor: use `hf_state_dict` for those.
    """
    mt = model_type(config)
    if mt == "qwen3_moe":
        m = re.match(r"^(model\.layers\.\d+\.mlp)\.switch_mlp\.(gate_proj|up_proj|down_proj)\.weight$", mlx_name)
        if m:
            return [(f"{m.group(1)}.experts.{e}.{m.group(2)}.weight", tensor[e]) for e in range(tensor.shape[0])]
    if mt == "gpt_oss":
        m = re.match(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_proj|up_proj|down_proj)\.(weight|bias)$", mlx_name)
        if m and m.group(2) != "down_proj":
            raise ValueError(f"{mlx_name}: gpt_oss gate/up experts are fused in HF; use arch.hf_state_dict")
        if m and m.group(3) == "weight":
            return [(f"{m.group(1)}.down_proj", tensor.transpose(1, 2))]
        if m:
            return [(f"{m.group(1)}.down_proj_bias", tensor)]
    return [(mlx_name, tensor)]


def hf_state_dict(named: Iterable[tuple[str, torch.Tensor]], config: dict) -> dict[str, torch.Tensor]:
    """HF checkpoint state dict from MLX (name, dequantized tensor) pairs (a tied head stays absent).

    Load it with `ModelClass.from_pretrained(None, config=hf_cfg, state_dict=sd)` (transformers applies
    its own checkpoint -> module conversions, e.g. fusing MoE experts).
    """
    sd: dict[str, torch.Tensor] = {}
    halves: dict[tuple[str, str], dict[str, torch.Tensor]] = defaultdict(dict)
    mt = model_type(config)
    for name, t in named:
        m = re.match(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_proj|up_proj)\.(weight|bias)$", name)
        if mt == "gpt_oss" and m:
            halves[(m.group(1), m.group(3))][m.group(2)] = t
            continue
        sd.update(hf_tensors(name, t, config))
    for (prefix, attr), parts in halves.items():
        if set(parts) != {"gate_proj", "up_proj"}:
            raise MixqError(f"{prefix}: gate_proj/up_proj {attr} incomplete in the MLX folder")
        g, u = parts["gate_proj"], parts["up_proj"]
        fused = torch.stack([g, u], dim=2).flatten(1, 2)  # interleave rows: [E, 2*out, ...]
        sd[f"{prefix}.gate_up_proj" + ("_bias" if attr == "bias" else "")] = (
            fused.transpose(1, 2).contiguous() if attr == "weight" else fused)
    return sd

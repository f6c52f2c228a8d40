"""What a tensor is: its name, shape and dtype, and its role in the model (classified once, here).

Like llama.cpp's tensor categories: `classify(path)` tells the role of a module path (embedding, output
head, attention, MLP, MoE experts, MoE router, norm, other) and its decoder layer. Every part of
mixq that groups or selects tensors (recipes, planning, sensitivity measurement, model cards) asks here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

EMBEDDING, HEAD, ATTENTION, MLP, EXPERTS, ROUTER, NORM, OTHER = (
    "embedding", "head", "attention", "mlp", "experts", "router", "norm", "other")
CATEGORIES = (EMBEDDING, ATTENTION, MLP, EXPERTS, ROUTER, HEAD, NORM, OTHER)

_ATTENTION = re.compile(r"(self_attn|attention|attn)\.(q_proj|k_proj|v_proj|o_proj|qkv_proj|dense|out_proj)$")
_MLP = re.compile(r"(mlp|feed_forward)\.(gate_proj|up_proj|down_proj|gate_up_proj|fc1|fc2)$")
_EXPERTS = re.compile(r"(switch_mlp|experts)(\.|$)")
_ROUTER = re.compile(r"\.(mlp|block_sparse_moe)\.(gate|router)$|\.router$")


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str          # torch name, e.g. "bfloat16"
    source_mode: str | None = None   # the MLX mode the checkpoint ships it in (gpt-oss MXFP4 experts), if any


@dataclass(frozen=True)
class TensorRole:
    category: str       # one of CATEGORIES
    layer: int | None   # decoder layer, None outside the layers


def module_path(name: str) -> str:
    """The module path of a tensor name: `...q_proj.weight` -> `...q_proj` (the key config.json uses)."""
    return name.removesuffix(".weight")


def layer_index(path: str) -> int | None:
    """The first all-digit component of the path (the decoder layer, as mlx-lm's predicates read it), or None."""
    for part in path.split("."):
        if part.isdigit():
            return int(part)
    return None


def is_norm(path: str) -> bool:
    last = path.rsplit(".", 1)[-1]
    return "norm" in last or last in ("ln_f", "ln_1", "ln_2")


def is_experts(path: str) -> bool:
    parts = path.split(".")
    return "switch_mlp" in parts or "experts" in parts


def classify(path: str) -> TensorRole:
    """The role and layer of a module path (or tensor name) such as `model.layers.3.self_attn.q_proj`."""
    m = module_path(path).lower()
    if "embed_tokens" in m or m.endswith("wte") or "embeddings" in m:
        category = EMBEDDING
    elif m.endswith("lm_head"):
        category = HEAD
    elif _EXPERTS.search(m):
        category = EXPERTS
    elif _ROUTER.search(m):
        category = ROUTER
    elif _ATTENTION.search(m):
        category = ATTENTION
    elif _MLP.search(m):
        category = MLP
    elif is_norm(m):
        category = NORM
    else:
        category = OTHER
    return TensorRole(category, layer_index(m))

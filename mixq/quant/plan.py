"""The per-tensor plan a recipe gives for a model: each tensor's spec (or keep), stored dtype and bytes.

Planning adds what no recipe can override (see `plan_model`): norms, biases, 1-D tensors and tensors
whose input dimension the group size does not divide stay unquantized; MoE routers get 8 bits.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

from mixq.errors import MixqError
from mixq.quant.recipe import Recipe, load_recipe
from mixq.quant.spec import DTYPE_BYTES, FLOAT_MODES, QUANT_DTYPES, Spec, bits_per_weight, precision, spec_nbytes
from mixq.quant.tensors import TensorInfo, is_experts, is_norm, layer_index, module_path

# model_type -> suffix of the router module path, as in mlx-lm's per-model quant_predicate
ROUTERS = {"qwen3_moe": "mlp.gate", "gpt_oss": "router"}
ROUTER_SPEC = Spec(8, 64)


@dataclass
class TensorPlan:
    name: str
    shape: tuple[int, ...]
    dtype: str          # dtype the tensor (or its scales/biases) is stored in
    spec: Spec | None   # None = kept unquantized
    reason: str
    nbytes: int
    source: bool = False  # stored as the source ships it (its loader returns `quantize.Quantized`)
    method: str = "rtn"  # how it is quantized (recipe.METHODS); "rtn" for kept and float-mode tensors

    @property
    def module_path(self) -> str:
        return module_path(self.name)

    @property
    def params(self) -> int:
        return math.prod(self.shape)


def _dtype_name(dtype) -> str:
    s = str(dtype)
    return s[len("torch."):] if s.startswith("torch.") else s


def _dtype_bytes(dtype: str, name: str) -> int:
    try:
        return DTYPE_BYTES[dtype]
    except KeyError:
        raise MixqError(f"tensor {name}: unknown dtype {dtype!r}") from None


def _n_layers(config: dict, tensors) -> int | None:
    for cfg in (config, config.get("text_config") or {}):
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if isinstance(cfg.get(key), int):
                return cfg[key]
    idx = [layer_index(t.name) for t in tensors]
    idx = [i for i in idx if i is not None]
    return max(idx) + 1 if idx else None


@dataclass
class Plan:
    recipe: Recipe
    tensors: list[TensorPlan]
    n_layers: int | None = None
    tied: bool = False

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def total_params(self) -> int:
        return sum(t.params for t in self.tensors)

    @property
    def quantized(self) -> list[TensorPlan]:
        return [t for t in self.tensors if t.spec is not None]

    def calibrated(self) -> list[TensorPlan]:
        """The tensors whose method needs calibration (anything but round-to-nearest)."""
        return [t for t in self.tensors if t.method != "rtn"]

    @property
    def quantized_params(self) -> int:
        return sum(t.params for t in self.quantized)

    @property
    def quantized_bytes(self) -> int:
        return sum(t.nbytes for t in self.quantized)

    @property
    def bits_per_weight(self) -> float:
        """Whole model: all stored bytes (incl. scales, biases, kept tensors) * 8 / all parameters."""
        return bits_per_weight(self.total_bytes, self.total_params)

    @property
    def bits_per_weight_quantized(self) -> float:
        """Quantized tensors only, scales and biases included (4-bit g64 with bf16 scales = 4.5)."""
        return bits_per_weight(self.quantized_bytes, self.quantized_params)

    def default_spec(self) -> Spec | None:
        """The spec written as config.json's top-level default: the recipe's, else the commonest used."""
        if self.recipe.default is not None:
            return self.recipe.default
        counts = Counter()
        for t in self.quantized:
            counts[t.spec] += t.params
        return max(counts, key=lambda s: (counts[s], precision(s))) if counts else None

    def quantization_config(self) -> dict | None:
        """config.json "quantization" (also written as "quantization_config"), as mlx_lm writes and reads it:
        the default spec with its mode, plus `module_path: {group_size, bits[, mode]}` for every quantized
        module that differs (mlx-lm reads an entry without "mode" as affine, whatever the default's mode)."""
        if not self.quantized:
            return None
        d = self.default_spec()
        cfg = {"group_size": d.group_size, "bits": d.bits, "mode": d.mode}
        for t in self.quantized:
            if t.spec != d:
                cfg[t.module_path] = t.spec.config()
        return cfg

    def specs(self) -> dict[str, dict | None]:
        """tensor name -> {"bits", "group_size"[, "mode"]} or None (kept): for provenance files."""
        def entry(spec):
            d = {"bits": spec.bits, "group_size": spec.group_size}
            return d if spec.mode == "affine" else {**d, "mode": spec.mode}
        return {t.name: (entry(t.spec) if t.spec else None) for t in self.tensors}

    def table_rows(self) -> list[dict]:
        """One dict per tensor for printing: path, shape, dtype, bits, group_size, mode (None if kept), mb, reason."""
        return [{"path": t.name, "shape": "x".join(map(str, t.shape)), "dtype": t.dtype,
                 "bits": t.spec.bits if t.spec else None,
                 "group_size": t.spec.group_size if t.spec else None,
                 "mode": t.spec.mode if t.spec else None,
                 "mb": t.nbytes / 1e6, "reason": t.reason} for t in self.tensors]

    def summary(self) -> dict:
        """Totals, plus the share of parameters per spec ("6-bit g32", ..., "kept")."""
        by = {}
        for t in self.tensors:
            key = str(t.spec) if t.spec else "kept"
            e = by.setdefault(key, {"tensors": 0, "params": 0, "bytes": 0})
            e["tensors"] += 1
            e["params"] += t.params
            e["bytes"] += t.nbytes
        for e in by.values():
            e["share"] = e["params"] / self.total_params if self.total_params else 0.0
        return {"recipe": self.recipe.name, "n_tensors": len(self.tensors),
                "n_quantized": len(self.quantized), "total_bytes": self.total_bytes,
                "total_params": self.total_params, "quantized_params": self.quantized_params,
                "quantized_bytes": self.quantized_bytes, "bits_per_weight": self.bits_per_weight,
                "bits_per_weight_quantized": self.bits_per_weight_quantized,
                "n_layers": self.n_layers, "tied_embeddings": self.tied,
                "by_spec": dict(sorted(by.items(), key=lambda kv: -kv[1]["params"]))}


def plan_model(tensors: list[TensorInfo], recipe: Recipe | str, config: dict, *, dtype: str | None = None) -> Plan:
    """Decide every tensor's spec (or keep) and its stored size.

    `dtype`: the dtype floating tensors are stored in (convert --dtype); default: the recipe's
    `dtype` if it has one, else each tensor's own.
    """
    recipe = load_recipe(recipe)
    config = config or {}
    target = _dtype_name(dtype) if dtype is not None else recipe.dtype
    n_layers = _n_layers(config, tensors)
    model_type = config.get("model_type") or (config.get("text_config") or {}).get("model_type")
    router_suffix = ROUTERS.get(model_type)
    names = {t.name for t in tensors}
    has_head = any(n == "lm_head.weight" or n.endswith(".lm_head.weight") for n in names)
    tied = not has_head and config.get("tie_word_embeddings", True) is not False \
        and any(n.endswith("embed_tokens.weight") for n in names)

    out = []
    for t in tensors:
        shape = tuple(int(d) for d in t.shape)
        dt = _dtype_name(t.dtype)
        if target is not None and dt in ("float32", "float16", "bfloat16", "float64"):
            dt = target
        nb = _dtype_bytes(dt, t.name)
        path = module_path(t.name)
        spec, reason, rule = None, "", None
        if not t.name.endswith(".weight"):
            reason = "bias" if t.name.endswith(".bias") else "not a .weight tensor"
        elif is_norm(path):
            reason = "norm"
        elif len(shape) == 1:
            reason = "1-D tensor"
        elif len(shape) == 3 and not is_experts(path):
            reason = "3-D tensor that is not stacked experts"
        elif len(shape) not in (2, 3):
            reason = f"{len(shape)}-D tensor"
        elif dt not in QUANT_DTYPES:
            reason = f"{dt} tensor"
        else:
            rule, spec = recipe.match(path, n_layers=n_layers)
            reason = rule.describe() if rule else "default"
            if rule is not None and rule.keep_source and t.source_mode:
                spec = Spec(*FLOAT_MODES[t.source_mode], t.source_mode)
                out.append(TensorPlan(t.name, shape, dt, spec, f"kept as it ships ({t.source_mode}): {reason}",
                                      spec_nbytes(shape, spec, nb), source=True))
                continue
            if tied and recipe.tied_head and path.endswith("embed_tokens"):
                head_rule, head_spec = recipe.match("lm_head", n_layers=n_layers)
                if head_rule is not None and precision(head_spec) > precision(spec):
                    spec, rule = head_spec, head_rule
                    reason = f"tied head: {head_rule.describe()}"
            if router_suffix and path.endswith(router_suffix) and spec is not None \
                    and not (rule and rule.names(router_suffix.rsplit(".", 1)[-1])):
                spec = ROUTER_SPEC
                reason = f"MoE router: {spec} (as mlx-lm's {model_type} predicate)"
            if spec is None:
                reason = "kept: " + ("recipe default" if reason == "default" else reason)
            elif shape[-1] % spec.group_size:
                reason = f"input dim {shape[-1]} not divisible by group {spec.group_size}: kept"
                spec = None
            elif spec.mode == "nvfp4" and math.prod(shape) % 32:
                reason = f"nvfp4 needs a multiple of 32 weights in mlx 0.32, {math.prod(shape)} is not: kept"
                spec = None
        if spec is not None:  # packed words + scales (+ biases, affine) in the tensor's dtype (float modes: uint8)
            nbytes = spec_nbytes(shape, spec, nb)
        else:
            nbytes = math.prod(shape) * nb
        out.append(TensorPlan(t.name, shape, dt, spec, reason, nbytes, method=recipe.method_for(rule, spec)))
    return Plan(recipe, out, n_layers=n_layers, tied=tied)

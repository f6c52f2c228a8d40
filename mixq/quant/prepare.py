"""Everything known about a conversion before any tensor is read: source, tensor list, storage dtype, plan.

`prepare(source, recipe, dtype)` is the one way from a model reference to a `Plan`: convert writes it,
the engine applies it in memory, plan-show prints it, measure and allocate plan with it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from mixq.errors import MixqError
from mixq.io.safetensors import torch_dtype_name
from mixq.quant import arch
from mixq.quant.checkpoint import Checkpoint
from mixq.quant.gguf_quants import DEFAULT_SCALE_DTYPE, SOURCE_RECIPE, plan_source
from mixq.quant.plan import Plan, plan_model
from mixq.quant.recipe import METHODS, Recipe, load_recipe, parse_recipe
from mixq.sources.resolve import ResolvedModel, resolve

DEFAULT_RECIPE = "q6-hi"
# recipe `source` for a checkpoint that ships some tensors quantized: those kept as they ship, the rest float
SHIPPED_RECIPE = """[recipe]
name = "source"
description = "tensors the checkpoint ships quantized (gpt-oss MXFP4 experts) kept as they ship; the rest kept"
keep = true

[[rule]]
pattern = "*"
keep_source = true
keep = true
"""
DTYPES = ("bfloat16", "float16", "float32")


@dataclass
class Prepared:
    """Everything known before any tensor is read: the source, the plan, the tensor loaders."""
    source: str
    path: Path
    provenance: dict
    ckpt: Checkpoint
    recipe: Recipe
    plan: Plan
    items: list            # [(TensorInfo in MLX layout, loader)]
    store_dtype: torch.dtype | None  # torch dtype floating tensors are stored in (None: as in the source)
    config: dict           # output config.json without quantization

    @property
    def dtype(self) -> str | None:
        """The storage dtype by name ("bfloat16", ...), None: each tensor as in the source."""
        return torch_dtype_name(self.store_dtype) if self.store_dtype is not None else None

    def plan_with(self, recipe) -> Plan:
        """The plan another recipe gives for this source at this storage dtype: what `prepare(source, recipe,
        dtype)` plans for a recipe that names this dtype or none (allocation sizes its options with it)."""
        return plan_model([info for info, _ in self.items], recipe, self.config, dtype=self.dtype)


def storage_dtype(config: dict, dtype: str | None = None):
    """The dtype floating tensors are stored in: `dtype`, else config.json's torch_dtype/dtype (as mlx_lm),
    else None."""
    if dtype is not None and dtype not in DTYPES:
        raise MixqError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    name = dtype or config.get("torch_dtype") or config.get("dtype")
    if name is None and isinstance(config.get("text_config"), dict):
        name = config["text_config"].get("torch_dtype") or config["text_config"].get("dtype")
    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}.get(name)


def _resolve(source) -> ResolvedModel:
    """The resolved source reference (an HF folder, never an MLX one)."""
    r = source if isinstance(source, ResolvedModel) else resolve(str(source))
    if r.kind == "mlx":
        raise MixqError(f"{source}: is already an MLX (converted) folder; convert from its Hugging Face source")
    return r


def prepare(source, recipe=None, dtype: str | None = None, *, scale_dtype: str | None = None,
            requant=None, method: str | None = None) -> Prepared:
    """Resolve the source (a reference, or an already `ResolvedModel`), read its headers, build the MLX
    tensor list and the recipe's plan. Recipe `source`: a GGUF's tensors kept in their own format where MLX holds
    it exactly (`quant.gguf_quants`; `scale_dtype`, `requant` apply to it only), or a checkpoint's tensors that
    ship quantized kept as they ship (`arch.source_loaders`), the rest unquantized. `method`: the quantization
    method for tensors whose rule names none (convert --method; default: the recipe's)."""
    r = _resolve(source)
    path, provenance, ref_recipe = Path(r.path), dict(r.provenance or {}), r.recipe
    ckpt = Checkpoint(path)
    arch.check_supported(ckpt.config)
    recipe = recipe or ref_recipe or DEFAULT_RECIPE
    ref = source.ref if isinstance(source, ResolvedModel) else str(source)
    if recipe == SOURCE_RECIPE and method not in (None, "rtn"):
        raise MixqError(f"--method {method} re-quantizes weights; --recipe {SOURCE_RECIPE} keeps them as the source "
                        "ships them: choose an affine recipe (e.g. q4-hi) or drop --method")
    if recipe == SOURCE_RECIPE and r.gguf is not None:
        return _prepare_source(r, ref, ckpt, dtype, scale_dtype or DEFAULT_SCALE_DTYPE, requant)
    if recipe == SOURCE_RECIPE:
        if not arch.source_loaders(ckpt):
            raise MixqError(f"{ref}: --recipe {SOURCE_RECIPE} keeps a source's own quantization; give a .gguf file, "
                            "an embedded *-gguf name or a checkpoint that ships quantized (gpt-oss MXFP4 experts), "
                            "or choose another recipe")
        recipe = parse_recipe(SHIPPED_RECIPE, f"<{SOURCE_RECIPE}>", SOURCE_RECIPE)
    if scale_dtype is not None or requant is not None:
        raise MixqError(f"--scale-dtype and --requant apply to --recipe {SOURCE_RECIPE} only (a GGUF kept as it is)")
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(str(recipe))
    if method is not None:
        if method not in METHODS:
            raise MixqError(f"--method {method!r}: use one of {', '.join(METHODS)}")
        recipe = replace(recipe, method=method)
    store = storage_dtype(ckpt.config, dtype or recipe.dtype)  # --dtype > recipe's dtype > config.json's
    items = list(arch.mlx_tensors(ckpt))
    config = arch.mlx_config(ckpt.config, tied=arch.is_tied(ckpt))
    plan = plan_model([info for info, _ in items], recipe, config,
                      dtype=torch_dtype_name(store) if store is not None else None)
    if method not in (None, "rtn") and not plan.calibrated():
        raise MixqError(f"--method {method}: recipe {recipe.name} has no tensor for it to quantize (kept tensors "
                        "stay as they are; dwq tunes affine tensors only, not mxfp4/nvfp4/mxfp8); choose a recipe "
                        "that quantizes (e.g. q4-hi) or drop --method")
    shipped = {tp.name for tp in plan.tensors if tp.source}
    if shipped:  # kept as the checkpoint ships them: their loaders give the quantized tensors
        loaders = arch.source_loaders(ckpt)
        items = [(info, loaders[info.name] if info.name in shipped else load) for info, load in items]
    return Prepared(ref, path, provenance, ckpt, recipe, plan, items, store, config)


def _prepare_source(r: ResolvedModel, ref: str, ckpt: Checkpoint, dtype, scale_dtype: str, requant) -> Prepared:
    """`prepare` for recipe `source` of a GGUF: its blocks kept, its other tensors planned by `plan_source`."""
    if dtype is not None and dtype not in DTYPES:
        raise MixqError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    items = list(arch.mlx_tensors(ckpt))
    config = arch.mlx_config(ckpt.config, tied=arch.is_tied(ckpt))
    plan, kept = plan_source(r.gguf, items, config, scale_dtype=scale_dtype, requant=requant, float_dtype=dtype)
    items = [(info, kept.get(info.name, load)) for info, load in items]
    return Prepared(ref, Path(r.path), dict(r.provenance or {}), ckpt, plan.recipe, plan, items, None, config)

"""Load any model reference into a torch + transformers model for evaluation.

References (see `mixq.sources.resolve`): a Hugging Face folder, an MLX folder (affine-quantized,
uniform or mixed), a `.gguf` file, an embedded name, and `name@recipe` / `recipe=`: a recipe
applied on the fly in memory. `load_model` and `model_fingerprint` also take a `ResolvedModel`
(resolved once by the caller, e.g. `mixq eval`).

* HF folder: `from_pretrained` (lazy, one copy of the weights in the compute dtype).
* HF folder + recipe: convert's own preparation (`mixq.quant.prepare`: MLX-layout tensors, storage
  dtype, plan, MLX config), each tensor cast as convert casts it, and for the tensors the plan
  quantizes `quantize` -> `dequantize`: exactly what `mixq convert` writes and what loading the
  converted folder dequantizes; mapped back to HF names (`arch.hf_state_dict`). So `model@recipe`
  gives bit-identical weights and logits to the converted folder (tests/test_engine.py).
* MLX folder: config.json without its `quantization` keys -> transformers config; every module
  with `.scales` dequantized with its spec (config override or default), names mapped back.

The dequantized tensors are held once in their stored dtype (bfloat16 for most sources) while the
model is built in the compute dtype; the compute dtype is float32 (default) or bfloat16.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from mixq.errors import MixqError
from mixq.quant import arch
from mixq.quant.artifact import module_spec, quantization_config
from mixq.quant.checkpoint import Checkpoint
from mixq.quant.prepare import prepare
from mixq.quant.quantize import dequantize, quantize
from mixq.quant.recipe import load_recipe
from mixq.sources.resolve import ResolvedModel, resolve

DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class ModelInfo:
    ref: str
    path: Path
    kind: str                      # "hf" | "mlx"
    recipe: str | None             # recipe applied on the fly (None: weights as stored)
    dtype: str                     # compute dtype
    size_bytes: int                # bytes of the weights as stored (MLX folder) or as planned (recipe)
    n_params: int                  # logical parameters (a quantized weight counts its unpacked elements)
    bits_per_weight: float         # 8 * size_bytes / n_params
    bits_per_weight_quantized: float | None   # over the quantized tensors only (None if none is)
    provenance: dict = field(default_factory=dict)


@dataclass
class LoadedModel:
    model: object                  # transformers PreTrainedModel, eval mode
    tokenizer: object
    info: ModelInfo


def _torch_dtype(dtype: str):
    import torch

    if dtype not in DTYPES:
        raise MixqError(f"unknown compute dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return getattr(torch, dtype)


def _model_class(config):
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        raise MixqError(f"transformers has no causal-LM class for model_type {config.model_type!r}") from None


def _hf_config(cfg: dict):
    """A transformers config from a config.json dict (quantization keys removed)."""
    from transformers import AutoConfig

    cfg = {k: v for k, v in cfg.items() if k not in ("quantization", "quantization_config")}
    model_type = cfg.get("model_type")
    if not model_type:
        raise MixqError("config.json has no model_type: is this a causal language model folder?")
    try:
        return AutoConfig.for_model(**cfg)
    except (ValueError, KeyError) as e:
        raise MixqError(f"transformers cannot build a config for model_type {model_type!r}: {e}") from None


def _build(config, state_dict: dict, dtype: str, where):
    """A transformers model from a config and a state dict with HF checkpoint names."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    cls = _model_class(config)
    try:
        model, info = cls.from_pretrained(None, config=config, state_dict=state_dict, dtype=_torch_dtype(dtype),
                                          output_loading_info=True, ignore_mismatched_sizes=True)
    except RuntimeError as e:  # e.g. a weight whose shape disagrees with config.json
        raise _mismatch(where, e) from None
    check_loading(info, where)
    return model.eval()


def _mismatch(where, e: Exception) -> MixqError:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    return MixqError(f"{where}: the weights do not match config.json ({first}); fix or re-download the checkpoint")


def check_loading(info: dict, where) -> None:
    """Refuse a model whose weights do not cover its config exactly: transformers would fill a missing
    weight with random values (and drop an unexpected or mis-shaped one) and the scores would be wrong.
    Models are built with `ignore_mismatched_sizes=True` so that a mis-shaped weight is reported here, by name."""
    problems = [(kind, sorted(info.get(key) or [])) for kind, key in
                (("missing", "missing_keys"), ("unexpected", "unexpected_keys"), ("mis-shaped", "mismatched_keys"))]
    problems = [(kind, [n if isinstance(n, str) else n[0] for n in names]) for kind, names in problems if names]
    if not problems:
        return
    said = "; ".join(f"{len(names)} {kind} ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''})"
                     for kind, names in problems)
    raise MixqError(f"{where}: the weights do not match config.json: {said}; "
                    "fix or re-download the checkpoint (its config.json and weights must agree)")


def _tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # noqa: BLE001 - any failure here means the folder lacks a usable tokenizer
        raise MixqError(f"{path}: cannot load the tokenizer ({type(e).__name__}: {e}); "
                        "the folder needs tokenizer.json / tokenizer_config.json") from None


# ---------------------------------------------------------------- HF folder (+ recipe on the fly)

def _tensor_bytes(shape, dtype: str) -> int:
    import torch

    return math.prod(shape) * getattr(torch, dtype).itemsize


def _load_hf(resolved, dtype: str) -> tuple[object, dict]:
    """An HF folder as stored: transformers' own lazy loader."""
    import transformers

    ckpt = Checkpoint(resolved.path)
    infos = ckpt.tensor_infos()
    size = sum(_tensor_bytes(t.shape, t.dtype) for t in infos)
    n = sum(math.prod(t.shape) for t in infos)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    config = _hf_config(ckpt.config)
    try:
        model, info = _model_class(config).from_pretrained(str(resolved.path), config=config,
                                                           dtype=_torch_dtype(dtype), output_loading_info=True,
                                                           ignore_mismatched_sizes=True)
    except RuntimeError as e:  # e.g. a weight whose shape disagrees with config.json
        raise _mismatch(resolved.path, e) from None
    check_loading(info, resolved.path)
    stats = dict(size_bytes=size, n_params=n, bits_per_weight=8 * size / max(n, 1), bits_per_weight_quantized=None)
    return model.eval(), stats


def _load_hf_recipe(resolved, recipe_name: str, dtype: str, progress: bool) -> tuple[object, dict]:
    """An HF folder with a recipe applied in memory: what `mixq convert` writes, dequantized.

    Uses convert's own preparation (tensor list, storage dtype, plan, MLX config) and the same
    cast -> quantize steps, then `dequantize` as loading the converted folder does.
    """
    from tqdm import tqdm

    prep = prepare(resolved, recipe_name)
    plan = prep.plan
    loaders = {info.name: load for info, load in prep.items}

    def tensors():
        for tp in tqdm(plan.tensors, desc=f"apply {prep.recipe.name}", unit="tensor", disable=not progress,
                       leave=False):
            t = loaders[tp.name]()
            if prep.store_dtype is not None and t.is_floating_point() and t.dtype != prep.store_dtype:
                t = t.to(prep.store_dtype)
            if tp.spec is not None:
                bits, gs = tp.spec.bits, tp.spec.group_size
                t = dequantize(*quantize(t, bits, gs, name=tp.name), bits, gs)
            yield tp.name, t

    state = arch.hf_state_dict(tensors(), prep.config)
    model = _build(_hf_config(arch.hf_config(prep.config)), state, dtype, resolved.path)
    del state
    bpwq = plan.bits_per_weight_quantized if plan.quantized_params else None
    stats = dict(size_bytes=int(plan.total_bytes), n_params=int(plan.total_params),
                 bits_per_weight=float(plan.bits_per_weight),
                 bits_per_weight_quantized=float(bpwq) if bpwq is not None else None)
    return model, stats


# ---------------------------------------------------------------- MLX folder

def _nbytes(t) -> int:
    return t.numel() * t.element_size()


def read_mlx_dequantized(path: Path, config: dict, stats: dict | None = None, progress: bool = False):
    """Yield (MLX tensor name, tensor) of an MLX folder, quantized weights dequantized exactly.

    Fills `stats` (if given) with size_bytes, n_params, q_bytes, q_params as it goes.
    """
    from safetensors import safe_open
    from tqdm import tqdm

    q = quantization_config(config, path / "config.json")
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise MixqError(f"{path}: no .safetensors files in this folder")
    handles = [safe_open(str(f), framework="pt") for f in files]
    where = {k: h for h in handles for k in h.keys()}
    stats = {} if stats is None else stats
    stats.update(size_bytes=0, n_params=0, q_bytes=0, q_params=0)

    def get(name):
        return where[name].get_tensor(name)

    for name in tqdm(sorted(where), desc="dequantize", unit="tensor", disable=not progress, leave=False):
        module, _, leaf = name.rpartition(".")
        quantized = module + ".scales" in where and module + ".weight" in where
        if quantized and leaf in ("scales", "biases"):
            continue  # read with its weight
        t = get(name)
        if quantized and leaf == "weight":
            if module + ".biases" not in where:
                raise MixqError(f"{path}: {module} has scales but no biases (mixq reads affine MLX quants only)")
            t = _dequantize_module(path, q, module, t, get(module + ".scales"), get(module + ".biases"), stats)
        else:
            stats["size_bytes"] += _nbytes(t)
            stats["n_params"] += t.numel()
        yield name, t


def _dequantize_module(path: Path, q: dict, module: str, t, scales, biases, stats: dict):
    """One quantized weight dequantized with its spec from config.json (sizes counted into `stats`)."""
    spec = module_spec(q, module, path)
    if spec is None:
        raise MixqError(f"{path}: {module} is quantized but config.json has no quantization spec for it")
    bits, gs = spec
    cols = t.shape[-1] * 32 // bits
    if cols != scales.shape[-1] * gs:
        raise MixqError(f"{path}: {module}: packed shape {tuple(t.shape)} and scales {tuple(scales.shape)} "
                        f"do not fit bits={bits}, group_size={gs} of config.json")
    b = _nbytes(t) + _nbytes(scales) + _nbytes(biases)
    n = (t.numel() // t.shape[-1]) * cols
    stats["size_bytes"] += b
    stats["q_bytes"] += b
    stats["n_params"] += n
    stats["q_params"] += n
    return dequantize(t, scales, biases, bits, gs)


def _load_mlx(resolved, dtype: str, progress: bool) -> tuple[object, dict]:

    path = Path(resolved.path)
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise MixqError(f"{path / 'config.json'}: cannot read ({e})") from None
    arch.check_supported(config)
    s: dict = {}
    state = arch.hf_state_dict(read_mlx_dequantized(path, config, s, progress), config)
    model = _build(_hf_config(arch.hf_config(config)), state, dtype, path)
    del state
    stats = dict(size_bytes=s["size_bytes"], n_params=s["n_params"],
                 bits_per_weight=8 * s["size_bytes"] / max(s["n_params"], 1),
                 bits_per_weight_quantized=(8 * s["q_bytes"] / s["q_params"]) if s["q_params"] else None)
    return model, stats


# ---------------------------------------------------------------- entry point

def _resolved(ref: str | ResolvedModel) -> ResolvedModel:
    return ref if isinstance(ref, ResolvedModel) else resolve(str(ref))


def load_model(ref: str | ResolvedModel, *, recipe: str | None = None, dtype: str = "float32",
               progress: bool = True) -> LoadedModel:
    """Load `ref` (folder, .gguf, embedded name, name@recipe; or a `ResolvedModel`, resolved already)
    as a transformers model in `dtype`."""
    import torch

    _torch_dtype(dtype)
    resolved = _resolved(ref)
    ref = resolved.ref
    if recipe and resolved.recipe and recipe != resolved.recipe:
        raise MixqError(f"{ref}: two recipes given ({resolved.recipe!r} in the name, {recipe!r} by option): use one")
    recipe = recipe or resolved.recipe
    with torch.no_grad():
        if resolved.kind == "mlx":
            if recipe:
                raise MixqError(f"{ref}: is already a quantized MLX folder; apply a recipe to its unquantized source")
            model, stats = _load_mlx(resolved, dtype, progress)
        elif resolved.kind == "hf":
            if recipe:
                model, stats = _load_hf_recipe(resolved, recipe, dtype, progress)
            else:
                model, stats = _load_hf(resolved, dtype)
        else:
            raise MixqError(f"{ref}: unsupported model kind {resolved.kind!r}")
    tokenizer = _tokenizer(resolved.path)
    provenance = dict(resolved.provenance or {})
    info = ModelInfo(ref=ref, path=Path(resolved.path), kind=resolved.kind, recipe=recipe, dtype=dtype,
                     provenance=provenance, **stats)
    return LoadedModel(model=model, tokenizer=tokenizer, info=info)


def model_fingerprint(ref: str | ResolvedModel, *, recipe: str | None = None, dtype: str = "float32") -> str:
    """A cheap identity of a model reference or `ResolvedModel` (resolved path, recipe, dtype, weight
    files' size+mtime)."""
    import hashlib

    resolved = _resolved(ref)
    recipe = recipe or resolved.recipe
    h = hashlib.sha256()
    h.update(json.dumps([str(Path(resolved.path).resolve()), resolved.kind, recipe, dtype]).encode())
    for f in sorted(Path(resolved.path).glob("*.safetensors")) + [Path(resolved.path) / "config.json"]:
        if f.exists():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    if recipe:
        h.update(load_recipe(recipe).text.encode())
    return h.hexdigest()[:16]

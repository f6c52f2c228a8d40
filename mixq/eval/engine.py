"""Load any model reference into a torch + transformers model for evaluation.

References (see `mixq.sources.resolve`): a Hugging Face folder, an MLX folder (any mlx quantization mode,
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

Quantized weights (MLX folder, or a recipe on the fly) stay packed as the folder stores them
(`mixq.eval.packed`; a folder's files memory-mapped, `mixq.io.safetensors.mapped_tensors`): each module
dequantizes its weights just in time, bit-exact, so the logits are those of the model built from the
dequantized weights (`packed=False`, the dense engine) while memory for weights is the quantized size; MoE
expert stacks dequantize only the experts a forward routes tokens to. Dense copies are kept, largest first,
while the weights fit `max_memory` (None: "auto", half the memory available at load; 0: none).

The default budget per command, decided on benchmarks/scale.py (SmolLM2-135M q6-hi and qx86-hi, float32,
1 thread, a shared 2-core machine; `--tasks arc_easy --limit 50` / `--tasks ppl --windows 4`; 2 runs each,
interleaved): `mixq eval` holds the weights packed (`--max-memory 0`). Peak RSS 0.67-0.69 GB, against 1.30-1.46 GB
for the dense engine before the memory work (0.47-0.52x) and 1.23-1.31 GB for the dense engine now (0.53-0.55x: it
gained the scoring changes too); every document and the perplexity identical. What is left is the runtime, which does
not shrink: torch, transformers and the tokenizer take ~0.51 GB before any weight is read (the dense engine's
0.54 GB of weights come on top of it, so half of the dense engine's peak is out of reach at this size). CPU time
+2-14% (every weight dequantized once per forward; a module's memory-mapped pages are given back after it ran and
read again next time); wall time noisy on the shared machine (0.71-1.13x medians).
Gemma-3-270m q6-hi (same runs): 1.65-1.75 GB instead of 2.25-2.28 (0.73-0.77x; ~0.95 GB of it is the runtime
with its 262k-token tokenizer; the rest grows during the first forwards and is not heap fragmentation: fixing glibc's
mmap threshold or arenas changes it by < 0.1 GB), CPU time +6-15%.
Generation and chat keep `auto` (dense copies within half the memory): a token-by-token decode would dequantize
every weight per token; beyond the budget they fuse affine 4-bit linear layers (`fused=True`, `packed.fuse_int4`).
measure and plan load unquantized sources (nothing packed) and keep `auto` too.
The compute dtype is float32 (default) or bfloat16.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from mixq.errors import MixqError
from mixq.eval.head import slice_packed_head
from mixq.eval.packed import (
    JitParam,
    Packed,
    eager_experts,
    fuse_int4,
    install,
    keep_dense,
    placeholder,
    target_shape,
    targets,
    to_device,
    weight_bytes,
)
from mixq.io.memory import trim_heap
from mixq.io.safetensors import dtype_from_name, mapped_tensors, read_headers
from mixq.quant import arch
from mixq.quant.artifact import module_spec, quantization_config
from mixq.quant.checkpoint import Checkpoint
from mixq.quant.prepare import prepare
from mixq.quant.quantize import Quantized, quantize
from mixq.quant.recipe import load_recipe
from mixq.sources.resolve import ResolvedModel, resolve

DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda", "mps")
AUTO_MEMORY_SHARE = 0.5   # max_memory "auto": weights may take half the memory available at load


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
    device: str = "cpu"            # where the model computes
    weights_bytes: int = 0         # memory its weights hold (packed + dense copies), on all devices


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
    """A transformers model from a config and a state dict with HF checkpoint names (MoE: `with_eager_experts`)."""
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
    return with_eager_experts(model).eval()


def with_eager_experts(model):
    """`model` with its MoE experts under transformers' eager implementation: one routed expert at a time (a packed
    stack dequantized per expert, `packed.LazyExperts`); every model mixq builds computes as the engine does."""
    if hasattr(model, "set_experts_implementation") and not eager_experts(model):
        model.set_experts_implementation("eager")
    return model


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
    return with_eager_experts(model).eval(), stats


def _load_hf_recipe(resolved, recipe_name: str, dtype: str, progress: bool, packed: bool = True) -> tuple[object, dict]:
    """An HF folder with a recipe applied in memory: what `mixq convert` writes, held packed (or dequantized).

    Uses convert's own preparation (tensor list, storage dtype, plan, MLX config) and the same
    cast -> quantize steps; the quantized tensors are the converted folder's (`Packed`), dequantized as
    loading the converted folder does.
    """
    from tqdm import tqdm

    prep = prepare(resolved, recipe_name)
    plan = prep.plan
    if plan.calibrated():
        tp = plan.calibrated()[0]
        raise MixqError(f"recipe {prep.recipe.name}: method {tp.method} on {len(plan.calibrated())} tensors "
                        f"({tp.name}...) needs calibration and is not applied on the fly; convert the model "
                        f"first (mixq convert ... --recipe {prep.recipe.name}) and evaluate the folder")
    loaders = {info.name: load for info, load in prep.items}

    def tensors():
        for tp in tqdm(plan.tensors, desc=f"apply {prep.recipe.name}", unit="tensor", disable=not progress,
                       leave=False):
            t = loaders[tp.name]()
            if isinstance(t, Quantized):  # a source format kept: as convert writes it
                dt, mode = dtype_from_name(tp.dtype), t.spec.mode
                affine = mode == "affine"
                yield tp.name, Packed(t.wq, t.scales.to(dt) if affine else t.scales,
                                      t.biases.to(dt) if affine else None, t.spec.bits, t.spec.group_size,
                                      name=tp.module_path, extra={} if affine else {"mode": mode})
                continue
            store = dtype_from_name(tp.dtype) if t.is_floating_point() else None   # the planned dtype
            if store is not None and t.dtype != store:
                t = t.to(store)
            if tp.spec is not None:
                bits, gs, mode = tp.spec.bits, tp.spec.group_size, tp.spec.mode
                t = Packed(*quantize(t, bits, gs, mode=mode, name=tp.name), bits, gs, name=tp.module_path,
                           extra={} if mode == "affine" else {"mode": mode})
            yield tp.name, t

    model = _build_mlx(prep.config, tensors(), dtype, resolved.path, packed)
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
    for name, t in read_mlx_packed(path, config, stats, progress):
        yield name, t.dense() if isinstance(t, Packed) else t


def read_mlx_packed(path: Path, config: dict, stats: dict | None = None, progress: bool = False):
    """Yield (MLX tensor name, tensor or `Packed`) of an MLX folder: a quantized weight as stored (uint32 words,
    scales, biases and its spec from config.json, checked), under its weight's name; the rest as stored. The
    tensors are views of the files, memory-mapped (`mixq.io.safetensors.mapped_tensors`): packed weights are
    read from disk as they are used, and a folder larger than memory can be held.

    Fills `stats` (if given) with size_bytes, n_params, q_bytes, q_params as it goes.
    """
    from tqdm import tqdm

    q = quantization_config(config, path / "config.json")
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise MixqError(f"{path}: no .safetensors files in this folder")
    read_headers(files)  # a tensor in two files is refused
    where = {name: t for f in files for name, t in mapped_tensors(f).items()}
    stats = {} if stats is None else stats
    stats.update(size_bytes=0, n_params=0, q_bytes=0, q_params=0)
    get = where.__getitem__

    for name in tqdm(sorted(where), desc="read", unit="tensor", disable=not progress, leave=False):
        module, _, leaf = name.rpartition(".")
        quantized = module + ".scales" in where and module + ".weight" in where
        if quantized and leaf in ("scales", "biases"):
            continue  # read with its weight
        t = get(name)
        if quantized and leaf == "weight":
            biases = get(module + ".biases") if module + ".biases" in where else None
            t = _packed_module(path, q, module, t, get(module + ".scales"), biases, stats)
        else:
            stats["size_bytes"] += _nbytes(t)
            stats["n_params"] += t.numel()
        yield name, t


def _packed_module(path: Path, q: dict, module: str, t, scales, biases, stats: dict) -> Packed:
    """One quantized weight with its spec from config.json, checked (sizes counted into `stats`)."""
    spec = module_spec(q, module, path)
    if spec is None:
        raise MixqError(f"{path}: {module} is quantized but config.json has no quantization spec for it")
    bits, gs, mode = spec
    if (biases is None) != (mode != "affine"):
        raise MixqError(f"{path}: {module} has scales {'but no' if biases is None else 'and'} biases, which does not "
                        f"fit its quantization mode {mode} in config.json")
    cols = t.shape[-1] * 32 // bits
    if cols != scales.shape[-1] * gs:
        raise MixqError(f"{path}: {module}: packed shape {tuple(t.shape)} and scales {tuple(scales.shape)} "
                        f"do not fit bits={bits}, group_size={gs} of config.json")
    b = _nbytes(t) + _nbytes(scales) + (_nbytes(biases) if biases is not None else 0)
    n = (t.numel() // t.shape[-1]) * cols
    stats["size_bytes"] += b
    stats["q_bytes"] += b
    stats["n_params"] += n
    stats["q_params"] += n
    return Packed(t, scales, biases, bits, gs, name=module, extra={} if mode == "affine" else {"mode": mode})


def _load_mlx(resolved, dtype: str, progress: bool, packed: bool = True) -> tuple[object, dict]:

    path = Path(resolved.path)
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise MixqError(f"{path / 'config.json'}: cannot read ({e})") from None
    arch.check_supported(config)
    s: dict = {}
    model = _build_mlx(config, read_mlx_packed(path, config, s, progress), dtype, path, packed)
    stats = dict(size_bytes=s["size_bytes"], n_params=s["n_params"],
                 bits_per_weight=8 * s["size_bytes"] / max(s["n_params"], 1),
                 bits_per_weight_quantized=(8 * s["q_bytes"] / s["q_params"]) if s["q_params"] else None)
    return model, stats


def _build_mlx(config: dict, named, dtype: str, where, packed: bool):
    """A transformers model from MLX-layout (name, tensor or `Packed`) pairs and the MLX config.json dict.

    packed=True: every model parameter made of a `Packed` tensor stays packed (mixq.eval.packed: a placeholder,
    dequantized just in time by its module's forward hooks); the model is built by transformers from the other
    tensors and the placeholders, so config.json is checked against every weight's shape as before.
    packed=False: everything dequantized at load (the dense engine)."""
    hf_cfg = _hf_config(arch.hf_config(config))
    if not packed:
        state = arch.hf_state_dict(((n, t.dense() if isinstance(t, Packed) else t) for n, t in named), config)
        return _build(hf_cfg, state, dtype, where)
    items = dict(named)
    jit = {key: t for key, t in targets(config, items).items()
           if all(n in items for n in t.names) and any(isinstance(items[n], Packed) for n in t.names)}
    covered = {n for t in jit.values() for n in t.names}
    state = arch.hf_state_dict([(n, t) for n, t in items.items() if n not in covered], config)
    shapes = {key: target_shape(t, items) for key, t in jit.items()}
    for key in jit:
        state[key] = placeholder(shapes[key], _torch_dtype(dtype))
    model = _build(hf_cfg, state, dtype, where)
    del state
    install(model, {key: JitParam(key, [items[n] for n in t.names], t.build, shapes[key], experts=t.experts)
                    for key, t in jit.items()})
    return model


def build_from_state(config: dict, state: dict, dtype: str = "float32", where="") -> object:
    """A transformers model (eval mode) from an MLX config.json dict and an HF-named state dict (`arch.hf_state_dict`);
    zero-stride placeholders (`packed.placeholder`) stand in for weights a caller fills in later (no memory)."""
    return _build(_hf_config(arch.hf_config(config)), state, dtype, where)


# ---------------------------------------------------------------- memory

def dense_budget(model, max_memory: int | None, device: str = "cpu") -> int:
    """Bytes of dense copies a packed model may keep so that its weights on `device` fit `max_memory` (None:
    `AUTO_MEMORY_SHARE` of what that device has available, counting what the weights hold there already)."""
    held = weight_bytes(model, device)
    if max_memory is None:
        max_memory = int(AUTO_MEMORY_SHARE * (available_memory(device) + held))
    return max(0, int(max_memory) - held)


def available_memory(device: str = "cpu") -> int:
    """Bytes free for new allocations on `device` (CPU: the system's available memory)."""
    import psutil
    import torch

    if device == "cuda":
        return int(torch.cuda.mem_get_info()[0])
    if device == "mps":
        return max(0, int(torch.mps.recommended_max_memory()) - int(torch.mps.driver_allocated_memory()))
    return int(psutil.virtual_memory().available)


def peak_memory() -> dict:
    """Peak memory of this process so far, in bytes: "rss" (resident set), and "gpu" (CUDA's peak allocation)
    when a CUDA device was used."""
    import resource
    import sys

    import torch

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"rss": int(r if sys.platform == "darwin" else r * 1024)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["gpu"] = int(torch.cuda.max_memory_allocated())
    return out


def peak_memory_line() -> str:
    """One line for a command's output: "peak memory: 1.23 GB RSS[, 4.56 GB GPU]"."""
    m = peak_memory()
    return "peak memory: " + ", ".join(f"{m[k] / 1e9:.2f} GB {label}" for k, label in (("rss", "RSS"), ("gpu", "GPU"))
                                       if k in m)


def resolve_device(device: str | None = "auto") -> str:
    """--device: "auto" (cuda when torch sees one, else cpu), "cpu", "cuda" or "mps" (checked)."""
    import torch

    d = (device or "auto").strip().lower()
    if d not in DEVICES:
        raise MixqError(f"--device {device!r}: use one of {', '.join(DEVICES)}")
    if d == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if d == "cuda" and not torch.cuda.is_available():
        raise MixqError(f"--device cuda: torch {torch.__version__} sees no CUDA device; use --device cpu (or install "
                        "a CUDA build of torch)")
    if d == "mps" and not torch.backends.mps.is_available():
        raise MixqError("--device mps: torch sees no Apple GPU (MPS); use --device cpu")
    return d


def default_dtype(device: str) -> str:
    """The compute dtype when none is given: float32 on the CPU (exact, as always), bfloat16 on a GPU."""
    return "float32" if device == "cpu" else "bfloat16"


def parse_memory(text: str | float | None) -> int | None:
    """--max-memory: GB (decimal, e.g. 0.5 or 12) -> bytes; "auto" or None -> None."""
    if text is None or str(text).strip().lower() == "auto":
        return None
    try:
        gb = float(text)
    except ValueError:
        gb = -1.0
    if not gb >= 0 or gb == float("inf"):
        raise MixqError(f"--max-memory {text!r}: give gigabytes (e.g. 0.5 or 12), 0 (weights packed only) or auto")
    return int(gb * 1e9)


@dataclass
class DeviceOptions:
    """A command's checked `--device` / `--dtype` / `--max-memory` (see `device_options`)."""
    device: str                    # resolved: cpu, cuda or mps
    dtype: str                     # compute dtype (given, or `default_dtype(device)`)
    max_memory: int | None         # bytes for the weights (None: auto)


def device_options(args, dtype: bool = True) -> DeviceOptions:
    """The options `add_device_arguments` added to a command, parsed and checked before anything is loaded or
    written (a bad value is a one-line error naming the option). dtype=False: the command computes in float32
    (its own `--dtype`, if any, means something else)."""
    max_memory = parse_memory(getattr(args, "max_memory", None))
    device = resolve_device(getattr(args, "device", None))
    chosen = (getattr(args, "dtype", None) if dtype else "float32") or default_dtype(device)
    if chosen not in DTYPES:
        raise MixqError(f"--dtype {chosen!r}: use one of {', '.join(DTYPES)}")
    return DeviceOptions(device, chosen, max_memory)


def add_device_arguments(p, dtype: bool = True, max_memory: str = "auto") -> None:
    """`--device` (and `--dtype`, default: float32 on the CPU, bfloat16 on a GPU) and `--max-memory` (default
    `max_memory`: "auto", or "0" for packed only) of a command that loads a model; `device_options(args)` reads
    them back."""
    p.add_argument("--device", default="auto", choices=DEVICES,
                   help="where to compute: auto (default) = cuda when torch sees one, else cpu")
    if dtype:
        p.add_argument("--dtype", default=None, choices=DTYPES,
                       help="compute dtype (default: float32 on cpu, bfloat16 on cuda/mps)")
    said = "0 (packed only)" if parse_memory(max_memory) == 0 else "auto (half the memory available)"
    p.add_argument("--max-memory", default=max_memory, metavar="GB",
                   help="memory for the model's weights: quantized weights stay packed and dense copies are kept "
                        f"while they fit; 0 = packed only; auto = half the memory available; default {said}")


# ---------------------------------------------------------------- entry point

def _resolved(ref: str | ResolvedModel) -> ResolvedModel:
    return ref if isinstance(ref, ResolvedModel) else resolve(str(ref))


def load_model(ref: str | ResolvedModel, *, recipe: str | None = None, dtype: str = "float32",
               progress: bool = True, packed: bool = True, max_memory: int | None = None,
               device: str = "cpu", fused: bool = False) -> LoadedModel:
    """Load `ref` (folder, .gguf, embedded name, name@recipe; or a `ResolvedModel`, resolved already)
    as a transformers model in `dtype` on `device` (cpu, cuda, mps or auto; see `resolve_device`).

    Quantized weights stay packed; dense copies are kept while the weights fit `max_memory` bytes (None:
    `AUTO_MEMORY_SHARE` of the memory available at load on `device`; 0: none). `packed=False`: every weight
    dequantized at load (the dense engine, the reference the packed one is tested against). Same logits either
    way. On a GPU the packed weights stay in CPU memory and are dequantized there, one module per forward.
    `fused=True` (generation and chat only): the packed linear layers left that torch's CPU int4 kernel takes
    (affine 4-bit, group 32-256) multiply by their 4-bit weights directly (`packed.fuse_int4`): logits close to,
    not bit-identical with, the dense engine's.
    MoE experts run transformers' eager implementation in both engines (one routed expert at a time: a packed stack
    is dequantized per expert, `packed.LazyExperts`; its per-token sums may differ from grouped_mm's in the last
    bits, ~1e-6)."""
    import torch

    _torch_dtype(dtype)
    device = resolve_device(device)
    resolved = _resolved(ref)
    ref = resolved.ref
    if recipe and resolved.recipe and recipe != resolved.recipe:
        raise MixqError(f"{ref}: two recipes given ({resolved.recipe!r} in the name, {recipe!r} by option): use one")
    recipe = recipe or resolved.recipe
    with torch.no_grad():
        if resolved.kind == "mlx":
            if recipe:
                raise MixqError(f"{ref}: is already a quantized MLX folder; apply a recipe to its unquantized source")
            model, stats = _load_mlx(resolved, dtype, progress, packed)
        elif resolved.kind == "hf":
            if recipe:
                model, stats = _load_hf_recipe(resolved, recipe, dtype, progress, packed)
            else:
                model, stats = _load_hf(resolved, dtype)
        else:
            raise MixqError(f"{ref}: unsupported model kind {resolved.kind!r}")
        if device != "cpu":
            to_device(model, device)
        if packed:
            keep_dense(model, dense_budget(model, max_memory, device))
            slice_packed_head(model)   # a head left packed: its forward by vocabulary slices, never whole
            if fused:
                fuse_int4(model)
    trim_heap()
    tokenizer = _tokenizer(resolved.path)
    provenance = dict(resolved.provenance or {})
    info = ModelInfo(ref=ref, path=Path(resolved.path), kind=resolved.kind, recipe=recipe, dtype=dtype,
                     provenance=provenance, device=device, weights_bytes=weight_bytes(model), **stats)
    return LoadedModel(model=model, tokenizer=tokenizer, info=info)


def model_fingerprint(ref: str | ResolvedModel, *, recipe: str | None = None, dtype: str = "float32",
                      device: str = "cpu") -> str:
    """A cheap identity of a model reference or `ResolvedModel` (resolved path, recipe, dtype, device (not
    for the CPU: identities from before devices stay valid), weight files' size+mtime)."""
    import hashlib

    resolved = _resolved(ref)
    recipe = recipe or resolved.recipe
    h = hashlib.sha256()
    h.update(json.dumps([str(Path(resolved.path).resolve()), resolved.kind, recipe, dtype]).encode())
    if device != "cpu":
        h.update(f"device={device}".encode())
    for f in sorted(Path(resolved.path).glob("*.safetensors")) + [Path(resolved.path) / "config.json"]:
        if f.exists():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    if recipe:
        h.update(load_recipe(recipe).text.encode())
    return h.hexdigest()[:16]

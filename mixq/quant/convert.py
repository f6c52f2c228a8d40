"""`mixq convert`: a checkpoint -> an MLX model folder (mixed-precision quants, any mlx mode) under a recipe.

Streaming: tensors are read, quantized and written one at a time into shards whose headers are
planned up front, so memory stays a few times the largest tensor. The folder is built beside OUT
under a temporary name and renamed at the end; any error or Ctrl-C removes it.
"""

from __future__ import annotations

import json
import math
import shutil
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from mixq.errors import MixqError
from mixq.io.files import PROVENANCE_FILE, README_MARK, check_output, os_error, sha256_file, staged_dir
from mixq.io.safetensors import INDEX_FILE, SafetensorsWriter, dtype_from_name, group_shards, shard_names
from mixq.quant.artifact import method_line, read_artifact
from mixq.quant.checkpoint import check_against_config
from mixq.quant.gguf_quants import DEFAULT_SCALE_DTYPE, SCALE_DTYPES
from mixq.quant.plan import Plan, TensorPlan
from mixq.quant.plan_show import print_plan
from mixq.quant.prepare import DTYPES, Prepared, prepare
from mixq.quant.quantize import Quantized, quantize
from mixq.sources.resolve import resolve
from mixq.threads import torch_threads
from mixq.version import __version__

SHARD_BYTES = 5 << 30  # mlx-lm's MAX_FILE_SIZE_GB
QUANT_CHUNK = 1 << 20  # elements quantized per call: bounds the quantizer's temporaries (~30 bytes each)
# Small files copied from the source folder (tokenizer, templates, generation config, licence).
COPY_PATTERNS = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt",
                 "chat_template*", "generation_config.json", "*.tiktoken", "spiece.model", "LICENSE*",
                 "NOTICE*", "USE_POLICY*")
# The files a tokenizer is built from (one of them must be there: mlx_lm.load loads the tokenizer too).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "*.tiktoken")

Stored = tuple[str, tuple[int, ...], torch.dtype]


@dataclass
class Precomputed:
    """What a calibrated method (tune/: gptq, awq) made, written instead of round-to-nearest for those tensors."""
    tensors: dict           # tensor name -> (packed uint32, scales, biases) exactly as `quantize` returns them
    methods: dict           # tensor name -> method applied ("gptq", or "rtn (why)" where it fell back), for every
                            # tensor whose plan asks for a calibrated method
    calibration: dict       # provenance: the calibration text (file, sha256, samples, length, seed) and settings
    floats: dict = field(default_factory=dict)  # unquantized tensor name -> its new value (AWQ's scales folded
                                                # into norm weights and biases), written instead of the source's


def check_precomputed(plan: Plan, pre: Precomputed | None) -> None:
    """Every tensor the plan gives a calibrated method is accounted for, and each precomputed one is planned
    with the shapes and dtypes it is stored as."""
    missing = [tp.name for tp in plan.calibrated() if pre is None or tp.name not in pre.methods]
    if missing:
        m = next(tp.method for tp in plan.calibrated() if tp.name == missing[0])
        raise MixqError(f"recipe {plan.recipe.name}: method {m} for {missing[0]} (and {len(missing) - 1} more) "
                        "needs calibration; convert with `mixq convert` (it runs the method) instead of writing "
                        "the plan directly")
    planned = {tp.name: tp for tp in plan.tensors}
    for name, t in (pre.floats.items() if pre else ()):
        tp = planned.get(name)
        if tp is None or tp.spec is not None or tuple(t.shape) != tuple(tp.shape) \
                or t.dtype != dtype_from_name(tp.dtype):
            raise MixqError(f"tensor {name}: the calibrated method's float tensor {list(t.shape)} {t.dtype} does not "
                            f"match the plan ({'not planned' if tp is None else f'{tp.shape} {tp.dtype} {tp.spec}'}); "
                            "please report this as a mixq bug")
    for name, parts in (pre.tensors.items() if pre else ()):
        tp = planned.get(name)
        want = stored_tensors(tp) if tp is not None and tp.spec is not None else None
        got = [(tuple(t.shape), t.dtype) for t in parts if t is not None]
        if want is None or got != [(s, d) for _, s, d in want]:
            raise MixqError(f"tensor {name}: the calibrated method's result {got} does not match the plan "
                            f"({[(s, d) for _, s, d in want] if want else 'not quantized'}); please report this "
                            "as a mixq bug")


def stored_tensors(tp: TensorPlan) -> list[Stored]:
    """The tensors (name, shape, dtype) one planned tensor is stored as: itself, or packed weight + scales + biases."""
    dt = dtype_from_name(tp.dtype)
    shape = tuple(tp.shape)
    if tp.spec is None:
        return [(tp.name, shape, dt)]
    base = tp.name.removesuffix(".weight")
    bits, gs = tp.spec.bits, tp.spec.group_size
    *lead, n = shape
    if not tp.spec.has_biases:  # float modes: uint8 scales, no biases
        return [(f"{base}.weight", (*lead, n * bits // 32), torch.uint32),
                (f"{base}.scales", (*lead, n // gs), torch.uint8)]
    return [(f"{base}.weight", (*lead, n * bits // 32), torch.uint32),
            (f"{base}.scales", (*lead, n // gs), dt),
            (f"{base}.biases", (*lead, n // gs), dt)]


def _nbytes(shape, dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def plan_shards(plan: Plan, max_bytes: int) -> list[list[TensorPlan]]:
    """Group planned tensors into shards of at most `max_bytes` (a bigger tensor gets its own), as mlx_lm does."""
    sizes = [sum(_nbytes(s, d) for _, s, d in stored_tensors(tp)) for tp in plan.tensors]
    return [[plan.tensors[i] for i in group] for group in group_shards(sizes, max_bytes)]


# ---------------------------------------------------------------- writing, step by step

def _write_tensor(writer: SafetensorsWriter, tp: TensorPlan, load, advance) -> list[str]:
    """Read one tensor, cast it, quantize it by row chunks (bounding the temporaries) and append it to `writer`.

    Packed rows are written as they come; scales and biases (1/8 of the packed size or less) follow.
    `advance(k)` is called with the number of source elements done.
    """
    t = load()
    if isinstance(t, Quantized):
        return _write_quantized(writer, tp, t, advance)
    if t.numel() == 0:
        raise MixqError(f"tensor {tp.name} has no elements (shape {list(t.shape)}); the checkpoint is broken: "
                        "fix or re-download it")
    # a tensor to quantize is checked group by group by `quantize` (no whole-tensor bool copy: ~0.5 GB for one of
    # gpt-oss-20b's MXFP4 expert stacks, whose decoded values are finite anyway)
    if tp.spec is None and t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise MixqError(f"tensor {tp.name} holds NaN or infinite values; the checkpoint is corrupt: "
                        "fix or re-download it")
    outs = stored_tensors(tp)
    store_dtype = dtype_from_name(tp.dtype) if t.is_floating_point() else None  # the planned dtype
    if tp.spec is None:
        if store_dtype is not None and t.dtype != store_dtype:
            t = t.to(store_dtype)
        writer.write(outs[0][0], t)
        advance(t.numel())
        return [outs[0][0]]
    n = t.shape[-1]
    rows = t.reshape(-1, n)
    step = max(1, QUANT_CHUNK // n)
    scales, biases = [], []
    for a in range(0, rows.shape[0], step):
        chunk = rows[a:a + step]
        if store_dtype is not None and chunk.dtype != store_dtype:
            chunk = chunk.to(store_dtype)
        wq, s, b = quantize(chunk, tp.spec.bits, tp.spec.group_size, mode=tp.spec.mode, name=tp.name)
        writer.write_rows(outs[0][0], wq)
        scales.append(s)
        biases.append(b)
        advance(chunk.numel())
    del t, rows
    writer.write(outs[1][0], torch.cat(scales).view(outs[1][1]))
    if len(outs) > 2:
        writer.write(outs[2][0], torch.cat(biases).view(outs[2][1]))
    return [o[0] for o in outs]


def _write_quantized(writer: SafetensorsWriter, tp: TensorPlan, q: Quantized, advance) -> list[str]:
    """Write a tensor that arrived quantized (a source format kept, or a calibrated method's result): its words,
    its scales and biases in the planned dtype."""
    outs = stored_tensors(tp)
    if q.spec != tp.spec or tuple(q.wq.shape) != outs[0][1]:
        raise MixqError(f"tensor {tp.name}: the source holds {q.spec} {list(q.wq.shape)}, planned {tp.spec} "
                        f"{list(outs[0][1])}; please report this as a mixq bug")
    for (name, shape, dt), part in zip(outs, (q.wq, q.scales, q.biases)):  # float modes: no biases stored
        writer.write(name, part.to(dt).view(shape))
    advance(tp.params)
    return [o[0] for o in outs]


def write_weights(prep: Prepared, folder: Path, shard_bytes: int, progress: bool,
                  pre: Precomputed | None = None) -> dict[str, str]:
    """Quantize and write every tensor into safetensors shards; returns the weight map (tensor -> file)."""
    from tqdm import tqdm

    plan, loaders = prep.plan, {info.name: load for info, load in prep.items}
    shards = plan_shards(plan, shard_bytes)
    weight_map = {}
    src_bytes = sum(_nbytes(tp.shape, dtype_from_name(tp.dtype)) for tp in plan.tensors)
    bar = tqdm(total=src_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="convert",
               disable=not progress, dynamic_ncols=True)
    done = 0
    try:
        for shard, fname in zip(shards, shard_names(len(shards))):
            entries = [o for tp in shard for o in stored_tensors(tp)]
            with SafetensorsWriter(folder / fname, entries, metadata={"format": "mlx"}) as writer:
                for tp in shard:
                    per = dtype_from_name(tp.dtype).itemsize  # source bytes per element, for the bar
                    load = loaders[tp.name]
                    if pre is not None and tp.name in pre.tensors:  # made by a calibrated method (tune/)
                        load = partial(Quantized, *pre.tensors[tp.name], tp.spec)
                    elif pre is not None and tp.name in pre.floats:  # changed by one (AWQ's folded scales)
                        load = partial(pre.floats.get, tp.name)
                    for oname in _write_tensor(writer, tp, load, lambda n, per=per: bar.update(n * per)):
                        weight_map[oname] = fname
                    done += 1
                    bar.set_postfix_str(f"{done}/{len(plan.tensors)} tensors", refresh=False)
    finally:
        bar.close()
    return weight_map


def write_index(plan: Plan, folder: Path, weight_map: dict[str, str]) -> None:
    total_size = sum(_nbytes(shape, dt) for tp in plan.tensors for _, shape, dt in stored_tensors(tp))
    index = {"metadata": {"total_size": total_size, "total_parameters": int(plan.total_params)},
             "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=4))


def write_config(prep: Prepared, folder: Path) -> None:
    """config.json: the MLX config plus the plan's quantization (as both keys mlx-lm reads)."""
    config = dict(prep.config)
    q = prep.plan.quantization_config()
    if q:
        config["quantization"] = q
        config["quantization_config"] = q
    (folder / "config.json").write_text(json.dumps(dict(sorted(config.items())), indent=4))


def copy_side_files(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer, templates, generation config and licence files; returns their names."""
    copied = []
    for pattern in COPY_PATTERNS:
        for f in sorted(src.glob(pattern)):
            if f.is_file() and not (dst / f.name).exists():
                shutil.copy2(f, dst / f.name)
                copied.append(f.name)
    return copied


def provenance(prep: Prepared, hashes: dict, copied: list[str], pre: Precomputed | None = None) -> dict:
    """mixq_provenance.json of a converted folder: recipe, source (hashed), per-tensor specs, methods and sizes,
    the calibration of calibrated methods."""
    plan = prep.plan
    methods = pre.methods if pre is not None else {}
    folded = pre.floats if pre is not None else {}
    tensors = [{"name": tp.name, "shape": list(tp.shape), "dtype": tp.dtype,
                "bits": tp.spec.bits if tp.spec else None, "group_size": tp.spec.group_size if tp.spec else None,
                "mode": tp.spec.mode if tp.spec else None,
                "method": methods.get(tp.name, "rtn") if tp.spec else ("awq-folded" if tp.name in folded else None),
                "bytes": int(tp.nbytes), "reason": tp.reason} for tp in plan.tensors]
    extra = {"calibration": pre.calibration} if pre is not None else {}
    return {
        "mixq_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "recipe": {"name": prep.recipe.name, "description": prep.recipe.description, "text": prep.recipe.text},
        "source": {"ref": prep.source, "path": str(prep.path.resolve()), "files": hashes,
                   "provenance": prep.provenance},
        "dtype": str(prep.store_dtype).removeprefix("torch.") if prep.store_dtype else None,
        "size_bytes": int(plan.total_bytes), "n_params": int(plan.total_params),
        "quantized_params": int(plan.quantized_params),
        "bits_per_weight": float(plan.bits_per_weight),
        "bits_per_weight_quantized": float(plan.bits_per_weight_quantized) if plan.quantized_params else None,
        "copied_files": copied,
        **extra,
        "tensors": tensors,
    }


def _hash_files(files: list[Path], result: dict) -> None:
    for f in files:
        result[f.name] = {"bytes": f.stat().st_size, "sha256": sha256_file(f, 1 << 24)}


def _readme(prep: Prepared, out_name: str, pre: Precomputed | None = None) -> str:
    plan = prep.plan
    bpw = plan.bits_per_weight
    base = _base_model(prep)
    note = prep.provenance.get("note")
    source_note = f"Source note: {note}.\n" if note else ""
    calibrated = (method_line({**pre.methods, **dict.fromkeys(pre.floats, "awq-folded")}, pre.calibration)
                  if pre is not None else "")
    quant = (f"{plan.bits_per_weight_quantized:.3f} over the quantized tensors" if plan.quantized_params
             else "nothing quantized")
    return f"""---
library_name: mlx
pipeline_tag: text-generation
{f"base_model: {base}" + chr(10) if base else ""}tags:
- mlx
- mixq
- quantized
---
{README_MARK}

# {out_name}

{prep.source} converted to MLX with mixq {__version__}, recipe `{prep.recipe.name}`:
{prep.recipe.description}

Size {plan.total_bytes / 1e9:.3f} GB, {bpw:.3f} bits per weight ({quant}).
Per-tensor choices: `mixq_provenance.json`.
{calibrated}{source_note}(Run `mixq card` on this folder for the full model card.)

## Use with mlx

```python
from mlx_lm import load, generate

model, tokenizer = load("{out_name}")
prompt = "hello"
if tokenizer.chat_template is not None:
    messages = [{{"role": "user", "content": prompt}}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
print(generate(model, tokenizer, prompt=prompt, verbose=True))
```

or `mixq generate {out_name} -p "hello"`.
"""


def _base_model(prep: Prepared) -> str | None:
    """A Hugging Face repo id for the model card's base_model, when the source says which it is."""
    prov = prep.provenance
    if prov.get("base_model"):
        return str(prov["base_model"])
    emb = prov.get("embedded")
    home = emb.get("homepage", "") if isinstance(emb, dict) else ""
    if home.startswith("https://huggingface.co/"):
        return home.removeprefix("https://huggingface.co/").strip("/")
    name = prep.ckpt.config.get("_name_or_path", "")
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        return name
    return None


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def has_tokenizer_file(folder: Path) -> bool:
    return any(any(Path(folder).glob(p)) for p in TOKENIZER_FILES)


def check_tokenizer(folder: Path) -> None:
    """Refuse a source without a tokenizer that loads: the converted folder would not open in mlx_lm.load."""
    folder = Path(folder)
    if not has_tokenizer_file(folder):
        raise MixqError(f"{folder}: no tokenizer ({', '.join(TOKENIZER_FILES)}); mlx_lm.load needs one: copy the "
                        "tokenizer files of the original model into this folder")
    import transformers
    from transformers import AutoTokenizer

    verbosity = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()
    try:
        AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:  # noqa: BLE001 - whatever fails here fails in mlx_lm.load too
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise MixqError(f"{folder}: the tokenizer does not load ({type(e).__name__}: {first}); fix or re-copy "
                        "the tokenizer files of the original model") from None
    finally:
        transformers.utils.logging.set_verbosity(verbosity)


def check_source(prep: Prepared) -> None:
    """Before writing: the weights cover config.json's architecture exactly and the tokenizer loads."""
    check_against_config(prep.ckpt)
    check_tokenizer(prep.path)


def check_written(prep: Prepared, folder: Path, out=None) -> None:
    """After writing: read the folder back (headers, config, index) and refuse it unless it holds every planned
    tensor with its planned shape, spec and size, nothing else, and a tokenizer. `out`: the name it will have
    (named in the error instead of the staged folder's)."""
    out = Path(out) if out is not None else folder
    try:
        art = read_artifact(folder)
    except MixqError as e:
        raise MixqError(f"{out}: the written folder does not read back ({str(e).replace(str(folder), str(out))}); "
                        "nothing was written: check the disk and convert again") from None
    got = {t.name: t for t in art.tensors}
    wrong = []
    for tp in prep.plan.tensors:
        t = got.pop(tp.name, None)
        spec = (tp.spec.bits, tp.spec.group_size) if tp.spec is not None else (None, None)
        if t is None:
            wrong.append(f"{tp.name} missing")
        elif (tuple(t.shape) != tuple(tp.shape) or (t.bits, t.group_size) != spec or t.nbytes != tp.nbytes
              or (tp.spec is None and t.dtype != tp.dtype)):
            wrong.append(f"{tp.name} {list(t.shape)} {t.dtype} bits={t.bits} ({t.nbytes} bytes), planned "
                         f"{list(tp.shape)} {tp.dtype} bits={spec[0]} ({tp.nbytes} bytes)")
    wrong += [f"{n} not planned" for n in sorted(got)]
    stored = {name for tp in prep.plan.tensors for name, _, _ in stored_tensors(tp)}
    try:
        index = json.loads((folder / INDEX_FILE).read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError):
        index = None
    if index is None or set(index) != stored or not all((folder / f).is_file() for f in set(index.values())):
        wrong.append(f"{INDEX_FILE} does not list exactly the stored tensors")
    if art.size_bytes != prep.plan.total_bytes:
        wrong.append(f"{art.size_bytes} bytes of weights, planned {prep.plan.total_bytes}")
    if not has_tokenizer_file(folder):
        wrong.append("no tokenizer file")
    if wrong:
        raise MixqError(f"{out}: the written folder is not what was planned ({'; '.join(wrong[:3])}"
                        f"{f'; and {len(wrong) - 3} more' if len(wrong) > 3 else ''}); nothing was written: "
                        "please report this as a mixq bug")


def write_mlx_folder(prep: Prepared, out, *, force: bool = False, shard_bytes: int = SHARD_BYTES,
                     progress: bool = True, precomputed: Precomputed | None = None) -> Path:
    """Write the prepared conversion to the MLX folder `out` (built beside it, renamed into place).

    `precomputed`: tensors a calibrated method quantized (tune/), written as given; every other tensor is
    quantized here (round to nearest). Checked before writing (`check_source`: tensors against config.json,
    tokenizer; `check_precomputed`) and after, on the folder read back (`check_written`); a failed check leaves
    nothing behind."""
    out = Path(out)
    if not (isinstance(shard_bytes, int) and shard_bytes >= 1):
        raise MixqError(f"shard size {shard_bytes!r} bytes: must be a positive size (--shard-size GiB, default 5)")
    check_output(out, force, protect=[prep.path])
    check_source(prep)
    check_precomputed(prep.plan, precomputed)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(out.parent).free
    except OSError as e:
        raise os_error(e, out) from None
    need = int(prep.plan.total_bytes) + (1 << 20)
    if free < need:
        raise MixqError(f"{out.parent}: {_size(free)} free, the converted model needs {_size(need)}; "
                        f"free some space or write elsewhere")
    with staged_dir(out, force, protect=[prep.path]) as tmp:
        hashes: dict = {}
        hasher = threading.Thread(target=_hash_files, args=(prep.ckpt.source_files(), hashes), daemon=True)
        hasher.start()
        # Casting and quantizing run as many small torch ops per chunk; one thread is fastest
        # (and stays fast when the machine is busy).
        with torch.no_grad(), torch_threads(1):
            weight_map = write_weights(prep, tmp, shard_bytes, progress, precomputed)
        write_index(prep.plan, tmp, weight_map)
        write_config(prep, tmp)
        copied = copy_side_files(prep.path, tmp)
        hasher.join()
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance(prep, hashes, copied, precomputed), indent=2))
        (tmp / "README.md").write_text(_readme(prep, out.name, precomputed))
        check_written(prep, tmp, out)
    return out


def convert(source, out, recipe="q6-hi", dtype=None, force=False, *, shard_bytes: int = SHARD_BYTES,
            progress: bool = True, scale_dtype: str | None = None, requant=None) -> Path:
    """Convert `source` (HF folder, .gguf, embedded name) into the MLX folder `out` under `recipe` (recipe
    `source`: a GGUF's blocks kept, see `quant.gguf_quants`; `scale_dtype` and `requant` apply to it)."""
    out = Path(out)
    resolved = resolve(str(source))
    check_output(out, force, protect=[resolved.path] + ([resolved.gguf] if resolved.gguf else []))
    prep = prepare(resolved, recipe, dtype, scale_dtype=scale_dtype, requant=requant)
    return write_mlx_folder(prep, out, force=force, shard_bytes=shard_bytes, progress=progress)


def add_source_arguments(p) -> None:
    """The options of recipe `source` (a GGUF kept as it is), shared by convert and import --keep-quant."""
    p.add_argument("--scale-dtype", choices=SCALE_DTYPES, default=None,
                   help=f"recipe source: dtype of the kept tensors' scales and biases (default "
                        f"{DEFAULT_SCALE_DTYPE}; float32 is exact, see docs)")
    p.add_argument("--requant", default=None, metavar="RECIPE",
                   help="recipe source: recipe for the GGUF tensors MLX cannot hold exactly (Q6_K, Q3_K, Q2_K, "
                        "IQ*; default: the same bits at group 32)")


# ---------------------------------------------------------------- CLI

def add_arguments(p):
    p.add_argument("source", help="Hugging Face folder, .gguf file or embedded model name")
    p.add_argument("out", help="output MLX folder")
    p.add_argument("--recipe", "-r", default=None,
                   help="built-in recipe name or TOML file (default: q6-hi); `source`: a GGUF's blocks kept")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="dtype of unquantized tensors, scales and biases (default: config.json's)")
    add_source_arguments(p)
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--dry-run", action="store_true", help="print the per-tensor plan and write nothing")
    p.add_argument("--shard-size", type=float, default=SHARD_BYTES / 2**30, help="max shard size in GiB (default 5)")


def cli(args, precompute=None):
    """`mixq convert`; `precompute(prep) -> Precomputed` runs the calibrated methods a plan asks for (the
    command's module, tune/methods.py, passes it: quant cannot run a model)."""
    if not (math.isfinite(args.shard_size) and args.shard_size > 0):
        raise MixqError(f"--shard-size {args.shard_size}: give a positive size in GiB (default 5)")
    if not args.dry_run:
        check_output(Path(args.out), args.force)  # before any work (the source is protected again when known)
    prep = prepare(args.source, args.recipe, args.dtype, scale_dtype=args.scale_dtype, requant=args.requant,
                   method=getattr(args, "method", None))
    if args.dry_run:
        check_source(prep)
        print_plan(prep.plan, source=args.source)
        return 0
    t0 = time.time()
    pre = None
    if prep.plan.calibrated():
        check_source(prep)
        if precompute is None:
            check_precomputed(prep.plan, None)  # refuses, naming the method and how to run it
        pre = precompute(prep)
    out = write_mlx_folder(prep, args.out, force=args.force, shard_bytes=max(1, int(args.shard_size * 2**30)),
                           precomputed=pre)
    plan = prep.plan
    print(f"wrote {out} ({plan.total_bytes / 1e9:.3f} GB, {plan.bits_per_weight:.3f} bpw, "
          f"recipe {prep.recipe.name}) in {time.time() - t0:.1f}s")
    return 0

"""`mixq convert`: a checkpoint -> an MLX model folder (mixed-precision affine quants) under a recipe.

Streaming: tensors are read, quantized and written one at a time into shards whose headers are
planned up front, so memory stays a few times the largest tensor. The folder is built beside OUT
under a temporary name and renamed at the end; any error or Ctrl-C removes it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import MixqError

SHARD_BYTES = 5 << 30  # mlx-lm's MAX_FILE_SIZE_GB
QUANT_CHUNK = 1 << 20  # elements quantized per call: bounds the quantizer's temporaries (~30 bytes each)
DTYPES = ("bfloat16", "float16", "float32")
# Small files copied from the source folder (tokenizer, templates, generation config, licence).
COPY_PATTERNS = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt",
                 "chat_template*", "generation_config.json", "*.tiktoken", "spiece.model", "LICENSE*",
                 "NOTICE*", "USE_POLICY*")


@dataclass
class Prepared:
    """Everything known before any tensor is read: the source, the plan, the tensor loaders."""
    source: str
    path: Path
    provenance: dict
    ckpt: object
    recipe: object
    plan: object
    items: list            # [(TensorInfo in MLX layout, loader)]
    store_dtype: object    # torch dtype floating tensors are stored in (None: as in the source)
    config: dict           # output config.json without quantization


def storage_dtype(config: dict, dtype: str | None = None):
    """The dtype floating tensors are stored in: `dtype`, else config.json's torch_dtype/dtype (as mlx_lm), else None."""
    import torch

    if dtype is not None and dtype not in DTYPES:
        raise MixqError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    name = dtype or config.get("torch_dtype") or config.get("dtype")
    if name is None and isinstance(config.get("text_config"), dict):
        name = config["text_config"].get("torch_dtype") or config["text_config"].get("dtype")
    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}.get(name)


def _resolve(source) -> tuple[Path, dict, str | None]:
    """(HF folder, provenance of the source, recipe from a name@recipe ref) for a source reference."""
    try:
        from .sources import resolve
    except ImportError:  # sources.py not there: a plain HF folder only
        resolve = None
    if resolve is None:
        return Path(source), {}, None
    r = resolve(str(source))
    if r.kind == "mlx":
        raise MixqError(f"{source}: is already an MLX (converted) folder; convert from its Hugging Face source")
    return Path(r.path), dict(r.provenance or {}), r.recipe


def prepare(source, recipe=None, dtype: str | None = None) -> Prepared:
    """Resolve the source, read its headers, build the MLX tensor list and the recipe's plan."""
    from . import arch
    from .checkpoint import Checkpoint, torch_dtype_name
    from .recipe import Recipe, load_recipe, plan_model

    path, provenance, ref_recipe = _resolve(source)
    ckpt = Checkpoint(path)
    arch.check_supported(ckpt.config)
    recipe = recipe or ref_recipe or "q6-hi"
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(str(recipe))
    store = storage_dtype(ckpt.config, dtype or recipe.dtype)  # --dtype > recipe's dtype > config.json's
    items = list(arch.mlx_tensors(ckpt))
    config = arch.mlx_config(ckpt.config, tied=arch.is_tied(ckpt))
    plan = plan_model([info for info, _ in items], recipe, config,
                      dtype=torch_dtype_name(store) if store is not None else None)
    return Prepared(str(source), path, provenance, ckpt, recipe, plan, items, store, config)


def _outputs(tp) -> list[tuple[str, tuple[int, ...], object]]:
    """The stored tensors (name, shape, torch dtype) for one planned tensor."""
    from .checkpoint import dtype_from_name

    import torch

    dt = dtype_from_name(tp.dtype)
    shape = tuple(tp.shape)
    if tp.spec is None:
        return [(tp.name, shape, dt)]
    base = tp.name.removesuffix(".weight")
    bits, gs = tp.spec.bits, tp.spec.group_size
    *lead, n = shape
    return [(f"{base}.weight", (*lead, n * bits // 32), torch.uint32),
            (f"{base}.scales", (*lead, n // gs), dt),
            (f"{base}.biases", (*lead, n // gs), dt)]


def _nbytes(shape, dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def plan_shards(plan, max_bytes: int) -> list[list]:
    """Group planned tensors into shards of at most `max_bytes` (a bigger tensor gets its own), as mlx_lm does."""
    shards, size = [], 0
    for tp in plan.tensors:
        b = sum(_nbytes(s, d) for _, s, d in _outputs(tp))
        if not shards or size + b > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tp)
        size += b
    return shards


def _hash_files(files: list[Path], result: dict):
    for f in files:
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
        result[f.name] = {"bytes": f.stat().st_size, "sha256": h.hexdigest()}


def _copy_side_files(src: Path, dst: Path) -> list[str]:
    copied = []
    for pattern in COPY_PATTERNS:
        for f in sorted(src.glob(pattern)):
            if f.is_file() and not (dst / f.name).exists():
                shutil.copy2(f, dst / f.name)
                copied.append(f.name)
    return copied


def _readme(prep: Prepared, out_name: str) -> str:
    from . import __version__

    plan = prep.plan
    bpw = plan.bits_per_weight
    base = _base_model(prep)
    note = prep.provenance.get("note")
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

# {out_name}

{prep.source} converted to MLX with mixq {__version__}, recipe `{prep.recipe.name}`:
{prep.recipe.description}

Size {plan.total_bytes / 1e9:.3f} GB, {bpw:.3f} bits per weight ({quant}).
Per-tensor choices: `mixq_provenance.json`.
{f"Source note: {note}." + chr(10) if note else ""}(Run `mixq card` on this folder for the full model card.)

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


def _write_tensor(writer, tp, load, store_dtype, advance) -> list[str]:
    """Read one tensor, cast it, quantize it by row chunks (bounding the temporaries) and append it to `writer`.

    Packed rows are written as they come; scales and biases (1/8 of the packed size or less) follow.
    `advance(k)` is called with the number of source elements done.
    """
    import torch

    from .quantize import quantize

    t = load()
    outs = _outputs(tp)
    if tp.spec is None:
        if store_dtype is not None and t.is_floating_point() and t.dtype != store_dtype:
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
        wq, s, b = quantize(chunk, tp.spec.bits, tp.spec.group_size, name=tp.name)
        writer.write_rows(outs[0][0], wq)
        scales.append(s)
        biases.append(b)
        advance(chunk.numel())
    del t, rows
    writer.write(outs[1][0], torch.cat(scales).view(outs[1][1]))
    writer.write(outs[2][0], torch.cat(biases).view(outs[2][1]))
    return [o[0] for o in outs]


def _write(prep: Prepared, tmp: Path, shard_bytes: int, progress: bool, out_name: str) -> dict:
    """Write weights, index, config, side files, provenance and README into `tmp`."""
    from tqdm import tqdm

    from . import __version__
    from .checkpoint import SafetensorsWriter

    plan, items = prep.plan, dict((info.name, load) for info, load in prep.items)
    hashes: dict = {}
    hasher = threading.Thread(target=_hash_files, args=(prep.ckpt.source_files(), hashes), daemon=True)
    hasher.start()

    shards = plan_shards(plan, shard_bytes)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map = {}
    src_bytes = sum(_nbytes(tp.shape, _dt(tp.dtype)) for tp in plan.tensors)
    bar = tqdm(total=src_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="convert",
               disable=not progress, dynamic_ncols=True)
    done = 0
    try:
        for shard, fname in zip(shards, names):
            entries = [o for tp in shard for o in _outputs(tp)]
            writer = SafetensorsWriter(tmp / fname, entries, metadata={"format": "mlx"})
            try:
                for tp in shard:
                    per = _nbytes(tp.shape, _dt(tp.dtype)) / max(math.prod(tp.shape), 1)  # bytes per element
                    for oname in _write_tensor(writer, tp, items[tp.name], prep.store_dtype,
                                               lambda n, per=per: bar.update(n * per)):
                        weight_map[oname] = fname
                    done += 1
                    bar.set_postfix_str(f"{done}/{len(plan.tensors)} tensors", refresh=False)
                writer.close()
            except BaseException:
                writer.abort()
                raise
    finally:
        bar.close()

    total_size = sum(_nbytes(shape, dt) for tp in plan.tensors for _, shape, dt in _outputs(tp))
    index = {"metadata": {"total_size": total_size, "total_parameters": int(plan.total_params)},
             "weight_map": dict(sorted(weight_map.items()))}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))

    config = dict(prep.config)
    q = plan.quantization_config()
    if q:
        config["quantization"] = q
        config["quantization_config"] = q
    (tmp / "config.json").write_text(json.dumps(dict(sorted(config.items())), indent=4))
    copied = _copy_side_files(prep.path, tmp)

    hasher.join()
    tensors = [{"name": tp.name, "shape": list(tp.shape), "dtype": tp.dtype,
                "bits": tp.spec.bits if tp.spec else None, "group_size": tp.spec.group_size if tp.spec else None,
                "bytes": int(tp.nbytes), "reason": tp.reason} for tp in plan.tensors]
    provenance = {
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
        "tensors": tensors,
    }
    (tmp / "mixq_provenance.json").write_text(json.dumps(provenance, indent=2))
    (tmp / "README.md").write_text(_readme(prep, out_name))
    return provenance


def _dt(name):
    from .checkpoint import dtype_from_name

    return dtype_from_name(name)


def convert(source, out, recipe="q6-hi", dtype=None, force=False, *, shard_bytes: int = SHARD_BYTES,
            progress: bool = True, _prepared: Prepared | None = None) -> Path:
    """Convert `source` (HF folder, .gguf, embedded name) into the MLX folder `out` under `recipe`."""
    import torch

    out = Path(out)
    if out.exists() and not force:
        raise MixqError(f"{out}: already exists; choose another path or pass --force to replace it")
    prep = _prepared or prepare(source, recipe, dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    need = int(prep.plan.total_bytes) + (1 << 20)
    free = shutil.disk_usage(out.parent).free
    if free < need:
        raise MixqError(f"{out.parent}: {free / 1e9:.2f} GB free, the converted model needs {need / 1e9:.2f} GB; "
                        f"free some space or write elsewhere")
    tmp = out.parent / f".{out.name}.mixq-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        from .quantize import torch_threads

        # Casting and quantizing run as many small torch ops per chunk; one thread is fastest
        # (and stays fast when the machine is busy).
        with torch.no_grad(), torch_threads(1):
            _write(prep, tmp, shard_bytes, progress, out.name)
        if out.exists():  # --force: swap, then delete the old folder
            old = out.parent / f".{out.name}.mixq-old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
        else:
            tmp.rename(out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise MixqError(f"{out.parent}: disk full while writing the converted model; free space and retry") from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ---------------------------------------------------------------- CLI

def add_arguments(p):
    p.add_argument("source", help="Hugging Face folder, .gguf file or embedded model name")
    p.add_argument("out", help="output MLX folder")
    p.add_argument("--recipe", "-r", default=None, help="built-in recipe name or TOML file (default: q6-hi)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="dtype of unquantized tensors, scales and biases (default: config.json's)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--dry-run", action="store_true", help="print the per-tensor plan and write nothing")
    p.add_argument("--shard-size", type=float, default=SHARD_BYTES / 2**30, help="max shard size in GiB (default 5)")


def cli(args):
    from .plan_show import print_plan

    prep = prepare(args.source, args.recipe, args.dtype)
    if args.dry_run:
        print_plan(prep.plan, source=args.source)
        return 0
    t0 = time.time()
    out = convert(args.source, args.out, force=args.force, shard_bytes=int(args.shard_size * 2**30), _prepared=prep)
    plan = prep.plan
    print(f"wrote {out} ({plan.total_bytes / 1e9:.3f} GB, {plan.bits_per_weight:.3f} bpw, "
          f"recipe {prep.recipe.name}) in {time.time() - t0:.1f}s")
    return 0

"""`mixq eval`: the seven tasks, perplexity and KL divergence, into a resumable run folder.

Run folder:
* `results.json`: model, recipe, size, bits per weight, dtype, per-task metrics with standard
  errors and n, `ppl`, `kld` (llama.cpp-like keys), seconds, versions, and the `options` the run
  was started with. Rewritten atomically after every task, so partial progress is visible.
* `samples.jsonl`: one line per scored document, appended and flushed as it is scored.
`--resume` continues such a folder: finished tasks are kept, documents already in samples.jsonl
are not scored again; the options must be the same (otherwise it refuses).

With `kld` and `ppl` both asked for on the same windows, the perplexity comes from the KLD pass
(same forward, same definition), so it costs nothing extra.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

from mixq.errors import MixqError
from mixq.eval.data import load_docs
from mixq.eval.engine import _tokenizer, load_model
from mixq.eval.perplexity import (
    DEFAULT_CTX,
    DEFAULT_KLD,
    cached_base_dists,
    default_text_file,
    kld_summary,
    make_windows,
    perplexity,
    ppl_stats,
    token_stats,
)
from mixq.eval.scoring import score_docs, task_metrics
from mixq.io.files import write_atomic
from mixq.sources.resolve import resolve
from mixq.version import __version__

SEVEN = ("arc_challenge", "arc_easy", "boolq", "hellaswag", "openbookqa", "piqa", "winogrande")
EXTRA = ("ppl", "kld")
RESULTS = "results.json"
DEFAULT_WINDOWS = 64  # ppl/kld windows of 512 tokens: 32,704 scored tokens (None: the whole file)
SAMPLES = "samples.jsonl"
# options that must be equal to resume a run (tasks may be added)
_RESUME_KEYS = ("model", "recipe", "dtype", "limit", "sample", "seed", "data_dir", "base", "ppl_file", "ctx",
                "windows", "kld_topk")


def parse_tasks(spec) -> list[str]:
    """'all' = the seven tasks; a comma list (or list) of task names, ppl, kld; order kept, no repeats."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for t in (x.strip() for x in items):
        if not t:
            continue
        names = SEVEN if t == "all" else (t,)
        for n in names:
            if n not in SEVEN + EXTRA:
                raise MixqError(f"unknown task {n!r}: choose from {', '.join(SEVEN + EXTRA)} or 'all'")
            if n not in out:
                out.append(n)
    if not out:
        raise MixqError("no task given: use --tasks all,ppl,kld or a comma list of task names")
    return out


def _write_json(path: Path, obj: dict) -> None:
    write_atomic(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def _versions() -> dict:
    import platform

    import numpy
    import torch
    import transformers


    return {"mixq": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "numpy": numpy.__version__}


def read_samples(path: Path) -> list[dict]:
    """The complete lines of a samples.jsonl (a line cut by an interruption is dropped)."""
    out = []
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def _prepare_run_dir(out: Path, options: dict, resume: bool, force: bool) -> tuple[dict | None, list[dict]]:
    """Create/check the run folder; return (previous results, previous sample records) when resuming."""
    if out.exists() and not out.is_dir():
        raise MixqError(f"{out}: exists and is not a folder; choose another -o RUN_DIR")
    exists = out.exists() and any(out.iterdir())
    if exists and not resume:
        if not force:
            raise MixqError(f"{out}: run folder exists; use --resume to continue it or --force to start over")
        if not ((out / RESULTS).exists() or (out / SAMPLES).exists()):
            raise MixqError(f"{out}: is not a mixq run folder (no {RESULTS}); --force only replaces run folders")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    if not (resume and exists):
        return None, []
    prev = None
    if (out / RESULTS).exists():
        try:
            prev = json.loads((out / RESULTS).read_text())
        except ValueError:
            raise MixqError(f"{out / RESULTS}: unreadable; start over with --force") from None
        old = prev.get("options", {})
        diff = [k for k in _RESUME_KEYS if old.get(k) != options.get(k)]
        if diff:
            shown = ", ".join(f"{k}: {old.get(k)!r} -> {options.get(k)!r}" for k in diff)
            raise MixqError(f"{out}: cannot resume with different options ({shown}); use the same options or --force")
    samples = read_samples(out / SAMPLES)
    # drop a cut last line so appends start on a clean line
    tmp = out / (SAMPLES + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in samples))
    os.replace(tmp, out / SAMPLES)
    return prev, samples


def _short_provenance(prov, depth: int = 0):
    """The folder's provenance without its per-tensor tables (those stay in the folder): any dict
    or list of more than 32 entries becomes a count, recipe texts are dropped."""
    if isinstance(prov, dict):
        if depth and len(prov) > 32:
            return {"entries": len(prov)}
        return {k: _short_provenance(v, depth + 1) for k, v in prov.items() if k != "text"}
    if isinstance(prov, list) and len(prov) > 32:
        return {"entries": len(prov)}
    return prov


def _record_line(rec: dict) -> str:
    rec = dict(rec)
    for k in ("correct", "correct_norm"):
        if k in rec and isinstance(rec[k], bool):
            rec[k] = int(rec[k])
    return json.dumps(rec, default=_json_default) + "\n"


def _eval_task(lm, task: str, samples_file, done: dict, *, data_dir, limit, sample, seed, batch_size, threads,
               progress: bool) -> dict:
    """Score one task's documents not in `done` (doc_id -> record); return its metrics entry."""
    from tqdm import tqdm


    t0 = time.time()
    docs, src = load_docs(task, data_dir=data_dir, limit=limit, sample=sample, seed=seed, progress=progress)
    todo = [(i, d) for i, d in docs if i not in done]
    records = dict(done)
    bar = tqdm(total=len(docs), initial=len(docs) - len(todo), desc=task, unit="doc", disable=not progress,
               dynamic_ncols=True)
    if todo:
        kw = {} if batch_size is None else {"batch_size": batch_size}
        for rec in score_docs(lm.model, lm.tokenizer, task, todo, progress=False, threads=threads, **kw):
            rec = {"task": task, **rec}
            samples_file.write(_record_line(rec))
            samples_file.flush()
            records[rec["doc_id"]] = rec
            bar.update(1)
    bar.close()
    ordered = [records[i] for i, _ in docs]
    metrics = dict(task_metrics(ordered))
    metrics.update(source=src.get("source"), split=src.get("split"), seconds=round(time.time() - t0, 3),
                   n_scored_now=len(todo))
    for k, v in src.items():
        metrics.setdefault(k, v)
    return metrics


def evaluate(model_ref: str, tasks="all", out_dir=None, *, recipe: str | None = None, base: str | None = None,
             limit: int | None = None, sample: int | None = None, seed: int = 0, dtype: str = "float32",
             data_dir=None, resume: bool = False, force: bool = False, ppl_file=None, ctx: int | None = None,
             windows: int | None = DEFAULT_WINDOWS, kld_topk: int | None = None, batch_size: int | None = None,
             threads: int | None = None, progress: bool = True) -> dict:
    """Evaluate `model_ref` on `tasks` into the run folder `out_dir`; return the results dict."""
    import torch


    if out_dir is None:
        raise MixqError("no run folder given: pass -o RUN_DIR")
    if threads:
        torch.set_num_threads(threads)
    tasks = parse_tasks(tasks)
    if "kld" in tasks and not base:
        raise MixqError("task kld needs the unquantized model to compare with: pass --base MODEL")
    ctx = ctx or DEFAULT_CTX
    windows = windows or None  # 0: the whole file
    kld_form = DEFAULT_KLD if not kld_topk else int(kld_topk)  # exact unless a top-k is asked for
    out = Path(out_dir)
    wants_text = any(t in tasks for t in EXTRA)
    ppl_path = None
    if wants_text:

        ppl_path = str(Path(ppl_file).resolve()) if ppl_file else str(default_text_file())
    options = {"model": str(model_ref), "recipe": recipe, "dtype": dtype, "limit": limit, "sample": sample,
               "seed": seed, "data_dir": str(data_dir) if data_dir else None, "base": base,
               "ppl_file": ppl_path, "ctx": ctx, "windows": windows, "kld_topk": kld_topk or None, "tasks": tasks}
    prev, prev_samples = _prepare_run_dir(out, options, resume, force)
    if prev and prev.get("complete") and all(t in prev.get("tasks", {}) or t in prev for t in tasks):
        return prev  # nothing left to do
    t_start = time.time()

    # The base's distributions first (loading the base only on a cache miss), then the model alone.
    win = base_d = None
    if wants_text:
        resolved = resolve(str(model_ref))
        win = make_windows(_tokenizer(resolved.path), ppl_path, ctx=ctx, max_windows=windows)
    if "kld" in tasks and not (prev and "kld" in prev):
        base_d, hit = cached_base_dists(base, win, dtype=dtype, k=kld_form, progress=progress)
        if progress:
            print(f"kld base {base}: {'cached' if hit else 'computed and cached'}", file=sys.stderr)

    lm = load_model(model_ref, recipe=recipe, dtype=dtype, progress=progress)
    info = lm.info
    results = {
        "mixq_version": _versions()["mixq"], "model": str(model_ref), "recipe": info.recipe, "kind": info.kind,
        "path": str(info.path), "provenance": _short_provenance(info.provenance or {}), "dtype": dtype,
        "size_bytes": info.size_bytes, "n_params": info.n_params, "bits_per_weight": info.bits_per_weight,
        "bits_per_weight_quantized": info.bits_per_weight_quantized,
        "memory_bytes_estimate": info.size_bytes,  # weights as MLX holds them (activations/KV cache not counted)
        "tasks": {}, "options": options, "versions": _versions(), "complete": False,
    }
    if prev:
        results["tasks"] = {t: m for t, m in prev.get("tasks", {}).items()}
        for k in EXTRA:
            if k in prev:
                results[k] = prev[k]
        results["seconds_previous"] = prev.get("seconds", 0.0) + prev.get("seconds_previous", 0.0)
    _write_json(out / RESULTS, results)

    by_task: dict[str, dict] = {}
    for r in prev_samples:
        by_task.setdefault(r.get("task"), {})[r.get("doc_id")] = r
    with open(out / SAMPLES, "a") as sf:
        for task in tasks:
            if task in EXTRA:
                continue
            if task in results["tasks"] and prev is not None:
                continue  # finished in the interrupted run
            results["tasks"][task] = _eval_task(lm, task, sf, by_task.get(task, {}), data_dir=data_dir, limit=limit,
                                                sample=sample, seed=seed, batch_size=batch_size, threads=threads,
                                                progress=progress)
            _write_json(out / RESULTS, results)

    if wants_text:
        qwin = make_windows(lm.tokenizer, ppl_path, ctx=ctx, max_windows=windows)
        if qwin.digest != win.digest:
            raise MixqError(f"{model_ref}: its tokenizer splits {ppl_path} differently from its folder's tokenizer")
        if "kld" in tasks and "kld" not in results:
            t0 = time.time()
            ts = token_stats(lm.model, win, base_d, progress=progress)  # one window at a time, as the base
            secs = round(time.time() - t0, 3)
            results["kld"] = {"base": base, **kld_summary(ts), "ctx": ctx, "n_windows": int(win.ids.shape[0]),
                              "file": ppl_path, "form": base_d.k, "seconds": secs}
            if "ppl" in tasks and "ppl" not in results:
                results["ppl"] = {**ppl_stats(ts.nll_quant), "ctx": ctx, "file": ppl_path,
                                  "n_windows": int(win.ids.shape[0]), "seconds": secs, "from": "kld pass"}
            _write_json(out / RESULTS, results)
        if "ppl" in tasks and "ppl" not in results:
            t0 = time.time()
            with torch.inference_mode():
                p = perplexity(lm.model, win, progress=progress)
            results["ppl"] = {**p, "seconds": round(time.time() - t0, 3)}
            _write_json(out / RESULTS, results)

    results["seconds"] = round(time.time() - t_start, 3)
    results["complete"] = True
    _write_json(out / RESULTS, results)
    return results


# ---------------------------------------------------------------- terminal output and CLI

def _pm(v, se, digits=4) -> str:
    if v is None:
        return "-"
    return f"{v:.{digits}f}" if se is None else f"{v:.{digits}f} ± {se:.{digits}f}"


def print_table(results: dict, file=None) -> None:
    """A compact rich table of a results dict."""
    from rich.console import Console
    from rich.table import Table

    bpw = results.get("bits_per_weight")
    title = (f"{results['model']}  ·  {results.get('size_bytes', 0) / 1e6:.1f} MB  ·  "
             f"{bpw:.3f} bpw  ·  {results['dtype']}" if bpw else results["model"])
    table = Table(title=title, title_justify="left")
    for col, just in (("task", "left"), ("n", "right"), ("acc", "right"), ("acc_norm", "right"), ("s", "right")):
        table.add_column(col, justify=just)
    for task, m in results.get("tasks", {}).items():
        table.add_row(task, str(m.get("n", "")), _pm(m.get("acc"), m.get("acc_stderr")),
                      _pm(m.get("acc_norm"), m.get("acc_norm_stderr")), f"{m.get('seconds', 0):.1f}")
    if "ppl" in results:
        p = results["ppl"]
        table.add_row("ppl", str(p["n_tokens"]), _pm(p["ppl"], p["ppl_stderr"], 3), "", f"{p.get('seconds', 0):.1f}")
    if "kld" in results:
        k = results["kld"]
        table.add_row("kld mean", str(k["n_tokens"]), _pm(k["kld_mean"], k["kld_mean_stderr"], 5),
                      f"p99 {k['kld_p99']:.4f}", f"{k.get('seconds', 0):.1f}")
        table.add_row("top-1 agree", "", _pm(k["top1_agreement"], k["top1_agreement_stderr"]),
                      f"Δp rms {k['dp_rms']:.4f}", "")
        table.add_row("ln(ppl_q/ppl_b)", "", _pm(k["ln_ppl_ratio"], k["ln_ppl_ratio_stderr"], 5),
                      f"base ppl {k['ppl_base']:.3f}", "")
    Console(file=file).print(table)


def add_arguments(p) -> None:
    p.add_argument("model", help="MLX folder, HF folder, .gguf file, embedded name, or NAME@RECIPE")
    p.add_argument("--recipe", help="apply this recipe on the fly (same numbers as the converted folder)")
    p.add_argument("--tasks", default="all",
                   help=f"comma list of {', '.join(SEVEN)}, ppl, kld; 'all' = the seven tasks (default)")
    p.add_argument("--base", help="the unquantized model for kld")
    p.add_argument("--limit", type=int, help="first N documents of each task")
    p.add_argument("--sample", type=int, help="a seeded random subset of N documents per task")
    p.add_argument("--seed", type=int, default=0, help="seed for --sample (default 0)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    p.add_argument("--data-dir", help="local JSONL/parquet/arrow files of the task splits")
    p.add_argument("--ppl-file", help="text file for ppl/kld (default: WikiText-2 test, or $MIXQ_WIKITEXT)")
    p.add_argument("--ctx", type=int, default=512, help="context length of the ppl/kld windows (default 512)")
    p.add_argument("--windows", type=int, default=DEFAULT_WINDOWS,
                   help=f"first N ppl/kld windows (default {DEFAULT_WINDOWS}; 0 = the whole file)")
    p.add_argument("--kld-topk", type=int, default=None,
                   help="cache only the base's top-K logits per token (smaller, KL a lower bound); "
                        "default: exact KL from the base's cached hidden states")
    p.add_argument("--batch-size", type=int, help="documents per forward batch")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: all cores)")
    p.add_argument("-o", "--out", required=True, help="run folder to write")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in RUN_DIR")
    p.add_argument("--force", action="store_true", help="replace an existing run folder")


def cli(args) -> int:
    try:
        results = _cli_evaluate(args)
    except KeyboardInterrupt:
        print(f"mixq eval: interrupted; {args.out} keeps every finished document: continue with --resume",
              file=sys.stderr)
        return 130
    print_table(results)
    print(f"results: {Path(args.out) / RESULTS}")
    return 0


def _cli_evaluate(args) -> dict:
    return evaluate(args.model, args.tasks, args.out, recipe=args.recipe, base=args.base, limit=args.limit,
                    sample=args.sample, seed=args.seed, dtype=args.dtype, data_dir=args.data_dir,
                    resume=args.resume, force=args.force, ppl_file=args.ppl_file, ctx=args.ctx,
                    windows=args.windows, kld_topk=args.kld_topk, batch_size=args.batch_size,
                    threads=args.threads)

"""Benchmark: mixq's task scoring vs lm-evaluation-harness on the same model and documents.

Both score the first N documents (default 200) of each of the seven tasks with the same model
(default: the imported SmolLM2-135M, `smollm2-135m-gguf`), float32 on the CPU, all cores. The
harness (`lm-eval`, HF backend, its default batch size 1) runs in a separate virtual environment
and reads the very rows mixq reads, through a local-data task config that `include`s the harness's
own built-in task yaml (so its prompts, choices and metrics are the harness's, not ours).

Prints wall time per task and overall (model loading excluded, reported apart), the speed-up,
and per-document agreement of correctness (acc and, where the harness reports it, acc_norm) with
the largest log-likelihood difference. Not a test.

With --kld RECIPE it also times the KL divergence of MODEL@RECIPE against MODEL over 64 windows
of 512 WikiText-2 tokens (mixq eval's default context): the base pass (run once, then cached) and the quant pass apart.

Set up the harness once (never in mixq's .venv):
    python3 -m venv /tmp/lmeval-venv && /tmp/lmeval-venv/bin/pip install torch==2.13.0 'lm-eval[hf]'
(lm-eval 0.4.13 needs the [hf] extra for transformers and accelerate.)
Run:
    .venv/bin/python benchmarks/eval.py [--limit 200] [--tasks arc_easy,...] [--out /tmp/mixq-bench-eval]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's mixq (also in the harness venv)
from mixq.eval.tasks import TASK_NAMES  # noqa: E402 - stdlib-only module, importable in the harness venv

# the harness's built-in yaml of each task, relative to lm_eval/tasks/
HARNESS_YAML = {"arc_challenge": "arc/arc_challenge.yaml", "arc_easy": "arc/arc_easy.yaml",
                "boolq": "super_glue/boolq/default.yaml", "hellaswag": "hellaswag/hellaswag.yaml",
                "openbookqa": "openbookqa/openbookqa.yaml", "piqa": "piqa/piqa.yaml",
                "winogrande": "winogrande/default.yaml"}
PREFIX = "mixqbench_"


# --- harness side (runs inside the lm-eval virtual environment) ---------------------------------------

def harness_worker(args) -> None:
    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    lm = HFLM(pretrained=args.model_path, dtype="float32", device="cpu", batch_size=args.harness_batch_size)
    load_s = time.perf_counter() - t0
    tm = TaskManager(include_path=str(args.out / "harness_tasks"))
    results = {"load_seconds": load_s, "lm_eval_version": lm_eval.__version__, "torch": torch.__version__,
               "batch_size": args.harness_batch_size, "tasks": {}}
    for task in args.tasks:
        name = PREFIX + task
        t0, c0 = time.perf_counter(), time.process_time()
        res = lm_eval.simple_evaluate(model=lm, tasks=[name], task_manager=tm, num_fewshot=0, log_samples=True)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        docs = []
        for s in res["samples"][name]:
            lls = [float(r[0]) for r in s["filtered_resps"]]
            docs.append({"doc_id": s["doc_id"], "lls": lls, "acc": s.get("acc"), "acc_norm": s.get("acc_norm")})
        results["tasks"][task] = {"seconds": seconds, "cpu_seconds": cpu,
                                  "metrics": {k: v for k, v in res["results"][name].items()
                                              if isinstance(v, (int, float))},
                                  "docs": sorted(docs, key=lambda d: d["doc_id"])}
        print(f"harness {task}: {seconds:.1f}s", file=sys.stderr, flush=True)
    (args.out / f"harness-{'-'.join(args.tasks)}.json").write_text(json.dumps(results))


def write_harness_tasks(out: Path, tasks, limit: int, lmeval_python: str) -> None:
    """Export the documents mixq reads as JSONL and a task yaml per task including the harness's own."""
    from mixq.eval.data import load_docs

    tasks_dir = Path(subprocess.check_output(
        [lmeval_python, "-c", "import lm_eval.tasks, os; print(os.path.dirname(lm_eval.tasks.__file__))"],
        text=True).strip())
    (out / "harness_tasks").mkdir(parents=True, exist_ok=True)
    (out / "data").mkdir(exist_ok=True)
    for task in tasks:
        docs, meta = load_docs(task, limit=limit, progress=False)
        assert [i for i, _ in docs] == list(range(len(docs)))
        with open(out / "data" / f"{task}.jsonl", "w") as f:
            for _, doc in docs:
                if task == "boolq" and "label" not in doc:  # google/boolq layout -> super_glue's `label`
                    doc = {**doc, "label": int(bool(doc["answer"]))}
                f.write(json.dumps(doc) + "\n")
        cfg = {"include": str(tasks_dir / HARNESS_YAML[task]), "task": PREFIX + task, "tag": [],
               "dataset_path": "json", "dataset_name": None,
               "dataset_kwargs": {"data_files": {"validation": str((out / "data" / f"{task}.jsonl").resolve())}},
               "training_split": None, "test_split": None, "validation_split": "validation"}
        # JSON is valid YAML
        (out / "harness_tasks" / f"{PREFIX}{task}.yaml").write_text(json.dumps(cfg, indent=1) + "\n")


def run_harness(args, task: str) -> dict:
    """The harness on one task, in its own process (model loading timed apart)."""
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [args.lmeval_python, __file__, "--harness-worker", "--model-path", str(args.model_path),
           "--out", str(args.out), "--tasks", task, "--threads", str(args.threads),
           "--harness-batch-size", str(args.harness_batch_size)]
    subprocess.run(cmd, check=True, env=env)
    return json.loads((args.out / f"harness-{task}.json").read_text())


# --- mixq side ------------------------------------------------------------------------------------------

def load_mixq(args):
    import torch

    from mixq.eval.engine import load_model

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    lm = load_model(args.model, dtype="float32")
    return lm, time.perf_counter() - t0


def run_mixq(args, lm, task: str) -> dict:
    from mixq.eval.data import load_docs
    from mixq.eval.scoring import score_docs, task_metrics

    docs, meta = load_docs(task, limit=args.limit, progress=False)
    t0, c0 = time.perf_counter(), time.process_time()
    recs = list(score_docs(lm.model, lm.tokenizer, task, docs, threads=args.threads))
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(f"mixq {task}: {seconds:.1f}s", file=sys.stderr, flush=True)
    return {"seconds": seconds, "cpu_seconds": cpu, "metrics": task_metrics(recs), "source": meta["source"],
            "docs": sorted(recs, key=lambda r: r["doc_id"])}


def run_kld(args) -> str:
    """Time KLD of MODEL@RECIPE vs MODEL: the base pass (forced: cache entry removed) and the quant pass."""
    import resource

    from mixq.eval.engine import _tokenizer, model_fingerprint
    from mixq.eval.evaluate import evaluate
    from mixq.eval.perplexity import DEFAULT_CTX, DEFAULT_KLD, base_cache_path, cached_base_dists, make_windows

    win = make_windows(_tokenizer(args.model_path), ctx=DEFAULT_CTX, max_windows=args.kld_windows)
    path, _ = base_cache_path(model_fingerprint(args.model), win, DEFAULT_KLD)
    path.unlink(missing_ok=True)
    t0 = time.perf_counter()
    cached_base_dists(args.model, win, progress=False)
    base_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    r = evaluate(f"{args.model}@{args.kld}", ["kld"], args.out / "kld-run", base=args.model, windows=args.kld_windows,
                 force=True, progress=False)
    run_s = time.perf_counter() - t0
    k = r["kld"]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    return (f"KLD {args.model}@{args.kld} vs {args.model}, {k['n_windows']} x {k['ctx']} tokens "
            f"({k['n_tokens']} scored): "
            f"base pass {base_s:.1f}s (then cached), quant pass {k['seconds']:.1f}s ({run_s:.1f}s with loading); "
            f"kld_mean {k['kld_mean']:.4f} +- {k['kld_mean_stderr']:.4f}, top-1 agreement {k['top1_agreement']:.3f}, "
            f"ppl {k['ppl_quant']:.2f} vs {k['ppl_base']:.2f}; peak RSS of this process {peak:.2f} GB")


# --- comparison -----------------------------------------------------------------------------------------

def compare(mixq: dict, harness: dict, tasks) -> tuple[str, list[dict]]:
    lines = [f"{'task':<14} {'n':>4} {'wall s h/m':>13} {'speed-up':>8} {'cpu s h/m':>13} {'speed-up':>8}  "
             f"{'acc h/m':>11} {'acc_norm h/m':>13}  {'agree':>9} {'max |dll|':>9}"]
    disagreements = []
    tot = {"hw": 0.0, "mw": 0.0, "hc": 0.0, "mc": 0.0}
    for task in tasks:
        h, m = harness["tasks"][task], mixq["tasks"][task]
        hd = {d["doc_id"]: d for d in h["docs"]}
        md = {d["doc_id"]: d for d in m["docs"]}
        assert sorted(hd) == sorted(md), f"{task}: different documents"
        agree = 0
        max_d = 0.0
        for i in hd:
            a, b = hd[i], md[i]
            max_d = max(max_d, max(abs(x - y) for x, y in zip(a["lls"], b["lls"])))
            same = a["acc"] == b["correct"] and (a["acc_norm"] is None or a["acc_norm"] == b["correct_norm"])
            agree += same
            if not same:
                disagreements.append({"task": task, "doc_id": i, "harness_lls": a["lls"], "mixq_lls": b["lls"],
                                      "harness": [a["acc"], a["acc_norm"]], "mixq": [b["correct"], b["correct_norm"]]})
        hm, mm = h["metrics"], m["metrics"]
        norm = (f"{hm['acc_norm,none']:.3f}/{mm['acc_norm']:.3f}" if "acc_norm,none" in hm else "-")
        wall = f"{h['seconds']:.1f}/{m['seconds']:.1f}"
        cpu = f"{h['cpu_seconds']:.1f}/{m['cpu_seconds']:.1f}"
        lines.append(f"{task:<14} {len(hd):>4} {wall:>13} {h['seconds'] / m['seconds']:>7.1f}x {cpu:>13} "
                     f"{h['cpu_seconds'] / m['cpu_seconds']:>7.1f}x  {hm['acc,none']:.3f}/{mm['acc']:.3f} "
                     f"{norm:>13}  {agree:>4}/{len(hd):<4} {max_d:>9.1e}")
        tot["hw"] += h["seconds"]
        tot["mw"] += m["seconds"]
        tot["hc"] += h["cpu_seconds"]
        tot["mc"] += m["cpu_seconds"]
    wall = f"{tot['hw']:.1f}/{tot['mw']:.1f}"
    cpu = f"{tot['hc']:.1f}/{tot['mc']:.1f}"
    lines.append(f"{'overall':<14} {'':>4} {wall:>13} {tot['hw'] / tot['mw']:>7.1f}x {cpu:>13} "
                 f"{tot['hc'] / tot['mc']:>7.1f}x")
    lines.append(f"h = lm-eval {harness.get('lm_eval_version')} (HF backend, batch size {harness.get('batch_size')}), "
                 f"m = mixq; model load not included (mixq {mixq['load_seconds']:.1f}s, harness "
                 f"{harness['load_seconds']:.1f}s per process)")
    return "\n".join(lines), disagreements


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-gguf")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--tasks", default=",".join(TASK_NAMES))
    ap.add_argument("--out", type=Path, default=Path("/tmp/mixq-bench-eval"))
    ap.add_argument("--lmeval-python", default="/tmp/lmeval-venv/bin/python")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--harness-batch-size", default="1")
    ap.add_argument("--kld", metavar="RECIPE", help="also time KLD of MODEL@RECIPE vs MODEL (e.g. q6-hi)")
    ap.add_argument("--kld-windows", type=int, default=64)
    ap.add_argument("--harness-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model-path", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.tasks = [t for t in args.tasks.split(",") if t]
    args.out.mkdir(parents=True, exist_ok=True)
    if args.harness_worker:
        harness_worker(args)
        return 0

    from mixq.sources.resolve import resolve

    args.model_path = resolve(args.model).path
    print(f"model {args.model} -> {args.model_path}; {args.limit} docs per task; {args.threads} threads",
          file=sys.stderr)
    if not args.tasks:  # KLD timing only
        print(run_kld(args) if args.kld else "nothing to do: pass --tasks and/or --kld")
        return 0
    write_harness_tasks(args.out, args.tasks, args.limit, args.lmeval_python)
    # interleaved task by task, so that both see the same load on a shared machine
    lm, load_s = load_mixq(args)
    mixq = {"load_seconds": load_s, "tasks": {}}
    harness = {"tasks": {}}
    for n, task in enumerate(args.tasks, 1):
        mixq["tasks"][task] = run_mixq(args, lm, task)
        h = run_harness(args, task)
        harness["tasks"][task] = h["tasks"][task]
        harness.update({k: v for k, v in h.items() if k != "tasks"})
        (args.out / "mixq.json").write_text(json.dumps(mixq))
        (args.out / "harness.json").write_text(json.dumps(harness))
        if n < len(args.tasks):  # a partial report after every task
            (args.out / "report.txt").write_text(compare(mixq, harness, args.tasks[:n])[0] + "\n")
    table, dis = compare(mixq, harness, args.tasks)
    if args.kld:
        table += "\n" + run_kld(args)
    print(table)
    for d in dis:
        print("DISAGREE", json.dumps(d))
    (args.out / "report.txt").write_text(table + "\n" + "".join("DISAGREE " + json.dumps(d) + "\n" for d in dis))
    return 0


if __name__ == "__main__":
    sys.exit(main())

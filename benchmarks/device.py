"""Benchmark: mixq on a GPU against the CPU, in one go (prints numbers; not a test).

For MODEL (a folder, embedded name or NAME@RECIPE) it runs the same work on the CPU in float32 (the
reference: what `mixq eval` computes without a GPU) and on --device (default cuda) in --dtype (default
bfloat16, the GPU default):
  * task scoring of the first --limit documents of each --tasks task: documents/s and scored tokens/s;
    per-document agreement with the CPU run (same pred, same pred_norm) and the largest |log-likelihood|
    difference;
  * KLD against --base over --windows windows of --ctx tokens (the base's pass timed apart, then cached
    per device as `mixq eval` caches it): tokens/s, KLD mean and top-1 agreement on each device;
  * generation: --gen-tokens greedy tokens after a --prompt-tokens prompt: tokens/s, and how many of the
    greedy tokens match the CPU's before the first difference;
  * peak GPU memory of each phase (torch.cuda.max_memory_allocated, reset per phase) and the weights' bytes.
With --packed it also runs --device with `--max-memory 0`: quantized weights packed in CPU memory and
dequantized there per forward, copied to the GPU one module at a time (what a model larger than the
GPU's memory budget gets).

Writes OUT/device.json and prints a table. Run on a GPU machine (checkout + .venv; the model, the task
data and WikiText-2 on disk: the mixq cache copied over or MIXQ_CACHE pointing at it, --ppl-file):
    .venv/bin/python benchmarks/device.py --model smollm2-135m@q6-hi --base smollm2-135m --limit 200
Smoke test anywhere (a tiny random model and synthetic documents, nothing downloaded):
    .venv/bin/python benchmarks/device.py --tiny llama --device cpu
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mixq.eval.data import load_docs  # noqa: E402
from mixq.eval.engine import load_model, resolve_device  # noqa: E402
from mixq.eval.perplexity import cached_base_dists, kld_summary, make_windows, token_stats  # noqa: E402
from mixq.eval.scoring import score_docs  # noqa: E402
from mixq.infer.generate import TorchSession, peak_rss_gb  # noqa: E402


def synthetic_docs(n: int, seed: int = 0) -> list[tuple[int, dict]]:
    """ARC-shaped documents from fixed text (for --tiny: no task data needed)."""
    import random

    words = ("energy light water plant frog stone river cloud metal heat sound wind seed root leaf shell "
             "ice salt sand glass").split()
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        q = " ".join(rng.choice(words) for _ in range(rng.randint(6, 14)))
        choices = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 4))) for _ in range(4)]
        docs.append((i, {"id": str(i), "question": q.capitalize() + "?",
                         "choices": {"text": choices, "label": ["A", "B", "C", "D"]}, "answerKey": "ABCD"[i % 4]}))
    return docs


def gpu_sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
    elif device == "mps":
        torch.mps.synchronize()


def reset_gpu_peak(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def gpu_peak(device: str) -> int | None:
    import torch

    if device == "cuda":
        return int(torch.cuda.max_memory_allocated())
    if device == "mps":
        return int(torch.mps.driver_allocated_memory())
    return None


def run_one(label: str, args, device: str, dtype: str, max_memory, docs: dict, text: Path) -> dict:
    """Scoring, KLD and generation of args.model on one device; numbers and raw outputs."""
    out: dict = {"label": label, "device": device, "dtype": dtype}
    t0 = time.perf_counter()
    lm = load_model(args.model, dtype=dtype, device=device, max_memory=max_memory, progress=False)
    gpu_sync(device)
    out["load_s"] = time.perf_counter() - t0
    out["weights_bytes"] = lm.info.weights_bytes

    reset_gpu_peak(device)
    records, n_docs, n_tok = {}, 0, 0
    t0 = time.perf_counter()
    for task, task_docs in docs.items():
        recs = list(score_docs(lm.model, lm.tokenizer, task, task_docs, progress=False))
        records[task] = {r["doc_id"]: r for r in recs}
        n_docs += len(recs)
        n_tok += sum(sum(r["n_tokens"]) for r in recs)
    gpu_sync(device)
    dt = time.perf_counter() - t0
    out["scoring"] = {"docs": n_docs, "scored_tokens": n_tok, "seconds": dt, "docs_per_s": n_docs / dt,
                      "tokens_per_s": n_tok / dt, "gpu_peak_bytes": gpu_peak(device)}

    win = make_windows(lm.tokenizer, text, ctx=args.ctx, max_windows=args.windows)
    reset_gpu_peak(device)
    t0 = time.perf_counter()
    base, hit = cached_base_dists(args.base, win, dtype=dtype, device=device, progress=False)
    gpu_sync(device)
    base_s = time.perf_counter() - t0
    reset_gpu_peak(device)
    t0 = time.perf_counter()
    ts = token_stats(lm.model, win, base, progress=False)
    gpu_sync(device)
    dt = time.perf_counter() - t0
    k = kld_summary(ts)
    out["kld"] = {"tokens": win.n_tokens, "seconds": dt, "tokens_per_s": win.n_tokens / dt,
                  "base_seconds": None if hit else base_s, "kld_mean": k["kld_mean"],
                  "top1_agreement": k["top1_agreement"], "ppl_quant": k["ppl_quant"],
                  "gpu_peak_bytes": gpu_peak(device)}

    ids = lm.tokenizer(text.read_text()[:20000], add_special_tokens=False)["input_ids"][:args.prompt_tokens]
    session = TorchSession(lm.model, lm.tokenizer)
    session.eos = set()  # exactly --gen-tokens tokens
    reset_gpu_peak(device)
    tokens, last = [], None
    for r in session.stream(ids, args.gen_tokens, 0.0, 1.0, None):
        tokens.append(r.token)
        last = r
    out["generation"] = {"prompt_tokens": len(ids), "prompt_tps": last.prompt_tps, "tokens": len(tokens),
                         "tokens_per_s": last.generation_tps, "gpu_peak_bytes": gpu_peak(device)}
    out["peak_rss_gb"] = peak_rss_gb()
    del lm, session
    return {"numbers": out, "records": records, "tokens": tokens}


def agreement(ref: dict, run: dict) -> dict:
    """Per-document agreement of `run` with the CPU reference `ref`."""
    n = same = same_norm = 0
    worst = 0.0
    for task, recs in ref["records"].items():
        for doc_id, r in recs.items():
            o = run["records"][task][doc_id]
            n += 1
            same += r["pred"] == o["pred"]
            same_norm += r["pred_norm"] == o["pred_norm"]
            worst = max([worst] + [abs(a - b) for a, b in zip(r["lls"], o["lls"])])
    g = 0
    while g < min(len(ref["tokens"]), len(run["tokens"])) and ref["tokens"][g] == run["tokens"][g]:
        g += 1
    return {"docs": n, "pred_agree": same / max(n, 1), "pred_norm_agree": same_norm / max(n, 1),
            "max_abs_ll_diff": worst, "greedy_tokens_equal_prefix": g}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m@q6-hi")
    ap.add_argument("--base", default=None, help="unquantized model for KLD (default: MODEL without @RECIPE)")
    ap.add_argument("--tiny", default=None, metavar="ARCH",
                    help="use a tiny random model of this architecture (tests/tiny_models.py) with q4-hi, "
                         "synthetic documents and a built-in text: a smoke test")
    ap.add_argument("--device", default="cuda", help="device to compare with the CPU (cuda, mps; cpu: smoke test)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tasks", default="arc_easy,hellaswag")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--ppl-file", default=None, help="text for KLD (default: WikiText-2 test)")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--packed", action="store_true", help="also run --device with --max-memory 0")
    ap.add_argument("--out", default="/tmp/mixq-bench-device")
    args = ap.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(args.device)
    tmp = Path(tempfile.mkdtemp(prefix="mixq-device-"))
    if args.tiny:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from tiny_models import _TEXT, make_tiny_hf

        src = make_tiny_hf(args.tiny, tmp / args.tiny)
        args.model, args.base = f"{src}@q4-hi", str(src)
        docs = {"arc_easy": synthetic_docs(args.limit)}
        text = tmp / "text.txt"
        text.write_text(_TEXT * 40)
        args.ctx = min(args.ctx, 64)
    else:
        from mixq.eval.perplexity import default_text_file

        args.base = args.base or args.model.rsplit("@", 1)[0]
        docs = {t: load_docs(t, data_dir=args.data_dir, limit=args.limit)[0] for t in args.tasks.split(",")}
        text = Path(args.ppl_file) if args.ppl_file else default_text_file()

    runs = {"cpu float32": run_one("cpu float32", args, "cpu", "float32", None, docs, text),
            f"{device} {args.dtype}": run_one(f"{device} {args.dtype}", args, device, args.dtype, None, docs, text)}
    if args.packed:
        label = f"{device} {args.dtype} packed"
        runs[label] = run_one(label, args, device, args.dtype, 0, docs, text)
    ref = runs["cpu float32"]
    report = {"model": args.model, "base": args.base, "limit": args.limit, "windows": args.windows, "ctx": args.ctx,
              "load_average": os.getloadavg()[0], "runs": {}}
    import torch

    if device == "cuda":
        report["gpu"] = torch.cuda.get_device_name()
    for label, run in runs.items():
        report["runs"][label] = {**run["numbers"], "agreement_with_cpu": agreement(ref, run)}
    (out / "device.json").write_text(json.dumps(report, indent=2) + "\n")

    print(f"{args.model} (base {args.base}); {report.get('gpu', device)}")
    head = (f"{'run':28} {'load s':>7} {'weights GB':>10} {'score doc/s':>11} {'score tok/s':>11} "
            f"{'kld tok/s':>10} {'gen tok/s':>9} {'gpu peak GB':>11} {'pred agree':>10} {'max |dll|':>9} "
            f"{'kld mean':>9}")
    print(head)
    for label, r in report["runs"].items():
        peaks = [r[k]["gpu_peak_bytes"] for k in ("scoring", "kld", "generation") if r[k]["gpu_peak_bytes"]]
        a = r["agreement_with_cpu"]
        print(f"{label:28} {r['load_s']:7.1f} {r['weights_bytes'] / 1e9:10.3f} {r['scoring']['docs_per_s']:11.1f} "
              f"{r['scoring']['tokens_per_s']:11.0f} {r['kld']['tokens_per_s']:10.0f} "
              f"{r['generation']['tokens_per_s']:9.1f} {(max(peaks) / 1e9 if peaks else 0):11.2f} "
              f"{a['pred_agree']:10.3f} {a['max_abs_ll_diff']:9.4f} {r['kld']['kld_mean']:9.5f}")
    print("greedy tokens equal to the CPU's (prefix): "
          + ", ".join(f"{k}: {v['agreement_with_cpu']['greedy_tokens_equal_prefix']}/{v['generation']['tokens']}"
                      for k, v in report["runs"].items()))
    print(f"-> {out / 'device.json'}")


if __name__ == "__main__":
    main()

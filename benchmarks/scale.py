"""Scale: eval peak memory and wall time of the dense engine vs packed weights, side by side.

    .venv/bin/python benchmarks/scale.py eval [--model smollm2-135m] [--recipes q6-hi,qx86-hi]
        [--engines dense,packed,auto] [--repeats 3] [--threads 1] [--out /tmp/mixq-scale]

Each recipe is converted once (`mixq convert`, into OUT/models); then every (recipe, workload, engine)
runs `mixq eval` in a fresh process, the repeats interleaved (round robin, so a noisy neighbour on a
shared machine hits every engine alike). Workloads: `--tasks arc_easy --limit 50` and `--tasks ppl
--windows 4` (the issue's). Engines:

* dense: every weight dequantized at load (`load_model(packed=False)`, the engine before packed weights);
* packed: `--max-memory 0`, eval's default (weights stay as the folder stores them, dequantized just in time
  per module);
* auto: `--max-memory auto` (dense copies made once while the weights fit half the memory available).

Prints, per row, the median and range over the repeats of the process's peak RSS (results.json
`peak_memory_bytes`) and of eval's wall time (results.json `seconds`: loading included, interpreter start
excluded), their ratio to the dense engine, and whether every document's record (samples.jsonl) and the
perplexity equal the dense engine's. Not a test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WORKLOADS = {"arc_easy": ["--tasks", "arc_easy", "--limit", "50"], "ppl": ["--tasks", "ppl", "--windows", "4"]}
ENGINES = {"dense": [], "packed": ["--max-memory", "0"], "auto": ["--max-memory", "auto"]}


def worker(argv: list[str]) -> int:
    """`mixq eval ARGV` in this process; engine "dense" first makes eval load with packed=False."""
    engine, argv = argv[0], argv[1:]
    from mixq.cli import main
    from mixq.eval import evaluate

    if engine == "dense":
        evaluate.load_model = partial(evaluate.load_model, packed=False)
    return main(["eval", *argv])


def _convert(model: str, recipe: str, out: Path) -> Path:
    from mixq.quant.convert import convert

    folder = out / "models" / f"{model}-{recipe}"
    if not (folder / "config.json").exists():
        convert(model, folder, recipe=recipe, progress=False)
    return folder


def _run(engine: str, folder: Path, workload: str, run_dir: Path, threads: int) -> dict:
    argv = [sys.executable, __file__, "worker", engine, str(folder), *WORKLOADS[workload], *ENGINES[engine],
            "--device", "cpu", "--threads", str(threads), "-o", str(run_dir), "--force"]
    p = subprocess.run(argv, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{p.stderr[-2000:]}")
    results = json.loads((run_dir / "results.json").read_text())
    samples = (run_dir / "samples.jsonl").read_text() if (run_dir / "samples.jsonl").exists() else ""
    docs = [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in samples.splitlines()]
    return {"rss": results["peak_memory_bytes"]["rss"], "seconds": results["seconds"],
            "weights": results.get("weights_bytes", 0), "docs": docs, "ppl": results.get("ppl", {}).get("ppl")}


def _spread(xs: list[float], fmt: str) -> str:
    return f"{fmt.format(statistics.median(xs))} ({fmt.format(min(xs))}-{fmt.format(max(xs))})"


def bench_eval(args) -> None:
    out = Path(args.out)
    engines = args.engines.split(",")
    folders = {r: _convert(args.model, r, out) for r in args.recipes.split(",")}
    runs: dict[tuple, list[dict]] = {}
    for i in range(args.repeats):
        for recipe, folder in folders.items():
            for workload in WORKLOADS:
                for engine in engines:
                    r = _run(engine, folder, workload, out / "runs" / f"{recipe}-{workload}-{engine}", args.threads)
                    runs.setdefault((recipe, workload, engine), []).append(r)
                    print(f"  run {i + 1}: {recipe:8s} {workload:8s} {engine:8s} {r['rss'] / 1e6:7.0f} MB "
                          f"{r['seconds']:6.1f} s", file=sys.stderr, flush=True)
    print(f"\n{args.model}, --device cpu --threads {args.threads}, {args.repeats} runs each: median (min-max)")
    print(f"{'recipe':8s} {'workload':8s} {'engine':8s} {'peak RSS MB':>22s} {'x dense':>7s} {'weights MB':>10s} "
          f"{'wall s':>20s} {'x dense':>7s}  same docs")
    for (recipe, workload, engine), rs in runs.items():
        ref = runs.get((recipe, workload, "dense"), rs)
        rss, secs = [r["rss"] / 1e6 for r in rs], [r["seconds"] for r in rs]
        rss0, secs0 = statistics.median(r["rss"] / 1e6 for r in ref), statistics.median(r["seconds"] for r in ref)
        same = all(r["docs"] == ref[0]["docs"] and r["ppl"] == ref[0]["ppl"] for r in rs)
        print(f"{recipe:8s} {workload:8s} {engine:8s} {_spread(rss, '{:.0f}'):>22s} "
              f"{statistics.median(rss) / rss0:7.2f} {rs[0]['weights'] / 1e6:10.1f} {_spread(secs, '{:.1f}'):>20s} "
              f"{statistics.median(secs) / secs0:7.2f}  {'yes' if same else 'NO'}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        sys.exit(worker(sys.argv[2:]))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="bench", required=True)
    e = sub.add_parser("eval", help="eval peak memory and wall time: dense engine vs packed weights")
    e.add_argument("--model", default="smollm2-135m")
    e.add_argument("--recipes", default="q6-hi,qx86-hi")
    e.add_argument("--engines", default=",".join(ENGINES))
    e.add_argument("--repeats", type=int, default=3)
    e.add_argument("--threads", type=int, default=1, help="torch threads per eval (default 1: a shared machine)")
    e.add_argument("--out", default="/tmp/mixq-scale")
    args = ap.parse_args()
    bench_eval(args)


if __name__ == "__main__":
    main()

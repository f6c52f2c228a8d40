"""Benchmark `mixq sweep`: the same sweep run sequentially, with the local executor and on a local Ray instance.

    .venv/bin/python benchmarks/sweep.py [--model M] [--variants V1,V2,..] [--tasks T] [--limit N] [--windows N]
        [--workers 2] [--executors serial,local,ray] [-o DIR]

The sweep is the demo's (the built-in `demo` sweep: smollm2-135m; bf16, q8-hi, q6-hi, qx86-hi, qx64-hi against
q8-hi; the seven tasks, ppl and KLD; its limit and windows); each option replaces one of its settings.

First a one-variant warm-up sweep imports the model, fetches the task data and caches the KLD base
distributions, so no executor pays for them. Then each executor runs the whole sweep into a fresh folder:
- serial: one job after another in this process (heavy jobs on all cores);
- local: worker processes (`--workers`, default 2), jobs as the cores and memory estimates allow;
- ray: `ray.init(num_cpus=WORKERS)` (timed apart), the jobs as Ray tasks.
Printed per executor: wall time, the seconds spent inside jobs, peak memory (RSS summed over this process and
all its descendants: workers, and Ray's raylet/GCS/workers; sampled every 0.1 s), idle worker-seconds per job,
the extra seconds inside jobs per job against the serial run, and for Ray the round trip of an empty task.
Also compared, pair by pair: results.json and samples.jsonl (timing fields aside), identical or how far apart.

Measured 2026-12-02 on the shared 2-core machine, heavily loaded by other work (load average 14-19 throughout,
so times are rough: the serial pass, run first, met the worst of it, and a `mixq demo` check ran beside its
last 4 minutes; its 4.5x against local is the load, not the executor). The demo's sweep with `--limit 3
--windows 2` (seven tasks x 3 documents, ppl+KLD on 2 windows; 14 jobs): warm-up 277.5 s;
serial 1523.2 s wall (peak 1530 MB); local 335.0 s (2999 MB, idle 8.0 s per job); Ray 234.2 s + 9.5 s
ray.init (3824 MB, idle 3.9 s per job, an empty task's round trip 1.9 ms). Local and Ray: identical
results.json and samples.jsonl. Serial (evals on 2 threads, the workers' on 1): the same results.json; 5 of
105 sample lines differ in the 6th digit of a log-likelihood (4.5e-06; eval.threads makes runs bit-identical).
The demo's full evaluation (7 tasks x 100 documents, 16 windows) was not run: at this load one evaluation
with limit 25 alone took 19 minutes.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mixq.sweep.command import run_sweep  # noqa: E402
from mixq.sweep.graph import build_graph, job_dir  # noqa: E402
from mixq.sweep.spec import load_sweep  # noqa: E402

TIMING = {"seconds", "created", "n_scored_now", "peak_memory_bytes"}   # differ between any two runs


class PeakMemory:
    """Peak of the summed RSS of this process and its descendants, sampled in a thread."""

    def __init__(self, every: float = 0.1):
        self.every, self.peak, self._stop = every, 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        me = psutil.Process()
        total = 0
        for p in [me, *me.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            time.sleep(self.every)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join()


def sweep_text(args, variants: list[str], ref: str) -> str:
    """The demo's sweep file with the benchmark's settings."""
    demo = load_sweep("demo")
    return (f'models = ["{args.model or demo.models[0]}"]\nvariants = {json.dumps(variants)}\nref = "{ref}"\n'
            f'dtype = "{demo.dtype}"\n[eval]\ntasks = "{args.tasks or ",".join(demo.tasks)}"\n'
            f'limit = {args.limit or demo.eval["limit"]}\nwindows = {args.windows or demo.eval["windows"]}\n'
            f'dtype = "{demo.eval["dtype"]}"\n')


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in TIMING}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def outputs(sweep) -> dict:
    """label -> (results.json without timing fields, its output folder written OUT; samples.jsonl lines sorted)."""
    graph = build_graph(sweep)
    out = {}
    for job in graph.by_kind("eval"):
        run = job_dir(graph.root, job) / "run"
        res = _strip(json.loads((run / "results.json").read_text().replace(str(sweep.out), "OUT")))
        out[job.label] = (res, sorted((run / "samples.jsonl").read_text().splitlines()))
    return out


def difference(a: dict, b: dict) -> str:
    """'identical', or how many results/sample lines differ and the largest log-likelihood difference."""
    if a == b:
        return "results.json and samples.jsonl identical (timing fields aside)"
    results = sum(a[k][0] != b[k][0] for k in a)
    lines = [(x, y) for k in a for x, y in zip(a[k][1], b[k][1]) if x != y]
    lls = [abs(u - v) for x, y in lines for u, v in zip(json.loads(x).get("lls", []), json.loads(y).get("lls", []))]
    return (f"{results} of {len(a)} results.json differ; {len(lines)} of {sum(len(v[1]) for v in a.values())} sample "
            f"lines differ (largest log-likelihood difference {max(lls, default=0):.2e})")


def ray_task_latency(n: int = 20) -> float:
    """Seconds for one no-op Ray task, submit to result, on warm workers (mean of n, one at a time)."""
    import ray

    noop = ray.remote(num_cpus=1)(lambda: None)
    ray.get(noop.remote())
    t0 = time.time()
    for _ in range(n):
        ray.get(noop.remote())
    return (time.time() - t0) / n


def run_one(args, executor: str, sweep_file: Path, out: Path) -> dict:
    sweep = load_sweep(sweep_file, out=out)
    init = 0.0
    with PeakMemory() as mem:
        t0 = time.time()
        if executor == "ray":
            import ray
            ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
            init = time.time() - t0
        t1 = time.time()
        result = run_sweep(sweep, executor, workers=args.workers, progress=False)
        wall = time.time() - t1
    latency = float("nan")
    if executor == "ray":
        latency = ray_task_latency()
        ray.shutdown()
    slots = 1 if executor == "serial" else args.workers
    in_jobs = sum(result.seconds.values())
    return {"executor": executor, "wall": wall, "init": init, "jobs": len(result.ran), "in_jobs": in_jobs,
            "per_job": dict(result.seconds), "peak_rss": mem.peak, "idle": (wall * slots - in_jobs) / len(result.ran),
            "latency": latency, "sweep": sweep}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="default: the demo's")
    ap.add_argument("--variants", help="default: the demo's (its reference first); the first is the reference")
    ap.add_argument("--tasks", help="default: the demo's (all,ppl,kld)")
    ap.add_argument("--limit", type=int, help="documents per task (default: the demo's)")
    ap.add_argument("--windows", type=int, help="ppl/KLD windows (default: the demo's)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--executors", default="serial,local,ray")
    ap.add_argument("-o", "--out", default=None, help="work folder (default: a new temporary one)")
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="mixq-bench-sweep-"))
    out.mkdir(parents=True, exist_ok=True)
    demo = load_sweep("demo")
    variants = args.variants.split(",") if args.variants else \
        [demo.ref] + [v.label for v in demo.variants if v.label != demo.ref]
    (out / "warm.toml").write_text(sweep_text(args, variants[:1], variants[0]))
    (out / "sweep.toml").write_text(sweep_text(args, variants, variants[0]))
    t0 = time.time()
    run_sweep(load_sweep(out / "warm.toml", out=out / "warm"), "serial", progress=False)
    print(f"warm-up (import, task data, KLD base cache, one variant): {time.time() - t0:.1f} s")
    sweep = load_sweep(out / "sweep.toml")
    print(f"sweep: {', '.join(sweep.models)} x {len(variants)} variants ({', '.join(variants)}), tasks "
          f"{','.join(sweep.tasks)}, limit {sweep.eval['limit']}, windows {sweep.eval['windows']}; "
          f"{os.cpu_count()} cores, {args.workers} workers")
    rows = [run_one(args, ex, out / "sweep.toml", out / ex) for ex in args.executors.split(",")]
    serial = next((r for r in rows if r["executor"] == "serial"), None)
    print(f"{'executor':8} {'wall s':>7} {'init s':>7} {'jobs':>5} {'in-job s':>9} {'peak MB':>8} "
          f"{'idle/job s':>10} {'extra/job s':>11} {'no-op task ms':>13}")
    for r in rows:
        extra = (r["in_jobs"] - serial["in_jobs"]) / r["jobs"] if serial and r["jobs"] else float("nan")
        print(f"{r['executor']:8} {r['wall']:7.1f} {r['init']:7.1f} {r['jobs']:5d} {r['in_jobs']:9.1f} "
              f"{r['peak_rss'] / 2**20:8.0f} {r['idle']:10.2f} {extra:11.2f} {r['latency'] * 1000:13.1f}")
    print("idle/job: (wall x worker slots - seconds inside jobs) / jobs (dependency stalls, worker start, "
          "scheduling); extra/job: seconds inside jobs beyond the serial run's, per job (cold imports in "
          "fresh workers, two jobs sharing two cores); no-op task: one empty Ray task round trip")
    outs = [outputs(r["sweep"]) for r in rows]
    for i, j in itertools.combinations(range(len(rows)), 2):
        print(f"{rows[j]['executor']} vs {rows[i]['executor']}: {difference(outs[j], outs[i])}")
    for r in rows:
        kinds = {}
        graph = build_graph(r["sweep"])
        for i, s in r["per_job"].items():
            kinds.setdefault(graph.jobs[i].kind, []).append(s)
        print(f"{r['executor']:8} seconds in jobs by kind: "
              + ", ".join(f"{k} {sum(v):.1f} ({len(v)})" for k, v in kinds.items()))


if __name__ == "__main__":
    main()

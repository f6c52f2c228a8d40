"""What each job does: it calls mixq's own functions (resolve, measure, allocate, convert, evaluate, compare,
write_card) and writes into its folder. `run_job` is what every executor calls, in whatever process.

Outputs: import -> done.json result {path, weights_bytes}; measure -> measurement.json; plan -> recipe.toml;
convert -> model/ (the MLX folder); eval -> run/ (results.json, samples.jsonl); compare -> runs/ (links to the
eval runs, named by variant), comparison.md/.json/PNGs; cards -> README.md in each converted folder;
report -> report.md, frontier.json, kld_vs_bpw.png.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from mixq.errors import MixqError
from mixq.eval.evaluate import evaluate, merge_shards
from mixq.io.files import write_atomic
from mixq.quant.convert import convert
from mixq.report.card import write_card
from mixq.report.compare import compare
from mixq.report.render import write_report
from mixq.sources.resolve import resolve
from mixq.sweep.graph import JOB_FILE, Job, is_done, job_dir, mark_done, read_done
from mixq.sweep.report import write_sweep_report
from mixq.threads import torch_threads
from mixq.tune.allocate import allocate
from mixq.tune.measure import load_measurement, measure

RECIPE_FILE = "recipe.toml"


def _source(root: Path, job: Job) -> Path:
    return Path(read_done(root, job)["result"]["path"])


def _import(root, job, inputs, folder) -> dict:
    src = resolve(job.settings["ref"], progress=False)
    weights = sum(f.stat().st_size for f in src.path.glob("*.safetensors"))
    return {"path": str(src.path), "kind": src.kind, "weights_bytes": weights}


def _measure(root, job, inputs, folder) -> dict:
    s = dict(job.settings)
    for key in ("levels", "group_sizes", "modes"):
        if key in s:
            s[key] = tuple(s[key])
    doc = measure(str(_source(root, inputs["source"])), out=folder / "measurement.json", progress=False, **s)
    return {"tensors": len(doc.get("tensors", {}))}


def _plan(root, job, inputs, folder) -> dict:
    path = job_dir(root, inputs["measurement"]) / "measurement.json"
    alloc = allocate(str(_source(root, inputs["source"])), load_measurement(path),
                     target_bpw=job.settings["target_bpw"], dtype=job.settings["dtype"], measurement_path=str(path))
    write_atomic(folder / RECIPE_FILE, alloc.text)
    return {"bits_per_weight": alloc.bits_per_weight, "total_bytes": alloc.total_bytes}


def _convert(root, job, inputs, folder) -> dict:
    s = job.settings
    if "recipe" in inputs:                       # a planned recipe
        recipe = str(job_dir(root, inputs["recipe"]) / RECIPE_FILE)
    elif "recipe_text" in s:                     # a recipe file's text, kept with the job
        recipe = str(write_atomic(folder / RECIPE_FILE, s["recipe_text"]))
    else:
        recipe = s["recipe"]
    out = convert(str(_source(root, inputs["source"])), folder / "model", recipe=recipe, dtype=s["dtype"],
                  progress=False)
    return {"path": str(out)}


def _eval(root, job, inputs, folder, cpus: int) -> dict:
    """Evaluate the converted model; with shard inputs, merge their documents and finish the run (ppl/kld)."""
    s = {k: v for k, v in job.settings.items() if k not in ("shards", "threads")}
    run_dir = folder / "run"
    base = str(_source(root, inputs["base"])) if "base" in inputs else None
    model = str(job_dir(root, inputs["model"]) / "model")
    shards = [job_dir(root, dep) / "run" for role, dep in inputs.items() if role.startswith("shard:")]
    if shards and not run_dir.exists():
        res = merge_shards(shards, model, s.pop("tasks"), run_dir, base=base, progress=False, threads=cpus, **s)
    else:   # also a merge that was interrupted: its run folder resumes like any other
        res = evaluate(model, s.pop("tasks"), run_dir, base=base, resume=run_dir.exists(), progress=False,
                       threads=cpus, **s)
    return {"bits_per_weight": res.get("bits_per_weight"), "kld_mean": (res.get("kld") or {}).get("kld_mean")}


def _shard(root, job, inputs, folder, cpus: int) -> dict:
    """Score one part (K/N) of the tasks' documents: the scorer's batches K, K+N, ..."""
    s = {k: v for k, v in job.settings.items() if k != "threads"}
    run_dir = folder / "run"
    evaluate(str(job_dir(root, inputs["model"]) / "model"), s.pop("tasks"), run_dir, progress=False, threads=cpus,
             **s)
    return {"shard": s["shard"]}


def link_runs(root: Path, inputs: dict[str, Job], folder: Path) -> dict[str, Path]:
    """folder/runs/VARIANT -> the eval job's run folder (relative links, so the output folder can move)."""
    links = {}
    (folder / "runs").mkdir(parents=True, exist_ok=True)
    for role, dep in inputs.items():
        if role.startswith("run:"):
            link = folder / "runs" / role[4:]
            if not link.is_symlink():
                os.symlink(Path("..") / ".." / dep.name / "run", link)
            links[role[4:]] = link
    return links


def _compare(root, job, inputs, folder) -> dict:
    runs = link_runs(root, inputs, folder)
    comp = compare(list(runs.values()), ref=str(runs[job.settings["ref"]]))
    write_report(comp, folder)
    return {"variants": len(comp.variants)}


def _cards(root, job, inputs, folder) -> dict:
    runs = link_runs(root, inputs, folder)
    ref = job.settings["ref"]
    cards = {}
    for role, dep in inputs.items():
        if role.startswith("model:"):
            variant = role[6:]
            own = [runs[variant]] if variant == ref else [runs[variant], runs[ref]]
            # the sweep converted these folders, so their README.md is mixq's to replace
            cards[variant] = str(write_card(job_dir(root, dep) / "model", runs=own, ref=str(runs[ref]), force=True))
    write_atomic(folder / "cards.json", json.dumps(cards, indent=2) + "\n")
    return {"cards": len(cards)}


def _report(root, job, inputs, folder) -> dict:
    compares = {role[len("compare:"):]: job_dir(root, dep) for role, dep in inputs.items()}
    write_sweep_report(compares, job.settings["ref"], folder)
    return {"models": len(compares)}


BODIES = {"import": _import, "measure": _measure, "plan": _plan, "convert": _convert, "compare": _compare,
          "cards": _cards, "report": _report}


def run_job(root, job: Job, inputs: dict[str, Job], cpus: int = 1) -> dict:
    """Run one job into its folder and write its completion marker; a finished job is not run again.

    A folder left by an unfinished attempt is cleared first (an eval run folder is kept: eval resumes it; a shard
    run starts over).
    Returns {"id", "ran", "seconds", "pid", "start", "end"} (start/end: wall-clock time.time())."""
    root = Path(root)
    folder = job_dir(root, job)
    if is_done(root, job):
        return {"id": job.id, "ran": False, "seconds": 0.0, "pid": os.getpid(), "start": None, "end": None}
    missing = [dep.name for dep in inputs.values() if not is_done(root, dep)]
    if missing:
        raise MixqError(f"sweep job {job.name} ({job.label}): inputs not finished: {', '.join(missing)}")
    if folder.exists() and job.kind != "eval":
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / JOB_FILE, json.dumps(job.describe(), indent=2, default=str) + "\n")
    t0 = time.time()
    with torch_threads(cpus):
        if job.kind in ("eval", "shard"):
            result = (_eval if job.kind == "eval" else _shard)(root, job, inputs, folder, cpus)
        else:
            result = BODIES[job.kind](root, job, inputs, folder)
    seconds = time.time() - t0
    mark_done(root, job, seconds, result)
    return {"id": job.id, "ran": True, "seconds": seconds, "pid": os.getpid(), "start": t0, "end": t0 + seconds}

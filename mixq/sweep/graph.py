"""A sweep as a graph of jobs: import -> (measure -> plan) -> convert -> eval -> compare -> cards -> report.

Each job's output lives in `OUT/jobs/KIND-HASH/`, HASH being the sha256 of the job's kind, settings, input
jobs' hashes and mixq's version; the job is done when that folder holds `done.json` (written last). So a
re-run skips finished jobs, and a changed setting changes the hash of exactly the jobs that depend on it.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from mixq.io.files import write_atomic
from mixq.sweep.spec import Sweep, Variant, slug
from mixq.version import __version__

DONE_FILE = "done.json"
JOB_FILE = "job.json"
KINDS = ("import", "measure", "plan", "convert", "shard", "eval", "compare", "cards", "report")
HEAVY = ("measure", "convert", "shard", "eval")  # the jobs that want cores and memory
# Memory a job needs, as a multiple of the source's weights on disk (estimates for scheduling only).
MEMORY_FACTOR = {"import": 2.0, "measure": 4.0, "plan": 1.0, "convert": 1.5, "shard": 2.0, "eval": 2.0}
LIGHT_MEMORY = 512 * 2**20
DEFAULT_SOURCE_BYTES = 2**30                     # when a source's size is not known before its import


@dataclass(eq=False)
class Job:
    kind: str
    label: str                                   # for people: "llama/q8-hi"
    settings: dict                               # what decides the output besides the inputs (JSON)
    inputs: dict[str, str] = field(default_factory=dict)   # role -> input job id
    id: str = ""                                 # sha256 of the above and mixq's version
    model: str = ""                              # the model ref the job belongs to ("" for the report)

    def __post_init__(self):
        self.id = self.id or job_hash(self.kind, self.settings, self.inputs)

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.id[:16]}"

    def describe(self) -> dict:
        return {"kind": self.kind, "label": self.label, "settings": self.settings, "inputs": self.inputs,
                "id": self.id, "model": self.model, "mixq_version": __version__}


def job_hash(kind: str, settings: dict, inputs: dict[str, str]) -> str:
    text = json.dumps({"kind": kind, "settings": settings, "inputs": inputs, "mixq": __version__},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def job_dir(root: Path, job: Job) -> Path:
    return Path(root) / "jobs" / job.name


def is_done(root: Path, job: Job) -> bool:
    return (job_dir(root, job) / DONE_FILE).is_file()


def mark_done(root: Path, job: Job, seconds: float, result: dict) -> None:
    """The completion marker, written last: the job's folder is whole once this file exists."""
    write_atomic(job_dir(root, job) / DONE_FILE, json.dumps(
        {"id": job.id, "seconds": round(seconds, 3), "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
         "result": result}, indent=2) + "\n")


def read_done(root: Path, job: Job) -> dict:
    return json.loads((job_dir(root, job) / DONE_FILE).read_text())


@dataclass
class Graph:
    sweep: Sweep
    jobs: dict[str, Job]                         # id -> job, in dependency order

    @property
    def root(self) -> Path:
        return self.sweep.out

    def deps(self, job: Job) -> list[Job]:
        return [self.jobs[i] for i in dict.fromkeys(job.inputs.values())]

    def pending(self) -> list[Job]:
        return [j for j in self.jobs.values() if not is_done(self.root, j)]

    def by_kind(self, kind: str, model: str | None = None) -> list[Job]:
        return [j for j in self.jobs.values() if j.kind == kind and (model is None or j.model == model)]


def _local_fingerprint(ref: str) -> dict | None:
    """Name, size and mtime of a local model folder's (or file's) files: a changed source changes the hash."""
    p = Path(ref)
    if not p.exists():
        return None
    files = [p] if p.is_file() else sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith("."))
    return {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in files}


class _Builder:
    def __init__(self, sweep: Sweep):
        self.sweep = sweep
        self.jobs: dict[str, Job] = {}

    def add(self, kind: str, label: str, settings: dict, inputs: dict[str, str] | None = None, model="") -> str:
        job = Job(kind, label, settings, dict(inputs or {}), model=model)
        self.jobs.setdefault(job.id, job)
        return job.id

    def model_jobs(self, model: str) -> tuple[dict, dict]:
        """The jobs of one model: {variant slug: convert id}, {variant slug: eval id}."""
        sw, m = self.sweep, slug(model)
        source = self.add("import", m, {"ref": model, "local": _local_fingerprint(model)}, model=model)
        measured = None
        if any(v.target_bpw is not None for v in sw.variants):
            measured = self.add("measure", f"{m}/measure", dict(sw.measure), {"source": source}, model)
        converts, evals = {}, {}
        for v in sw.variants:
            converts[v.slug] = self._convert(model, v, source, measured)
            inputs = {"model": converts[v.slug], **({"base": source} if sw.wants_base else {}),
                      **self._shards(model, v, converts[v.slug])}
            evals[v.slug] = self.add("eval", f"{m}/{v.label}", dict(sw.eval), inputs, model)
        return converts, evals

    def _shards(self, model: str, v: Variant, convert: str) -> dict[str, str]:
        """With eval.shards = N > 1: N jobs each scoring every N-th document of the tasks (the eval job merges)."""
        n = self.sweep.eval.get("shards", 1)
        tasks = [t for t in self.sweep.tasks if t not in ("ppl", "kld")]
        if n < 2 or not tasks:
            return {}
        settings = {key: val for key, val in self.sweep.eval.items() if key != "shards"}
        return {f"shard:{k}": self.add("shard", f"{slug(model)}/{v.label} {k}/{n}",
                                       {**settings, "tasks": tasks, "shard": f"{k}/{n}"}, {"model": convert}, model)
                for k in range(n)}

    def _convert(self, model: str, v: Variant, source: str, measured: str | None) -> str:
        m, dtype = slug(model), self.sweep.dtype
        if v.target_bpw is None:
            return self.add("convert", f"{m}/{v.label}", {**v.settings(), "dtype": dtype}, {"source": source}, model)
        plan = self.add("plan", f"{m}/{v.label}", {"target_bpw": v.target_bpw, "dtype": dtype},
                        {"source": source, "measurement": measured}, model)
        return self.add("convert", f"{m}/{v.label}", {"dtype": dtype}, {"source": source, "recipe": plan}, model)

    def build(self) -> Graph:
        sw = self.sweep
        ref = sw.ref_variant.slug
        compares = {}
        for model in sw.models:
            converts, evals = self.model_jobs(model)
            m = slug(model)
            runs = {f"run:{s}": i for s, i in evals.items()}
            compares[m] = self.add("compare", f"{m}/compare", {"ref": ref}, runs, model)
            self.add("cards", f"{m}/cards", {"ref": ref},
                     {**runs, **{f"model:{s}": i for s, i in converts.items()}}, model)
        self.add("report", "sweep/report", {"ref": ref, "models": [slug(m) for m in sw.models]},
                 {f"compare:{m}": i for m, i in compares.items()})
        return Graph(sw, self.jobs)


def build_graph(sweep: Sweep) -> Graph:
    """Expand a sweep into its jobs (dependency order: every job after its inputs)."""
    return _Builder(sweep).build()


# ------------------------------------------------------------------ estimates (scheduling and --dry-run)

def source_bytes(graph: Graph, job: Job) -> int | None:
    """Bytes of the model's weights on disk, once known (a local folder, or its finished import job)."""
    imp = next((j for j in graph.by_kind("import", job.model)), None)
    if imp is None:
        return None
    if is_done(graph.root, imp):
        return read_done(graph.root, imp)["result"].get("weights_bytes")
    p = Path(job.model)
    return sum(f.stat().st_size for f in p.glob("*.safetensors")) if p.is_dir() else None


def memory_estimate(graph: Graph, job: Job) -> int:
    """Bytes of memory to reserve for a job (an estimate from the source's size, not a measurement)."""
    if job.kind not in MEMORY_FACTOR:
        return LIGHT_MEMORY
    size = source_bytes(graph, job) or DEFAULT_SOURCE_BYTES
    factor = MEMORY_FACTOR[job.kind] + (1.0 if job.kind == "eval" and "base" in job.inputs else 0.0)
    return int(size * factor) + LIGHT_MEMORY


def work_words(graph: Graph, job: Job) -> str:
    """What a job will do, in countable units."""
    s = job.settings
    if job.kind in ("eval", "shard"):
        docs = s.get("limit") or s.get("sample")
        tasks = [t for t in s["tasks"] if t not in ("ppl", "kld")]
        text = [t for t in s["tasks"] if t in ("ppl", "kld")]
        parts = [f"{len(tasks)} tasks x {docs or 'all'} docs"] if tasks else []
        if text:
            parts.append(f"{'+'.join(text)} on {s.get('windows') or 'all'} windows of {s.get('ctx', 512)} tokens")
        return "; ".join(parts)
    if job.kind == "convert":
        return s.get("recipe") or ("recipe file" if "recipe_text" in s else "planned recipe")
    if job.kind == "plan":
        return f"allocate {s['target_bpw']} bpw"
    if job.kind == "measure":
        return f"{s.get('method', 'fisher')} sensitivity"
    return ""


def dry_run_text(graph: Graph) -> str:
    """The graph, one line per job (status, kind, label, inputs, estimates), and the totals."""
    lines = [f"sweep {graph.sweep.path} -> {graph.root}", ""]
    names = {i: j.name for i, j in graph.jobs.items()}
    todo = 0
    for job in graph.jobs.values():
        done = is_done(graph.root, job)
        todo += not done
        deps = [names[i] for i in dict.fromkeys(job.inputs.values())]
        deps = ", ".join(deps) if len(deps) <= 2 else f"{len(deps)} jobs"
        mem = memory_estimate(graph, job) / 2**30
        lines.append(f"  {'done' if done else 'todo':4}  {job.name:25} {job.label:28} ~{mem:5.1f} GiB  "
                     f"{work_words(graph, job):30}  <- {deps or '-'}")
    counts = {k: len(graph.by_kind(k)) for k in KINDS if graph.by_kind(k)}
    lines += ["", f"{len(graph.jobs)} jobs ({', '.join(f'{n} {k}' for k, n in counts.items())}); "
                  f"{todo} to run, {len(graph.jobs) - todo} done. Memory figures are estimates for scheduling."]
    return "\n".join(lines)

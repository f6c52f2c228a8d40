"""`mixq sweep SWEEP.toml`: many models x variants, built, evaluated, compared and reported in one command,
in this process (`--serial`), in local worker processes (default) or on Ray (`--ray [ADDRESS]`)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from mixq.errors import MixqError
from mixq.io.files import output_lock, write_atomic
from mixq.sources import embedded
from mixq.sweep.graph import Graph, Job, build_graph, dry_run_text, is_done, job_dir
from mixq.sweep.local import run_local, run_serial
from mixq.sweep.progress import Progress, SweepResult
from mixq.sweep.ray_exec import run_ray
from mixq.sweep.spec import Sweep, builtin_sweeps, load_sweep, slug

EXECUTORS = ("serial", "local", "ray")
INDEX_FILE = "sweep.json"
MODELS_DIR = "models"


def named_links(graph: Graph) -> dict[Path, tuple[Job, Path]]:
    """The names people read under OUT -> (job, the folder it stands for): `report` (the report job's folder)
    and `models/MODEL-VARIANT` (each converted folder)."""
    root = graph.root
    report = next(j for j in graph.jobs.values() if j.kind == "report")
    links = {root / "report": (report, job_dir(root, report))}
    for model in graph.sweep.models:
        converts = {j.label: j for j in graph.by_kind("convert", model)}
        for v in graph.sweep.variants:
            job = converts[f"{slug(model)}/{v.label}"]
            links[root / MODELS_DIR / f"{slug(model)}-{v.slug}"] = (job, job_dir(root, job) / "model")
    return links


def check_links(graph: Graph) -> None:
    """Refuse before any work when a name the sweep links is taken by something it did not write."""
    for link in named_links(graph):
        if link.exists() and not link.is_symlink():
            raise MixqError(f"{link}: is in the way of the sweep's link to its job folder (an older layout, or "
                            f"not mixq's); move it away or give another output folder (-o)")


def _relink(link: Path, target: Path) -> None:
    """Point `link` at `target` (relative), replacing only a symlink."""
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.with_name(f".{link.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    os.symlink(os.path.relpath(target, link.parent), tmp)
    if link.exists() and not link.is_symlink():
        tmp.unlink()
    else:
        os.replace(tmp, link)


def write_index(graph: Graph) -> Path:
    """OUT/sweep.json (every job: kind, label, folder, done) and the named links to finished jobs' folders
    (`named_links`); a link to a job of an earlier sweep in OUT/models is removed (never a file or folder)."""
    root = graph.root
    jobs = [{**{k: v for k, v in j.describe().items() if k != "settings"}, "folder": str(job_dir(root, j)),
             "done": is_done(root, j)} for j in graph.jobs.values()]
    index = write_atomic(root / INDEX_FILE, json.dumps({"sweep": str(graph.sweep.path), "jobs": jobs}, indent=2))
    links = named_links(graph)
    for link, (job, target) in links.items():
        if is_done(root, job):
            _relink(link, target)
    models = root / MODELS_DIR
    for old in models.iterdir() if models.is_dir() else []:
        if old.is_symlink() and old not in links:
            old.unlink()
    return index


def check_models(sweep: Sweep) -> None:
    """Refuse before any work a model that is neither a file or folder here nor an embedded model."""
    for model in sweep.models:
        if not Path(model).expanduser().exists() and not embedded.is_embedded(model):
            raise MixqError(f"{sweep.path}: model {model!r}: no such file, folder or embedded model "
                            f"({', '.join(embedded.names())}); fix the path or the name")


def run_sweep(sweep: Sweep, executor: str = "local", *, address: str | None = None, workers: int | None = None,
              progress: bool = True) -> SweepResult:
    """Run every job of the sweep not finished yet; return what ran. One sweep at a time writes OUT."""
    if executor not in EXECUTORS:
        raise MixqError(f"executor {executor!r}: use one of {', '.join(EXECUTORS)}")
    check_models(sweep)
    graph = build_graph(sweep)
    graph.root.mkdir(parents=True, exist_ok=True)
    with output_lock(graph.root):
        check_links(graph)
        bar = Progress(len(graph.pending()), enabled=progress)
        try:
            if executor == "serial":
                result = run_serial(graph, bar)
            elif executor == "ray":
                result = run_ray(graph, bar, address)
            else:
                result = run_local(graph, bar, workers)
        finally:
            bar.close()
            write_index(graph)
    return result


def add_executor_arguments(p) -> None:
    """--ray / --serial / --workers (mixq sweep and mixq demo)."""
    how = p.add_mutually_exclusive_group()
    how.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                     help="run the jobs as Ray tasks (a cluster's ADDRESS or `auto`; none: a local instance)")
    how.add_argument("--serial", action="store_true", help="run the jobs one after another in this process")
    p.add_argument("--workers", type=int, help="local worker processes at most (default: the cores)")


def executor_of(args) -> str:
    """The executor the arguments of `add_executor_arguments` ask for (checked)."""
    if args.workers is not None and args.workers < 1:
        raise MixqError(f"--workers {args.workers}: must be 1 or more")
    return "ray" if args.ray is not None else "serial" if args.serial else "local"


def run_from_args(sweep: Sweep, args) -> SweepResult:
    """Run the sweep with the executor the arguments of `add_executor_arguments` ask for; print what ran."""
    executor = executor_of(args)
    t0 = time.time()
    result = run_sweep(sweep, executor, address=args.ray or None, workers=args.workers)
    print(f"[sweep] {len(result.ran)} jobs run ({executor}) in {time.time() - t0:.0f} s; "
          f"report: {sweep.out / 'report' / 'report.md'}")
    return result


def add_arguments(p) -> None:
    p.add_argument("sweep", metavar="SWEEP",
                   help=f"a sweep TOML file, or a built-in one: {', '.join(builtin_sweeps())}")
    p.add_argument("-o", "--out", help="output folder (default: the file's `out`)")
    p.add_argument("--dry-run", action="store_true", help="print the jobs, what is done and the estimated work")
    add_executor_arguments(p)


def cli(args) -> int:
    executor_of(args)   # options checked before the file is read
    sweep = load_sweep(args.sweep, out=args.out)
    if args.dry_run:
        print(dry_run_text(build_graph(sweep)))
        return 0
    run_from_args(sweep, args)
    return 0

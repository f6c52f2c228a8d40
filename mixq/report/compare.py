"""`mixq compare`: eval runs side by side, with paired significance tests and honest summaries.

This module is the model: it reads run folders written by `mixq eval` (through `mixq.eval.runs`),
pairs their documents and builds a `Comparison` (its shape: `comparison.py`). The sentences are
`words.py`'s, the tables and files `render.py`'s.

Task differences against the reference run are paired by (task, doc_id): McNemar's exact test
and Newcombe's paired score interval (see stats.py); the task-averaged accuracy gets a paired
bootstrap stratified by task. Runs scored on different documents are refused unless `--unpaired`,
and so are runs that record different versions of a task.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from mixq.errors import MixqError
from mixq.eval.metrics import proportion_stderr
from mixq.eval.runs import SAMPLES_FILE, read_results, read_samples, samples_by_task
from mixq.report import stats, words
from mixq.report.comparison import Cell, Comparison, TaskRow, Variant
from mixq.report.render import print_rich, write_report

METRICS = {"acc": "correct", "acc_norm": "correct_norm"}
MEMORY_OVERHEAD = 0.10   # estimated memory to load = size on disk x (1 + this), when the run has none


# --------------------------------------------------------------------------- reading runs

@dataclass
class Run:
    label: str
    path: Path
    results: dict
    samples: dict[str, dict[int, dict]] | None   # task -> doc_id -> record; None when no samples.jsonl


def _read_samples(path: Path) -> dict[str, dict[int, dict]] | None:
    if not (path / SAMPLES_FILE).exists():
        return None
    try:
        return samples_by_task(read_samples(path))
    except (KeyError, TypeError, ValueError) as e:
        raise MixqError(f"{path / SAMPLES_FILE}: bad sample record ({e!r}); re-run `mixq eval` for this run") from None


def load_run(path) -> Run:
    """Read one run folder (label filled in later by `load_runs`)."""
    path = Path(path)
    if not path.is_dir():
        raise MixqError(f"{path}: not a run folder; pass folders written by `mixq eval -o RUN_DIR`")
    return Run("", path, read_results(path), _read_samples(path))


def _run_name(r: Run) -> str:
    rec = (r.results.get("provenance") or {}).get("recipe")
    return r.results.get("recipe") or (rec.get("name") if isinstance(rec, dict) else None) or r.path.name


def load_runs(paths) -> list[Run]:
    """Read run folders and give each a unique label: its recipe, else its folder name."""
    runs = [load_run(p) for p in paths]
    if not runs:
        raise MixqError("no run folders given; pass at least one folder written by `mixq eval -o RUN_DIR`")
    names = [_run_name(r) for r in runs]
    if len(set(names)) < len(names):
        names = [r.path.name for r in runs]
    if len(set(names)) < len(names):
        names = [str(r.path) for r in runs]
    for r, n in zip(runs, names):
        r.label = str(n)
    return runs


def _pick_ref(runs: list[Run], ref) -> int:
    if ref is None:   # default: the run with the most bits per weight (usually the unquantized base)
        return max(range(len(runs)), key=lambda i: (runs[i].results.get("bits_per_weight") or 0, -i))
    if isinstance(ref, int) or (isinstance(ref, str) and ref.isdigit()):
        i = int(ref)
        if not 0 <= i < len(runs):
            raise MixqError(f"--ref {ref}: index out of range; give 0..{len(runs) - 1} or a run name")
        return i
    ref = str(ref)
    for i, r in enumerate(runs):
        if ref in (r.label, r.path.name, str(r.path)):
            return i
    for i, r in enumerate(runs):
        if Path(ref).exists() and Path(ref).resolve() == r.path.resolve():
            return i
    raise MixqError(f"--ref {ref}: no such run; choose one of {', '.join(r.label for r in runs)} or an index")


def _task_names(run: Run) -> list[str]:
    if run.samples is not None:
        return list(run.samples)
    return list(run.results.get("tasks", {}))


def task_version(run: Run, task: str):
    """The version of `task` the run recorded (results' tasks[task].version, else task_versions); None if none."""
    v = ((run.results.get("tasks") or {}).get(task) or {}).get("version")
    return v if v is not None else (run.results.get("task_versions") or {}).get(task)


def _check_versions(runs: list[Run], ref_run: Run, tasks: list[str]) -> tuple[dict, list[str]]:
    """({task: version} of the versions recorded, labels of runs that record none for some task).

    Runs that record different versions of a task are not comparable: a one-line MixqError."""
    versions, unversioned = {}, []
    for task in tasks:
        having = [r for r in runs if task in _task_names(r)]
        known = [(r, task_version(r, task)) for r in having if task_version(r, task) is not None]
        unversioned += [r.label for r in having if task_version(r, task) is None]
        if not known:
            continue
        first, v0 = next(((r, v) for r, v in known if r is ref_run), known[0])
        for r, v in known:
            if v != v0:
                raise MixqError(f"task {task}: {r.path} ran version {v} but {first.path} ran version {v0}, so "
                                f"their scores are not comparable; re-run `mixq eval` for one of them so both "
                                f"use the same task version")
        versions[task] = v0
    return versions, list(dict.fromkeys(unversioned))


# --------------------------------------------------------------------------- the comparison

def _outcomes(run: Run, task: str, key: str) -> dict[int, int]:
    out = {}
    for doc_id, rec in run.samples[task].items():
        v = rec.get(key)
        if v is None:
            v = rec.get("correct")   # tasks without a normalised metric score acc_norm as acc
        if v is None:
            raise MixqError(f"{run.path}/{SAMPLES_FILE}: task {task} doc {doc_id} has no '{key}'; re-run `mixq eval`")
        out[doc_id] = int(bool(v))
    return out


def _cell_from_results(run: Run, task: str, metric: str) -> Cell | None:
    t = run.results.get("tasks", {}).get(task)
    if not t or t.get(metric) is None or not t.get("n"):
        return None
    n, acc = int(t["n"]), float(t[metric])
    lo, hi = stats.wilson_interval(round(acc * n), n)
    return Cell(acc, float(t.get(f"{metric}_stderr") or proportion_stderr(round(acc * n), n)), n, lo, hi)


def _cell(outcomes: dict[int, int]) -> Cell:
    n, k = len(outcomes), sum(outcomes.values())
    lo, hi = stats.wilson_interval(k, n)
    return Cell(k / n if n else 0.0, proportion_stderr(k, n), n, lo, hi)


def _check_pairing(ref: Run, run: Run, task: str, a: dict, b: dict) -> None:
    if set(a) != set(b):
        only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        raise MixqError(
            f"{run.path} and {ref.path}: task {task} was scored on different documents "
            f"({len(a)} vs {len(b)}; e.g. doc {(only_a or only_b)[0]} in only one); re-run `mixq eval` with the "
            f"same --limit/--sample, or pass --unpaired")
    sa = ref.results.get("tasks", {}).get(task, {})
    sb = run.results.get("tasks", {}).get(task, {})
    for key in ("split", "source"):
        if sa.get(key) and sb.get(key) and sa[key] != sb[key]:
            raise MixqError(f"{run.path} and {ref.path}: task {task} used different {key}s "
                            f"({sb[key]!r} vs {sa[key]!r}); re-run on the same data, or pass --unpaired")


def _require_samples(runs: list[Run]) -> None:
    for r in runs:
        if r.samples is None:
            raise MixqError(f"{r.path}/{SAMPLES_FILE}: missing; paired comparison needs per-document results "
                            f"(re-run `mixq eval`), or pass --unpaired")


def _task_cell(run: Run, task: str, metric: str, outcomes) -> Cell | None:
    if outcomes is not None:
        return _cell(outcomes[run.label][task]) if task in outcomes[run.label] else None
    if run.samples is not None and task in run.samples:
        return _cell(_outcomes(run, task, METRICS[metric]))
    return _cell_from_results(run, task, metric)


def _task_row(task: str, runs: list[Run], ref_run: Run, metric: str, outcomes) -> TaskRow:
    """Every run's score on `task` and each non-ref run's difference vs the ref (paired when `outcomes`)."""
    cells = {r.label: _task_cell(r, task, metric, outcomes) for r in runs}
    diffs = {}
    for r in runs:
        if r is ref_run:
            continue
        a, b = cells[r.label], cells[ref_run.label]
        if a is None or b is None:
            diffs[r.label] = None
        elif outcomes is not None:
            x, y = outcomes[r.label][task], outcomes[ref_run.label][task]
            _check_pairing(ref_run, r, task, x, y)
            ids = sorted(x)
            diffs[r.label] = stats.paired_proportion_diff([x[i] for i in ids], [y[i] for i in ids])
        else:
            diffs[r.label] = stats.unpaired_proportion_diff(round(a.acc * a.n), a.n, round(b.acc * b.n), b.n)
    return TaskRow(task, cells, diffs)


def _apply_holm(rows: list[TaskRow]) -> int:
    """Holm-adjust over the whole family of task comparisons; returns its size."""
    family = [(row, lab) for row in rows for lab, d in row.diffs.items() if d is not None]
    for (row, lab), p in zip(family, stats.holm([row.diffs[lab].p for row, lab in family])):
        row.p_holm[lab] = p
    return len(family)


def _variant(run: Run) -> Variant:
    r = run.results
    ppl = r.get("ppl") or {}
    kld = r.get("kld") or None
    size = r.get("size_bytes")
    return Variant(run.label, str(run.path), r.get("model"), r.get("recipe"), size,
                   r.get("bits_per_weight"), int(size * (1 + MEMORY_OVERHEAD)) if size else None, ppl.get("ppl"),
                   ppl.get("ppl_stderr"), kld if kld and kld.get("kld_mean") is not None else None)


def _same_text_base(a: dict, b_ppl: float | None) -> bool:
    return bool(a.get("ppl_base") and b_ppl and math.isclose(a["ppl_base"], b_ppl, rel_tol=1e-5))


def _ppl_vs_ref(v: Variant, ref: Variant) -> stats.DiffResult | None:
    """ln(ppl_v / ppl_ref) with a 95% interval, from the runs' KLD statistics against a common base.

    If the reference is the KLD base itself (no KLD of its own, its perplexity equals the run's
    `ppl_base`), the run's own paired ln(ppl_q/ppl_base) is used. If both runs were measured against
    the same base, the difference of their ratios is used with the two standard errors combined as
    if independent: conservative, since both quants err on the same tokens in the same direction.
    """
    k, kr = v.kld, ref.kld
    if not k or k.get("ln_ppl_ratio") is None or not k.get("ln_ppl_ratio_stderr"):
        return None
    n = int(k.get("n_tokens") or 0)
    z = stats.z_value()
    if not (kr and kr.get("kld_mean")) and _same_text_base(k, ref.ppl):
        d, se, method = float(k["ln_ppl_ratio"]), float(k["ln_ppl_ratio_stderr"]), "ln-ppl-ratio (paired tokens)"
    elif kr and kr.get("ln_ppl_ratio") is not None and kr.get("ln_ppl_ratio_stderr") and \
            k.get("base") == kr.get("base") and _same_text_base(k, kr.get("ppl_base")):
        d = float(k["ln_ppl_ratio"]) - float(kr["ln_ppl_ratio"])
        se = math.hypot(float(k["ln_ppl_ratio_stderr"]), float(kr["ln_ppl_ratio_stderr"]))
        method = "ln-ppl-ratio difference (SEs combined as independent: conservative)"
    else:
        return None
    p = math.erfc(abs(d) / se / math.sqrt(2))
    return stats.DiffResult(d, d - z * se, d + z * se, p, method, n, n)


def _variants(runs: list[Run], ref_run: Run) -> list[Variant]:
    variants = [_variant(r) for r in runs]
    refv = variants[runs.index(ref_run)]
    for v in variants:
        if v is not refv:
            v.ppl_vs_ref = _ppl_vs_ref(v, refv)
    return variants


def compare(run_dirs, ref=None, metric: str = "acc", *, unpaired: bool = False,
            n_boot: int = 2000, seed: int = 0) -> Comparison:
    """Compare eval runs: per-task scores, paired differences vs `ref` (label, folder, or index)."""
    if metric not in METRICS:
        raise MixqError(f"--metric {metric}: choose one of {', '.join(METRICS)}")
    runs = load_runs(run_dirs)
    ref_run = runs[_pick_ref(runs, ref)]
    if not unpaired:
        _require_samples(runs)
    tasks = list(dict.fromkeys(t for r in runs for t in _task_names(r)))
    versions, unversioned = _check_versions(runs, ref_run, tasks)
    outcomes = None if unpaired else \
        {r.label: {t: _outcomes(r, t, METRICS[metric]) for t in r.samples} for r in runs}
    rows = [_task_row(task, runs, ref_run, metric, outcomes) for task in tasks]
    n_comparisons = _apply_holm(rows)
    average = _average_row(runs, ref_run, rows, outcomes, n_boot=n_boot, seed=seed)
    comp = Comparison(_variants(runs, ref_run), ref_run.label, metric, not unpaired, rows, average, n_comparisons,
                      words.memory_note(MEMORY_OVERHEAD), [], [], task_versions=versions, unversioned=unversioned,
                      incomplete=[(r.label, str(r.path)) for r in runs if r.results.get("complete") is False])
    comp.notes = words.notes(comp)
    comp.summary = words.summarize(comp)
    return comp


def _average_cell(common: list[TaskRow], label: str) -> Cell:
    accs = [row.cells[label].acc for row in common]
    se = math.sqrt(sum(row.cells[label].se ** 2 for row in common)) / len(common)
    z = stats.z_value()
    mean = sum(accs) / len(accs)
    return Cell(mean, se, sum(row.cells[label].n for row in common), mean - z * se, mean + z * se)


def _average_diff(a: Cell, b: Cell) -> stats.DiffResult:
    """Unpaired difference of two task-averaged scores (normal approximation; unknown when an SE is)."""
    se = math.sqrt(a.se ** 2 + b.se ** 2)
    d, z = a.acc - b.acc, stats.z_value()
    p = 1.0 if se == 0 else math.erfc(abs(d) / se / math.sqrt(2))   # NaN when an SE is unknown
    return stats.DiffResult(d, d - z * se, d + z * se, p, "unpaired-normal", a.n, b.n)


def _average_row(runs, ref_run, rows, outcomes, *, n_boot, seed) -> TaskRow | None:
    """Mean accuracy over the tasks every run has; vs ref by a paired bootstrap stratified by task."""
    common = [row for row in rows if all(c is not None for c in row.cells.values())]
    if len(common) < 2:
        return None
    cells = {r.label: _average_cell(common, r.label) for r in runs}
    diffs = {}
    for r in runs:
        if r is ref_run:
            continue
        if outcomes is None:
            diffs[r.label] = _average_diff(cells[r.label], cells[ref_run.label])
            continue
        xs, ys, strata = [], [], []
        for row in common:
            x, y = outcomes[r.label][row.task], outcomes[ref_run.label][row.task]
            ids = sorted(x)
            xs += [x[i] for i in ids]
            ys += [y[i] for i in ids]
            strata += [row.task] * len(ids)
        diffs[r.label] = stats.paired_bootstrap(xs, ys, n_boot=n_boot, seed=seed, strata=strata)
    return TaskRow(f"mean ({len(common)} tasks)", cells, diffs)


# --------------------------------------------------------------------------- CLI

def add_arguments(p) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders written by `mixq eval -o`")
    p.add_argument("--ref", help="reference run: name, folder or 0-based index "
                                 "(default: the run with the most bits per weight)")
    p.add_argument("--metric", default="acc", choices=list(METRICS), help="task metric (default acc)")
    p.add_argument("-o", "--out", metavar="OUT_DIR", help="also write comparison.md, comparison.json and plots here")
    p.add_argument("--unpaired", action="store_true",
                   help="compare runs scored on different documents (independent-samples test; flagged)")
    p.add_argument("--no-plots", action="store_true", help="with -o: skip the PNG plots")


def cli(args) -> int:
    comp = compare(args.runs, ref=args.ref, metric=args.metric, unpaired=args.unpaired)
    print_rich(comp)
    if args.out:
        out = write_report(comp, args.out, plots=not args.no_plots)
        print(f"\nreport written to {out}")
    return 0

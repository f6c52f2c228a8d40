"""`mixq compare`: eval runs side by side, with paired significance tests and honest summaries.

Reads run folders written by `mixq eval` (results.json + samples.jsonl, see docs/contracts.md).
Task differences against the reference run are paired by (task, doc_id): McNemar's exact test
and Newcombe's paired score interval (see stats.py); the task-averaged accuracy gets a paired
bootstrap stratified by task. Runs scored on different documents are refused unless `--unpaired`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from mixq.errors import MixqError
from mixq.io.files import write_atomic
from mixq.report import stats
from mixq.report.plots import write_plots

METRICS = {"acc": "correct", "acc_norm": "correct_norm"}
MEMORY_OVERHEAD = 0.10   # estimated memory to load = size on disk x (1 + this), when the run has none
ALPHA = 0.05
NOT_SIGNIFICANT = "≈"


# --------------------------------------------------------------------------- reading runs

@dataclass
class Run:
    label: str
    path: Path
    results: dict
    samples: dict[str, dict[int, dict]] | None   # task -> doc_id -> record; None when no samples.jsonl


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise MixqError(f"{path}: not found; pass run folders written by `mixq eval -o RUN_DIR`") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MixqError(f"{path}: not valid JSON ({e}); re-run `mixq eval` for this run") from None


def _read_samples(path: Path) -> dict[str, dict[int, dict]] | None:
    if not path.exists():
        return None
    out: dict[str, dict[int, dict]] = {}
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                if "correct" not in rec and "correct_norm" not in rec:
                    continue   # not a multiple-choice document (e.g. a perplexity window)
                out.setdefault(rec["task"], {})[int(rec["doc_id"])] = rec
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise MixqError(f"{path}:{lineno}: bad sample line ({e!r}); re-run `mixq eval` for this run") from None
    return out


def load_run(path) -> Run:
    """Read one run folder (label filled in later by `load_runs`)."""
    path = Path(path)
    if not path.is_dir():
        raise MixqError(f"{path}: not a run folder; pass folders written by `mixq eval -o RUN_DIR`")
    results = _read_json(path / "results.json")
    return Run("", path, results, _read_samples(path / "samples.jsonl"))


def load_runs(paths) -> list[Run]:
    """Read run folders and give each a unique label: its recipe, else its folder name."""
    runs = [load_run(p) for p in paths]
    if not runs:
        raise MixqError("no run folders given; pass at least one folder written by `mixq eval -o RUN_DIR`")
    def name(r: Run) -> str:
        rec = (r.results.get("provenance") or {}).get("recipe")
        return r.results.get("recipe") or (rec.get("name") if isinstance(rec, dict) else None) or r.path.name

    names = [name(r) for r in runs]
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


# --------------------------------------------------------------------------- the comparison

@dataclass
class Cell:
    """One variant's score on one task."""
    acc: float
    se: float
    n: int
    lo: float   # Wilson 95% interval
    hi: float


@dataclass
class TaskRow:
    task: str
    cells: dict[str, Cell | None]
    diffs: dict[str, stats.DiffResult | None]      # non-ref label -> difference vs ref
    p_holm: dict[str, float] = field(default_factory=dict)


@dataclass
class Variant:
    label: str
    path: str
    model: str | None
    recipe: str | None
    size_bytes: int | None
    bits_per_weight: float | None
    memory_bytes: int | None
    ppl: float | None
    ppl_se: float | None
    kld: dict | None
    ppl_vs_ref: stats.DiffResult | None = None     # ln(ppl/ppl_ref) from the paired KLD run, if ref is its base


@dataclass
class Comparison:
    variants: list[Variant]
    ref: str
    metric: str
    paired: bool
    tasks: list[TaskRow]
    average: TaskRow | None
    n_comparisons: int
    memory_note: str
    summary: list[str]
    notes: list[str]

    def variant(self, label: str) -> Variant:
        return next(v for v in self.variants if v.label == label)

    @property
    def others(self) -> list[str]:
        return [v.label for v in self.variants if v.label != self.ref]


def _outcomes(run: Run, task: str, key: str) -> dict[int, int]:
    out = {}
    for doc_id, rec in run.samples[task].items():
        v = rec.get(key)
        if v is None:
            v = rec.get("correct")   # tasks without a normalised metric score acc_norm as acc
        if v is None:
            raise MixqError(f"{run.path}/samples.jsonl: task {task} doc {doc_id} has no '{key}'; re-run `mixq eval`")
        out[doc_id] = int(bool(v))
    return out


def _task_names(run: Run) -> list[str]:
    if run.samples is not None:
        return list(run.samples)
    return list(run.results.get("tasks", {}))


def _cell_from_results(run: Run, task: str, metric: str) -> Cell | None:
    t = run.results.get("tasks", {}).get(task)
    if not t or t.get(metric) is None or not t.get("n"):
        return None
    n, acc = int(t["n"]), float(t[metric])
    lo, hi = stats.wilson_interval(round(acc * n), n)
    return Cell(acc, float(t.get(f"{metric}_stderr") or stats.proportion_se(round(acc * n), n)), n, lo, hi)


def _cell(outcomes: dict[int, int]) -> Cell:
    n, k = len(outcomes), sum(outcomes.values())
    lo, hi = stats.wilson_interval(k, n)
    return Cell(k / n if n else 0.0, stats.proportion_se(k, n), n, lo, hi)


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


def _variant(run: Run) -> Variant:
    r = run.results
    ppl = r.get("ppl") or {}
    kld = r.get("kld") or None
    return Variant(run.label, str(run.path), r.get("model"), r.get("recipe"), r.get("size_bytes"),
                   r.get("bits_per_weight"), r.get("memory_bytes_estimate"), ppl.get("ppl"),
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


def compare(run_dirs, ref=None, metric: str = "acc", *, unpaired: bool = False,
            n_boot: int = 2000, seed: int = 0) -> Comparison:
    """Compare eval runs: per-task scores, paired differences vs `ref` (label, folder, or index)."""
    if metric not in METRICS:
        raise MixqError(f"--metric {metric}: choose one of {', '.join(METRICS)}")
    key = METRICS[metric]
    runs = load_runs(run_dirs)
    ri = _pick_ref(runs, ref)
    ref_run = runs[ri]
    if not unpaired:
        for r in runs:
            if r.samples is None:
                raise MixqError(f"{r.path}/samples.jsonl: missing; paired comparison needs per-document results "
                                f"(re-run `mixq eval`), or pass --unpaired")

    tasks = list(dict.fromkeys(t for r in runs for t in _task_names(r)))
    rows: list[TaskRow] = []
    outcomes = {r.label: {t: _outcomes(r, t, key) for t in r.samples} for r in runs} if not unpaired else None
    for task in tasks:
        cells, diffs = {}, {}
        for r in runs:
            if outcomes is not None:
                cells[r.label] = _cell(outcomes[r.label][task]) if task in outcomes[r.label] else None
            elif r.samples is not None and task in r.samples:
                cells[r.label] = _cell(_outcomes(r, task, key))
            else:
                cells[r.label] = _cell_from_results(r, task, metric)
        for r in runs:
            if r is ref_run:
                continue
            a, b = cells[r.label], cells[ref_run.label]
            if a is None or b is None:
                diffs[r.label] = None
            elif not unpaired:
                x, y = outcomes[r.label][task], outcomes[ref_run.label][task]
                _check_pairing(ref_run, r, task, x, y)
                ids = sorted(x)
                diffs[r.label] = stats.paired_proportion_diff([x[i] for i in ids], [y[i] for i in ids])
            else:
                diffs[r.label] = stats.unpaired_proportion_diff(round(a.acc * a.n), a.n, round(b.acc * b.n), b.n)
        rows.append(TaskRow(task, cells, diffs))

    # Holm over the whole family of task comparisons
    family = [(row, lab) for row in rows for lab, d in row.diffs.items() if d is not None]
    for (row, lab), p in zip(family, stats.holm([row.diffs[lab].p for row, lab in family])):
        row.p_holm[lab] = p

    average = _average_row(runs, ref_run, rows, outcomes, n_boot=n_boot, seed=seed)
    variants = [_variant(r) for r in runs]
    refv = variants[ri]
    for v in variants:
        if v is not refv:
            v.ppl_vs_ref = _ppl_vs_ref(v, refv)
    for v in variants:
        v.memory_bytes = int(v.size_bytes * (1 + MEMORY_OVERHEAD)) if v.size_bytes else None
    memory_note = (f"estimated memory to load = size of the weights + {MEMORY_OVERHEAD:.0%} (runtime buffers "
                   f"and a short-context KV cache; a rule of thumb, not measured; long contexts need more)")
    comp = Comparison(variants, ref_run.label, metric, not unpaired, rows, average, len(family), memory_note, [], [])
    comp.notes = _notes(comp)
    for r in runs:
        if r.results.get("complete") is False:
            comp.notes.append(f"Run {r.label} ({r.path}) is incomplete (interrupted `mixq eval`); "
                              f"finish it with `mixq eval ... --resume`.")
    comp.summary = summarize(comp)
    return comp


def _average_row(runs, ref_run, rows, outcomes, *, n_boot, seed) -> TaskRow | None:
    """Mean accuracy over the tasks every run has; vs ref by a paired bootstrap stratified by task."""
    common = [row for row in rows if all(c is not None for c in row.cells.values())]
    if len(common) < 2:
        return None
    cells, diffs = {}, {}
    for r in runs:
        accs = [row.cells[r.label].acc for row in common]
        se = math.sqrt(sum(row.cells[r.label].se ** 2 for row in common)) / len(common)
        z = stats.z_value()
        mean = sum(accs) / len(accs)
        cells[r.label] = Cell(mean, se, sum(row.cells[r.label].n for row in common), mean - z * se, mean + z * se)
    for r in runs:
        if r is ref_run:
            continue
        if outcomes is not None:
            xs, ys, strata = [], [], []
            for row in common:
                x, y = outcomes[r.label][row.task], outcomes[ref_run.label][row.task]
                ids = sorted(x)
                xs += [x[i] for i in ids]
                ys += [y[i] for i in ids]
                strata += [row.task] * len(ids)
            diffs[r.label] = stats.paired_bootstrap(xs, ys, n_boot=n_boot, seed=seed, strata=strata)
        else:
            a, b = cells[r.label], cells[ref_run.label]
            se = math.sqrt(a.se ** 2 + b.se ** 2)
            d, z = a.acc - b.acc, stats.z_value()
            p = 1.0 if se == 0 else math.erfc(abs(d) / se / math.sqrt(2))
            diffs[r.label] = stats.DiffResult(d, d - z * se, d + z * se, p, "unpaired-normal", a.n, b.n)
    return TaskRow(f"mean ({len(common)} tasks)", cells, diffs)


# --------------------------------------------------------------------------- words

def _fmt_bytes(n) -> str:
    if not n:
        return "—"
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _n_phrase(comp: Comparison) -> str:
    ns = sorted({c.n for row in comp.tasks for c in row.cells.values() if c is not None})
    if not ns:
        return "n=0"
    return f"n={ns[0]}" if len(ns) == 1 else f"n={ns[0]}–{ns[-1]}"


def _notes(comp: Comparison) -> list[str]:
    notes = []
    per_task = []
    for row in comp.tasks:
        ns = sorted({c.n for c in row.cells.values() if c is not None})
        per_task.append(f"{row.task} {ns[0]}" if len(ns) == 1 else f"{row.task} {'/'.join(map(str, ns))}")
    notes.append("Documents per task: " + ", ".join(per_task) + ".")
    if comp.paired:
        notes.append(f"Δ = variant − {comp.ref} ({comp.metric}); paired by document: 95% interval by Newcombe's "
                     "paired score method, p by McNemar's exact test.")
    else:
        notes.append(f"UNPAIRED comparison (runs not matched by document): Δ = variant − {comp.ref} with "
                     "Newcombe's independent-samples interval and a two-proportion z test; less sensitive than paired.")
    notes.append(f"{NOT_SIGNIFICANT} not significant (p ≥ {ALPHA}); * p < {ALPHA}; ** also < {ALPHA} after "
                 f"Holm's adjustment over all {comp.n_comparisons} task comparisons.")
    if comp.paired:
        notes.append("The exact test is slightly conservative, so near p = 0.05 an interval may exclude 0 "
                     "while the mark says ≈; the mark follows the test.")
    if comp.average is not None:
        how = "paired bootstrap over documents, stratified by task" if comp.paired else "normal approximation"
        notes.append(f"The mean row averages the tasks every run has; its Δ interval and p come from a {how}.")
    notes.append(comp.memory_note + ".")
    if any(v.ppl_vs_ref for v in comp.variants):
        notes.append("Perplexity Δ: ppl ratio to the reference from the runs' ln(ppl/ppl_base) over the same tokens "
                     "(paired where the reference is the KLD base; otherwise the two standard errors are "
                     "combined as if independent, which overstates the uncertainty).")
    return notes


def _mark(d: stats.DiffResult, p_holm: float | None) -> str:
    if d.p >= ALPHA:
        return NOT_SIGNIFICANT
    return "**" if p_holm is not None and p_holm < ALPHA else "*"


def summarize(comp: Comparison) -> list[str]:
    """Plain-words findings, each backed by a number in the table."""
    out = []
    n_tasks = len(comp.tasks)
    if len(comp.variants) == 1:
        v = comp.variants[0]
        out.append(f"{v.label} on {n_tasks} task{'s' * (n_tasks != 1)} ({comp.metric}, {_n_phrase(comp)} "
                   f"documents per task); a single run, so no differences are tested.")
    else:
        out.append(f"{len(comp.variants)} variants on {n_tasks} task{'s' * (n_tasks != 1)} ({comp.metric}, "
                   f"{'paired by document' if comp.paired else 'UNPAIRED'}, {_n_phrase(comp)} documents per task), "
                   f"differences against {comp.ref}.")
    sized = [v for v in comp.variants if v.size_bytes]
    if len(sized) > 1:
        small = min(sized, key=lambda v: v.size_bytes)
        big = max(sized, key=lambda v: v.size_bytes)
        bpw = f", {small.bits_per_weight:.2f} bits per weight" if small.bits_per_weight else ""
        rel = f" ({small.size_bytes / big.size_bytes:.0%} of {big.label})" if big is not small else ""
        out.append(f"Smallest: {small.label} at {_fmt_bytes(small.size_bytes)}{bpw}{rel}.")
    exact = [v.label for v in comp.variants if v.kld and v.kld.get("kld_mean") == 0]
    if exact:
        out.append(f"{', '.join(exact)} reproduce{'s' * (len(exact) == 1)} the base's next-token distributions "
                   f"exactly on the KLD text (mean KLD 0).")
    with_kld = sorted([v for v in comp.variants if v.kld and v.kld.get("kld_mean") is not None and
                       v.kld["kld_mean"] > 0], key=lambda v: v.kld["kld_mean"])
    if with_kld:
        best = with_kld[0]
        s = f"{'Closest to the base by mean KLD' if len(with_kld) > 1 else 'Mean KLD to the base'}: {best.label} ({_pm(best.kld['kld_mean'], best.kld.get('kld_mean_stderr'))})"
        if len(with_kld) > 1:
            nxt = with_kld[1]
            s += f"; next {nxt.label} ({_pm(nxt.kld['kld_mean'], nxt.kld.get('kld_mean_stderr'))})"
            se = math.hypot(best.kld.get("kld_mean_stderr") or 0, nxt.kld.get("kld_mean_stderr") or 0)
            if nxt.kld["kld_mean"] - best.kld["kld_mean"] < stats.z_value() * se:
                s += ", a gap within the two standard errors' combined 95% margin"
        out.append(s + ".")
    for lab in comp.others:
        sig = [(row, row.diffs[lab]) for row in comp.tasks if row.diffs.get(lab) is not None
               and row.diffs[lab].p < ALPHA]
        tested = [row.diffs[lab] for row in comp.tasks if row.diffs.get(lab) is not None]
        if not tested:
            out.append(f"{lab} shares no task with {comp.ref}: nothing to compare.")
            continue
        widths = sorted((d.hi - d.lo) / 2 for d in tested)
        half = widths[len(widths) // 2]
        if not sig:
            out.append(f"No task difference between {lab} and {comp.ref} is significant at 5% "
                       f"({len(tested)} tasks, {_n_phrase(comp)}; 95% intervals about ±{half:.3f}).")
        else:
            parts = []
            for row, d in sig:
                holm_ok = row.p_holm.get(lab, 1.0) < ALPHA
                parts.append(f"{row.task} {d.diff:+.3f} [{d.lo:+.3f}, {d.hi:+.3f}], p={_p(d.p)}"
                             f"{'' if holm_ok else ', not after Holm'}")
            rest = len(tested) - len(sig)
            out.append(f"{lab} vs {comp.ref}: significant at 5% on {'; '.join(parts)}"
                       f"{f'; the other {rest} task(s) show no significant difference' if rest else ''}.")
    if comp.n_comparisons:
        n_sig = sum(1 for row in comp.tasks for d in row.diffs.values() if d is not None and d.p < ALPHA)
        n_holm = sum(1 for row in comp.tasks for p in row.p_holm.values() if p < ALPHA)
        out.append(f"{comp.n_comparisons} task comparisons were tested; with no real differences about "
                   f"{comp.n_comparisons * ALPHA:.1f} would reach p < 0.05 by chance. {n_sig} did; "
                   f"{n_holm} remain{'s' * (n_holm == 1)} significant after Holm's adjustment.")
    if comp.average is not None:
        parts = []
        for lab in comp.others:
            d = comp.average.diffs.get(lab)
            if d is not None:
                parts.append(f"{lab} {d.diff:+.3f} [{d.lo:+.3f}, {d.hi:+.3f}] "
                             f"({'p=' + _p(d.p) if d.p < ALPHA else 'not significant'})")
        if parts:
            out.append(f"Task-averaged {comp.metric} vs {comp.ref}: " + "; ".join(parts) + ".")
    return out


def _p(p: float) -> str:
    return f"{p:.2g}" if p >= 0.001 else f"{p:.1e}"


def _pm(x, se, fmt=None) -> str:
    """x ± se in one format: `fmt`, else 4 decimals, or 3 significant digits for values below 0.001
    (KLDs of near-lossless quants)."""
    if x is None:
        return "—"
    if fmt is None:
        fmt = "{:.4f}" if x == 0 or abs(x) >= 0.001 else "{:.2e}"
    return fmt.format(x) + (f" ± {fmt.format(se)}" if se else "")


# --------------------------------------------------------------------------- tables

def main_table(comp: Comparison) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of the comparison table (strings), shared by every renderer."""
    labels = [v.label for v in comp.variants]
    headers = [comp.metric if comp.tasks else ""] + [
        f"{lab} (ref)" if lab == comp.ref else lab for lab in labels] + [f"Δ {lab}" for lab in comp.others]
    rows = []
    for row in comp.tasks + ([comp.average] if comp.average else []):
        cells = [f"{c.acc:.3f} ±{c.se:.3f}" if c else "—" for c in (row.cells[lab] for lab in labels)]
        deltas = []
        for lab in comp.others:
            d = row.diffs.get(lab)
            deltas.append("—" if d is None else f"{d.diff:+.3f} {_mark(d, row.p_holm.get(lab))}")
        rows.append([row.task] + cells + deltas)
    ref = comp.variant(comp.ref)
    blank = [""] * len(comp.others)

    def rel(v: Variant, attr: str) -> str:
        a, b = getattr(v, attr), getattr(ref, attr)
        return f"{(a / b - 1) * 100:+.1f}%" if a and b else "—"

    rows.append(["size on disk"] + [_fmt_bytes(v.size_bytes) for v in comp.variants] +
                [rel(comp.variant(lab), "size_bytes") for lab in comp.others])
    rows.append(["bits per weight"] + [f"{v.bits_per_weight:.2f}" if v.bits_per_weight else "—"
                                       for v in comp.variants] +
                [f"{comp.variant(lab).bits_per_weight - ref.bits_per_weight:+.2f}"
                 if comp.variant(lab).bits_per_weight and ref.bits_per_weight else "—" for lab in comp.others])
    rows.append(["memory to load (est.)"] + [_fmt_bytes(v.memory_bytes) for v in comp.variants] +
                [rel(comp.variant(lab), "memory_bytes") for lab in comp.others])
    if any(v.ppl for v in comp.variants):
        deltas = []
        for lab in comp.others:
            d = comp.variant(lab).ppl_vs_ref
            deltas.append("—" if d is None else
                          f"{math.expm1(d.diff) * 100:+.2f}% {_mark(d, None)}")
        rows.append(["perplexity"] + [_pm(v.ppl, v.ppl_se, "{:.3f}") for v in comp.variants] + deltas)
    if any(v.kld for v in comp.variants):
        rows.append(["mean KLD vs base"] + [_pm(v.kld["kld_mean"], v.kld.get("kld_mean_stderr"))
                                            if v.kld else "—" for v in comp.variants] + blank)
        rows.append(["top-1 agreement"] + [
            _pm(100 * v.kld["top1_agreement"], 100 * (v.kld.get("top1_agreement_stderr") or 0), "{:.2f}") + "%"
            if v.kld and v.kld.get("top1_agreement") is not None else "—" for v in comp.variants] + blank)
    return headers, rows


def detail_table(comp: Comparison) -> tuple[list[str], list[list[str]]]:
    """One row per (task, variant) difference: Δ, 95% interval, p, Holm p, discordant pairs."""
    headers = ["task", "variant", f"Δ {comp.metric}", "95% interval", "p", "p (Holm)",
               "discordant (+/−)" if comp.paired else "n (variant/ref)"]
    rows = []
    for row in comp.tasks + ([comp.average] if comp.average else []):
        for lab in comp.others:
            d = row.diffs.get(lab)
            if d is None:
                continue
            holm = row.p_holm.get(lab)
            extra = (f"{d.discordant[0]}/{d.discordant[1]}" if d.discordant else "bootstrap") if comp.paired \
                else f"{d.n_x}/{d.n_y}"
            rows.append([row.task, lab, f"{d.diff:+.3f} {_mark(d, holm)}", f"[{d.lo:+.3f}, {d.hi:+.3f}]",
                         _p(d.p), _p(holm) if holm is not None else "—", extra])
    for lab in comp.others:
        d = comp.variant(lab).ppl_vs_ref
        if d is not None:
            rows.append(["perplexity (ratio)", lab, f"{math.expm1(d.diff) * 100:+.2f}% {_mark(d, None)}",
                         f"[{math.expm1(d.lo) * 100:+.2f}%, {math.expm1(d.hi) * 100:+.2f}%]", _p(d.p), "—",
                         f"{d.n_x} tokens"])
    return headers, rows


def _md_table(headers, rows) -> str:
    esc = lambda s: str(s).replace("|", "\\|")
    lines = ["| " + " | ".join(map(esc, headers)) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(headers) - 1)) + "|"]
    lines += ["| " + " | ".join(map(esc, r)) + " |" for r in rows]
    return "\n".join(lines)


def to_markdown(comp: Comparison, *, title: str | None = "Comparison", details: bool = True) -> str:
    """Markdown: summary, main table, notes, and (optionally) the per-difference details."""
    parts = []
    if title:
        parts.append(f"## {title}\n")
    parts.append("\n".join(f"- {s}" for s in comp.summary) + "\n")
    parts.append(_md_table(*main_table(comp)) + "\n")
    parts.append("\n".join(f"_{n}_  " for n in comp.notes) + "\n")
    if details:
        h, r = detail_table(comp)
        if r:
            parts.append("### Differences in detail\n\n" + _md_table(h, r) + "\n")
    return "\n".join(parts)


def to_json(comp: Comparison) -> dict:
    """Everything in the tables, numerically, including Holm-adjusted p-values."""
    def cell(c):
        return None if c is None else {"acc": c.acc, "stderr": c.se, "n": c.n, "ci95": [c.lo, c.hi]}

    def row_json(row):
        return {"task": row.task, "scores": {k: cell(c) for k, c in row.cells.items()},
                "diff_vs_ref": {k: (None if d is None else {**d.to_dict(), "p_holm": row.p_holm.get(k),
                                                            "significant": d.p < ALPHA})
                                for k, d in row.diffs.items()}}

    return {
        "ref": comp.ref, "metric": comp.metric, "paired": comp.paired, "alpha": ALPHA,
        "n_task_comparisons": comp.n_comparisons, "multiplicity": "holm",
        "variants": [{"label": v.label, "path": v.path, "model": v.model, "recipe": v.recipe,
                      "size_bytes": v.size_bytes, "bits_per_weight": v.bits_per_weight,
                      "memory_bytes_estimate": v.memory_bytes, "ppl": v.ppl, "ppl_stderr": v.ppl_se,
                      "kld": v.kld, "ppl_vs_ref": v.ppl_vs_ref.to_dict() if v.ppl_vs_ref else None}
                     for v in comp.variants],
        "tasks": [row_json(r) for r in comp.tasks],
        "average": row_json(comp.average) if comp.average else None,
        "memory_note": comp.memory_note, "summary": comp.summary, "notes": comp.notes,
    }


def print_rich(comp: Comparison, console=None) -> None:
    """Terminal rendering (rich): summary, table, notes."""
    from rich.console import Console
    from rich.table import Table

    # Never squeeze the table into ellipses: let it be as wide as its cells need (a narrow
    # terminal then wraps lines instead of hiding numbers; a pipe gets the full table).
    console = console or Console(width=max(Console().width, 40 + 22 * len(comp.variants) * 2))
    headers, rows = main_table(comp)
    table = Table(title=f"mixq compare — {comp.metric}, Δ vs {comp.ref}"
                  + ("" if comp.paired else " [UNPAIRED]"), show_lines=False)
    for i, h in enumerate(headers):
        table.add_column(h, justify="left" if i == 0 else "right", no_wrap=True)
    n_acc = len(comp.tasks) + (1 if comp.average else 0)
    for i, r in enumerate(rows):
        table.add_row(*r, end_section=i == n_acc - 1)
    console.print(table)
    for n in comp.notes:
        console.print(f"[dim]{n}[/dim]", highlight=False)
    console.print()
    for s in comp.summary:
        console.print(f"• {s}", highlight=False)


def write_report(comp: Comparison, out_dir, *, plots: bool = True) -> Path:
    """Write comparison.md, comparison.json and (matplotlib permitting) PNG plots into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = to_markdown(comp, title=f"mixq comparison ({comp.metric}, vs {comp.ref})")
    images = []
    if plots:
        try:
            images = write_plots(comp, out)
        except ImportError as e:   # matplotlib is an optional dependency ("report" extra)
            md += f"\n_Plots skipped: {e}. `pip install matplotlib` to get them._\n"
    if images:
        md += "\n### Plots\n\n" + "\n".join(f"![{p.stem}]({p.name})" for p in images) + "\n"
    write_atomic(out / "comparison.md", md)
    write_atomic(out / "comparison.json", json.dumps(to_json(comp), indent=2, default=float) + "\n")
    return out


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

"""The words of a comparison: its summary sentences and its notes, each backed by a number in the table.

One small function per kind of statement; `summarize` and `notes` put them in order. A statement
that has nothing to say returns None (or an empty list) and is left out.
"""

from __future__ import annotations

import math

from mixq.report.comparison import Comparison, Variant
from mixq.report.stats import ALPHA, z_value
from mixq.report.tables import NOT_SIGNIFICANT, fmt_bytes, fmt_interval, fmt_p, pm


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' * (n != 1)}"


def n_phrase(comp: Comparison) -> str:
    """Documents per task: `n=100`, or the range `n=50–100` when tasks differ."""
    ns = sorted({c.n for row in comp.tasks for c in row.cells.values() if c is not None})
    if not ns:
        return "n=0"
    return f"n={ns[0]}" if len(ns) == 1 else f"n={ns[0]}–{ns[-1]}"


def memory_note(overhead: float) -> str:
    """How the memory to load is estimated."""
    return (f"estimated memory to load = size of the weights + {overhead:.0%} (runtime buffers "
            f"and a short-context KV cache; a rule of thumb, not measured; long contexts need more)")


# --------------------------------------------------------------------------- summary statements

def scope(comp: Comparison, *, single_run_clause: bool = True) -> str:
    """What was run: variants, tasks, metric, pairing, documents per task, the reference."""
    tasks = _plural(len(comp.tasks), "task")
    if len(comp.variants) == 1:
        tail = "; a single run, so no differences are tested." if single_run_clause else "."
        return f"{comp.variants[0].label} on {tasks} ({comp.metric}, {n_phrase(comp)} documents per task){tail}"
    return (f"{len(comp.variants)} variants on {tasks} ({comp.metric}, "
            f"{'paired by document' if comp.paired else 'UNPAIRED'}, {n_phrase(comp)} documents per task), "
            f"differences against {comp.ref}.")


def smallest(comp: Comparison) -> str | None:
    """The smallest variant, its bits per weight and its share of the largest."""
    sized = [v for v in comp.variants if v.size_bytes]
    if len(sized) < 2:
        return None
    small = min(sized, key=lambda v: v.size_bytes)
    big = max(sized, key=lambda v: v.size_bytes)
    bpw = f", {small.bits_per_weight:.2f} bits per weight" if small.bits_per_weight else ""
    rel = f" ({small.size_bytes / big.size_bytes:.0%} of {big.label})" if big is not small else ""
    return f"Smallest: {small.label} at {fmt_bytes(small.size_bytes)}{bpw}{rel}."


def exact_kld(comp: Comparison) -> str | None:
    """Variants whose next-token distributions equal the base's (mean KLD 0)."""
    exact = [v.label for v in comp.variants if v.kld and v.kld.get("kld_mean") == 0]
    if not exact:
        return None
    return (f"{', '.join(exact)} reproduce{'s' * (len(exact) == 1)} the base's next-token distributions "
            f"exactly on the KLD text (mean KLD 0).")


def _kld_pm(v: Variant) -> str:
    return pm(v.kld["kld_mean"], v.kld.get("kld_mean_stderr"))


def closest_kld(comp: Comparison) -> str | None:
    """The variant closest to the base by mean KLD, and whether the runner-up is within the noise."""
    with_kld = sorted([v for v in comp.variants if v.kld and v.kld.get("kld_mean") is not None and
                       v.kld["kld_mean"] > 0], key=lambda v: v.kld["kld_mean"])
    if not with_kld:
        return None
    best = with_kld[0]
    if len(with_kld) == 1:
        return f"Mean KLD to the base: {best.label} ({_kld_pm(best)})."
    nxt = with_kld[1]
    s = f"Closest to the base by mean KLD: {best.label} ({_kld_pm(best)}); next {nxt.label} ({_kld_pm(nxt)})"
    se = math.hypot(best.kld.get("kld_mean_stderr") or 0, nxt.kld.get("kld_mean_stderr") or 0)
    if nxt.kld["kld_mean"] - best.kld["kld_mean"] < z_value() * se:   # never true for an unknown (NaN) SE
        s += ", a gap within the two standard errors' combined 95% margin"
    return s + "."


def task_differences(comp: Comparison, label: str) -> str:
    """Which task differences between `label` and the reference are significant, and which survive Holm."""
    tested = [(row, row.diffs[label]) for row in comp.tasks if row.diffs.get(label) is not None]
    if not tested:
        return f"{label} shares no task with {comp.ref}: nothing to compare."
    sig = [(row, d) for row, d in tested if d.p < ALPHA]
    if not sig:
        widths = sorted((d.hi - d.lo) / 2 for _, d in tested)
        return (f"No task difference between {label} and {comp.ref} is significant at 5% "
                f"({len(tested)} tasks, {n_phrase(comp)}; 95% intervals about ±{widths[len(widths) // 2]:.3f}).")
    parts = [f"{row.task} {d.diff:+.3f} {fmt_interval(d.lo, d.hi)}, p={fmt_p(d.p)}"
             f"{'' if row.p_holm.get(label, 1.0) < ALPHA else ', not after Holm'}" for row, d in sig]
    rest = len(tested) - len(sig)
    return (f"{label} vs {comp.ref}: significant at 5% on {'; '.join(parts)}"
            f"{f'; the other {rest} task(s) show no significant difference' if rest else ''}.")


def multiplicity(comp: Comparison) -> str | None:
    """How many significant results chance alone would give, and how many survive Holm."""
    if not comp.n_comparisons:
        return None
    n_sig = sum(1 for row in comp.tasks for d in row.diffs.values() if d is not None and d.p < ALPHA)
    n_holm = sum(1 for row in comp.tasks for p in row.p_holm.values() if p < ALPHA)
    return (f"{comp.n_comparisons} task comparisons were tested; with no real differences about "
            f"{comp.n_comparisons * ALPHA:.1f} would reach p < 0.05 by chance. {n_sig} did; "
            f"{n_holm} remain{'s' * (n_holm == 1)} significant after Holm's adjustment.")


def average_differences(comp: Comparison) -> str | None:
    """The task-averaged score of each variant against the reference."""
    if comp.average is None:
        return None
    parts = []
    for label in comp.others:
        d = comp.average.diffs.get(label)
        if d is not None:
            parts.append(f"{label} {d.diff:+.3f} {fmt_interval(d.lo, d.hi)} "
                         f"({'p=' + fmt_p(d.p) if d.p < ALPHA else 'not significant'})")
    if not parts:
        return None
    return f"Task-averaged {comp.metric} vs {comp.ref}: " + "; ".join(parts) + "."


def summarize(comp: Comparison, *, single_run_clause: bool = True) -> list[str]:
    """Plain-words findings, each backed by a number in the table.

    `single_run_clause=False` (a model card of one run) leaves out the remark that a single run
    tests no differences."""
    out = [scope(comp, single_run_clause=single_run_clause), smallest(comp), exact_kld(comp), closest_kld(comp)]
    out += [task_differences(comp, label) for label in comp.others]
    out += [multiplicity(comp), average_differences(comp)]
    return [s for s in out if s]


# --------------------------------------------------------------------------- notes

def documents_note(comp: Comparison) -> str:
    per_task = []
    for row in comp.tasks:
        ns = sorted({c.n for c in row.cells.values() if c is not None})
        per_task.append(f"{row.task} {ns[0]}" if len(ns) == 1 else f"{row.task} {'/'.join(map(str, ns))}")
    return "Documents per task: " + ", ".join(per_task) + "."


def difference_notes(comp: Comparison) -> list[str]:
    """How differences are tested and marked; none when nothing is compared."""
    if not comp.others:
        return []
    if comp.paired:
        how = (f"Δ = variant − {comp.ref} ({comp.metric}); paired by document: 95% interval by Newcombe's "
               "paired score method, p by McNemar's exact test.")
    else:
        how = (f"UNPAIRED comparison (runs not matched by document): Δ = variant − {comp.ref} with "
               "Newcombe's independent-samples interval and a two-proportion z test; less sensitive than paired.")
    marks = (f"{NOT_SIGNIFICANT} not significant (p ≥ {ALPHA}); * p < {ALPHA}; ** also < {ALPHA} after "
             f"Holm's adjustment over all {comp.n_comparisons} task comparisons.")
    out = [how, marks]
    if comp.paired:
        out.append("The exact test is slightly conservative, so near p = 0.05 an interval may exclude 0 "
                   "while the mark says ≈; the mark follows the test.")
    return out


def average_note(comp: Comparison) -> str | None:
    if comp.average is None:
        return None
    if not comp.others:
        return "The mean row averages the tasks every run has."
    how = "paired bootstrap over documents, stratified by task" if comp.paired else "normal approximation"
    return f"The mean row averages the tasks every run has; its Δ interval and p come from a {how}."


def perplexity_note(comp: Comparison) -> str | None:
    if not any(v.ppl_vs_ref for v in comp.variants):
        return None
    return ("Perplexity Δ: ppl ratio to the reference from the runs' ln(ppl/ppl_base) over the same tokens "
            "(paired where the reference is the KLD base; otherwise the two standard errors are "
            "combined as if independent, which overstates the uncertainty).")


def versions_note(comp: Comparison) -> str | None:
    """Runs from before task versions were recorded: compared, but unchecked."""
    if not comp.others or not comp.unversioned:
        return None
    return (f"Task versions were not recorded by {', '.join(comp.unversioned)} (run by an older `mixq eval`), "
            "so they could not be checked to match.")


def incomplete_notes(comp: Comparison) -> list[str]:
    return [f"Run {label} ({path}) is incomplete (interrupted `mixq eval`); finish it with `mixq eval ... --resume`."
            for label, path in comp.incomplete]


def notes(comp: Comparison) -> list[str]:
    """The notes under the table, in order."""
    out = [documents_note(comp), *difference_notes(comp), average_note(comp), comp.memory_note + ".",
           perplexity_note(comp), versions_note(comp), *incomplete_notes(comp)]
    return [n for n in out if n]

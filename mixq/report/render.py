"""Renderers of a comparison: its tables, Markdown, JSON, the rich console, and the report folder."""

from __future__ import annotations

import json
import math
from pathlib import Path

from mixq.io.files import write_atomic
from mixq.report.comparison import Comparison, TaskRow
from mixq.report.plots import write_plots
from mixq.report.stats import ALPHA
from mixq.report.tables import UNKNOWN, fmt_bytes, fmt_interval, fmt_p, fmt_se, is_unknown, mark, md_table, pm

# --------------------------------------------------------------------------- tables

def _score_rows(comp: Comparison) -> list[list[str]]:
    """One row per task (and the mean): each variant's score ± SE, then each Δ vs ref with its mark."""
    labels = [v.label for v in comp.variants]
    rows = []
    for row in comp.tasks + ([comp.average] if comp.average else []):
        cells = [f"{c.acc:.3f} ±{fmt_se(c.se)}" if c else UNKNOWN for c in (row.cells[lab] for lab in labels)]
        deltas = [_delta(row.diffs.get(lab), row.p_holm.get(lab)) for lab in comp.others]
        rows.append([row.task] + cells + deltas)
    return rows


def _delta(d, p_holm) -> str:
    return UNKNOWN if d is None else f"{d.diff:+.3f} {mark(d, p_holm)}"


def _ppl_delta(d) -> str:
    """A difference of ln(ppl) as a perplexity ratio in percent."""
    return UNKNOWN if d is None else f"{math.expm1(d.diff) * 100:+.2f}% {mark(d, None)}"


def _size_rows(comp: Comparison) -> list[list[str]]:
    """Size on disk, bits per weight and estimated memory, with each variant's change vs ref."""
    ref = comp.variant(comp.ref)
    others = [comp.variant(lab) for lab in comp.others]

    def rel(attr: str) -> list[str]:
        return [f"{(getattr(v, attr) / getattr(ref, attr) - 1) * 100:+.1f}%"
                if getattr(v, attr) and getattr(ref, attr) else UNKNOWN for v in others]

    bpw = [f"{v.bits_per_weight - ref.bits_per_weight:+.2f}" if v.bits_per_weight and ref.bits_per_weight
           else UNKNOWN for v in others]
    return [["size on disk"] + [fmt_bytes(v.size_bytes) for v in comp.variants] + rel("size_bytes"),
            ["bits per weight"] + [f"{v.bits_per_weight:.2f}" if v.bits_per_weight else UNKNOWN
                                   for v in comp.variants] + bpw,
            ["memory to load (est.)"] + [fmt_bytes(v.memory_bytes) for v in comp.variants] + rel("memory_bytes")]


def _quality_rows(comp: Comparison) -> list[list[str]]:
    """Perplexity (Δ as a ratio), mean KLD and top-1 agreement, when the runs have them."""
    rows = []
    if any(v.ppl for v in comp.variants):
        deltas = [_ppl_delta(comp.variant(lab).ppl_vs_ref) for lab in comp.others]
        rows.append(["perplexity"] + [pm(v.ppl, v.ppl_se, "{:.3f}") for v in comp.variants] + deltas)
    if any(v.kld for v in comp.variants):
        blank = [""] * len(comp.others)
        rows.append(["mean KLD vs base"] + [pm(v.kld["kld_mean"], v.kld.get("kld_mean_stderr"))
                                            if v.kld else UNKNOWN for v in comp.variants] + blank)
        rows.append(["top-1 agreement"] + [
            pm(100 * v.kld["top1_agreement"], 100 * (v.kld.get("top1_agreement_stderr") or 0), "{:.2f}") + "%"
            if v.kld and v.kld.get("top1_agreement") is not None else UNKNOWN for v in comp.variants] + blank)
    return rows


def main_table(comp: Comparison) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of the comparison table (strings), shared by every renderer."""
    headers = [comp.metric if comp.tasks else ""] + [
        f"{v.label} (ref)" if v.label == comp.ref and comp.others else v.label for v in comp.variants] + \
        [f"Δ {lab}" for lab in comp.others]
    return headers, _score_rows(comp) + _size_rows(comp) + _quality_rows(comp)


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
            rows.append([row.task, lab, _delta(d, holm), fmt_interval(d.lo, d.hi),
                         fmt_p(d.p), fmt_p(holm), extra])
    for lab in comp.others:
        d = comp.variant(lab).ppl_vs_ref
        if d is not None:
            rows.append(["perplexity (ratio)", lab, _ppl_delta(d),
                         fmt_interval(math.expm1(d.lo) * 100, math.expm1(d.hi) * 100, "{:+.2f}%"), fmt_p(d.p),
                         UNKNOWN, f"{d.n_x} tokens"])
    return headers, rows


# --------------------------------------------------------------------------- Markdown, JSON, console

def to_markdown(comp: Comparison, *, title: str | None = "Comparison", details: bool = True,
                summary: list[str] | None = None) -> str:
    """Markdown: summary (the comparison's, unless `summary` is given), main table, notes, and
    (optionally) the per-difference details."""
    parts = []
    if title:
        parts.append(f"## {title}\n")
    parts.append("\n".join(f"- {s}" for s in (comp.summary if summary is None else summary)) + "\n")
    parts.append(md_table(*main_table(comp)) + "\n")
    parts.append("\n".join(f"_{n}_  " for n in comp.notes) + "\n")
    if details:
        h, r = detail_table(comp)
        if r:
            parts.append("### Differences in detail\n\n" + md_table(h, r) + "\n")
    return "\n".join(parts)


def _known(x):
    """JSON has no NaN: an unknown number (a standard error of fewer than two values) is null."""
    if isinstance(x, dict):
        return {k: _known(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_known(v) for v in x]
    return None if is_unknown(x) else x


def _row_json(row: TaskRow) -> dict:
    def cell(c):
        return None if c is None else {"acc": c.acc, "stderr": c.se, "n": c.n, "ci95": [c.lo, c.hi]}

    return {"task": row.task, "scores": {k: cell(c) for k, c in row.cells.items()},
            "diff_vs_ref": {k: (None if d is None else {**d.to_dict(), "p_holm": row.p_holm.get(k),
                                                        "significant": d.p < ALPHA})
                            for k, d in row.diffs.items()}}


def to_json(comp: Comparison) -> dict:
    """Everything in the tables, numerically, including Holm-adjusted p-values (unknown numbers: null)."""
    return _known({
        "ref": comp.ref, "metric": comp.metric, "paired": comp.paired, "alpha": ALPHA,
        "n_task_comparisons": comp.n_comparisons, "multiplicity": "holm",
        "variants": [{"label": v.label, "path": v.path, "model": v.model, "recipe": v.recipe,
                      "size_bytes": v.size_bytes, "bits_per_weight": v.bits_per_weight,
                      "memory_bytes_estimate": v.memory_bytes, "ppl": v.ppl, "ppl_stderr": v.ppl_se,
                      "kld": v.kld, "ppl_vs_ref": v.ppl_vs_ref.to_dict() if v.ppl_vs_ref else None}
                     for v in comp.variants],
        "tasks": [_row_json(r) for r in comp.tasks],
        "average": _row_json(comp.average) if comp.average else None,
        "task_versions": comp.task_versions, "task_versions_unrecorded": comp.unversioned,
        "memory_note": comp.memory_note, "summary": comp.summary, "notes": comp.notes,
    })


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

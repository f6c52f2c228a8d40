"""The sweep's one report: each model's comparison against the reference variant, and the size-vs-KLD
frontier across every variant of every model (Markdown table, JSON, PNG)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

from mixq.io.files import write_atomic
from mixq.report.compare import compare
from mixq.report.comparison import Variant
from mixq.report.plots import plot_kld_vs_bpw
from mixq.report.render import to_markdown
from mixq.report.stats import pareto_front
from mixq.report.tables import is_unknown


@dataclass
class Frontier:
    """Variants of all models on one size-vs-KLD plane (the shape `report.plots` draws)."""
    variants: list[Variant]

    def front(self) -> list[int]:
        return pareto_front([(v.bits_per_weight, v.kld["kld_mean"]) for v in self.variants], maximize_y=False)


def _has_kld(v: Variant) -> bool:
    return bool(v.bits_per_weight) and bool(v.kld) and not is_unknown(v.kld.get("kld_mean"))


def frontier(comparisons: dict) -> Frontier:
    multi = len(comparisons) > 1
    points = [replace(v, label=f"{model}/{v.label}" if multi else v.label)
              for model, comp in comparisons.items() for v in comp.variants if _has_kld(v)]
    return Frontier(sorted(points, key=lambda v: v.bits_per_weight))


def frontier_markdown(fr: Frontier) -> str:
    front = set(fr.front())
    rows = ["| variant | bits per weight | size (MB) | mean KLD | ± SE | top-1 agreement | on the front |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for i, v in enumerate(fr.variants):
        k = v.kld
        size = f"{v.size_bytes / 1e6:.1f}" if v.size_bytes else "—"
        se = k.get("kld_mean_stderr")
        top1 = k.get("top1_agreement")
        rows.append(f"| {v.label} | {v.bits_per_weight:.3f} | {size} | {k['kld_mean']:.5f} | "
                    f"{'—' if is_unknown(se) else f'{se:.5f}'} | {'—' if is_unknown(top1) else f'{top1:.4f}'} | "
                    f"{'yes' if i in front else ''} |")
    return "\n".join(rows)


def write_sweep_report(compares: dict[str, Path], ref: str, out: Path) -> Path:
    """report.md (per-model comparisons, frontier), frontier.json and kld_vs_bpw.png into `out`, and `out/MODEL`
    -> that model's compare folder (comparison.md/.json and its plots; relative links).

    `compares`: model slug -> a compare job's folder (its runs/VARIANT links)."""
    comparisons = {}
    for model, folder in compares.items():
        runs = sorted((folder / "runs").iterdir())
        comparisons[model] = compare(runs, ref=str(folder / "runs" / ref))
        if not (out / model).is_symlink():
            os.symlink(os.path.relpath(folder, out), out / model)
    parts = ["# mixq sweep report", ""]
    for model, comp in comparisons.items():
        parts += [to_markdown(comp, title=f"{model} (vs {comp.ref})", details=True), "",
                  f"Files: [{model}/comparison.md]({model}/comparison.md), [comparison.json]({model}/comparison.json)"
                  f", plots in `{model}/`.", ""]
    fr = frontier(comparisons)
    if fr.variants:
        parts += ["## Size against KL divergence, all variants", "",
                  "Mean KL divergence to each model's unquantized source against bits per weight; the front holds "
                  "the variants no other variant beats on both.", "", frontier_markdown(fr), ""]
        try:
            png = plot_kld_vs_bpw(fr, out / "kld_vs_bpw.png")
            parts += [f"![size vs KLD]({png.name})", ""] if png else []
        except ImportError as e:   # matplotlib is the optional "report" extra
            parts += [f"_Plot skipped: {e}. `pip install matplotlib` to get it._", ""]
    write_atomic(out / "frontier.json", json.dumps(
        [{"variant": v.label, "bits_per_weight": v.bits_per_weight, "size_bytes": v.size_bytes,
          "kld_mean": v.kld["kld_mean"], "kld_mean_stderr": v.kld.get("kld_mean_stderr"), "front": i in fr.front()}
         for i, v in enumerate(fr.variants)], indent=2, default=float) + "\n")
    write_atomic(out / "report.md", "\n".join(parts))
    return out / "report.md"

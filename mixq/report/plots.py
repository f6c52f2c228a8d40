"""PNG plots of a comparison (matplotlib, Agg backend): trade-offs against bits per weight, task bars.

- accuracy_vs_bpw.png: one panel per task (and the task mean), accuracy against bits per weight,
  one point per variant with its 95% interval; the Pareto front (no other variant is both smaller
  and more accurate) joined by a line and ringed.
- kld_vs_bpw.png: mean KL divergence to the base against bits per weight (±1.96 SE), Pareto front.
- task_bars.png: per-task grouped bars with 95% intervals.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

from mixq.report.stats import pareto_front, z_value
from mixq.report.tables import is_unknown


def _plt():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> Path:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        import matplotlib.pyplot as plt
        plt.close(fig)
    return path


def _error_bars(centre, lo, hi):
    """Asymmetric error-bar lengths; an interval that excludes its point estimate (e.g. a bootstrap
    interval at an accuracy of 0 or 1) is clipped at the point rather than drawn inverted; an unknown one
    is not drawn."""
    def length(x):
        return 0.0 if is_unknown(x) else max(0.0, x)   # an unknown interval (NaN standard error): no bar

    return [[length(c - l) for c, l in zip(centre, lo)], [length(h - c) for c, h in zip(centre, hi)]]


def _scatter_front(ax, xs, ys, labels, *, maximize_y, yerr=None):
    """Points with labels and error bars; Pareto front joined and ringed."""
    ax.errorbar(xs, ys, yerr=yerr, fmt="o", color="tab:blue", ecolor="tab:gray", capsize=3, zorder=2)
    front = pareto_front(list(zip(xs, ys)), maximize_y=maximize_y)
    if front:
        ax.plot([xs[i] for i in front], [ys[i] for i in front], "-", color="tab:red", lw=1.2,
                zorder=1, label="Pareto front")
        ax.scatter([xs[i] for i in front], [ys[i] for i in front], s=140, facecolors="none",
                   edgecolors="tab:red", zorder=3)
    for x, y, lab in zip(xs, ys, labels):
        ax.annotate(lab, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel("bits per weight")
    ax.grid(alpha=0.3)


def plot_accuracy_vs_bpw(comp, path: Path) -> Path | None:
    """Accuracy against bits per weight, one panel per task plus the task mean."""
    plt = _plt()
    variants = [v for v in comp.variants if v.bits_per_weight]
    rows = comp.tasks + ([comp.average] if comp.average else [])
    rows = [r for r in rows if any(r.cells.get(v.label) for v in variants)]
    if not variants or not rows:
        return None
    ncol = min(4, len(rows))
    nrow = math.ceil(len(rows) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4 * ncol, 3.3 * nrow), squeeze=False)
    for ax, row in zip(axes.flat, rows):
        pts = [(v, row.cells[v.label]) for v in variants if row.cells.get(v.label)]
        xs = [v.bits_per_weight for v, _ in pts]
        ys = [c.acc for _, c in pts]
        yerr = _error_bars(ys, [c.lo for _, c in pts], [c.hi for _, c in pts])
        _scatter_front(ax, xs, ys, [v.label for v, _ in pts], maximize_y=True, yerr=yerr)
        ax.set_title(row.task, fontsize=10)
        ax.set_ylabel(comp.metric)
    for ax in list(axes.flat)[len(rows):]:
        ax.axis("off")
    fig.suptitle(f"{comp.metric} vs bits per weight (95% intervals; red: Pareto front of the point estimates, "
                 "which overlapping intervals do not establish)")
    fig.tight_layout()
    return _save(fig, path)


def plot_kld_vs_bpw(comp, path: Path) -> Path | None:
    """Mean KL divergence to the base against bits per weight (variants with a KLD and bpw)."""
    variants = [v for v in comp.variants if v.bits_per_weight and v.kld and v.kld.get("kld_mean") is not None]
    if not variants:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    xs = [v.bits_per_weight for v in variants]
    ys = [v.kld["kld_mean"] for v in variants]
    z = z_value()
    ses = [v.kld.get("kld_mean_stderr") for v in variants]
    yerr = [0.0 if is_unknown(se) else z * se for se in ses]
    _scatter_front(ax, xs, ys, [v.label for v in variants], maximize_y=False, yerr=yerr)
    if all(y > 0 for y in ys) and max(ys) / min(ys) > 20:
        ax.set_yscale("log")
    ax.set_ylabel("mean KLD vs base (nats/token)")
    ax.set_title("mean KLD vs bits per weight (±1.96 SE; red: Pareto front)", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_task_bars(comp, path: Path) -> Path | None:
    """Grouped bars: each task, one bar per variant, with 95% (Wilson) intervals."""
    rows = comp.tasks + ([comp.average] if comp.average else [])
    if not rows:
        return None
    plt = _plt()
    labels = [v.label for v in comp.variants]
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(min(14.0, max(6.0, 0.3 * len(rows) * len(labels) + 2)), 4.5))
    for j, lab in enumerate(labels):
        xs, cells = [], []
        for i, row in enumerate(rows):
            c = row.cells.get(lab)
            if c is None:
                continue
            xs.append(i + (j - (len(labels) - 1) / 2) * width)
            cells.append(c)
        ys = [c.acc for c in cells]
        ax.bar(xs, ys, width=width, yerr=_error_bars(ys, [c.lo for c in cells], [c.hi for c in cells]), capsize=2,
               label=lab + (" (ref)" if lab == comp.ref else ""), error_kw={"elinewidth": 0.8, "ecolor": "0.3"})
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r.task for r in rows], rotation=20, ha="right")
    ax.set_ylabel(comp.metric)
    ax.set_ylim(0, 1)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=min(len(labels), 5))
    ax.set_title(f"{comp.metric} per task with 95% intervals", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def write_plots(comp, out_dir) -> list[Path]:
    """Write every plot that the comparison has data for; returns the PNG paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    made = [plot_accuracy_vs_bpw(comp, out / "accuracy_vs_bpw.png"),
            plot_kld_vs_bpw(comp, out / "kld_vs_bpw.png"),
            plot_task_bars(comp, out / "task_bars.png")]
    return [p for p in made if p is not None]

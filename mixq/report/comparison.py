"""What a comparison of eval runs is: per-task cells and differences, variants, notes (built by compare.py).

Plain dataclasses, so that the words (words.py) and the renderers (render.py) can read a comparison
without importing the code that builds one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mixq.report.stats import DiffResult


@dataclass
class Cell:
    """One variant's score on one task."""
    acc: float
    se: float   # NaN: unknown (fewer than two documents)
    n: int
    lo: float   # Wilson 95% interval
    hi: float


@dataclass
class TaskRow:
    task: str
    cells: dict[str, Cell | None]
    diffs: dict[str, DiffResult | None]      # non-ref label -> difference vs ref
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
    ppl_vs_ref: DiffResult | None = None     # ln(ppl/ppl_ref) from the paired KLD run, if ref is its base


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
    task_versions: dict = field(default_factory=dict)           # task -> version the runs recorded
    unversioned: list[str] = field(default_factory=list)        # labels of runs that recorded no task version
    incomplete: list[tuple[str, str]] = field(default_factory=list)   # (label, folder) of interrupted runs

    def variant(self, label: str) -> Variant:
        return next(v for v in self.variants if v.label == label)

    @property
    def others(self) -> list[str]:
        return [v.label for v in self.variants if v.label != self.ref]

"""How reports write numbers and tables: one set of helpers for `mixq compare` and `mixq card`.

An unknown value (None, or a NaN standard error of fewer than two values) is written `UNKNOWN`,
never "nan" and never "± 0".
"""

from __future__ import annotations

import math

from mixq.report.stats import ALPHA, DiffResult

UNKNOWN = "—"
NOT_SIGNIFICANT = "≈"


def is_unknown(x) -> bool:
    """None or NaN."""
    return x is None or (isinstance(x, float) and math.isnan(x))


def fmt_bytes(n) -> str:
    """Bytes as GB (from 1e9) or MB; `UNKNOWN` for none."""
    if not n:
        return UNKNOWN
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def fmt_p(p) -> str:
    """A p-value: 2 significant digits, scientific below 0.001."""
    if is_unknown(p):
        return UNKNOWN
    return f"{p:.2g}" if p >= 0.001 else f"{p:.1e}"


def fmt_se(se, fmt: str = "{:.3f}") -> str:
    """A standard error in `fmt`; `UNKNOWN` when it is not known."""
    return UNKNOWN if is_unknown(se) else fmt.format(se)


def fmt_interval(lo, hi, fmt: str = "{:+.3f}") -> str:
    """[lo, hi] in `fmt`; `UNKNOWN` when either end is not known."""
    if is_unknown(lo) or is_unknown(hi):
        return UNKNOWN
    return f"[{fmt.format(lo)}, {fmt.format(hi)}]"


def pm(x, se, fmt: str | None = None) -> str:
    """x ± se in one format: `fmt`, else 4 decimals, or 3 significant digits for values below 0.001
    (KLDs of near-lossless quants). No standard error recorded (None) or an exact 0: x alone; a NaN
    one: x ± `UNKNOWN`."""
    if is_unknown(x):
        return UNKNOWN
    if fmt is None:
        fmt = "{:.4f}" if x == 0 or abs(x) >= 0.001 else "{:.2e}"
    if se is None or se == 0:
        return fmt.format(x)
    return f"{fmt.format(x)} ± {fmt_se(se, fmt)}"


def mark(d: DiffResult, p_holm: float | None) -> str:
    """Significance mark of a difference: ≈ not significant (or p unknown), * p < ALPHA, ** also after Holm."""
    if not d.p < ALPHA:
        return NOT_SIGNIFICANT
    return "**" if p_holm is not None and p_holm < ALPHA else "*"


def md_table(headers, rows) -> str:
    """A Markdown table: first column left-aligned, the others right-aligned; `|` in cells escaped."""
    esc = lambda s: str(s).replace("|", "\\|")
    lines = ["| " + " | ".join(map(esc, headers)) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(headers) - 1)) + "|"]
    lines += ["| " + " | ".join(map(esc, r)) + " |" for r in rows]
    return "\n".join(lines)

"""`mixq plan`: choose each tensor's bits and group size to minimise measured damage under a size budget.

The allocation is a multiple-choice knapsack: every quantizable tensor takes exactly one option
(a candidate `(bits, group_size)` or *keep*), each with a size in bytes and a damage (the KL
divergence measured by `mixq measure` when that tensor alone is quantized so). We minimise the
summed damage subject to the total size <= budget.

Solver (`solve_mck`): an exact dynamic programme over a discretised budget. Sizes above each
tensor's smallest option are rounded *up* to whole buckets and the free budget *down*, so any
solution the DP finds fits the budget in real bytes; a final repair pass then spends the real bytes
the rounding left over on the best remaining upgrades. A Lagrangian relaxation gives a lower bound
on the optimum, so the reported gap bounds how far from optimal the answer can be.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mixq.errors import MixqError
from mixq.io.files import cache_dir, write_atomic
from mixq.quant.plan import plan_model
from mixq.quant.prepare import prepare
from mixq.quant.recipe import builtin_recipes, parse_recipe
from mixq.tune.measure import load_measurement, measure, parse_key, smoothed_damages, uniform_recipe

# ---------------------------------------------------------------------------------------------
# The knapsack


@dataclass
class MCKResult:
    choice: list[int]          # option index per item
    cost: int                  # total bytes of the chosen options
    damage: float              # summed damage of the chosen options
    lower_bound: float         # Lagrangian lower bound on the optimal damage
    buckets: int               # DP resolution used
    info: dict = field(default_factory=dict)


def _dominance_prune(cost: np.ndarray, dmg: np.ndarray) -> np.ndarray:
    """Indices of the options no other option beats (cheaper-or-equal and less-or-equal damage)."""
    order = np.lexsort((dmg, cost))
    keep, best = [], np.inf
    for j in order:
        if dmg[j] < best:
            keep.append(j)
            best = dmg[j]
    return np.array(sorted(keep, key=lambda j: cost[j]), dtype=np.int64)


def lagrangian_bound(costs, damages, budget: int) -> float:
    """max over lambda >= 0 of  sum_i min_j (d_ij + lambda c_ij) - lambda B  (a lower bound on the optimum)."""
    def g(lam):
        return sum(float(np.min(d + lam * c)) for c, d in zip(costs, damages)) - lam * budget
    # g is concave piecewise linear; its breakpoints are slopes between options. Golden-section on a log grid.
    cands = [0.0]
    for c, d in zip(costs, damages):
        for a, b in itertools.combinations(range(len(c)), 2):
            if c[a] != c[b]:
                s = (d[a] - d[b]) / (c[b] - c[a])
                if s > 0:
                    cands.append(float(s))
    cands = np.unique(np.array(cands))
    if len(cands) > 4000:  # evaluate on quantiles then refine locally
        grid = np.quantile(cands, np.linspace(0, 1, 400))
        vals = [g(x) for x in grid]
        k = int(np.argmax(vals))
        lo, hi = grid[max(k - 1, 0)], grid[min(k + 1, len(grid) - 1)]
        cands = cands[(cands >= lo) & (cands <= hi)]
        if len(cands) > 4000:
            cands = cands[np.linspace(0, len(cands) - 1, 4000).astype(int)]
    return max(g(x) for x in cands)


def solve_mck(costs, damages, budget: int, *, buckets: int = 100_000) -> MCKResult:
    """Pick one option per item: minimise sum(damages) subject to sum(costs) <= budget (bytes, exact).

    `costs[i]`, `damages[i]`: arrays over item i's options. Raises MixqError if even the smallest
    options do not fit.
    """
    costs = [np.asarray(c, dtype=np.int64) for c in costs]
    damages = [np.asarray(d, dtype=np.float64) for d in damages]
    n = len(costs)
    if n == 0:
        return MCKResult([], 0, 0.0, 0.0, 0)
    mins = np.array([c.min() for c in costs], dtype=np.int64)
    base = int(mins.sum())
    if base > budget:
        raise MixqError(f"budget of {budget:,} bytes is below the smallest possible size {base:,} bytes; "
                        f"raise the target or add smaller candidates to the measurement")
    free = int(budget - base)
    # Prune dominated options (never optimal); keep the map back to the original indices.
    keep = [_dominance_prune(c, d) for c, d in zip(costs, damages)]
    pc = [c[k] - m for c, k, m in zip(costs, keep, mins)]
    pd = [d[k] for d, k in zip(damages, keep)]
    # Bucket size q: extra costs rounded up, free budget rounded down -> always feasible in real bytes.
    q = max(1, -(-free // buckets)) if free > 0 else 1
    nb = free // q
    dp = np.zeros(nb + 1)        # dp[b]: min damage of the items so far with discretised extra cost <= b
    choice = np.zeros((n, nb + 1), dtype=np.int16)
    for i in range(n):
        new = np.full(nb + 1, np.inf)
        arg = np.zeros(nb + 1, dtype=np.int16)
        for j, (c, d) in enumerate(zip(pc[i], pd[i])):
            w = -(-int(c) // q)
            if w > nb:
                continue
            cand = np.full(nb + 1, np.inf)
            cand[w:] = dp[: nb + 1 - w] + d
            better = cand < new
            new[better] = cand[better]
            arg[better] = j
        dp = new
        choice[i] = arg
    # Backtrack
    pick = [0] * n
    b = nb
    for i in range(n - 1, -1, -1):
        j = int(choice[i, b])
        pick[i] = j
        b -= -(-int(pc[i][j]) // q)
    # Repair: spend the real bytes the rounding left over on the best upgrades (damage saved per byte).
    spent = sum(int(pc[i][pick[i]]) for i in range(n))
    upgrades = 0
    while True:
        slack = free - spent
        best, best_gain = None, 0.0
        for i in range(n):
            j0 = pick[i]
            dc = pc[i] - pc[i][j0]
            gain = pd[i][j0] - pd[i]
            ok = (dc <= slack) & (gain > 1e-300)
            if ok.any():
                score = np.where(ok, gain, -np.inf)
                j = int(np.argmax(score))
                if score[j] > best_gain:
                    best, best_gain = (i, j), float(score[j])
        if best is None:
            break
        i, j = best
        spent += int(pc[i][j] - pc[i][pick[i]])
        pick[i] = j
        upgrades += 1
    orig = [int(keep[i][pick[i]]) for i in range(n)]
    cost = int(sum(int(costs[i][orig[i]]) for i in range(n)))
    dmg = float(sum(float(damages[i][orig[i]]) for i in range(n)))
    assert cost <= budget
    return MCKResult(orig, cost, dmg, lagrangian_bound(costs, damages, budget), int(nb),
                     {"bucket_bytes": q, "repair_upgrades": upgrades})


def brute_force_mck(costs, damages, budget: int) -> tuple[list[int], float] | None:
    """Exhaustive search (tests only)."""
    best = None
    for pick in itertools.product(*[range(len(c)) for c in costs]):
        c = sum(int(costs[i][j]) for i, j in enumerate(pick))
        if c > budget:
            continue
        d = sum(float(damages[i][j]) for i, j in enumerate(pick))
        if best is None or d < best[1]:
            best = (list(pick), d)
    return best


# ---------------------------------------------------------------------------------------------
# From a measurement to a recipe


@dataclass
class Allocation:
    model: str
    target_bytes: int
    total_bytes: int           # predicted size of the converted model (recipe.Plan's accounting)
    total_params: int
    predicted_kld: float       # sum of the chosen options' measured damages (additive model)
    lower_bound: float         # Lagrangian bound: no allocation under this budget predicts less
    choices: dict              # tensor name -> (bits, group_size) or None (keep)
    damages: dict              # tensor name -> damage of the chosen option
    text: str = ""             # the recipe TOML

    @property
    def bits_per_weight(self) -> float:
        return self.total_bytes * 8 / self.total_params


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(s: str) -> int:
    """'1.2GB' -> 1200000000 bytes (KB/MB/GB are powers of 1000, KiB/MiB/GiB of 1024)."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(s))
    if not m or m.group(2).lower() not in _UNITS:
        raise MixqError(f"size {s!r} not understood: write e.g. 1.2GB, 800MB or 512MiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _options(prep, measurement: dict, allow_keep: bool):
    """Per measured tensor: [(spec or None, bytes, damage)], plus the fixed bytes of everything else."""

    infos = [info for info, _ in prep.items]
    dtype = prep.plan.tensors[0].dtype if prep.store_dtype is not None and prep.plan.tensors else None
    keep_plan = plan_model(infos, _keep_recipe(), prep.config, dtype=dtype)
    keep_bytes = {t.name: t.nbytes for t in keep_plan.tensors}
    sized: dict[tuple[int, int], dict] = {}
    for key in measurement["candidates"]:
        c = parse_key(key)
        p = plan_model(infos, uniform_recipe(*c), prep.config, dtype=dtype)
        sized[c] = {t.name: t.nbytes for t in p.tensors if t.spec is not None
                    and (t.spec.bits, t.spec.group_size) == c}
    items, fixed = {}, 0
    meas = measurement["tensors"]
    damages = smoothed_damages(measurement) if measurement.get("method") == "fisher" else \
        {n: r["damage"] for n, r in meas.items()}
    for t in keep_plan.tensors:
        opts = []
        for key, dmg in (damages.get(t.name) or {}).items():
            c = parse_key(key)
            if t.name in sized.get(c, {}):
                opts.append((c, sized[c][t.name], float(dmg)))
        if not opts:
            fixed += t.nbytes        # not quantizable, or not measured: kept as stored
            continue
        if allow_keep:
            opts.append((None, keep_bytes[t.name], 0.0))
        items[t.name] = opts
    return items, fixed, keep_plan.total_params


def _keep_recipe():

    return parse_recipe('[recipe]\nname = "keep-all"\nkeep = true\n', "<keep-all>", "keep-all")


def allocate(model: str, measurement: dict, *, target_bpw: float | None = None, target_bytes: int | None = None,
             allow_keep: bool = True, buckets: int = 100_000, measurement_path: str | None = None,
             prep=None, allow_incomplete: bool = False) -> Allocation:
    """Choose one option per measured tensor, minimising summed damage with the model's size <= target."""

    if (target_bpw is None) == (target_bytes is None):
        raise MixqError("give exactly one of --target-bpw or --target-size")
    if not measurement.get("complete", True) and not allow_incomplete:
        raise MixqError(f"measurement {measurement_path or ''} is incomplete; finish it with `mixq measure --resume`")
    prep = prep or prepare(model, "bf16" if _has_builtin("bf16") else None)
    items, fixed, n_params = _options(prep, measurement, allow_keep)
    if not items:
        raise MixqError(f"measurement {measurement_path or ''} holds no tensor of {model}: measure this model first")
    if target_bytes is None:
        target_bytes = int(math.floor(target_bpw * n_params / 8))
    names = list(items)
    costs = [np.array([o[1] for o in items[n]], dtype=np.int64) for n in names]
    dmgs = [np.array([o[2] for o in items[n]]) for n in names]
    if fixed + sum(int(c.min()) for c in costs) > target_bytes:
        least = fixed + sum(int(c.min()) for c in costs)
        raise MixqError(f"target of {target_bytes:,} bytes ({target_bytes * 8 / n_params:.3f} bpw) is below the "
                        f"smallest reachable size {least:,} bytes ({least * 8 / n_params:.3f} bpw); raise the target "
                        f"or measure lower --levels")
    res = solve_mck(costs, dmgs, target_bytes - fixed, buckets=buckets)
    choices = {n: items[n][j][0] for n, j in zip(names, res.choice)}
    damages = {n: items[n][j][2] for n, j in zip(names, res.choice)}
    alloc = Allocation(model, target_bytes, fixed + res.cost, n_params, res.damage, res.lower_bound, choices, damages)
    alloc.text = recipe_text(alloc, measurement, measurement_path, items)
    _check_roundtrip(alloc, prep)
    return alloc


def _has_builtin(name: str) -> bool:

    try:
        return name in builtin_recipes()
    except Exception:  # noqa: BLE001
        return False


def _check_roundtrip(alloc: Allocation, prep) -> None:
    """The written recipe, planned like convert plans it, must give exactly the predicted bytes."""

    dtype = prep.plan.tensors[0].dtype if prep.store_dtype is not None and prep.plan.tensors else None
    plan = plan_model([i for i, _ in prep.items], parse_recipe(alloc.text, "<plan>"), prep.config, dtype=dtype)
    if plan.total_bytes != alloc.total_bytes:
        raise MixqError(f"internal: planned recipe sizes to {plan.total_bytes} bytes, predicted {alloc.total_bytes}")
    for t in plan.tensors:
        want = alloc.choices.get(t.name, "absent")
        got = (t.spec.bits, t.spec.group_size) if t.spec else None
        if want != "absent" and want != got:
            raise MixqError(f"internal: tensor {t.name} planned as {got}, chosen {want}")


def _fmt_spec(c) -> str:
    return "keep" if c is None else f"{c[0]}-bit g{c[1]}"


def recipe_text(alloc: Allocation, measurement: dict, measurement_path, items) -> str:
    """The allocation as an ordinary recipe TOML: one exact rule per tensor, its damage in a comment."""
    from collections import Counter

    bpw = alloc.bits_per_weight
    counts = Counter(c for c in alloc.choices.values())
    summary = ", ".join(f"{_fmt_spec(c)}: {n}" for c, n in counts.most_common())
    lines = [
        f"# Written by `mixq plan` for {alloc.model}: per-tensor bits chosen to minimise the summed measured",
        "# damage (KL divergence when that tensor alone is quantized) under the size budget.",
        f"# target: {alloc.target_bytes:,} bytes ({alloc.target_bytes * 8 / alloc.total_params:.4f} bpw)",
        f"# planned size: {alloc.total_bytes:,} bytes = {bpw:.4f} bits per weight (scales, biases and kept "
        "tensors included)",
        f"# predicted KLD (sum of the per-tensor damages, additive model): {alloc.predicted_kld:.6g}",
        f"#   (lower bound for any allocation at this size, Lagrangian: {alloc.lower_bound:.6g})",
        f"# measurement: {measurement_path or '?'} (method {measurement.get('method', '?')}, "
        f"calibration {measurement.get('calib', {}).get('file', '?')}, "
        f"{_tokens_used(measurement)} tokens)"
        + ("; damages per tensor and group size fitted to c / (2^bits - 1)^2" if measurement.get("method") == "fisher"
           else ""),
        f"# tensors: {summary}",
        "",
        "[recipe]",
        f'name = "plan-{_slug(alloc.model)}-{bpw:.2f}bpw"',
        f'description = "mixq plan: measured sensitivity, {bpw:.2f} bpw, predicted KLD {alloc.predicted_kld:.4g}"',
        "keep = true  # default for anything not named below (every quantizable tensor has its own rule)",
        "",
    ]
    for name, c in alloc.choices.items():
        path = name[: -len(".weight")] if name.endswith(".weight") else name
        alts = ", ".join(f"{_fmt_spec(o[0])}={o[2]:.3g}" for o in sorted(items[name], key=lambda o: -o[1])
                         if o[0] is not None and o[0] != c)
        lines.append(f"[[rule]]  # damage {alloc.damages[name]:.4g} at {_fmt_spec(c)}; others: {alts}")
        lines.append(f'pattern = "{path}"')
        if c is None:
            lines.append("keep = true")
        else:
            lines.append(f"bits = {c[0]}")
            lines.append(f"group_size = {c[1]}")
        lines.append("")
    return "\n".join(lines)


def _tokens_used(measurement: dict):
    cal = measurement.get("calib", {})
    if measurement.get("method") == "fisher" and not measurement.get("complete", True) and "ctx" in cal:
        done = measurement.get("windows_done", 0)
        return f"{done * (cal['ctx'] - 1)} of {cal.get('scored_tokens', '?')} (incomplete)"
    return cal.get("scored_tokens", "?")


def _slug(s: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(s).rstrip("/").rsplit("/", 1)[-1]) or "model"


def default_measurement_path(model: str) -> Path:

    return Path(cache_dir()) / "measurements" / f"{_slug(model)}.json"


def add_arguments(p) -> None:
    p.add_argument("model", help="the model to plan for (HF folder, .gguf, embedded name)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--target-bpw", type=float, help="bits per weight of the whole model (as plan-show reports)")
    g.add_argument("--target-size", help="size of the converted model, e.g. 1.2GB, 800MB, 512MiB")
    p.add_argument("--measurement", help="measurement file from `mixq measure` (default: measure now, with its "
                                         "defaults, into the cache, resuming if interrupted)")
    p.add_argument("--no-keep", action="store_true", help="never keep a quantizable tensor unquantized")
    p.add_argument("-o", "--output", required=True, help="recipe TOML to write")


def cli(args) -> int:

    if args.measurement:
        mpath = Path(args.measurement)
        meas = load_measurement(mpath)
    else:
        mpath = default_measurement_path(args.model)
        meas = measure(args.model, out=mpath, resume=True)
    target_bytes = parse_size(args.target_size) if args.target_size else None
    alloc = allocate(args.model, meas, target_bpw=args.target_bpw, target_bytes=target_bytes,
                     allow_keep=not args.no_keep, measurement_path=str(mpath))
    out = Path(args.output)
    write_atomic(out, alloc.text)
    print(f"{out}: {alloc.total_bytes / 1e6:.2f} MB, {alloc.bits_per_weight:.4f} bpw, "
          f"predicted KLD {alloc.predicted_kld:.5g} (bound {alloc.lower_bound:.5g})")
    return 0

"""`mixq plan`: allocate each tensor's bits and group size to minimise measured damage under a size budget.

The allocation is a multiple-choice knapsack: every quantizable tensor takes exactly one option
(a measured candidate spec: affine `(bits, group_size)` or a float mode, mxfp4 / nvfp4 / mxfp8; or
*keep*), each with a size in bytes and a damage (the KL
divergence measured by `mixq measure` when that tensor alone is quantized so). We minimise the
summed damage subject to the total size <= budget. The result is written as an ordinary recipe.

Sizes are those of the recipe's per-tensor plan (`quant.plan.plan_model`, via `Prepared.plan_with`) at
one storage dtype (`--dtype`, default: what `mixq convert` uses for the source), which the recipe
records (`dtype = ...`): the size in its header is the size of every artifact made from it, converted
(`mixq convert`) or applied on the fly (`MODEL@RECIPE`), to the byte.

Solver (`solve_mck`): an exact dynamic programme over a discretised budget. Sizes above each
tensor's smallest option are rounded *up* to whole buckets and the free budget *down*, so any
solution the DP finds fits the budget in real bytes; a final repair pass then spends the real bytes
the rounding left over on the best remaining upgrades. A Lagrangian relaxation gives a lower bound
on the optimum, so the reported gap bounds how far from optimal the answer can be.
"""

from __future__ import annotations

import itertools
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mixq.errors import MixqError
from mixq.eval.engine import add_device_arguments, device_options, peak_memory_line
from mixq.io.files import cache_dir, sha256_file, write_atomic
from mixq.quant.plan import Plan
from mixq.quant.prepare import DTYPES, prepare
from mixq.quant.recipe import keep_recipe, parse_recipe, uniform_recipe
from mixq.quant.spec import Spec
from mixq.tune.calib import CalibConfig, add_calib_arguments, calib_config
from mixq.tune.measure import QUANT_METHODS, REVISION, load_measurement, measure, measurement_damages, parse_key

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


def _dual(costs, damages, budget: int, lam: float) -> float:
    """The Lagrangian dual at lambda: sum_i min_j (d_ij + lambda c_ij) - lambda B."""
    return sum(float(np.min(d + lam * c)) for c, d in zip(costs, damages)) - lam * budget


def lagrangian_bound(costs, damages, budget: int) -> float:
    """max over lambda >= 0 of  sum_i min_j (d_ij + lambda c_ij) - lambda B  (a lower bound on the optimum)."""
    # The dual is concave piecewise linear; its breakpoints are slopes between options.
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
        k = int(np.argmax([_dual(costs, damages, budget, x) for x in grid]))
        lo, hi = grid[max(k - 1, 0)], grid[min(k + 1, len(grid) - 1)]
        cands = cands[(cands >= lo) & (cands <= hi)]
        if len(cands) > 4000:
            cands = cands[np.linspace(0, len(cands) - 1, 4000).astype(int)]
    return max(_dual(costs, damages, budget, x) for x in cands)


def _dp_pick(pc, pd, q: int, nb: int) -> list[int]:
    """Exact DP over `nb` buckets of `q` bytes (extra costs `pc` rounded up to whole buckets): the option
    per item minimising the summed damage `pd`."""
    n = len(pc)
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
    pick = [0] * n
    b = nb
    for i in range(n - 1, -1, -1):
        j = int(choice[i, b])
        pick[i] = j
        b -= -(-int(pc[i][j]) // q)
    return pick


def _repair(pc, pd, pick: list[int], free: int) -> int:
    """Spend the real bytes the bucket rounding left over on the best upgrades (damage saved, largest
    first), in place; returns the number of upgrades."""
    spent = sum(int(pc[i][j]) for i, j in enumerate(pick))
    upgrades = 0
    while True:
        slack = free - spent
        best, best_gain = None, 0.0
        for i, j0 in enumerate(pick):
            ok = (pc[i] - pc[i][j0] <= slack) & (pd[i][j0] - pd[i] > 1e-300)
            if ok.any():
                score = np.where(ok, pd[i][j0] - pd[i], -np.inf)
                j = int(np.argmax(score))
                if score[j] > best_gain:
                    best, best_gain = (i, j), float(score[j])
        if best is None:
            return upgrades
        i, j = best
        spent += int(pc[i][j] - pc[i][pick[i]])
        pick[i] = j
        upgrades += 1


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
    pick = _dp_pick(pc, pd, q, nb)
    upgrades = _repair(pc, pd, pick, free)
    orig = [int(keep[i][pick[i]]) for i in range(n)]
    cost = int(sum(int(costs[i][orig[i]]) for i in range(n)))
    dmg = float(sum(float(damages[i][orig[i]]) for i in range(n)))
    assert cost <= budget
    return MCKResult(orig, cost, dmg, lagrangian_bound(costs, damages, budget), int(nb),
                     {"bucket_bytes": q, "repair_upgrades": upgrades})


# ---------------------------------------------------------------------------------------------
# From a measurement to a recipe


@dataclass
class Allocation:
    """One option per measured tensor, the recipe TOML that writes it down, and that recipe's plan."""
    model: str
    target_bytes: int
    predicted_kld: float       # sum of the chosen options' measured damages (additive model)
    lower_bound: float         # Lagrangian bound: no allocation under this budget predicts less
    choices: dict              # tensor name -> Spec or None (keep)
    damages: dict              # tensor name -> damage of the chosen option
    plan: Plan                 # the recipe's per-tensor plan: what convert writes and MODEL@RECIPE applies
    text: str = ""             # the recipe TOML

    @property
    def dtype(self) -> str | None:
        """The storage dtype the recipe records (None: each tensor as in the source)."""
        return self.plan.recipe.dtype

    @property
    def total_bytes(self) -> int:
        return self.plan.total_bytes

    @property
    def total_params(self) -> int:
        return self.plan.total_params

    @property
    def bits_per_weight(self) -> float:
        return self.plan.bits_per_weight


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(s: str) -> int:
    """'1.2GB' -> 1200000000 bytes (KB/MB/GB are powers of 1000, KiB/MiB/GiB of 1024)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(s))
    if not m or m.group(2).lower() not in _UNITS:
        raise MixqError(f"size {s!r} not understood: write e.g. 1.2GB, 800MB or 512MiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _options(prep, measurement: dict, allow_keep: bool):
    """Per measured tensor: [(spec or None, bytes, damage)], plus the fixed bytes of everything else and
    the model's parameter count; every size from the plans at the prepared storage dtype."""
    keep_plan = prep.plan_with(keep_recipe())
    keep_bytes = {t.name: t.nbytes for t in keep_plan.tensors}
    sized: dict[Spec, dict] = {}
    for key in measurement["candidates"]:
        c = parse_key(key)
        sized[c] = {t.name: t.nbytes for t in prep.plan_with(uniform_recipe(c.bits, c.group_size, c.mode)).quantized
                    if t.spec == c}
    damages = measurement_damages(measurement)
    items, fixed = {}, 0
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


def check_target(target_bpw: float | None, target_bytes: int | None) -> None:
    """Exactly one target, and a positive one (a NaN or zero target is an error, before any measuring)."""
    if (target_bpw is None) == (target_bytes is None):
        raise MixqError("give exactly one of --target-bpw or --target-size")
    if target_bpw is not None and not (math.isfinite(target_bpw) and target_bpw > 0):
        raise MixqError(f"--target-bpw {target_bpw}: must be a positive number of bits per weight")
    if target_bytes is not None and not target_bytes > 0:
        raise MixqError(f"--target-size {target_bytes}: must be a positive size")


def allocate(model: str, measurement: dict, *, target_bpw: float | None = None, target_bytes: int | None = None,
             dtype: str | None = None, allow_keep: bool = True, buckets: int = 100_000,
             measurement_path: str | None = None, prep=None, allow_incomplete: bool = False) -> Allocation:
    """Choose one option per measured tensor, minimising summed damage with the model's size <= target.

    Sizes are counted at storage dtype `dtype` (default: the source's, as `mixq convert` stores it), or
    at `prep`'s when a `prepare(model, ...)` result is given; the recipe records that dtype."""
    check_target(target_bpw, target_bytes)
    if not measurement.get("complete", True) and not allow_incomplete:
        raise MixqError(f"measurement {measurement_path or ''} is incomplete; finish it with `mixq measure --resume`")
    quant = measurement.get("quant_method", "rtn")
    if quant != "rtn" and measurement.get("revision", 1) < REVISION:
        raise MixqError(f"measurement {measurement_path or ''} was made under {quant} by an older mixq (fitted on the "
                        f"measured windows; float modes round to nearest): re-run `mixq measure --method {quant}`")
    prep = prep or prepare(model, keep_recipe(), dtype)
    if dtype is not None and prep.dtype != dtype:
        raise ValueError(f"allocate: dtype {dtype!r} differs from the prepared storage dtype {prep.dtype!r}")
    items, fixed, n_params = _options(prep, measurement, allow_keep)
    if not items:
        raise MixqError(f"measurement {measurement_path or ''} holds no tensor of {model}: measure this model first")
    if target_bytes is None:
        target_bytes = int(math.floor(target_bpw * n_params / 8))
    names = list(items)
    costs = [np.array([o[1] for o in items[n]], dtype=np.int64) for n in names]
    least = fixed + sum(int(c.min()) for c in costs)
    if least > target_bytes:
        raise MixqError(f"target of {target_bytes:,} bytes ({target_bytes * 8 / n_params:.3f} bpw) is below the "
                        f"smallest reachable size {least:,} bytes ({least * 8 / n_params:.3f} bpw) at "
                        f"{prep.dtype or 'the stored dtypes'}; raise the target or measure lower --levels")
    res = solve_mck(costs, [np.array([o[2] for o in items[n]]) for n in names], target_bytes - fixed, buckets=buckets)
    choices = {n: items[n][j][0] for n, j in zip(names, res.choice)}
    damages = {n: items[n][j][2] for n, j in zip(names, res.choice)}
    rules = rules_text(choices, damages, items)
    method = measurement.get("quant_method", "rtn")
    plan = prep.plan_with(parse_recipe(_recipe_table("allocation", "", prep.dtype, method) + rules, "<allocation>"))
    alloc = Allocation(model, target_bytes, res.damage, res.lower_bound, choices, damages, plan)
    alloc.text = recipe_text(alloc, measurement, measurement_path, rules)
    _check_roundtrip(alloc, prep, fixed + res.cost)
    return alloc


def _check_roundtrip(alloc: Allocation, prep, solved_bytes: int) -> None:
    """The written recipe, planned like convert plans it, must give the allocation's bytes and choices."""
    recipe = parse_recipe(alloc.text, "<allocation>")
    plan = prep.plan_with(recipe)
    if recipe.dtype != prep.dtype or plan.total_bytes != alloc.total_bytes or plan.total_bytes != solved_bytes:
        raise MixqError(f"internal: the allocated recipe plans to {plan.total_bytes} bytes at {recipe.dtype}, "
                        f"allocated {solved_bytes} at {prep.dtype}")
    for t in plan.tensors:
        want = alloc.choices.get(t.name, "absent")
        got = t.spec
        if want != "absent" and want != got:
            raise MixqError(f"internal: tensor {t.name} planned as {got}, chosen {want}")


def _fmt_spec(c) -> str:
    return "keep" if c is None else str(c)


def _spec_lines(c: Spec | None) -> list[str]:
    if c is None:
        return ["keep = true"]
    if c.mode != "affine":
        return [f'mode = "{c.mode}"']
    return [f"bits = {c.bits}", f"group_size = {c.group_size}"]


def rules_text(choices: dict, damages: dict, items: dict) -> str:
    """One exact [[rule]] per allocated tensor, its damage and its alternatives' in a comment."""
    lines = []
    for name, c in choices.items():
        alts = ", ".join(f"{_fmt_spec(o[0])}={o[2]:.3g}" for o in sorted(items[name], key=lambda o: -o[1])
                         if o[0] is not None and o[0] != c)
        lines.append(f"[[rule]]  # damage {damages[name]:.4g} at {_fmt_spec(c)}; others: {alts}")
        lines.append(f'pattern = "{name.removesuffix(".weight")}"')
        lines += _spec_lines(c)
        lines.append("")
    return "\n".join(lines)


def _recipe_table(name: str, description: str, dtype: str | None, method: str = "rtn") -> str:
    lines = ["[recipe]", f'name = "{name}"', f'description = "{description}"',
             "keep = true  # default for anything not named below (every quantizable tensor has its own rule)"]
    if method != "rtn":
        lines.append(f'method = "{method}"  # the damages were measured under it: convert makes this quant')
    if dtype is not None:
        lines.append(f'dtype = "{dtype}"  # scales, biases and kept tensors: the dtype the sizes above count')
    return "\n".join(lines) + "\n\n"


def recipe_text(alloc: Allocation, measurement: dict, measurement_path, rules: str) -> str:
    """The allocation as an ordinary recipe TOML: a header with the plan's size, [recipe], the rules."""
    bpw = alloc.bits_per_weight
    counts = Counter(c for c in alloc.choices.values())
    summary = ", ".join(f"{_fmt_spec(c)}: {n}" for c, n in counts.most_common())
    stored = f"stored as {alloc.dtype}" if alloc.dtype else "each tensor stored in its source dtype"
    lines = [
        f"# Written by `mixq plan` for {alloc.model}: per-tensor bits allocated to minimise the summed measured",
        "# damage (KL divergence when that tensor alone is quantized) under the size budget.",
        f"# target: {alloc.target_bytes:,} bytes ({alloc.target_bytes * 8 / alloc.total_params:.4f} bpw)",
        f"# planned size: {alloc.total_bytes:,} bytes = {bpw:.4f} bits per weight ({stored}; scales, biases and "
        "kept tensors included)",
        "#   = the size of `mixq convert` with this recipe and of MODEL@RECIPE (unless --dtype overrides the dtype)",
        f"# predicted KLD (sum of the per-tensor damages, additive model): {alloc.predicted_kld:.6g}",
        f"#   (lower bound for any allocation at this size, Lagrangian: {alloc.lower_bound:.6g})",
        f"# measurement: {measurement_path or '?'} (method {measurement.get('method', '?')}, "
        f"quantization {measurement.get('quant_method', 'rtn')}, "
        f"calibration {measurement.get('calib', {}).get('file', '?')}, "
        f"{_tokens_used(measurement)} tokens{_method_calib_text(measurement)})"
        + ("; damages per tensor and group size fitted to c / (2^bits - 1)^2" if measurement.get("method") == "fisher"
           else ""),
        f"# tensors: {summary}",
        f"# parameters: {mix_text(alloc.plan)}",
        "",
    ]
    table = _recipe_table(f"plan-{_slug(alloc.model)}-{bpw:.2f}bpw",
                          f"mixq plan: measured sensitivity, {bpw:.2f} bpw, predicted KLD {alloc.predicted_kld:.4g}",
                          alloc.dtype, measurement.get("quant_method", "rtn"))
    return "\n".join(lines) + "\n" + table + rules


def mix_text(plan: Plan) -> str:
    """The chosen mix as shares of the parameters, largest first ("mxfp4 52.1%, 6-bit g32 30.0%, ...")."""
    by = plan.summary()["by_spec"]
    return ", ".join(f"{k} {e['share']:.1%}" for k, e in by.items())


def _method_calib_text(measurement: dict) -> str:
    """"; gptq fitted on FILE (N x L tokens, seed S)" for a measurement under a calibrated method, else ""."""
    cal = measurement.get("method_calib")
    if not cal:
        return ""
    return (f"; {measurement.get('quant_method')} fitted on {cal['file']} ({cal.get('samples_used', cal['samples'])} "
            f"x {cal['length']} tokens, seed {cal['seed']}: convert's --calib options should match)")


def _tokens_used(measurement: dict):
    cal = measurement.get("calib", {})
    if measurement.get("method") == "fisher" and not measurement.get("complete", True) and "ctx" in cal:
        done = measurement.get("windows_done", 0)
        return f"{done * (cal['ctx'] - 1)} of {cal.get('scored_tokens', '?')} (incomplete)"
    return cal.get("scored_tokens", "?")


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(s).rstrip("/").rsplit("/", 1)[-1]) or "model"


def default_measurement_path(model: str, quant: str = "rtn", calib: CalibConfig | None = None) -> Path:
    """The cache file `mixq plan` measures into: one per model, method and (gptq, awq) the calibration fitted on."""
    if quant == "rtn":
        return Path(cache_dir()) / "measurements" / f"{_slug(model)}.json"
    c = calib or CalibConfig()
    text = "" if c.file is None else "-" + sha256_file(Path(c.file).expanduser())[:12]
    name = f"{_slug(model)}-{quant}-{c.samples}x{c.length}-s{c.seed}{text}-r{REVISION}.json"
    return Path(cache_dir()) / "measurements" / name


def add_arguments(p) -> None:
    p.add_argument("model", help="the model to plan for (HF folder, .gguf, embedded name)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--target-bpw", type=float, help="bits per weight of the whole model (as plan-show reports)")
    g.add_argument("--target-size", help="size of the converted model, e.g. 1.2GB, 800MB, 512MiB")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="dtype of scales, biases and kept tensors the sizes count, recorded in the recipe "
                        "(default: the source's, as `mixq convert` stores it)")
    p.add_argument("--measurement", help="measurement file from `mixq measure` (default: measure now, with its "
                                         "defaults, into the cache, resuming if interrupted)")
    p.add_argument("--no-keep", action="store_true", help="never keep a quantizable tensor unquantized")
    p.add_argument("--method", choices=QUANT_METHODS, default=None,
                   help="quantization method the plan is for: damages measured under it (a --measurement must have "
                        "been measured so; default: the measurement's, rtn when measuring now) and the recipe says it")
    add_calib_arguments(p, prefix="method-", what="gptq/awq/awq+gptq calibration")
    p.add_argument("-o", "--output", required=True, help="recipe TOML to write")
    add_device_arguments(p, dtype=False)   # for measuring now (--dtype above is the storage dtype)


def cli(args) -> int:
    opts = device_options(args, dtype=False)
    check_target(args.target_bpw, parse_size(args.target_size) if args.target_size else None)
    if args.measurement:
        mpath = Path(args.measurement)
        meas = load_measurement(mpath)
        measured = meas.get("quant_method", "rtn")
        if args.method not in (None, measured):
            raise MixqError(f"--measurement {mpath} was measured under method {measured}, not {args.method}; "
                            f"run `mixq measure {args.model} --method {args.method} -o FILE` and pass that")
    else:
        quant, calib = args.method or "rtn", calib_config(args, prefix="method-")
        mpath = default_measurement_path(args.model, quant, calib)
        meas = measure(args.model, out=mpath, resume=True, device=opts.device, max_memory=opts.max_memory,
                       quant=quant, method_calib=calib)
    target_bytes = parse_size(args.target_size) if args.target_size else None
    alloc = allocate(args.model, meas, target_bpw=args.target_bpw, target_bytes=target_bytes, dtype=args.dtype,
                     allow_keep=not args.no_keep, measurement_path=str(mpath))
    out = Path(args.output)
    write_atomic(out, alloc.text)
    print(f"{out}: {alloc.total_bytes:,} bytes ({alloc.total_bytes / 1e6:.2f} MB), {alloc.bits_per_weight:.4f} bpw "
          f"stored as {alloc.dtype or 'the source dtypes'}, predicted KLD {alloc.predicted_kld:.5g} "
          f"(bound {alloc.lower_bound:.5g})")
    print(f"chosen mix (share of the parameters): {mix_text(alloc.plan)}")
    print(peak_memory_line())
    return 0

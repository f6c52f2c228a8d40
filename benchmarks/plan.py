"""Benchmark `mixq plan`: held-out KLD vs bits per weight, allocated recipes next to the named ones.

    .venv/bin/python benchmarks/plan.py --model smollm2-135m --measurement m.json -o /tmp/plan-bench
    .venv/bin/python benchmarks/plan.py --model smollm2-135m --measurement m.json --validate 16 -o ...

For each recipe (named built-ins and allocations at a sweep of targets) the unquantized model's weights
are replaced in memory by their quantize -> dequantize round trip under that recipe's plan (what
`mixq eval MODEL@RECIPE` does), and the mean per-token KL(base || quant) is measured on held-out
WikiText-2 windows taken from the *start* of wiki.test.raw (the calibration of `mixq measure` comes
from its end). Also printed: the additive model's prediction (sum of the measured per-tensor
damages for the recipe's per-tensor specs) next to the measured KLD. Every recipe is planned at one
storage dtype (--dtype, default bfloat16), so their sizes compare.

`--validate N`: direct one-tensor-at-a-time KLD at 4-bit g64 for N tensors spread over the model,
on the measurement's own calibration windows, against the measurement's (Fisher) estimate:
Spearman rank correlation and ratio spread.

Results are cached per recipe in OUT/*.json, so an interrupted run continues.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

from mixq.eval.engine import load_model  # noqa: E402
from mixq.eval.perplexity import base_dists, make_windows, token_stats  # noqa: E402
from mixq.quant.prepare import DTYPES, prepare  # noqa: E402
from mixq.quant.recipe import keep_recipe, load_recipe, parse_recipe  # noqa: E402
from mixq.threads import torch_threads  # noqa: E402
from mixq.tune.allocate import allocate  # noqa: E402
from mixq.tune.calib import tail_windows  # noqa: E402
from mixq.tune.measure import (  # noqa: E402
    Measurer,
    apply_round_trips,
    key_of,
    load_measurement,
    measurement_damages,
)

NAMED = ["q4-hi", "mixed_3_6", "mixed_4_6", "q5-hi", "qx64-hi", "qx65-hi", "q6-hi", "qx85-hi", "qx86-hi", "q8-hi"]
MORE = ["q4", "q5", "q6", "q8"]  # add with --named
TARGET_FROM = ["q4-hi", "q5-hi", "q6-hi", "qx86-hi", "q8-hi"]


_DEQ: dict = {}  # (tensor, spec) -> round trip (shared across recipes)


def additive_prediction(plan, meas) -> float | None:
    """Sum of measured damages for the plan's per-tensor specs (as `mixq plan` sees them); None if a spec
    was not measured."""
    dmg = measurement_damages(meas)
    total = 0.0
    for tp in plan.tensors:
        if tp.spec is None or tp.name not in dmg:
            continue
        d = dmg[tp.name].get(key_of(tp.spec))
        if d is None:
            return None
        total += d
    return total


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--measurement", required=True)
    ap.add_argument("--dtype", choices=DTYPES, default="bfloat16",
                    help="storage dtype of every recipe (default bfloat16)")
    ap.add_argument("--windows", type=int, default=2, help="held-out windows (default 2)")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--named", default=",".join(NAMED))
    ap.add_argument("--targets", default=None, help="bpw targets (default: the bpw of " + ",".join(TARGET_FROM) + ")")
    ap.add_argument("--validate", type=int, default=0, help="direct-vs-measurement check on N tensors")
    ap.add_argument("--report-only", action="store_true", help="report the rows cached in OUT")
    ap.add_argument("--no-allocate", action="store_true", help="evaluate the named recipes only")
    ap.add_argument("--skip-eval", action="store_true", help="only allocate (and validate), no held-out KLD")
    ap.add_argument("-o", "--out", required=True)
    return ap.parse_args()


def _read_row(path: Path) -> dict:
    row = json.loads(path.read_text())
    if "planned" in row:  # rows cached by earlier versions of this benchmark
        row["allocated"] = row.pop("planned")
    return row


def report_cached(prep, meas, out: Path, args) -> None:
    """Report every row cached in OUT; named rows get the additive prediction of this measurement."""
    rows = []
    for f in sorted(out.glob("*.json")):
        if f.name in ("results.json", "validate.json"):
            continue
        row = _read_row(f)
        if not row["allocated"]:
            row["predicted"] = additive_prediction(prep.plan_with(load_recipe(row["recipe"])), meas)
        rows.append(row)
    report(rows, out, args, meas)


def allocations(prep, meas, args) -> dict:
    """name -> Allocation at each target bpw (default: the named TARGET_FROM recipes' bpw at the dtype)."""
    if args.no_allocate:
        return {}
    if args.targets:
        targets = [float(x) for x in args.targets.split(",")]
    else:
        targets = [prep.plan_with(load_recipe(r)).bits_per_weight for r in TARGET_FROM]
    out = {}
    for t in targets:
        name = f"alloc@{t:.3f}"
        out[name] = allocate(args.model, meas, target_bpw=t, prep=prep, measurement_path=args.measurement,
                             allow_incomplete=True)
        (Path(args.out) / f"{name}.toml").write_text(out[name].text)
    return out


def evaluate_row(model, originals, windows, base, name, plan, alloc) -> dict:
    t0 = time.time()
    apply_round_trips(model, plan, originals, _DEQ)
    ts = token_stats(model, windows, base, progress=False)
    kld = float(ts.kld.mean())
    return {"recipe": name, "bpw": plan.bits_per_weight, "bytes": plan.total_bytes,
            "kld_mean": kld, "kld_se": float(ts.kld.std(ddof=1) / math.sqrt(ts.kld.size)),
            "top1": float(ts.agree.mean()), "n_tokens": int(ts.kld.size),
            "allocated": alloc is not None, "seconds": time.time() - t0,
            "predicted": alloc.predicted_kld if alloc is not None else None}


def main():
    args = parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meas = load_measurement(args.measurement)
    prep = prepare(args.model, keep_recipe(), args.dtype)
    if args.report_only:
        report_cached(prep, meas, out, args)
        return
    if not meas.get("complete", True):
        print(f"note: {args.measurement} is incomplete ({meas.get('windows_done')} windows done); using its "
              "current estimates", flush=True)
    lm = load_model(args.model, dtype="float32", progress=False)
    model = lm.model
    originals = {n: p.detach().clone() for n, p in model.named_parameters()}

    if args.validate:
        validate(model, lm.tokenizer, meas, args.validate, out)

    named = [r for r in args.named.split(",") if r and r != "none"]
    plans = {r: prep.plan_with(load_recipe(r)) for r in named}
    allocated = allocations(prep, meas, args)
    plans.update({name: prep.plan_with(parse_recipe(a.text, name)) for name, a in allocated.items()})
    if args.skip_eval:
        return

    windows = make_windows(lm.tokenizer, None, ctx=args.ctx, max_windows=args.windows)
    base = base_dists(model, windows, k=None if model.config.vocab_size <= 65536 else 256, progress=False)
    rows = []
    for name, plan in plans.items():
        cache = out / f"{name}.json"
        if cache.exists():
            row = _read_row(cache)
        else:
            row = evaluate_row(model, originals, windows, base, name, plan, allocated.get(name))
            cache.write_text(json.dumps(row))
        if not row["allocated"]:
            row["predicted"] = additive_prediction(plan, meas)
        rows.append(row)
        predicted = row["predicted"] if row["predicted"] is None else round(row["predicted"], 5)
        print(f"{row['recipe']:>14}  bpw {row['bpw']:.3f}  KLD {row['kld_mean']:.5f} ± {row['kld_se']:.5f}  "
              f"top1 {row['top1']:.3f}  predicted {predicted}", flush=True)
    report(rows, out, args, meas)


def report(rows, out, args, meas):
    rows = sorted(rows, key=lambda r: r["bpw"])
    named = [r for r in rows if not r["allocated"]]
    allocated = [r for r in rows if r["allocated"]]

    def allocated_at(bpw):
        """Allocated KLD at `bpw` by linear interpolation in log KLD between the allocated points."""
        pts = sorted((r["bpw"], r["kld_mean"]) for r in allocated)
        if not pts or bpw < pts[0][0] - 1e-9:
            return None
        for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
            if x0 - 1e-9 <= bpw <= x1 + 1e-9:
                f = 0 if x1 == x0 else (bpw - x0) / (x1 - x0)
                return math.exp(math.log(y0) * (1 - f) + math.log(y1) * f)
        return pts[-1][1] if bpw >= pts[-1][0] else None

    lines = [f"# mixq plan benchmark: {args.model}", "",
             f"held-out: {rows[0]['n_tokens']} tokens (first {args.windows} x {args.ctx}-token windows of "
             f"wiki.test.raw); measurement: {args.measurement} ({meas.get('method')}, "
             f"{meas.get('calib', {}).get('scored_tokens')} calibration tokens from the end of the file)", "",
             "| recipe | bpw | mean KLD ± SE | top-1 | predicted (additive) | allocated KLD at this bpw "
             "| vs allocated |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        p = None if r["allocated"] else allocated_at(r["bpw"])
        rel = "" if p is None else f"{(p / r['kld_mean'] - 1) * 100:+.0f}%"
        pred = "" if r["predicted"] is None else f"{r['predicted']:.5f}"
        lines.append(f"| {r['recipe']} | {r['bpw']:.3f} | {r['kld_mean']:.5f} ± {r['kld_se']:.5f} | {r['top1']:.3f} "
                     f"| {pred} | {'' if p is None else f'{p:.5f}'} | {rel} |")
    checks = []
    for ref, need in (("qx86-hi", 0.25), ("q6-hi", 0.0)):
        r = next((x for x in named if x["recipe"] == ref), None)
        p = allocated_at(r["bpw"]) if r else None
        if r and p:
            ok = p <= r["kld_mean"] * (1 - need)
            checks.append(f"- at {ref}'s {r['bpw']:.3f} bpw: allocated {p:.5f} vs {r['kld_mean']:.5f} "
                          f"({(p / r['kld_mean'] - 1) * 100:+.1f}%; target {'-' if need else '<'}"
                          f"{need * 100:.0f}%{' or better' if need else ''}): {'MET' if ok else 'MISSED'}")
    worse = [r["recipe"] for r in named
             if allocated_at(r["bpw"]) is not None and allocated_at(r["bpw"]) > r["kld_mean"]]
    checks.append(f"- allocated curve on or below every named recipe: "
                  f"{'MET' if not worse else 'MISSED (above: ' + ', '.join(worse) + ')'}")
    lines += ["", "Targets:", *checks]
    text = "\n".join(lines)
    (out / "report.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    print(text)


def validate(model, tokenizer, meas, n, out):
    """Direct KLD at 4-bit g64 for n tensors vs the measurement's estimate: rank agreement."""
    cache = out / "validate.json"
    done = json.loads(cache.read_text()) if cache.exists() else {}
    names = sorted(meas["tensors"])
    step = len(names) / n
    pick = [names[int(i * step + step / 2)] for i in range(n)]
    cal = meas["calib"]
    windows, _ = tail_windows(tokenizer, cal["file"], n_tokens=cal["n_windows"] * cal["ctx"], ctx=cal["ctx"])
    m = Measurer(model, windows.ids, full_vocab=True)
    for name in pick:
        if name in done:
            continue
        t0 = time.time()
        d, _ = m.damage(name, getattr(torch, meas["tensors"][name]["dtype"]), 4, 64)
        done[name] = {"direct": d, "estimate": meas["tensors"][name]["damage"]["4:64"], "seconds": time.time() - t0}
        cache.write_text(json.dumps(done, indent=1))
        print(f"validate {name}: direct {d:.4g}  estimate {done[name]['estimate']:.4g}", flush=True)
    sm = measurement_damages(meas) if meas.get("method") == "fisher" else None
    a = [done[k]["direct"] for k in pick]
    b = [meas["tensors"][k]["damage"]["4:64"] for k in pick]
    rho = spearmanr(a, b).statistic
    if sm:
        rho_s = spearmanr(a, [sm[k]["4:64"] for k in pick]).statistic
        print(f"validation: smoothed estimates: Spearman rho {rho_s:.3f}", flush=True)
    ratios = sorted(y / x for x, y in zip(a, b) if x > 0)
    print(f"validation: {len(pick)} tensors at 4-bit g64, Spearman rho {rho:.3f}, estimate/direct ratio "
          f"median {ratios[len(ratios) // 2]:.2f} (range {ratios[0]:.2f}-{ratios[-1]:.2f})", flush=True)


if __name__ == "__main__":
    with torch_threads():
        main()

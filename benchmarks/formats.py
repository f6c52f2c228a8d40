"""Benchmark MLX's quantization formats (issue 14): KLD, top-1 agreement and bits per weight of the float
modes next to affine recipes, and `mixq plan` with the modes among its candidates vs without.

    .venv/bin/python benchmarks/formats.py -o /tmp/formats [--models smollm2-135m,gemma3-270m]
        [--recipes mxfp4,nvfp4,mxfp8,q4-hi,q8-hi,qx86-mx,qx86-hi] [--windows 2] [--ctx 512]
        [--plan smollm2-135m] [--targets 4.5,6.5]
        [--keep-quant smollm2-135m-gguf,gemma3-270m-gguf] [--scale-dtypes float32,float16,bfloat16]
        [--requant RECIPE]
        [--report-only]

Named recipes: for each model, the unquantized model's weights are replaced in memory by their
quantize -> dequantize round trip under the recipe's plan (what `mixq eval MODEL@RECIPE` computes:
affine dequantized in the stored dtype, the float modes in bfloat16, which holds them exactly), and
KL(base || quant) and top-1 agreement are measured per token on held-out WikiText-2 windows from the
*start* of wiki.test.raw (exact KL for vocabularies up to 65536, else over the base's top 256 logits,
a lower bound). Every recipe is planned at one storage dtype (--dtype, default bfloat16), so sizes
compare; bits per weight are whole-model (scales, biases and kept tensors included).

Planned recipes (--plan MODEL): `mixq measure` (Fisher, its defaults: affine 3/4/5/6/8 bits x group
32/64 plus mxfp4, nvfp4, mxfp8) into OUT/MODEL.measure.json, then `mixq plan` at each --targets bpw
twice from that one measurement: with every candidate, and with the float modes' candidates removed
(affine only). The chosen mix of each is printed.

GGUF kept as it is (--keep-quant MODELS, embedded *-gguf names): `mixq import NAME --keep-quant` at each
--scale-dtypes into OUT/kept-*, each folder loaded by the engine (dequantized as mlx does, in the scales' dtype)
and compared with the raw GGUF's dequantized float32 import: KL, top-1, bits per weight next to the GGUF's own.

Rows are cached in OUT/*.json, so an interrupted run continues; --report-only prints what is cached.
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

import numpy as np  # noqa: E402

from mixq.eval.engine import load_model  # noqa: E402
from mixq.eval.perplexity import base_dists, make_windows, token_stats  # noqa: E402
from mixq.quant.prepare import DTYPES, prepare  # noqa: E402
from mixq.quant.recipe import keep_recipe, load_recipe, parse_recipe  # noqa: E402
from mixq.threads import available_cores, torch_threads  # noqa: E402
from mixq.tune.allocate import allocate, mix_text  # noqa: E402
from mixq.tune.measure import apply_round_trips, load_measurement, measure, parse_key  # noqa: E402

RECIPES = ["mxfp4", "nvfp4", "mxfp8", "q4-hi", "q8-hi", "qx86-mx", "qx86-hi"]


def evaluate(model, originals, windows, base, plan) -> dict:
    t0 = time.time()
    apply_round_trips(model, plan, originals)
    ts = token_stats(model, windows, base, progress=False)
    n = ts.kld.size
    return {"bpw": plan.bits_per_weight, "bpw_quantized": plan.bits_per_weight_quantized if plan.quantized else None,
            "bytes": plan.total_bytes, "kld_mean": float(ts.kld.mean()),
            "kld_se": float(ts.kld.std(ddof=1) / math.sqrt(n)), "kld_p99": float(np.quantile(ts.kld, 0.99)),
            "top1": float(ts.agree.mean()), "top1_se": float(ts.agree.std(ddof=1) / math.sqrt(n)),
            "n_tokens": int(n), "mix": mix_text(plan), "seconds": time.time() - t0}


def without_modes(meas: dict) -> dict:
    """The same measurement with the float modes' candidates removed (affine only)."""
    affine = [k for k in meas["candidates"] if parse_key(k).mode == "affine"]
    tensors = {n: {**r, "damage": {k: v for k, v in r["damage"].items() if k in affine}}
               for n, r in meas["tensors"].items()}
    return {**meas, "candidates": affine, "tensors": tensors}


def planned_recipes(model: str, prep, out: Path, targets, tokens: int) -> dict:
    """name -> recipe text: `mixq plan` at each target, with the modes and affine only."""
    mfile = out / f"{model}.measure.json"
    meas = load_measurement(mfile) if mfile.exists() and load_measurement(mfile).get("complete") else \
        measure(model, out=mfile, resume=mfile.exists(), tokens=tokens, progress=True)
    recipes = {}
    for t in targets:
        for label, m in (("modes", meas), ("affine", without_modes(meas))):
            name = f"plan-{label}@{t:g}"
            f = out / f"{model}.{name}.toml"
            if not f.exists():
                a = allocate(model, m, target_bpw=t, prep=prep, measurement_path=str(mfile))
                f.write_text(a.text)
            recipes[name] = f.read_text()
    return recipes


def run_model(model: str, args, out: Path) -> list[dict]:
    prep = prepare(model, keep_recipe(), args.dtype)
    plans = {r: prep.plan_with(load_recipe(r)) for r in args.recipes.split(",") if r}
    if model in args.plan.split(","):
        for name, text in planned_recipes(model, prep, out, [float(x) for x in args.targets.split(",")],
                                          args.tokens).items():
            plans[name] = prep.plan_with(parse_recipe(text, name, name))
    todo = [r for r in plans if not (out / f"{model}.{r}.json").exists()]
    rows = []
    if todo:
        lm = load_model(model, dtype="float32", progress=False)
        originals = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
        windows = make_windows(lm.tokenizer, None, ctx=args.ctx, max_windows=args.windows)
        vocab = lm.model.config.vocab_size
        base = base_dists(lm.model, windows, k=None if vocab <= 65536 else 256, progress=False)
    for name, plan in plans.items():
        cache = out / f"{model}.{name}.json"
        if cache.exists():
            row = json.loads(cache.read_text())
        else:
            row = {"model": model, "recipe": name, **evaluate(lm.model, originals, windows, base, plan)}
            cache.write_text(json.dumps(row))
        rows.append(row)
        print(f"{model:>14} {name:>16}  bpw {row['bpw']:.3f}  KLD {row['kld_mean']:.5f} ± {row['kld_se']:.5f}  "
              f"top1 {row['top1']:.3f}  [{row['mix']}]", flush=True)
    return rows


def keep_quant_rows(model: str, args, out: Path) -> list[dict]:
    """The --keep-quant imports of `model` at each scale dtype against the raw GGUF (its float32 import)."""
    from mixq.quant.artifact import read_artifact
    from mixq.quant.convert import convert
    from mixq.quant.gguf_quants import SOURCE_RECIPE, gguf_bits_per_weight
    from mixq.sources import embedded

    g_bytes, g_params = gguf_bits_per_weight(embedded.fetch_gguf(model))
    rows, base = [], None
    for sd in args.scale_dtypes.split(","):
        name = f"keep-quant-{sd}" + (f"-requant-{args.requant}" if args.requant else "")
        cache = out / f"{model}.{name}.json"
        if cache.exists():
            row = json.loads(cache.read_text())
        else:
            if base is None:
                lm = load_model(model, dtype="float32", progress=False)
                windows = make_windows(lm.tokenizer, None, ctx=args.ctx, max_windows=args.windows)
                vocab = lm.model.config.vocab_size
                base = base_dists(lm.model, windows, k=None if vocab <= 65536 else 256, progress=False)
                del lm
            folder = out / f"kept-{model}-{name}"
            t0 = time.time()
            if not folder.exists():
                convert(model, folder, SOURCE_RECIPE, scale_dtype=sd, requant=args.requant, progress=False)
            art = read_artifact(folder)
            ts = token_stats(load_model(str(folder), dtype="float32", progress=False).model, windows, base,
                             progress=False)
            n = ts.kld.size
            kept = json.loads((folder / "mixq_provenance.json").read_text())["tensors"]
            requant = sorted({t["reason"].split()[1] for t in kept if "re-quantized" in t["reason"]})
            row = {"model": model, "recipe": name, "bpw": 8 * art.size_bytes / art.n_params, "bpw_quantized": None,
                   "bytes": art.size_bytes, "gguf_bpw": 8 * g_bytes / g_params,
                   "kld_mean": float(ts.kld.mean()), "kld_se": float(ts.kld.std(ddof=1) / math.sqrt(n)),
                   "kld_p99": float(np.quantile(ts.kld, 0.99)), "top1": float(ts.agree.mean()),
                   "top1_se": float(ts.agree.std(ddof=1) / math.sqrt(n)), "n_tokens": int(n),
                   "mix": f"vs raw GGUF ({8 * g_bytes / g_params:.3f} bpw); re-quantized: "
                          f"{', '.join(requant) or 'none'}", "seconds": time.time() - t0}
            cache.write_text(json.dumps(row))
        rows.append(row)
        print(f"{model:>18} {name:>22}  bpw {row['bpw']:.3f} (GGUF {row['gguf_bpw']:.3f})  KLD {row['kld_mean']:.3g}"
              f" ± {row['kld_se']:.2g}  top1 {row['top1']:.4f}  [{row['mix']}]", flush=True)
    return rows


def report(rows, out: Path, args) -> None:
    lines = ["# mixq formats benchmark", "",
             f"held-out: first {args.windows} x {args.ctx}-token windows of wiki.test.raw; storage dtype "
             f"{args.dtype}; bpw over the whole model (scales, biases, kept tensors included)", ""]
    for model in dict.fromkeys(r["model"] for r in rows):
        lines += [f"## {model}", "",
                  "| recipe | bpw | mean KLD ± SE | KLD p99 | top-1 ± SE | mix (share of parameters) |",
                  "|---|---|---|---|---|---|"]
        for r in sorted((r for r in rows if r["model"] == model), key=lambda r: r["bpw"]):
            lines.append(f"| {r['recipe']} | {r['bpw']:.3f} | {r['kld_mean']:.5f} ± {r['kld_se']:.5f} | "
                         f"{r['kld_p99']:.4f} | {r['top1']:.3f} ± {r['top1_se']:.3f} | {r['mix']} |")
        lines.append("")
    text = "\n".join(lines)
    (out / "report.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    print(text)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="storage dtype of every recipe")
    ap.add_argument("--windows", type=int, default=2, help="held-out windows (default 2)")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--plan", default="", help="models to run `mixq plan` on, with and without the modes")
    ap.add_argument("--targets", default="4.5,6.5", help="bits per weight of the planned recipes")
    ap.add_argument("--tokens", type=int, default=1024, help="calibration tokens of the measurement")
    ap.add_argument("--keep-quant", default="", help="embedded *-gguf models to import with --keep-quant")
    ap.add_argument("--scale-dtypes", default="float32,float16,bfloat16",
                    help="scale dtypes of the --keep-quant imports")
    ap.add_argument("--requant", default=None, help="recipe for the GGUF types with no exact MLX form")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("-o", "--out", required=True)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        rows = [json.loads(f.read_text()) for f in sorted(out.glob("*.json"))
                if f.name != "results.json" and not f.name.endswith(".measure.json")]
        report(rows, out, args)
        return
    rows = []
    with torch_threads(available_cores(), at_most=True):
        for model in filter(None, args.models.split(",")):
            rows += run_model(model, args, out)
        for model in filter(None, args.keep_quant.split(",")):
            rows += keep_quant_rows(model, args, out)
    report(rows, out, args)


if __name__ == "__main__":
    main()

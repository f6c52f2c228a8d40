"""Benchmark the quantization methods (issue 13): mean KLD, KLD p99, top-1 agreement and ppl per recipe x method.

    .venv/bin/python benchmarks/methods.py -o /tmp/methods [--models smollm2-135m] [--recipes q4-hi q3-hi plan@4.5]
        [--methods rtn awq gptq awq+gptq gptq+noclip dwq gptq+dwq] [--calib-samples 32 --calib-len 512] [--windows 64]
        [--texts wikitext tasks] [--threads 1]
        [--dwq-steps 64 --dwq-lr 3e-5 --dwq-batch 4]

Each (model, recipe, method) is converted with `mixq convert --method` (tune/methods.py) into OUT/folders/,
then evaluated with `mixq eval FOLDER --tasks kld,ppl --base MODEL` on eval's default WikiText-2 windows
(the first 64 x 512 tokens of wiki.test.raw); the calibration windows are drawn after them (tune/calib.py),
so no evaluated token was seen in calibration. A recipe `plan@BPW` is planned as `mixq plan --target-bpw BPW`
plans it, on a measurement (`mixq measure`, its defaults: the end of WikiText-2, after the calibration windows)
made under the method used (the method less dwq: gptq for gptq and gptq+dwq, rtn for rtn and dwq; fitted on this run's
calibration windows, not on the measured ones):
OUT/plans/MODEL-QUANT.json (resumable) and OUT/plans/MODEL-plan@BPW-QUANT.toml, then converted with the method.
Runs are kept in OUT/runs/ and reused: a finished row is not redone, so an interrupted benchmark continues
where it stopped. Each row's timings (wall and CPU seconds of measure + plan, convert, eval; this process's peak
RSS so far) go to OUT/timings/NAME.json, the row to OUT/rows/NAME.json; the table of every row finished in OUT
(OUT/methods.md: KLD per method and recipe, then every measure; OUT/methods.json) is rewritten after every row
(`--table`: only that).
`--texts tasks` also evaluates on a non-Wikipedia text (OUT/tasks.txt, `task_text`: HellaSwag contexts with their
gold endings (ActivityNet / WikiHow) and PIQA goals with their gold solutions (instructables)), in OUT/runs-tasks/.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mixq.eval.evaluate import DEFAULT_WINDOWS, evaluate  # noqa: E402
from mixq.eval.runs import read_results  # noqa: E402
from mixq.io.files import write_atomic  # noqa: E402
from mixq.quant.recipe import DWQ_METHODS, METHODS  # noqa: E402
from mixq.tune.calib import CalibConfig  # noqa: E402
from mixq.tune.dwq import DEFAULT_BATCH, DEFAULT_LR, DEFAULT_STEPS, DwqConfig  # noqa: E402
from mixq.tune.methods import convert  # noqa: E402

OPTIONS = ("clip", "noclip", "nohead", "act")
PLAN = "plan@"


def task_text(path: Path, hellaswag: int = 1500, piqa: int = 800) -> Path:
    """A plain text of task passages (no Wikipedia): HellaSwag ctx + gold ending, PIQA goal + gold solution."""
    from mixq.eval.data import load_split
    from mixq.eval.tasks import hellaswag_clean

    if not path.is_file():
        hs, _ = load_split("hellaswag", progress=False)
        pq, _ = load_split("piqa", progress=False)
        parts = [hellaswag_clean(r["ctx"] + " " + r["endings"][int(r["label"])]) for r in hs[:hellaswag]]
        parts += [r["goal"] + " " + (r["sol1"] if int(r["label"]) == 0 else r["sol2"]) for r in pq[:piqa]]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(parts))
    return path


@contextmanager
def timed(timings: dict, key: str):
    """Record the block's wall and CPU seconds (this process, user + system) under `timings[key]`."""
    t0, c0 = time.perf_counter(), _cpu()
    yield
    timings[key] = {"wall": round(time.perf_counter() - t0, 1), "cpu": round(_cpu() - c0, 1)}


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def _peak_rss_mb() -> float:
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def measured_quant(method: str) -> str:
    """The quantization a plan for `method` is measured under: a dwq method's start (dwq tunes the quant it starts
    from; measure knows rtn, gptq, awq and awq+gptq), else the method itself."""
    return DWQ_METHODS.get(method, method)


def split_method(method: str) -> tuple[str, list[str]]:
    """(the convert method, the OPTIONS) of a benchmark method such as "gptq+noclip+nohead"."""
    parts = method.split("+")
    return "+".join(p for p in parts if p not in OPTIONS), [p for p in parts if p in OPTIONS]


def planned_recipe(model: str, recipe: str, quant: str, out: Path, timings: dict, calib: CalibConfig) -> str:
    """The recipe file for `plan@BPW` measured under `quant` (gptq/awq with the calibration `calib` convert uses;
    measured and planned once, then reused)."""
    from mixq.tune.allocate import allocate
    from mixq.tune.measure import measure

    bpw = float(recipe[len(PLAN):])
    path = out / "plans" / f"{model}-{recipe}-{quant}.toml"
    if path.is_file():
        return str(path)
    mpath = out / "plans" / f"{model}-{quant}.json"
    with timed(timings, "measure"):
        meas = measure(model, out=mpath, resume=True, quant=quant, method_calib=calib)
    with timed(timings, "plan"):
        alloc = allocate(model, meas, target_bpw=bpw, measurement_path=str(mpath))
        write_atomic(path, alloc.text)
    return str(path)


def run_one(model: str, recipe: str, method: str, calib: CalibConfig, windows: int, out: Path,
            text: str = "wikitext", threads: int = 1, dwq: DwqConfig | None = None) -> dict:
    """Convert (unless already done) and evaluate (unless already done) one combination; its row.

    `method`: rtn, gptq (the output head included, convert's default), awq, awq+gptq, dwq, gptq+dwq, awq+dwq,
    awq+gptq+dwq (`dwq`: their steps, learning rate, batch), or one of those with options:
    +noclip (gptq without its per-group range search, `--no-gptq-clip`; +clip: with it, the default), +nohead
    (the head left round-to-nearest, `--no-gptq-head`), +act (gptq's
    act-order with static groups, `--gptq-act-order`). `recipe`: a recipe name or file, or plan@BPW."""
    base_method, opts = split_method(method)
    label = Path(recipe).stem if recipe.endswith(".toml") else recipe   # a recipe file: its name, not its path
    name = f"{model}-{label}-{method.replace('+', '_')}"
    folder, run = out / "folders" / name, out / ("runs" if text == "wikitext" else f"runs-{text}") / name
    tfile = out / "timings" / f"{name}{'' if text == 'wikitext' else '-' + text}.json"
    ppl_file = None if text == "wikitext" else str(task_text(out / "tasks.txt"))
    timings = json.loads(tfile.read_text()) if tfile.is_file() else {}
    done = (run / "results.json").is_file() and read_results(run).get("complete")
    if not done:
        if not (folder / "mixq_provenance.json").is_file():
            src = planned_recipe(model, recipe, measured_quant(base_method), out, timings, calib) \
                if recipe.startswith(PLAN) else recipe
            with timed(timings, "convert"):
                clip = False if "noclip" in opts else True if "clip" in opts else None   # None: convert's default
                convert(model, folder, src, method=base_method, calib=calib, force=True, clip=clip,
                        head="nohead" not in opts, act_order="act" in opts, dwq=dwq)
        with timed(timings, "eval"):
            evaluate(str(folder), ["kld", "ppl"], str(run), base=model, windows=windows, force=True,
                     ppl_file=ppl_file, threads=threads)
        timings.update(threads=threads, peak_rss_mb=_peak_rss_mb(), load=os.getloadavg()[0])
        write_atomic(tfile, json.dumps(timings, indent=2))
    r = read_results(run)
    k = r["kld"]
    prov = json.loads((folder / "mixq_provenance.json").read_text())
    row = {"model": model, "recipe": recipe, "method": method, "text": text, "bits_per_weight": r["bits_per_weight"],
            "kld_mean": k["kld_mean"], "kld_mean_stderr": k["kld_mean_stderr"], "kld_p99": k["kld_p99"],
            "top1": k["top1_agreement"], "ppl": r["ppl"]["ppl"], "ppl_base": k["ppl_base"],
            "n_tokens": k["n_tokens"], "timings": timings,
            "calibration": {key: prov.get("calibration", {}).get(key)
                            for key in ("samples", "length", "seed", "first_token", "seconds", "dwq")}}
    write_atomic(out / "rows" / tfile.name, json.dumps(row, indent=2))
    return row


def all_rows(out: Path) -> list[dict]:
    """Every row run_one has finished in `out` (OUT/rows/), by model, text, recipe (most bits per weight first),
    then method."""
    rows = [json.loads(f.read_text()) for f in sorted((out / "rows").glob("*.json"))]
    return sorted(rows, key=lambda r: (r["model"], r["text"] != "wikitext", -round(r["bits_per_weight"], 2),
                                       r["recipe"], r["method"] != "rtn"))


def _secs(t: dict | None) -> str:
    return f"{t['wall']:.0f} / {t['cpu']:.0f}" if t else ""


def table(rows: list[dict]) -> str:
    head = ("| model | text | recipe | method | bpw | mean KLD (± se) | vs rtn | KLD p99 | top-1 | ppl (base) "
            "| convert s (wall / CPU) |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    rtn = {(r["model"], r["text"], r["recipe"]): r["kld_mean"] for r in rows if r["method"] == "rtn"}
    lines = [head]
    for r in rows:
        base = rtn.get((r["model"], r["text"], r["recipe"]))
        rel = f"{100 * (r['kld_mean'] / base - 1):+.1f}%" if base and r["method"] != "rtn" else ""
        lines.append(f"| {r['model']} | {r['text']} | {r['recipe']} | {r['method']} | {r['bits_per_weight']:.3f} | "
                     f"{r['kld_mean']:.5f} ± {r['kld_mean_stderr']:.5f} | {rel} | {r['kld_p99']:.4f} | "
                     f"{r['top1']:.4f} | {r['ppl']:.3f} ({r['ppl_base']:.3f}) | "
                     f"{_secs(r['timings'].get('convert'))} |")
    return "\n".join(lines)


def pivot(rows: list[dict]) -> str:
    """Mean KLD per (model, text, recipe) with one column per method, each with its change vs rtn's."""
    rank = {m: i for i, m in enumerate(METHODS)}
    methods = sorted({r["method"] for r in rows}, key=lambda m: (rank.get(split_method(m)[0], len(METHODS)), m))
    cells: dict = {}
    for r in rows:
        cells.setdefault((r["model"], r["text"], r["recipe"]), {})[r["method"]] = r["kld_mean"]
    lines = ["| model | text | recipe | " + " | ".join(methods) + " |", "|" + " --- |" * (3 + len(methods))]
    for (model, text, recipe), by in cells.items():
        base = by.get("rtn")
        vals = ["" if m not in by else f"{by[m]:.4g}" if m == "rtn" or not base
                else f"{by[m]:.4g} ({100 * (by[m] / base - 1):+.1f}%)" for m in methods]
        lines.append(f"| {model} | {text} | {recipe} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def write_table(rows: list[dict], out: Path) -> str:
    md = pivot(rows) + "\n\n" + table(rows)
    write_atomic(out / "methods.md", md + "\n")
    write_atomic(out / "methods.json", json.dumps(rows, indent=2))
    return md


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-o", "--out", required=True, help="work folder (converted folders, runs, timings, table)")
    p.add_argument("--models", nargs="+", default=["smollm2-135m"])
    p.add_argument("--recipes", nargs="+", default=["q4-hi", "q3-hi"],
                   help="recipe names or files, or plan@BPW (planned at BPW bits per weight under the method)")
    p.add_argument("--methods", nargs="+", default=["rtn", "gptq"],
                   help="rtn, gptq, awq, awq+gptq, dwq, gptq+dwq, awq+dwq, awq+gptq+dwq, each with +noclip, "
                        "+nohead and/or +act (e.g. gptq+noclip+nohead)")
    p.add_argument("--calib", default=None)
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-len", type=int, default=512)
    p.add_argument("--calib-seed", type=int, default=0)
    p.add_argument("--windows", type=int, default=DEFAULT_WINDOWS, help="eval windows of 512 tokens (default 64)")
    p.add_argument("--texts", nargs="+", choices=("wikitext", "tasks"), default=["wikitext"],
                   help="evaluation texts: WikiText-2 test (its first windows, before the calibration part) "
                        "and/or task passages")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a shared machine)")
    p.add_argument("--dwq-steps", type=int, default=DEFAULT_STEPS)
    p.add_argument("--dwq-lr", type=float, default=DEFAULT_LR)
    p.add_argument("--dwq-batch", type=int, default=DEFAULT_BATCH)
    p.add_argument("--table", action="store_true", help="run nothing: write and print the table of every row "
                                                          "finished in OUT")
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    out = Path(a.out)
    calib = CalibConfig(a.calib, a.calib_samples, a.calib_len, a.calib_seed)
    dwq = DwqConfig(a.dwq_steps, a.dwq_lr, a.dwq_batch)
    for model in ([] if a.table else a.models):
        for recipe in a.recipes:
            for text in a.texts:
                for method in a.methods:
                    row = run_one(model, recipe, method, calib, a.windows, out, text, a.threads, dwq)
                    print(json.dumps(row), flush=True)
                    write_table(all_rows(out), out)
    print(write_table(all_rows(out), out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

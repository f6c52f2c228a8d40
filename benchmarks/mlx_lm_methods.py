"""mlx-lm's own GPTQ and AWQ beside mixq's methods (issue 13): same model, same calibration text, same evaluation.

    .venv/bin/python benchmarks/mlx_lm_methods.py -o /tmp/methods [--models smollm2-135m] [--methods gptq awq]
        [--bits 4 --group-size 32] [--calib-samples 32 --calib-len 512] [--windows 16] [--texts wikitext tasks]

mlx-lm reads its calibration text from `~/.cache/mlx-lm/calibration_v5.txt` and draws random non-overlapping
windows from it (`mlx_lm.quant.utils.load_data`). This script writes there the text mixq calibrates on: the default
WikiText-2 test file minus the tokens eval's default ppl/KLD windows read (`tune.calib.eval_tokens`), decoded back
from the model's tokens, so neither tool calibrates on an evaluated token. A file already there is moved aside and put
back afterwards. Then, per model:
  - `python -m mlx_lm.quant.gptq --bits B --group-size G --fallback-bits B --fallback-group-size G` (every linear and
    the embedding at B bits group G, as mixq's uniform recipe `qB-hi` for G = 32);
  - `python -m mlx_lm awq --bits B --group-size G --embed-bits B --embed-group-size G`;
each into OUT/folders/MODEL-mlx_lm_METHOD, run with `LD_PRELOAD=libopenblas.so.0` when Debian's libopenblas0-pthread
is installed (mlx's reference BLAS is ~30x slower on Linux), and evaluated exactly as benchmarks/methods.py evaluates
mixq's folders (`mixq eval --tasks kld,ppl --base MODEL`, the same windows and texts). The RTN row of the same recipe
is made by benchmarks/methods.py (`run_one`) for the "vs rtn" column. The table goes to OUT/mlx_lm.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from methods import run_one, table, task_text  # noqa: E402

from mixq.eval.evaluate import evaluate  # noqa: E402
from mixq.eval.perplexity import default_text_file, tokenize_file  # noqa: E402
from mixq.eval.runs import read_results  # noqa: E402
from mixq.io.files import sha256_file  # noqa: E402
from mixq.sources.resolve import resolve  # noqa: E402
from mixq.tune.calib import CalibConfig, eval_tokens  # noqa: E402

MLX_CALIB = Path.home() / ".cache/mlx-lm/calibration_v5.txt"
OPENBLAS = "/usr/lib/x86_64-linux-gnu/libopenblas.so.0"


def calibration_text(folder: Path, out: Path) -> Path:
    """mixq's default calibration text (WikiText-2 test after eval's windows) as plain text, in this model's tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    path = default_text_file()
    ids = tokenize_file(tok, path)[eval_tokens(path):]
    text = out / f"calib-{folder.name}.txt"
    text.write_text(tok.decode(ids.tolist()))
    return text


def mlx_lm_command(method: str, src: Path, dest: Path, bits: int, group: int, samples: int, length: int) -> list[str]:
    if method == "gptq":
        return [sys.executable, "-m", "mlx_lm.quant.gptq", "--model", str(src), "--mlx-path", str(dest),
                "--bits", str(bits), "--group-size", str(group), "--fallback-bits", str(bits),
                "--fallback-group-size", str(group), "--num-samples", str(samples), "--sequence-length", str(length)]
    return [sys.executable, "-m", "mlx_lm", "awq", "--model", str(src), "--mlx-path", str(dest),
            "--bits", str(bits), "--group-size", str(group), "--embed-bits", str(bits),
            "--embed-group-size", str(group), "--num-samples", str(samples), "--sequence-length", str(length)]


def run_mlx_lm(cmd: list[str], dest: Path, log: Path) -> dict:
    """Run one mlx-lm quantization (unless its folder exists); its timings (wall and CPU seconds of the child, its
    peak RSS: the largest child of this process so far)."""
    if (dest / "config.json").is_file():
        done = dest.parent / f"{dest.name}.timings.json"
        return json.loads(done.read_text()) if done.is_file() else {}
    env = dict(os.environ)
    if Path(OPENBLAS).is_file():
        env["LD_PRELOAD"] = OPENBLAS
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [tmp.as_posix() if c == str(dest) else c for c in cmd]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    with open(log, "w") as f:
        subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    tmp.rename(dest)
    timings = {"convert": {"wall": round(time.time() - t0, 1),
                           "cpu": round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 1)},
               "convert_peak_rss_mb": round(after.ru_maxrss / 1024, 1), "load": os.getloadavg()[0]}
    (dest.parent / f"{dest.name}.timings.json").write_text(json.dumps(timings, indent=2))
    return timings


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-o", "--out", required=True, help="work folder (shared with benchmarks/methods.py is fine)")
    p.add_argument("--models", nargs="+", default=["smollm2-135m"])
    p.add_argument("--methods", nargs="+", choices=("gptq", "awq"), default=["gptq", "awq"])
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-len", type=int, default=512)
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--texts", nargs="+", choices=("wikitext", "tasks"), default=["wikitext", "tasks"])
    a = p.parse_args(argv)
    out = Path(a.out)
    (out / "folders").mkdir(parents=True, exist_ok=True)
    recipe = f"q{a.bits}-hi" if a.group_size == 32 else f"q{a.bits}"
    calib = CalibConfig(None, a.calib_samples, a.calib_len, 0)
    saved = MLX_CALIB.with_name(MLX_CALIB.name + ".mixq-saved")
    if MLX_CALIB.is_file() and not saved.exists():
        MLX_CALIB.rename(saved)
    rows = []
    try:
        for model in a.models:
            src = resolve(model).path
            text = calibration_text(src, out)
            MLX_CALIB.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(text, MLX_CALIB)
            for method in a.methods:
                name = f"{model}-mlx_lm_{method}-b{a.bits}g{a.group_size}-n{a.calib_samples}x{a.calib_len}"
                dest = out / "folders" / name
                cmd = mlx_lm_command(method, src, dest, a.bits, a.group_size, a.calib_samples, a.calib_len)
                timings = run_mlx_lm(cmd, dest, out / f"{name}.log")
                for txt in a.texts:
                    rows.append(run_one(model, recipe, "rtn", calib, a.windows, out, txt))
                    run = out / ("runs" if txt == "wikitext" else f"runs-{txt}") / name
                    if not (run / "results.json").is_file() or not read_results(run).get("complete"):
                        ppl_file = None if txt == "wikitext" else str(task_text(out / "tasks.txt"))
                        evaluate(str(dest), ["kld", "ppl"], str(run), base=model, windows=a.windows, force=True,
                                 ppl_file=ppl_file, threads=1)
                    r = read_results(run)
                    k = r["kld"]
                    rows.append({"model": model, "recipe": recipe, "method": f"mlx_lm.{method}", "text": txt,
                                 "bits_per_weight": r["bits_per_weight"], "kld_mean": k["kld_mean"],
                                 "kld_mean_stderr": k["kld_mean_stderr"], "kld_p99": k["kld_p99"],
                                 "top1": k["top1_agreement"], "ppl": r["ppl"]["ppl"], "ppl_base": k["ppl_base"],
                                 "n_tokens": k["n_tokens"], "timings": timings,
                                 "calibration": {"file_sha256": sha256_file(text), "samples": a.calib_samples,
                                                 "length": a.calib_len, "drawn_by": "mlx_lm.quant.utils.load_data"}})
                    print(json.dumps(rows[-1]), flush=True)
    finally:
        if saved.exists():
            saved.replace(MLX_CALIB)
        else:
            MLX_CALIB.unlink(missing_ok=True)
    rows = list({(r["model"], r["text"], r["method"]): r for r in rows}.values())
    rows.sort(key=lambda r: (r["model"], r["text"], r["method"] != "rtn", r["method"]))
    md = table(rows)
    print(md)
    (out / "mlx_lm.md").write_text(md + "\n")
    (out / "mlx_lm.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Scale: eval peak memory and wall time of the dense engine vs packed weights, side by side.

    .venv/bin/python benchmarks/scale.py eval [--model smollm2-135m] [--recipes q6-hi,qx86-hi]
        [--engines dense,packed,auto] [--repeats 3] [--threads 1] [--out /tmp/mixq-scale]

Each recipe is converted once (`mixq convert`, into OUT/models); then every (recipe, workload, engine)
runs `mixq eval` in a fresh process, the repeats interleaved (round robin, so a noisy neighbour on a
shared machine hits every engine alike). Workloads: `--tasks arc_easy --limit 50` and `--tasks ppl
--windows 4` (the issue's). Engines:

* dense: every weight dequantized at load (`load_model(packed=False)`, the engine before packed weights);
* packed: `--max-memory 0`, eval's default (weights stay as the folder stores them, dequantized just in time
  per module);
* auto: `--max-memory auto` (dense copies made once while the weights fit half the memory available).

Prints, per row, the median and range over the repeats of the process's peak RSS (results.json
`peak_memory_bytes`), of eval's wall time (results.json `seconds`: loading included, interpreter start
excluded) and of the process's CPU time (user + system, interpreter start included: it hardly depends on the
machine's other load), their ratio to the dense engine, and whether every document's record (samples.jsonl) and the
perplexity equal the dense engine's.

    .venv/bin/python benchmarks/scale.py gpt-oss [--layers 24] [--recipe qx86-hi] [--out /tmp/mixq-gpt-oss]

A synthetic checkpoint with gpt-oss-20b's configuration and tensor layout (hidden 2880, 32 experts top-4,
64 heads of 64, 8 KV heads, vocabulary 201088, untied head; random weights stored as the real checkpoint
stores them: MXFP4 expert `_blocks`/`_scales` as uint8, everything else bfloat16; ~13 GB at 24 layers), with
`--layers N` to run it small (the tokenizer is a small byte-level BPE: the embedding keeps its 201088 rows).
Then `mixq convert --recipe RECIPE`, `mixq eval --tasks ppl --windows 4` and `mixq eval --tasks arc_easy
--limit 20` of the converted folder, each in its own process: wall time (interpreter start included), peak
RSS, tokens/s. Random weights: only time and memory mean anything. Not a test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PEAK = "PEAK_RSS"
WORKLOADS = {"arc_easy": ["--tasks", "arc_easy", "--limit", "50"], "ppl": ["--tasks", "ppl", "--windows", "4"]}
ENGINES = {"dense": [], "packed": ["--max-memory", "0"], "auto": ["--max-memory", "auto"]}


def worker(argv: list[str]) -> int:
    """`mixq ARGV[1:]` in this process, then its peak RSS on stderr; engine ARGV[0] "dense" first makes eval
    load with packed=False."""
    engine, argv = argv[0], argv[1:]
    from mixq.cli import main
    from mixq.eval import evaluate
    from mixq.eval.engine import peak_memory

    if engine == "dense":
        evaluate.load_model = partial(evaluate.load_model, packed=False)
    code = main(argv)
    print(f"{PEAK} {peak_memory()['rss']}", file=sys.stderr)
    return code


def _cli(engine: str, argv: list) -> tuple[float, int, float]:
    """(wall seconds, peak RSS bytes, CPU seconds) of `mixq ARGV` in a fresh process (interpreter start included).
    CPU time (user + system) hardly depends on what else the machine runs; wall time does."""
    t0, c0 = time.perf_counter(), _child_cpu()
    p = subprocess.run([sys.executable, __file__, "worker", engine, *map(str, argv)], capture_output=True, text=True)
    secs, cpu = time.perf_counter() - t0, _child_cpu() - c0
    if p.returncode != 0:
        raise SystemExit(f"mixq {' '.join(map(str, argv))} failed:\n{p.stderr[-2000:]}")
    rss = [int(line.split()[1]) for line in p.stderr.splitlines() if line.startswith(PEAK)]
    return secs, rss[-1], cpu


def _child_cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _convert(model: str, recipe: str, out: Path) -> Path:
    """MODEL converted under RECIPE (once), in a process of its own: this one stays small, since every eval it
    starts reports a peak RSS (ru_maxrss) that counts the starting process's resident memory too (Linux keeps
    the high-water mark across exec)."""
    folder = out / "models" / f"{model}-{recipe}"
    if not (folder / "config.json").exists():
        _cli("-", ["convert", model, folder, "--recipe", recipe])
    return folder


def _run(engine: str, folder: Path, workload: str, run_dir: Path, threads: int) -> dict:
    _, _, cpu = _cli(engine, ["eval", folder, *WORKLOADS[workload], *ENGINES[engine], "--device", "cpu", "--threads",
                              threads, "-o", run_dir, "--force"])
    results = json.loads((run_dir / "results.json").read_text())
    samples = (run_dir / "samples.jsonl").read_text() if (run_dir / "samples.jsonl").exists() else ""
    docs = [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in samples.splitlines()]
    return {"rss": results["peak_memory_bytes"]["rss"], "seconds": results["seconds"], "cpu": cpu,
            "weights": results.get("weights_bytes", 0), "docs": docs, "ppl": results.get("ppl", {}).get("ppl")}


def _spread(xs: list[float], fmt: str) -> str:
    return f"{fmt.format(statistics.median(xs))} ({fmt.format(min(xs))}-{fmt.format(max(xs))})"


def bench_eval(args) -> None:
    out = Path(args.out)
    engines = args.engines.split(",")
    folders = {r: _convert(args.model, r, out) for r in args.recipes.split(",")}
    runs: dict[tuple, list[dict]] = {}
    for i in range(args.repeats):
        for recipe, folder in folders.items():
            for workload in WORKLOADS:
                for engine in engines:
                    r = _run(engine, folder, workload, out / "runs" / f"{recipe}-{workload}-{engine}", args.threads)
                    runs.setdefault((recipe, workload, engine), []).append(r)
                    print(f"  run {i + 1}: {recipe:8s} {workload:8s} {engine:8s} {r['rss'] / 1e6:7.0f} MB "
                          f"{r['seconds']:6.1f} s {r['cpu']:6.1f} s CPU", file=sys.stderr, flush=True)
    print(f"\n{args.model}, --device cpu --threads {args.threads}, {args.repeats} runs each: median (min-max)")
    print(f"{'recipe':8s} {'workload':8s} {'engine':7s} {'peak RSS MB':>17s} {'x dense':>7s} {'weights MB':>10s} "
          f"{'wall s':>17s} {'x dense':>7s} {'CPU s':>17s} {'x dense':>7s}  same docs")
    for (recipe, workload, engine), rs in runs.items():
        ref = runs.get((recipe, workload, "dense"), rs)
        cols = []
        for key, scale, fmt in (("rss", 1e6, "{:.0f}"), ("seconds", 1, "{:.1f}"), ("cpu", 1, "{:.1f}")):
            xs, x0 = [r[key] / scale for r in rs], statistics.median(r[key] / scale for r in ref)
            cols.append(f"{_spread(xs, fmt):>17s} {statistics.median(xs) / x0:7.2f}")
            if key == "rss":
                cols.append(f"{rs[0]['weights'] / 1e6:10.1f}")
        same = all(r["docs"] == ref[0]["docs"] and r["ppl"] == ref[0]["ppl"] for r in rs)
        print(f"{recipe:8s} {workload:8s} {engine:7s} {' '.join(cols)}  {'yes' if same else 'NO'}")


# ---------------------------------------------------------------- the gpt-oss-20b-shaped checkpoint

GPT_OSS_20B = {  # openai/gpt-oss-20b config.json (num_hidden_layers and layer_types cut to --layers)
    "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "attention_bias": True,
    "attention_dropout": 0.0, "eos_token_id": 200002, "pad_token_id": 199999, "experts_per_token": 4,
    "head_dim": 64, "hidden_act": "silu", "hidden_size": 2880, "initial_context_length": 4096,
    "initializer_range": 0.02, "intermediate_size": 2880, "max_position_embeddings": 131072,
    "num_attention_heads": 64, "num_experts_per_tok": 4, "num_hidden_layers": 24, "num_key_value_heads": 8,
    "num_local_experts": 32, "output_router_logits": False, "rms_norm_eps": 1e-05,
    "quantization_config": {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                       "model.embed_tokens", "lm_head"], "quant_method": "mxfp4"},
    "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "original_max_position_embeddings": 4096,
                     "rope_type": "yarn", "truncate": False},
    "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128, "swiglu_limit": 7.0,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 201088,
}
ROWS = 4096  # rows generated at a time


def gpt_oss_entries(cfg: dict) -> list[tuple[str, tuple, object]]:
    """(name, shape, dtype) of every tensor, as openai/gpt-oss-20b's safetensors store them."""
    import torch

    bf, u8 = torch.bfloat16, torch.uint8
    h, v, e, i = cfg["hidden_size"], cfg["vocab_size"], cfg["num_local_experts"], cfg["intermediate_size"]
    q, kv = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    out = [("model.embed_tokens.weight", (v, h), bf), ("lm_head.weight", (v, h), bf), ("model.norm.weight", (h,), bf)]
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}"
        out += [(f"{p}.input_layernorm.weight", (h,), bf), (f"{p}.post_attention_layernorm.weight", (h,), bf),
                (f"{p}.self_attn.q_proj.weight", (q, h), bf), (f"{p}.self_attn.q_proj.bias", (q,), bf),
                (f"{p}.self_attn.k_proj.weight", (kv, h), bf), (f"{p}.self_attn.k_proj.bias", (kv,), bf),
                (f"{p}.self_attn.v_proj.weight", (kv, h), bf), (f"{p}.self_attn.v_proj.bias", (kv,), bf),
                (f"{p}.self_attn.o_proj.weight", (h, q), bf), (f"{p}.self_attn.o_proj.bias", (h,), bf),
                (f"{p}.self_attn.sinks", (cfg["num_attention_heads"],), bf),
                (f"{p}.mlp.router.weight", (e, h), bf), (f"{p}.mlp.router.bias", (e,), bf),
                (f"{p}.mlp.experts.gate_up_proj_blocks", (e, 2 * i, h // 32, 16), u8),
                (f"{p}.mlp.experts.gate_up_proj_scales", (e, 2 * i, h // 32), u8),
                (f"{p}.mlp.experts.gate_up_proj_bias", (e, 2 * i), bf),
                (f"{p}.mlp.experts.down_proj_blocks", (e, h, i // 32, 16), u8),
                (f"{p}.mlp.experts.down_proj_scales", (e, h, i // 32), u8),
                (f"{p}.mlp.experts.down_proj_bias", (e, h), bf)]
    return out


def _random_rows(name: str, shape: tuple, dtype, seed: int):
    """Row blocks of a random tensor: weights N(0, 0.02), norms about 1, biases and sinks small; MXFP4 blocks any
    byte (two E2M1 codes), scales exponents 2^-9..2^-3 (biased by 127)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    for a in range(0, shape[0], ROWS):
        rows = (min(ROWS, shape[0] - a), *shape[1:])
        if name.endswith("_blocks"):
            yield torch.randint(0, 256, rows, generator=g, dtype=torch.uint8)
        elif name.endswith("_scales"):
            yield torch.randint(118, 125, rows, generator=g, dtype=torch.uint8)
        elif "norm" in name:
            yield (1 + 0.05 * torch.randn(rows, generator=g)).to(dtype)
        else:
            yield (0.02 * torch.randn(rows, generator=g)).to(dtype)


def write_gpt_oss(out: Path, layers: int) -> Path:
    """The synthetic gpt-oss-20b-shaped HF folder (reused when it is there with the same layer count)."""
    from mixq.io.safetensors import write_sharded

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import write_tokenizer  # a small byte-level BPE tokenizer with a chat template

    kinds = ["sliding_attention", "full_attention"]
    cfg = {**GPT_OSS_20B, "num_hidden_layers": layers, "layer_types": [kinds[n % 2] for n in range(layers)]}
    if (out / "config.json").exists() and json.loads((out / "config.json").read_text()) == cfg:
        return out
    out.mkdir(parents=True, exist_ok=True)
    entries = gpt_oss_entries(cfg)
    seeds = {name: k for k, (name, _, _) in enumerate(entries)}
    shapes = {name: (shape, dtype) for name, shape, dtype in entries}
    write_sharded(out, entries, lambda name: _random_rows(name, *shapes[name], seeds[name]), progress=True,
                  desc="write synthetic gpt-oss")
    write_tokenizer(out)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def bench_gpt_oss(args) -> None:
    out = Path(args.out)
    t0 = time.perf_counter()
    src = write_gpt_oss(out / f"src-{args.layers}l", args.layers)
    write_s = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    dst = out / f"{args.recipe}-{args.layers}l"
    rows = [("convert", *_cli("-", ["convert", src, dst, "--recipe", args.recipe, "--force"])[:2], "")]
    qsize = sum(f.stat().st_size for f in dst.glob("*.safetensors"))
    for name, extra in (("eval ppl --windows 4", ["--tasks", "ppl", "--windows", "4"]),
                        ("eval arc_easy --limit 20", ["--tasks", "arc_easy", "--limit", "20"])):
        run = out / "runs" / name.split()[1]
        secs, rss, _ = _cli("-", ["eval", dst, *extra, "--device", "cpu", "-o", run, "--force"])
        res = json.loads((run / "results.json").read_text())
        if "ppl" in res:
            tps = f"{res['ppl']['n_tokens'] / res['ppl']['seconds']:.1f} tokens/s (scored)"
        else:
            t = res["tasks"]["arc_easy"]
            tps = f"{t['n'] / t['seconds']:.2f} docs/s"
        rows.append((name, secs, rss, tps))
    print(f"\nsynthetic gpt-oss-20b shape, {args.layers} of 24 layers: source {size / 1e9:.2f} GB (written in "
          f"{write_s:.0f} s), {args.recipe} {qsize / 1e9:.2f} GB")
    print(f"{'step':26s} {'wall s':>8s} {'peak RSS GB':>12s}  speed")
    for name, secs, rss, tps in rows:
        print(f"{name:26s} {secs:8.1f} {rss / 1e9:12.2f}  {tps or ''}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        sys.exit(worker(sys.argv[2:]))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="bench", required=True)
    e = sub.add_parser("eval", help="eval peak memory and wall time: dense engine vs packed weights")
    e.add_argument("--model", default="smollm2-135m")
    e.add_argument("--recipes", default="q6-hi,qx86-hi")
    e.add_argument("--engines", default=",".join(ENGINES))
    e.add_argument("--repeats", type=int, default=3)
    e.add_argument("--threads", type=int, default=1, help="torch threads per eval (default 1: a shared machine)")
    e.add_argument("--out", default="/tmp/mixq-scale")
    g = sub.add_parser("gpt-oss", help="the synthetic gpt-oss-20b-shaped checkpoint: convert and eval")
    g.add_argument("--layers", type=int, default=24, help="decoder layers (24: the real model; fewer: faster)")
    g.add_argument("--recipe", default="qx86-hi")
    g.add_argument("--out", default="/tmp/mixq-gpt-oss")
    args = ap.parse_args()
    (bench_eval if args.bench == "eval" else bench_gpt_oss)(args)


if __name__ == "__main__":
    main()

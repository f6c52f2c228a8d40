"""Generation speed: prompt processing and generation tokens/s per variant and backend.

    .venv/bin/python benchmarks/generate.py [--model smollm2-135m] [--variants bf16,q6-hi,qx86-hi]
        [--backends torch,mlx] [--prompt-tokens 512] [--gen-tokens 128] [--mlx-prompt-tokens 128]
        [--mlx-gen-tokens 32]

torch: `mixq.load("MODEL@VARIANT", backend="torch", max_memory=...)` for each `--max-memory` (GB; `auto`:
generation's default, dense copies of the quantized weights while they fit half the available memory, so every
variant runs at the same speed; `0`: every quantized weight packed: affine 4-bit linear layers multiply by their
4-bit weights (torch's CPU int4 kernel, bfloat16 activations), the others are dequantized per forward: the memory
floor and what decoding costs without a dense cache); the table shows the memory each holds and the path each spec
takes (`mixq.eval.packed.weight_paths`). mlx: each variant is
converted once with `mixq convert` (into the cache) and run by mixq's mlx backend and by mlx_lm's own
`stream_generate` on the same folder. On Linux the mlx wheel is a slow CPU reference build, so the
mlx rows use fewer tokens by default; on Apple silicon pass the full counts.

The prompt is the first N tokens of WikiText-2 test (plain text, no chat template); generation is
greedy with end-of-sequence disabled so every run produces exactly the requested tokens.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mixq.errors import MixqError
from mixq.eval.engine import parse_memory
from mixq.eval.packed import path_lines, weight_paths
from mixq.eval.perplexity import default_text_file
from mixq.infer.generate import MlxSession, TorchSession, load, param_bytes, peak_rss_gb
from mixq.io.files import cache_dir
from mixq.threads import torch_threads


def prompt_tokens(tokenizer, n: int) -> list[int]:
    from mixq.infer.generate import hf_tokenizer

    try:
        text = default_text_file().read_text()[:20000]   # $MIXQ_WIKITEXT, else the shared copy near the project
    except MixqError:
        text = "The quick brown fox jumps over the lazy dog. " * 400
    ids = hf_tokenizer(tokenizer).encode(text, add_special_tokens=False)
    if len(ids) < n:
        raise SystemExit(f"prompt text too short for {n} tokens")
    return list(ids[:n])


def run_session(session, ids: list[int], n_gen: int) -> dict:
    """One measured run: prompt tokens/s and generation tokens/s (EOS disabled)."""
    session.reset()
    last = None
    for r in session.stream(ids, max_tokens=n_gen):
        last = r
    assert last.generation_tokens == n_gen, (last.generation_tokens, last.finish_reason)
    return dict(prompt_tps=last.prompt_tps, gen_tps=last.generation_tps)


def run_mlx_lm(model, tokenizer, ids: list[int], n_gen: int) -> dict:
    """mlx_lm's own stream_generate on the same model (the reference)."""
    import mlx.core as mx
    from mlx_lm import stream_generate

    last = None
    for r in stream_generate(model, tokenizer, mx.array(ids), max_tokens=n_gen):
        last = r
    return dict(prompt_tps=last.prompt_tps, gen_tps=last.generation_tps)


def best(fn, repeats: int) -> dict:
    runs = [fn() for _ in range(repeats)]
    return {k: max(r[k] for r in runs) for k in runs[0]}


def mlx_bytes(model) -> int:
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def converted(model: str, variant: str, folder: Path) -> Path:
    from mixq.quant.convert import convert

    out = folder / f"{model}-{variant}"
    if not (out / "config.json").is_file():
        print(f"converting {model} -> {out} ({variant})", file=sys.stderr)
        convert(model, out, recipe=variant, dtype="bfloat16" if variant == "bf16" else None, force=True)
    return out


def folder_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.glob("*.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--variants", default="bf16,q6-hi,qx86-hi")
    ap.add_argument("--backends", default="torch,mlx")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--mlx-prompt-tokens", type=int, default=None, help="default: 128 on Linux, else --prompt-tokens")
    ap.add_argument("--mlx-gen-tokens", type=int, default=None, help="default: 32 on Linux, else --gen-tokens")
    ap.add_argument("--dtype", default="float32", help="torch compute dtype")
    ap.add_argument("--threads", default=None,
                    help="torch thread counts to try, e.g. 1,2 (default: torch's own); on a loaded machine "
                         "one thread can be many times faster for decoding than two")
    ap.add_argument("--max-memory", default="auto",
                    help="torch: weight memory budgets to try, GB or auto, e.g. auto,0 (0: all packed)")
    ap.add_argument("--repeats", type=int, default=2, help="runs per row; the best is reported")
    ap.add_argument("--folders", type=Path, default=None, help="where converted mlx folders go (default: cache)")
    args = ap.parse_args()

    import torch

    from mixq.infer.generate import native_mlx

    variants = args.variants.split(",")
    backends = args.backends.split(",")
    native = native_mlx()
    mlx_p = args.mlx_prompt_tokens or (args.prompt_tokens if native else 128)
    mlx_g = args.mlx_gen_tokens or (args.gen_tokens if native else 32)
    folders = args.folders or cache_dir() / "bench"
    rows = []
    print(f"# {args.model}: {platform.machine()} {sys.platform}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), load average {os.getloadavg()[0]:.1f}", file=sys.stderr)

    if "torch" in backends:
        threads = [int(t) for t in args.threads.split(",")] if args.threads else [torch.get_num_threads()]
        for v, budget in ((v, b) for v in variants for b in args.max_memory.split(",")):
            ref = args.model if v == "bf16" else f"{args.model}@{v}"
            model, tok = load(ref, backend="torch", dtype=args.dtype, max_memory=parse_memory(budget))
            ids = prompt_tokens(tok, args.prompt_tokens)
            s = TorchSession(model, tok)
            s.eos = set()
            for n_threads in threads:
                with torch_threads(n_threads):
                    run_session(s, ids[:16], 4)  # warm-up
                    r = best(partial(run_session, s, ids, args.gen_tokens), args.repeats)
                rows.append(dict(backend=f"torch {args.dtype}, {n_threads} thread(s), --max-memory {budget}",
                                 variant=v, engine="mixq", p=args.prompt_tokens, g=args.gen_tokens,
                                 mem=param_bytes(model), size=model.mixq_info.size_bytes,
                                 paths="; ".join(path_lines(weight_paths(model))) or "dense", **r))
                print(rows[-1], file=sys.stderr)
            del model, s

    if "mlx" in backends:
        import mlx_lm

        for v in variants:
            folder = converted(args.model, v, folders)
            model, tok = load(folder, backend="mlx")
            ids = prompt_tokens(tok, mlx_p)
            s = MlxSession(model, tok)
            eos = tok.eos_token_ids
            tok.eos_token_ids = set()  # exactly the requested number of tokens, for both engines
            try:
                run_session(s, ids[:16], 2)  # warm-up
                ours = best(partial(run_session, s, ids, mlx_g), args.repeats)
                theirs = best(partial(run_mlx_lm, model, tok, ids, mlx_g), args.repeats)
            finally:
                tok.eos_token_ids = eos
            for engine, r in (("mixq", ours), ("mlx_lm", theirs)):
                rows.append(dict(backend="mlx" + ("" if native else " (Linux CPU reference build)"), variant=v,
                                 engine=engine, paths="mlx quantized matmul", p=mlx_p, g=mlx_g, mem=mlx_bytes(model),
                                 size=folder_bytes(folder), **r))
                print(rows[-1], file=sys.stderr)
            del model
        print(f"(mlx_lm {mlx_lm.__version__})", file=sys.stderr)

    print(f"\n{args.model}: prompt processing and generation speed (best of {args.repeats})\n")
    print("| backend | variant | engine | prompt tok | prompt tok/s | gen tok | gen tok/s | weights in memory "
          "| size on disk | weight paths |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['backend']} | {r['variant']} | {r['engine']} | {r['p']} | {r['prompt_tps']:.1f} | {r['g']} | "
              f"{r['gen_tps']:.1f} | {r['mem'] / 1e6:.0f} MB | {r['size'] / 1e6:.0f} MB | {r['paths']} |")
    print(f"\npeak RSS of this process: {peak_rss_gb():.2f} GB; load average now {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()

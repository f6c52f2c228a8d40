"""mixq convert vs mlx_lm.convert: wall time, peak RSS, output bytes, byte-for-byte tensor equality.

    .venv/bin/python benchmarks/convert.py [--real smollm2-135m] [--synthetic-layers 16] [--skip-real]
        [--skip-synthetic] [--recipes q6-hi,mixed_3_6] [--work DIR]

Cases: a real small model (an embedded name, resolved by mixq.sources) and a synthetic ~1B llama
(random bf16, hidden 2048, 16 layers, MLP 8192, vocab 32000, tied embeddings: 1.04B parameters,
written in 3 shards with an index, generated into the work folder). Recipes: `q6-hi` against
`mlx_lm.convert -q --q-bits 6 --q-group-size 32`, and `mixed_3_6` against
`--quant-predicate mixed_3_6 --q-group-size 64`; both with `--dtype bfloat16`.

Each conversion runs in its own subprocess under GNU time (`/usr/bin/time -f %M`: peak RSS).
Every output tensor of the two folders is compared byte for byte, and the per-module quantization
entries of the two config.json files (mlx_lm lists every module, mixq those that differ from the
default) must give the same spec for every module.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

PY = sys.executable
TIME = shutil.which("time") or "/usr/bin/time"  # GNU time
MLX_ARGS = {"q6-hi": ["--q-bits", "6", "--q-group-size", "32"],
            "mixed_3_6": ["--quant-predicate", "mixed_3_6", "--q-group-size", "64"]}
MIXQ = ("import sys; from mixq.quant.convert import convert; "
        "convert(sys.argv[1], sys.argv[2], recipe=sys.argv[3], dtype='bfloat16', progress=False)")


def run(cmd: list[str]) -> dict:
    """Run `cmd`; wall seconds and its peak RSS in bytes.

    Measured by GNU time (a small process that forks the command): a child forked straight from this
    (large) Python process would report this process's memory as its own peak (ru_maxrss survives exec).
    """
    with tempfile.NamedTemporaryFile("r", suffix=".time") as tf:
        t0 = time.perf_counter()
        p = subprocess.run([TIME, "-f", "%M", "-o", tf.name, *cmd], stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, cwd=ROOT)
        wall = time.perf_counter() - t0
        if p.returncode != 0:
            raise SystemExit(f"failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr.decode(errors='replace')[-3000:]}")
        kb = int(tf.read().strip().splitlines()[-1])
    return {"seconds": wall, "peak_rss": kb * 1024}


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def compare(a: Path, b: Path) -> dict:
    """Byte-for-byte comparison of every tensor of two MLX folders, plus their quantization specs."""
    import torch
    from safetensors import safe_open

    def handles(p):
        hs = [safe_open(str(f), "pt") for f in sorted(p.glob("*.safetensors"))]
        return {k: h for h in hs for k in h.keys()}

    ha, hb = handles(a), handles(b)
    names = sorted(set(ha) | set(hb))
    only_a = [n for n in names if n not in hb]
    only_b = [n for n in names if n not in ha]
    differ = []
    for n in names:
        if n in ha and n in hb:
            x, y = ha[n].get_tensor(n), hb[n].get_tensor(n)
            same = x.dtype == y.dtype and x.shape == y.shape and torch.equal(
                x.contiguous().view(-1).view(torch.uint8), y.contiguous().view(-1).view(torch.uint8))
            if not same:
                differ.append(n)
    ca = json.loads((a / "config.json").read_text()).get("quantization", {})
    cb = json.loads((b / "config.json").read_text()).get("quantization", {})

    def spec(q, module):
        e = q.get(module)
        if isinstance(e, dict):
            return (e["bits"], e["group_size"])
        return (q["bits"], q["group_size"])

    modules = sorted({n.removesuffix(".scales") for n in names if n.endswith(".scales")})
    spec_diff = [m for m in modules if spec(ca, m) != spec(cb, m)]
    return {"tensors": len(names), "identical": len(names) - len(only_a) - len(only_b) - len(differ),
            "only_mixq": only_a[:5], "only_mlx_lm": only_b[:5], "different": differ[:5],
            "config_spec_mismatch": spec_diff[:5]}


def make_synthetic(path: Path, layers: int = 16, hidden: int = 2048, inter: int = 8192, vocab: int = 32000,
                   shards: int = 3, seed: int = 0) -> Path:
    """A random bf16 llama checkpoint (sharded safetensors + index, config, tiny tokenizer), streamed to disk."""
    import torch
    from tiny_models import write_tokenizer

    from mixq.io.safetensors import SafetensorsWriter

    path.mkdir(parents=True, exist_ok=True)
    heads, kv, hd = hidden // 64, max(1, hidden // 256), 64
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes.update({f"{p}.input_layernorm.weight": (hidden,), f"{p}.post_attention_layernorm.weight": (hidden,),
                       f"{p}.self_attn.q_proj.weight": (heads * hd, hidden),
                       f"{p}.self_attn.k_proj.weight": (kv * hd, hidden),
                       f"{p}.self_attn.v_proj.weight": (kv * hd, hidden),
                       f"{p}.self_attn.o_proj.weight": (hidden, heads * hd),
                       f"{p}.mlp.gate_proj.weight": (inter, hidden), f"{p}.mlp.up_proj.weight": (inter, hidden),
                       f"{p}.mlp.down_proj.weight": (hidden, inter)})
    shapes["model.norm.weight"] = (hidden,)
    total = sum(math.prod(s) * 2 for s in shapes.values())
    per = total / shards
    groups, size = [[]], 0
    for n, s in shapes.items():
        if size >= per * len(groups) and len(groups) < shards:
            groups.append([])
        groups[-1].append(n)
        size += math.prod(s) * 2
    gen = torch.Generator().manual_seed(seed)
    weight_map = {}
    for i, names in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        w = SafetensorsWriter(path / fname, [(n, shapes[n], torch.bfloat16) for n in names], metadata={"format": "pt"})
        for n in names:
            s = shapes[n]
            t = (1 + 0.1 * torch.randn(s, generator=gen)) if len(s) == 1 else torch.randn(s, generator=gen) * 0.02
            w.write(n, t.to(torch.bfloat16))
            weight_map[n] = fname
        w.close()
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    vocab_tok = write_tokenizer(path)
    assert vocab_tok <= vocab
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": kv, "head_dim": hd, "vocab_size": vocab, "rms_norm_eps": 1e-5,
              "rope_theta": 500000.0, "max_position_embeddings": 8192, "tie_word_embeddings": True,
              "torch_dtype": "bfloat16", "hidden_act": "silu", "bos_token_id": 0, "eos_token_id": 2}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


def bench_case(label: str, src: Path, work: Path, recipes: list[str]) -> list[dict]:
    rows = []
    for recipe in recipes:
        ours, theirs = work / f"{label}-{recipe}-mixq", work / f"{label}-{recipe}-mlx_lm"
        for p in (ours, theirs):
            shutil.rmtree(p, ignore_errors=True)
        print(f"[{label} {recipe}] mlx_lm.convert ...", file=sys.stderr, flush=True)
        m = run([PY, "-m", "mlx_lm", "convert", "--hf-path", str(src), "--mlx-path", str(theirs), "-q",
                 "--dtype", "bfloat16", *MLX_ARGS[recipe]])
        print(f"[{label} {recipe}] mixq convert ...", file=sys.stderr, flush=True)
        q = run([PY, "-c", MIXQ, str(src), str(ours), recipe])
        cmp = compare(ours, theirs)
        row = {"case": label, "recipe": recipe,
               "mixq_s": q["seconds"], "mlx_lm_s": m["seconds"],
               "mixq_rss_gb": q["peak_rss"] / 1e9, "mlx_lm_rss_gb": m["peak_rss"] / 1e9,
               "mixq_bytes": folder_bytes(ours), "mlx_lm_bytes": folder_bytes(theirs), **cmp}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        shutil.rmtree(ours, ignore_errors=True)
        shutil.rmtree(theirs, ignore_errors=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--real", default="smollm2-135m", help="real model reference (embedded name or HF folder)")
    ap.add_argument("--skip-real", action="store_true")
    ap.add_argument("--skip-synthetic", action="store_true")
    ap.add_argument("--synthetic-layers", type=int, default=16)
    ap.add_argument("--recipes", default="q6-hi,mixed_3_6")
    ap.add_argument("--work", default=None, help="work folder (default: a temporary folder, removed at the end)")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = ap.parse_args(argv)
    recipes = args.recipes.split(",")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="mixq-bench-convert-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        if not args.skip_real:
            from mixq.sources.resolve import resolve

            src = resolve(args.real).path
            rows += bench_case(args.real, src, work, recipes)
        if not args.skip_synthetic:
            t0 = time.perf_counter()
            src = make_synthetic(work / "synthetic-llama", layers=args.synthetic_layers)
            n = sum(f.stat().st_size for f in src.glob("*.safetensors"))
            print(f"synthetic llama: {n / 1e9:.2f} GB in {len(list(src.glob('*.safetensors')))} shards, "
                  f"generated in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
            rows += bench_case("synthetic-1B", src, work, recipes)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)

    print(f"\n{'case':<14} {'recipe':<10} {'mixq s':>8} {'mlx_lm s':>9} {'mixq RSS':>9} {'mlx_lm RSS':>11} "
          f"{'mixq MB':>9} {'mlx_lm MB':>10} {'identical':>12}")
    for r in rows:
        print(f"{r['case']:<14} {r['recipe']:<10} {r['mixq_s']:>8.1f} {r['mlx_lm_s']:>9.1f} "
              f"{r['mixq_rss_gb']:>8.2f}G {r['mlx_lm_rss_gb']:>10.2f}G {r['mixq_bytes'] / 1e6:>9.1f} "
              f"{r['mlx_lm_bytes'] / 1e6:>10.1f} {r['identical']:>5}/{r['tensors']:<6}")
        for k in ("only_mixq", "only_mlx_lm", "different", "config_spec_mismatch"):
            if r[k]:
                print(f"    {k}: {r[k]}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

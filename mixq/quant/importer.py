"""`mixq import MODEL.gguf|NAME OUT`: a GGUF file or an embedded model as a Hugging Face folder, or with
`--keep-quant` a GGUF as an MLX folder whose tensors keep their GGUF quantization (recipe `source`)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from mixq.errors import MixqError
from mixq.io.files import check_output, staged_dir
from mixq.quant.convert import add_source_arguments, convert
from mixq.quant.gguf_quants import SOURCE_RECIPE, gguf_bits_per_weight
from mixq.sources import embedded
from mixq.sources.gguf import DTYPES, import_gguf


def add_arguments(p) -> None:
    p.add_argument("model", metavar="MODEL.gguf|NAME", help="a GGUF file or an embedded model name (mixq models)")
    p.add_argument("out", metavar="OUT", help="the folder to write")
    p.add_argument("--dtype", default=None, choices=DTYPES,
                   help="dtype of the written weights (default float32, which holds the dequantized values "
                        "exactly; with --keep-quant: of the float tensors, default the GGUF's own)")
    p.add_argument("--keep-quant", action="store_true",
                   help="write an MLX folder keeping each GGUF tensor's quantization where MLX holds it exactly "
                        "(Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K), re-quantizing the rest (= convert --recipe "
                        "source)")
    add_source_arguments(p)
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")


def _is_gguf(model: str) -> bool:
    return str(model).lower().endswith(".gguf") or Path(model).is_file()


def keep_quant(model: str, out: Path, args) -> None:
    """`--keep-quant`: convert with recipe source and print the folder's bits per weight next to the GGUF's."""
    gguf_file = model
    if embedded.is_embedded(model):
        if embedded.REGISTRY[model].offgrid:
            raise MixqError(f"{model}: an off-grid model has no GGUF blocks to keep; use "
                            f"{embedded.REGISTRY[model].raw} (or drop --keep-quant)")
        gguf_file = embedded.fetch_gguf(model)
    elif not _is_gguf(model):
        raise MixqError(f"{model}: --keep-quant needs a .gguf file or an embedded *-gguf name")
    convert(model, out, SOURCE_RECIPE, args.dtype, args.force, scale_dtype=args.scale_dtype,
            requant=args.requant)
    from mixq.quant.artifact import read_artifact

    art = read_artifact(out)
    g_bytes, g_params = gguf_bits_per_weight(gguf_file)
    print(f"bits per weight: {8 * art.size_bytes / art.n_params:.3f} (MLX folder) vs "
          f"{8 * g_bytes / g_params:.3f} (GGUF)")


def cli(args) -> int:
    t0 = time.time()
    out = Path(args.out)
    if args.keep_quant:
        keep_quant(args.model, out, args)
    elif args.scale_dtype or args.requant:
        raise MixqError("--scale-dtype and --requant apply with --keep-quant only")
    elif embedded.is_embedded(args.model):
        if args.dtype not in (None, "float32"):
            raise MixqError("--dtype applies to .gguf files; embedded models are cached in float32 "
                            "(use `mixq convert NAME OUT --recipe bf16` for bfloat16)")
        check_output(out, args.force)
        src = embedded.ensure(args.model)
        with staged_dir(out, args.force, protect=[src]) as tmp:
            shutil.copytree(src, tmp, dirs_exist_ok=True)
    elif _is_gguf(args.model):
        import_gguf(args.model, out, args.dtype or "float32", force=args.force)
    else:
        raise MixqError(f"{args.model}: not a .gguf file nor an embedded model name "
                        f"({', '.join(embedded.names())})")
    print(f"wrote {out} ({time.time() - t0:.1f}s)")
    return 0

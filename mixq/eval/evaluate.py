"""`mixq eval`: the seven tasks, perplexity and KL divergence, into a resumable run folder.

One evaluation is one `EvalConfig`: the CLI builds it from its arguments, the Python API
`evaluate(model_ref, tasks, out_dir, **settings)` from its keywords, and `run(config)` carries it out.

Run folder (read back through `mixq.eval.runs`):
* `results.json`: model, recipe, size, bits per weight, dtype, per-task metrics with standard
  errors, n and the task's definition `version` (also as `task_versions`), `ppl`, `kld`
  (llama.cpp-like keys), seconds, versions, and the `options` the run was started with. Rewritten
  atomically after every task, so partial progress is visible.
* `samples.jsonl`: one line per scored document, appended and flushed as it is scored.
`--resume` continues such a folder: finished tasks are kept, documents already in samples.jsonl
are not scored again; the options that decide the numbers (`RESUME_KEYS`) and the task versions
must be the same (otherwise it refuses).

The model (and the base) is resolved once; the ppl/kld text is tokenized once, with the model's
tokenizer, and the same windows serve ppl and kld. With `kld` and `ppl` both asked for, the
perplexity comes from the KLD pass (same forward, same definition), so it costs nothing extra.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

from mixq.errors import MixqError
from mixq.eval.data import check_data_dir, load_docs
from mixq.eval.engine import (
    DTYPES,
    ModelInfo,
    _tokenizer,
    add_device_arguments,
    default_dtype,
    load_model,
    parse_memory,
    peak_memory,
    peak_memory_line,
    resolve_device,
)
from mixq.eval.perplexity import (
    DEFAULT_CTX,
    DEFAULT_KLD,
    BaseDists,
    Windows,
    cached_base_dists,
    default_text_file,
    kld_summary,
    make_windows,
    perplexity,
    ppl_stats,
    token_stats,
)
from mixq.eval.runs import RESULTS_FILE, SAMPLES_FILE, read_results, read_samples, samples_by_task
from mixq.eval.scoring import DEFAULT_BATCH_SIZE, ScoreOptions, score_docs, task_metrics
from mixq.eval.tasks import TASK_NAMES, TASKS
from mixq.io.files import os_error, output_lock, write_atomic
from mixq.sources.resolve import ResolvedModel, resolve
from mixq.threads import torch_threads
from mixq.version import __version__

SEVEN = TASK_NAMES
EXTRA = ("ppl", "kld")
DEFAULT_WINDOWS = 64  # ppl/kld windows of 512 tokens: 32,704 scored tokens (None: the whole file)


def parse_tasks(spec) -> list[str]:
    """'all' = the seven tasks; a comma list (or list) of task names, ppl, kld; order kept, no repeats."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for t in (x.strip() for x in items):
        if not t:
            continue
        names = SEVEN if t == "all" else (t,)
        for n in names:
            if n not in SEVEN + EXTRA:
                raise MixqError(f"unknown task {n!r}: choose from {', '.join(SEVEN + EXTRA)} or 'all'")
            if n not in out:
                out.append(n)
    if not out:
        raise MixqError("no task given: use --tasks all,ppl,kld or a comma list of task names")
    return out


# ---------------------------------------------------------------- the settings of one evaluation

_DECIDING = {"option": True, "resume": True}


def _deciding(default=None):
    """A setting that decides the numbers: recorded in results.json's "options", equal to --resume."""
    return field(default=default, metadata=_DECIDING)


@dataclass
class EvalConfig:
    """Every setting of one evaluation; the field names are the CLI's option names (`--data-dir`: data_dir).

    Fields made with `_deciding` decide the numbers: results.json's "options" records them (and the
    tasks) under these names, and `--resume` needs them equal (`RESUME_KEYS`). Tasks may be added on
    resume; where to write, threads, batch size and progress never change a number.
    Normalized on creation: tasks parsed, ctx 0/None -> 512, windows 0 -> None (the whole file),
    ppl_file resolved to an absolute path (the default text when none is given; None without ppl/kld).
    """
    model: str = field(metadata=_DECIDING)    # any model reference
    recipe: str | None = _deciding()          # applied on the fly
    dtype: str | None = _deciding()           # compute dtype (None: float32 on the CPU, bfloat16 on a GPU)
    device: str = _deciding("auto")           # cpu, cuda, mps (auto: cuda when torch sees one)
    limit: int | None = _deciding()           # first N documents per task
    sample: int | None = _deciding()          # a seeded random subset of N documents per task
    seed: int = _deciding(0)
    data_dir: str | None = _deciding()        # local task files
    base: str | None = _deciding()            # the unquantized model for kld
    ppl_file: str | None = _deciding()        # text of the ppl/kld windows
    ctx: int | None = _deciding(DEFAULT_CTX)  # tokens per window
    windows: int | None = _deciding(DEFAULT_WINDOWS)
    kld_topk: int | None = _deciding()        # None: exact KL; K: the base's top-K logits only
    tasks: list[str] | str = field(default="all", metadata={"option": True})
    out: str | Path | None = None             # the run folder
    resume: bool = False
    force: bool = False
    batch_size: int | None = None             # documents per forward batch (None: scoring's default)
    threads: int | None = None                # torch threads (None: all cores)
    max_memory: str | float | None = 0        # GB for the weights (engine.parse_memory; default 0: packed, see
                                              # engine's docstring; auto: dense copies within half the memory)
    progress: bool = True
    shard: str | None = None                  # "K/N": a part of each task's documents (merge_shards joins them)

    def __post_init__(self):
        """Normalize, and validate every setting before anything is loaded or written (a bad value is a
        one-line error naming the option, and the run folder is not touched)."""
        if self.out is None:
            raise MixqError("no run folder given: pass -o RUN_DIR")
        self.model = str(self.model)
        self.tasks = parse_tasks(self.tasks)
        if "kld" in self.tasks and not self.base:
            raise MixqError("task kld needs the unquantized model to compare with: pass --base MODEL")
        self.base = str(self.base) if self.base else None
        self.data_dir = str(self.data_dir) if self.data_dir else None
        self._check_numbers()
        self._check_shard()
        parse_memory(self.max_memory)
        self.ctx = self.ctx or DEFAULT_CTX
        self.windows = self.windows or None
        self.kld_topk = self.kld_topk or None
        self.device = resolve_device(self.device)
        self.dtype = self.dtype or default_dtype(self.device)
        if self.dtype not in DTYPES:
            raise MixqError(f"--dtype {self.dtype!r}: use one of {', '.join(DTYPES)}")
        if self.data_dir is not None:
            for task in self.tasks:
                if task not in EXTRA:
                    check_data_dir(task, self.data_dir)
        if not self.wants_text:
            self.ppl_file = None
        else:
            self.ppl_file = str(Path(self.ppl_file).resolve()) if self.ppl_file else str(default_text_file())
            _check_text_file(self.ppl_file, "--ppl-file")
        out = Path(self.out)
        if out.exists() and not out.is_dir():
            raise MixqError(f"{out}: exists and is not a folder; choose another -o RUN_DIR")

    def _check_numbers(self) -> None:
        """Counts are whole numbers in range: None (or 0 where 0 means "the default") or positive."""
        rules = (("limit", 1, "a positive number of documents"), ("sample", 1, "a positive number of documents"),
                 ("ctx", 0, "2 or more tokens (0: the default 512)"), ("windows", 0, "0 (the whole file) or more"),
                 ("kld_topk", 0, "a positive number of logits (0: exact KL)"),
                 ("batch_size", 1, "a positive number of documents"), ("threads", 1, "a positive number of threads"))
        for name, low, what in rules:
            v = getattr(self, name)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < low or (name == "ctx" and v == 1):
                raise MixqError(f"--{name.replace('_', '-')} {v!r}: must be {what}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise MixqError(f"--seed {self.seed!r}: must be a whole number")

    def _check_shard(self) -> None:
        if self.shard is None:
            return
        k, _, n = str(self.shard).partition("/")
        if not (k.isdigit() and n.isdigit() and int(k) < int(n)):
            raise MixqError(f"--shard {self.shard!r}: write K/N with 0 <= K < N, e.g. 0/2")
        if self.wants_text:
            raise MixqError("--shard splits the tasks' documents: leave ppl/kld to the merged run (merge_shards)")
        self.shard = f"{int(k)}/{int(n)}"

    @property
    def part(self) -> tuple[int, int] | None:
        """--shard K/N as scoring's part (K, N): the documents of the scorer's batches K, K+N, ..."""
        return None if self.shard is None else tuple(int(x) for x in self.shard.split("/"))

    @property
    def wants_text(self) -> bool:
        return any(t in EXTRA for t in self.tasks)

    @property
    def kld_form(self) -> int | str:
        return DEFAULT_KLD if not self.kld_topk else int(self.kld_topk)  # exact unless a top-k is asked for

    def options(self) -> dict:
        """results.json's "options": the settings that decide the numbers, and the tasks."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata.get("option")}


RESUME_KEYS = tuple(f.name for f in fields(EvalConfig) if f.metadata.get("resume"))
TEXT_KEYS = ("base", "ppl_file", "ctx", "windows", "kld_topk")   # options of ppl/kld only (never of a shard)
_BEFORE = {"device": "cpu"}  # what a run folder from before an option was added ran with


def merge_shards(shard_dirs, model_ref, tasks="all", out_dir=None, **settings) -> dict:
    """Join the samples of shard runs (`shard="K/N"`, same settings) into `out_dir` and finish it there: the task
    metrics from every document, ppl/kld computed here. results.json and samples.jsonl (as a set of lines) equal
    a single-process run's, timing fields and `n_scored_now` aside."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise MixqError(f"{out}: merge into a new run folder")
    shards = [read_results(d) for d in shard_dirs]
    parts = sorted(r.get("shard") or "" for r in shards)
    n = len(shard_dirs)
    if parts != sorted(f"{k}/{n}" for k in range(n)) or not all(r.get("complete") for r in shards):
        raise MixqError(f"merge needs the {n} finished shards 0/{n}..{n - 1}/{n}; got {', '.join(parts)}")
    cfg = EvalConfig(model=model_ref, tasks=tasks, out=out, resume=True, **settings)
    for d, r in zip(shard_dirs, shards):
        diff = [k for k in RESUME_KEYS if k not in TEXT_KEYS and r.get("options", {}).get(k) != cfg.options()[k]]
        if diff:
            raise MixqError(f"{d}: shard run with other options than the merge ({', '.join(diff)}); use the same ones")
    lines = "".join(json.dumps(rec) + "\n" for d in shard_dirs for rec in read_samples(d))
    write_atomic(out / SAMPLES_FILE, lines)
    return run(cfg)


def evaluate(model_ref, tasks="all", out_dir=None, **settings) -> dict:
    """Evaluate `model_ref` on `tasks` into the run folder `out_dir`; return the results dict.

    `settings`: any other `EvalConfig` field, e.g. `evaluate("out/smol-q6-hi", ["arc_easy", "ppl"],
    "runs/q6", limit=50)`."""
    return run(EvalConfig(model=model_ref, tasks=tasks, out=out_dir, **settings))


def _check_text_file(path: str, option: str) -> None:
    """A readable UTF-8 text file (checked on its first MiB), before anything is loaded."""
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 20)
    except OSError as e:
        raise MixqError(f"{option} {os_error(e, path)}") from None
    if not head.strip():
        raise MixqError(f"{option} {path}: the file is empty; give a text file")
    nul = head.find(b"\0")
    if nul >= 0:
        raise MixqError(f"{option} {path}: a binary file (NUL byte at {nul}); give a plain text file")
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        if not (len(head) == 1 << 20 and e.start >= len(head) - 3):  # not just a character cut by the 1 MiB
            raise MixqError(f"{option} {path}: not UTF-8 text (byte {e.start}: {e.reason}); give a plain text "
                            "file") from None


def _check_context(cfg: EvalConfig, model: ResolvedModel, what: str = "") -> None:
    """--ctx must fit the model's context (config.json max_position_embeddings): longer windows would be
    scored past what the model was built for, and the numbers would be wrong without any error."""
    if not cfg.wants_text:
        return
    try:
        config = json.loads((Path(model.path) / "config.json").read_text())
    except (OSError, ValueError):
        return  # loading the model reports it
    n = config.get("max_position_embeddings") or (config.get("text_config") or {}).get("max_position_embeddings")
    if isinstance(n, int) and not isinstance(n, bool) and cfg.ctx > n:
        raise MixqError(f"--ctx {cfg.ctx}: longer than the context of {what or model.ref} ({n} tokens, config.json "
                        f"max_position_embeddings); use --ctx {n} or less")


def run(cfg: EvalConfig) -> dict:
    """Carry out the evaluation `cfg` describes; return the results dict (also in its run folder).

    Nothing is written before the model (and the base) loaded: a failure before that leaves the run folder
    as it was (absent, or the previous run's)."""
    out = Path(cfg.out)
    with output_lock(out):  # one writer per run folder: a second `mixq eval -o` into it is refused
        prev, prev_samples = _check_run_dir(out, cfg)
        if prev and prev.get("complete") and all(t in prev.get("tasks", {}) or t in prev for t in cfg.tasks):
            return prev  # nothing left to do
        with torch_threads(cfg.threads):
            return _run(cfg, out, prev, prev_samples)


def _run(cfg: EvalConfig, out: Path, prev: dict | None, prev_samples: list[dict]) -> dict:
    """The steps: the text windows, the base's distributions (loading the base only on a cache miss),
    then the model alone: tasks, kld, ppl."""
    t_start = time.time()
    model = resolve(cfg.model, progress=cfg.progress)
    _check_context(cfg, model)
    if "kld" in cfg.tasks and not (prev and "kld" in prev):
        _check_context(cfg, resolve(cfg.base, progress=cfg.progress), f"the base {cfg.base}")
    win = _text_windows(cfg, model) if cfg.wants_text else None
    base_d = _base_distributions(cfg, win) if "kld" in cfg.tasks and not (prev and "kld" in prev) else None
    finished = (prev or {}).get("tasks", {})
    docs = {t: load_docs(t, data_dir=cfg.data_dir, limit=cfg.limit, sample=cfg.sample, seed=cfg.seed,
                         progress=cfg.progress) for t in cfg.tasks if t not in EXTRA and t not in finished}
    lm = load_model(model, recipe=cfg.recipe, dtype=cfg.dtype, progress=cfg.progress, device=cfg.device,
                    max_memory=parse_memory(cfg.max_memory))
    _start_run_dir(out, cfg, prev, prev_samples)
    results = _new_results(cfg, lm.info, prev)
    _write_json(out / RESULTS_FILE, results)
    _score_tasks(cfg, lm, out, results, samples_by_task(prev_samples), docs)
    if "kld" in cfg.tasks and "kld" not in results:
        _kld_step(cfg, lm.model, win, base_d, results)
        _write_json(out / RESULTS_FILE, results)
    if "ppl" in cfg.tasks and "ppl" not in results:
        _ppl_step(cfg, lm.model, win, results)
        _write_json(out / RESULTS_FILE, results)
    results["seconds"] = round(time.time() - t_start, 3)
    results["peak_memory_bytes"] = peak_memory()
    results["complete"] = True
    _write_json(out / RESULTS_FILE, results)
    return results


# ---------------------------------------------------------------- the run folder

def _write_json(path: Path, obj: dict) -> None:
    write_atomic(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def _versions() -> dict:
    import platform

    import numpy
    import torch
    import transformers

    return {"mixq": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "numpy": numpy.__version__}


def _run_files(out: Path) -> list[Path]:
    """What `mixq eval` writes in a run folder (and the temporary files of its atomic writes)."""
    return [p for p in out.iterdir() if p.name in (RESULTS_FILE, SAMPLES_FILE)
            or (p.name.startswith((f".{RESULTS_FILE}.", f".{SAMPLES_FILE}.")) and p.name.endswith(".tmp"))]


def _check_run_dir(out: Path, cfg: EvalConfig) -> tuple[dict | None, list[dict]]:
    """Check the run folder, writing nothing; return (previous results, previous sample records) when resuming."""
    if out.exists() and not out.is_dir():
        raise MixqError(f"{out}: exists and is not a folder; choose another -o RUN_DIR")
    exists = out.exists() and any(out.iterdir())
    if exists and cfg.resume and cfg.shard is not None:
        raise MixqError(f"{out}: a --shard run does not resume (its part is planned over all documents); "
                        "start it over with --force")
    if exists and not cfg.resume:
        _check_replaceable_run(out, cfg.force)
    if not (cfg.resume and exists):
        return None, []
    prev = read_results(out) if (out / RESULTS_FILE).exists() else None
    if prev is not None:
        _check_resumable(out, prev, cfg)
    samples = read_samples(out)
    if prev is not None:
        _reopen_short_tasks(out, prev, samples, cfg)
    return prev, samples


def _reopen_short_tasks(out: Path, prev: dict, samples: list[dict], cfg: EvalConfig) -> None:
    """A finished task whose documents are not all in samples.jsonl (a cut or lost line) is scored again
    for the missing ones instead of being kept with fewer documents than its results say."""
    held = samples_by_task(samples)
    for task, entry in list(prev.get("tasks", {}).items()):
        n = entry.get("n") if isinstance(entry, dict) else None
        if isinstance(n, int) and len(held.get(task, {})) < n:
            del prev["tasks"][task]
            prev["complete"] = False
            if cfg.progress:
                print(f"mixq eval: {out / SAMPLES_FILE} holds {len(held.get(task, {}))} of the {n} documents of "
                      f"{task}: scoring the missing ones again", file=sys.stderr)


def _check_replaceable_run(out: Path, force: bool) -> None:
    if not force:
        raise MixqError(f"{out}: run folder exists; use --resume to continue it or --force to start over")
    results = out / RESULTS_FILE
    mine = (out / SAMPLES_FILE).exists()
    if results.exists():
        try:
            mine = "mixq_version" in json.loads(results.read_text())
        except (OSError, ValueError, TypeError):
            mine = False
    if not mine:
        raise MixqError(f"{out}: is not a mixq run folder (no {RESULTS_FILE} written by mixq); --force only "
                        "replaces run folders: choose another -o RUN_DIR")


def _start_run_dir(out: Path, cfg: EvalConfig, prev: dict | None, samples: list[dict]) -> None:
    """Now that the model loaded: start the run folder over (--force removes only the files eval wrote),
    create it, or (resuming) rewrite samples.jsonl without a cut last line so appends start on a clean line."""
    try:
        if out.exists() and not cfg.resume and any(out.iterdir()):
            _check_replaceable_run(out, cfg.force)
            for p in _run_files(out):
                p.unlink()
        elif out.exists():  # temporary files of a killed run's atomic writes (we hold the run folder's lock)
            for p in _run_files(out):
                if p.name.endswith(".tmp"):
                    p.unlink()
        out.mkdir(parents=True, exist_ok=True)
        if cfg.resume and (samples or (out / SAMPLES_FILE).exists()):
            write_atomic(out / SAMPLES_FILE, "".join(json.dumps(r) + "\n" for r in samples))
    except OSError as e:
        raise os_error(e, out) from None


def _check_resumable(out: Path, prev: dict, cfg: EvalConfig) -> None:
    """Refuse to resume with other deciding options, or tasks whose definition changed since."""
    if prev.get("shard") != cfg.shard:
        raise MixqError(f"{out}: cannot resume shard {prev.get('shard')} as shard {cfg.shard}; use the same --shard")
    old, new = prev.get("options", {}), cfg.options()
    diff = [k for k in RESUME_KEYS if old.get(k, _BEFORE.get(k)) != new.get(k)]
    if diff:
        shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff)
        raise MixqError(f"{out}: cannot resume with different options ({shown}); use the same options or --force")
    versions = prev.get("task_versions", {})  # none in run folders from before task versions: all "1"
    changed = [f"{t} {v} -> {TASKS[t].version}" for t, v in versions.items() if t in TASKS and v != TASKS[t].version]
    if changed:
        raise MixqError(f"{out}: cannot resume: task definitions changed since it started ({', '.join(changed)}); "
                        "start over with --force")


def _short_provenance(prov, depth: int = 0):
    """The folder's provenance without its per-tensor tables (those stay in the folder): any dict
    or list of more than 32 entries becomes a count, recipe texts are dropped."""
    if isinstance(prov, dict):
        if depth and len(prov) > 32:
            return {"entries": len(prov)}
        return {k: _short_provenance(v, depth + 1) for k, v in prov.items() if k != "text"}
    if isinstance(prov, list) and len(prov) > 32:
        return {"entries": len(prov)}
    return prov


def _new_results(cfg: EvalConfig, info: ModelInfo, prev: dict | None) -> dict:
    """The results dict of this run: the model's facts, and what the interrupted run finished (if any)."""
    results = {
        "mixq_version": __version__, "model": cfg.model, "recipe": info.recipe, "kind": info.kind,
        "path": str(info.path), "provenance": _short_provenance(info.provenance or {}), "dtype": cfg.dtype,
        "device": info.device,
        "size_bytes": info.size_bytes, "n_params": info.n_params, "bits_per_weight": info.bits_per_weight,
        "bits_per_weight_quantized": info.bits_per_weight_quantized,
        "memory_bytes_estimate": info.size_bytes,  # weights as MLX holds them (activations/KV cache not counted)
        "weights_bytes": info.weights_bytes,  # what the weights held (packed + dense copies within --max-memory)
        "tasks": {}, "task_versions": {}, "options": cfg.options(), "versions": _versions(), "complete": False,
    }
    if cfg.shard is not None:   # a part of a run: its task metrics cover only this shard's documents
        results["shard"] = cfg.shard
    if prev:
        results["tasks"] = dict(prev.get("tasks", {}))
        for k in EXTRA:
            if k in prev:
                results[k] = prev[k]
        results["seconds_previous"] = prev.get("seconds", 0.0) + prev.get("seconds_previous", 0.0)
    for name, entry in results["tasks"].items():  # entries from before task versions: version "1"
        entry.setdefault("version", TASKS[name].version)
    results["task_versions"] = {t: TASKS[t].version for t in [*results["tasks"], *cfg.tasks] if t in TASKS}
    return results


# ---------------------------------------------------------------- the steps

def _record_line(rec: dict) -> str:
    rec = dict(rec)
    for k in ("correct", "correct_norm"):
        if k in rec and isinstance(rec[k], bool):
            rec[k] = int(rec[k])
    return json.dumps(rec, default=_json_default) + "\n"


def _score_tasks(cfg: EvalConfig, lm, out: Path, results: dict, done: dict[str, dict[int, dict]],
                 docs: dict[str, tuple]) -> None:
    """Score every multiple-choice task not finished yet (`done`: task -> doc_id -> record already in
    samples.jsonl; `docs`: task -> `load_docs` result, read before the run folder was touched), rewriting
    results.json after each."""
    with open(out / SAMPLES_FILE, "a") as sf:
        for task in cfg.tasks:
            if task in EXTRA or task in results["tasks"]:
                continue  # results["tasks"] holds only what the interrupted run finished
            results["tasks"][task] = _eval_task(cfg, lm, task, sf, done.get(task, {}), docs[task])
            _write_json(out / RESULTS_FILE, results)


def _eval_task(cfg: EvalConfig, lm, task: str, samples_file, done: dict, loaded: tuple) -> dict:
    """Score one task's documents (`loaded`: `load_docs`' result) not in `done` (doc_id -> record); return its
    metrics entry."""
    from tqdm import tqdm

    t0 = time.time()
    docs, src = loaded
    todo = [(i, d) for i, d in docs if i not in done]
    records = dict(done)
    bar = tqdm(total=len(docs), initial=len(docs) - len(todo), desc=task, unit="doc", disable=not cfg.progress,
               dynamic_ncols=True)
    opts = ScoreOptions(batch_size=DEFAULT_BATCH_SIZE if cfg.batch_size is None else cfg.batch_size,
                        threads=cfg.threads, progress=False, part=cfg.part)
    try:
        for rec in score_docs(lm.model, lm.tokenizer, task, todo, options=opts) if todo else ():
            rec = {"task": task, **rec}
            samples_file.write(_record_line(rec))
            samples_file.flush()
            records[rec["doc_id"]] = rec
            bar.update(1)
    finally:
        bar.close()  # also on Ctrl-C: a message after it starts on its own line
    metrics = dict(task_metrics([records[i] for i, _ in docs if cfg.shard is None or i in records]))
    metrics.update(version=TASKS[task].version, source=src.get("source"), split=src.get("split"),
                   seconds=round(time.time() - t0, 3), n_scored_now=len(todo))
    for k, v in src.items():
        metrics.setdefault(k, v)
    return metrics


def _text_windows(cfg: EvalConfig, model: ResolvedModel) -> Windows:
    """The ppl/kld windows, tokenized once with the model's tokenizer (the folder's, as load_model's)."""
    return make_windows(_tokenizer(model.path), cfg.ppl_file, ctx=cfg.ctx, max_windows=cfg.windows)


def _base_distributions(cfg: EvalConfig, win: Windows) -> BaseDists:
    """The base's distributions on the windows: from the cache, else the base is loaded and run once."""
    base_d, hit = cached_base_dists(resolve(cfg.base, progress=cfg.progress), win, dtype=cfg.dtype, k=cfg.kld_form,
                                    progress=cfg.progress, device=cfg.device, max_memory=parse_memory(cfg.max_memory))
    if cfg.progress:
        print(f"kld base {cfg.base}: {'cached' if hit else 'computed and cached'}", file=sys.stderr)
    return base_d


def _kld_step(cfg: EvalConfig, model, win: Windows, base_d: BaseDists, results: dict) -> None:
    """KL divergence against the base (and the perplexity from the same pass, when asked for)."""
    t0 = time.time()
    ts = token_stats(model, win, base_d, progress=cfg.progress)  # one window at a time, as the base
    secs = round(time.time() - t0, 3)
    n_windows = int(win.ids.shape[0])
    results["kld"] = {"base": cfg.base, **kld_summary(ts), "ctx": cfg.ctx, "n_windows": n_windows,
                      "file": cfg.ppl_file, "form": base_d.k, "seconds": secs}
    if "ppl" in cfg.tasks and "ppl" not in results:
        results["ppl"] = {**ppl_stats(ts.nll_quant), "ctx": cfg.ctx, "file": cfg.ppl_file, "n_windows": n_windows,
                          "seconds": secs, "from": "kld pass"}


def _ppl_step(cfg: EvalConfig, model, win: Windows, results: dict) -> None:
    import torch

    t0 = time.time()
    with torch.inference_mode():
        p = perplexity(model, win, progress=cfg.progress)
    results["ppl"] = {**p, "seconds": round(time.time() - t0, 3)}


# ---------------------------------------------------------------- terminal output and CLI

def _pm(v, se, digits=4) -> str:
    if v is None:
        return "-"
    return f"{v:.{digits}f}" if se is None else f"{v:.{digits}f} ± {se:.{digits}f}"


def print_table(results: dict, file=None) -> None:
    """A compact rich table of a results dict."""
    from rich.console import Console
    from rich.table import Table

    bpw = results.get("bits_per_weight")
    title = (f"{results['model']}  ·  {results.get('size_bytes', 0) / 1e6:.1f} MB  ·  "
             f"{bpw:.3f} bpw  ·  {results['dtype']}" if bpw else results["model"])
    table = Table(title=title, title_justify="left")
    for col, just in (("task", "left"), ("n", "right"), ("acc", "right"), ("acc_norm", "right"), ("s", "right")):
        table.add_column(col, justify=just)
    for task, m in results.get("tasks", {}).items():
        table.add_row(task, str(m.get("n", "")), _pm(m.get("acc"), m.get("acc_stderr")),
                      _pm(m.get("acc_norm"), m.get("acc_norm_stderr")), f"{m.get('seconds', 0):.1f}")
    if "ppl" in results:
        p = results["ppl"]
        table.add_row("ppl", str(p["n_tokens"]), _pm(p["ppl"], p["ppl_stderr"], 3), "", f"{p.get('seconds', 0):.1f}")
    if "kld" in results:
        k = results["kld"]
        table.add_row("kld mean", str(k["n_tokens"]), _pm(k["kld_mean"], k["kld_mean_stderr"], 5),
                      f"p99 {k['kld_p99']:.4f}", f"{k.get('seconds', 0):.1f}")
        table.add_row("top-1 agree", "", _pm(k["top1_agreement"], k["top1_agreement_stderr"]),
                      f"Δp rms {k['dp_rms']:.4f}", "")
        table.add_row("ln(ppl_q/ppl_b)", "", _pm(k["ln_ppl_ratio"], k["ln_ppl_ratio_stderr"], 5),
                      f"base ppl {k['ppl_base']:.3f}", "")
    Console(file=file).print(table)


def add_arguments(p) -> None:
    p.add_argument("model", help="MLX folder, HF folder, .gguf file, embedded name, or NAME@RECIPE")
    p.add_argument("--recipe", help="apply this recipe on the fly (same numbers as the converted folder)")
    p.add_argument("--tasks", default="all",
                   help=f"comma list of {', '.join(SEVEN)}, ppl, kld; 'all' = the seven tasks (default)")
    p.add_argument("--base", help="the unquantized model for kld")
    p.add_argument("--limit", type=int, help="first N documents of each task")
    p.add_argument("--sample", type=int, help="a seeded random subset of N documents per task")
    p.add_argument("--seed", type=int, default=0, help="seed for --sample (default 0)")
    add_device_arguments(p, max_memory="0")
    p.add_argument("--data-dir", help="local JSONL/parquet/arrow files of the task splits")
    p.add_argument("--ppl-file", help="text file for ppl/kld (default: WikiText-2 test, or $MIXQ_WIKITEXT)")
    p.add_argument("--ctx", type=int, default=512, help="context length of the ppl/kld windows (default 512)")
    p.add_argument("--windows", type=int, default=DEFAULT_WINDOWS,
                   help=f"first N ppl/kld windows (default {DEFAULT_WINDOWS}; 0 = the whole file)")
    p.add_argument("--kld-topk", type=int, default=None,
                   help="cache only the base's top-K logits per token (smaller, KL a lower bound); "
                        "default: exact KL from the base's cached hidden states")
    p.add_argument("--batch-size", type=int, help="documents per forward batch")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: all cores)")
    p.add_argument("-o", "--out", required=True, help="run folder to write")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in RUN_DIR")
    p.add_argument("--force", action="store_true", help="replace an existing run folder")
    p.add_argument("--shard", metavar="K/N", help="score only documents K, K+N, ... of each task (a part of a run)")


def config_from_args(args) -> EvalConfig:
    """The EvalConfig of parsed `mixq eval` arguments (argument dests are the field names)."""
    names = {f.name for f in fields(EvalConfig)}
    return EvalConfig(**{k: v for k, v in vars(args).items() if k in names})


def cli(args) -> int:
    try:
        results = run(config_from_args(args))
    except KeyboardInterrupt:
        print(f"mixq eval: interrupted; {args.out} keeps every finished document: continue with --resume",
              file=sys.stderr)
        return 130
    print_table(results)
    print(f"results: {Path(args.out) / RESULTS_FILE}")
    print(f"{peak_memory_line()} (weights held: {results.get('weights_bytes', 0) / 1e9:.2f} GB)")
    return 0

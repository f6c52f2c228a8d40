"""The sweep file (TOML): models x variants, evaluated alike, compared against one reference variant.

    out = "mixq-sweep"                 # output folder (relative to the sweep file)
    models = ["smollm2-135m"]          # any model refs
    variants = ["bf16", "q8-hi", "my-recipe.toml", "plan@4.5"]   # recipes, recipe files, plan targets (bpw)
    ref = "q8-hi"                      # the variant differences are taken against (default: the first)
    dtype = "bfloat16"                 # storage dtype of the converted folders (default: the source's)

    [eval]                             # mixq eval's settings (EvalConfig names)
    tasks = ["arc_easy", "ppl", "kld"] # or "all,ppl,kld"
    limit = 100                        # or sample = N (seeded), seed = 0
    windows = 16                       # ppl/kld windows (ctx tokens each); ctx, kld_topk, dtype, device,
                                       # data_dir, ppl_file, batch_size
    shards = 1                         # N > 1: each variant's task documents split over N jobs, then merged
    threads = 1                        # torch threads per evaluation (default: the executor's share of cores);
                                       # fixed, float sums do not depend on how the executor splits the cores

    [measure]                          # settings of the sensitivity measurement behind plan@ targets
    method = "fisher"                  # tokens, ctx, levels, group_sizes, modes, draws, calib (a text file)

Paths in the file are relative to the file. Every setting is checked when the file is read.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:   # Python 3.10
    import tomli as tomllib

from mixq.errors import MixqError
from mixq.eval.evaluate import DEFAULT_WINDOWS, parse_tasks
from mixq.quant.recipe import builtin_recipes, parse_recipe
from mixq.quant.spec import FLOAT_MODES

TOP_KEYS = {"out", "models", "variants", "ref", "dtype", "eval", "measure"}
EVAL_KEYS = {"tasks": (str, list), "limit": int, "sample": int, "seed": int, "windows": int, "ctx": int,
             "kld_topk": int, "dtype": str, "device": str, "data_dir": str, "ppl_file": str, "batch_size": int,
             "shards": int, "threads": int}
EVAL_PATHS = ("data_dir", "ppl_file")
MEASURE_KEYS = {"method": str, "tokens": int, "ctx": int, "levels": list, "group_sizes": list, "modes": list,
                "draws": int, "calib": str}
STORAGE_DTYPES = ("float32", "float16", "bfloat16")
PLAN_PREFIX = "plan@"


@dataclass(frozen=True)
class Variant:
    """One way to make a model: a built-in recipe, a recipe file (its text), or a planned size."""
    label: str                       # as written in the sweep file
    recipe: str | None = None        # built-in recipe name
    recipe_text: str | None = None   # a recipe file's TOML text
    target_bpw: float | None = None  # plan@BPW: measure, allocate, convert

    @property
    def slug(self) -> str:
        return slug(self.label)

    def settings(self) -> dict:
        """What decides this variant's artifact (hashed into its jobs)."""
        if self.recipe_text is not None:
            return {"recipe_text": self.recipe_text}
        if self.target_bpw is not None:
            return {"target_bpw": self.target_bpw}
        return {"recipe": self.recipe}


@dataclass(frozen=True)
class Sweep:
    path: Path                       # the sweep file ("<built-in>" files: their name)
    out: Path
    models: tuple[str, ...]
    variants: tuple[Variant, ...]
    ref: str                         # a variant label
    dtype: str | None = None         # storage dtype of converted folders
    eval: dict = field(default_factory=dict)      # EvalConfig settings (tasks normalised to a list)
    measure: dict = field(default_factory=dict)   # tune.measure settings

    @property
    def tasks(self) -> list[str]:
        return self.eval["tasks"]

    @property
    def ref_variant(self) -> Variant:
        return next(v for v in self.variants if v.label == self.ref)

    @property
    def wants_base(self) -> bool:
        """KLD needs the unquantized source as the base."""
        return "kld" in self.tasks


def slug(text: str) -> str:
    """A file-name-safe form of a model ref or variant label."""
    name = Path(text).name if "/" in text and Path(text).exists() else text
    out = "".join(c if c.isalnum() or c in "._-" else "-" for c in name.replace("@", "-"))
    return out.strip("-.") or hashlib.sha256(text.encode()).hexdigest()[:8]


def _typed(src: str, table: str, data: dict, allowed: dict) -> dict:
    for key, value in data.items():
        if key not in allowed:
            raise MixqError(f"{src}: unknown key {table}{key!r}; allowed: {', '.join(sorted(allowed))}")
        types = allowed[key] if isinstance(allowed[key], tuple) else (allowed[key],)
        if isinstance(value, bool) or not isinstance(value, types):
            want = " or ".join(t.__name__ for t in types)
            raise MixqError(f"{src}: {table}{key} = {value!r} must be a {want}")
    return dict(data)


def _variant(src: str, base_dir: Path, text: str) -> Variant:
    if not isinstance(text, str) or not text:
        raise MixqError(f"{src}: variants must be strings (a recipe name, a recipe file, or plan@BPW), not {text!r}")
    if text.startswith(PLAN_PREFIX):
        try:
            bpw = float(text[len(PLAN_PREFIX):])
        except ValueError:
            bpw = math.nan
        if not (math.isfinite(bpw) and bpw > 0):
            raise MixqError(f"{src}: variant {text!r}: write plan@BPW with a positive bits per weight, e.g. plan@4.5")
        return Variant(text, target_bpw=bpw)
    if text in builtin_recipes():
        return Variant(text, recipe=text)
    file = (base_dir / text).expanduser()
    if file.suffix == ".toml" and file.is_file():
        body = file.read_text()
        parse_recipe(body, str(file))   # a bad recipe file is refused now, naming it
        return Variant(text, recipe_text=body)
    raise MixqError(f"{src}: variant {text!r} is neither a built-in recipe (`mixq recipes`), a recipe .toml file "
                    f"next to the sweep file, nor plan@BPW")


def _eval_settings(src: str, base_dir: Path, data: dict) -> dict:
    ev = _typed(src, "eval.", data, EVAL_KEYS)
    ev["tasks"] = parse_tasks(ev.get("tasks", "all"))
    ev.setdefault("windows", DEFAULT_WINDOWS)
    for key in ("limit", "sample", "windows", "ctx", "kld_topk", "batch_size", "shards", "threads"):
        if key in ev and ev[key] < (0 if key in ("windows", "kld_topk") else 1):
            raise MixqError(f"{src}: eval.{key} = {ev[key]} must be positive")
    if "limit" in ev and "sample" in ev:
        raise MixqError(f"{src}: give eval.limit or eval.sample, not both")
    for key in EVAL_PATHS:
        if key in ev:
            ev[key] = _path_setting(src, base_dir, "eval", key, ev[key])
    return ev


def _path_setting(src: str, base_dir: Path, table: str, key: str, value: str) -> str:
    p = (base_dir / value).expanduser().resolve()
    if not p.exists():
        raise MixqError(f"{src}: {table}.{key} = {value!r}: {p} does not exist")
    return str(p)


def _measure_settings(src: str, base_dir: Path, data: dict) -> dict:
    ms = _typed(src, "measure.", data, MEASURE_KEYS)
    if "calib" in ms:
        ms["calib"] = _path_setting(src, base_dir, "measure", "calib", ms["calib"])
    if ms.get("method", "fisher") not in ("fisher", "direct"):
        raise MixqError(f"{src}: measure.method = {ms['method']!r}: use fisher or direct")
    bad = [m for m in ms.get("modes", []) if m not in FLOAT_MODES]
    if bad:
        raise MixqError(f"{src}: measure.modes: {bad[0]!r} is not one of {', '.join(FLOAT_MODES)}")
    return ms


def _models(src: str, base_dir: Path, models) -> tuple[str, ...]:
    if not isinstance(models, list) or not models or not all(isinstance(m, str) and m for m in models):
        raise MixqError(f"{src}: models must be a non-empty list of model refs, e.g. models = [\"smollm2-135m\"]")
    out = []
    for m in models:   # a path next to the sweep file is taken relative to it; other refs as written
        if "@" in m:
            raise MixqError(f"{src}: model {m!r}: list the source without @RECIPE and the recipe under variants")
        local = base_dir / m
        out.append(str(local.resolve()) if local.exists() else m)
    if len(set(out)) < len(out):
        raise MixqError(f"{src}: a model is listed twice in models")
    by_slug: dict[str, str] = {}
    for m in out:   # the slug names the model's report and converted folders: two models must not share one
        if slug(m) in by_slug:
            raise MixqError(f"{src}: models {by_slug[slug(m)]!r} and {m!r} would share the folder name "
                            f"{slug(m)!r}; rename or move one of them")
        by_slug[slug(m)] = m
    return tuple(out)


def _merged(data: dict, settings: dict) -> dict:
    out = dict(data)
    for key, value in settings.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            value = _merged(out[key], value)
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def parse_sweep(text: str, base_dir: Path, src: str = "<sweep>", settings: dict | None = None) -> Sweep:
    """Parse and check sweep TOML text; relative paths are taken from `base_dir`.

    `settings` replace the file's (same keys; the eval and measure tables key by key; None removes a key)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise MixqError(f"{src}: not valid TOML ({e}); fix the sweep file") from None
    data = _merged(data, settings or {})
    unknown = sorted(set(data) - TOP_KEYS)
    if unknown:
        raise MixqError(f"{src}: unknown key {unknown[0]!r}; a sweep file has {', '.join(sorted(TOP_KEYS))}")
    models = _models(src, base_dir, data.get("models"))
    raw = data.get("variants")
    if not isinstance(raw, list) or not raw:
        raise MixqError(f"{src}: variants must be a non-empty list, e.g. variants = [\"q8-hi\", \"q6-hi\"]")
    variants = tuple(_variant(src, base_dir, v) for v in raw)
    if len({v.slug for v in variants}) < len(variants):
        raise MixqError(f"{src}: two variants have the same name; list each once")
    ref = data.get("ref", variants[0].label)
    if ref not in [v.label for v in variants]:
        raise MixqError(f"{src}: ref = {ref!r} is not one of the variants ({', '.join(v.label for v in variants)})")
    dtype = data.get("dtype")
    if dtype is not None and dtype not in STORAGE_DTYPES:
        raise MixqError(f"{src}: dtype = {dtype!r}: use one of {', '.join(STORAGE_DTYPES)}")
    out = data.get("out", "mixq-sweep")
    if not isinstance(out, str) or not out:
        raise MixqError(f"{src}: out must be a folder name")
    for table in ("eval", "measure"):
        if not isinstance(data.get(table, {}), dict):
            raise MixqError(f"{src}: [{table}] must be a table")
    return Sweep(Path(src), (base_dir / out).expanduser().resolve(), models, variants, ref, dtype,
                 _eval_settings(src, base_dir, data.get("eval", {})),
                 _measure_settings(src, base_dir, data.get("measure", {})))


def load_sweep(path, out: str | Path | None = None, settings: dict | None = None) -> Sweep:
    """Read a sweep file (or a built-in one by name, `builtin_sweeps`); `out` replaces its output folder,
    `settings` its other settings (as `parse_sweep`). A built-in sweep's paths are taken from the current folder."""
    p = Path(path)
    builtin = not p.is_file() and str(path) in builtin_sweeps()
    if builtin:
        p = builtin_sweeps()[str(path)]
    if not p.is_file():
        raise MixqError(f"{path}: no such sweep file (built-in ones: {', '.join(builtin_sweeps())})")
    src = f"{path} (built-in sweep)" if builtin else str(p)
    sweep = parse_sweep(p.read_text(), Path.cwd() if builtin else p.parent, src, settings)
    sweep = replace(sweep, path=p)
    if out is not None:
        sweep = replace(sweep, out=Path(out).expanduser().resolve())
    return sweep


def builtin_sweeps() -> dict[str, Path]:
    """name -> file of the sweeps shipped with mixq (`demo`: what `mixq demo` builds)."""
    folder = Path(__file__).with_name("builtin")
    return {p.stem: p for p in sorted(folder.glob("*.toml"))}

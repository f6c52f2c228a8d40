"""Recipes: which tensor gets which precision, and the per-tensor plan they give for a model.

A recipe is a TOML file (the built-ins live in mixq/recipes/):

    [recipe]
    name = "my-recipe"
    description = "one line"
    bits = 6                # default spec for every quantizable tensor ...
    group_size = 32
    # keep = true           # ... or keep them all unquantized by default
    # dtype = "bfloat16"    # optional: dtype the output tensors are stored in (convert --dtype wins)
    # tied_head = true      # tied embeddings: rules naming lm_head also apply to embed_tokens

    [[rule]]                          # ordered; the first matching rule wins
    pattern = "*.self_attn.v_proj"    # glob on the module path (tensor name minus ".weight");
                                      # a list of globs matches if any does
    # regex = true                    # pattern(s) are regular expressions (re.search)
    every = 4                         # layer selectors (all given ones must hold):
    offset = 0                        #   every = N, offset = O: (layer - O) % N == 0
                                      #   first = K: layer < K;  last = K: layer >= n - K
                                      #   layers = [0, 5, 9];  layer_range = [a, b]: a <= layer < b
    bits = 8                          # spec (group_size defaults to the recipe's, else 64) ...
    # keep = true                     # ... or keep the tensor unquantized

Selector values are integers or expressions in `n`, the model's layer count, using + - * // %
(e.g. first = "n // 8"). The layer of a module is the first all-digit component of its path
(`model.layers.7.mlp.down_proj` -> 7), as mlx-lm's mixed predicates read it; a rule with a layer
selector never matches a module outside the layers.

Planning (`plan_model`) adds what no recipe can override:
  * never quantized: tensors not named `*.weight` (biases...), norms, 1-D tensors, 3-D tensors
    other than stacked MoE experts (`switch_mlp` / `experts`), non-float tensors, and tensors whose
    input (last) dimension the group size does not divide (the reason says so);
  * MoE router gates (qwen3_moe `mlp.gate`, gpt_oss `mlp.router`) get 8 bits, group 64, as
    mlx-lm's own `quant_predicate` for these models does, unless a matching rule names them
    (its pattern contains "gate" / "router") or the recipe keeps them;
  * tied embeddings (no `lm_head` tensor): the embedding is also the output head, so with
    `tied_head = true` (the default) the first rule matching `lm_head`, if any, also applies to
    `embed_tokens`, and the higher precision of the two specs (more bits, then smaller group;
    keep beats any) wins.
"""

from __future__ import annotations

import ast
import fnmatch
import operator
import re
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from .errors import MixqError

BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
RECIPE_KEYS = {"name", "description", "bits", "group_size", "keep", "dtype", "tied_head"}
RULE_KEYS = {"pattern", "regex", "every", "offset", "first", "last", "layers", "layer_range",
             "bits", "group_size", "keep"}
SELECTOR_KEYS = ("every", "offset", "first", "last", "layers", "layer_range")
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int64": 8, "int32": 4,
               "uint32": 4, "int16": 2, "uint16": 2, "int8": 1, "uint8": 1, "bool": 1,
               "float8_e4m3fn": 1, "float8_e5m2": 1}
QUANT_DTYPES = ("float32", "float16", "bfloat16")
# model_type -> suffix of the router module path, as in mlx-lm's per-model quant_predicate
ROUTERS = {"qwen3_moe": "mlp.gate", "gpt_oss": "router"}
ROUTER_SPEC_BITS, ROUTER_SPEC_GROUP = 8, 64
_BUILTIN_ORDER = ("bf16", "q", "mixed", "qx")


@dataclass(frozen=True)
class Spec:
    bits: int
    group_size: int

    def __str__(self):
        return f"{self.bits}-bit g{self.group_size}"


def _precision(spec: Spec | None):
    """Sort key: larger = more precise (keep beats every spec)."""
    return (99, 0) if spec is None else (spec.bits, -spec.group_size)


# ---------------------------------------------------------------- layer selector expressions

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
        ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod}


def _eval(node, n):
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if isinstance(node, ast.Name) and node.id == "n":
        if n is None:
            raise _NeedsLayers()
        return n
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_eval(node.left, n), _eval(node.right, n))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_eval(node.operand, n)
    raise ValueError("only integers, n, + - * // % and parentheses are allowed")


class _NeedsLayers(Exception):
    pass


@dataclass(frozen=True)
class _Expr:
    """An integer, or an expression in n (the model's layer count)."""
    text: str
    tree: object

    def __call__(self, n):
        return _eval(self.tree, n)


def _expr(value, where: str) -> _Expr:
    if type(value) is int:
        value = str(value)
    if not isinstance(value, str):
        raise MixqError(f"{where}: expected an integer or an expression in n, got {value!r}")
    try:
        tree = ast.parse(value, mode="eval").body
        for n in (1, 8, 37):
            _eval(tree, n)
    except (SyntaxError, ValueError, ZeroDivisionError) as e:
        raise MixqError(f"{where}: bad layer expression {value!r} ({e})") from None
    return _Expr(value, tree)


# ---------------------------------------------------------------- rules and recipes

def layer_index(module_path: str) -> int | None:
    """The first all-digit component of the path (the decoder layer), or None."""
    for part in module_path.split("."):
        if part.isdigit():
            return int(part)
    return None


@dataclass(frozen=True)
class Rule:
    index: int                      # 1-based position in the file
    patterns: tuple[str, ...]
    regex: bool
    spec: Spec | None               # None = keep
    selectors: tuple[tuple[str, object], ...] = ()
    _compiled: tuple = field(default=(), compare=False, repr=False)
    where: str = ""                 # "FILE: rule I", for messages

    def matches_path(self, path: str) -> bool:
        if self.regex:
            return any(r.search(path) for r in self._compiled)
        return any(fnmatch.fnmatchcase(path, p) for p in self.patterns)

    def matches_layer(self, layer: int | None, n_layers: int | None) -> bool:
        if not self.selectors:
            return True
        if layer is None:
            return False
        sel = dict(self.selectors)
        n = n_layers
        if "first" in sel and not layer < sel["first"](n):
            return False
        if "last" in sel:
            if n is None:
                raise _NeedsLayers()
            if not layer >= n - sel["last"](n):
                return False
        if "layers" in sel and layer not in {e(n) for e in sel["layers"]}:
            return False
        if "layer_range" in sel:
            a, b = (e(n) for e in sel["layer_range"])
            if not a <= layer < b:
                return False
        if "every" in sel:
            every = sel["every"](n)
            offset = sel["offset"](n) if "offset" in sel else 0
            if every <= 0:
                raise MixqError(f"{self.where}: every = {sel['every'].text} is {every} for a {n}-layer model; "
                                f"it must be positive")
            if (layer - offset) % every != 0:
                return False
        return True

    def names(self, word: str) -> bool:
        """Whether a pattern spells out `word` (used for router gates)."""
        return any(word in p for p in self.patterns)

    def describe(self) -> str:
        pat = self.patterns[0] if len(self.patterns) == 1 else "[" + ", ".join(self.patterns) + "]"
        parts = [f"rule {self.index}: {pat}"]
        for k, v in self.selectors:
            if isinstance(v, tuple):
                v = "[" + ", ".join(e.text for e in v) + "]"
            else:
                v = v.text
            parts.append(f"{k}={v}")
        return " ".join(parts)


@dataclass
class Recipe:
    name: str
    description: str
    text: str
    default: Spec | None
    rules: list[Rule] = field(default_factory=list)
    path: str | None = None         # file it was read from ("builtin:NAME" for built-ins)
    dtype: str | None = None        # dtype to store tensors in, if the recipe says
    tied_head: bool = True

    def match(self, module_path: str, *, n_layers: int | None) -> tuple[Rule | None, Spec | None]:
        """(first matching rule or None for the default, its spec; None spec = keep)."""
        layer = layer_index(module_path)
        for rule in self.rules:
            if not rule.matches_path(module_path):
                continue
            try:
                ok = rule.matches_layer(layer, n_layers)
            except _NeedsLayers:
                raise MixqError(f"recipe {self.name}: {rule.describe()} needs the model's layer count "
                                f"(num_hidden_layers)") from None
            if ok:
                return rule, rule.spec
        return None, self.default

    def spec_for(self, module_path: str, *, n_layers: int | None) -> Spec | None:
        """The spec of the first matching rule (else the default); None = keep unquantized."""
        return self.match(module_path, n_layers=n_layers)[1]


def _spec(table: dict, where: str, default_group: int) -> Spec | None:
    keep = table.get("keep", False)
    if not isinstance(keep, bool):
        raise MixqError(f"{where}: keep must be true or false, got {keep!r}")
    if keep:
        if "bits" in table or "group_size" in table:
            raise MixqError(f"{where}: give either keep = true or bits/group_size, not both")
        return None
    if "bits" not in table:
        raise MixqError(f"{where}: needs bits (and optionally group_size) or keep = true")
    bits, gs = table["bits"], table.get("group_size", default_group)
    if type(bits) is not int or bits not in BITS:
        raise MixqError(f"{where}: bits {bits!r} not in {{2, 3, 4, 5, 6, 8}}")
    if type(gs) is not int or gs not in GROUP_SIZES:
        raise MixqError(f"{where}: group_size {gs!r} not in {{32, 64, 128}}")
    return Spec(bits, gs)


def _rule(i: int, table, src: str, default_group: int) -> Rule:
    where = f"{src}: rule {i}"
    if not isinstance(table, dict):
        raise MixqError(f"{where}: each [[rule]] must be a table")
    unknown = sorted(set(table) - RULE_KEYS)
    if unknown:
        raise MixqError(f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(sorted(RULE_KEYS))})")
    pats = table.get("pattern")
    if isinstance(pats, str):
        pats = [pats]
    if not pats or not isinstance(pats, list) or not all(isinstance(p, str) and p for p in pats):
        raise MixqError(f"{where}: needs pattern = \"glob\" (or a list of them)")
    regex = table.get("regex", False)
    if not isinstance(regex, bool):
        raise MixqError(f"{where}: regex must be true or false")
    compiled = ()
    if regex:
        try:
            compiled = tuple(re.compile(p) for p in pats)
        except re.error as e:
            raise MixqError(f"{where}: bad regex {e.pattern!r}: {e}") from None
    if "offset" in table and "every" not in table:
        raise MixqError(f"{where}: offset needs every")
    sels = []
    for key in SELECTOR_KEYS:
        if key not in table:
            continue
        v, w = table[key], f"{where}: {key}"
        if key in ("layers", "layer_range"):
            if not isinstance(v, list) or (key == "layer_range" and len(v) != 2) or not v:
                shape = "[a, b]" if key == "layer_range" else "a non-empty list"
                raise MixqError(f"{w}: expected {shape}, got {v!r}")
            sels.append((key, tuple(_expr(e, w) for e in v)))
        else:
            sels.append((key, _expr(v, w)))
    spec = _spec(table, f"{where} ({pats[0]})", default_group)
    return Rule(i, tuple(pats), regex, spec, tuple(sels), compiled, where)


def parse_recipe(text: str, src: str = "<recipe>", name: str | None = None) -> Recipe:
    """Parse recipe TOML text; `src` names the file in error messages."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise MixqError(f"{src}: not valid TOML ({e})") from None
    unknown = sorted(set(data) - {"recipe", "rule"})
    if unknown:
        raise MixqError(f"{src}: unknown key {unknown[0]!r} (a recipe has a [recipe] table and [[rule]] entries)")
    head = data.get("recipe")
    if not isinstance(head, dict):
        raise MixqError(f"{src}: missing the [recipe] table (name, description, bits/group_size or keep)")
    unknown = sorted(set(head) - RECIPE_KEYS)
    if unknown:
        raise MixqError(f"{src}: [recipe]: unknown key {unknown[0]!r} (allowed: {', '.join(sorted(RECIPE_KEYS))})")
    default = _spec(head, f"{src}: [recipe]", 64)
    dtype = head.get("dtype")
    if dtype is not None and dtype not in QUANT_DTYPES:
        raise MixqError(f"{src}: [recipe]: dtype {dtype!r} not in {{float32, float16, bfloat16}}")
    tied_head = head.get("tied_head", True)
    if not isinstance(tied_head, bool):
        raise MixqError(f"{src}: [recipe]: tied_head must be true or false")
    for key in ("name", "description"):
        if key in head and not isinstance(head[key], str):
            raise MixqError(f"{src}: [recipe]: {key} must be a string")
    rules = data.get("rule", [])
    if not isinstance(rules, list):
        raise MixqError(f"{src}: rules must be written as [[rule]] entries")
    group = default.group_size if default else 64
    return Recipe(name=head.get("name") or name or Path(src).stem, description=head.get("description", ""),
                  text=text, default=default, rules=[_rule(i + 1, r, src, group) for i, r in enumerate(rules)],
                  path=src, dtype=dtype, tied_head=tied_head)


def _builtin_dir():
    return resources.files("mixq") / "recipes"


def _builtin_key(name: str):
    fam = "mixed" if name.startswith("mixed") else "qx" if name.startswith("qx") else \
        "q" if name.startswith("q") else name
    hi = name.endswith("-hi")
    digits = [int(c) for c in name if c.isdigit()]
    rank = _BUILTIN_ORDER.index(fam) if fam in _BUILTIN_ORDER else len(_BUILTIN_ORDER)
    return (rank, hi, digits, name)


@lru_cache(maxsize=None)
def _builtin_names() -> tuple[str, ...]:
    names = [p.name[:-5] for p in _builtin_dir().iterdir() if p.name.endswith(".toml")]
    return tuple(sorted(names, key=_builtin_key))


@lru_cache(maxsize=None)
def _load_builtin(name: str) -> Recipe:
    text = (_builtin_dir() / f"{name}.toml").read_text(encoding="utf-8")
    return parse_recipe(text, f"builtin:{name}", name)


def builtin_recipes() -> dict[str, str]:
    """name -> description of the recipes shipped with mixq."""
    return {n: _load_builtin(n).description for n in _builtin_names()}


def load_recipe(name_or_path) -> Recipe:
    """A built-in recipe by name, or a recipe TOML file."""
    if isinstance(name_or_path, Recipe):
        return name_or_path
    s = str(name_or_path)
    if s in _builtin_names():
        return _load_builtin(s)
    p = Path(s).expanduser()
    if p.is_file():
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise MixqError(f"{p}: cannot read recipe ({e})") from None
        return parse_recipe(text, str(p), p.stem)
    if s.endswith(".toml") or "/" in s:
        raise MixqError(f"{s}: recipe file not found")
    raise MixqError(f"unknown recipe {s!r}: give a recipe .toml file or one of: {', '.join(_builtin_names())}")


# ---------------------------------------------------------------- planning

@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str          # torch name, e.g. "bfloat16"


@dataclass
class TensorPlan:
    name: str
    shape: tuple[int, ...]
    dtype: str          # dtype the tensor (or its scales/biases) is stored in
    spec: Spec | None   # None = kept unquantized
    reason: str
    nbytes: int

    @property
    def module_path(self) -> str:
        return self.name[:-len(".weight")] if self.name.endswith(".weight") else self.name

    @property
    def params(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def _dtype_name(dtype) -> str:
    s = str(dtype)
    return s[len("torch."):] if s.startswith("torch.") else s


def _dtype_bytes(dtype: str, name: str) -> int:
    try:
        return DTYPE_BYTES[dtype]
    except KeyError:
        raise MixqError(f"tensor {name}: unknown dtype {dtype!r}") from None


def _is_norm(path: str) -> bool:
    last = path.rsplit(".", 1)[-1]
    return "norm" in last or last in ("ln_f", "ln_1", "ln_2")


def _is_experts(path: str) -> bool:
    parts = path.split(".")
    return "switch_mlp" in parts or "experts" in parts


def _n_layers(config: dict, tensors) -> int | None:
    for cfg in (config, config.get("text_config") or {}):
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if isinstance(cfg.get(key), int):
                return cfg[key]
    idx = [layer_index(t.name) for t in tensors]
    idx = [i for i in idx if i is not None]
    return max(idx) + 1 if idx else None


@dataclass
class Plan:
    recipe: Recipe
    tensors: list[TensorPlan]
    n_layers: int | None = None
    tied: bool = False

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def total_params(self) -> int:
        return sum(t.params for t in self.tensors)

    @property
    def quantized(self) -> list[TensorPlan]:
        return [t for t in self.tensors if t.spec is not None]

    @property
    def quantized_params(self) -> int:
        return sum(t.params for t in self.quantized)

    @property
    def quantized_bytes(self) -> int:
        return sum(t.nbytes for t in self.quantized)

    @property
    def bits_per_weight(self) -> float:
        """Whole model: all stored bytes (incl. scales, biases, kept tensors) * 8 / all parameters."""
        return self.total_bytes * 8 / self.total_params if self.total_params else 0.0

    @property
    def bits_per_weight_quantized(self) -> float:
        """Quantized tensors only, scales and biases included (4-bit g64 with bf16 scales = 4.5)."""
        q = self.quantized_params
        return self.quantized_bytes * 8 / q if q else 0.0

    def default_spec(self) -> Spec | None:
        """The spec written as config.json's top-level default: the recipe's, else the commonest used."""
        if self.recipe.default is not None:
            return self.recipe.default
        counts = Counter()
        for t in self.quantized:
            counts[t.spec] += t.params
        return max(counts, key=lambda s: (counts[s], _precision(s))) if counts else None

    def quantization_config(self) -> dict | None:
        """config.json "quantization" (also written as "quantization_config"), as mlx_lm writes and reads it:
        the default spec, plus `module_path: {group_size, bits}` for every quantized module that differs."""
        if not self.quantized:
            return None
        d = self.default_spec()
        cfg = {"group_size": d.group_size, "bits": d.bits, "mode": "affine"}
        for t in self.quantized:
            if t.spec != d:
                cfg[t.module_path] = {"group_size": t.spec.group_size, "bits": t.spec.bits}
        return cfg

    def specs(self) -> dict[str, dict | None]:
        """tensor name -> {"bits", "group_size"} or None (kept): for provenance files."""
        return {t.name: ({"bits": t.spec.bits, "group_size": t.spec.group_size} if t.spec else None)
                for t in self.tensors}

    def table_rows(self) -> list[dict]:
        """One dict per tensor for printing: path, shape, dtype, bits, group_size (None if kept), mb, reason."""
        return [{"path": t.name, "shape": "x".join(map(str, t.shape)), "dtype": t.dtype,
                 "bits": t.spec.bits if t.spec else None,
                 "group_size": t.spec.group_size if t.spec else None,
                 "mb": t.nbytes / 1e6, "reason": t.reason} for t in self.tensors]

    def summary(self) -> dict:
        """Totals, plus the share of parameters per spec ("6-bit g32", ..., "kept")."""
        by = {}
        for t in self.tensors:
            key = str(t.spec) if t.spec else "kept"
            e = by.setdefault(key, {"tensors": 0, "params": 0, "bytes": 0})
            e["tensors"] += 1
            e["params"] += t.params
            e["bytes"] += t.nbytes
        for e in by.values():
            e["share"] = e["params"] / self.total_params if self.total_params else 0.0
        return {"recipe": self.recipe.name, "n_tensors": len(self.tensors),
                "n_quantized": len(self.quantized), "total_bytes": self.total_bytes,
                "total_params": self.total_params, "quantized_params": self.quantized_params,
                "quantized_bytes": self.quantized_bytes, "bits_per_weight": self.bits_per_weight,
                "bits_per_weight_quantized": self.bits_per_weight_quantized,
                "n_layers": self.n_layers, "tied_embeddings": self.tied,
                "by_spec": dict(sorted(by.items(), key=lambda kv: -kv[1]["params"]))}


def plan_model(tensors: list[TensorInfo], recipe: Recipe | str, config: dict, *, dtype: str | None = None) -> Plan:
    """Decide every tensor's spec (or keep) and its stored size.

    `dtype`: the dtype floating tensors are stored in (convert --dtype); default: the recipe's
    `dtype` if it has one, else each tensor's own.
    """
    recipe = load_recipe(recipe)
    config = config or {}
    target = _dtype_name(dtype) if dtype is not None else recipe.dtype
    n_layers = _n_layers(config, tensors)
    model_type = config.get("model_type") or (config.get("text_config") or {}).get("model_type")
    router_suffix = ROUTERS.get(model_type)
    names = {t.name for t in tensors}
    has_head = any(n == "lm_head.weight" or n.endswith(".lm_head.weight") for n in names)
    tied = not has_head and config.get("tie_word_embeddings", True) is not False \
        and any(n.endswith("embed_tokens.weight") for n in names)

    out = []
    for t in tensors:
        shape = tuple(int(d) for d in t.shape)
        dt = _dtype_name(t.dtype)
        if target is not None and dt in ("float32", "float16", "bfloat16", "float64"):
            dt = target
        nb = _dtype_bytes(dt, t.name)
        numel = 1
        for d in shape:
            numel *= d
        path = t.name[:-len(".weight")] if t.name.endswith(".weight") else t.name
        spec, reason = None, ""
        if not t.name.endswith(".weight"):
            reason = "bias" if t.name.endswith(".bias") else "not a .weight tensor"
        elif _is_norm(path):
            reason = "norm"
        elif len(shape) == 1:
            reason = "1-D tensor"
        elif len(shape) == 3 and not _is_experts(path):
            reason = "3-D tensor that is not stacked experts"
        elif len(shape) not in (2, 3):
            reason = f"{len(shape)}-D tensor"
        elif dt not in QUANT_DTYPES:
            reason = f"{dt} tensor"
        else:
            rule, spec = recipe.match(path, n_layers=n_layers)
            reason = rule.describe() if rule else "default"
            if tied and recipe.tied_head and path.endswith("embed_tokens"):
                head_rule, head_spec = recipe.match("lm_head", n_layers=n_layers)
                if head_rule is not None and _precision(head_spec) > _precision(spec):
                    spec = head_spec
                    reason = f"tied head: {head_rule.describe()}"
            if router_suffix and path.endswith(router_suffix) and spec is not None \
                    and not (rule and rule.names(router_suffix.rsplit(".", 1)[-1])):
                spec = Spec(ROUTER_SPEC_BITS, ROUTER_SPEC_GROUP)
                reason = f"MoE router: {spec} (as mlx-lm's {model_type} predicate)"
            if spec is None:
                reason = "kept: " + ("recipe default" if reason == "default" else reason)
            elif shape[-1] % spec.group_size:
                reason = f"input dim {shape[-1]} not divisible by group {spec.group_size}: kept"
                spec = None
        if spec is not None:  # packed words + scales + biases (in the tensor's dtype), = quantize.quantized_nbytes
            nbytes = numel * spec.bits // 8 + 2 * (numel // spec.group_size) * nb
        else:
            nbytes = numel * nb
        out.append(TensorPlan(t.name, shape, dt, spec, reason, nbytes))
    return Plan(recipe, out, n_layers=n_layers, tied=tied)


# ---------------------------------------------------------------- `mixq recipes`

def add_arguments(parser):
    parser.add_argument("name", nargs="?", help="a built-in recipe name or a recipe .toml file: print its TOML")


def cli(args):
    if args.name:
        recipe = load_recipe(args.name)
        print(recipe.text, end="" if recipe.text.endswith("\n") else "\n")
        return 0
    items = builtin_recipes()
    width = max(map(len, items))
    print("Built-in recipes (mixq recipes NAME prints one; any .toml file with the same format works too):")
    for name, desc in items.items():
        print(f"  {name:<{width}}  {desc}")
    return 0

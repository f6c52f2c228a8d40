"""Recipes: which tensor gets which precision (`quant.plan` turns one into a per-tensor plan for a model).

A recipe is a TOML file (the built-ins live in mixq/quant/recipes/):

    [recipe]
    name = "my-recipe"
    description = "one line"
    bits = 6                # default spec for every quantizable tensor ...
    group_size = 32
    # mode = "mxfp4"        # ... or a float mode instead of bits/group_size ...
    # keep = true           # ... or keep them all unquantized by default
    # dtype = "bfloat16"    # optional: dtype the output tensors are stored in (convert --dtype wins;
                            # `mixq plan` writes the dtype its sizes count)
    # tied_head = true      # tied embeddings: rules naming lm_head also apply to embed_tokens
    # method = "rtn"        # how quantized tensors are quantized by default: "rtn" (round to nearest),
                            # "gptq" (tune/gptq.py), "awq" (tune/awq.py), "awq+gptq" (AWQ's scales folded,
                            # then GPTQ), "dwq", "gptq+dwq", "awq+dwq", "awq+gptq+dwq" (tune/dwq.py: the start
                            # quant, then scales and biases distilled); the calibrated ones run in `mixq convert`

    [[rule]]                          # ordered; the first matching rule wins
    pattern = "*.self_attn.v_proj"    # glob on the module path (tensor name minus ".weight");
                                      # a list of globs matches if any does
    # regex = true                    # pattern(s) are regular expressions (re.search)
    every = 4                         # layer selectors (all given ones must hold):
    offset = 0                        #   every = N, offset = O: (layer - O) % N == 0
                                      #   first = K: layer < K;  last = K: layer >= n - K
                                      #   layers = [0, 5, 9];  layer_range = [a, b]: a <= layer < b
    bits = 8                          # spec (group_size defaults to the recipe's, else 64) ...
    # mode = "mxfp8"                  # ... or a quantization mode (below) ...
    # keep = true                     # ... or keep the tensor unquantized
    # keep_source = true              # tensors the checkpoint ships quantized in a form MLX holds (gpt-oss's
                                      # MXFP4 experts) are kept as they ship, bit for bit; others get the spec
    # method = "gptq"                 # this rule's quantization method (not with keep; default: the recipe's;
                                      # a dwq method on a float mode is its start: dwq tunes affine tensors only)

Modes (mlx 0.32's `mx.quantize(..., mode=)`; a spec's mode is "affine" unless it says otherwise, a rule
does not inherit the default's): "affine" (bits 2, 3, 4, 5, 6, 8; group_size 32, 64, 128: a scale and a
bias per group in the tensor's dtype) and the float modes, each with one bits/group_size pair, which
may be left out: "mxfp4" (4 bits, group 32: 4.25 bits per weight), "nvfp4" (4, 16: 4.5) and "mxfp8"
(8, 32: 8.25), one uint8 scale per group, no bias. Another bits/group_size with a float mode is an
error naming the rule. An affine rule's group_size defaults to the recipe's if affine allows it, else 64.

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
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from mixq.errors import MixqError
from mixq.quant.spec import BITS, FLOAT_MODES, GROUP_SIZES, MODES, QUANT_DTYPES, Spec
from mixq.quant.tensors import layer_index

RECIPE_KEYS = {"name", "description", "bits", "group_size", "mode", "keep", "dtype", "tied_head", "method"}
RULE_KEYS = {"pattern", "regex", "every", "offset", "first", "last", "layers", "layer_range",
             "bits", "group_size", "mode", "keep", "keep_source", "method"}
# rtn: round to nearest (quant/quantize.py); the others need calibration: gptq (tune/gptq.py), awq (tune/awq.py),
# awq+gptq (AWQ's scales folded, then GPTQ on the scaled weights: tune/awq.py); dwq (round to nearest, then each
# group's scale and bias tuned by distillation: tune/dwq.py) and gptq+dwq, awq+dwq, awq+gptq+dwq (that start, then dwq)
METHODS = ("rtn", "gptq", "awq", "awq+gptq", "dwq", "gptq+dwq", "awq+dwq", "awq+gptq+dwq")
# the dwq methods and their start methods; dwq tunes affine scales and biases only, so a float-mode tensor planned
# with one gets its start alone (`Recipe.method_for`)
DWQ_METHODS = {"dwq": "rtn", "gptq+dwq": "gptq", "awq+dwq": "awq", "awq+gptq+dwq": "awq+gptq"}
SELECTOR_KEYS = ("every", "offset", "first", "last", "layers", "layer_range")
_BUILTIN_ORDER = ("bf16", "q", "fp", "mixed", "qx")


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
    where: str = ""

    def __call__(self, n):
        try:
            return _eval(self.tree, n)
        except ZeroDivisionError:
            raise MixqError(f"{self.where}: {self.text!r} divides by zero for a model of {n} layers; "
                            "change the expression") from None


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
    return _Expr(value, tree, where)


# ---------------------------------------------------------------- rules and recipes

@dataclass(frozen=True)
class Rule:
    index: int                      # 1-based position in the file
    patterns: tuple[str, ...]
    regex: bool
    spec: Spec | None               # None = keep
    selectors: tuple[tuple[str, object], ...] = ()
    _compiled: tuple = field(default=(), compare=False, repr=False)
    where: str = ""                 # "FILE: rule I", for messages
    keep_source: bool = False       # tensors that ship quantized in a form MLX holds are kept as they ship
    method: str | None = None       # quantization method; None: the recipe's

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
    method: str = "rtn"             # default quantization method of quantized tensors (METHODS)

    def method_for(self, rule: Rule | None, spec: Spec | None) -> str:
        """The method a tensor matched by `rule` (None: the default) with `spec` is quantized with: kept tensors are
        always "rtn"; gptq, awq and awq+gptq apply to affine and float-mode specs; a dwq method on a float mode is
        its start (DWQ_METHODS: dwq tunes affine scales and biases only)."""
        if spec is None:
            return "rtn"
        method = (rule.method if rule is not None and rule.method else None) or self.method
        return method if spec.mode == "affine" else DWQ_METHODS.get(method, method)

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
        if "bits" in table or "group_size" in table or "mode" in table:
            raise MixqError(f"{where}: give either keep = true or bits/group_size/mode, not both")
        return None
    mode = table.get("mode", "affine")
    if not isinstance(mode, str) or mode not in MODES:
        raise MixqError(f"{where}: mode {mode!r} not in {{{', '.join(MODES)}}}")
    if mode in FLOAT_MODES:
        b, g = FLOAT_MODES[mode]
        bits, gs = table.get("bits", b), table.get("group_size", g)
        if (bits, gs) != (b, g) or type(bits) is not int or type(gs) is not int:
            raise MixqError(f"{where}: mode {mode} takes bits = {b} and group_size = {g} only (mlx 0.32), "
                            f"got bits = {bits!r}, group_size = {gs!r}")
        return Spec(b, g, mode)
    if "bits" not in table:
        raise MixqError(f"{where}: needs bits (and optionally group_size), a mode, or keep = true")
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
    keep_source = table.get("keep_source", False)
    if not isinstance(keep_source, bool):
        raise MixqError(f"{where}: keep_source must be true or false, got {keep_source!r}")
    method = _method(table, f"{where} ({pats[0]})")
    if method not in (None, "rtn") and spec is None:
        raise MixqError(f"{where} ({pats[0]}): method {method!r} needs a quantized spec (bits/group_size or a "
                        f"mode), not keep; drop the method or give bits")
    return Rule(i, tuple(pats), regex, spec, tuple(sels), compiled, where, keep_source=keep_source, method=method)


def _method(table: dict, where: str) -> str | None:
    m = table.get("method")
    if m is not None and (not isinstance(m, str) or m not in METHODS):
        raise MixqError(f"{where}: method {m!r} not in {{{', '.join(METHODS)}}}")
    return m


def parse_recipe(text: str, src: str = "<recipe>", name: str | None = None) -> Recipe:
    """Parse recipe TOML text; `src` names the file in error messages."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise MixqError(f"{src}: not valid TOML ({e}); fix the recipe file") from None
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
    group = default.group_size if default and default.group_size in GROUP_SIZES else 64
    return Recipe(name=head.get("name") or name or Path(src).stem, description=head.get("description", ""),
                  text=text, default=default, rules=[_rule(i + 1, r, src, group) for i, r in enumerate(rules)],
                  path=src, dtype=dtype, tied_head=tied_head, method=_method(head, f"{src}: [recipe]") or "rtn")


def uniform_recipe(bits: int, group_size: int, mode: str = "affine") -> Recipe:
    """A recipe quantizing every quantizable tensor to (bits, group_size) in `mode`."""
    if mode == "affine":
        name = f"uniform-{bits}-{group_size}"
        text = f'[recipe]\nname = "{name}"\nbits = {bits}\ngroup_size = {group_size}\n'
    else:
        name = f"uniform-{mode}"
        text = f'[recipe]\nname = "{name}"\nmode = "{mode}"\nbits = {bits}\ngroup_size = {group_size}\n'
    return parse_recipe(text, f"<{name}>", name)


def keep_recipe() -> Recipe:
    """A recipe keeping every tensor unquantized (the plan of a model as stored)."""
    return parse_recipe('[recipe]\nname = "keep-all"\nkeep = true\n', "<keep-all>", "keep-all")


def _builtin_dir():
    return resources.files("mixq.quant") / "recipes"


def _builtin_key(name: str):
    fam = "mixed" if name.startswith("mixed") else "qx" if name.startswith("qx") else \
        "q" if name.startswith("q") else "fp" if name.startswith(("mxfp", "nvfp")) else name
    variant = 1 if name.endswith("-hi") else 2 if name.endswith("-mx") else 0
    digits = [int(c) for c in name if c.isdigit()]
    rank = _BUILTIN_ORDER.index(fam) if fam in _BUILTIN_ORDER else len(_BUILTIN_ORDER)
    return (rank, variant, digits, name)


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

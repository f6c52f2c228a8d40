"""`mixq card`: write the model card (README.md) of a converted MLX folder.

What the card states is read from the folder itself through `mixq.quant.artifact`: config.json
(`quantization`: default spec and per-module overrides, as mlx-lm writes them), the safetensors
headers (every tensor's shape and bytes: so parameter shares, size and bits per weight are what
the files hold) and mixq_provenance.json (recipe name/text, mixq version, where the weights came
from, read tolerantly at any nesting depth). A folder written by plain mlx_lm.convert (no
provenance) still gets a card. Tensors are grouped by `mixq.quant.tensors.classify`.

The card carries `README_MARK`: a README.md without it (e.g. a Hugging Face folder's own card) is
not replaced unless asked (`--force`), or the card is written elsewhere (`-o FILE`).
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from mixq.errors import MixqError
from mixq.io.files import README_MARK, write_atomic
from mixq.quant.artifact import Artifact, method_line, read_artifact
from mixq.quant.tensors import ATTENTION, EMBEDDING, EXPERTS, HEAD, MLP, NORM, OTHER, ROUTER, classify
from mixq.report.compare import compare
from mixq.report.render import to_markdown
from mixq.report.tables import fmt_bytes, md_table
from mixq.report.words import summarize

# --------------------------------------------------------------------------- reading the folder

@dataclass
class TensorEntry:
    module: str                 # module path (tensor name without .weight)
    kind: str
    layer: int | None
    params: int                 # logical parameters (unpacked)
    nbytes: int                 # bytes on disk incl. scales and biases
    bits: int | None            # None: kept unquantized
    group_size: int | None
    dtype: str                  # stored dtype of an unquantized tensor
    mode: str | None = None     # quantization mode (affine, mxfp4, nvfp4, mxfp8); None: kept


@dataclass
class FolderInfo:
    path: Path
    config: dict
    provenance: dict
    artifact: Artifact
    tensors: list[TensorEntry] = field(default_factory=list)

    @property
    def n_params(self) -> int:
        return self.artifact.n_params

    @property
    def size_bytes(self) -> int:
        return self.artifact.size_bytes

    @property
    def bits_per_weight(self) -> float:
        return self.artifact.bits_per_weight

    @property
    def n_layers(self) -> int | None:
        c = self.config.get("text_config", self.config)
        return c.get("num_hidden_layers") or self.config.get("num_hidden_layers")


ONE_D = "norms, biases, other 1-D"   # every unquantized tensor of fewer than two dimensions
KIND_LABELS = {EMBEDDING: "embeddings (embed_tokens)", ATTENTION: "attention q/k/v/o", MLP: "MLP gate/up/down",
               EXPERTS: "MoE experts", ROUTER: "MoE router", HEAD: "output head (lm_head)", OTHER: "other",
               NORM: "other"}   # a norm is 1-D (ONE_D) unless some architecture stores one otherwise


def tensor_kind(module: str) -> str:
    """The card's label for a module path's category (`mixq.quant.tensors.classify`)."""
    return KIND_LABELS[classify(module).category]


def read_folder(model_dir) -> FolderInfo:
    """What an MLX folder holds (via `mixq.quant.artifact`: config, provenance, safetensors headers)."""
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise MixqError(f"{path}: no config.json; pass a folder written by `mixq convert`")
    art = read_artifact(path)
    info = FolderInfo(path, art.config, art.provenance or {}, art)
    for t in art.tensors:
        role = classify(t.path)
        kind = ONE_D if not t.bits and len(t.shape) < 2 else KIND_LABELS[role.category]
        info.tensors.append(TensorEntry(t.path, kind, role.layer, t.numel, t.nbytes, t.bits, t.group_size, t.dtype,
                                        t.mode))
    return info


# --------------------------------------------------------------------------- provenance, tolerantly

def _walk(d, path=()):
    """Yield (key path, value) for every entry of nested dicts/lists."""
    if isinstance(d, dict):
        for k, v in d.items():
            yield path + (str(k),), v
            yield from _walk(v, path + (str(k),))
    elif isinstance(d, list):
        for i, v in enumerate(d):
            yield from _walk(v, path + (str(i),))


def _find(prov: dict, *keys: str):
    for p, v in _walk(prov):
        if p[-1].lower() in keys and v not in (None, "", {}, []):
            return v
    return None


def recipe_of(prov: dict) -> tuple[str | None, str | None, str | None]:
    """(name, description, TOML text) of the recipe the folder was converted with."""
    r = prov.get("recipe")
    if isinstance(r, dict):
        return r.get("name"), r.get("description"), r.get("text")
    if isinstance(r, str):
        return r, None, prov.get("recipe_text")
    return None, None, None


_GGUF_BITS = {"Q2": 2, "Q3": 3, "Q4": 4, "Q5": 5, "Q6": 6, "Q8": 8, "IQ1": 1, "IQ2": 2, "IQ3": 3, "IQ4": 4}
_LICENSES = {"apache-2.0": "apache-2.0", "apache 2.0": "apache-2.0", "mit": "mit", "gemma terms of use": "gemma",
             "gemma": "gemma", "llama3": "llama3", "llama3.1": "llama3.1", "llama3.2": "llama3.2",
             "cc-by-4.0": "cc-by-4.0", "bsd-3-clause": "bsd-3-clause", "openrail": "openrail"}


def _dicts(d):
    """Every nested dict, outermost first."""
    if isinstance(d, dict):
        yield d
        for v in d.values():
            yield from _dicts(v)
    elif isinstance(d, list):
        for v in d:
            yield from _dicts(v)


def license_id(text) -> tuple[str | None, str | None]:
    """(HF license id, license_name for `other`) from a free-text licence."""
    if not isinstance(text, str) or not text.strip():
        return None, None
    t = text.strip().lower()
    if t in _LICENSES:
        return _LICENSES[t], None
    return "other", re.sub(r"[^a-z0-9]+", "-", t).strip("-")


def source_story(prov: dict) -> dict:
    """What the provenance says about where the weights came from (any nesting depth)."""
    def is_import(d: dict) -> bool:
        kind = d.get("kind")
        return bool(d.get("dequantized_from_gguf")) or isinstance(d.get("gguf"), dict) or \
            (isinstance(kind, str) and kind.startswith("gguf-import"))

    imp = next((d for d in _dicts(prov) if is_import(d)), None)
    emb = next((d["embedded"] for d in _dicts(prov) if isinstance(d.get("embedded"), dict)), {})
    gguf = (imp or {}).get("gguf") if isinstance((imp or {}).get("gguf"), dict) else {}
    types = {t: n for t, n in (gguf.get("tensor_types") or {}).items() if not t.upper().startswith(("F", "BF"))}
    main_type = max(types, key=types.get) if types else None
    m = re.match(r"(I?Q\d)", main_type.upper()) if main_type else None
    offgrid = next((d["offgrid"] for d in _dicts(prov) if isinstance(d.get("offgrid"), dict)), None) or \
        (True if emb.get("offgrid") is True else None)
    src = (imp or {}).get("source") if isinstance((imp or {}).get("source"), dict) else {}
    homepage = emb.get("homepage") or ""
    hf = re.match(r"https?://huggingface\.co/([\w.-]+/[\w.-]+)/?$", homepage)
    top_src = prov.get("source") if isinstance(prov.get("source"), dict) else {}
    return {"from_gguf": imp is not None, "gguf_type": main_type,
            "gguf_bits": _GGUF_BITS.get(m.group(1)) if m else None, "gguf_types": types,
            "gguf_name": gguf.get("name"), "offgrid": offgrid,
            "sha256": src.get("sha256") or emb.get("gguf_sha256"), "file": src.get("file"),
            "license": emb.get("license") or gguf.get("license") or _find(prov, "license", "licence"),
            "base_model": _find(prov, "base_model") or (hf.group(1) if hf else None),
            "embedded": emb.get("name"), "source_ref": top_src.get("ref"),
            "created": prov.get("created")}


# --------------------------------------------------------------------------- words and tables

def _spec_text(bits, gs, dtype=None, mode=None) -> str:
    if bits and mode not in (None, "affine"):
        return f"{mode} ({bits}-bit floats, group {gs})"
    return f"{bits}-bit, group {gs}" if bits else f"kept ({dtype})"


def _spec_words(bits, gs, mode=None) -> str:
    if mode not in (None, "affine"):
        return f"{mode} ({bits}-bit floats, group size {gs})"
    return f"{bits}-bit with group size {gs}"


def layer_text(layers: list[int], n_layers: int | None) -> str:
    """Compact description of a set of layer indices."""
    ls = sorted(set(layers))
    if not ls:
        return "—"
    if n_layers and ls == list(range(n_layers)):
        return "all"
    if len(ls) == 1:
        return str(ls[0])
    step = ls[1] - ls[0]
    if n_layers and step == 1 and ls[-1] - ls[0] + 1 == len(ls):
        return f"{ls[0]}–{ls[-1]}"
    rest = [i for i in range(n_layers or 0) if i not in set(ls)]
    if n_layers and set(ls) <= set(range(n_layers)) and 0 < len(rest) < len(ls):
        return f"all but {layer_text(rest, n_layers)}"
    if all(b - a == step for a, b in zip(ls, ls[1:])):
        if step == 1:
            return f"{ls[0]}–{ls[-1]}"
        return f"{', '.join(map(str, ls))} (every {step})" if len(ls) <= 12 else \
            f"every {step} from {ls[0]} to {ls[-1]}"
    return ", ".join(map(str, ls))


KIND_ORDER = [KIND_LABELS[c] for c in (EMBEDDING, ATTENTION, MLP, EXPERTS, ROUTER, HEAD, OTHER)] + [ONE_D]


def recipe_rows(info: FolderInfo) -> list[dict]:
    """One row per (tensor kind, precision): tensors, layers, parameters and their share."""
    groups: dict = defaultdict(list)
    for t in info.tensors:
        groups[(t.kind, t.bits, t.group_size, t.mode, None if t.bits else t.dtype)].append(t)
    total = info.n_params or 1
    rows = []
    for (kind, bits, gs, mode, dtype), ts in groups.items():
        params = sum(t.params for t in ts)
        layers = [t.layer for t in ts if t.layer is not None]
        rows.append({"kind": kind, "bits": bits, "group_size": gs, "mode": mode, "dtype": dtype, "tensors": len(ts),
                     "layers": layer_text(layers, info.n_layers) if layers else "—", "params": params,
                     "share": params / total, "bytes": sum(t.nbytes for t in ts)})
    order = {k: i for i, k in enumerate(KIND_ORDER)}
    rows.sort(key=lambda r: (order.get(r["kind"], 99), -(r["bits"] or 99)))
    return rows


def recipe_words(info: FolderInfo) -> str:
    """The recipe in a few sentences, from what the folder holds."""
    quant = [t for t in info.tensors if t.bits]
    if not quant:
        return "No tensor is quantized: every weight is stored as in the source."
    by_spec = Counter()
    for t in quant:
        by_spec[(t.bits, t.group_size, t.mode)] += t.params
    (mb, mg, mm), mp = by_spec.most_common(1)[0]
    qshare = sum(t.params for t in quant) / info.n_params
    if len(by_spec) == 1:
        s = f"Every quantized tensor is {_spec_words(mb, mg, mm)} ({qshare:.1%} of the parameters)."
    else:
        s = (f"Most weights ({mp / info.n_params:.1%} of the parameters) are {_spec_words(mb, mg, mm)}. "
             "The exceptions:")
        parts = []
        for r in recipe_rows(info):
            if r["bits"] and (r["bits"], r["group_size"], r["mode"]) != (mb, mg, mm):
                where = "" if r["layers"] in ("—", "all") else f" in layers {r['layers']}"
                if r["layers"] == "all":
                    where = " in every layer"
                parts.append(f"{r['kind']}{where} at {_spec_text(r['bits'], r['group_size'], None, r['mode'])} "
                             f"({r['share']:.1%} of the parameters)")
        s += " " + "; ".join(parts) + "."
    kept = [t for t in info.tensors if not t.bits]
    if kept:
        dtypes = sorted({t.dtype for t in kept})
        kept_share = sum(t.params for t in kept) / info.n_params
        kinds = sorted({t.kind for t in kept}, key=lambda k: KIND_ORDER.index(k) if k in KIND_ORDER else 99)
        s += (f" Kept unquantized ({'/'.join(dtypes)}): {', '.join(kinds)} "
              f"({kept_share:.2%} of the parameters).")
    return s


def _front_matter(info: FolderInfo, story: dict, recipe_name: str | None, base_model: str | None) -> str:
    tags = ["mlx", "mixq", "quantized"]
    specs = {(t.bits, t.group_size, t.mode) for t in info.tensors if t.bits}
    if len(specs) > 1:
        tags.append("mixed-precision")
    if recipe_name:
        tags.append(re.sub(r"[^A-Za-z0-9._-]+", "-", recipe_name))
    lines = ["---", "library_name: mlx"]
    lic, lic_name = license_id(story.get("license"))
    if lic:
        lines.append(f"license: {lic}")
    if lic_name:
        lines.append(f"license_name: {lic_name}")
    if base_model:
        lines.append(f"base_model: {base_model}")
    lines.append("pipeline_tag: text-generation")
    lines.append("tags:")
    lines += [f"- {t}" for t in dict.fromkeys(tags)]
    lines.append("---")
    return "\n".join(lines)


def _gguf_source_lines(story: dict) -> list[str]:
    """Where dequantized-GGUF weights came from, and what that means for every number in the card."""
    bits = f"{story['gguf_bits']}-bit " if story["gguf_bits"] else ""
    line = f"- Source: dequantized from a {bits}GGUF"
    if story["gguf_type"]:
        line += f" ({', '.join(f'{k}: {v}' for k, v in sorted(story['gguf_types'].items()))} tensors)"
    if story.get("file"):
        line += f", file `{story['file']}`"
    if story.get("sha256"):
        line += f" (sha256 `{story['sha256'][:16]}…`)"
    if story["offgrid"]:
        seed = story["offgrid"].get("seed") if isinstance(story["offgrid"], dict) else None
        line += (", then re-parametrized off-grid (a seeded, function-preserving per-channel rescaling that "
                 "moves the weights off the GGUF's quantization grid" + (f"; seed {seed}" if seed is not None
                                                                       else "") + ")")
    caveat = ("  This is **not** the original full-precision checkpoint: the base already carries the GGUF's "
              "4-bit-class quantization error, and every quality number here is relative to that base."
              if story["gguf_bits"] and story["gguf_bits"] <= 5 else
              "  The base is a dequantized GGUF, not the original full-precision checkpoint.")
    return [line + ".", caveat]


def _source_lines(story: dict) -> list[str]:
    src = story.get("source_ref") or story.get("embedded")
    if story["from_gguf"]:
        return _gguf_source_lines(story) + ([f"- Source reference: `{src}`"] if src else [])
    if story.get("sha256") or src:
        return ["- Source: " + (f"`{src}`" if src else "") +
                (f" (file `{story['file']}`, sha256 `{story['sha256'][:16]}…`)" if story.get("sha256") else "")]
    return []


def _how_made(info: FolderInfo, story: dict, recipe_name, recipe_text) -> str:
    prov = info.provenance
    out = []
    version = prov.get("mixq_version") or _find(prov, "mixq_version")
    if version:
        out.append(f"- Converted with mixq {version}" + (f" on {story['created']}" if story.get("created") else ""))
    else:
        out.append("- Converted to the MLX format (no mixq provenance recorded)")
    if recipe_name:
        out.append(f"- Recipe: `{recipe_name}`" + ("" if recipe_text else " (recipe text not recorded)"))
    tensors = prov.get("tensors") if isinstance(prov.get("tensors"), list) else []
    methods = {t.get("name"): t.get("method") for t in tensors if isinstance(t, dict) and t.get("method")}
    calibrated = method_line(methods, prov.get("calibration") if isinstance(prov.get("calibration"), dict) else None)
    if calibrated:
        out.append(f"- {calibrated.strip()}")
    out += _source_lines(story)
    mt = info.config.get("model_type")
    if mt:
        out.append(f"- Architecture: `{mt}`" + (f", {info.n_layers} layers" if info.n_layers else ""))
    if recipe_text:
        out.append("\n<details><summary>Recipe file</summary>\n\n```toml\n" + recipe_text.strip() +
                   "\n```\n</details>")
    return "\n".join(out)


def _usage(name: str, path: str) -> str:
    return f"""```bash
pip install mlx-lm
```

```python
from mlx_lm import load, generate

model, tokenizer = load("{name}")

prompt = "hello"

if tokenizer.chat_template is not None:
    messages = [{{"role": "user", "content": prompt}}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)

response = generate(model, tokenizer, prompt=prompt, verbose=True)
```

The same with mixq (MLX on Apple silicon, torch elsewhere; the chat template is applied for you):

```bash
mixq generate {path} -p "hello"
```"""


def _intro(info: FolderInfo, story: dict, recipe_name: str | None, base_model: str | None) -> list[str]:
    intro = "An MLX mixed-precision quantization" if len({(t.bits, t.group_size, t.mode) for t in info.tensors
                                                          if t.bits}) > 1 else "An MLX quantization"
    of = f" of [{base_model}](https://huggingface.co/{base_model})" if base_model else \
        (f" of {story['gguf_name']}" if story.get("gguf_name") else "")
    out = [f"{intro}{of}, made with mixq" + (f" using the recipe `{recipe_name}`." if recipe_name else ".")]
    if story["from_gguf"]:
        out += ["", f"**Note:** the base weights were dequantized from a "
                    f"{str(story['gguf_bits']) + '-bit ' if story['gguf_bits'] else ''}GGUF"
                    f"{', then re-parametrized off-grid' if story['offgrid'] else ''}; see *How it was made*."]
    return out


def _recipe_section(info: FolderInfo, recipe_desc: str | None) -> list[str]:
    out = ["## What the recipe does", ""]
    if recipe_desc:
        out += [recipe_desc.strip(), ""]
    out += [recipe_words(info), ""]
    rows = [[r["kind"], _spec_text(r["bits"], r["group_size"], r["dtype"], r["mode"]), r["tensors"], r["layers"],
             f"{r['params'] / 1e6:.2f} M", f"{r['share']:.1%}"] for r in recipe_rows(info)]
    return out + [md_table(["tensor kind", "precision", "tensors", "layers", "parameters", "share"], rows), ""]


def _size_section(info: FolderInfo) -> list[str]:
    bf16 = info.n_params * 2
    return ["## Size", "",
            md_table(["", "this model", "bf16"], [
                ["size of the weights", fmt_bytes(info.size_bytes), fmt_bytes(bf16)],
                ["bits per weight", f"{info.bits_per_weight:.2f}", "16.00"],
                ["parameters", f"{info.n_params / 1e6:.1f} M", f"{info.n_params / 1e6:.1f} M"]]),
            "", f"The weights take {info.size_bytes / bf16:.1%} of the bf16 size "
                f"(bits per weight count scales and biases; parameters are counted unpacked).", ""]


def _evaluation_section(runs, ref) -> list[str]:
    """The runs' scores; with more than one run, their differences against `ref` (default: most bits per
    weight). A single run has no comparison, so the card says nothing about differences."""
    comp = compare(runs, ref=ref)
    measured = "Measured with `mixq eval` (lm-evaluation-harness task definitions; ± is one standard error)."
    if not comp.others:
        return ["## Evaluation", "", measured, "",
                to_markdown(comp, title=None, details=False, summary=summarize(comp, single_run_clause=False)), ""]
    return ["## Evaluation", "",
            f"{measured} Differences against {comp.ref} come with 95% intervals and paired tests; ≈ marks a "
            "difference that is not statistically significant.", "",
            to_markdown(comp, title=None, details=True), ""]


def render_card(info: FolderInfo, runs=None, *, base_model: str | None = None, title: str | None = None,
                ref=None) -> str:
    """The README.md text for a folder (with `runs`: their scores, compared against `ref` when several)."""
    story = source_story(info.provenance)
    recipe_name, recipe_desc, recipe_text = recipe_of(info.provenance)
    base_model = base_model or (story["base_model"] if isinstance(story["base_model"], str) else None)
    name = title or info.path.name
    parts = [_front_matter(info, story, recipe_name, base_model), README_MARK, "", f"# {name}", ""]
    parts += _intro(info, story, recipe_name, base_model) + [""]
    parts += _recipe_section(info, recipe_desc) + _size_section(info)
    if runs:
        parts += _evaluation_section(runs, ref)
    parts += ["## How it was made", "", _how_made(info, story, recipe_name, recipe_text), ""]
    parts += ["## Use with mlx", "", _usage(name, str(info.path)), ""]
    return "\n".join(parts)


def _check_replaceable(target: Path, force: bool) -> None:
    """Refuse to overwrite a file mixq did not write (it lacks `README_MARK`) unless `force`."""
    if target.is_dir():
        raise MixqError(f"-o {target}: is a folder; give the card's file path, e.g. {target / 'README.md'}")
    if force or not target.exists():
        return
    if README_MARK not in target.read_text(errors="replace"):
        raise MixqError(f"{target}: not written by mixq (e.g. the model's own card); pass --force to replace it, "
                        f"or -o FILE to write the card elsewhere")


def write_card(model_dir, runs=None, *, base_model: str | None = None, ref=None, out=None,
               force: bool = False) -> Path:
    """Write the card (atomically) to `out`, by default MODEL_DIR/README.md, and return its path.

    A file there that mixq did not write is replaced only with `force`."""
    info = read_folder(model_dir)
    target = Path(out) if out else info.path / "README.md"
    _check_replaceable(target, force)
    write_atomic(target, render_card(info, runs, base_model=base_model, ref=ref))
    return target


def add_arguments(p) -> None:
    p.add_argument("model_dir", metavar="MODEL_DIR", help="an MLX folder written by `mixq convert`")
    p.add_argument("--runs", nargs="+", metavar="RUN_DIR", help="eval run folders to put in the card's table")
    p.add_argument("--ref", help="with several --runs: the run the others are compared against "
                                 "(name, folder or index; default: the one with the most bits per weight)")
    p.add_argument("--base-model", help="Hugging Face id of the original model (front matter base_model)")
    p.add_argument("-o", "--out", metavar="FILE", help="write the card here instead of MODEL_DIR/README.md")
    p.add_argument("--force", action="store_true", help="replace a README.md that mixq did not write")


def cli(args) -> int:
    out = write_card(args.model_dir, args.runs, base_model=args.base_model, ref=args.ref, out=args.out,
                     force=args.force)
    print(f"wrote {out}")
    return 0

"""Read an MLX model folder back: quantization config, per-tensor specs, size, bits per weight.

Reads config.json, mixq_provenance.json (if any) and the safetensors headers only: no tensor data.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from mixq.errors import MixqError
from mixq.io.files import PROVENANCE_FILE
from mixq.io.safetensors import dtype_name, entry_nbytes, read_header
from mixq.quant.spec import bits_per_weight, spec_error
from mixq.quant.tensors import module_path


@dataclass
class TensorSpec:
    name: str                  # tensor name (MLX layout), e.g. model.layers.0.mlp.down_proj.weight
    shape: tuple[int, ...]     # logical shape (a quantized weight: unpacked)
    dtype: str                 # stored dtype of the tensor (quantized: of its scales/biases)
    bits: int | None           # None: stored unquantized
    group_size: int | None
    nbytes: int                # bytes on disk (quantized: packed weight + scales + biases)
    mode: str | None = None    # quantization mode ("affine", "mxfp4", "nvfp4", "mxfp8"); None: unquantized

    @property
    def path(self) -> str:
        """Module path (the key of config.json's quantization dict)."""
        return module_path(self.name)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class Artifact:
    path: Path
    config: dict
    quantization: dict | None           # config.json's "quantization" (None: not quantized)
    tensors: list[TensorSpec]
    files: list[Path]
    provenance: dict = field(default_factory=dict)

    @property
    def size_bytes(self) -> int:
        """Bytes of tensor data (what the weights take in memory once loaded)."""
        return sum(t.nbytes for t in self.tensors)

    @property
    def file_bytes(self) -> int:
        """Bytes of the safetensors files on disk (tensor data + headers)."""
        return sum(f.stat().st_size for f in self.files)

    @property
    def n_params(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def quantized_params(self) -> int:
        return sum(t.numel for t in self.tensors if t.bits)

    @property
    def bits_per_weight(self) -> float:
        return bits_per_weight(self.size_bytes, self.n_params)

    @property
    def bits_per_weight_quantized(self) -> float | None:
        q = [t for t in self.tensors if t.bits]
        return bits_per_weight(sum(t.nbytes for t in q), sum(t.numel for t in q)) if q else None

    @property
    def default_spec(self) -> tuple[int, int] | None:
        q = self.quantization or {}
        return (int(q["bits"]), int(q["group_size"])) if "bits" in q else None

    @property
    def default_mode(self) -> str | None:
        q = self.quantization or {}
        return q.get("mode", "affine") if "bits" in q else None

    def spec(self, name: str) -> TensorSpec:
        for t in self.tensors:
            if t.name == name or t.path == name:
                return t
        raise KeyError(name)

    def recipe_name(self) -> str | None:
        return (self.provenance.get("recipe") or {}).get("name")


def is_mlx_folder(path) -> bool:
    """An MLX folder: config.json with a `quantization` dict, or written by `mixq convert`."""
    path = Path(path)
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    if (path / PROVENANCE_FILE).is_file():
        try:
            return "recipe" in json.loads((path / PROVENANCE_FILE).read_text())
        except (OSError, ValueError):
            return False
    try:
        return isinstance(json.loads(cfg.read_text()).get("quantization"), dict)
    except (OSError, ValueError):
        return False


def quantization_config(config: dict, where) -> dict | None:
    """config.json's MLX quantization dict ("quantization", else "quantization_config"), checked; None if absent."""
    q = config.get("quantization") or config.get("quantization_config")
    if q is not None and not isinstance(q, dict):
        raise MixqError(f"{where}: 'quantization' is not a dict")
    if q and "quant_method" in q and "bits" not in q:
        raise MixqError(f"{where}: quantization_config of method {q['quant_method']!r} is not an MLX quant")
    return q or None


def module_spec(q: dict | None, module: str, where="") -> tuple[int, int, str] | None:
    """(bits, group_size, mode) config.json gives module `module` (its own entry, else the default); None if none.

    As mlx-lm reads it: a module's own entry without "mode" is affine (mlx's `to_quantized` default), the
    default's missing "mode" too. A combination mlx 0.32 cannot load is a one-line error naming the module."""
    if not q:
        return None
    entry = q.get(module)
    if entry is False:
        return None
    spec = entry if isinstance(entry, dict) else ({k: q[k] for k in ("bits", "group_size", "mode") if k in q}
                                                   if "bits" in q else None)
    if not spec:
        return None
    try:
        bits, gs, mode = int(spec["bits"]), int(spec["group_size"]), spec.get("mode", "affine")
    except (KeyError, TypeError, ValueError):
        raise MixqError(f"{where}: {module}: quantization entry {spec!r} needs integer bits and group_size") from None
    err = spec_error(bits, gs, mode)
    if err:
        raise MixqError(f"{where}: {module}: {err}")
    return bits, gs, mode


def read_artifact(path) -> Artifact:
    """Read the folder's config, provenance and safetensors headers into an `Artifact`."""

    path = Path(path)
    cfg_file = path / "config.json"
    try:
        config = json.loads(cfg_file.read_text())
    except FileNotFoundError:
        raise MixqError(f"{cfg_file}: missing; not a model folder") from None
    except ValueError as e:
        raise MixqError(f"{cfg_file}: not valid JSON ({e})") from None
    q = quantization_config(config, cfg_file)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise MixqError(f"{path}: no .safetensors files")
    entries: dict[str, dict] = {}
    for f in files:
        header, _, _ = read_header(f)
        entries.update(header)

    tensors = []
    for name in sorted(entries):
        e = entries[name]
        module, _, leaf = name.rpartition(".")
        if leaf in ("scales", "biases") and f"{module}.weight" in entries and f"{module}.scales" in entries:
            continue
        if leaf == "global_scale" and f"{module}.scales" in entries:
            raise MixqError(f"{path}: {module} has an nvfp4 global scale; mixq does not read those "
                            f"(mlx_lm.convert does not write them)")
        scales = entries.get(f"{module}.scales") if leaf == "weight" else None
        if scales is None:
            tensors.append(TensorSpec(name, tuple(e["shape"]), dtype_name(e["dtype"]), None, None, entry_nbytes(e)))
            continue
        spec = module_spec(q, module, path)
        if not spec:
            raise MixqError(f"{path}: {module} has scales but config.json gives it no quantization spec")
        bits, gs, mode = spec
        packed, n_groups = e["shape"][-1], scales["shape"][-1]
        n = n_groups * gs
        if packed * 32 != n * bits:
            raise MixqError(f"{path}: {module}: packed width {packed} and {n_groups} scale groups do not fit "
                            f"bits={bits}, group_size={gs} from config.json")
        if (dtype_name(scales["dtype"]) == "uint8") != (mode != "affine") or \
                (f"{module}.biases" in entries) != (mode == "affine"):
            raise MixqError(f"{path}: {module}: stored scales ({dtype_name(scales['dtype'])}"
                            f"{', biases' if f'{module}.biases' in entries else ', no biases'}) do not fit "
                            f"quantization mode {mode} from config.json")
        biases = entries.get(f"{module}.biases", {"data_offsets": [0, 0]})
        b = entry_nbytes(e) + entry_nbytes(scales) + entry_nbytes(biases)
        tensors.append(TensorSpec(name, (*e["shape"][:-1], n), dtype_name(scales["dtype"]), bits, gs, b, mode))

    provenance = {}
    prov_file = path / PROVENANCE_FILE
    if prov_file.is_file():
        try:
            provenance = json.loads(prov_file.read_text())
        except ValueError as e:
            raise MixqError(f"{prov_file}: not valid JSON ({e})") from None
    return Artifact(path, config, q or None, tensors, files, provenance)


def method_line(methods: dict, calibration: dict | None) -> str:
    """One sentence on the calibrated methods and their calibration text ("" for round-to-nearest only).
    `methods`: tensor name -> method as provenance records it ("rtn", "gptq", "rtn (why gptq did not apply)")."""
    from collections import Counter

    done = Counter(m.split(" (")[0] for m in methods.values() if m and not m.startswith("rtn"))
    fallback = sum(1 for m in methods.values() if m and m.startswith("rtn ("))
    partial = sum(1 for m in methods.values() if m and not m.startswith("rtn") and " (" in m)
    if not done and not fallback:
        return ""
    c = calibration or {}
    what = ", ".join(f"{m} on {n} tensors" for m, n in sorted(done.items())) or "none"
    fell = f" ({fallback} more asked for it and were rounded to nearest, see mixq_provenance.json)" if fallback else ""
    if partial:   # MoE expert stacks: experts with too few routed calibration tokens rounded to nearest
        fell += f" ({partial} of them with some experts rounded to nearest: too few routed tokens, see provenance)"
    where = (f", from token {c.get('first_token')} on (after eval's default ppl/KLD windows)"
             if c.get("disjoint_from_eval") else "")
    settings = "".join([f"; gptq's range search {'on' if c['clip_search'] else 'off'}" if "clip_search" in c else "",
                        f"; gptq act-order ({c['act_order']})" if c.get("act_order") else ""])
    return (f"Calibrated quantization: {what}{fell}; the rest round to nearest. Calibration text "
            f"{Path(str(c.get('file', '?'))).name} (sha256 {str(c.get('sha256', '?'))[:12]}), {c.get('samples')} "
            f"windows of {c.get('length')} tokens, seed {c.get('seed')}{where}{settings}.\n")

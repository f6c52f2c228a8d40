"""Read an MLX model folder back: quantization config, per-tensor specs, size, bits per weight.

Reads config.json, mixq_provenance.json (if any) and the safetensors headers only: no tensor data.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from mixq.errors import MixqError
from mixq.io.safetensors import DTYPES as _DTYPES
from mixq.io.safetensors import read_header, torch_dtype_name

BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)


@dataclass
class TensorSpec:
    name: str                  # tensor name (MLX layout), e.g. model.layers.0.mlp.down_proj.weight
    shape: tuple[int, ...]     # logical shape (a quantized weight: unpacked)
    dtype: str                 # stored dtype of the tensor (quantized: of its scales/biases)
    bits: int | None           # None: stored unquantized
    group_size: int | None
    nbytes: int                # bytes on disk (quantized: packed weight + scales + biases)

    @property
    def path(self) -> str:
        """Module path (the key of config.json's quantization dict)."""
        return self.name.removesuffix(".weight")

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
        return 8 * self.size_bytes / max(self.n_params, 1)

    @property
    def bits_per_weight_quantized(self) -> float | None:
        q = [t for t in self.tensors if t.bits]
        if not q:
            return None
        return 8 * sum(t.nbytes for t in q) / sum(t.numel for t in q)

    @property
    def default_spec(self) -> tuple[int, int] | None:
        q = self.quantization or {}
        return (int(q["bits"]), int(q["group_size"])) if "bits" in q else None

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
    if (path / "mixq_provenance.json").is_file():
        try:
            return "recipe" in json.loads((path / "mixq_provenance.json").read_text())
        except (OSError, ValueError):
            return False
    try:
        return isinstance(json.loads(cfg.read_text()).get("quantization"), dict)
    except (OSError, ValueError):
        return False


def _spec_for(path: str, q: dict | None):
    if not q:
        return None
    entry = q.get(path)
    if entry is False:
        return False
    if isinstance(entry, dict):
        return entry
    return {k: q[k] for k in ("bits", "group_size", "mode") if k in q} if "bits" in q else None


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
    q = config.get("quantization") or config.get("quantization_config")
    if q is not None and not isinstance(q, dict):
        raise MixqError(f"{cfg_file}: 'quantization' is not a dict")
    if q and "quant_method" in q and "bits" not in q:
        raise MixqError(f"{cfg_file}: quantization_config of method {q['quant_method']!r} is not an MLX affine quant")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise MixqError(f"{path}: no .safetensors files")
    entries: dict[str, dict] = {}
    for f in files:
        header, _, _ = read_header(f)
        entries.update(header)

    def nbytes(e):
        a, b = e["data_offsets"]
        return b - a

    tensors = []
    for name in sorted(entries):
        e = entries[name]
        module, _, leaf = name.rpartition(".")
        if leaf in ("scales", "biases") and f"{module}.weight" in entries and f"{module}.scales" in entries:
            continue
        scales = entries.get(f"{module}.scales") if leaf == "weight" else None
        if scales is None:
            tensors.append(TensorSpec(name, tuple(e["shape"]), _dtype(e["dtype"]), None, None, nbytes(e)))
            continue
        spec = _spec_for(module, q)
        if not spec:
            raise MixqError(f"{path}: {module} has scales but config.json gives it no quantization spec")
        if spec.get("mode", "affine") != "affine":
            raise MixqError(f"{path}: {module} uses quantization mode {spec['mode']!r}; mixq reads affine quants only")
        bits, gs = int(spec["bits"]), int(spec["group_size"])
        packed, n_groups = e["shape"][-1], scales["shape"][-1]
        n = n_groups * gs
        if packed * 32 != n * bits:
            raise MixqError(f"{path}: {module}: packed width {packed} and {n_groups} scale groups do not fit "
                            f"bits={bits}, group_size={gs} from config.json")
        b = nbytes(e) + nbytes(scales) + nbytes(entries.get(f"{module}.biases", {"data_offsets": [0, 0]}))
        tensors.append(TensorSpec(name, (*e["shape"][:-1], n), _dtype(scales["dtype"]), bits, gs, b))

    provenance = {}
    prov_file = path / "mixq_provenance.json"
    if prov_file.is_file():
        try:
            provenance = json.loads(prov_file.read_text())
        except ValueError as e:
            raise MixqError(f"{prov_file}: not valid JSON ({e})") from None
    return Artifact(path, config, q or None, tensors, files, provenance)


def _dtype(code: str) -> str:

    return torch_dtype_name(_DTYPES[code])

"""Lazy reading of Hugging Face folders and streaming writing of safetensors files.

`Checkpoint(path)` reads config.json and the safetensors headers only; `get(name)` reads one tensor
with a plain `read()` into fresh memory (no mmap, so the process never holds more than the tensors
it is working on). `SafetensorsWriter` writes a file whose header is known up front, tensor by tensor.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import torch

from .errors import MixqError

# safetensors dtype code <-> torch dtype
_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_CODES = {v: k for k, v in _DTYPES.items()}
MAX_HEADER = 100 << 20


def torch_dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    """'bfloat16' / 'torch.bfloat16' / 'BF16' -> torch dtype."""
    if name in _DTYPES:
        return _DTYPES[name]
    dt = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dt, torch.dtype):
        raise MixqError(f"unknown dtype {name!r}; use bfloat16, float16 or float32")
    return dt


def read_header(file: Path) -> tuple[dict, dict, int]:
    """(tensors {name: {dtype, shape, data_offsets}}, metadata, data start) of a safetensors file, validated."""
    file = Path(file)
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("file shorter than its header")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER or 8 + n > size:
                raise ValueError("header length out of range")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise MixqError(f"{file}: file not found; the checkpoint is incomplete (re-download or re-export it)") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise MixqError(f"{file}: not a valid safetensors file ({e}); re-download or re-export it") from None
    metadata = header.pop("__metadata__", None) or {}
    start = 8 + n
    for name, t in header.items():
        try:
            a, b = t["data_offsets"]
            dtype = _DTYPES[t["dtype"]]
            numel = 1
            for d in t["shape"]:
                numel *= int(d)
            ok = 0 <= a <= b and start + b <= size and b - a == numel * dtype.itemsize
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise MixqError(f"{file}: tensor {name} has a bad entry or lies past the end of the file "
                            f"(truncated or corrupt download?); re-download or re-export it")
    return header, metadata, start


class Checkpoint:
    """A Hugging Face model folder: config.json + model.safetensors or sharded model-*.safetensors."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise MixqError(f"{self.path}: not a folder; give a Hugging Face model folder (config.json + *.safetensors)")
        cfg = self.path / "config.json"
        if not cfg.exists():
            raise MixqError(f"{cfg}: missing; a Hugging Face model folder needs its config.json")
        try:
            self.config: dict = json.loads(cfg.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise MixqError(f"{cfg}: not valid JSON ({e}); re-download or fix it") from None
        self.files = self._weight_files()
        self._where: dict[str, tuple[Path, dict, int]] = {}  # name -> (file, entry, data start)
        self.metadata: dict[Path, dict] = {}
        for file in self.files:
            header, meta, start = read_header(file)
            self.metadata[file] = meta
            for name, entry in header.items():
                if name in self._where:
                    raise MixqError(f"{file}: tensor {name} also appears in {self._where[name][0].name}; "
                                    f"the checkpoint is inconsistent")
                self._where[name] = (file, entry, start)
        if not self._where:
            raise MixqError(f"{self.path}: the safetensors files hold no tensors")

    def _weight_files(self) -> list[Path]:
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise MixqError(f"{index}: not a valid safetensors index ({e}); re-download or fix it") from None
            files = sorted({self.path / f for f in weight_map.values()})
            for f in files:
                if not f.exists():
                    raise MixqError(f"{f}: listed in {index.name} but missing; the download is incomplete")
            return files
        single = self.path / "model.safetensors"
        if single.exists():
            return [single]
        files = sorted(self.path.glob("model*.safetensors")) or sorted(self.path.glob("*.safetensors"))
        if files:
            return files
        if any(self.path.glob("*.bin")) or any(self.path.glob("*.pth")):
            raise MixqError(f"{self.path}: holds only PyTorch .bin/.pth weights; save it with safetensors "
                            f"(model.save_pretrained(out, safe_serialization=True)) and convert that")
        raise MixqError(f"{self.path}: no *.safetensors weights found")

    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entry(name)[1]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return _DTYPES[self._entry(name)[1]["dtype"]]

    def nbytes(self, name: str) -> int:
        a, b = self._entry(name)[1]["data_offsets"]
        return b - a

    def _entry(self, name):
        try:
            return self._where[name]
        except KeyError:
            raise MixqError(f"{self.path}: no tensor named {name}") from None

    def tensor_infos(self) -> list:
        """TensorInfo (recipe.py) of every stored tensor, in HF layout, in file order."""
        from .recipe import TensorInfo

        return [TensorInfo(n, self.shape(n), torch_dtype_name(self.dtype(n))) for n in self._where]

    def get(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Read one tensor (into `out` when given: a contiguous tensor of the same shape and dtype)."""
        file, entry, start = self._entry(name)
        dtype, shape = _DTYPES[entry["dtype"]], tuple(entry["shape"])
        a, b = entry["data_offsets"]
        if out is None:
            out = torch.empty(shape, dtype=dtype)
        elif out.shape != shape or out.dtype != dtype or not out.is_contiguous():
            raise ValueError(f"{name}: out has {tuple(out.shape)} {out.dtype}, need {shape} {dtype}")
        if b > a:
            buf = out.view(-1).view(torch.uint8).numpy()
            try:
                with open(file, "rb") as f:
                    f.seek(start + a)
                    got = f.readinto(memoryview(buf))
            except OSError as e:
                raise MixqError(f"{file}: cannot read tensor {name} ({e.strerror})") from None
            if got != b - a:
                raise MixqError(f"{file}: tensor {name} is truncated; re-download or re-export it")
        return out

    def source_files(self) -> list[Path]:
        """The files that define the model (weights, index, config, tokenizer, templates), for hashing."""
        keep = []
        for p in sorted(self.path.iterdir()):
            if p.is_file() and (p.suffix in (".safetensors", ".json", ".model", ".jinja", ".txt") or p.name == "tokenizer.model"):
                keep.append(p)
        return keep


class SafetensorsWriter:
    """Write one safetensors file from a known list of (name, shape, dtype), tensor data in that order."""

    def __init__(self, file: Path, entries: list[tuple[str, tuple[int, ...], torch.dtype]], metadata: dict | None = None):
        self.file = Path(file)
        header, offset = {}, 0
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        self.order = []
        for name, shape, dtype in entries:
            n = dtype.itemsize
            for d in shape:
                n *= int(d)
            header[name] = {"dtype": _CODES[dtype], "shape": [int(d) for d in shape], "data_offsets": [offset, offset + n]}
            self.order.append((name, tuple(int(d) for d in shape), dtype))
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.size = 8 + len(raw) + offset
        self._f = open(self.file, "wb")
        self._f.write(struct.pack("<Q", len(raw)) + raw)
        self._next = 0
        self._partial = 0  # bytes written of the current tensor

    def write(self, name: str, t: torch.Tensor) -> int:
        """Append tensor `name` (must be the next one announced in the header); return bytes written."""
        want = self.order[self._next]
        if self._partial or (name, tuple(t.shape), t.dtype) != want:
            raise RuntimeError(f"writer expected {want}, got {(name, tuple(t.shape), t.dtype)}")
        return self.write_rows(name, t)

    def write_rows(self, name: str, t: torch.Tensor) -> int:
        """Append the next rows (slices along the first dims) of tensor `name`; it is done when all bytes are in."""
        want_name, shape, dtype = self.order[self._next]
        nbytes = dtype.itemsize * math.prod(shape)
        if name != want_name or t.dtype != dtype or (shape and tuple(t.shape[-1:]) != shape[-1:]):
            raise RuntimeError(f"writer expected rows of {self.order[self._next]}, got {(name, tuple(t.shape), t.dtype)}")
        n = t.numel() * dtype.itemsize
        if self._partial + n > nbytes:
            raise RuntimeError(f"writer: more data than {name}'s {nbytes} bytes")
        if n:
            self._f.write(memoryview(t.detach().contiguous().view(-1).view(torch.uint8).numpy()))
        self._partial += n
        if self._partial == nbytes:
            self._next += 1
            self._partial = 0
        return n

    def close(self):
        if self._f is None:
            return
        done = self._next == len(self.order)
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        self._f = None
        if not done:
            raise RuntimeError(f"{self.file}: closed after {self._next} of {len(self.order)} tensors")

    def abort(self):
        if self._f is not None:
            self._f.close()
            self._f = None

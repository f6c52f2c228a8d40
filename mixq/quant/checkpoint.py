"""Lazy reading of Hugging Face folders.

`Checkpoint(path)` reads config.json and the safetensors headers only; `get(name)` reads one tensor
with a plain `read()` into fresh memory (no mmap, so the process never holds more than the tensors
it is working on).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mixq.errors import MixqError
from mixq.io.safetensors import DTYPES, INDEX_FILE, read_headers, torch_dtype_name
from mixq.quant.tensors import TensorInfo


class Checkpoint:
    """A Hugging Face model folder: config.json + model.safetensors or sharded model-*.safetensors."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise MixqError(f"{self.path}: not a folder; give a Hugging Face model folder "
                            "(config.json + *.safetensors)")
        cfg = self.path / "config.json"
        if not cfg.exists():
            raise MixqError(f"{cfg}: missing; a Hugging Face model folder needs its config.json")
        try:
            self.config: dict = json.loads(cfg.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise MixqError(f"{cfg}: not valid JSON ({e}); re-download or fix it") from None
        self.files = self._weight_files()
        self._where = read_headers(self.files)  # name -> (file, entry, data start)
        if not self._where:
            raise MixqError(f"{self.path}: the safetensors files hold no tensors")

    def _weight_files(self) -> list[Path]:
        index = self.path / INDEX_FILE
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
        return DTYPES[self._entry(name)[1]["dtype"]]

    def nbytes(self, name: str) -> int:
        a, b = self._entry(name)[1]["data_offsets"]
        return b - a

    def _entry(self, name):
        try:
            return self._where[name]
        except KeyError:
            raise MixqError(f"{self.path}: no tensor named {name}") from None

    def tensor_infos(self) -> list:
        """TensorInfo of every stored tensor, in HF layout, in file order."""
        return [TensorInfo(n, self.shape(n), torch_dtype_name(self.dtype(n))) for n in self._where]

    def get(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Read one tensor (into `out` when given: a contiguous tensor of the same shape and dtype)."""
        file, entry, start = self._entry(name)
        dtype, shape = DTYPES[entry["dtype"]], tuple(entry["shape"])
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
            defining = p.suffix in (".safetensors", ".json", ".model", ".jinja", ".txt") or p.name == "tokenizer.model"
            if p.is_file() and defining:
                keep.append(p)
        return keep

"""safetensors on disk: one header reader, a memory-mapped reader, one streaming writer, one sharded writer.

The `safetensors` package reads whole files; mixq also needs to plan a file before any tensor exists
(headers first, then tensor data streamed in order) and to validate headers of untrusted downloads
without reading their data. Names of shards follow transformers / mlx-lm: `model.safetensors`, or
`model-0000i-of-0000n.safetensors` plus `model.safetensors.index.json`.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import struct
import sys
import weakref
from pathlib import Path
from typing import Callable, Iterable

import torch

from mixq.errors import MixqError
from mixq.io.files import os_error
from mixq.io.memory import LIBC

# safetensors dtype code <-> torch dtype
DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
CODES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 << 20
INDEX_FILE = "model.safetensors.index.json"


def torch_dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'bfloat16'."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    """'bfloat16' / 'torch.bfloat16' / 'BF16' -> torch dtype."""
    if name in DTYPES:
        return DTYPES[name]
    dt = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dt, torch.dtype):
        raise MixqError(f"unknown dtype {name!r}; use bfloat16, float16 or float32")
    return dt


def dtype_name(code: str) -> str:
    """safetensors code -> torch dtype name ('BF16' -> 'bfloat16')."""
    return torch_dtype_name(DTYPES[code])


def entry_nbytes(entry: dict) -> int:
    a, b = entry["data_offsets"]
    return b - a


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
    except OSError as e:  # a link loop, a folder named *.safetensors, no permission...
        raise os_error(e, file) from None
    if not isinstance(header, dict):
        raise MixqError(f"{file}: not a valid safetensors file (its header is not a JSON object); "
                        "re-download or re-export it")
    metadata = header.pop("__metadata__", None) or {}
    start = 8 + n
    for name, t in header.items():
        try:
            a, b = t["data_offsets"]
            dtype = DTYPES[t["dtype"]]
            ok = 0 <= a <= b and start + b <= size and b - a == math.prod(int(d) for d in t["shape"]) * dtype.itemsize
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise MixqError(f"{file}: tensor {name} has a bad entry or lies past the end of the file "
                            f"(truncated or corrupt download?); re-download or re-export it")
    return header, metadata, start


def mapped_tensors(file: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file (header validated) as a view of a private memory map of the file
    (`torch.UntypedStorage.from_file(shared=False)`, as `torch.load(mmap=True)` maps): nothing is copied, the
    OS reads pages as they are used and may drop them again (they are never written), so the tensors of a
    model larger than memory can all be held. A tensor whose offset does not fit its dtype's alignment is
    copied (the writers of safetensors align them)."""
    file = Path(file)
    header, _, start = read_header(file)
    try:
        storage = torch.UntypedStorage.from_file(str(file), shared=False, nbytes=file.stat().st_size)
    except (OSError, RuntimeError) as e:
        raise MixqError(f"{file}: cannot map the file ({e}); check the file and its permissions") from None
    whole = torch.empty(0, dtype=torch.uint8).set_(storage)
    out = {}
    for name, entry in header.items():
        a, b = entry["data_offsets"]
        dtype, shape = DTYPES[entry["dtype"]], [int(d) for d in entry["shape"]]
        raw = whole[start + a:start + b]
        if (start + a) % dtype.itemsize:
            raw = raw.clone()
        out[name] = raw.view(dtype).reshape(shape)
    if out:
        _MAPS[whole.untyped_storage().data_ptr()] = weakref.WeakSet(t for t in out.values() if t.numel() and
                                                                    t.untyped_storage().data_ptr() == whole.data_ptr())
    return out


_MAPS: dict[int, weakref.WeakSet] = {}   # base address of a `mapped_tensors` map -> its tensors (while alive)
_MADV_DONTNEED = 4


def drop_pages(*tensors) -> int:
    """Give back the resident pages of tensors that are views of a `mapped_tensors` map (madvise MADV_DONTNEED,
    the pages wholly inside each tensor; Linux): the map is private and never written, so a later read fetches the
    file's bytes again (from the page cache or the disk) and a model larger than memory stays bounded by what
    is in use. Any other tensor (None, heap, a copy) is left alone. Returns the bytes advised."""
    done = 0
    for t in tensors:
        if t is None or not t.numel() or LIBC is None:
            continue
        views = _MAPS.get(t.untyped_storage().data_ptr())
        if not views:  # not a map, or one whose tensors are all gone (its address may be reused)
            continue
        a = t.data_ptr()
        b = a + t.numel() * t.element_size() if t.is_contiguous() else None
        if b is None:
            continue
        a, b = -(-a // _PAGE) * _PAGE, b // _PAGE * _PAGE
        if b > a and LIBC.madvise(ctypes.c_void_p(a), ctypes.c_size_t(b - a), _MADV_DONTNEED) == 0:
            done += b - a
    return done


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def read_headers(files: Iterable[Path]) -> dict[str, tuple[Path, dict, int]]:
    """name -> (file, header entry, data start) over several files; a name in two files is an error."""
    where: dict[str, tuple[Path, dict, int]] = {}
    for file in files:
        header, _, start = read_header(file)
        for name, entry in header.items():
            if name in where:
                raise MixqError(f"{file}: tensor {name} also appears in {where[name][0].name}; "
                                f"the checkpoint is inconsistent: remove the extra file or re-download it")
            where[name] = (Path(file), entry, start)
    return where


def shard_names(n: int) -> list[str]:
    """The file names of `n` shards, as transformers and mlx-lm write them."""
    return ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def group_shards(sizes: Iterable[int], max_bytes: int) -> list[list[int]]:
    """Indices of items grouped into shards of at most `max_bytes` (a bigger item gets its own shard)."""
    shards: list[list[int]] = []
    size = 0
    for i, nbytes in enumerate(sizes):
        if not shards or (shards[-1] and size + nbytes > max_bytes):
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += nbytes
    return shards or [[]]


class SafetensorsWriter:
    """Write one safetensors file from a known list of (name, shape, dtype), tensor data in that order."""

    def __init__(self, file: Path, entries: list[tuple[str, tuple[int, ...], torch.dtype]],
                 metadata: dict | None = None):
        self.file = Path(file)
        header, offset = {}, 0
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        self.order = []
        for name, shape, dtype in entries:
            n = dtype.itemsize * math.prod(int(d) for d in shape)
            header[name] = {"dtype": CODES[dtype], "shape": [int(d) for d in shape],
                            "data_offsets": [offset, offset + n]}
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
            got = (name, tuple(t.shape), t.dtype)
            raise RuntimeError(f"writer expected rows of {self.order[self._next]}, got {got}")
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

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """Close (checking every announced tensor was written) on success; abort on an error."""
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _as_tensor(block, dtype: torch.dtype) -> torch.Tensor:
    t = block if isinstance(block, torch.Tensor) else torch.from_numpy(block)
    return t.to(dtype)


def write_sharded(out_dir: Path, entries: list[tuple[str, tuple[int, ...], torch.dtype]],
                  produce: Callable[[str], object], *, max_shard_bytes: int = 4 << 30,
                  metadata: dict | None = None, progress: bool = True, desc: str = "writing") -> list[str]:
    """Write `entries` (name, shape, dtype) as safetensors shards, asking `produce(name)` for one tensor at a
    time (a tensor or numpy array, or an iterable of row blocks of it), cast to the entry's dtype.

    Headers are planned up front from the shapes, so nothing but the current tensor is held in memory.
    Writes the index file when there is more than one shard. Returns the shard file names.
    """
    from tqdm import tqdm

    sizes = [dt.itemsize * math.prod(shape) for _, shape, dt in entries]
    groups = group_shards(sizes, max_shard_bytes)
    files = shard_names(len(groups))
    bar = tqdm(total=sum(sizes), unit="B", unit_scale=True, desc=desc, disable=not progress, file=sys.stderr)
    weight_map = {}
    try:
        for fname, group in zip(files, groups):
            with SafetensorsWriter(out_dir / fname, [entries[i] for i in group],
                                   metadata=metadata or {"format": "pt"}) as writer:
                for j, i in enumerate(group):
                    name, _, dtype = entries[i]
                    value = produce(name)
                    blocks = [value] if hasattr(value, "shape") else value  # a tensor or an iterable of row blocks
                    for block in blocks:
                        bar.update(writer.write_rows(name, _as_tensor(block, dtype)))
                    if writer._next != j + 1:
                        raise MixqError(f"tensor {name}: produced fewer bytes than its shape {entries[i][1]} needs")
                    weight_map[name] = fname
    finally:
        bar.close()
    if len(files) > 1:
        index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
        (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2))
    return files

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
from mixq.io.files import os_error
from mixq.io.safetensors import DTYPES, INDEX_FILE, read_headers, torch_dtype_name
from mixq.quant.arch import model_type
from mixq.quant.tensors import TensorInfo, layer_index


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
        except OSError as e:
            raise os_error(e, cfg) from None
        if not isinstance(self.config, dict):
            raise MixqError(f"{cfg}: holds a JSON {type(self.config).__name__}, not an object of settings; "
                            "re-download or fix it")
        self.files = self._weight_files()
        self._where = read_headers(self.files)  # name -> (file, entry, data start)
        if not self._where:
            raise MixqError(f"{self.path}: the safetensors files hold no tensors")

    def _weight_files(self) -> list[Path]:
        index = self.path / INDEX_FILE
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                files = sorted({self.path / f for f in weight_map.values()})
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
                raise MixqError(f"{index}: not a valid safetensors index ({type(e).__name__}: {e}); "
                                "re-download or fix it") from None
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


# ---------------------------------------------------------------- the weights against config.json

def expected_tensors(config: dict, where="config.json") -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """({checkpoint tensor name: shape} the architecture of `config` needs, names that may be absent: a tied
    head). The oracle is transformers itself: the model is built on the meta device (no memory, no data)
    and its state dict turned back into checkpoint names, as `save_pretrained` writes them."""
    import transformers
    from transformers import AutoConfig
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    cfg = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    verbosity = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()
    try:
        hf = AutoConfig.for_model(**cfg)
        with torch.device("meta"):
            model = MODEL_FOR_CAUSAL_LM_MAPPING[type(hf)](hf)
        state = revert_weight_conversion(model, model.state_dict())
    except Exception as e:  # noqa: BLE001 - any failure means config.json does not describe a buildable model
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise MixqError(f"{where}: transformers cannot build a {model_type(config)} model from it "
                        f"({type(e).__name__}: {first}); fix config.json") from None
    finally:
        transformers.utils.logging.set_verbosity(verbosity)
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    return {n: tuple(t.shape) for n, t in state.items()}, tied


def _stored_shapes(ckpt: "Checkpoint") -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape as the model holds it (gpt-oss MXFP4 `X_blocks` + `X_scales` stand for X [E, in, out])."""
    have = {n: ckpt.shape(n) for n in ckpt.names()}
    for n in [n for n in have if n.endswith("_blocks") and n[:-7] + "_scales" in have]:
        shape = have.pop(n)
        have.pop(n[:-7] + "_scales")
        have[n[:-7]] = (shape[0], shape[2] * shape[3] * 2, shape[1]) if len(shape) == 4 else shape
    return have


def _names(names: list[str], shown: int = 4) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def check_against_config(ckpt: "Checkpoint") -> None:
    """Refuse a checkpoint whose tensors do not cover its config.json exactly: a missing or extra tensor,
    a layer count that disagrees with config.json, a mis-shaped (e.g. transposed) or non-floating weight.
    One line, naming the tensors."""
    want, optional = expected_tensors(ckpt.config, ckpt.path / "config.json")
    have = _stored_shapes(ckpt)
    missing = [n for n in want if n not in have and n not in optional]
    extra = [n for n in have if n not in want and not n.endswith("rotary_emb.inv_freq")]
    shaped = [f"{n} {list(have[n])} (config.json: {list(want[n])})" for n in want if n in have and have[n] != want[n]]
    ints = [f"{n} ({ckpt.dtype(n)})" for n in want if n in ckpt and not ckpt.dtype(n).is_floating_point]
    if not (missing or extra or shaped or ints):
        return
    said = []
    n_cfg = ckpt.config.get("num_hidden_layers")
    held = {i for i in (layer_index(n) for n in have) if i is not None}
    if isinstance(n_cfg, int) and held and max(held) + 1 != n_cfg:
        said.append(f"config.json says {n_cfg} layers, the weights hold {max(held) + 1}")
    for kind, names in (("missing", missing), ("extra", extra), ("mis-shaped", shaped), ("not floating point", ints)):
        if names:
            said.append(f"{len(names)} {kind}: {_names(sorted(names))}")
    raise MixqError(f"{ckpt.path}: the weights do not match config.json ({'; '.join(said)}); "
                    "fix or re-download the checkpoint (config.json and the weights must agree)")

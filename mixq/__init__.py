"""mixq: make, measure and ship mixed-precision quantized language models in the MLX format.

Python API (mirrors the CLI; shaped like mlx-lm's):
    from mixq import load, generate, convert, evaluate
The functions are imported on first use, so `import mixq` (and `mixq --help`) stays light.
"""

from mixq.version import __version__

_API = {
    "convert": "mixq.quant.convert",
    "evaluate": "mixq.eval.evaluate",
    "generate": "mixq.infer.generate",
    "load": "mixq.infer.generate",
    "stream_generate": "mixq.infer.generate",
}

__all__ = [*_API, "__version__"]


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'mixq' has no attribute {name!r}")

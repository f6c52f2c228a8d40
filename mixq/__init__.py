"""mixq: make, measure and ship mixed-precision quantized language models in the MLX format."""

__version__ = "0.1.0"


def __getattr__(name):
    # The Python API (mlx-lm shaped), imported lazily so `import mixq` stays light.
    if name in ("load", "generate"):
        from . import generate as _g
        return getattr(_g, name)
    if name == "convert":
        from .convert import convert
        return convert
    if name == "evaluate":
        from .evaluate import evaluate
        return evaluate
    raise AttributeError(name)

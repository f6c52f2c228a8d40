"""mixq: make, measure and ship mixed-precision quantized language models in the MLX format.

Python API (mirrors the CLI; shaped like mlx-lm's):
    from mixq import load, generate, convert, evaluate
These modules import only the standard library at the top, so `import mixq` stays light.
"""

__version__ = "0.1.0"

# Bound after the submodule imports, so `mixq.generate` is the function (as in mlx-lm).
from .convert import convert  # noqa: E402
from .evaluate import evaluate  # noqa: E402
from .generate import generate, load, stream_generate  # noqa: E402

__all__ = ["convert", "evaluate", "generate", "load", "stream_generate", "__version__"]

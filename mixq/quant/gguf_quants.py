"""GGUF block formats as MLX quantized tensors: which formats an MLX affine spec holds exactly, and the
packed words, scales and biases of a GGUF tensor kept as it is (`--recipe source`, `mixq import --keep-quant`).

mlx's affine dequantization is `w = scale * q + bias` per group of `group_size` weights, q unsigned in
[0, 2**bits). GGUF's block formats (ggml-quants.c; the `gguf` package's `dequantize` does the same in
float32) map onto it with group 32 and no rounding of the codes:

| GGUF  | block               | GGUF value            | MLX spec  | scale  | bias      | code          |
| ----- | ------------------- | --------------------- | --------- | ------ | --------- | ------------- |
| Q8_0  | 32: d, int8 q       | d * q                 | 8-bit g32 | d      | -128 d    | q + 128       |
| Q4_0  | 32: d, 4-bit q      | d * (q - 8)           | 4-bit g32 | d      | -8 d      | q             |
| Q4_1  | 32: d, m, 4-bit q   | d * q + m             | 4-bit g32 | d      | m         | q             |
| Q5_0  | 32: d, 5-bit q      | d * (q - 16)          | 5-bit g32 | d      | -16 d     | q             |
| Q5_1  | 32: d, m, 5-bit q   | d * q + m             | 5-bit g32 | d      | m         | q             |
| Q4_K  | 256 = 8 x 32: d, dmin, 6-bit sc/m, 4-bit q | d sc q - dmin m | 4-bit g32 | d * sc | -(dmin * m) | q |
| Q5_K  | as Q4_K, 5-bit q    | d sc q - dmin m       | 5-bit g32 | d * sc | -(dmin * m) | q             |

In float32 scales and biases every row is exact: d, m, dmin are float16, `d * sc` and `dmin * m` (11 + 6
significant bits) and `scale * q` (at most 11 + 8 bits for the legacy formats, 17 + 5 for the K formats)
are exact float32 products, -8 d / -16 d / -128 d are exact, and the last addition rounds exactly as
GGUF's own (`a + (-b)` is `a - b` in IEEE arithmetic; Q4_0/Q5_0/Q8_0's sums are exact). The other formats
(Q6_K's and Q3_K's and Q2_K's 16-wide sub-blocks, Q6_K's signed 8-bit sub-scales, the IQ lattices, ...)
have no exact MLX form: they are re-quantized from their float values (default: the same bits, group 32).

The codes are read with the `gguf` package itself: each block is dequantized once more with its scale
fields set to d = 1, m/dmin = 0 (and, for the K formats, every sub-block scale 1), which yields the codes
exactly; d, m and the K formats' sub-scales are read from the same bytes (`Q4_K.get_scale_min`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from mixq.errors import MixqError
from mixq.quant.plan import Plan, TensorPlan, plan_model
from mixq.quant.quantize import Quantized, pack_codes
from mixq.quant.recipe import Recipe, load_recipe, parse_recipe
from mixq.quant.spec import DTYPE_BYTES, Spec, spec_nbytes

GROUP = 32
# GGUF type name -> (bits, code offset added to the unit-scale dequantized value, has m/dmin field)
EXACT = {"Q8_0": (8, 128), "Q4_0": (4, 8), "Q4_1": (4, 0), "Q5_0": (5, 16), "Q5_1": (5, 0),
         "Q4_K": (4, 0), "Q5_K": (5, 0)}
# Formats with no exact MLX form -> the bits of their default re-quantization (same bits, group 32)
REQUANT_BITS = {"Q8_1": 8, "Q8_K": 8, "Q6_K": 6, "Q3_K": 3, "Q2_K": 2, "IQ4_NL": 4, "IQ4_XS": 4,
                "IQ3_XXS": 3, "IQ3_S": 3, "IQ2_XXS": 2, "IQ2_XS": 2, "IQ2_S": 2, "IQ1_S": 2, "IQ1_M": 2,
                "TQ1_0": 2, "TQ2_0": 2, "MXFP4": 4, "NVFP4": 4, "Q1_0": 2}
FLOAT_TYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
_K_UNIT_SCALES = np.array([1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1], dtype=np.uint8)  # every sc = 1, every m = 0
_ONE_F16 = np.array([1.0], dtype=np.float16).view(np.uint8)
ROW_BLOCK = 1 << 20   # weights converted per step (bounds the float32 temporaries)


@dataclass(frozen=True)
class SourceFormat:
    """What a GGUF tensor type becomes in MLX: an exact spec, a re-quantization, or a float tensor kept."""
    gguf_type: str
    spec: Spec | None      # the exact spec (exact=True) or the default re-quantization (None: a float tensor)
    exact: bool

    def reason(self, requant: Spec | None = None) -> str:
        if self.exact:
            return f"GGUF {self.gguf_type} kept exactly ({self.spec})"
        if self.spec is None:
            return f"GGUF {self.gguf_type} kept as float"
        return f"GGUF {self.gguf_type} has no exact MLX form: re-quantized to {requant or self.spec}"


def source_format(gguf_type: str) -> SourceFormat:
    """The MLX form of a GGUF tensor type (by name: "Q4_K", "F32", ...); a one-line error for an unknown one."""
    if gguf_type in EXACT:
        return SourceFormat(gguf_type, Spec(EXACT[gguf_type][0], GROUP), True)
    if gguf_type in FLOAT_TYPES:
        return SourceFormat(gguf_type, None, False)
    if gguf_type in REQUANT_BITS:
        return SourceFormat(gguf_type, Spec(REQUANT_BITS[gguf_type], GROUP), False)
    raise MixqError(f"GGUF type {gguf_type} is not known to mixq; use a GGUF with other tensor types")


def _blocks(data: np.ndarray, qtype) -> np.ndarray:
    import gguf

    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return np.ascontiguousarray(data).reshape(-1, type_size)


def _unit_codes(blocks: np.ndarray, qtype, offset: int) -> np.ndarray:
    """The codes of every block: GGUF's dequantization with d = 1, m = dmin = 0 (K: every sub-scale 1), + offset."""
    from gguf.quants import dequantize

    unit = blocks.copy()
    unit[:, 0:2] = _ONE_F16
    name = qtype.name
    if name in ("Q4_1", "Q5_1", "Q4_K", "Q5_K"):
        unit[:, 2:4] = 0
    if name in ("Q4_K", "Q5_K"):
        unit[:, 4:16] = _K_UNIT_SCALES
    q = dequantize(unit, qtype) + np.float32(offset)
    return q.astype(np.uint8)


def _scales_biases(blocks: np.ndarray, qtype) -> tuple[np.ndarray, np.ndarray]:
    """float32 (scale, bias) per group of 32, [n_blocks, groups per block]."""
    from gguf.quants import Q4_K

    name = qtype.name
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)          # [n, 1]
    if name in ("Q4_K", "Q5_K"):
        dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
        sc, m = Q4_K.get_scale_min(blocks[:, 4:16].copy())
        return d * sc.astype(np.float32), -(dmin * m.astype(np.float32))
    if name in ("Q4_1", "Q5_1"):
        return d, blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    return d, -np.float32(EXACT[name][1]) * d


def to_mlx(data: np.ndarray, qtype, cols: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A GGUF tensor's raw rows (uint8 [rows, bytes per row]) in an exact format -> (codes uint8 [rows, cols],
    scales float32 [rows, cols / 32], biases float32 [rows, cols / 32]) with `scale * code + bias` equal to
    GGUF's dequantized value."""
    name = qtype.name
    if name not in EXACT:
        raise MixqError(f"GGUF type {name} has no exact MLX form (exact: {', '.join(EXACT)})")
    rows = data.shape[0]
    blocks = _blocks(data, qtype)
    codes = _unit_codes(blocks, qtype, EXACT[name][1]).reshape(rows, cols)
    s, b = _scales_biases(blocks, qtype)
    return codes, s.reshape(rows, cols // GROUP), b.reshape(rows, cols // GROUP)


def quantized_tensor(data: np.ndarray, qtype, cols: int, row_order: np.ndarray | None = None) -> Quantized:
    """A GGUF tensor in an exact format as MLX stores it: packed uint32 words, float32 scales and biases
    (rows taken in `row_order` if given: llama's q/k rows are permuted in GGUF). Converted in row blocks."""
    bits = EXACT[qtype.name][0]
    rows = data.shape[0]
    wq = torch.empty(rows, cols * bits // 32, dtype=torch.uint32)
    scales = torch.empty(rows, cols // GROUP, dtype=torch.float32)
    biases = torch.empty_like(scales)
    src = np.asarray(data)
    step = max(1, ROW_BLOCK // cols)
    for a in range(0, rows, step):
        idx = slice(a, a + step) if row_order is None else row_order[a:a + step]
        codes, s, b = to_mlx(src[idx], qtype, cols)
        wq[a:a + step] = pack_codes(torch.from_numpy(codes), bits)
        scales[a:a + step] = torch.from_numpy(s)
        biases[a:a + step] = torch.from_numpy(b)
    return Quantized(wq, scales, biases, Spec(bits, GROUP))


# ------------------------------------------------------------------ the `source` plan of a GGUF

SOURCE_RECIPE = "source"
SCALE_DTYPES = ("float16", "float32", "bfloat16")
DEFAULT_SCALE_DTYPE = "float16"


def source_recipe(scale_dtype: str, requant: Recipe | None) -> Recipe:
    """The pseudo-recipe `source`: what the plan records as its recipe (name, description, text)."""
    again = f"recipe {requant.name}" if requant else "the same bits at group 32"
    desc = (f"GGUF tensors kept in their own block format where MLX affine group 32 holds it exactly "
            f"(Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K; scales and biases in {scale_dtype}); the other "
            f"quantized formats re-quantized to {again}; float tensors kept")
    text = (f'[recipe]\nname = "{SOURCE_RECIPE}"\ndescription = "{desc}"\nkeep = true\n'
            f'# scale_dtype = "{scale_dtype}"\n'
            + (f"# requant = {requant.name}:\n" + "".join(f"#   {line}\n" for line in requant.text.splitlines())
               if requant else ""))
    return parse_recipe(text, f"<{SOURCE_RECIPE}>", SOURCE_RECIPE)


def plan_source(gguf_path, items: list, config: dict, *, scale_dtype: str = DEFAULT_SCALE_DTYPE,
                requant=None, float_dtype: str | None = None) -> tuple[Plan, dict]:
    """The plan of a GGUF kept as it is, and the loaders of its exactly kept tensors.

    `items`: the (MLX TensorInfo, float loader) of the GGUF's Hugging Face import; `requant`: the recipe for
    tensors with no exact MLX form (default: the same bits, group 32); `float_dtype`: the dtype of float tensors
    (default: the GGUF's own). Returns (Plan, {tensor name: loader returning `Quantized`}).
    """
    from mixq.sources.gguf import permuted_heads, source_tensors, unpermute

    if scale_dtype not in SCALE_DTYPES:
        raise MixqError(f"--scale-dtype {scale_dtype}: use one of {', '.join(SCALE_DTYPES)}")
    requant = load_recipe(requant) if requant is not None else None
    arch, by_name = source_tensors(gguf_path)
    infos = [info for info, _ in items]
    again = plan_model(infos, requant, config, dtype=scale_dtype) if requant else None
    sbytes = DTYPE_BYTES[scale_dtype]
    tensors, loaders = [], {}
    for i, info in enumerate(infos):
        t = by_name.get(info.name)
        if t is None:
            raise MixqError(f"{gguf_path}: tensor {info.name} of its import has no GGUF tensor; "
                            "re-import the GGUF (delete the cached import)")
        fmt = source_format(t.tensor_type.name)
        shape = tuple(int(d) for d in info.shape)
        if fmt.exact:
            tp = TensorPlan(info.name, shape, scale_dtype, fmt.spec, fmt.reason(),
                            spec_nbytes(shape, fmt.spec, sbytes), source=True)
            n_head = permuted_heads(info.name, arch, config)
            order = unpermute(np.arange(shape[0]), n_head) if n_head else None
            loaders[info.name] = partial(quantized_tensor, t.data, t.tensor_type, shape[-1], order)
        elif fmt.spec is None:
            dt = float_dtype or FLOAT_TYPES[fmt.gguf_type]
            tp = TensorPlan(info.name, shape, dt, None, fmt.reason(), math.prod(shape) * DTYPE_BYTES[dt])
        elif again is not None:
            tp = again.tensors[i]
            tp.reason = f"{fmt.reason(tp.spec)} ({tp.reason})" if tp.spec else f"GGUF {fmt.gguf_type}: {tp.reason}"
        else:
            tp = TensorPlan(info.name, shape, scale_dtype, fmt.spec, fmt.reason(),
                            spec_nbytes(shape, fmt.spec, sbytes))
        tensors.append(tp)
    recipe = source_recipe(scale_dtype, requant)
    return Plan(recipe, tensors, n_layers=config.get("num_hidden_layers"),
                tied=not any(n.endswith("lm_head.weight") for n in by_name)), loaders


def gguf_bits_per_weight(gguf_path) -> tuple[int, int]:
    """(bytes, parameters) of a GGUF's tensors: its own bits per weight is 8 * bytes / parameters."""
    from mixq.sources.gguf import open_gguf

    reader = open_gguf(gguf_path)
    return sum(int(t.n_bytes) for t in reader.tensors), sum(int(t.n_elements) for t in reader.tensors)

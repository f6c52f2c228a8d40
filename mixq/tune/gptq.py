"""GPTQ (Frantar et al. 2022) on MLX's grids (affine and the float modes): Hessian-based error compensation, layer
by layer.

`gptq_quantize(w, H, bits, group_size, dtype=...)` quantizes one weight [out, in] column by column: each
column is rounded to its group's grid and the rounding error, weighted by the inverse Hessian
H = 2 X^T X / n of the layer's inputs X, is pushed onto the columns not yet quantized (two-level lazy batch
updates: a column's error goes at once to the rest of its inner block of 32 columns, each inner block's to the rest
of its block of 128 in one product, each block's to the trailing columns in one in-place addmm_; Cholesky factor of
H^-1, damping `damp * mean(diag H)`). A group's scale and bias
are computed as the group starts, from the weights as updated so far, with mx.quantize's own formula
(`quant.quantize.affine_params`) and rounded to the stored dtype; codes are rounded as mx.quantize rounds
them. The compensation uses the exact values MLX dequantizes (scale * q, rounded, + bias, rounded, in the
stored dtype), so what is written is plain MLX affine and what GPTQ optimised is what MLX computes.
Float modes (`mode` mxfp4, nvfp4, mxfp8; `_FloatGrid`): the same column loop; a group's scale (E8M0 power of two
for mx*, E4M3 for nvfp4) is computed as the group starts from the max |w| of its columns as updated so far (in the
stored dtype) by mx.quantize's own formula (`quant.quantize.float_scales`), each column is rounded to the nearest
code of its group's grid (E2M1: 16 codes, E4M3: 256) with mlx's ties (`float_codes`), and the error is taken
against code value * scale, which is what MLX dequantizes (exact): the output is `quantize(..., mode=)`'s layout
(packed codes, uint8 scales, no biases). The range search (`clip`) and act-order are affine only; a float-mode tensor
ignores them.
Act-order (`act_order=True`, `convert --gptq-act-order`) uses static groups (`_act_order`): scales and biases of
MLX's contiguous groups are fixed from the weight before GPTQ, the columns are done in act order, and the codes
stored in the original order, so the layout stays exactly MLX's.

`gptq_tensors(prep, calibration)` runs it sequentially over the model (float32, transformers): the
inputs of the first decoder layer and every layer's keyword arguments (position embeddings, masks) are
captured in one pass in which the decoder layers are skipped; then for each decoder layer the Hessians
of its planned linears are accumulated from its inputs (hooks; linears reading the same input tensor, q/k/v and
gate/up, share one Hessian, computed once), the linears are quantized, and the layer's outputs with the quantized
weights become the next layer's inputs. Layers after the last one with planned tensors are not run (unless the
head is planned: its inputs are the last layer's outputs). Only linears inside the
decoder layers, the output head (`head`) and MoE expert stacks are done this way; anything else planned for
gptq (an untied embedding, routers that are not nn.Linear) falls back to round-to-nearest, and `methods` says so
per tensor. Memory: one decoder layer at a time (`LayerLoader`: the model is built with zero-stride placeholders for
every decoder layer's weights, which are read from the source's lazy loaders before that layer runs and dropped
after), the tensors outside the layers (embedding, final norm, head) in float32, the quantized tensors made so far
(packed) and the calibration activations (two copies of samples x length x hidden float32).

MoE experts (qwen3_moe's switch_mlp, gpt_oss's experts: stacked [experts, out, in] tensors in MLX) get one
Hessian per expert, from the tokens the router sends to it: a pre-hook on the experts module sees the layer's
hidden states and the routing (top-k expert ids per token); gate/up of expert e are fitted on the hidden states
of its tokens, down on that expert's own activations act(gate) * up of them. An expert that saw fewer routed
tokens than its projection has inputs (`min_expert_tokens`: the Hessian X^T X of n < in tokens is singular,
so GPTQ would push rounding error into input directions the calibration never showed that expert, and only the
damping would decide them) is rounded to nearest instead; `methods` and the calibration record
(`experts_rtn`, `expert_tokens`) say which.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from mixq.errors import MixqError
from mixq.eval.engine import build_from_state
from mixq.eval.packed import placeholder, targets
from mixq.io.memory import trim_heap
from mixq.io.safetensors import dtype_from_name
from mixq.quant.arch import hf_state_dict, model_type
from mixq.quant.convert import Precomputed
from mixq.quant.quantize import (
    Quantized,
    affine_params,
    dequantize,
    float_codes,
    float_scales,
    float_values,
    pack_codes,
    quantize,
)
from mixq.quant.tensors import layer_index
from mixq.threads import torch_threads

DAMP = 0.01        # damping: fraction of the mean Hessian diagonal added to the diagonal
BLOCK = 128        # columns per lazy-update block (a multiple of every group size: groups never straddle)
INNER = 32         # columns per inner block (divides every group size: a group starts at an inner block's start)
BATCH = 4          # calibration windows per forward
# Range search: a group's scale and bias come from its max/min shrunk by each factor; the one with the least
# diag(H)-weighted squared rounding error wins per row (still mx.quantize's formula: codes, scale, bias as MLX reads)
CLIP_GRID = tuple(round(1 - 0.025 * k, 3) for k in range(13))   # 1.0 ... 0.7
CLIP = True   # the range search is on by default (its measured gain: README); convert's --no-gptq-clip turns it off


def _inverse_factor(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damping)^-1 (the GPTQ update rows); damping grows if H is not definite."""
    H = H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    mean = float(torch.diag(H).mean())
    for k in range(6):
        Hd = H + torch.eye(H.shape[0], dtype=H.dtype) * (damp * 10 ** k * mean)
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if int(info) == 0:
                return U
    raise MixqError("GPTQ: the Hessian stays singular after damping; use more calibration samples")


def gptq_quantize(w: torch.Tensor, H: torch.Tensor, bits: int, group_size: int, *, dtype: torch.dtype,
                  damp: float = DAMP, block: int = BLOCK, clip: bool = CLIP, act_order: bool = False,
                  mode: str = "affine"):
    """(packed uint32 [out, in*bits/32], scales, biases [out, in/group]) of `w` [out, in], as
    `quant.quantize.quantize(..., mode=mode)` returns them (affine: scales and biases in `dtype`; float modes: uint8
    scales, biases None), with GPTQ's error compensation under the Hessian `H` [in, in]. Affine only: `clip`, each
    group's range searched (CLIP_GRID) instead of taken from its max/min, and `act_order` (`_act_order`: static
    groups, MLX's contiguous groups stay exact); a float mode ignores both (columns in order, each group's scale from
    its max |w| as it starts)."""
    if act_order and mode == "affine":
        return _act_order(w, H, bits, group_size, dtype=dtype, damp=damp, block=block, clip=clip)
    if block % group_size:
        raise ValueError(f"block {block} must be a multiple of the group size {group_size}")
    # the weight as stored (RTN starts from the same values), transposed: one float32 copy, column c is row c
    Wt = w.to(dtype).to(torch.float32).T.clone(memory_format=torch.contiguous_format)
    cols, rows = Wt.shape
    codes = torch.empty(rows, cols, dtype=torch.uint8)
    if mode == "affine":
        scales = torch.empty(rows, cols // group_size, dtype=dtype)
        grid = _AffineGrid(scales, torch.empty_like(scales), bits, group_size, torch.diag(H).to(torch.float32),
                           CLIP_GRID if clip else (1.0,))
    else:
        grid = _FloatGrid(torch.empty(rows, cols // group_size, dtype=torch.uint8), bits, group_size, mode, dtype)
    # small ops and small factorizations: one thread is fastest, and stays fast on a busy machine (measured under
    # load 8 on 2 cores: cholesky_inverse of 1536 x 1536 takes 3.1 s on two threads, 0.23 s on one)
    with torch_threads(1, at_most=True):
        Hinv = _inverse_factor(H.to(torch.float32), damp)
        _columns(Wt, Hinv, codes, grid, group_size, block)
    return pack_codes(codes, bits), grid.scales, grid.biases


def _act_order(w, H, bits: int, group_size: int, *, dtype, damp: float, block: int, clip: bool):
    """GPTQ in act-order (columns by decreasing Hessian diagonal: the most active inputs first, while the most
    columns are left to absorb their error) with static groups: every group's scale and bias come from the weight
    before any update (MLX's contiguous groups of the original column order, mx.quantize's formula), each column is
    then rounded on its own group's grid in act order, and the codes are stored back in the original order: the
    stored layout is plain MLX affine, exactly."""
    W = w.to(dtype).to(torch.float32).clone()
    rows, cols = W.shape
    hdiag = torch.diag(H).to(torch.float32)
    grid = CLIP_GRID if clip else (1.0,)
    groups = [_group_params(W[:, a:a + group_size], hdiag[a:a + group_size], bits, dtype, grid)
              for a in range(0, cols, group_size)]
    scales = torch.stack([s for s, _ in groups], 1).to(dtype)
    biases = torch.stack([z for _, z in groups], 1).to(dtype)
    perm = torch.argsort(hdiag, descending=True, stable=True)
    with torch_threads(1, at_most=True):
        Hinv = _inverse_factor(H.to(torch.float32)[perm][:, perm], damp)
        codes_p = _columns_static(W[:, perm], Hinv, groups, scales, biases, perm // group_size, bits, block)
    codes = torch.empty_like(codes_p)
    codes[:, perm] = codes_p
    return pack_codes(codes, bits), scales, biases


def _lazy_update(Wt: torch.Tensor, Hinv: torch.Tensor, E: torch.Tensor, a: int, b: int, end: int) -> None:
    """GPTQ's lazy batch update of columns [b, end) by the errors E of columns [a, b):
    Wt[b:end] -= Hinv[a:b, b:end]^T E,
    in place (addmm_: no temporary as large as the weight, which is 113 MB at smollm2's head)."""
    if end > b:
        Wt[b:end].addmm_(Hinv[a:b, b:end].T, E, alpha=-1.0)


def _columns_static(W, Hinv, groups, scales, biases, group_of, bits: int, block: int) -> torch.Tensor:
    """The GPTQ column loop with fixed per-group (scale, bias): column i is rounded on group `group_of[i]`'s grid
    (codes as mx.quantize rounds them; the error with the value MLX dequantizes). -> uint8 codes [rows, cols]."""
    import numpy as np

    rows, cols = W.shape
    maxq = float((1 << bits) - 1)
    Wt = W.T.contiguous()
    Wn, Hn = Wt.numpy(), Hinv.numpy()
    ct = np.empty((cols, rows), dtype=np.uint8)
    t = np.empty(rows, dtype=np.float32)
    sn = [s.numpy() for s, _ in groups]
    zn = [z.numpy() for _, z in groups]
    for a, b, ia, ib, E in _blocks(cols, rows, block, INNER):
        for i in range(ia, ib):
            g = int(group_of[i])
            w = Wn[i]
            np.subtract(w, zn[g], out=t)
            np.divide(t, sn[g], out=t)
            np.clip(t, 0.0, maxq, out=t)
            np.rint(t, out=t)
            ct[i] = t
            deq = (scales[:, g] * torch.from_numpy(t).to(scales.dtype) + biases[:, g]).to(torch.float32).numpy()
            err = (w - deq) / Hn[i, i]
            Wn[i + 1:ib] -= np.outer(Hn[i, i + 1:ib], err)
            E[i - a] = torch.from_numpy(err)
        _lazy_update(Wt, Hinv, E[ia - a:ib - a], ia, ib, b)   # the rest of the block, once per inner block
        if ib == b:
            _lazy_update(Wt, Hinv, E, a, b, cols)             # the trailing columns, once per block
    return torch.from_numpy(ct).T.contiguous()


def _blocks(cols: int, rows: int, block: int, inner: int):
    """(a, b, ia, ib, E) for GPTQ's two-level lazy updates: blocks [a, b) of `block` columns, each cut into inner blocks
    [ia, ib) of `inner`; E (float32 [b - a, rows], one per block) collects the block's scaled errors."""
    for a in range(0, cols, block):
        b = min(a + block, cols)
        E = torch.empty(b - a, rows)
        for ia in range(a, b, inner):
            yield a, b, ia, min(ia + inner, b), E


def gptq_round_trip(w: torch.Tensor, H: torch.Tensor, spec, *, damp: float = DAMP) -> torch.Tensor:
    """`w` [out, in] quantized by GPTQ under the input Hessian `H` to `spec` (affine or a float mode), read back as
    MLX dequantizes it, in w's dtype (the stored dtype): quant.quantize.round_trip's counterpart (`mixq measure
    --method gptq`)."""
    wq, s, b = gptq_quantize(w, H, spec.bits, spec.group_size, dtype=w.dtype, damp=damp, mode=spec.mode)
    return _dequant(wq, s, b, spec).to(w.dtype)


def _levels(s_dt: torch.Tensor, z_dt: torch.Tensor, bits: int):
    """float32 [rows, 2**bits]: every code's dequantized value per row (scale * q, rounded, + bias, rounded, in the
    stored dtype, as mx.dequantize computes it)."""
    q = torch.arange(1 << bits, dtype=torch.float32).to(s_dt.dtype)
    return (s_dt[:, None] * q[None, :] + z_dt[:, None]).to(torch.float32).numpy()


def _group_params(g: torch.Tensor, d: torch.Tensor, bits: int, dtype, grid) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (scale, bias) [rows] of the groups `g` [rows, gs]: mx.quantize's, from the range shrunk by the
    factor in `grid` whose rounding error (squared, weighted by `d` [gs]) is least, per row."""
    maxq = float((1 << bits) - 1)
    best = None
    for p in grid:
        s, z = affine_params(g * p if p != 1.0 else g, bits)
        if len(grid) == 1:
            return s[:, 0], z[:, 0]
        q = ((g - z) / s).clamp_(0.0, maxq).round_()
        err = ((g - (s.to(dtype) * q.to(dtype) + z.to(dtype)).to(torch.float32)) ** 2 * d).sum(-1)
        if best is None:
            best = [err, s[:, 0], z[:, 0]]
        else:
            m = err < best[0]
            best = [torch.where(m, err, best[0]), torch.where(m, s[:, 0], best[1]), torch.where(m, z[:, 0], best[2])]
    return best[1], best[2]


@dataclass
class _AffineGrid:
    """GPTQ's per-group affine grid: a group's (scale, bias) from its columns as updated so far, mx.quantize's formula
    (`_group_params`; `grid`: range shrink factors searched), rounded to the stored dtype; codes as mx.quantize rounds
    them; the values MLX dequantizes (`_levels`)."""
    scales: torch.Tensor     # [rows, groups] in the stored dtype (filled)
    biases: torch.Tensor
    bits: int
    gs: int
    hdiag: torch.Tensor      # diag(H): the range search's weights
    grid: tuple

    def __post_init__(self):
        import numpy as np

        rows = self.scales.shape[0]
        self.maxq = float((1 << self.bits) - 1)
        self.flat = np.arange(rows) * (1 << self.bits)
        self.t = np.empty(rows, dtype=np.float32)

    def start(self, i: int, cols) -> None:
        """Group i // gs begins: `cols` (numpy [gs, rows]) are its columns, up to date."""
        dtype = self.scales.dtype
        s, z = _group_params(torch.from_numpy(cols.T.copy()), self.hdiag[i:i + self.gs], self.bits, dtype, self.grid)
        s_dt, z_dt = s.to(dtype), z.to(dtype)
        self.scales[:, i // self.gs], self.biases[:, i // self.gs] = s_dt, z_dt
        self.levels = _levels(s_dt, z_dt, self.bits).ravel()
        self.sn, self.zn = s.numpy(), z.numpy()

    def round(self, w):
        """(codes, dequantized float32 values) of column `w` (numpy [rows]) on the current group's grid."""
        import numpy as np

        t = self.t
        np.subtract(w, self.zn, out=t)
        np.divide(t, self.sn, out=t)
        np.clip(t, 0.0, self.maxq, out=t)
        np.rint(t, out=t)
        q = t.astype(np.intp)
        return q, self.levels[self.flat + q]


@dataclass
class _FloatGrid:
    """GPTQ's per-group float-mode grid (mxfp4, nvfp4, mxfp8): a group's scale from the max |w| of its columns as
    updated so far (in the stored dtype), codes as mx.quantize computes and rounds them (`quant.quantize.float_scales`,
    `float_codes`); the value MLX dequantizes is code value * scale, exact in float32."""
    scales: torch.Tensor     # uint8 [rows, groups] (filled)
    bits: int
    gs: int
    mode: str
    dtype: torch.dtype       # the stored dtype: a group's max |w| is taken in it, as mx.quantize does
    biases: None = None

    def __post_init__(self):
        self.values = float_values(self.bits).numpy()

    def start(self, i: int, cols) -> None:
        import numpy as np

        amax = torch.from_numpy(np.abs(cols).max(0)).to(self.dtype)
        sbyte, self.scale = float_scales(amax, self.bits, self.mode)
        self.scales[:, i // self.gs] = sbyte
        self.sn = self.scale.numpy()

    def round(self, w):
        q = float_codes(torch.from_numpy(w), self.scale, self.bits).numpy()
        return q, self.values[q] * self.sn


def _columns(Wt, Hinv, codes, grid, group_size: int, block: int) -> None:
    """The GPTQ column loop: fills codes, and the grid's scales (and biases). In numpy on transposed
    (column-contiguous) copies: one column is a dozen tiny vector ops, which cost a few microseconds each in numpy and
    several times that in torch; float32 arithmetic and rounding as `quantize`'s, so the codes are those it computes
    for the weights as updated. Two-level lazy updates (`_blocks`): a column's error goes at once only to the columns
    of its inner block; the rest of its block gets the inner block's errors in one product, the trailing columns the
    block's in one more."""
    import numpy as np

    cols, rows = Wt.shape                    # the weight transposed (updated in place): column c is row c
    Wn, Hn = Wt.numpy(), Hinv.numpy()
    ct = np.empty((cols, rows), dtype=np.uint8)
    for a, b, ia, ib, E in _blocks(cols, rows, block, min(INNER, group_size)):
        En = E.numpy()
        for i in range(ia, ib):
            if i % group_size == 0:          # the group's columns are up to date: earlier inner blocks updated them
                grid.start(i, Wn[i:i + group_size])
            w = Wn[i]
            q, deq = grid.round(w)
            ct[i] = q
            err = (w - deq) / Hn[i, i]
            Wn[i + 1:ib] -= np.outer(Hn[i, i + 1:ib], err)
            En[i - a] = err
        _lazy_update(Wt, Hinv, E[ia - a:ib - a], ia, ib, b)   # the rest of the block, once per inner block
        if ib == b:
            _lazy_update(Wt, Hinv, E, a, b, cols)             # the trailing columns, once per block
    codes.copy_(torch.from_numpy(ct).T)


# ---------------------------------------------------------------- the model, layer by layer

def _decoder_layers(model) -> tuple[str, torch.nn.ModuleList]:
    """(module path, ModuleList) of the decoder layers: the ModuleList named `*.layers` with the most blocks."""
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and n.endswith("layers")]
    if not lists:
        raise MixqError(f"{type(model).__name__}: no decoder layers found; GPTQ supports decoder-only models")
    return max(lists, key=lambda nm: len(nm[1]))


def _skip(hidden_states, *args, **kwargs):
    return hidden_states


def capture_inputs(model, layers, ids: torch.Tensor, batch: int):
    """Inputs of the first decoder layer per batch, and each layer's (args, kwargs) per batch, from one pass of
    the model in which every decoder layer is skipped (so layer 0 sees the embeddings, and each layer the
    position embeddings and mask meant for it)."""
    hidden, calls = [], [[] for _ in layers]
    handles = []

    def hook(i):
        def record(module, args, kwargs):
            if i == 0:
                hidden.append(args[0].detach())
            calls[i].append((args[1:], dict(kwargs)))
        return record

    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(hook(i), with_kwargs=True))
        layer.forward = _skip
    try:
        body = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        for a in range(0, ids.shape[0], batch):
            body(input_ids=ids[a:a + batch], use_cache=False)
    finally:
        for i, layer in enumerate(layers):
            del layer.forward
            handles[i].remove()
    return hidden, calls


@dataclass
class LayerLoader:
    """A float32 model whose decoder layers hold placeholders (no memory) until `load(i)` reads layer i's weights from
    the source's lazy MLX-layout loaders and `release(i)` drops them again. MoE expert stacks become the model's
    parameters through `eval.packed.targets` (the engine's mapping), everything else through `arch.hf_state_dict`."""
    model: object
    config: dict                 # the MLX config.json dict
    layers: dict                 # layer index -> ({parameter key: (Target, [loaders])}, {MLX name: loader})
    keys: dict = field(default_factory=dict)   # layer index -> its parameters' keys

    def tensors(self, i: int, read=lambda f: _dense_tensor(f())) -> dict:
        """Layer i's parameters by model key (`read(loader)` gives each MLX tensor)."""
        stacks, rest = self.layers.get(i, ({}, {}))
        out = hf_state_dict(((n, read(f)) for n, f in rest.items()), self.config)
        for key, (target, loaders) in stacks.items():
            ts = [read(f) for f in loaders]
            out[key] = target.build(ts) if target.build else ts[0]
        return out

    def load(self, i: int) -> None:
        for key, t in self.tensors(i).items():
            self.model.get_parameter(key).data = t.to(torch.float32).contiguous()

    def release(self, i: int) -> None:
        for key in self.keys.get(i, ()):
            p = self.model.get_parameter(key)
            p.data = placeholder(p.shape, p.dtype)
        trim_heap()   # the layer's freed blocks back to the system, not left in the heap between long-lived results


def _meta(info) -> torch.Tensor:
    return torch.empty(info.shape, dtype=torch.float32, device="meta")


def _dense_tensor(t):
    """A loader's tensor as a dense float tensor (a source-quantized one dequantized)."""
    if isinstance(t, Quantized):
        return dequantize(t.wq, t.scales, t.biases, t.spec.bits, t.spec.group_size, mode=t.spec.mode)
    return t


def layer_loader(prep) -> LayerLoader:
    """The model of `prep` (quant.prepare.Prepared) with only the tensors outside the decoder layers read."""
    loaders = {info.name: f for info, f in prep.items}
    infos = {info.name: info for info, _ in prep.items}
    by_layer: dict = {}
    for n in loaders:
        if layer_index(n) is not None:
            by_layer.setdefault(layer_index(n), []).append(n)
    layers = {}
    for i, names in by_layer.items():
        stacks = {key: t for key, t in targets(prep.config, names).items() if t.experts}
        covered = {n for t in stacks.values() for n in t.names}
        layers[i] = ({key: (t, [loaders[n] for n in t.names]) for key, t in stacks.items()},
                     {n: loaders[n] for n in names if n not in covered})
    lazy = LayerLoader(None, prep.config, layers)
    state = hf_state_dict(((n, _dense_tensor(f())) for n, f in loaders.items() if layer_index(n) is None), prep.config)
    for i, (stacks, rest) in layers.items():   # shapes only: each layer's tensors built on the meta device
        meta = LayerLoader(None, prep.config, {i: ({k: (t, [infos[n] for n in t.names]) for k, (t, _) in
                                                    stacks.items()}, {n: infos[n] for n in rest})})
        shapes = {k: v.shape for k, v in meta.tensors(i, read=_meta).items()}
        state.update({k: placeholder(shape, torch.float32) for k, shape in shapes.items()})
        lazy.keys[i] = list(shapes)
    lazy.model = build_from_state(prep.config, state, "float32", prep.path)
    return lazy


def _run_layer(layer, hidden: list, calls: list) -> list:
    return [layer(h, *args, **kwargs) for h, (args, kwargs) in zip(hidden, calls)]


def _layer_output(out):
    return out[0] if isinstance(out, tuple) else out


@dataclass
class ExpertStack:
    """One decoder layer's MoE experts module (stacked expert weights) and its per-expert Hessian sums."""
    module: torch.nn.Module
    arch: str                       # "qwen3_moe" | "gpt_oss": how the module lays out and applies its experts
    names: dict                     # proj ("gate_proj", "up_proj", "down_proj") -> planned MLX tensor name
    h_in: list = field(default_factory=list)    # per expert: sum x x^T of its routed hidden states
    h_mid: list = field(default_factory=list)   # per expert: sum y y^T of its activations act(gate) * up
    tokens: list = field(default_factory=list)  # per expert: routed tokens seen

    def weight(self, proj: str) -> torch.Tensor:
        """A view of the module's experts of `proj` in MLX's layout [experts, out, in] (writable)."""
        gu, down = self.module.gate_up_proj.data, self.module.down_proj.data
        if self.arch == "gpt_oss":   # [E, in, 2*out], gate/up interleaved columns; down [E, in, out]
            return {"gate_proj": gu[..., 0::2], "up_proj": gu[..., 1::2], "down_proj": down}[proj].transpose(1, 2)
        n = gu.shape[1] // 2         # qwen3_moe: gate_up [E, 2*out, in] = [gate; up]; down [E, out, in]
        return {"gate_proj": gu[:, :n], "up_proj": gu[:, n:], "down_proj": down}[proj]

    def activations(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e's down_proj inputs act(gate) * up for its tokens' hidden states `x`, as the module computes."""
        m = self.module
        if self.arch == "gpt_oss":
            return m._apply_gate(x @ m.gate_up_proj[e] + m.gate_up_proj_bias[e])
        gate, up = torch.nn.functional.linear(x, m.gate_up_proj[e]).chunk(2, dim=-1)
        return m.act_fn(gate) * up

    def add(self, module, args) -> None:
        """Forward pre-hook: the routed tokens' Hessian sums of every expert of this call."""
        x, idx = args[0].detach(), args[1]
        x = x.reshape(-1, x.shape[-1]).to(torch.float32)
        idx = idx.reshape(x.shape[0], -1)
        for e in range(len(self.tokens)):
            rows = (idx == e).any(-1)
            n = int(rows.sum())
            if n:
                xe = x[rows]
                y = self.activations(e, xe).to(torch.float32)
                self.h_in[e].addmm_(xe.T, xe)
                self.h_mid[e].addmm_(y.T, y)
                self.tokens[e] += n


_EXPERT_ARCHS = {"qwen3_moe": ".switch_mlp", "gpt_oss": ".experts"}   # MLX module path of the experts module


def expert_stacks(layer, path: str, wanted: dict, model_type: str) -> list[ExpertStack]:
    """The experts modules of decoder layer `layer` (module path `path`) whose MLX tensors the plan gives gptq."""
    if model_type not in _EXPERT_ARCHS:
        return []
    out = []
    for n, m in layer.named_modules():
        if not (isinstance(getattr(m, "gate_up_proj", None), torch.nn.Parameter) and m.gate_up_proj.dim() == 3):
            continue
        mlx = f"{path}.{n}".removesuffix(".experts") + _EXPERT_ARCHS[model_type]
        names = {p: f"{mlx}.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj") if f"{mlx}.{p}.weight" in wanted}
        if names:
            st = ExpertStack(m, model_type, names)
            n_exp = m.gate_up_proj.shape[0]
            d_in, d_mid = st.weight("gate_proj").shape[-1], st.weight("down_proj").shape[-1]
            st.h_in = [torch.zeros(d_in, d_in) for _ in range(n_exp)]
            st.h_mid = [torch.zeros(d_mid, d_mid) for _ in range(n_exp)]
            st.tokens = [0] * n_exp
            out.append(st)
    return out


def min_expert_tokens(in_features: int) -> int:
    """Routed tokens an expert's projection needs for GPTQ: its input width (X^T X of fewer tokens is singular)."""
    return in_features


def _quantize_experts(st: ExpertStack, wanted, damp, clip, tensors, methods, rtn_experts, act_order=False) -> None:
    """GPTQ of each expert of each planned projection on its own routed tokens (round to nearest for an expert
    with fewer than `min_expert_tokens`); the module's weights become what MLX reads back."""
    for proj, name in st.names.items():
        tp = wanted[name]
        dt, bits, gs = dtype_from_name(tp.dtype), tp.spec.bits, tp.spec.group_size
        W = st.weight(proj)
        need = min_expert_tokens(W.shape[-1])
        sums = st.h_mid if proj == "down_proj" else st.h_in
        parts, rtn = [], []
        for e in range(W.shape[0]):
            w = W[e].contiguous()
            if st.tokens[e] < need:
                parts.append(quantize(w.to(dt), bits, gs, mode=tp.spec.mode))
                rtn.append(e)
            else:
                H = sums[e] * (2.0 / st.tokens[e])
                parts.append(gptq_quantize(w, H, bits, gs, dtype=dt, damp=damp, clip=clip, act_order=act_order,
                                           mode=tp.spec.mode))
        tensors[name] = tuple(None if t[0] is None else torch.stack(t) for t in zip(*parts))
        why = f"fewer than {need} routed calibration tokens"
        methods[name] = ("gptq" if not rtn else f"rtn (every expert saw {why})" if len(rtn) == W.shape[0]
                         else f"gptq (experts {', '.join(map(str, rtn))}: rtn, {why})")
        if rtn:
            rtn_experts[name] = rtn
        W.copy_(_dequant(*tensors[name], tp.spec).to(W.dtype))


def _hessians(layer, linears: dict, hidden, calls, stacks=()) -> dict:
    """H = 2/n sum x x^T of every linear's inputs over the calibration batches (the expert stacks' per-expert sums
    accumulate in them). Linears that read the same input tensor (q/k/v, gate/up) share one H, computed once."""
    sums: dict = {}     # first linear of an input -> [sum x x^T, tokens]
    owner: dict = {}    # linear -> the first linear that read its input
    seen: list = []     # (input tensor, its first linear) within the current batch

    def hook(name):
        def add(module, args):
            x = args[0]
            first = next((n for t, n in seen if t is x), None)
            if first is None:
                seen.append((x, name))
                first = name
                xf = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
                if name not in sums:
                    sums[name] = [torch.zeros(xf.shape[1], xf.shape[1]), 0]
                sums[name][0].addmm_(xf.T, xf)
                sums[name][1] += xf.shape[0]
            owner[name] = first
        return add

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    handles += [st.module.register_forward_pre_hook(st.add) for st in stacks]
    try:
        for h, (args, kwargs) in zip(hidden, calls):
            layer(h, *args, **kwargs)
            seen.clear()
    finally:
        for h in handles:
            h.remove()
    H = {n: total * (2.0 / max(count, 1)) for n, (total, count) in sums.items()}
    return {n: H[owner[n]] if n in owner else torch.zeros(m.in_features, m.in_features) for n, m in linears.items()}


def _head(model, prep, wanted: dict):
    """(plan name, head Linear, final norm) when the output head is planned for gptq: `lm_head`, or with tied
    embeddings the embedding (one tensor serves both, so its GPTQ serves the head's inputs); else None."""
    out = model.get_output_embeddings()
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    norm = getattr(decoder, "norm", None)
    if not isinstance(out, torch.nn.Linear) or norm is None:
        return None
    for name in wanted:
        if (name.endswith("lm_head.weight") or (prep.plan.tied and name.endswith("embed_tokens.weight"))) \
                and tuple(out.weight.shape) == tuple(wanted[name].shape):
            return name, out, norm
    return None


def head_hessian(norm, hidden: list) -> torch.Tensor:
    """H = 2/n X^T X of the output head's inputs: the final norm of the last decoder layer's outputs `hidden`."""
    xs = [norm(h).reshape(-1, h.shape[-1]).to(torch.float32) for h in hidden]
    return sum(x.T @ x for x in xs) * (2.0 / sum(x.shape[0] for x in xs))


def last_layer(layers, wanted: dict, target) -> int:
    """The last decoder layer whose output is needed: the last one, for the head's inputs (`target` not None), else
    the last with planned tensors (-1: none)."""
    if target is not None:
        return len(layers) - 1
    return max((i for i in map(layer_index, wanted) if i is not None), default=-1)


def _quantize_linear(name, m, H, tp, damp, clip, tensors, methods, act_order=False) -> None:
    dt = dtype_from_name(tp.dtype)
    wq, s, b = gptq_quantize(m.weight, H, tp.spec.bits, tp.spec.group_size, dtype=dt, damp=damp, clip=clip,
                             act_order=act_order, mode=tp.spec.mode)
    tensors[name] = (wq, s, b)
    methods[name] = "gptq"
    m.weight.copy_(_dequant(wq, s, b, tp.spec).to(m.weight.dtype))


def gptq_tensors(prep, calib, *, damp: float = DAMP, batch: int = BATCH, progress: bool = True,
                 threads: int | None = None, clip: bool = CLIP, head: bool = True,
                 act_order: bool = False) -> Precomputed:
    """GPTQ for every tensor the plan of `prep` (quant.prepare.Prepared) gives method "gptq": a `Precomputed`
    for convert's writer (tensors, per-tensor methods with fallbacks, calibration provenance). `head`: the output
    head too (inputs: the final norm's outputs; with tied embeddings this is the embedding tensor)."""
    from tqdm import tqdm

    wanted = {tp.name: tp for tp in prep.plan.tensors if tp.method == "gptq"}
    methods = {name: "rtn (gptq applies to the decoder layers' linears, MoE experts and the output head"
                     f"{'' if head else ', which --no-gptq-head left out'})" for name in wanted}
    tensors: dict = {}
    rtn_experts: dict = {}
    expert_tokens: dict = {}
    arch = model_type(prep.config)
    t0 = time.time()
    with torch.no_grad(), torch_threads(threads or torch.get_num_threads()):
        trim_heap()   # tokenizing the calibration text leaves ~150 MB of freed blocks (smollm2, WikiText-2 test)
        lazy = layer_loader(prep)
        model = lazy.model
        prefix, layers = _decoder_layers(model)
        hidden, calls = capture_inputs(model, layers, calib.ids, batch)
        trim_heap()
        target = _head(model, prep, wanted) if head else None
        last = last_layer(layers, wanted, target)
        bar = tqdm(layers[:last + 1], desc="gptq", unit="layer", disable=not progress, dynamic_ncols=True)
        for i, layer in enumerate(bar):
            lazy.load(i)
            linears = {f"{prefix}.{i}.{n}.weight": m for n, m in layer.named_modules()
                       if isinstance(m, torch.nn.Linear) and f"{prefix}.{i}.{n}.weight" in wanted}
            linears = {n: m for n, m in linears.items() if tuple(m.weight.shape) == tuple(wanted[n].shape)}
            stacks = expert_stacks(layer, f"{prefix}.{i}", wanted, arch)
            if linears or stacks:
                H = _hessians(layer, linears, hidden, calls[i], stacks)
                for name, m in linears.items():
                    _quantize_linear(name, m, H[name], wanted[name], damp, clip, tensors, methods, act_order)
                del H
                for st in stacks:
                    _quantize_experts(st, wanted, damp, clip, tensors, methods, rtn_experts, act_order)
                    expert_tokens[next(iter(st.names.values())).rsplit(".", 2)[0]] = list(st.tokens)
            if i < last or target is not None:   # the next layer's (the head's) inputs; none after the last planned
                hidden = [_layer_output(o) for o in _run_layer(layer, hidden, calls[i])]
            lazy.release(i)
            bar.set_postfix_str(f"{len(tensors)}/{len(wanted)} tensors", refresh=False)
        bar.close()
        if target is not None:   # `hidden` is the last layer's output
            name, out, norm = target
            _quantize_linear(name, out, head_hessian(norm, hidden), wanted[name], damp, clip, tensors, methods,
                             act_order)
    floats = (clip or act_order) and any(tp.spec.mode != "affine" for tp in wanted.values())
    info = {"method": "gptq", "damp": damp, "block": BLOCK, "act_order": "static groups" if act_order else False,
            "clip_search": clip,
            **({"float_modes": "clip search and act-order apply to affine tensors only"} if floats else {}),
            "head": target[0] if target is not None else None, **calib.info,
            "seconds": round(time.time() - t0, 1),
            "fallback_rtn": sorted(n for n, m in methods.items() if m.startswith("rtn")),
            **({"expert_tokens": expert_tokens, "experts_rtn": rtn_experts,
                "min_expert_tokens": "an expert's projection needs as many routed tokens as it has inputs"}
               if expert_tokens else {})}
    return Precomputed(tensors, methods, info)


def _dequant(wq, s, b, spec):
    return dequantize(wq, s, b, spec.bits, spec.group_size, mode=spec.mode)

"""GPTQ (Frantar et al. 2022) on the MLX affine grid: Hessian-based error compensation, layer by layer.

`gptq_quantize(w, H, bits, group_size, dtype=...)` quantizes one weight [out, in] column by column: each
column is rounded to its group's grid and the rounding error, weighted by the inverse Hessian
H = 2 X^T X / n of the layer's inputs X, is pushed onto the columns not yet quantized (lazy batch updates
in blocks of 128 columns, Cholesky factor of H^-1, damping `damp * mean(diag H)`). A group's scale and bias
are computed as the group starts, from the weights as updated so far, with mx.quantize's own formula
(`quant.quantize.affine_params`) and rounded to the stored dtype; codes are rounded as mx.quantize rounds
them. The compensation uses the exact values MLX dequantizes (scale * q, rounded, + bias, rounded, in the
stored dtype), so what is written is plain MLX affine and what GPTQ optimised is what MLX computes.
Act-order is not implemented (columns in their natural order keep MLX's contiguous groups).

`gptq_tensors(prep, calibration)` runs it sequentially over the model (float32, transformers): the
inputs of the first decoder layer and every layer's keyword arguments (position embeddings, masks) are
captured in one pass in which the decoder layers are skipped; then for each decoder layer the Hessians
of its planned linears are accumulated from its inputs (hooks), the linears are quantized, and the
layer's outputs with the quantized weights become the next layer's inputs. Only linears inside the
decoder layers are done this way; the embedding, the output head and MoE expert stacks (not nn.Linear
modules) fall back to round-to-nearest, and `methods` says so per tensor. Memory: the float model plus
the calibration activations (two copies of samples x length x hidden float32).
"""

from __future__ import annotations

import time

import torch

from mixq.errors import MixqError
from mixq.io.safetensors import dtype_from_name
from mixq.quant.convert import Precomputed
from mixq.quant.quantize import affine_params, pack_codes
from mixq.threads import torch_threads

DAMP = 0.01        # damping: fraction of the mean Hessian diagonal added to the diagonal
BLOCK = 128        # columns per lazy-update block (a multiple of every group size: groups never straddle)
BATCH = 4          # calibration windows per forward
# Range search: a group's scale and bias come from its max/min shrunk by each factor; the one with the least
# diag(H)-weighted squared rounding error wins per row (still mx.quantize's formula: codes, scale, bias as MLX reads)
CLIP_GRID = tuple(round(1 - 0.025 * k, 3) for k in range(13))   # 1.0 ... 0.7


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
                  damp: float = DAMP, block: int = BLOCK, clip: bool = False):
    """(packed uint32 [out, in*bits/32], scales, biases [out, in/group] in `dtype`) of `w` [out, in], as
    `quant.quantize.quantize` returns them, with GPTQ's error compensation under the Hessian `H` [in, in].
    `clip`: each group's range is searched (CLIP_GRID) instead of taken from its max/min."""
    if block % group_size:
        raise ValueError(f"block {block} must be a multiple of the group size {group_size}")
    W = w.to(dtype).to(torch.float32).clone()   # the weight as stored: RTN starts from the same values
    rows, cols = W.shape
    codes = torch.empty(rows, cols, dtype=torch.uint8)
    scales = torch.empty(rows, cols // group_size, dtype=dtype)
    biases = torch.empty_like(scales)
    # small ops and small factorizations: one thread is fastest, and stays fast on a busy machine (measured under
    # load 8 on 2 cores: cholesky_inverse of 1536 x 1536 takes 3.1 s on two threads, 0.23 s on one)
    with torch_threads(1, at_most=True):
        Hinv = _inverse_factor(H.to(torch.float32), damp)
        grid = CLIP_GRID if clip else (1.0,)
        _columns(W, Hinv, torch.diag(H).to(torch.float32), codes, scales, biases, bits, group_size, block, grid)
    return pack_codes(codes, bits), scales, biases


def gptq_round_trip(w: torch.Tensor, H: torch.Tensor, spec, *, damp: float = DAMP) -> torch.Tensor:
    """`w` [out, in] quantized by GPTQ under the input Hessian `H` to the affine `spec`, read back as MLX dequantizes
    it, in w's dtype (the stored dtype): quant.quantize.round_trip's counterpart (`mixq measure --method gptq`)."""
    wq, s, b = gptq_quantize(w, H, spec.bits, spec.group_size, dtype=w.dtype, damp=damp)
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


def _columns(W, Hinv, hdiag, codes, scales, biases, bits: int, group_size: int, block: int, grid) -> None:
    """The GPTQ column loop: fills codes, scales and biases. In numpy on transposed (column-contiguous) copies:
    one column is a dozen tiny vector ops, which cost a few microseconds each in numpy and several times that in
    torch; float32 arithmetic and half-to-even rounding as torch's, so the codes are those `quantize` computes."""
    import numpy as np

    rows, cols = W.shape
    dtype = scales.dtype
    maxq = float((1 << bits) - 1)
    Wt = W.T.contiguous().numpy()            # [cols, rows]: column c is row c
    Hn = Hinv.numpy()
    ct = np.empty((cols, rows), dtype=np.uint8)
    flat = np.arange(rows) * (1 << bits)
    t = np.empty(rows, dtype=np.float32)
    for a in range(0, cols, block):
        b = min(a + block, cols)
        E = np.empty((b - a, rows), dtype=np.float32)
        for i in range(a, b):
            if i % group_size == 0:
                s, z = _group_params(torch.from_numpy(Wt[i:i + group_size].T.copy()), hdiag[i:i + group_size],
                                     bits, dtype, grid)
                s_dt, z_dt = s.to(dtype), z.to(dtype)
                scales[:, i // group_size], biases[:, i // group_size] = s_dt, z_dt
                levels = _levels(s_dt, z_dt, bits).ravel()
                sn, zn = s.numpy(), z.numpy()
            w = Wt[i]
            np.subtract(w, zn, out=t)
            np.divide(t, sn, out=t)
            np.clip(t, 0.0, maxq, out=t)
            np.rint(t, out=t)
            q = t.astype(np.intp)
            ct[i] = q
            err = (w - levels[flat + q]) / Hn[i, i]
            Wt[i:b] -= np.outer(Hn[i, i:b], err)
            E[i - a] = err
        Wt[b:] -= Hn[a:b, b:].T @ E
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


def _run_layer(layer, hidden: list, calls: list) -> list:
    return [layer(h, *args, **kwargs) for h, (args, kwargs) in zip(hidden, calls)]


def _layer_output(out):
    return out[0] if isinstance(out, tuple) else out


def _hessians(layer, linears: dict, hidden, calls) -> tuple[dict, list]:
    """H = 2/n sum x x^T of every linear's inputs over the calibration batches, and the layer's outputs."""
    H = {n: torch.zeros(m.in_features, m.in_features) for n, m in linears.items()}
    count = dict.fromkeys(linears, 0)

    def hook(name):
        def add(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float32)
            H[name].addmm_(x.T, x)
            count[name] += x.shape[0]
        return add

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    try:
        outs = [_layer_output(o) for o in _run_layer(layer, hidden, calls)]
    finally:
        for h in handles:
            h.remove()
    return {n: H[n] * (2.0 / max(count[n], 1)) for n in linears}, outs


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


def _quantize_linear(name, m, H, tp, damp, clip, tensors, methods) -> None:
    dt = dtype_from_name(tp.dtype)
    wq, s, b = gptq_quantize(m.weight, H, tp.spec.bits, tp.spec.group_size, dtype=dt, damp=damp, clip=clip)
    tensors[name] = (wq, s, b)
    methods[name] = "gptq"
    m.weight.copy_(_dequant(wq, s, b, tp.spec).to(m.weight.dtype))


def gptq_tensors(prep, calib, *, damp: float = DAMP, batch: int = BATCH, progress: bool = True,
                 threads: int | None = None, clip: bool = False, head: bool = True) -> Precomputed:
    """GPTQ for every tensor the plan of `prep` (quant.prepare.Prepared) gives method "gptq": a `Precomputed`
    for convert's writer (tensors, per-tensor methods with fallbacks, calibration provenance). `head`: the output
    head too (inputs: the final norm's outputs; with tied embeddings this is the embedding tensor)."""
    from tqdm import tqdm

    from mixq.eval.engine import load_model

    wanted = {tp.name: tp for tp in prep.plan.tensors if tp.method == "gptq"}
    methods = {name: "rtn (gptq applies to the decoder layers' linears and the output head"
                     f"{'' if head else ', which --no-gptq-head left out'})" for name in wanted}
    tensors: dict = {}
    t0 = time.time()
    with torch.no_grad(), torch_threads(threads or torch.get_num_threads()):
        model = load_model(str(prep.path), progress=False, packed=False).model
        prefix, layers = _decoder_layers(model)
        hidden, calls = capture_inputs(model, layers, calib.ids, batch)
        bar = tqdm(layers, desc="gptq", unit="layer", disable=not progress, dynamic_ncols=True)
        for i, layer in enumerate(bar):
            linears = {f"{prefix}.{i}.{n}.weight": m for n, m in layer.named_modules()
                       if isinstance(m, torch.nn.Linear) and f"{prefix}.{i}.{n}.weight" in wanted}
            linears = {n: m for n, m in linears.items() if tuple(m.weight.shape) == tuple(wanted[n].shape)}
            if not linears:
                hidden = [_layer_output(o) for o in _run_layer(layer, hidden, calls[i])]
                continue
            H, _ = _hessians(layer, linears, hidden, calls[i])
            for name, m in linears.items():
                _quantize_linear(name, m, H[name], wanted[name], damp, clip, tensors, methods)
            hidden = [_layer_output(o) for o in _run_layer(layer, hidden, calls[i])]
            bar.set_postfix_str(f"{len(tensors)}/{len(wanted)} tensors", refresh=False)
        bar.close()
        target = _head(model, prep, wanted) if head else None  # after the last layer: `hidden` is its output
        if target is not None:
            name, out, norm = target
            xs = [norm(h).reshape(-1, h.shape[-1]).to(torch.float32) for h in hidden]
            H = sum(x.T @ x for x in xs) * (2.0 / sum(x.shape[0] for x in xs))
            _quantize_linear(name, out, H, wanted[name], damp, clip, tensors, methods)
    info = {"method": "gptq", "damp": damp, "block": BLOCK, "act_order": False, "clip_search": clip,
            "head": target[0] if target is not None else None, **calib.info,
            "seconds": round(time.time() - t0, 1),
            "fallback_rtn": sorted(n for n, m in methods.items() if m != "gptq")}
    return Precomputed(tensors, methods, info)


def _dequant(wq, s, b, spec):
    from mixq.quant.quantize import dequantize

    return dequantize(wq, s, b, spec.bits, spec.group_size)

"""AWQ (Lin et al. 2023) on MLX's grids (affine and the float modes): activation-aware input-channel scales folded into
the op before, then a clipping search; layer by layer, through tune/gptq.py's `LayerLoader`, capture and run helpers
(each layer's inputs come from the quantized layers before it). Memory: as gptq_tensors', one decoder layer at a
time (loaded from the source before it is searched and quantized, released after it ran) plus the tensors outside
the layers (embedding, final norm, head) in float32, the calibration activations and the results so far. `run_awq`
also takes a whole float model (no loader), the same path, bit for bit.

Per decoder layer, on its calibration inputs:
  * every nn.Linear's inputs are observed over all calibration tokens: H = 2/n X^T X and mean |x| per channel;
  * the groups of linears that share one input are found from what the layer computes, not from names: the
    linears whose input (first batch) is exactly a norm's output (llama: q/k/v after input_layernorm, gate/up
    after post_attention_layernorm; gemma3: gate/up after pre_feedforward_layernorm), and `v_proj -> o_proj`,
    `up_proj -> down_proj` when the first's outputs are as many as the second's inputs (no GQA);
  * per group, s = mean|x|^alpha / sqrt(max * min) for alpha on N_GRID points in [0, 1) minimises the group's
    output error sum_W tr(E H E^T), E = W - Q(W diag s) diag(1/s), over all calibration tokens (Q: MLX's quantize /
    dequantize under each linear's planned bits, group size, dtype and mode: affine or a float mode); alpha = 0 is
    s = 1, round to nearest, so the error chosen is never above round-to-nearest's;
  * s is folded: the linears' columns times s; the norm's gain divided by s (gemma's (1 + w) gain too:
    w' = (1 + w) / s - 1; the offset is probed on the module itself) or the preceding linear's rows and bias
    divided by s. The float layer's output (first batch) must stay what it was (relative FOLD_TOL) or the fold is
    undone: e.g. a MoE block's norm also feeds its router and experts. Groups whose linears are not all planned
    awq / awq+gptq (or whose preceding linear is not) are not scaled either: a rule's method touches only its
    tensors. Every unscaled awq tensor is listed with its reason (`awq_not_scaled` in the provenance);
  * "awq" linears are quantized with a clipping search (per row and group, the range shrink in CLIP_GRID with the
    least error e H_gg e^T on the group's block of H; a float mode shrinks the group's max |w| before its scale is
    chosen, the values beyond saturating at the format's largest code); "awq+gptq" and "gptq" linears get GPTQ
    (tune/gptq.py) under the Hessian of their scaled inputs, H / (s s^T); the quantized weights replace the float
    ones.
Folded norm weights and biases are written in their stored dtype (`Precomputed.floats`): the folder stays plain MLX
(affine or float-mode tensors, as planned).
The output head takes no scale (its input is the final norm, whose gain a tied embedding cannot follow):
"awq" gives it the clipping search only ("awq (clip only)"), "awq+gptq" GPTQ. MoE expert stacks (not nn.Linear)
and embeddings stay round-to-nearest, and `methods` says so.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from mixq.errors import MixqError
from mixq.io.memory import trim_heap
from mixq.io.safetensors import dtype_from_name
from mixq.quant.convert import Precomputed
from mixq.quant.quantize import affine_params, dequantize, float_codes, float_scales, float_values, pack_codes
from mixq.threads import torch_threads
from mixq.tune import gptq

N_GRID = 20                                                      # alphas 0, 1/20, ... 19/20 (AWQ's and mlx-lm's)
CLIP_GRID = tuple(round(1 - k / 20, 3) for k in range(10))      # range shrink 1.0 ... 0.55 (mlx-lm: max 0.5)
FOLD_TOL = 1e-3        # relative change of the float layer's output that a fold may cause (float32 rounding)
AWQ_METHODS = ("awq", "awq+gptq")
CALIBRATED = ("gptq", "awq", "awq+gptq")
PAIRS = (("self_attn.v_proj", "self_attn.o_proj"), ("mlp.up_proj", "mlp.down_proj"))  # linear -> linear groups
NO_OP = ("no op before it can take its scale (a norm whose output is its input alone, or v_proj / up_proj with as "
         "many outputs as its inputs)")
ROWS = 4096            # rows per step of the clipping search (bounds its temporaries)


# ---------------------------------------------------------------- one weight

def fake_quant(w: torch.Tensor, bits: int, gs: int, dtype: torch.dtype, shrink=None, mode: str = "affine"):
    """(dequantized [rows, in] float32, codes, scales, biases [rows, groups, ...]) of `w` [rows, in] (values in
    `dtype`) as MLX stores and dequantizes it; `shrink` (a factor, or [rows, groups, 1]): scale and bias from each
    group's range shrunk by it (mx.quantize's formula), codes clamped to the grid. Affine: float32 scales and biases;
    a float mode (`mode`): uint8 scale bytes, biases None, the scale from each group's max |w| times `shrink` (the
    values beyond saturate at the format's largest code)."""
    rows, cols = w.shape
    g = w.reshape(rows, cols // gs, gs)
    if mode != "affine":
        amax = g.abs().amax(-1, keepdim=True)
        sbyte, scale = float_scales((amax if shrink is None else amax * shrink).to(dtype), bits, mode)
        q = float_codes(g, scale, bits)
        return (float_values(bits)[q.long()] * scale).reshape(rows, cols), q, sbyte, None
    s, z = affine_params(g if shrink is None else g * shrink, bits)
    q = ((g - z) / s).clamp_(0.0, float((1 << bits) - 1)).round_()
    deq = (s.to(dtype) * q.to(dtype) + z.to(dtype)).to(torch.float32)
    return deq.reshape(rows, cols), q, s, z


def output_error(w: torch.Tensor, wq: torch.Tensor, H: torch.Tensor) -> float:
    """tr((W - Wq) H (W - Wq)^T): the squared output error on the inputs whose H = 2/n X^T X (times n/2)."""
    e = w - wq
    return float(((e @ H) * e).sum())


def search_scale(weights: list, H: torch.Tensor, x_mean: torch.Tensor, n_grid: int = N_GRID):
    """(s [in], its error, round-to-nearest's error) for the linears `weights` [(W float32 [out, in], bits, group
    size, dtype, mode)] sharing the input of Hessian `H` and mean |x| `x_mean`: the alpha of s = x_mean^alpha with the
    least summed output error of W diag(s), quantized, times diag(1/s)."""
    x_mean = x_mean.clamp(min=1e-4)
    best = base = None
    for k in range(n_grid):
        s = x_mean ** (k / n_grid)
        s = s / (s.max() * s.min()).sqrt()
        err = 0.0
        for w, bits, gs, dt, mode in weights:
            ws = (w * s).to(dt).to(torch.float32)
            err += output_error(w, fake_quant(ws, bits, gs, dt, mode=mode)[0] / s, H)
        if best is None or err < best[1]:
            best = (s, err, k / n_grid)
        base = err if base is None else base
    return best[0], best[1], base, best[2]


def gptq_scaled(w: torch.Tensor, H: torch.Tensor, s: torch.Tensor, bits: int, gs: int, dt, mode: str,
                damp: float = gptq.DAMP, clip: bool = gptq.CLIP) -> torch.Tensor:
    """W diag(s) quantized by GPTQ under its inputs' Hessian H / (s s^T), read back as the layer computes it (float32,
    times diag(1/s))."""
    parts = gptq.gptq_quantize(w * s, H / (s[:, None] * s[None, :]), bits, gs, dtype=dt, damp=damp, clip=clip,
                               mode=mode)
    return dequantize(*parts, bits, gs, mode=mode).to(torch.float32) / s


def gptq_error(weights: list, H: torch.Tensor, s: torch.Tensor, damp: float = gptq.DAMP,
               clip: bool = gptq.CLIP) -> float:
    """The summed output error of the linears `weights` (as `search_scale` takes them) scaled by `s` and quantized
    by GPTQ under their scaled inputs' Hessian (`gptq_scaled`)."""
    return sum(output_error(w, gptq_scaled(w, H, s, bits, gs, dt, mode, damp, clip), H)
               for w, bits, gs, dt, mode in weights)


def clip_search(w: torch.Tensor, H: torch.Tensor, bits: int, gs: int, dtype: torch.dtype, grid=CLIP_GRID,
                mode: str = "affine"):
    """shrink [rows, groups, 1]: per row and group, the factor in `grid` with the least error e H_gg e^T (H_gg: the
    group's diagonal block of H, so each group's own share of the output error); `mode`: see `fake_quant`."""
    rows, cols = w.shape
    ng = cols // gs
    Hb = torch.stack([H[k * gs:(k + 1) * gs, k * gs:(k + 1) * gs] for k in range(ng)])
    out = torch.empty(rows, ng, 1)
    for a in range(0, rows, ROWS):
        wc = w[a:a + ROWS]
        g = wc.reshape(-1, ng, gs)
        best_err = best = None
        for p in grid:
            e = g - fake_quant(wc, bits, gs, dtype, p if p != 1.0 else None, mode)[0].view(-1, ng, gs)
            err = torch.einsum("rgi,gij,rgj->rg", e, Hb, e)
            if best is None:
                best_err, best = err, torch.full_like(err, p)
            else:
                m = err < best_err
                best_err, best = torch.where(m, err, best_err), torch.where(m, p, best)
        out[a:a + ROWS] = best[..., None]
    return out


def quantize_clipped(w: torch.Tensor, H: torch.Tensor, bits: int, gs: int, dtype: torch.dtype,
                     mode: str = "affine"):
    """(packed uint32, scales, biases) of `w` [rows, in] as `quant.quantize.quantize(..., mode=mode)` returns them,
    each group's range (float modes: its max |w|) chosen by `clip_search` (with no shrink chosen, exactly
    mx.quantize's). ROWS rows at a time: a 262144-row tied head would otherwise hold several float32 copies."""
    parts = [_clipped_rows(w[a:a + ROWS].to(dtype).to(torch.float32), H, bits, gs, dtype, mode)
             for a in range(0, w.shape[0], ROWS)]
    return tuple(None if p[0] is None else torch.cat(p) for p in zip(*parts))


def _clipped_rows(w: torch.Tensor, H: torch.Tensor, bits: int, gs: int, dtype: torch.dtype, mode: str):
    rows, cols = w.shape
    _, q, s, z = fake_quant(w, bits, gs, dtype, clip_search(w, H, bits, gs, dtype, mode=mode), mode)
    packed = pack_codes(q.reshape(rows, cols).to(torch.uint8), bits)
    if mode != "affine":
        return packed, s.reshape(rows, -1), None
    return packed, s.reshape(rows, -1).to(dtype), z.reshape(rows, -1).to(dtype)


# ---------------------------------------------------------------- one layer

@dataclass
class Inputs:
    H: torch.Tensor          # 2/n X^T X over the calibration tokens
    mean_abs: torch.Tensor   # mean |x| per input channel
    first: torch.Tensor      # the first batch's inputs (to see which op feeds the linear)


@dataclass
class Group:
    prev: str                     # local name of the op that takes 1/s: a norm or a linear
    kind: str                     # "norm" or "linear"
    consumers: tuple[str, ...]    # local names of the linears whose columns take s


def _norms(layer) -> dict:
    return {n: m for n, m in layer.named_modules() if not isinstance(m, torch.nn.Linear) and not list(m.children())
            and isinstance(getattr(m, "weight", None), torch.nn.Parameter) and m.weight.ndim == 1}


def observe(layer, linears: dict, norms: dict, hidden: list, calls: list):
    """({linear: Inputs}, {norm: first batch's output}, the layer's outputs) over the calibration batches."""
    acc = {n: [torch.zeros(m.in_features, m.in_features), torch.zeros(m.in_features), 0, None]
           for n, m in linears.items()}
    norm_out: dict = {}
    last: list = [None, None]    # the last input seen and its linear: q/k/v (gate/up) get the same tensor object
    same: dict = {}              # linear -> the linear whose statistics it shares (its input is the same tensor)

    def seen(name):
        def add(module, args):
            x = args[0]
            if x is last[0]:
                same[name] = last[1]
                return
            last[0], last[1] = x, name
            x = x.detach()
            a = acc[name]
            a[3] = x if a[3] is None else a[3]
            x = x.reshape(-1, x.shape[-1]).to(torch.float32)
            a[0].addmm_(x.T, x)
            a[1] += x.abs().sum(0)
            a[2] += x.shape[0]
        return add

    def out(name):
        def keep(module, args, output):
            norm_out.setdefault(name, output.detach())
        return keep

    handles = [m.register_forward_pre_hook(seen(n)) for n, m in linears.items()]
    handles += [m.register_forward_hook(out(n)) for n, m in norms.items()]
    try:
        outs = [gptq._layer_output(o) for o in gptq._run_layer(layer, hidden, calls)]
    finally:
        for h in handles:
            h.remove()
    last[0] = None
    stats = {n: Inputs(a[0] * (2.0 / max(a[2], 1)), a[1] / max(a[2], 1), a[3]) for n, a in acc.items()
             if n not in same}
    for n, owner in same.items():
        if acc[n][2]:   # not always the same tensor as another's: statistics would be split, refuse
            raise MixqError(f"{n}: its inputs are sometimes another linear's and sometimes not; please report this "
                            "as a mixq bug")
        stats[n] = stats[owner]
    return stats, norm_out, outs


def find_groups(linears: dict, stats: dict, norm_out: dict) -> list[Group]:
    """The groups of linears sharing an input that one op before them produces (see the module docstring)."""
    groups = []
    for n, y in norm_out.items():
        fed = tuple(ln for ln, st in stats.items() if st.first is not None and st.first.shape == y.shape
                    and torch.equal(st.first, y))
        if fed:
            groups.append(Group(n, "norm", fed))
    for prev, nxt in PAIRS:
        if pair_folds(linears, prev, nxt):
            groups.append(Group(prev, "linear", (nxt,)))
    return groups


def pair_folds(linears: dict, prev: str, nxt: str) -> bool:
    """Whether linear `nxt`'s scale can fold into linear `prev`'s rows (PAIRS): both there, prev's outputs as many
    as nxt's inputs (not so for o_proj under grouped-query attention)."""
    return prev in linears and nxt in linears and linears[prev].out_features == linears[nxt].in_features


def scalable(linears: dict) -> set:
    """The module paths of the decoder linears `linears` {path: nn.Linear} that AWQ can give a scale, judged by
    their names and shapes alone: all but the second of a PAIRS pair whose first cannot take its scale
    (`pair_folds`). (The whole search also needs the op before to feed only them: checked by folding, not here.)"""
    out = set(linears)
    for prev, nxt in PAIRS:
        for path in linears:
            if path.endswith("." + nxt):
                layer = path[:-len(nxt)]
                if not pair_folds({p: linears.get(layer + p) for p in (prev, nxt) if layer + p in linears},
                                  prev, nxt):
                    out.discard(path)
    return out


def awq_round_trip(w: torch.Tensor, H: torch.Tensor, spec, mean_abs: torch.Tensor | None = None,
                   n_grid: int = N_GRID, then_gptq: bool = False, damp: float = gptq.DAMP) -> torch.Tensor:
    """`w` [out, in] (stored dtype) as convert's awq (`then_gptq`: awq+gptq) stores it were it alone in its group,
    read back as the layer then computes (float32; `mixq measure --method awq | awq+gptq`): with its inputs'
    `mean_abs`, the scale s searched for it alone (`search_scale`; awq+gptq keeps it only where GPTQ's error is lower
    with it, as `scale_layer` does), W diag(s) quantized under H / (s s^T) by the clipping search (awq) or GPTQ
    (awq+gptq), dequantized, times diag(1/s) (the op before, divided by s, gives the quantized weight x / s);
    without (no op before can take a scale: the head, o_proj under grouped-query attention), unscaled."""
    dt, bits, gs, mode = w.dtype, spec.bits, spec.group_size, spec.mode
    wf = w.to(torch.float32)
    s = torch.ones(wf.shape[1])
    if mean_abs is not None:
        s = search_scale([(wf, bits, gs, dt, mode)], H, mean_abs.to(torch.float32), n_grid)[0]
    if not then_gptq:
        parts = quantize_clipped(wf * s, H / (s[:, None] * s[None, :]), bits, gs, dt, mode)
        return dequantize(*parts, bits, gs, mode=mode).to(torch.float32) / s
    # awq+gptq: GPTQ without and with the scale; the scale kept only if its output error is lower
    scales = [torch.ones_like(s)] + ([] if bool((s == 1).all()) else [s])
    read = [gptq_scaled(wf, H, c, bits, gs, dt, mode, damp) for c in scales]
    return min(read, key=lambda r: output_error(wf, r, H))


def norm_offset(norm) -> float | None:
    """c in the norm's gain (c + weight): 0 (llama...) or 1 (gemma), probed on the module; None if neither."""
    x = torch.randn(4, norm.weight.shape[0], generator=torch.Generator().manual_seed(0))
    w = norm.weight.detach().clone()
    b = norm.bias.detach() if getattr(norm, "bias", None) is not None else 0.0
    try:
        norm.weight.zero_()
        out0 = norm(x) - b
        norm.weight.fill_(1.0)
        unit = norm(x) - b - out0
    finally:
        norm.weight.copy_(w)
    for c in (0.0, 1.0):
        if torch.allclose(out0, c * unit, atol=1e-5, rtol=1e-4):
            return c
    return None


def fold(group: Group, s: torch.Tensor, linears: dict, norms: dict, offset: float) -> list:
    """Scale the group's linears' columns by s and divide the op before them by s (in place); returns the
    (parameter, old value) pairs that undo it."""
    prev = norms[group.prev] if group.kind == "norm" else linears[group.prev]
    params = [linears[c].weight for c in group.consumers] + [prev.weight]
    params += [prev.bias] if getattr(prev, "bias", None) is not None else []
    saved = [(p, p.detach().clone()) for p in params]
    for c in group.consumers:
        linears[c].weight.mul_(s)
    if group.kind == "norm":
        prev.weight.copy_((offset + prev.weight) / s - offset)
    else:
        prev.weight.div_(s[:, None])
    if getattr(prev, "bias", None) is not None:
        prev.bias.div_(s)
    return saved


def _rel_change(layer, hidden0, call0, ref) -> float:
    out = gptq._layer_output(layer(hidden0, *call0[0], **call0[1]))
    return float(torch.linalg.norm(out - ref) / torch.linalg.norm(ref).clamp(min=1e-30))


@dataclass
class LayerScales:
    s: dict            # local linear name -> the scale its columns took
    changed: set       # local names of the float parameters (norm weights, biases) the folds changed
    not_scaled: dict   # local linear name -> why it was not scaled
    alphas: dict       # local prev-op name -> (alpha, error / round-to-nearest's error)


def scale_layer(layer, linears: dict, method: dict, spec: dict, stats: dict, norm_out: dict, hidden0, call0,
                ref, n_grid: int = N_GRID, damp: float = gptq.DAMP, clip: bool = gptq.CLIP) -> LayerScales:
    """Search and fold the scales of one layer's groups (module docstring). `method` / `spec`: the planned method
    and (bits, group size, dtype, mode) of the layer's calibrated linears, by local name (`clip`: gptq's range
    search, for the awq+gptq decision below). A group of awq+gptq linears
    keeps its scale only where GPTQ of the scaled weights has less output error than GPTQ of the unscaled ones.
    The folds are checked together (one layer run); if that fails, one by one, and the failing ones undone."""
    norms = _norms(layer)
    res = LayerScales({}, set(), {}, {})
    found = []   # (group, s, alpha, error ratio, offset) of the groups searched
    for g in find_groups(linears, stats, norm_out):
        if not any(method.get(c) in AWQ_METHODS for c in g.consumers):
            continue
        why = _why_not(g, method)
        offset = norm_offset(norms[g.prev]) if g.kind == "norm" and why is None else 0.0
        if offset is None:
            why = f"{g.prev}'s gain is neither w nor 1 + w"
        if why is not None:
            res.not_scaled.update({c: why for c in g.consumers if method.get(c) in AWQ_METHODS})
            continue
        weights = [(linears[c].weight.to(torch.float32), *spec[c]) for c in g.consumers]
        H = stats[g.consumers[0]].H
        s, err, base, alpha = search_scale(weights, H, stats[g.consumers[0]].mean_abs, n_grid)
        if alpha > 0 and any(method[c] == "awq+gptq" for c in g.consumers):
            # GPTQ follows: keep the scale only if GPTQ on the scaled weights beats GPTQ alone (its objective)
            err, base = gptq_error(weights, H, s, damp, clip), gptq_error(weights, H, torch.ones_like(s), damp, clip)
            if err >= base:
                s, err, alpha = torch.ones_like(s), base, 0.0
        found.append((g, s, alpha, err / base if base else 1.0, offset))
    saved = [fold(g, s, linears, norms, offset) for g, s, _, _, offset in found]
    if found and _rel_change(layer, hidden0, call0, ref) > FOLD_TOL:
        for undo in reversed(saved):
            for p, old in undo:
                p.copy_(old)
        kept = []
        for item in found:
            g, s, _, _, offset = item
            undo = fold(g, s, linears, norms, offset)
            rel = _rel_change(layer, hidden0, call0, ref)
            if rel <= FOLD_TOL:
                kept.append(item)
                continue
            for p, old in undo:
                p.copy_(old)
            res.not_scaled.update({c: f"{g.prev}'s output reaches more than {', '.join(g.consumers)} (folding "
                                      f"changed the layer output by {rel:.1e})"
                                   for c in g.consumers if method.get(c) in AWQ_METHODS})
        found = kept
    for g, s, alpha, ratio, _ in found:
        res.s.update(dict.fromkeys(g.consumers, s))
        res.alphas[g.prev] = (alpha, ratio)
        owner = norms[g.prev] if g.kind == "norm" else linears[g.prev]
        res.changed.update(f"{g.prev}.{p}" for p in ("weight", "bias")
                           if (g.kind == "norm" or p == "bias") and getattr(owner, p, None) is not None)
    return res


def _why_not(g: Group, method: dict) -> str | None:
    """Why this group may not be scaled by a rule-scoped awq (a tensor planned otherwise would change), or None."""
    other = [c for c in g.consumers if method.get(c) not in AWQ_METHODS]
    if other:
        return f"shares its input with {other[0]} (method {method.get(other[0], 'rtn')})"
    if g.kind == "linear" and method.get(g.prev) not in AWQ_METHODS:
        return f"its scale would go into {g.prev} (method {method.get(g.prev, 'rtn')})"
    return None


# ---------------------------------------------------------------- the model

def _label(method: str, scaled: bool) -> str:
    if method == "awq":
        return "awq" if scaled else "awq (clip only)"
    if method == "awq+gptq":
        return "awq+gptq" if scaled else "gptq (awq scale not folded)"
    return method


def quantize_linear(m, H, tp, method: str, damp: float, clip: bool):
    """Quantize the linear `m` under its plan `tp`: GPTQ for gptq / awq+gptq, else the clipping search; the
    dequantized weight replaces the float one. Returns (packed, scales, biases)."""
    dt, bits, gs, mode = dtype_from_name(tp.dtype), tp.spec.bits, tp.spec.group_size, tp.spec.mode
    if method in ("gptq", "awq+gptq"):
        parts = gptq.gptq_quantize(m.weight, H, bits, gs, dtype=dt, damp=damp, clip=clip, mode=mode)
    else:
        parts = quantize_clipped(m.weight, H, bits, gs, dt, mode)
    m.weight.copy_(dequantize(*parts, bits, gs, mode=mode).to(m.weight.dtype))
    return parts


def run_awq(model, prep, ids: torch.Tensor, *, n_grid: int = N_GRID, damp: float = gptq.DAMP,
            batch: int = gptq.BATCH, progress: bool = True, clip: bool = gptq.CLIP, head: bool = True,
            quantize: bool = True, loader: gptq.LayerLoader | None = None):
    """AWQ (and GPTQ) on the float torch `model` of `prep`, in place, for every tensor the plan gives a calibrated
    method: (tensors, methods, floats, info). `quantize=False`: only the scales are searched and folded (the model
    stays float; nothing is quantized). `loader`: the model is `loader.model` (tune/gptq.py's `LayerLoader`), each
    decoder layer loaded before it runs and released after; None: `model` holds every layer."""
    from tqdm import tqdm

    planned = {tp.name: tp for tp in prep.plan.tensors}
    wanted = {name: tp for name, tp in planned.items() if tp.method in CALIBRATED}
    methods = {name: f"rtn ({tp.method} applies to the decoder layers' linears and the output head)"
               for name, tp in wanted.items()}
    tensors, floats, not_scaled, alphas = {}, {}, {}, {}
    prefix, layers = gptq._decoder_layers(model)
    hidden, calls = gptq.capture_inputs(model, layers, ids, batch)
    trim_heap()
    target = gptq._head(model, prep, wanted) if head else None
    last = gptq.last_layer(layers, wanted, target)
    bar = tqdm(layers[:last + 1], desc="awq", unit="layer", disable=not progress, dynamic_ncols=True)
    for i, layer in enumerate(bar):
        if loader is not None:
            loader.load(i)
        _awq_layer(layer, f"{prefix}.{i}", planned, wanted, hidden, calls[i], (n_grid, damp, clip, quantize),
                   (tensors, methods, floats, not_scaled, alphas))
        if i < last or target is not None:   # the next layer's (the head's) inputs; none after the last planned
            hidden = [gptq._layer_output(o) for o in gptq._run_layer(layer, hidden, calls[i])]
        if loader is not None:
            loader.release(i)
        bar.set_postfix_str(f"{len(tensors)}/{len(wanted)} tensors", refresh=False)
    bar.close()
    if target is not None and quantize:
        name, out, norm = target
        tensors[name] = quantize_linear(out, gptq.head_hessian(norm, hidden), wanted[name], wanted[name].method,
                                        damp, clip)
        methods[name] = _label(wanted[name].method, False)
        if wanted[name].method in AWQ_METHODS:
            not_scaled[name] = "the output head: no op before it can take a scale"
    info = {"method": ", ".join(sorted({tp.method for tp in wanted.values()})), "n_grid": n_grid,
            "clip_grid": list(CLIP_GRID), "damp": damp, "head": target[0] if target is not None else None,
            **({"clip_search": clip} if any(tp.method == "awq+gptq" for tp in wanted.values()) else {}),
            "awq_scaled_groups": alphas, "awq_not_scaled": dict(sorted(not_scaled.items())),
            "fallback_rtn": sorted(n for n, m in methods.items() if m.startswith("rtn"))}
    return tensors, methods, floats, info


def _awq_layer(layer, path: str, planned: dict, wanted: dict, hidden: list, calls: list, opts: tuple,
               out: tuple) -> None:
    """One decoder layer (module path `path`) of `run_awq`: its groups' scales searched and folded, its planned
    linears quantized in place (`planned`: every tensor's plan, `wanted`: the calibrated ones'); the results go
    into `out` = (tensors, methods, floats, not_scaled, alphas)."""
    n_grid, damp, clip, quantize = opts
    tensors, methods, floats, not_scaled, alphas = out
    full = {n: f"{path}.{n}.weight" for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    linears = {n: m for n, m in layer.named_modules() if n in full}
    todo = {n for n in linears if full[n] in wanted and tuple(linears[n].weight.shape) == wanted[full[n]].shape}
    if not todo:
        return
    stats, norm_out, outs = observe(layer, linears, _norms(layer), hidden, calls)
    ref = outs[0]
    del outs    # only the first batch's float output is checked against
    method = {n: wanted[full[n]].method for n in todo}
    spec = {n: (wanted[full[n]].spec.bits, wanted[full[n]].spec.group_size, dtype_from_name(wanted[full[n]].dtype),
                wanted[full[n]].spec.mode) for n in todo}
    sc = scale_layer(layer, linears, method, spec, stats, norm_out, hidden[0], calls[0], ref, n_grid, damp, clip)
    for local in sorted(sc.changed):  # folded norm weights / biases: stored (and used on) in their dtype
        name, p = f"{path}.{local}", layer.get_parameter(local)
        p.copy_(p.to(dtype_from_name(planned[name].dtype)).to(p.dtype))
        floats[name] = p.detach().to(dtype_from_name(planned[name].dtype)).clone()
    not_scaled.update({full[n]: why for n, why in sc.not_scaled.items()})
    alphas.update({f"{path}.{n}": [a, round(r, 4)] for n, (a, r) in sc.alphas.items()})
    for n in sorted(todo):
        name, m = full[n], linears[n]
        H = stats[n].H
        if n in sc.s:
            s = sc.s[n]
            H = H / (s[:, None] * s[None, :])
        elif method[n] in AWQ_METHODS and n not in sc.not_scaled:
            not_scaled[name] = NO_OP
        if quantize:
            tensors[name] = quantize_linear(m, H, wanted[name], method[n], damp, clip)
        methods[name] = _label(method[n], n in sc.s)


def awq_tensors(prep, calib, *, n_grid: int = N_GRID, damp: float = gptq.DAMP, batch: int = gptq.BATCH,
                progress: bool = True, threads: int | None = None, clip: bool = gptq.CLIP,
                head: bool = True) -> Precomputed:
    """AWQ / awq+gptq (and gptq) for every tensor the plan of `prep` gives such a method, on the calibration windows
    `calib`: a `Precomputed` for convert's writer (quantized tensors, folded float tensors, per-tensor methods,
    calibration provenance). `clip`: gptq's range search (tune/gptq.py) for the GPTQ'd tensors."""
    t0 = time.time()
    with torch.no_grad(), torch_threads(threads or torch.get_num_threads()):
        trim_heap()   # tokenizing the calibration text leaves freed blocks (as in gptq_tensors)
        lazy = gptq.layer_loader(prep)
        tensors, methods, floats, info = run_awq(lazy.model, prep, calib.ids, n_grid=n_grid, damp=damp, batch=batch,
                                                 progress=progress, clip=clip, head=head, loader=lazy)
    info = {**info, **calib.info, "seconds": round(time.time() - t0, 1)}
    return Precomputed(tensors, methods, info, floats)

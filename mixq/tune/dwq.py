"""DWQ (distilled weight quantization, as mlx-lm's `mlx_lm.dwq`) on the MLX affine grid: with the integer codes of a
start quant fixed, each group's scale and bias are tuned so that the quantized model's next-token distributions match
the unquantized model's on the calibration text.

Methods (`DWQ_METHODS`, method -> start, in quant/recipe.py): "dwq" (start: round to nearest), "gptq+dwq", "awq+dwq",
"awq+gptq+dwq" (start: gptq, awq, awq+gptq; tune/methods.py runs the start pass on the plan with the dwq methods
replaced by their start, `start_prep`). A float-mode tensor (mxfp4, nvfp4, mxfp8: no affine scale and bias) is
planned with the start alone (`Recipe.method_for`) and never tuned. Then:
  * teacher: the unquantized float32 model; its final hidden states (after the final norm) on every calibration
    window are kept, not its logits (samples x length x hidden floats), which are recomputed per chunk of CHUNK
    tokens through its head;
  * student: the model as the converted folder holds it (every planned tensor as MLX dequantizes it, AWQ's folded
    norms included), in float32; the tensors planned with a dwq method (2-D affine: decoder linears, embedding, head;
    a tied embedding serves both) are computed from their fixed codes and float32 master copies of their scales and
    biases. The forward uses exactly the weight MLX dequantizes (scale and bias rounded to the stored dtype,
    scale * q rounded, + bias rounded), the backward the float32 formula's gradient (straight-through);
  * loss: KL(teacher || student) over the whole vocabulary, mean per token, CHUNK tokens at a time (the student's
    hidden states are cut from the graph at the head, the chunks' gradients summed, then pushed through the body);
  * Adam (`--dwq-lr`) for `--dwq-steps` steps of `--dwq-batch` windows; 1/8 of the windows (at least one, spread
    over the set, `held_out`) are held out and never trained on. The held-out KL is measured at the start, every
    ceil(steps / 8) steps and after the last, and the parameters with the least are kept: the result is never
    worse than the start on the held-out windows (`calibration.dwq` records start / best KL and the step).
MoE expert stacks (3-D) keep their start quant, and `methods` says so per tensor. Scales and biases are written in the
plan's dtype: the folder stays plain MLX affine. Memory: the teacher in float32 while its hidden states are taken,
then the student: its untuned tensors in float32, the tuned ones as uint8 codes plus float32 scales and biases,
their float32 weights made for each forward (and kept by autograd for the backward), one batch's activations.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from mixq.errors import MixqError
from mixq.eval.head import OutputHead, output_head
from mixq.io.memory import trim_heap
from mixq.io.safetensors import dtype_from_name
from mixq.quant.arch import hf_state_dict
from mixq.quant.convert import Precomputed
from mixq.quant.quantize import Quantized, dequantize, quantize, unpack_codes
from mixq.quant.recipe import DWQ_METHODS
from mixq.threads import torch_threads

CHUNK = 256            # tokens per head pass of the KL (a chunk's logits: CHUNK x vocabulary floats, a few times)
DEFAULT_STEPS = 64
DEFAULT_LR = 3e-5
DEFAULT_BATCH = 4
HOLD_OUT = 8           # one window in HOLD_OUT is held out


@dataclass(frozen=True)
class DwqConfig:
    steps: int = DEFAULT_STEPS
    lr: float = DEFAULT_LR
    batch: int = DEFAULT_BATCH

    def check(self) -> None:
        """Options checked before anything is loaded."""
        for opt, v in (("--dwq-steps", self.steps), ("--dwq-batch", self.batch)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise MixqError(f"{opt} {v!r}: give an integer of 1 or more")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not math.isfinite(self.lr) \
                or self.lr <= 0:
            raise MixqError(f"--dwq-lr {self.lr!r}: give a positive learning rate (default {DEFAULT_LR})")


def start_prep(prep):
    """`prep` with every dwq method replaced by its start method (what the start pass quantizes)."""
    tensors = [replace(tp, method=DWQ_METHODS.get(tp.method, tp.method)) for tp in prep.plan.tensors]
    return replace(prep, plan=replace(prep.plan, tensors=tensors))


def held_out(n: int) -> list[int]:
    """The held-out windows of n: max(1, n // HOLD_OUT) of them, spread evenly over the set."""
    m = max(1, n // HOLD_OUT)
    return sorted({min(n - 1, int((k + 0.5) * n / m)) for k in range(m)})


# ---------------------------------------------------------------- the tuned tensors

@dataclass
class Tuned:
    """One tensor dwq tunes: its fixed codes, its float32 master scale and bias, how MLX stores it."""
    name: str                # plan (MLX) name = the model's parameter key
    wq: torch.Tensor         # packed codes (unchanged)
    q: torch.Tensor          # uint8 codes [rows, groups, group size]
    s: torch.Tensor          # float32 [rows, groups, 1], requires grad
    z: torch.Tensor
    dtype: torch.dtype       # the stored dtype of scales and biases

    def stored(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scales, biases) [rows, groups] as they would be written now."""
        return (self.s.detach().to(self.dtype).reshape(self.s.shape[:2]),
                self.z.detach().to(self.dtype).reshape(self.z.shape[:2]))

    def weight(self) -> torch.Tensor:
        """The weight [rows, in] MLX dequantizes from the current scale and bias; with grad enabled, the float32
        formula's gradient flows to them (straight-through the roundings)."""
        return _Dequantized.apply(self.s, self.z, self.q, self.dtype).reshape(self.q.shape[0], -1)


class _Dequantized(torch.autograd.Function):
    """s * q + z as MLX dequantizes it (each term rounded to the stored dtype `dt`), float32; backward: the float32
    formula's gradient (straight-through the roundings), from the uint8 codes (no float32 copy of them kept)."""

    @staticmethod
    def forward(ctx, s, z, q, dt):
        ctx.save_for_backward(q)
        return (s.to(dt) * q.to(dt) + z.to(dt)).to(torch.float32)

    @staticmethod
    def backward(ctx, grad):
        (q,) = ctx.saved_tensors
        return (grad * q).sum(-1, keepdim=True), grad.sum(-1, keepdim=True), None, None


def _tuned(name: str, parts, bits: int, gs: int, dtype: torch.dtype) -> Tuned:
    wq, s, z = parts
    q = unpack_codes(wq, bits)
    rows = q.shape[0]
    q = q.reshape(rows, -1, gs)
    master = [t.to(dtype).to(torch.float32).reshape(rows, -1, 1).clone().requires_grad_() for t in (s, z)]
    return Tuned(name, wq, q, *master, dtype)


def student(prep, pre: Precomputed):
    """(float32 model as the converted folder holds it, {name: (packed, scales, biases)} of the start quant of every
    2-D affine tensor planned with a dwq method)."""
    from mixq.eval.engine import build_from_state

    planned = {tp.name: tp for tp in prep.plan.tensors}
    start = {}

    def named():
        for info, load in prep.items:
            tp = planned[info.name]
            if tp.name in pre.floats:
                yield tp.name, pre.floats[tp.name].to(torch.float32)
                continue
            t = load()
            dt = dtype_from_name(tp.dtype)
            if isinstance(t, Quantized):   # a source format kept (never a dwq tensor: kept tensors are "rtn")
                aff = t.spec.mode == "affine"
                yield tp.name, dequantize(t.wq, t.scales.to(dt) if aff else t.scales, t.biases.to(dt) if aff else None,
                                          t.spec.bits, t.spec.group_size, mode=t.spec.mode, dtype=torch.float32)
                continue
            if tp.spec is None:
                yield tp.name, (t.to(dt) if t.is_floating_point() else t).to(torch.float32)
                continue
            sp = tp.spec
            parts = pre.tensors.get(tp.name) or quantize(t.to(dt), sp.bits, sp.group_size, mode=sp.mode, name=tp.name)
            if tp.method in DWQ_METHODS and sp.mode == "affine" and len(tp.shape) == 2:
                start[tp.name] = parts
            yield tp.name, dequantize(*parts, sp.bits, sp.group_size, mode=sp.mode, dtype=torch.float32)

    model = build_from_state(prep.config, hf_state_dict(named(), prep.config), "float32", prep.path)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, start


# ---------------------------------------------------------------- the loss

def _body(model):
    """(the decoder body: input ids -> final hidden states after the final norm, its module path)."""
    body = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    path = next(n for n, m in model.named_modules() if m is body)
    return body, path


def hidden_states(body, ids: torch.Tensor, weights: dict | None = None) -> torch.Tensor:
    """Final hidden states [batch, length, hidden] of `body` on `ids`, its parameters `weights` (body keys) replaced."""
    kwargs = {"input_ids": ids, "use_cache": False}
    out = torch.func.functional_call(body, weights, (), kwargs) if weights else body(**kwargs)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def kl_sum(h_s: torch.Tensor, h_t: torch.Tensor, head_s: OutputHead, head_t: OutputHead) -> torch.Tensor:
    """sum over the tokens of KL(teacher || student) of the next-token distributions, the whole vocabulary."""
    lt = F.log_softmax(head_t.logits(h_t), -1)
    ls = F.log_softmax(head_s.logits(h_s), -1)
    return F.kl_div(ls, lt, reduction="sum", log_target=True)


@dataclass
class Student:
    model: object
    body: object
    path: str                 # the body's module path ("model")
    tuned: list               # [Tuned]
    head: OutputHead          # the student's head; its weight replaced by `head_tuned`'s when that is set
    head_tuned: Tuned | None

    def weights(self) -> dict:
        """{parameter key: weight} of the tuned tensors, for the forward."""
        return {t.name: t.weight() for t in self.tuned}

    def body_weights(self, w: dict) -> dict:
        pre = self.path + "."
        return {k.removeprefix(pre): v for k, v in w.items() if k.startswith(pre)}

    def head_with(self, w: dict) -> OutputHead:
        if self.head_tuned is None:
            return self.head
        return OutputHead(w[self.head_tuned.name], self.head.bias, self.head.softcap)


def window_kl(st: Student, ids: torch.Tensor, h_t: torch.Tensor, head_t: OutputHead, train: bool,
              w: dict | None = None) -> float:
    """Mean per-token KL on the windows `ids` (teacher hidden states `h_t`); `train`: its gradient accumulated into
    the tuned scales and biases (chunked at the head: one chunk's logits at a time). `w`: `st.weights()` made already
    (without grad)."""
    n_tok = ids.numel()
    with torch.set_grad_enabled(train):
        w = st.weights() if w is None else w
        h = hidden_states(st.body, ids, st.body_weights(w))
        head = st.head_with(w)
        hs, ht = h.reshape(-1, h.shape[-1]), h_t.reshape(-1, h_t.shape[-1])
        if not train:
            return sum(float(kl_sum(hs[a:a + CHUNK], ht[a:a + CHUNK], head, head_t))
                       for a in range(0, n_tok, CHUNK)) / n_tok
        h_leaf = hs.detach().requires_grad_()
        w_head = head.weight
        w_leaf = w_head.detach().requires_grad_() if st.head_tuned is not None else w_head
        head_leaf = OutputHead(w_leaf, head.bias, head.softcap)
        total = 0.0
        for a in range(0, n_tok, CHUNK):
            loss = kl_sum(h_leaf[a:a + CHUNK], ht[a:a + CHUNK], head_leaf, head_t) / n_tok
            loss.backward()
            total += float(loss.detach())
        roots, grads = [hs], [h_leaf.grad]
        if st.head_tuned is not None:
            roots.append(w_head)
            grads.append(w_leaf.grad)
        torch.autograd.backward(roots, grads)
    return total


def heldout_kl(st: Student, ids: torch.Tensor, h_t: torch.Tensor, head_t: OutputHead, hold: list,
               batch: int) -> float:
    """Mean per-token KL on the held-out windows `hold`, `batch` windows per forward, the weights made once."""
    with torch.no_grad():
        w = st.weights()
        parts = [hold[a:a + batch] for a in range(0, len(hold), batch)]
        return sum(window_kl(st, ids[p], h_t[p], head_t, False, w) * len(p) for p in parts) / len(hold)


# ---------------------------------------------------------------- the run

def teacher_states(prep, ids: torch.Tensor, batch: int):
    """(final hidden states [samples, length, hidden] of the unquantized model on `ids`, its output head)."""
    from mixq.eval.engine import load_model

    model = load_model(str(prep.path), progress=False, packed=False).model
    body, _ = _body(model)
    h = torch.cat([hidden_states(body, ids[a:a + batch]) for a in range(0, ids.shape[0], batch)])
    head = output_head(model)
    head = OutputHead(head.weight.clone(), None if head.bias is None else head.bias.clone(), head.softcap)
    del model, body
    trim_heap()
    return h, head


def tune(st: Student, ids: torch.Tensor, h_t: torch.Tensor, head_t: OutputHead, cfg: DwqConfig,
         progress: bool = True, seed: int = 0) -> dict:
    """Adam on the tuned scales and biases (module docstring); the best by held-out KL are left in `st.tuned`.
    Returns the record for `calibration.dwq`."""
    from tqdm import tqdm

    n = ids.shape[0]
    hold = held_out(n)
    train = [i for i in range(n) if i not in hold]
    params = [p for t in st.tuned for p in (t.s, t.z)]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    every = math.ceil(cfg.steps / HOLD_OUT)
    rnd, queue = random.Random(seed), []

    def heldout() -> float:
        return heldout_kl(st, ids, h_t, head_t, hold, cfg.batch)

    def snapshot():
        return [t.stored() for t in st.tuned]

    start = heldout()
    best = (start, 0, snapshot())
    evals, train_kl = [[0, start]], []
    bar = tqdm(range(1, cfg.steps + 1), desc="dwq", unit="step", disable=not progress, dynamic_ncols=True)
    for step in bar:
        while len(queue) < cfg.batch:
            more = list(train)
            rnd.shuffle(more)
            queue += more
        batch, queue = sorted(queue[:cfg.batch]), queue[cfg.batch:]
        opt.zero_grad(set_to_none=True)
        train_kl.append(window_kl(st, ids[batch], h_t[batch], head_t, True))
        opt.step()
        if step % every == 0 or step == cfg.steps:
            kl = heldout()
            evals.append([step, kl])
            if kl < best[0]:
                best = (kl, step, snapshot())
        bar.set_postfix_str(f"train KL {train_kl[-1]:.4f}, held-out {evals[-1][1]:.4f} (start {start:.4f})",
                            refresh=False)
    bar.close()
    with torch.no_grad():
        for t, (s, z) in zip(st.tuned, best[2]):
            t.s.copy_(s.to(torch.float32).reshape(t.s.shape))
            t.z.copy_(z.to(torch.float32).reshape(t.z.shape))
    return {"steps": cfg.steps, "lr": cfg.lr, "batch": cfg.batch, "held_out_windows": hold,
            "train_windows": len(train), "chunk_tokens": CHUNK, "start_heldout_kl": round(start, 6),
            "best_heldout_kl": round(best[0], 6), "best_step": best[1],
            "heldout_kl": [[s, round(k, 6)] for s, k in evals], "train_kl": [round(k, 6) for k in train_kl]}


def _label(method: str, start_label: str) -> str:
    start = DWQ_METHODS[method]
    return method if start_label == start else f"{method} (start {start_label.split(' (')[0]}: see calibration)"


def dwq_tensors(prep, calib, cfg: DwqConfig, start, *, progress: bool = True,
                threads: int | None = None) -> Precomputed:
    """DWQ for every tensor the plan of `prep` gives a dwq method, on the calibration windows `calib`:
    `start(prepared) -> Precomputed` runs the start pass (tune/methods.py) on `start_prep(prep)` when it has
    calibrated tensors (the plan's other calibrated tensors get their own method there, unchanged here)."""
    cfg.check()
    n = int(calib.ids.shape[0])
    if n < 2:
        raise MixqError(f"--calib-samples {n}: dwq holds out 1/{HOLD_OUT} of the calibration windows (at least one) "
                        "and trains on the rest; give 2 or more")
    t0 = time.time()
    sprep = start_prep(prep)
    pre = start(sprep) if sprep.plan.calibrated() else None
    pre = pre or Precomputed({}, {}, dict(calib.info))
    with torch.no_grad(), torch_threads(threads or torch.get_num_threads()):
        h_t, head_t = teacher_states(prep, calib.ids, cfg.batch)
        model, parts = student(prep, pre)
        planned = {tp.name: tp for tp in prep.plan.tensors}
        keys = dict(model.named_parameters())
        tuned = [_tuned(name, p, planned[name].spec.bits, planned[name].spec.group_size,
                        dtype_from_name(planned[name].dtype))
                 for name, p in parts.items() if name in keys and tuple(keys[name].shape) == planned[name].shape]
        if not tuned:
            raise MixqError(f"recipe {prep.recipe.name}: no tensor dwq can tune (2-D affine weights of the model); "
                            "use another method")
        body, path = _body(model)
        out = model.get_output_embeddings()
        head = output_head(model)
        head_tuned = next((t for t in tuned if out is not None and keys[t.name] is out.weight), None)
        if head_tuned is not None:   # its weight comes from head_tuned (Student.head_with)
            head = OutputHead(None, head.bias, head.softcap)
        for t in tuned:   # every forward takes these from the Tuned (functional_call): drop the float32 copies
            keys[t.name].data = torch.empty(0)
        del keys, out
        st = Student(model, body, path, tuned, head, head_tuned)
        record = tune(st, calib.ids, h_t, head_t, cfg, progress)
    tensors, methods = dict(pre.tensors), dict(pre.methods)
    done = {t.name for t in tuned}
    for t in tuned:
        tensors[t.name] = (t.wq, *t.stored())
    for tp in prep.plan.calibrated():
        if tp.method not in DWQ_METHODS:
            continue
        was = pre.methods.get(tp.name, "rtn")
        if tp.name in done:
            methods[tp.name] = _label(tp.method, was)
        else:
            why = "MoE experts keep their start quant" if len(tp.shape) == 3 else "no model parameter to tune"
            methods[tp.name] = f"{was.split(' (')[0]} (dwq: {why})"
    record.update(tuned_tensors=len(tuned), head=head_tuned.name if head_tuned else None,
                  seconds=round(time.time() - t0, 1))
    info = {**pre.calibration, "method": ", ".join(sorted({tp.method for tp in prep.plan.calibrated()})),
            "dwq": record}
    return Precomputed(tensors, methods, info, dict(pre.floats))

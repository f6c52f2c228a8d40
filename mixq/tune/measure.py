"""`mixq measure`: how much each tensor's quantization moves the model's output.

For every quantizable tensor (per recipe.plan_model under a uniform recipe of each candidate) and
every candidate `(bits, group_size)`, the damage is the mean per-token KL divergence
KL(base || perturbed) of the next-token distribution on calibration text, where *perturbed* is the
unquantized model with that one tensor replaced by its MLX quantize -> dequantize round trip (in
the tensor's stored dtype, exactly what `mixq convert` writes).

Two methods:
* `fisher` (default): the second-order estimate KL ~= 1/2 dW^T F dW with the Fisher information F
  sampled by gradients of log p(y) for labels y drawn from the base's own distribution (see
  `fisher_damages`). One forward and `--draws` backward passes per calibration window give the
  estimate for every tensor and candidate at once: the cost does not grow with tensors x candidates.
* `direct`: one perturbed forward per tensor and candidate (`--direct all`), or at anchor candidates
  with the others scaled by the tensor's activation-weighted quantization error (`--direct anchors`).
  The inputs of every decoder layer are cached from one base pass, so perturbing a tensor of layer i
  re-runs layers i.. only (layers below are pass-through stubs; the model's own mask/rope code runs
  unchanged). Large vocabularies (> VOCAB_FULL_MAX) use the union of the base's top-TOPK tokens as
  the support (`--full-vocab` to turn off). The KLD itself is perplexity.py's (`_kld_rows`).

Calibration text: by default the *end* of WikiText-2's test file (perplexity.default_text_file):
the last `--tokens // --ctx` of the consecutive `--ctx`-token windows perplexity.make_windows cuts
(windows 1175..1178 of 1179 for SmolLM2 at ctx 256). Evaluation (`mixq eval --windows N`,
benchmarks/plan.py) counts its windows from the start of the file, so the two are disjoint unless
evaluation reads (nearly) the whole file; `mixq eval` without --windows reads all of it and then
shares these last ~0.4% of its tokens with the calibration.

The measurement file (JSON) is rewritten atomically after every window (fisher) or tensor (direct);
`--resume` continues it.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from mixq.errors import MixqError
from mixq.eval.engine import load_model
from mixq.eval.perplexity import _kld_rows, make_windows
from mixq.io.files import write_atomic
from mixq.quant.plan import plan_model
from mixq.quant.prepare import prepare
from mixq.quant.quantize import dequantize, quantize
from mixq.quant.recipe import parse_recipe

FORMAT = "mixq-measurement/1"
VOCAB_FULL_MAX = 65536
TOPK = 32
DEFAULT_ANCHORS = ((4, 64), (6, 64))


def spec_key(bits: int, group_size: int) -> str:
    return f"{bits}:{group_size}"


def parse_key(key: str) -> tuple[int, int]:
    b, g = key.split(":")
    return int(b), int(g)


def calib_windows(tokenizer, path=None, n_tokens: int = 1024, ctx: int = 256):
    """The last n_tokens // ctx windows of `ctx` tokens of a text file (perplexity.make_windows' windows).

    Default file: WikiText-2 test (perplexity.default_text_file). Evaluation's ppl/kld windows are
    counted from the start of the file, so the calibration slice is the part furthest from them.
    """

    n = max(1, n_tokens // ctx)
    win = make_windows(tokenizer, path, ctx=ctx)
    total = int(win.ids.shape[0])
    if total < n:
        raise MixqError(f"{win.file}: holds only {total} windows of {ctx} tokens; need {n} "
                        f"(lower --tokens / --ctx or pass a longer --calib file)")
    sub = win.subset(range(total - n, total))
    return sub, {"file": win.file, "ctx": ctx, "n_windows": n, "first_window": total - n,
                 "windows_in_file": total, "scored_tokens": sub.n_tokens, "digest": sub.digest}


# ---------------------------------------------------------------------------------------------
# The model-side machinery


class _Stub:
    """Stand-in for a decoder layer below the one being perturbed: returns a cached tensor or its input."""

    def __new__(cls, cached=None):
        import torch

        class Stub(torch.nn.Module):
            def __init__(self, cached):
                super().__init__()
                self.cached = cached

            def forward(self, hidden_states=None, *args, **kwargs):
                if hidden_states is None:
                    hidden_states = kwargs.get("hidden_states")
                return self.cached if self.cached is not None else hidden_states

        return Stub(cached)


def _lse(logits):
    import torch

    return torch.cat([torch.logsumexp(c.double(), dim=-1) for c in logits.split(256)])


def _layer_of(name: str) -> int | None:
    m = re.search(r"\blayers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


@dataclass
class Calibrated:
    """Base-model state on the calibration windows, reused by every perturbed forward."""
    input_ids: object
    layer_inputs: list                  # layer_inputs[i]: input of decoder layer i; [-1]: output of the last
    vocab: object                       # LongTensor of the vocabulary subset, or None (full vocab)
    base_logp: object                   # (logits [N, V'] at the scored positions over the subset, their lse)
    hessians: dict = field(default_factory=dict)   # module path -> X^T X / ntok (float64)
    token_counts: object = None


class Measurer:
    """Perturb one tensor at a time and return the mean per-token KLD against the base."""

    def __init__(self, model, input_ids, *, full_vocab: bool = False, topk: int = TOPK, hessians: bool = True):
        import torch

        self.torch = torch
        self.model = model
        model.requires_grad_(False)
        self.inner = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        self.layers = self.inner.layers
        self.n_layers = len(self.layers)
        self.head = model.get_output_embeddings()
        self.softcap = getattr(model.config, "final_logit_softcapping", None)
        self.params = dict(model.named_parameters())
        self.modules = dict(model.named_modules())
        self.cal = self._calibrate(input_ids, full_vocab, topk, hessians)

    # -- base pass ----------------------------------------------------------------------------
    def _calibrate(self, input_ids, full_vocab, topk, want_h):
        torch = self.torch
        inputs: dict[int, torch.Tensor] = {}
        hess: dict[str, torch.Tensor] = {}
        handles = []

        def layer_hook(i):
            def pre(mod, args, kwargs):
                hs = args[0] if args else kwargs["hidden_states"]
                inputs[i] = hs.detach().clone()
            return pre

        for i, layer in enumerate(self.layers):
            handles.append(layer.register_forward_pre_hook(layer_hook(i), with_kwargs=True))
        handles.append(self.inner.norm.register_forward_pre_hook(
            lambda mod, args: inputs.__setitem__(self.n_layers, args[0].detach().clone())))
        if want_h:
            for name, mod in self.modules.items():
                if isinstance(mod, torch.nn.Linear) and _layer_of(name) is not None:
                    def lin_hook(mod, args, name=name):
                        x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
                        h = x.T @ x
                        hess[name] = hess[name] + h if name in hess else h
                    handles.append(mod.register_forward_pre_hook(lin_hook))
        try:
            with torch.no_grad():
                hidden = self.inner(input_ids=input_ids, use_cache=False).last_hidden_state
        finally:
            for h in handles:
                h.remove()
        ntok = input_ids.numel()
        hess = {k: v / ntok for k, v in hess.items()}
        hess["__final__"] = (hidden.reshape(-1, hidden.shape[-1]).double().T
                             @ hidden.reshape(-1, hidden.shape[-1]).double()) / ntok
        vocab = None
        full = self._logits(hidden[:, :-1].reshape(-1, hidden.shape[-1]), None)
        if not full_vocab and full.shape[-1] > VOCAB_FULL_MAX:
            vocab = torch.unique(full.topk(topk, dim=-1).indices.reshape(-1))
            full = full[:, vocab]
        base_logp = (full, _lse(full))
        counts = torch.bincount(input_ids.reshape(-1), minlength=self.head.weight.shape[0]).double()
        layer_inputs = [inputs[i] for i in range(self.n_layers + 1)]
        return Calibrated(input_ids, layer_inputs, vocab, base_logp, hess, counts)

    def _logits(self, hidden, vocab):
        w = self.head.weight if vocab is None else self.head.weight[vocab]
        logits = hidden @ w.T
        bias = getattr(self.head, "bias", None)
        if bias is not None:
            logits = logits + (bias if vocab is None else bias[vocab])
        if self.softcap:
            logits = self.torch.tanh(logits / self.softcap) * self.softcap
        return logits

    # -- perturbed passes ---------------------------------------------------------------------
    def start_layer(self, name: str) -> int:
        """The first decoder layer whose output a change of `name` can affect."""
        i = _layer_of(name)
        if i is not None:
            return i
        if name.endswith("embed_tokens.weight") or "embed" in name:
            return 0
        return self.n_layers  # output head (untied lm_head) or final norm: only the head re-runs

    def forward_from(self, start: int):
        """(logits over the vocabulary subset at the scored positions, their lse), re-running decoder
        layers start.. on the cached inputs."""
        torch = self.torch
        saved = []
        try:
            for j in range(start):
                saved.append(self.layers[j])
                self.layers[j] = _Stub(self.cal.layer_inputs[start] if j == start - 1 else None)
            with torch.no_grad():
                hidden = self.inner(input_ids=self.cal.input_ids, use_cache=False).last_hidden_state
                logits = self._logits(hidden[:, :-1].reshape(-1, hidden.shape[-1]), self.cal.vocab)
                return logits, _lse(logits)
        finally:
            for j, layer in enumerate(saved):
                self.layers[j] = layer

    def kld(self, out) -> float:
        """Mean per-token KL(base || perturbed) over the scored calibration tokens (perplexity's KLD)."""

        (b, b_lse), (q, q_lse) = self.cal.base_logp, out
        kl, _ = _kld_rows(q, q_lse, b, b_lse, None)
        return float(kl.clamp_min(0).mean())

    def damage(self, name: str, src_dtype, bits: int, group_size: int) -> tuple[float, float]:
        """(KLD with `name` quantized to (bits, group_size), proxy error tr(dW H dW^T)) ; weights restored after."""
        torch = self.torch

        p = self.params[name]
        orig = p.data.clone()
        try:
            w = orig.to(src_dtype)
            deq = dequantize(*quantize(w, bits, group_size, name=name), bits, group_size, name=name)
            p.data.copy_(deq.to(p.dtype))
            d = self.kld(self.forward_from(self.start_layer(name)))
            err = self.proxy_error(name, (deq.to(torch.float64) - orig.to(torch.float64)))
        finally:
            p.data.copy_(orig)
        return d, err

    def proxy_error(self, name: str, dw) -> float:
        """Activation-weighted quantization error of tensor `name` for weight change dw."""
        mod = name[: -len(".weight")] if name.endswith(".weight") else name
        h = self.cal.hessians.get(mod)
        if h is None and dw.shape[-1] == self.cal.hessians["__final__"].shape[0] and \
                self.head is not None and self.head.weight.data_ptr() == self.params[name].data_ptr():
            h = self.cal.hessians["__final__"]    # tied embedding: its output-head role dominates
        if h is None and "embed" in name:          # untied input embedding: rows weighted by token counts
            c = self.cal.token_counts[: dw.shape[0]]
            return float(((dw * dw).sum(-1) * (c + 1e-3)).sum() / c.sum())
        if h is None:
            return float((dw * dw).sum())
        return float(((dw @ h) * dw).sum())


# ---------------------------------------------------------------------------------------------
# Measurement over a model


def candidate_table(prep, specs) -> dict[str, tuple[str, list[tuple[int, int]]]]:
    """name -> (stored dtype, candidates): for each candidate, what recipe.plan_model assigns under a
    uniform recipe of that spec (tensors it never quantizes drop out; forced specs, e.g. 8-bit MoE
    routers, replace the candidate)."""

    dtype = prep.plan.tensors[0].dtype if prep.store_dtype is not None and prep.plan.tensors else None
    out: dict[str, tuple[str, list]] = {}
    for bits, gs in specs:
        plan = plan_model([info for info, _ in prep.items], uniform_recipe(bits, gs), prep.config, dtype=dtype)
        for tp in plan.tensors:
            if tp.spec is None:
                continue
            c = (tp.spec.bits, tp.spec.group_size)
            entry = out.setdefault(tp.name, (tp.dtype, []))
            if c not in entry[1]:
                entry[1].append(c)
    return out


def uniform_recipe(bits: int, group_size: int):
    """A Recipe quantizing everything quantizable to (bits, group_size)."""

    name = f"uniform-{bits}-{group_size}"
    text = f'[recipe]\nname = "{name}"\nbits = {bits}\ngroup_size = {group_size}\n'
    return parse_recipe(text, f"<{name}>", name)


def _atomic_write_json(path: Path, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=1))


def measure_model(model, tensors: dict[str, tuple[str, list[tuple[int, int]]]], windows, *, out: Path,
                  header: dict, method: str = "fisher", draws: int = 8, direct: str = "anchors",
                  anchors=DEFAULT_ANCHORS, full_vocab: bool = False, resume: bool = False,
                  progress: bool = True) -> dict:
    """Measure `tensors` (name -> (stored dtype, candidates)) on `windows` (perplexity.Windows) and
    write the measurement to `out`, updated after every window (fisher) or tensor (direct), so an
    interrupted run resumes with `resume=True`."""
    import torch
    from tqdm import tqdm

    out = Path(out)
    if method == "fisher":
        header = {"format": FORMAT, **header, "method": "fisher", "draws": draws}
    elif method == "direct":
        header = {"format": FORMAT, **header, "method": "direct", "direct": direct,
                  "anchors": [spec_key(*a) for a in anchors] if direct != "all" else None,
                  "vocab": "full" if full_vocab else f"top{TOPK}-union if V>{VOCAB_FULL_MAX}"}
    else:
        raise MixqError(f"unknown measurement method {method!r}: use fisher or direct")
    doc = None
    if out.exists():
        if not resume:
            raise MixqError(f"{out} exists; pass --resume to continue it, or remove it")
        doc = load_measurement(out)
        for k in ("model", "candidates", "calib", "method", "draws", "direct", "anchors", "vocab"):
            if doc.get(k) != header.get(k):
                raise MixqError(f"{out} was measured with another {k} ({doc.get(k)!r}, now {header.get(k)!r}); "
                                f"use another -o file or the same settings")
    if doc is None:
        doc = {**header, "complete": False, "tensors": {}, "seconds": 0.0}
    t0 = [time.time()]

    def save():
        now = time.time()
        doc["seconds"] = doc.get("seconds", 0.0) + (now - t0[0])
        t0[0] = now
        _atomic_write_json(out, doc)

    if method == "fisher":
        def records(dam, done):
            return {n: {"shape": list(model.get_parameter(n).shape), "dtype": tensors[n][0], "damage": dam[n]}
                    for n in dam}

        def on_window(state):
            scale = 1.0 / (2.0 * (windows.ids.shape[1] - 1) * state["windows_done"] * draws)
            dam = {n: {spec_key(*c): v * scale for c, v in zip(tensors[n][1], sums)}
                   for n, sums in state["sums"].items()}
            doc["fisher_state"] = state
            doc["tensors"] = records(dam, state["windows_done"])
            doc["windows_done"] = state["windows_done"]
            doc["complete"] = state["windows_done"] >= windows.ids.shape[0]
            save()

        if not doc.get("complete"):
            fisher_damages(model, tensors, windows, draws=draws, progress=progress,
                           state=doc.get("fisher_state"), on_window=on_window)
        return doc

    todo = [n for n in tensors if n not in doc["tensors"]]
    if not todo:
        doc["complete"] = True
        return doc
    m = Measurer(model, windows.ids, full_vocab=full_vocab)
    doc["vocab_subset_size"] = None if m.cal.vocab is None else int(m.cal.vocab.numel())
    n_fwd = sum(len(tensors[n][1]) if direct == "all" else
                max(1, sum(1 for a in anchors if a in tensors[n][1])) for n in todo)
    bar = tqdm(total=n_fwd, desc="measure (direct)", unit="fwd", disable=not progress, file=sys.stderr,
               dynamic_ncols=True)
    for name in todo:
        dtype_name, cands = tensors[name]
        if name not in m.params:
            raise MixqError(f"tensor {name}: not a parameter of the loaded model; `mixq measure` supports dense "
                            f"architectures whose MLX and Hugging Face tensor names agree")
        src_dtype = getattr(torch, dtype_name)
        rec = {"shape": list(m.params[name].shape), "dtype": dtype_name, "damage": {}, "proxy": {}, "direct": []}
        if direct == "all":
            chosen = list(cands)
        else:
            chosen = [c for c in anchors if c in cands] or [min(cands, key=lambda c: (abs(c[0] - 4), c[1]))]
        for c in cands:
            key = spec_key(*c)
            if c in chosen:
                d, e = m.damage(name, src_dtype, *c)
                rec["damage"][key] = d
                rec["direct"].append(key)
                bar.update(1)
            else:
                e = _proxy_only(m, name, src_dtype, *c)
            rec["proxy"][key] = e
        if direct != "all":
            _fill_from_proxy(rec)
        doc["tensors"][name] = rec
        doc["complete"] = len(doc["tensors"]) >= len(tensors)
        save()
    bar.close()
    return doc


def fisher_damages(model, tensors: dict[str, tuple[str, list[tuple[int, int]]]], windows, *, draws: int = 8,
                   seed: int = 0, progress: bool = True, state: dict | None = None, on_window=None
                   ) -> dict[str, dict[str, float]]:
    """Second-order (Fisher) estimate of every tensor's damage for every candidate, all at once.

    KL(p || p_dW) ~= 1/2 dW^T F dW, F the Fisher information of the next-token distributions. With
    labels y_t drawn from the base's own distribution at every position of a window, the gradient
    g = grad sum_t log p_t(y_t) has E[(g . dW)^2] = dW^T F_window dW (cross-position terms vanish),
    so mean (g . dW)^2 / (2 * tokens) is an unbiased estimate of the mean per-token KLD to second
    order. One forward and `draws` backward passes per window give g for every tensor; the dot
    products with every candidate's dW = dequant(quant(W)) - W are cheap.

    Resumable: `state` ({"windows_done", "sums"}) continues an earlier run; `on_window(state)` is
    called after every window (the caller saves it). Window i draws its labels with seed + i.
    """
    import torch
    from tqdm import tqdm


    params = dict(model.named_parameters())
    names = [n for n in tensors if n in params]
    missing = [n for n in tensors if n not in params]
    if missing:
        raise MixqError(f"tensor {missing[0]}: not a parameter of the loaded model; `mixq measure` supports dense "
                        f"architectures whose MLX and Hugging Face tensor names agree")
    # every candidate's weight change, stacked per tensor (bfloat16: ample for a dot product)
    dws: dict[str, torch.Tensor] = {}
    for name in tqdm(names, desc="quantize candidates", unit="tensor", disable=not progress, file=sys.stderr,
                     leave=False):
        dtype_name, cands = tensors[name]
        w = params[name].detach()
        rows = []
        for bits, gs in cands:
            deq = dequantize(*quantize(w.to(getattr(torch, dtype_name)), bits, gs, name=name), bits, gs, name=name)
            rows.append((deq.float() - w.float()).reshape(-1).to(torch.bfloat16))
        dws[name] = torch.stack(rows)
    model.requires_grad_(False)
    for n in names:
        params[n].requires_grad_(True)
    state = state or {"windows_done": 0, "sums": {}}
    acc = {n: torch.tensor(state["sums"].get(n) or [0.0] * len(tensors[n][1]), dtype=torch.float64) for n in names}
    ids = windows.ids
    n_win, ctx = ids.shape
    done = int(state["windows_done"])
    bar = tqdm(total=n_win * draws, initial=done * draws, desc="measure (fisher)", unit="sample",
               disable=not progress, file=sys.stderr, dynamic_ncols=True)
    try:
        for wi in range(done, n_win):
            gen = torch.Generator().manual_seed(seed + wi)
            logits = model(input_ids=ids[wi:wi + 1], use_cache=False).logits[0, :-1].float()
            logp = torch.log_softmax(logits, dim=-1)
            probs = logp.detach().exp()
            for d in range(draws):
                y = torch.multinomial(probs, 1, generator=gen)
                loss = logp.gather(-1, y).sum()
                grads = torch.autograd.grad(loss, [params[n] for n in names], retain_graph=d < draws - 1)
                for n, g in zip(names, grads):
                    a = (dws[n] @ g.reshape(-1).to(torch.bfloat16).unsqueeze(-1)).squeeze(-1).double()
                    acc[n] += a * a
                bar.update(1)
            del logits, logp, probs
            state = {"windows_done": wi + 1, "sums": {n: acc[n].tolist() for n in names}}
            if on_window:
                on_window(state)
    finally:
        bar.close()
        model.requires_grad_(False)
    scale = 1.0 / (2.0 * (ctx - 1) * max(int(state["windows_done"]), 1) * draws)
    return {n: {spec_key(*c): float(v) * scale for c, v in zip(tensors[n][1], acc[n])} for n in names}


def _fill_from_proxy(rec: dict) -> None:
    """Damage of the non-anchor candidates: a power law in the proxy error through the anchors
    (log damage linear in log proxy; one anchor: damage proportional to the proxy)."""
    pts = [(math.log(max(rec["proxy"][k], 1e-30)), math.log(max(rec["damage"][k], 1e-12))) for k in rec["direct"]]
    if len(pts) >= 2 and abs(pts[-1][0] - pts[0][0]) > 1e-6:
        (x0, y0), (x1, y1) = pts[0], pts[-1]
        slope = min(max((y1 - y0) / (x1 - x0), 0.5), 1.5)
    else:
        slope = 1.0
    # intercept: mean over anchors
    icpt = sum(y - slope * x for x, y in pts) / len(pts)
    for key, e in rec["proxy"].items():
        if key not in rec["damage"]:
            rec["damage"][key] = math.exp(icpt + slope * math.log(max(e, 1e-30)))


def _proxy_only(m: Measurer, name, src_dtype, bits, group_size) -> float:

    torch = m.torch
    orig = m.params[name].data
    deq = dequantize(*quantize(orig.to(src_dtype), bits, group_size, name=name), bits, group_size, name=name)
    return m.proxy_error(name, deq.to(torch.float64) - orig.to(torch.float64))


def smoothed_damages(doc: dict) -> dict[str, dict[str, float]]:
    """Per-candidate damages with the sampling noise of a Fisher measurement pooled away.

    Uniform quantization's error variance scales as step^2 = (range / (2^bits - 1))^2, and a small
    damage is quadratic in the error, so per tensor and group size d(bits) = c / (2^bits - 1)^2.
    c is fitted per (tensor, group size) from all measured bit widths (mean of d * (2^bits - 1)^2),
    which pools their samples; a smaller group never gets a larger c than a bigger one.
    """
    out = {}
    for name, rec in doc["tensors"].items():
        by_group: dict[int, list[float]] = {}
        for key, d in rec["damage"].items():
            b, g = parse_key(key)
            by_group.setdefault(g, []).append(d * (2 ** b - 1) ** 2)
        c = {g: sum(v) / len(v) for g, v in by_group.items()}
        prev = None
        for g in sorted(c):
            if prev is not None and c[g] < c[prev]:  # pool the violators
                c[g] = c[prev] = (c[g] + c[prev]) / 2
            prev = g
        out[name] = {}
        for key in rec["damage"]:
            b, g = parse_key(key)
            out[name][key] = c[g] / (2 ** b - 1) ** 2
    return out


def load_measurement(path) -> dict:
    path = Path(path)
    if not path.exists():
        raise MixqError(f"measurement file {path} not found; run `mixq measure MODEL -o {path}` first")
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise MixqError(f"{path}: cannot read the measurement ({e}); re-run `mixq measure`") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise MixqError(f"{path}: not a mixq measurement file (expected format {FORMAT!r})")
    return doc


def measure(ref: str, *, levels=(3, 4, 5, 6, 8), group_sizes=(32, 64), calib=None, tokens: int = 1024,
            ctx: int = 256, out, resume: bool = False, method: str = "fisher", draws: int = 8,
            direct: str = "anchors", full_vocab: bool = False, progress: bool = True,
            only: list[str] | None = None) -> dict:
    """`mixq measure`: load `ref` (float32), measure every quantizable tensor, write `out`."""
    import torch


    specs = [(b, g) for b in levels for g in group_sizes]
    prep = prepare(ref, uniform_recipe(*specs[0]))
    table = candidate_table(prep, specs)
    if only:
        table = {k: v for k, v in table.items() if k in set(only)}
    if not table:
        raise MixqError(f"{ref}: no tensor can be quantized with {specs}")
    torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))
    lm = load_model(ref, dtype="float32", progress=progress)
    windows, calib_info = calib_windows(lm.tokenizer, calib, n_tokens=tokens, ctx=ctx)
    header = {"model": str(ref), "source": str(prep.path), "candidates": [spec_key(*c) for c in specs],
              "calib": calib_info, "metric": "mean per-token KL(base || one tensor quantized), nats"}
    return measure_model(lm.model, table, windows, out=out, header=header, method=method, draws=draws,
                         direct=direct, full_vocab=full_vocab, resume=resume, progress=progress)


def _ints(s: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in s.split(",") if x.strip())
    except ValueError:
        raise MixqError(f"expected a comma-separated list of integers, got {s!r}") from None


def add_arguments(p) -> None:
    p.add_argument("model", help="model to measure: HF folder, .gguf, or embedded name (e.g. smollm2-135m)")
    p.add_argument("--levels", default="3,4,5,6,8", help="candidate bit widths (default 3,4,5,6,8)")
    p.add_argument("--group-sizes", default="32,64", help="candidate group sizes (default 32,64)")
    p.add_argument("--calib", default=None, help="calibration text file (default: the end of WikiText-2 test)")
    p.add_argument("--tokens", type=int, default=1024, help="calibration tokens (default 1024)")
    p.add_argument("--ctx", type=int, default=256, help="calibration window length (default 256)")
    p.add_argument("--method", choices=("fisher", "direct"), default="fisher",
                   help="fisher (default): second-order estimate from sampled-label gradients, all tensors and "
                        "candidates at once; direct: one forward per tensor and candidate")
    p.add_argument("--draws", type=int, default=8, help="fisher: label draws per window (default 8)")
    p.add_argument("--direct", choices=("anchors", "all"), default="anchors",
                   help="direct: measure every candidate (all) or the anchors 4:64, 6:64 and scale the "
                        "others by each tensor's activation-weighted quantization error (anchors)")
    p.add_argument("--full-vocab", action="store_true", help="exact KLD over the whole vocabulary (slower for "
                                                              "large vocabularies)")
    p.add_argument("-o", "--output", required=True, help="measurement file to write (JSON)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted measurement in the same file")


def cli(args) -> int:
    levels, groups = _ints(args.levels), _ints(args.group_sizes)
    doc = measure(args.model, levels=levels, group_sizes=groups, calib=args.calib, tokens=args.tokens,
                  ctx=args.ctx, out=Path(args.output), resume=args.resume, method=args.method,
                  draws=args.draws, direct=args.direct,
                  full_vocab=args.full_vocab)
    print(f"measured {len(doc['tensors'])} tensors x {len(doc['candidates'])} candidates in "
          f"{doc.get('seconds', 0):.0f}s -> {args.output}")
    return 0

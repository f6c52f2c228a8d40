"""`mixq measure`: how much each tensor's quantization moves the model's output.

For every quantizable tensor (per quant.plan.plan_model under a uniform recipe of each candidate) and
every candidate spec (affine `(bits, group_size)`, or a float mode: mxfp4, nvfp4, mxfp8; keys
"bits:group" and the mode's name), the damage is the mean per-token KL divergence
KL(base || perturbed) of the next-token distribution on calibration text, where *perturbed* is the
unquantized model with that one tensor replaced by its MLX quantize -> dequantize round trip (in
the tensor's stored dtype, exactly what `mixq convert` writes).

Two methods:
* `fisher` (default): the second-order estimate KL ~= 1/2 dW^T F dW with the Fisher information F
  sampled by gradients of log p(y) for labels y drawn from the base's own distribution (see
  `measure_fisher`). One forward and `--draws` backward passes per calibration window give the
  estimate for every tensor and candidate at once: the cost does not grow with tensors x candidates.
* `direct`: one perturbed forward per tensor and candidate (`--direct all`), or at anchor candidates
  (and every float-mode candidate) with the other affine ones scaled by the tensor's
  activation-weighted quantization error (`--direct anchors`).
  The inputs of every decoder layer are cached from one base pass, so perturbing a tensor of layer i
  re-runs layers i.. only (layers below are pass-through stubs; the model's own mask/rope code runs
  unchanged). Large vocabularies (> VOCAB_FULL_MAX) use the union of the base's top-TOPK tokens as
  the support (`--full-vocab` to turn off). The KLD itself is perplexity.py's (`_kld_rows`).

Quantization method (`--method rtn | gptq | awq | awq+gptq`, default rtn): the perturbed tensor is what `mixq
convert --method` of that spec stores. rtn: round to nearest (quant.quantize.round_trip). gptq: tune/gptq.py's GPTQ
with the Hessian of that tensor's inputs in the unquantized model (decoder layers' linears; the output head, or with
tied embeddings the embedding, from the final norm's outputs), as convert applies it, affine and float-mode
candidates alike, on convert's calibration text (`--method-calib FILE --method-calib-samples N --method-calib-len
L`, convert's defaults) less every window that shares a token with the measured windows: fitted on the scored tokens
themselves, GPTQ looked ~3x better than the quant convert makes (a plan on it lost to the rtn plan); tensors convert
leaves round-to-nearest under gptq (an untied embedding) are measured so here too. The plan then allocates bits for
the quant that will be made (`mixq plan --method gptq` writes `method = "gptq"`).
awq: tune/awq.py's `awq_round_trip`, the tensor as if alone in its group: its own scale searched on its inputs' Hessian
and mean |x| (not the one q/k/v or gate/up share in convert), the clipping search, read back divided by the scale
(the fold's 1/s taken exactly: the norm's rounding to its stored dtype and the change of v_proj's rows by o_proj's
scale are left out); the head and linears with no op before them by shape (o_proj under grouped-query attention)
get the clipping search alone, as convert gives them. awq+gptq: the same scale search, the scale kept only where
GPTQ's error is lower with it (as convert decides per group), then GPTQ on the scaled weight under the scaled Hessian;
unscaled tensors get GPTQ alone.

Calibration text (tune/calib.py `tail_windows`): by default the *end* of WikiText-2's test file
(perplexity.default_text_file): the last `--tokens // --ctx` of the consecutive `--ctx`-token windows
perplexity.make_windows cuts
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
import sys
import time
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

from mixq.errors import MixqError
from mixq.eval.engine import add_device_arguments, device_options, load_model, peak_memory_line, resolve_device
from mixq.eval.head import output_head
from mixq.eval.perplexity import _kld_rows
from mixq.io.files import write_atomic
from mixq.quant.prepare import prepare
from mixq.quant.quantize import round_trip
from mixq.quant.recipe import uniform_recipe
from mixq.quant.spec import FLOAT_MODES, Spec
from mixq.quant.tensors import layer_index, module_path
from mixq.threads import available_cores, torch_threads
from mixq.tune.awq import awq_round_trip, scalable
from mixq.tune.calib import CalibConfig, add_calib_arguments, calib_config, calibration, tail_windows, without_span
from mixq.tune.gptq import gptq_round_trip

FORMAT = "mixq-measurement/1"
# What a damage means changed (a file of an older revision is not resumed, nor reused by `mixq plan`'s cache):
# 2: gptq/awq fitted on convert's calibration text, not the measured windows, and applied to float-mode candidates
# 3: gptq and awq+gptq search each group's range (tune/gptq.py CLIP, convert's default)
REVISION = 3
VOCAB_FULL_MAX = 65536
TOPK = 32
DEFAULT_ANCHORS = (Spec(4, 64), Spec(6, 64))
DEFAULT_MODES = ("mxfp4", "nvfp4", "mxfp8")
QUANT_METHODS = ("rtn", "gptq", "awq", "awq+gptq")     # how a candidate is quantized (convert's --method)
ESTIMATORS = ("fisher", "direct")   # how its damage is measured


def spec_key(bits: int, group_size: int, mode: str = "affine") -> str:
    """A candidate's key in a measurement: "bits:group" (affine) or the float mode's name."""
    return f"{bits}:{group_size}" if mode == "affine" else mode


def key_of(spec: Spec) -> str:
    return spec_key(spec.bits, spec.group_size, spec.mode)


def parse_key(key: str) -> Spec:
    """The candidate spec of a measurement key ("4:64" -> 4-bit g64 affine, "mxfp4" -> mxfp4)."""
    if key in FLOAT_MODES:
        return Spec(*FLOAT_MODES[key], key)
    try:
        b, g = key.split(":")
        return Spec(int(b), int(g))
    except ValueError:
        raise MixqError(f"measurement candidate {key!r} is neither bits:group nor a mode "
                        f"({', '.join(FLOAT_MODES)})") from None


def as_spec(c) -> Spec:
    """A candidate given as a Spec or a (bits, group_size[, mode]) tuple."""
    return c if isinstance(c, Spec) else Spec(*c)


# ---------------------------------------------------------------------------------------------
# The model-side machinery


def method_round_trip(w: torch.Tensor, spec: Spec, name: str, H=None, mean_abs=None,
                      quant: str = "gptq") -> torch.Tensor:
    """What convert stores of `w` (in its stored dtype) under `spec` (affine or a float mode), read back: when an
    input Hessian `H` is given, GPTQ's (`quant` "gptq") or AWQ's (`quant` "awq" / "awq+gptq": tune/awq.py
    `awq_round_trip`, scaled when the inputs' `mean_abs` is given), else round to nearest's."""
    if H is not None:
        if quant in ("awq", "awq+gptq"):
            m = None if mean_abs is None else mean_abs.to(torch.float32)
            return awq_round_trip(w, H.to(torch.float32), spec, m, then_gptq=quant == "awq+gptq")
        return gptq_round_trip(w, H.to(torch.float32), spec)
    return round_trip(w, spec, name)


def quant_inputs(quant: str, hessians: dict, means: dict, heads: set[str], name: str) -> tuple:
    """(H, mean |x|) that `method_round_trip` takes for tensor `name` under `quant`: (None, None) for rtn; the mean
    only for awq / awq+gptq and a linear AWQ can scale (`means` holds only those: `awq_means`)."""
    if quant == "rtn":
        return None, None
    H = tensor_hessian(hessians, heads, name)
    return H, (means.get(module_path(name)) if quant.startswith("awq") and H is not None else None)


def awq_means(model, sums: dict, tokens: int) -> dict:
    """module path -> mean |x| of the inputs (from their sums over `tokens`) of the decoder linears AWQ can scale
    (tune/awq.py `scalable`)."""
    mods = dict(model.named_modules())
    ok = scalable({k: mods[k] for k in sums})
    return {k: v / tokens for k, v in sums.items() if k in ok}


def head_names(model) -> set[str]:
    """Parameter names of the output head's weight (with tied embeddings: the embedding's name)."""
    out = model.get_output_embeddings()
    if out is None:
        return set()
    ptr = out.weight.data_ptr()
    return {n for n, p in model.named_parameters(remove_duplicate=False) if p.data_ptr() == ptr}


def tensor_hessian(hessians: dict, heads: set[str], name: str):
    """The input Hessian GPTQ uses for tensor `name` (its linear's; the head's, "__final__"), or None (RTN)."""
    h = hessians.get(module_path(name))
    if h is None and name in heads:
        h = hessians.get("__final__")
    return h


def input_hessians(model, ids, abs_sums: dict | None = None) -> dict:
    """module path -> X^T X / tokens (float64) of the inputs of every decoder layer's linear, and "__final__": of
    the output head's inputs (the final hidden states), over the windows `ids` (one forward per window).
    `abs_sums`: filled with module path -> sum of |x| per input channel (float64) too."""
    inner = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    grams: dict = {}
    handles = [mod.register_forward_pre_hook(partial(_add_gram, grams, name, abs_sums=abs_sums))
               for name, mod in model.named_modules()
               if isinstance(mod, torch.nn.Linear) and layer_index(name) is not None]
    try:
        with torch.no_grad():
            for row in ids:
                hidden = inner(input_ids=row[None], use_cache=False).last_hidden_state
                flat = hidden.reshape(-1, hidden.shape[-1]).double()
                grams["__final__"] = grams.get("__final__", 0) + flat.T @ flat
    finally:
        for h in handles:
            h.remove()
    return {k: v.cpu() / ids.numel() for k, v in grams.items()}


def calibrated_inputs(model, quant: str, ids) -> tuple[dict, dict]:
    """(input Hessians, awq's mean |x|) of the unquantized `model` on the windows `ids`: what `quant` (gptq, awq)
    quantizes each tensor with."""
    sums: dict | None = {} if quant.startswith("awq") else None
    hess = input_hessians(model, ids, sums)
    return hess, awq_means(model, sums or {}, ids.numel())


def _check_method_inputs(quant: str, method_inputs) -> None:
    if quant != "rtn" and method_inputs is None:
        raise ValueError(f"quant {quant!r} needs method_inputs (calibrated_inputs of text apart from the measured "
                         "windows)")


def apply_round_trips(model, plan, originals: dict, cache: dict | None = None) -> None:
    """Set every planned tensor of `model` to what the plan stores, read back: quantized ones to their round trip
    from the stored dtype, kept ones cast to the stored dtype and back (`originals`: name -> source tensor;
    `cache`: (name, spec) -> round trip, shared across plans)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for tp in plan.tensors:
            if tp.name not in params:
                continue
            w = originals[tp.name]
            stored = w.to(getattr(torch, tp.dtype))
            if tp.spec is None:
                params[tp.name].copy_(stored.to(w.dtype))
                continue
            key = (tp.name, tp.spec)
            deq = cache.get(key) if cache is not None else None
            if deq is None:
                deq = round_trip(stored, tp.spec, tp.name)
                if cache is not None:
                    cache[key] = deq
            params[tp.name].copy_(deq.to(w.dtype))


def _parameters(model, names) -> dict:
    """name -> parameter of `model` for every name; a user error for the first one the model lacks."""
    params = dict(model.named_parameters())
    for name in names:
        if name not in params:
            raise MixqError(f"tensor {name}: not a parameter of the loaded model; `mixq measure` supports dense "
                            f"architectures whose MLX and Hugging Face tensor names agree")
    return {name: params[name] for name in names}


class _Stub(torch.nn.Module):
    """Stand-in for a decoder layer below the one being perturbed: returns a cached tensor or its input."""

    def __init__(self, cached=None):
        super().__init__()
        self.cached = cached

    def forward(self, hidden_states=None, *args, **kwargs):
        if hidden_states is None:
            hidden_states = kwargs.get("hidden_states")
        return self.cached if self.cached is not None else hidden_states


def _lse(logits):
    return torch.cat([torch.logsumexp(c.double(), dim=-1) for c in logits.split(256)])


def _save_input(store: dict, key, module, args, kwargs=None) -> None:
    """Forward pre-hook (bound with functools.partial): keep a copy of the module's hidden-state input."""
    hs = args[0] if args else kwargs["hidden_states"]
    store[key] = hs.detach().clone()


def _add_gram(store: dict, key, module, args, abs_sums: dict | None = None) -> None:
    """Forward pre-hook (bound with functools.partial): accumulate X^T X of the module's input in float64 (and,
    into `abs_sums`, the sum of |x| per channel)."""
    x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
    store[key] = store[key] + x.T @ x if key in store else x.T @ x
    if abs_sums is not None:
        abs_sums[key] = abs_sums.get(key, 0) + x.abs().sum(0)


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

    def __init__(self, model, input_ids, *, full_vocab: bool = False, topk: int = TOPK, hessians: bool = True,
                 quant: str = "rtn", method_inputs: tuple[dict, dict] | None = None):
        """`method_inputs`: (Hessians, mean |x|) a calibrated `quant` quantizes with (`calibrated_inputs` of text
        apart from `input_ids`: never the measured windows themselves); needed unless `quant` is rtn."""
        _check_method_inputs(quant, method_inputs)
        self.model = model
        self.quant = quant
        model.requires_grad_(False)
        self.inner = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        self.layers = self.inner.layers
        self.n_layers = len(self.layers)
        self.head = output_head(model)
        if self.head is None:
            raise MixqError("`mixq measure` needs a model with a linear output head (lm_head)")
        self.params = dict(model.named_parameters())
        self.modules = dict(model.named_modules())
        self.cal = self._calibrate(input_ids, full_vocab, topk, hessians)
        self.heads = head_names(model)
        self.method_inputs = method_inputs or ({}, {})

    def round_trip(self, name: str, w, spec: Spec):
        """`w` (stored dtype) as convert stores it under `spec` with this measurement's quantization method."""
        H, mean_abs = quant_inputs(self.quant, *self.method_inputs, self.heads, name)
        return method_round_trip(w, spec, name, H, mean_abs, self.quant)

    # -- base pass ----------------------------------------------------------------------------
    def _base_pass(self, input_ids, want_h: bool):
        """(input of every decoder layer and of the final norm, X^T X sums of the layers' linear inputs, last
        hidden state) of one unperturbed forward."""
        inputs: dict[int, torch.Tensor] = {}
        grams: dict[str, torch.Tensor] = {}
        handles = [layer.register_forward_pre_hook(partial(_save_input, inputs, i), with_kwargs=True)
                   for i, layer in enumerate(self.layers)]
        handles.append(self.inner.norm.register_forward_pre_hook(partial(_save_input, inputs, self.n_layers)))
        if want_h:
            handles += [mod.register_forward_pre_hook(partial(_add_gram, grams, name))
                        for name, mod in self.modules.items()
                        if isinstance(mod, torch.nn.Linear) and layer_index(name) is not None]
        try:
            with torch.no_grad():
                hidden = self.inner(input_ids=input_ids, use_cache=False).last_hidden_state
        finally:
            for h in handles:
                h.remove()
        return [inputs[i] for i in range(self.n_layers + 1)], grams, hidden

    def _calibrate(self, input_ids, full_vocab, topk, want_h) -> Calibrated:
        layer_inputs, grams, hidden = self._base_pass(input_ids, want_h)
        ntok = input_ids.numel()
        hess = {k: v / ntok for k, v in grams.items()}
        flat = hidden.reshape(-1, hidden.shape[-1]).double()
        hess["__final__"] = (flat.T @ flat) / ntok
        vocab = None
        full = self.head.logits(hidden[:, :-1].reshape(-1, hidden.shape[-1]))
        if not full_vocab and full.shape[-1] > VOCAB_FULL_MAX:
            vocab = torch.unique(full.topk(topk, dim=-1).indices.reshape(-1))
            full = full[:, vocab]
        counts = torch.bincount(input_ids.reshape(-1), minlength=self.head.vocab_size).double()
        return Calibrated(input_ids, layer_inputs, vocab, (full, _lse(full)), hess, counts)

    # -- perturbed passes ---------------------------------------------------------------------
    def start_layer(self, name: str) -> int:
        """The first decoder layer whose output a change of `name` can affect."""
        i = layer_index(name)
        if i is not None:
            return i
        if name.endswith("embed_tokens.weight") or "embed" in name:
            return 0
        return self.n_layers  # output head (untied lm_head) or final norm: only the head re-runs

    def forward_from(self, start: int):
        """(logits over the vocabulary subset at the scored positions, their lse), re-running decoder
        layers start.. on the cached inputs."""
        saved = []
        try:
            for j in range(start):
                saved.append(self.layers[j])
                self.layers[j] = _Stub(self.cal.layer_inputs[start] if j == start - 1 else None)
            with torch.no_grad():
                hidden = self.inner(input_ids=self.cal.input_ids, use_cache=False).last_hidden_state
                logits = self.head.logits(hidden[:, :-1].reshape(-1, hidden.shape[-1]), rows=self.cal.vocab)
                return logits, _lse(logits)
        finally:
            for j, layer in enumerate(saved):
                self.layers[j] = layer

    def kld(self, out) -> float:
        """Mean per-token KL(base || perturbed) over the scored calibration tokens (perplexity's KLD)."""

        (b, b_lse), (q, q_lse) = self.cal.base_logp, out
        kl, _ = _kld_rows(q, q_lse, b, b_lse, None)
        return float(kl.clamp_min(0).mean())

    def damage(self, name: str, src_dtype, bits: int, group_size: int, mode: str = "affine") -> tuple[float, float]:
        """(KLD with `name` quantized to (bits, group_size, mode), proxy error tr(dW H dW^T)); weights restored
        after."""
        p = self.params[name]
        orig = p.data.clone()
        try:
            deq = self.round_trip(name, orig.to(src_dtype), Spec(bits, group_size, mode))
            p.data.copy_(deq.to(p.dtype))
            d = self.kld(self.forward_from(self.start_layer(name)))
            err = self.proxy_error(name, (deq.to(torch.float64) - orig.to(torch.float64)))
        finally:
            p.data.copy_(orig)
        return d, err

    def proxy_only(self, name: str, src_dtype, bits: int, group_size: int, mode: str = "affine") -> float:
        """The proxy error of `name` quantized to (bits, group_size, mode), without a forward pass."""
        orig = self.params[name].data
        deq = self.round_trip(name, orig.to(src_dtype), Spec(bits, group_size, mode))
        return self.proxy_error(name, deq.to(torch.float64) - orig.to(torch.float64))

    def proxy_error(self, name: str, dw) -> float:
        """Activation-weighted quantization error of tensor `name` for weight change dw."""
        h = self.cal.hessians.get(module_path(name))
        if h is None and dw.shape[-1] == self.cal.hessians["__final__"].shape[0] and \
                self.head.weight.data_ptr() == self.params[name].data_ptr():
            h = self.cal.hessians["__final__"]    # tied embedding: its output-head role dominates
        if h is None and "embed" in name:          # untied input embedding: rows weighted by token counts
            c = self.cal.token_counts[: dw.shape[0]]
            return float(((dw * dw).sum(-1) * (c + 1e-3)).sum() / c.sum())
        if h is None:
            return float((dw * dw).sum())
        return float(((dw @ h) * dw).sum())


# ---------------------------------------------------------------------------------------------
# Measurement over a model


def candidate_table(prep, specs) -> dict[str, tuple[str, list[Spec]]]:
    """name -> (stored dtype, candidate Specs): for each candidate (a Spec or a (bits, group_size) tuple),
    what quant.plan.plan_model assigns under a uniform recipe of that spec (tensors it never quantizes drop
    out; forced specs, e.g. 8-bit MoE routers, replace the candidate)."""

    out: dict[str, tuple[str, list]] = {}
    for spec in map(as_spec, specs):
        for tp in prep.plan_with(uniform_recipe(spec.bits, spec.group_size, spec.mode)).quantized:
            entry = out.setdefault(tp.name, (tp.dtype, []))
            if tp.spec not in entry[1]:
                entry[1].append(tp.spec)
    return out


# Settings a resumed measurement must share with the file it continues.
_RESUME_KEYS = ("model", "candidates", "calib", "method", "draws", "direct", "anchors", "vocab", "quant_method",
                "method_calib", "revision")
_RESUME_DEFAULTS = {"quant_method": "rtn", "revision": 1}   # files written before the key existed


class MeasurementFile:
    """A measurement document and its file: opened new or resumed, rewritten atomically by `save`."""

    def __init__(self, path, header: dict, resume: bool):
        self.path = Path(path)
        self.doc = None
        if self.path.exists():
            if not resume:
                raise MixqError(f"{self.path} exists; pass --resume to continue it, or remove it")
            self.doc = load_measurement(self.path)
            for k in _RESUME_KEYS:
                if self.doc.get(k, _RESUME_DEFAULTS.get(k)) != header.get(k):
                    raise MixqError(f"{self.path} was measured with another {k} ({self.doc.get(k)!r}, now "
                                    f"{header.get(k)!r}); use another -o file or the same settings")
        if self.doc is None:
            self.doc = {**header, "complete": False, "tensors": {}, "seconds": 0.0}
        self.t0 = time.time()

    def save(self) -> None:
        """Add the seconds spent since the last save, write the file (atomically)."""
        now = time.time()
        self.doc["seconds"] = self.doc.get("seconds", 0.0) + (now - self.t0)
        self.t0 = now
        write_atomic(self.path, json.dumps(self.doc, indent=1))


def _candidate_deltas(params: dict, tensors, progress: bool, inputs=None, quant: str = "rtn") -> dict:
    """name -> every candidate's weight change dequant(quant(W)) - W, stacked (bfloat16: ample for a dot product);
    `inputs(name)`: the (H, mean |x|) `quant` quantizes that tensor with (`quant_inputs`; None: round to nearest)."""
    dws = {}
    for name in tqdm(params, desc="quantize candidates", unit="tensor", disable=not progress, file=sys.stderr,
                     leave=False):
        dtype_name, cands = tensors[name]
        w = params[name].detach()
        H, mean_abs = inputs(name) if inputs is not None else (None, None)
        rows = [(method_round_trip(w.to(getattr(torch, dtype_name)), c, name, H, mean_abs, quant).float() - w.float())
                .reshape(-1).to(torch.bfloat16) for c in cands]
        dws[name] = torch.stack(rows)
    return dws


def _fisher_window(model, ids, params: dict, dws: dict, acc: dict, *, draws: int, generator, bar) -> None:
    """Add one window's squared projections (g . dW)^2 to `acc`, for `draws` label draws from the base."""
    names = list(params)
    logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
    logp = torch.log_softmax(logits, dim=-1)
    probs = logp.detach().exp()
    for d in range(draws):
        y = torch.multinomial(probs.cpu(), 1, generator=generator).to(probs.device)  # the CPU's draws anywhere
        grads = torch.autograd.grad(logp.gather(-1, y).sum(), [params[n] for n in names], retain_graph=d < draws - 1)
        for n, g in zip(names, grads):
            a = (dws[n] @ g.reshape(-1).to(torch.bfloat16).unsqueeze(-1)).squeeze(-1).double()
            acc[n] += (a * a).cpu()
        bar.update(1)


def fisher_estimates(tensors, state: dict, scored_per_window: int, draws: int) -> dict[str, dict[str, float]]:
    """name -> {candidate key: damage} from the accumulated squared projections of a Fisher measurement."""
    scale = 1.0 / (2.0 * scored_per_window * max(int(state["windows_done"]), 1) * draws)
    return {n: {key_of(c): float(v) * scale for c, v in zip(tensors[n][1], sums)}
            for n, sums in state["sums"].items()}


def measure_fisher(model, tensors: dict[str, tuple[str, list[Spec]]], windows, *, out: Path,
                   header: dict, draws: int = 8, seed: int = 0, resume: bool = False, progress: bool = True,
                   quant: str = "rtn", method_inputs: tuple[dict, dict] | None = None) -> dict:
    """Second-order (Fisher) estimate of every tensor's damage for every candidate, all at once; the
    measurement is written to `out` after every window (resumable with `resume=True`).

    KL(p || p_dW) ~= 1/2 dW^T F dW, F the Fisher information of the next-token distributions. With
    labels y_t drawn from the base's own distribution at every position of a window, the gradient
    g = grad sum_t log p_t(y_t) has E[(g . dW)^2] = dW^T F_window dW (cross-position terms vanish),
    so mean (g . dW)^2 / (2 * tokens) is an unbiased estimate of the mean per-token KLD to second
    order. One forward and `draws` backward passes per window give g for every tensor; the dot
    products with every candidate's dW = dequant(quant(W)) - W are cheap. Window i draws its labels
    with seed + i. `method_inputs`: as `Measurer`'s.
    """
    _check_method_inputs(quant, method_inputs)
    mf = MeasurementFile(out, {"format": FORMAT, **header, "method": "fisher", "draws": draws}, resume)
    doc = mf.doc
    if doc.get("complete"):
        return doc
    params = _parameters(model, tensors)
    inputs = None if quant == "rtn" else partial(quant_inputs, quant, *method_inputs, head_names(model))
    dws = _candidate_deltas(params, tensors, progress, inputs, quant)
    state = doc.get("fisher_state") or {"windows_done": 0, "sums": {}}
    acc = {n: torch.tensor(state["sums"].get(n) or [0.0] * len(tensors[n][1]), dtype=torch.float64) for n in params}
    n_win, ctx = windows.ids.shape
    done = int(state["windows_done"])
    bar = tqdm(total=n_win * draws, initial=done * draws, desc="measure (fisher)", unit="sample",
               disable=not progress, file=sys.stderr, dynamic_ncols=True)
    model.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    try:
        for wi in range(done, n_win):
            _fisher_window(model, windows.ids[wi:wi + 1], params, dws, acc, draws=draws,
                           generator=torch.Generator().manual_seed(seed + wi), bar=bar)
            state = {"windows_done": wi + 1, "sums": {n: acc[n].tolist() for n in params}}
            damages = fisher_estimates(tensors, state, ctx - 1, draws)
            doc["fisher_state"] = state
            doc["tensors"] = {n: {"shape": list(params[n].shape), "dtype": tensors[n][0], "damage": damages[n]}
                              for n in damages}
            doc["windows_done"] = wi + 1
            doc["complete"] = wi + 1 >= n_win
            mf.save()
    finally:
        bar.close()
        model.requires_grad_(False)
    return doc


def _direct_choices(cands, direct: str, anchors) -> list[Spec]:
    """The candidates measured by a perturbed forward: all, or the anchors (else the affine one nearest 4 bits)
    and every float-mode candidate (their error is not the affine law the proxy scaling assumes)."""
    if direct == "all":
        return list(cands)
    anchors = [as_spec(a) for a in anchors]
    affine = [c for c in cands if c.mode == "affine"]
    chosen = [c for c in anchors if c in cands] or \
        ([min(affine, key=lambda c: (abs(c.bits - 4), c.group_size))] if affine else [])
    return chosen + [c for c in cands if c.mode != "affine" and c not in chosen]


def _direct_record(m: Measurer, name: str, dtype_name: str, cands, chosen, bar) -> dict:
    """One tensor's measurement: the chosen candidates by a perturbed forward, the others from the proxy."""
    src_dtype = getattr(torch, dtype_name)
    rec = {"shape": list(m.params[name].shape), "dtype": dtype_name, "damage": {}, "proxy": {}, "direct": []}
    for c in cands:
        key = key_of(c)
        if c in chosen:
            rec["damage"][key], rec["proxy"][key] = m.damage(name, src_dtype, c.bits, c.group_size, c.mode)
            rec["direct"].append(key)
            bar.update(1)
        else:
            rec["proxy"][key] = m.proxy_only(name, src_dtype, c.bits, c.group_size, c.mode)
    if len(rec["direct"]) < len(cands):
        _fill_from_proxy(rec)
    return rec


def measure_direct(model, tensors: dict[str, tuple[str, list[Spec]]], windows, *, out: Path,
                   header: dict, direct: str = "anchors", anchors=DEFAULT_ANCHORS, full_vocab: bool = False,
                   resume: bool = False, progress: bool = True, quant: str = "rtn",
                   method_inputs: tuple[dict, dict] | None = None) -> dict:
    """Each tensor's damage by perturbed forwards (all candidates, or the anchors with the others scaled by
    the proxy error); the measurement is written to `out` after every tensor (resumable with `resume=True`)."""
    header = {"format": FORMAT, **header, "method": "direct", "direct": direct,
              "anchors": [key_of(as_spec(a)) for a in anchors] if direct != "all" else None,
              "vocab": "full" if full_vocab else f"top{TOPK}-union if V>{VOCAB_FULL_MAX}"}
    mf = MeasurementFile(out, header, resume)
    doc = mf.doc
    todo = [n for n in tensors if n not in doc["tensors"]]
    if not todo:
        doc["complete"] = True
        return doc
    _parameters(model, todo)
    m = Measurer(model, windows.ids, full_vocab=full_vocab, quant=quant, method_inputs=method_inputs)
    doc["vocab_subset_size"] = None if m.cal.vocab is None else int(m.cal.vocab.numel())
    chosen = {n: _direct_choices(tensors[n][1], direct, anchors) for n in todo}
    bar = tqdm(total=sum(map(len, chosen.values())), desc="measure (direct)", unit="fwd", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)
    try:
        for name in todo:
            dtype_name, cands = tensors[name]
            doc["tensors"][name] = _direct_record(m, name, dtype_name, cands, chosen[name], bar)
            doc["complete"] = len(doc["tensors"]) >= len(tensors)
            mf.save()
    finally:
        bar.close()
    return doc


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


def smoothed_damages(doc: dict) -> dict[str, dict[str, float]]:
    """Per-candidate damages with the sampling noise of a Fisher measurement pooled away.

    Uniform quantization's error variance scales as step^2 = (range / (2^bits - 1))^2, and a small
    damage is quadratic in the error, so per tensor and group size d(bits) = c / (2^bits - 1)^2.
    c is fitted per (tensor, group size) from all measured bit widths (mean of d * (2^bits - 1)^2),
    which pools their samples; a smaller group never gets a larger c than a bigger one. The float modes
    follow no such law (their step grows with the value): their estimates are kept as measured.
    """
    out = {}
    for name, rec in doc["tensors"].items():
        by_group: dict[int, list[float]] = {}
        for key, d in rec["damage"].items():
            spec = parse_key(key)
            if spec.mode == "affine":
                by_group.setdefault(spec.group_size, []).append(d * (2 ** spec.bits - 1) ** 2)
        c = {g: sum(v) / len(v) for g, v in by_group.items()}
        prev = None
        for g in sorted(c):
            if prev is not None and c[g] < c[prev]:  # pool the violators
                c[g] = c[prev] = (c[g] + c[prev]) / 2
            prev = g
        out[name] = {}
        for key, d in rec["damage"].items():
            spec = parse_key(key)
            out[name][key] = c[spec.group_size] / (2 ** spec.bits - 1) ** 2 if spec.mode == "affine" else d
    return out


def measurement_damages(doc: dict) -> dict[str, dict[str, float]]:
    """The per-candidate damages allocation works with: smoothed (a Fisher measurement) or as measured (direct)."""
    if doc.get("method") == "fisher":
        return smoothed_damages(doc)
    return {name: rec["damage"] for name, rec in doc["tensors"].items()}


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


def measure(ref: str, *, levels=(3, 4, 5, 6, 8), group_sizes=(32, 64), modes=DEFAULT_MODES, calib=None,
            tokens: int = 1024, ctx: int = 256, out, resume: bool = False, method: str = "fisher", draws: int = 8,
            direct: str = "anchors", full_vocab: bool = False, progress: bool = True,
            only: list[str] | None = None, device: str = "cpu", max_memory: int | None = None,
            quant: str = "rtn", method_calib: CalibConfig | None = None) -> dict:
    """`mixq measure`: load `ref` (float32, on `device`), measure every quantizable tensor under every candidate
    (affine levels x group sizes, plus the float `modes`) quantized with `quant` (rtn | gptq | awq | awq+gptq), write
    `out`.
    `method`: the estimator (fisher | direct). `method_calib`: the calibration text gptq / awq quantize with (convert's
    default), less any window that overlaps the measured ones. Float32 on every device: the damages compared are far
    smaller than bfloat16's rounding."""
    device = resolve_device(device)
    if device == "mps":
        raise MixqError("--device mps: measure sums in float64, which MPS lacks; use --device cpu")
    if method not in ESTIMATORS:
        raise MixqError(f"unknown measurement estimator {method!r}: use fisher or direct")
    if quant not in QUANT_METHODS:
        raise MixqError(f"--method {quant!r}: measure knows the quantization methods {', '.join(QUANT_METHODS)}")
    method_calib = method_calib or CalibConfig()
    method_calib.check("method-")
    if isinstance(ctx, bool) or not isinstance(ctx, int) or ctx < 2:
        raise MixqError(f"--ctx {ctx!r}: must be 2 or more tokens")
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < ctx:
        raise MixqError(f"--tokens {tokens!r}: must be at least one window of --ctx {ctx} tokens")
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise MixqError(f"--draws {draws!r}: must be a positive number of label draws")
    if not levels or not group_sizes:
        raise MixqError("--levels and --group-sizes need at least one value each")
    bad = [m for m in modes if m not in FLOAT_MODES]
    if bad:
        raise MixqError(f"--modes: {bad[0]!r} is not a float mode; use some of {', '.join(FLOAT_MODES)} (or none)")
    specs = [Spec(b, g) for b in levels for g in group_sizes] + [Spec(*FLOAT_MODES[m], m) for m in modes]
    prep = prepare(ref, uniform_recipe(specs[0].bits, specs[0].group_size))
    table = candidate_table(prep, specs)
    if only:
        table = {k: v for k, v in table.items() if k in set(only)}
    if not table:
        raise MixqError(f"{ref}: no tensor can be quantized with {specs}")
    with torch_threads(available_cores(), at_most=True):
        lm = load_model(ref, dtype="float32", progress=progress, device=device, max_memory=max_memory)
        windows, calib_info = tail_windows(lm.tokenizer, calib, n_tokens=tokens, ctx=ctx)
        windows = replace(windows, ids=windows.ids.to(lm.model.device))
        by = "" if quant == "rtn" else f" by {quant}"
        header = {"model": str(ref), "source": str(prep.path), "candidates": [key_of(c) for c in specs],
                  "calib": calib_info, "quant_method": quant, "revision": REVISION,
                  "metric": f"mean per-token KL(base || one tensor quantized{by}), nats"}
        inputs = None
        if quant != "rtn":
            inputs, header["method_calib"] = _method_inputs(lm, quant, method_calib, calib_info)
        if method == "fisher":
            return measure_fisher(lm.model, table, windows, out=out, header=header, draws=draws, resume=resume,
                                  progress=progress, quant=quant, method_inputs=inputs)
        return measure_direct(lm.model, table, windows, out=out, header=header, direct=direct,
                              full_vocab=full_vocab, resume=resume, progress=progress, quant=quant,
                              method_inputs=inputs)


def _method_inputs(lm, quant: str, cfg: CalibConfig, measured: dict) -> tuple[tuple[dict, dict], dict]:
    """((Hessians, mean |x|) of the calibration `cfg` that `quant` quantizes with, less the windows that share a
    token with the `measured` ones (tail_windows' info), its provenance). GPTQ fitted to the very tokens its damage
    is measured on would look far better than the quant convert makes."""
    start = measured["first_window"] * measured["ctx"]
    end = start + measured["n_windows"] * measured["ctx"]
    cal = without_span(calibration(lm.tokenizer, cfg), measured["file"], start, end)
    return calibrated_inputs(lm.model, quant, cal.ids.to(lm.model.device)), cal.info


def _ints(s: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in s.split(",") if x.strip())
    except ValueError:
        raise MixqError(f"expected a comma-separated list of integers, got {s!r}") from None


def add_arguments(p) -> None:
    p.add_argument("model", help="model to measure: HF folder, .gguf, or embedded name (e.g. smollm2-135m)")
    p.add_argument("--levels", default="3,4,5,6,8", help="candidate bit widths (default 3,4,5,6,8)")
    p.add_argument("--group-sizes", default="32,64", help="candidate group sizes (default 32,64)")
    p.add_argument("--modes", default=",".join(DEFAULT_MODES),
                   help=f"float-mode candidates, each with its fixed bits/group (default {','.join(DEFAULT_MODES)}; "
                        "none: affine only)")
    p.add_argument("--calib", default=None, help="calibration text file (default: the end of WikiText-2 test)")
    p.add_argument("--tokens", type=int, default=1024, help="calibration tokens (default 1024)")
    p.add_argument("--ctx", type=int, default=256, help="calibration window length (default 256)")
    add_method_argument(p)
    add_calib_arguments(p, prefix="method-", what="gptq/awq/awq+gptq calibration")
    p.add_argument("--estimator", choices=ESTIMATORS, default=None,
                   help="fisher (default): second-order estimate from sampled-label gradients, all tensors and "
                        "candidates at once; direct: one forward per tensor and candidate")
    p.add_argument("--draws", type=int, default=8, help="fisher: label draws per window (default 8)")
    p.add_argument("--direct", choices=("anchors", "all"), default="anchors",
                   help="direct: measure every candidate (all) or the anchors 4:64, 6:64 and the float modes "
                        "and scale the other affine ones by each tensor's activation-weighted quantization "
                        "error (anchors)")
    p.add_argument("--full-vocab", action="store_true", help="exact KLD over the whole vocabulary (slower for "
                                                              "large vocabularies)")
    p.add_argument("-o", "--output", required=True, help="measurement file to write (JSON)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted measurement in the same file")
    add_device_arguments(p, dtype=False)


def add_method_argument(p) -> None:
    p.add_argument("--method", choices=QUANT_METHODS + ESTIMATORS, default=None,
                   help="quantization method the damages are measured under, as `mixq convert --method` makes the "
                        "quant: rtn (default), gptq, awq or awq+gptq (fisher / direct: the --estimator, as before)")


def method_options(args) -> tuple[str, str]:
    """(quantization method, estimator) of --method / --estimator (--method fisher|direct: the estimator)."""
    method, estimator = args.method, getattr(args, "estimator", None)
    if method in ESTIMATORS:
        if estimator not in (None, method):
            raise MixqError(f"--method {method} and --estimator {estimator}: give the estimator once")
        return "rtn", method
    return method or "rtn", estimator or "fisher"


def cli(args) -> int:
    opts = device_options(args, dtype=False)
    quant, estimator = method_options(args)
    levels, groups = _ints(args.levels), _ints(args.group_sizes)
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip() and m.strip() != "none")
    doc = measure(args.model, levels=levels, group_sizes=groups, modes=modes, calib=args.calib, tokens=args.tokens,
                  ctx=args.ctx, out=Path(args.output), resume=args.resume, method=estimator,
                  draws=args.draws, direct=args.direct, full_vocab=args.full_vocab, device=opts.device,
                  max_memory=opts.max_memory, quant=quant, method_calib=calib_config(args, prefix="method-"))
    print(f"measured {len(doc['tensors'])} tensors x {len(doc['candidates'])} candidates in "
          f"{doc.get('seconds', 0):.0f}s -> {args.output}")
    print(peak_memory_line())
    return 0

"""Perplexity and KL divergence against a cached base, on fixed text windows.

Definition (used for both perplexity and KLD):
* The text file is tokenized once, as a whole, without special tokens (no BOS is added).
* The token stream is cut into consecutive, non-overlapping windows of `ctx` tokens (stride = ctx;
  the incomplete tail is dropped); `max_windows` keeps the first N, `skip` drops the first ones.
* In every window, each token but the first is scored, conditioned on the tokens before it in the
  same window: `ctx - 1` scored tokens per window (positions 1..ctx-1; the logits of positions
  0..ctx-2 are the only ones computed). Perplexity = exp(mean NLL) over all scored tokens; its
  standard error by the delta method: ppl * sd(NLL) / sqrt(n).

KL divergence, as llama.cpp's `perplexity --kl-divergence` reports it, per scored token:
KL(base || quant), whether both models' argmax agree, and Δp = p_quant(true) - p_base(true).
The base runs once; what KL needs is cached on disk (`$MIXQ_CACHE/kld-base/`, keyed by the base's
identity, the windows' token ids and the form), so each quant then costs one forward pass:
* "exact" (default): the hidden states entering the base's output head ([N, d], float32) plus the
  head itself (stored once per base), the log-sum-exp (float64), the true token's log-prob and the
  argmax. The head reproduces the model's forward logits bit for bit (checked once per model on a
  32-token probe; `torch.equal`), so the KL is exact, at the cost of one more output-head matmul
  per window. Both heads are walked together over slices of 2,048 vocabulary columns
  (`walk_vocab`): no [N, V] block is ever held, so a 262k vocabulary (Gemma 3) costs its matmuls,
  not gigabytes of fresh pages. 64 x 512 tokens of SmolLM2-135M: 75 MB (+113 MB head).
* top-k (`--kld-topk K`, or the automatic fallback for a model whose logits are not its head's
  alone): the top-k logits and ids; KL over the top-k tokens plus one "tail" bucket holding the rest
      KL_k = sum_{i in top-k} p_i (log p_i - log q_i) + P_T (log P_T - log Q_T)
  (P_T, Q_T: base's and quant's mass outside the base's top-k). By the log-sum inequality
  KL_k <= KL; the error is exactly P_T * KL(p|tail || q|tail): zero when the quant keeps the base's
  tail proportions, otherwise it grows with the tail mass, reported as `kld_tail_mass_mean`.
  Measured on SmolLM2-135M (4 x 512 WikiText tokens, qx86-hi and q4-hi): k=256 underestimates the
  mean KLD by 12% (tail mass 0.08), k=1024 by 5%: use it only where exactness does not matter.
* full (k=None): all logits, [N, V] float32: exact, for the few windows of `mixq measure`.
All log-probs are formed in float64 (logit - lse). Top-1 agreement, Δp and the perplexities are
exact in every form. Standard errors are `mixq.eval.metrics`' (sample standard deviation, n - 1;
top-1 agreement's as a proportion).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mixq.errors import MixqError
from mixq.eval.engine import load_model, model_fingerprint
from mixq.eval.head import OutputHead, head_from_state, head_state, output_head, vocab_slices
from mixq.eval.metrics import proportion_stderr, stderr
from mixq.io.files import cache_dir
from mixq.io.memory import trim_heap
from mixq.sources.resolve import ResolvedModel

DEFAULT_CTX = 512
DEFAULT_TOPK = 256
DEFAULT_KLD = "exact"
WIKITEXT_ENV = "MIXQ_WIKITEXT"
_WIKITEXT_REL = Path("shared") / "data" / "wikitext-2-raw" / "wiki.test.raw"
_CACHE_VERSION = 2  # 2: lse, target and argmax from the vocabulary walk


# ---------------------------------------------------------------- text windows

def default_text_file() -> Path:
    """WikiText-2 test: $MIXQ_WIKITEXT, else ../shared/data/wikitext-2-raw/wiki.test.raw near the project."""
    env = os.environ.get(WIKITEXT_ENV)
    if env:
        p = Path(env).expanduser()
        if not p.is_file():
            raise MixqError(f"${WIKITEXT_ENV}={env}: no such file; point it at wiki.test.raw or pass --ppl-file")
        return p
    here = Path(__file__).resolve().parent
    for root in [here.parent, *here.parent.parents, Path.cwd(), *Path.cwd().parents]:
        p = root / _WIKITEXT_REL
        if p.is_file():
            return p
    raise MixqError(f"cannot find {_WIKITEXT_REL} next to the project: pass --ppl-file FILE "
                    f"or set ${WIKITEXT_ENV} to a text file")


@dataclass
class Windows:
    ids: "torch.Tensor"   # noqa: F821  [n, ctx] int64 token ids
    file: str
    ctx: int
    digest: str           # sha256 of the token ids and ctx: the windows' identity
    tokenizer_probe: list | None = None   # the tokenizer's ids for a probe text (checks a base's tokenizer)

    @property
    def n_tokens(self) -> int:
        """Scored tokens: ctx - 1 per window."""
        return int(self.ids.shape[0]) * (self.ctx - 1)

    def subset(self, idx) -> "Windows":
        """The windows at positions `idx` (a list/range), e.g. a few for sensitivity measurement."""
        ids = self.ids[list(idx)]
        return Windows(ids, self.file, self.ctx, _digest(ids, self.ctx), self.tokenizer_probe)


def _digest(ids, ctx: int) -> str:
    h = hashlib.sha256(f"ctx={ctx};".encode())
    h.update(np.ascontiguousarray(ids.numpy().astype(np.int64)).tobytes())
    return h.hexdigest()


def tokenize_file(tokenizer, path: Path) -> "torch.Tensor":  # noqa: F821
    """The whole file as one token-id stream (no special tokens)."""
    import torch
    import transformers

    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise MixqError(f"{path}: cannot read the text file ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise MixqError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); give a plain text file") from None
    if not text.strip():
        raise MixqError(f"{path}: the text file is empty; give a file with text in it")
    verbosity = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()  # "sequence longer than max length" is expected
    try:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    finally:
        transformers.utils.logging.set_verbosity(verbosity)
    return torch.tensor(ids, dtype=torch.long)


def make_windows(tokenizer, text_file: str | Path | None = None, *, ctx: int = DEFAULT_CTX,
                 max_windows: int | None = None, skip: int = 0) -> Windows:
    """Consecutive non-overlapping windows of `ctx` tokens from `text_file` (default: WikiText-2 test)."""
    if ctx < 2:
        raise MixqError(f"context length {ctx} is too small: use --ctx 2 or more (default {DEFAULT_CTX})")
    path = Path(text_file) if text_file else default_text_file()
    if not path.is_file():
        raise MixqError(f"{path}: no such text file for perplexity; pass --ppl-file FILE")
    stream = tokenize_file(tokenizer, path)
    n = stream.numel() // ctx - skip
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 1:
        raise MixqError(f"{path}: {stream.numel()} tokens give no window of {ctx} tokens after skipping {skip}: "
                        "use a longer file or a smaller --ctx")
    ids = stream[skip * ctx:(skip + n) * ctx].view(n, ctx).clone()
    probe = tokenizer(_probe_text(), add_special_tokens=False)["input_ids"]
    return Windows(ids, str(path), ctx, _digest(ids, ctx), list(probe))


# ---------------------------------------------------------------- forward passes

def _window_logits(model, ids):
    """Logits [b*(ctx-1), V] (float32, as the model gives them) at positions 0..ctx-2 of each window,
    and their log-sum-exp [b*(ctx-1)] in float64 (log-probs = logits - lse, formed in float64)."""
    import torch

    ctx = ids.shape[1]
    ids = ids.to(model.device)
    keep = torch.arange(ctx - 1, device=ids.device)
    try:
        logits = model(input_ids=ids, logits_to_keep=keep, use_cache=False).logits
    except TypeError:
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
    logits = logits.float().flatten(0, 1)
    acc = _acc_device(logits.device)
    lse = torch.cat([torch.logsumexp(c.to(acc).double(), dim=-1) for c in logits.split(_ROWS)])  # bounded memory
    return logits, lse


def _acc_device(device):
    """Where the float64 sums run: the model's device, but the CPU for an Apple GPU (MPS has no float64)."""
    import torch

    return torch.device("cpu") if device.type == "mps" else device


_ROWS = 64  # rows per float64 chunk


@dataclass
class VocabWalk:
    """Per row, what one walk over the vocabulary gives (float64 unless said)."""
    lse: "torch.Tensor"           # noqa: F821  log-sum-exp of the logits
    target: "torch.Tensor"        # noqa: F821  the true next token's logit
    top1: "torch.Tensor"          # noqa: F821  int64 argmax (first of ties)
    kl: "torch.Tensor | None"     # noqa: F821  KL(base || model), when a base was walked alongside


def _head_inputs(model, ids):
    """The output head's inputs [b*(ctx-1), d] at positions 0..ctx-2 of each window (on the model's device)."""
    inner = getattr(model, model.base_model_prefix)
    return inner(input_ids=ids.to(model.device), use_cache=False).last_hidden_state[:, :-1].flatten(0, 1)


def walk_vocab(head: OutputHead, h, targets, base_head: OutputHead | None = None, base_h=None,
               base_lse=None) -> VocabWalk:
    """The output head over vocabulary slices, never holding a [rows, V] block: log-sum-exp (online),
    the target's logit and the argmax; with a base (its head, head inputs and log-sum-exp) also
        KL(base || model) = sum_v p_v (b_v - q_v) + (lse_q - lse_b) sum_v p_v,  p_v = exp(b_v - lse_b),
    which is KL's definition with log p = b - lse_b, log q = q - lse_q, summed in float64. Memory and
    time do not depend on the vocabulary held at once: a 262k vocabulary costs what its matmul costs.
    The same slices and calls on the same inputs give bit-identical logits (a model against itself: 0).
    The heads run where `h` is (the base's head and inputs are moved there); the results come back on the CPU.
    """
    import torch

    n, vocab = h.shape[0], head.vocab_size
    f64 = torch.float64
    dev = _acc_device(h.device)
    m = torch.full((n,), -math.inf, dtype=f64, device=dev)  # running max (its index: top1)
    s = torch.zeros(n, dtype=f64, device=dev)
    top1 = torch.zeros(n, dtype=torch.long, device=dev)
    target = torch.zeros(n, dtype=f64, device=dev)
    kl_sum = torch.zeros(n, dtype=f64, device=dev)
    p_sum = torch.zeros(n, dtype=f64, device=dev)
    rows = torch.arange(n, device=dev)
    targets = targets.to(dev)
    if base_head is not None:
        base_head, base_h, base_lse = base_head.to(h.device), base_h.to(h.device), base_lse.to(dev)
    # fixed slices, whatever the rows: the base's logits are recomputed exactly as first computed
    for a, b in vocab_slices(vocab):
        q = head.logits(h, a, b).float().to(dev)
        i = q.argmax(-1)
        v = q[rows, i].double()
        top1 = torch.where(v > m, i + a, top1)
        qd = q.double()
        m_new = torch.maximum(m, v)
        s = s * torch.exp(m - m_new) + torch.exp(qd - m_new[:, None]).sum(-1)
        m = m_new
        inside = (targets >= a) & (targets < b)
        target[inside] = qd[inside, targets[inside] - a]
        if base_head is not None:
            bd = base_head.logits(base_h, a, b).float().to(dev).double()
            p = torch.exp(bd - base_lse[:, None])
            kl_sum += (p * (bd - qd)).sum(-1)
            p_sum += p.sum(-1)
    lse = m + torch.log(s)
    kl = (kl_sum + (lse - base_lse) * p_sum).cpu() if base_head is not None else None
    return VocabWalk(lse.cpu(), target.cpu(), top1.cpu(), kl)


def _logits_walk(logits, lse, targets) -> VocabWalk:
    """What `walk_vocab` gives, from a whole [rows, V] block of logits (a model whose head cannot be walked),
    on the CPU."""
    logits, lse = logits.cpu(), lse.cpu()
    return VocabWalk(lse, logits.gather(-1, targets[:, None])[:, 0].double(), logits.argmax(-1), None)


_WALKABLE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _walkable(model, ids) -> OutputHead | None:
    """The model's output head when its logits are the head's alone (checked once per model, bit for bit
    against its forward on the first 32 tokens of a window: cheap even for a large vocabulary); None otherwise."""
    import torch

    head = output_head(model)
    if model not in _WALKABLE:
        ok = False
        if head is not None:
            try:
                with torch.inference_mode():
                    probe = ids[:1, :32]
                    h = _head_inputs(model, probe)
                    full, _ = _window_logits(model, probe)
                    ok = torch.equal(head.all_logits(h).float(), full)   # slice by slice: never the whole head
            except Exception:  # noqa: BLE001 - a model without the usual decoder layout: walk its full logits
                ok = False
        _WALKABLE[model] = ok
    return head if _WALKABLE[model] else None


def _batches(windows: Windows, batch_size: int, progress: bool, desc: str):
    from tqdm import tqdm

    n = windows.ids.shape[0]
    bar = tqdm(total=n, desc=desc, unit="win", disable=not progress, leave=False)
    for i in range(0, n, batch_size):
        yield windows.ids[i:i + batch_size]
        trim_heap()
        bar.update(min(batch_size, n - i))
    bar.close()


def token_nll(model, windows: Windows, *, batch_size: int = 1, progress: bool = True) -> np.ndarray:
    """Per-token negative log-likelihood (float64, [n_windows * (ctx-1)])."""
    import torch

    out = []
    head = _walkable(model, windows.ids)
    with torch.inference_mode():
        for ids in _batches(windows, batch_size, progress, "ppl"):
            targets = ids[:, 1:].reshape(-1)
            w = (walk_vocab(head, _head_inputs(model, ids), targets) if head is not None
                 else _logits_walk(*_window_logits(model, ids), targets))
            out.append(w.lse - w.target)
    return torch.cat(out).numpy()


def ppl_stats(nll: np.ndarray) -> dict:
    """ppl, its delta-method standard error, mean NLL and token count."""
    n = nll.size
    m = float(nll.mean())
    se = stderr(nll)
    ppl = math.exp(m)
    return {"ppl": ppl, "ppl_stderr": ppl * se, "nll_mean": m, "nll_mean_stderr": se, "n_tokens": int(n)}


LARGE_MODEL_BYTES = 4 << 30   # weights above this: several perplexity windows per forward
BATCH_WINDOWS, BATCH_TOKENS = 4, 4096


def ppl_batch_size(model, ctx: int) -> int:
    """Windows per forward for `perplexity`: 1, or for a model whose weights in memory exceed `LARGE_MODEL_BYTES`
    (packed ones as stored) up to `BATCH_WINDOWS` windows of at most `BATCH_TOKENS` tokens in all, so that each
    layer's weights are read (and dequantized) once per batch, not once per window.

    Batching changes no number of a dense model (measured: tiny llama and gemma3, per-token NLLs identical). In an
    MoE model each expert's matmul then takes the routed tokens of several windows at once, and float32 matmuls of
    other shapes round differently in the last bit: per-token NLLs differ by up to ~3e-7 (tiny gpt_oss, 8 x 128
    tokens; qwen3_moe ~1e-8), the mean NLL by ~1e-9."""
    from mixq.eval.packed import weight_bytes

    if weight_bytes(model) <= LARGE_MODEL_BYTES:
        return 1
    return max(1, min(BATCH_WINDOWS, BATCH_TOKENS // ctx))


def perplexity(model, windows: Windows, *, batch_size: int | None = None, progress: bool = True) -> dict:
    """Perplexity on `windows` (keys of results.json's "ppl", less the timing); `batch_size` windows per forward
    (None: `ppl_batch_size`)."""
    batch_size = batch_size or ppl_batch_size(model, windows.ctx)
    out = ppl_stats(token_nll(model, windows, batch_size=batch_size, progress=progress))
    out.update(ctx=windows.ctx, file=windows.file, n_windows=int(windows.ids.shape[0]))
    return out


# ---------------------------------------------------------------- the base's distributions

@dataclass
class BaseDists:
    """The base model's next-token distributions at every scored token of some windows.

    Three forms: "exact" (the hidden states entering the output head, plus the head: the base's
    logits are recomputed bit-exactly when needed), top-k (logits/ids: [N, k]) or full (logits [N, V]).
    """
    logits: "torch.Tensor | None"   # noqa: F821  [N, k] float32 top-k logits, descending, or [N, V]; None: exact
    ids: "torch.Tensor | None"      # noqa: F821  [N, k] int32 their token ids (None: full vocabulary)
    lse: "torch.Tensor"             # noqa: F821  [N] float64 log-sum-exp over the whole vocabulary
    target_logp: "torch.Tensor"     # noqa: F821  [N] float64 log-prob of the true next token
    top1: "torch.Tensor"            # noqa: F821  [N] int64 argmax
    digest: str                     # the windows' digest
    k: int | str | None             # "exact", the k of top-k, or None (full)
    hidden: "torch.Tensor | None" = None   # noqa: F821  [N, d] the output head's inputs ("exact")
    head: OutputHead | None = None  # the output head ("exact")

    def window_logits(self, sl, n_windows: int):
        """The base's logits (or top-k logits) for rows `sl` spanning `n_windows` windows."""
        if self.hidden is None:
            return self.logits[sl]
        h = self.hidden[sl]
        return self.head.all_logits(h.view(n_windows, -1, h.shape[-1])).float().flatten(0, 1)


def base_dists(model, windows: Windows, *, k: int | str | None = DEFAULT_KLD, batch_size: int = 1,
               progress: bool = True) -> BaseDists:
    """Run the base once over `windows` and keep what KL needs.

    k="exact": the output head's inputs and the head itself (exact; falls back to top-256 logits,
    with a warning, if recomputing the head does not reproduce the model's logits bit for bit);
    k=int: the top-k logits; k=None: all logits (exact, [N, V]: for a few windows only).
    """
    import torch

    exact = k == "exact"
    head = _walkable(model, windows.ids) if exact else None
    if exact and head is None:
        print("mixq: warning: this model's logits are not its output head's alone; "
              f"caching the base's top-{DEFAULT_TOPK} logits instead (KL is then a lower bound)", file=sys.stderr)
        exact, k = False, DEFAULT_TOPK
    logits_out, ids_out, hidden, lses, tgt, top1 = [], [], [], [], [], []
    with torch.inference_mode():
        for w in _batches(windows, batch_size, progress, "kld base"):
            targets = w[:, 1:].reshape(-1)
            if exact:
                h = _head_inputs(model, w)
                walk = walk_vocab(head, h, targets)
                hidden.append(h.to("cpu", copy=True))
            else:
                logits, lse = (t.cpu() for t in _window_logits(model, w))
                walk = _logits_walk(logits, lse, targets)
                if k is None or k >= logits.shape[-1]:
                    logits_out.append(logits)
                else:
                    v, i = logits.topk(k, dim=-1, sorted=True)
                    logits_out.append(v)
                    ids_out.append(i.to(torch.int32))
            lses.append(walk.lse)
            tgt.append(walk.target - walk.lse)
            top1.append(walk.top1)
    return BaseDists(torch.cat(logits_out) if logits_out else None, torch.cat(ids_out) if ids_out else None,
                     torch.cat(lses), torch.cat(tgt), torch.cat(top1), windows.digest,
                     "exact" if exact else (k if ids_out else None),
                     torch.cat(hidden) if exact else None, head if exact else None)


def _save_base(base: BaseDists, path: Path, head_path: Path, meta: dict) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    if base.head is not None and not head_path.exists():
        tmp = head_path.with_name(head_path.name + f".tmp{os.getpid()}")
        torch.save(head_state(base.head), tmp)  # a plain dict (a packed head stays packed): weights_only loads
        os.replace(tmp, head_path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save({"logits": base.logits, "ids": base.ids, "lse": base.lse, "target_logp": base.target_logp,
                "top1": base.top1, "digest": base.digest, "k": base.k, "hidden": base.hidden,
                "meta": meta}, tmp)
    os.replace(tmp, path)


def _load_base(path: Path, head_path: Path) -> BaseDists | None:
    import torch

    try:
        d = torch.load(path, weights_only=True)
        head = None
        if d.get("hidden") is not None:
            head = head_from_state(torch.load(head_path, weights_only=True))
        return BaseDists(d["logits"], d["ids"], d["lse"], d["target_logp"], d["top1"], d["digest"], d["k"],
                         d.get("hidden"), head)
    except Exception:  # noqa: BLE001 - a damaged or partial cache entry is recomputed
        return None


def base_cache_path(base_id: str, windows: Windows, k) -> tuple[Path, Path]:
    """(the base's distributions on these windows, the base's output head) in the cache."""

    key = hashlib.sha256(json.dumps([_CACHE_VERSION, base_id, windows.digest, k]).encode()).hexdigest()[:24]
    d = Path(cache_dir()) / "kld-base"
    return d / f"{key}.pt", d / f"head-{base_id}.pt"


def cached_base_dists(base_ref: str | ResolvedModel, windows: Windows, *, dtype: str = "float32",
                      k: int | str | None = DEFAULT_KLD, batch_size: int = 1, progress: bool = True,
                      base_model=None, device: str = "cpu", max_memory: int | None = None) -> tuple[BaseDists, bool]:
    """The base's distributions on `windows`, from the disk cache or computed (and cached) once.

    `base_ref`: a reference, or the base already resolved. `base_model`: an already loaded
    `LoadedModel` of the base (else it is loaded only on a cache miss, on `device`, within `max_memory`).
    The cache key holds the device (a GPU's numbers are not the CPU's). Returns (dists, hit).
    """
    name = base_ref.ref if isinstance(base_ref, ResolvedModel) else str(base_ref)
    base_id = model_fingerprint(base_ref, dtype=dtype, device=device)
    path, head_path = base_cache_path(base_id, windows, k)
    if path.exists():
        base = _load_base(path, head_path)
        if base is not None and base.digest == windows.digest:
            return base, True
        # damaged or foreign: removed, so that the entry computed now is written in its place (a damaged head
        # kept would make every later run miss the cache and compute the base again)
        path.unlink(missing_ok=True)
        if head_path.exists() and base is None:
            head_path.unlink(missing_ok=True)
    lm = base_model or load_model(base_ref, dtype=dtype, progress=progress, device=device, max_memory=max_memory)
    check = lm.tokenizer(_probe_text(), add_special_tokens=False)["input_ids"]
    if windows.tokenizer_probe is not None and check != windows.tokenizer_probe:
        raise MixqError(f"{name}: its tokenizer differs from the evaluated model's; KLD needs the same vocabulary")
    base = base_dists(lm.model, windows, k=k, batch_size=batch_size, progress=progress)
    _save_base(base, path, head_path, {"base": name, "dtype": dtype, "device": device, "file": windows.file,
                                       "ctx": windows.ctx})
    return base, False


def _probe_text() -> str:
    return "The quick brown fox, 1234 — naïve café! \n\tEnd."


# ---------------------------------------------------------------- KL divergence

@dataclass
class TokenStats:
    """Per scored token, quant vs base (numpy float64 / bool arrays of length N)."""
    kld: np.ndarray
    agree: np.ndarray
    dp: np.ndarray
    nll_quant: np.ndarray
    nll_base: np.ndarray
    tail_mass: np.ndarray


def _kld_rows(q_logits, q_lse, b_logits, b_lse, b_ids):
    """KL(base||quant) per row, in float64, chunked; returns (kl, base tail mass outside its top-k)."""
    import torch

    kls, tails = [], []
    for r in range(0, q_logits.shape[0], _ROWS):
        sl = slice(r, r + _ROWS)
        lp = b_logits[sl].double() - b_lse[sl, None]
        p = lp.exp()
        if b_ids is None:  # full distribution: exact
            lq = q_logits[sl].double() - q_lse[sl, None]
            kls.append((p * (lp - lq)).sum(-1))
            tails.append(torch.zeros(lp.shape[0], dtype=torch.float64))
            continue
        lqk = q_logits[sl].gather(-1, b_ids[sl].long()).double() - q_lse[sl, None]
        head = (p * (lp - lqk)).sum(-1)
        p_tail = (1.0 - p.sum(-1)).clamp_min(0.0)
        q_tail = (1.0 - lqk.exp().sum(-1)).clamp_min(1e-300)
        tail = torch.where(p_tail > 0, p_tail * (p_tail.clamp_min(1e-300).log() - q_tail.log()),
                           torch.zeros_like(p_tail))
        kls.append(head + tail)
        tails.append(p_tail)
    return torch.cat(kls), torch.cat(tails)


def token_stats(model, windows: Windows, base: BaseDists, *, batch_size: int = 1,
                progress: bool = True) -> TokenStats:
    """One forward pass of `model` over `windows`, compared token by token with the cached base."""
    import torch

    if base.digest != windows.digest:
        raise MixqError("the cached base distributions belong to other text windows: recompute them for these")
    kls, agree, dp, nllq, tails = [], [], [], [], []
    row = 0
    head = _walkable(model, windows.ids) if base.hidden is not None else None
    base_head = base.head.to(model.device) if head is not None else None  # moved once, not per window
    with torch.inference_mode():
        for w in _batches(windows, batch_size, progress, "kld"):
            targets = w[:, 1:].reshape(-1)
            sl = slice(row, row + targets.numel())
            if head is not None:  # exact base: walk both heads over the vocabulary together
                walk = walk_vocab(head, _head_inputs(model, w), targets, base_head, base.hidden[sl], base.lse[sl])
                kl, tail = walk.kl, torch.zeros(targets.numel(), dtype=torch.float64)
            else:
                logits, lse = (t.cpu() for t in _window_logits(model, w))
                walk = _logits_walk(logits, lse, targets)
                kl, tail = _kld_rows(logits, lse, base.window_logits(sl, w.shape[0]), base.lse[sl],
                                     None if base.ids is None else base.ids[sl])
            tq = walk.target - walk.lse
            kls.append(kl)
            tails.append(tail)
            agree.append(walk.top1 == base.top1[sl])
            dp.append(tq.exp() - base.target_logp[sl].exp())
            nllq.append(-tq)
            row += targets.numel()
    return TokenStats(torch.cat(kls).numpy(), torch.cat(agree).numpy(), torch.cat(dp).numpy(),
                      torch.cat(nllq).numpy(), -base.target_logp.numpy(), torch.cat(tails).numpy())


def kld_per_token(model, windows: Windows, base: BaseDists, *, batch_size: int = 1) -> np.ndarray:
    """Per-token KL(base||model) only: the cheap call for sensitivity measurement (no progress bar)."""
    return token_stats(model, windows, base, batch_size=batch_size, progress=False).kld


def kld_summary(ts: TokenStats) -> dict:
    """llama.cpp-style statistics under results.json's "kld" keys."""
    n = ts.kld.size
    q = np.percentile(ts.kld, [50, 90, 95, 99, 99.9])
    a = float(ts.agree.mean())
    d = ts.nll_quant - ts.nll_base
    return {
        "n_tokens": int(n),
        "kld_mean": float(ts.kld.mean()), "kld_mean_stderr": stderr(ts.kld),
        "kld_median": float(q[0]), "kld_p90": float(q[1]), "kld_p95": float(q[2]),
        "kld_p99": float(q[3]), "kld_p999": float(q[4]), "kld_max": float(ts.kld.max()),
        "top1_agreement": a, "top1_agreement_stderr": proportion_stderr(int(ts.agree.sum()), n),
        "dp_mean": float(ts.dp.mean()), "dp_mean_stderr": stderr(ts.dp), "dp_rms": float(np.sqrt((ts.dp ** 2).mean())),
        "ln_ppl_ratio": float(d.mean()), "ln_ppl_ratio_stderr": stderr(d),
        "ppl_base": math.exp(float(ts.nll_base.mean())), "ppl_quant": math.exp(float(ts.nll_quant.mean())),
        "kld_tail_mass_mean": float(ts.tail_mass.mean()),
    }

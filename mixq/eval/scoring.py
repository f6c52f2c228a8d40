"""Log-likelihood scoring of multiple-choice documents, exact and fast.

Exact: the requests, their tokenization and the metrics are lm-evaluation-harness's (HF backend):
the context's trailing spaces move onto the continuation, `context + continuation` is encoded as a
whole and split at the length of the separately encoded context, both with the tokenizer's default
special tokens (none when the text already starts with the BOS/prefix token's text); the model
reads `(context + continuation)[:-1]` and each continuation token is scored by the log-softmax of
the logits one position before it.

Fast, by construction:
- A document's sequences share their common token prefix (the question's context; for winogrande
  the sentence up to the blank), so one row holds that prefix once and every choice's remainder
  after it, each remainder attending only to the prefix and to itself (a tree attention mask, with
  each token's true position id). One forward pass scores all choices of a document, and never
  recomputes the context: the same result as a KV cache of the context reused for every choice.
- Vocabulary logits only at the scored positions: the decoder's hidden states are gathered there
  and only those go through the output head. A packed head (dequantized as it runs) runs once per group of
  such chunks of positions, across batches (`HEAD_GROUP_ROWS` positions at once), not once per chunk.
- Several documents share a line (packed longest first into lines of `pack_tokens`, each seeing only
  itself), and lines are batched (bounded by documents and tokens per batch): almost no padding;
  torch uses all cores.
A self-check scores one document of the first batch also the plain way (every choice's full
sequence through the unmodified model) and falls back to plain scoring, with a warning, if the two
disagree (a model whose attention ignores custom masks).
"""

from __future__ import annotations

import sys
from collections import deque
from dataclasses import dataclass, replace
from typing import Iterable, Iterator

from mixq.eval.head import output_head
from mixq.eval.metrics import mean_stderr
from mixq.eval.tasks import Task, get_task, predictions
from mixq.io.memory import trim_heap
from mixq.threads import torch_threads

DEFAULT_BATCH_SIZE = 64      # documents per forward pass at most
# Measured on a 2-core CPU (SmolLM2-135M, 200 documents per task): batches of about 1k tokens keep the
# activations in cache, and short lines waste less attention on other documents' (masked) tokens;
# 256/1024 was 10-15% faster than 512/4096 on hellaswag, piqa, arc_easy and boolq.
DEFAULT_MAX_TOKENS = 1024    # lines x padded length per forward pass at most
DEFAULT_PACK_TOKENS = 256    # documents are packed into lines of this many tokens (or the longest document)
HEAD_CHUNK_ELEMENTS = 1 << 25  # scored positions x vocabulary per chunk of a batch (128 MB of float32 logits)
# A packed head: scored positions whose logits are made in one pass over its vocabulary slices (one dequantization
# for them all), at least a chunk. A dequantization costs about the head's matmul for ~40 positions (Gemma-3-270m,
# CPU), so its share of the head's time is about 40 / rows per pass. A bound on logits, not on hidden states: a
# row's log-softmax reads all its logits at once (a streamed one would not give the same numbers). 256: Gemma-3's
# head (128-row chunks) runs half as often, for up to 128 MB more; SmolLM2's (682-row chunks) within a chunk's memory.
HEAD_GROUP_ROWS = 256
LOG_SOFTMAX_ROWS = 16          # scored positions per log-softmax (each row's numbers do not depend on the others)


# --- tokenization, as the harness's HFLM does it -------------------------------------------------------

class Encoder:
    """The harness's `tok_encode` / `_encode_pair` for one tokenizer, memoized."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        prefix_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        self.prefix_id = prefix_id
        self.prefix_text = tokenizer.decode(prefix_id) if prefix_id is not None else None
        self._memo: dict[str, list[int]] = {}

    def encode_many(self, texts: Iterable[str]) -> None:
        todo = sorted({t for t in texts if t not in self._memo})
        for special in (True, False):
            batch = [t for t in todo if self._special(t) == special]
            if batch:
                for t, ids in zip(batch, self.tok(batch, add_special_tokens=special)["input_ids"]):
                    self._memo[t] = list(ids)

    def _special(self, text: str) -> bool:
        return not (self.prefix_text and text.startswith(self.prefix_text))

    def encode(self, text: str) -> list[int]:
        if text not in self._memo:
            self.encode_many([text])
        return self._memo[text]

    @staticmethod
    def split_pair(context: str, continuation: str) -> tuple[str, str]:
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        return context, continuation

    def pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context tokens, continuation tokens) of one loglikelihood request."""
        if context == "":
            cont = self.encode(continuation)
            if cont and cont[0] == self.prefix_id:
                return cont[:1], cont[1:]
            return [self.prefix_id], cont
        context, continuation = self.split_pair(context, continuation)
        whole = self.encode(context + continuation)
        ctx = self.encode(context)
        return ctx, whole[len(ctx):]


# --- one document as a row of a prefix tree ------------------------------------------------------------

@dataclass
class Row:
    """A document's choices packed into one row: the shared input prefix, then each choice's rest."""
    index: int                        # position of the document in the caller's list
    tokens: list[int]
    positions: list[int]              # true position id of each slot
    branch: list[int]                 # -1: shared prefix; j: choice j's remainder
    targets: list[list[tuple[int, int]]]   # per choice: (slot whose output predicts it, token id)
    choice: int | None = None         # plain rows: the one choice this row holds

    @property
    def causal(self) -> bool:
        """No branches: every choice reads the same input (e.g. one-token answers), plain causal attention."""
        return all(b == -1 for b in self.branch)


def build_row(index: int, pairs: list[tuple[list[int], list[int]]]) -> Row:
    inputs = [(c + t)[:-1] for c, t in pairs]
    shared = 0
    shortest = min(len(x) for x in inputs)
    while shared < shortest and all(x[shared] == inputs[0][shared] for x in inputs):
        shared += 1
    tokens = list(inputs[0][:shared])
    positions = list(range(shared))
    branch = [-1] * shared
    targets = []
    for j, ((ctx, cont), inp) in enumerate(zip(pairs, inputs)):
        offset = len(tokens)
        rest = inp[shared:]
        tokens += rest
        positions += range(shared, shared + len(rest))
        branch += [j] * len(rest)
        # input position i lives in slot i (shared prefix) or in this choice's rest, which starts at offset
        slots = [i if i < shared else offset + i - shared for i in range(len(ctx) - 1, len(ctx) - 1 + len(cont))]
        targets.append(list(zip(slots, cont)))
    return Row(index, tokens, positions, branch, targets)


def plain_rows(index: int, pairs) -> list[Row]:
    """One row per choice with its full sequence (the harness's way), for checks and fallback."""
    rows = []
    for j, (ctx, cont) in enumerate(pairs):
        inp = (ctx + cont)[:-1]
        rows.append(Row(index, inp, list(range(len(inp))), [-1] * len(inp),
                        [[(len(ctx) + k - 1, tok) for k, tok in enumerate(cont)]], choice=j))
    return rows


# --- the model --------------------------------------------------------------------------------------

def _windows(config) -> dict[str, int | None] | int | None:
    """Attention windows: a dict per layer type when the model mixes sliding and full layers."""
    layer_types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    if layer_types and "sliding_attention" in layer_types:
        return {t: window if t == "sliding_attention" else None for t in set(layer_types)}
    if layer_types:
        return None
    return window if getattr(config, "use_sliding_window", True) else None


def _masks(pos, br, doc, dtype, windows):
    """Additive float masks [B, 1, L, L]: a token sees earlier tokens of its own document that are in the
    shared prefix or its own branch (padding, doc -1, sees only padding)."""
    import torch

    pq, pk = pos[:, :, None], pos[:, None, :]
    bq, bk = br[:, :, None], br[:, None, :]
    allowed = (doc[:, :, None] == doc[:, None, :]) & (pk <= pq) & ((bk == -1) | (bk == bq))
    neg = torch.finfo(dtype).min

    def make(window):
        a = allowed if window is None else allowed & (pq - pk < window)
        return torch.zeros(a.shape, dtype=dtype, device=a.device).masked_fill_(~a, neg)[:, None]

    if isinstance(windows, dict):
        made = {}
        return {k: made.setdefault(w, make(w)) for k, w in windows.items()}
    return make(windows)


def _is_causal(lines: list[list[Row]]) -> bool:
    """One branchless row per line: right-padded causal attention needs no mask."""
    return all(len(line) == 1 and line[0].causal for line in lines)


@dataclass
class _Layout:
    """A batch of lines as tensors [lines, length], and every scored token: (line, slot, token id, owner)."""
    ids: "torch.Tensor"       # noqa: F821  token ids (pad_id after each line's end)
    pos: "torch.Tensor"       # noqa: F821  position ids
    br: "torch.Tensor"        # noqa: F821  branch (-1: shared prefix, -2: padding)
    doc: "torch.Tensor"       # noqa: F821  row index within its line (-1: padding)
    lines_of: list[int]       # per scored token: its line
    slots: list[int]          #   the slot whose output predicts it
    toks: list[int]           #   its token id
    owner: list[tuple[int, int]]  # (row in batch order, choice)


def _layout(lines: list[list[Row]], pad_id: int) -> _Layout:
    import torch

    length = max(sum(len(r.tokens) for r in line) for line in lines)
    n = len(lines)
    lay = _Layout(torch.full((n, length), pad_id, dtype=torch.long), torch.zeros((n, length), dtype=torch.long),
                  torch.full((n, length), -2, dtype=torch.long), torch.full((n, length), -1, dtype=torch.long),
                  [], [], [], [])
    n_rows = 0
    for i, line in enumerate(lines):
        at = 0
        for k, r in enumerate(line):
            m = len(r.tokens)
            lay.ids[i, at:at + m] = torch.tensor(r.tokens)
            lay.pos[i, at:at + m] = torch.tensor(r.positions)
            lay.br[i, at:at + m] = torch.tensor(r.branch)
            lay.doc[i, at:at + m] = k
            for j, tg in enumerate(r.targets):
                for slot, tok in tg:
                    lay.lines_of.append(i)
                    lay.slots.append(at + slot)
                    lay.toks.append(tok)
                    lay.owner.append((n_rows, j))
            at += m
            n_rows += 1
    return lay


def _run(model, lines: list[list[Row]], tree: bool, pad_id: int) -> list[list[float]]:
    """Forward one batch of lines (each: rows packed one after another); per row, in order, the summed
    log-likelihood of each choice. Tree mode: `_tree_sums` of this batch alone. Plain mode: one row per line,
    the unmodified model."""
    if tree:
        return next(_tree_sums(model, [lines], pad_id))
    import torch

    with torch.inference_mode():
        lay = _on_device(_layout(lines, pad_id), model.device)
        logits = model(input_ids=lay.ids, attention_mask=(lay.doc >= 0).long(), use_cache=False).logits
        li, si, ti = _targets(lay, model.device)
        logp = []
        for c in _chunks(len(lay.toks), model.config.get_text_config().vocab_size):
            logp += _logps(logits[li[c], si[c]], ti[c])
        return _sums(lines, lay.owner, logp)


@dataclass
class _Pending:
    """A tree batch whose trunk has run: per chunk of its scored positions (`_chunks`), their hidden states and
    target tokens until the head has run on them, then their log-probs."""
    lines: list[list[Row]]
    owner: list[tuple[int, int]]
    chunks: list
    logp: list[list[float] | None]

    def done(self) -> bool:
        return all(x is not None for x in self.logp)

    def sums(self) -> list[list[float]]:
        return _sums(self.lines, self.owner, [x for c in self.logp for x in c])


def _tree_sums(model, batches, pad_id: int) -> Iterator[list[list[float]]]:
    """Per tree batch, in order, what `_run` returns: the decoder batch by batch, the output head on groups of
    chunks of scored positions, across batches (`_group_rows`): a packed head is dequantized once per group,
    not once per chunk. The same numbers as batch by batch: every chunk is the one its batch alone makes and
    its logits are its own matmuls (`OutputHead.all_logits_of`)."""
    head = output_head(model)
    if head is None:
        raise ValueError("the model has no linear output head")  # _check_tree falls back to plain scoring
    vocab = model.config.get_text_config().vocab_size
    chunk, group = _chunk_rows(vocab), _group_rows(head, vocab)
    waiting: deque[_Pending] = deque()
    queue: list[tuple[_Pending, int]] = []   # the chunks whose head has not run
    for lines in batches:
        p = _trunk(model, lines, pad_id)
        waiting.append(p)
        for k in range(len(p.chunks)):
            queue.append((p, k))
            if sum(q.chunks[j][1].shape[0] for q, j in queue) + chunk > group:  # no room for another chunk
                _head(head, queue)
        while waiting and waiting[0].done():
            yield waiting.popleft().sums()
    _head(head, queue)
    while waiting:
        yield waiting.popleft().sums()


def _trunk(model, lines: list[list[Row]], pad_id: int) -> _Pending:
    """The decoder without its head on one batch; its hidden states at the scored positions, by chunk. A batch
    of branchless single-row lines runs without a mask: causal attention never reads the right padding and
    skips the upper triangle."""
    import torch

    with torch.inference_mode():
        lay = _on_device(_layout(lines, pad_id), model.device)
        base = getattr(model, model.base_model_prefix)
        if _is_causal(lines):
            hidden = base(input_ids=lay.ids, use_cache=False).last_hidden_state
        else:
            mask = _masks(lay.pos, lay.br, lay.doc, model.get_input_embeddings().weight.dtype, _windows(model.config))
            hidden = base(input_ids=lay.ids, attention_mask=mask, position_ids=lay.pos,
                          use_cache=False).last_hidden_state
        li, si, ti = _targets(lay, model.device)
        cs = _chunks(len(lay.toks), model.config.get_text_config().vocab_size)
        return _Pending(lines, lay.owner, [(hidden[li[c], si[c]], ti[c]) for c in cs], [None] * len(cs))


def _head(head, queue: list[tuple[_Pending, int]]) -> None:
    """The output head on the queued chunks, all in one pass over its vocabulary slices; empties the queue."""
    import torch

    if not queue:
        return
    with torch.inference_mode():
        logits = head.all_logits_of([p.chunks[k][0] for p, k in queue])
        for n, (p, k) in enumerate(queue):
            p.logp[k] = _logps(logits[n], p.chunks[k][1])
            p.chunks[k] = logits[n] = None
    queue.clear()


def _group_rows(head, vocab: int) -> int:
    """Scored positions whose logits the head makes in one pass: a packed head's HEAD_GROUP_ROWS or a chunk (its
    dequantization shared by them), a dense head's one chunk (nothing to share: chunk by chunk)."""
    import torch

    return 0 if isinstance(head.weight, torch.Tensor) else max(_chunk_rows(vocab), HEAD_GROUP_ROWS)


def _chunk_rows(vocab: int) -> int:
    return max(1, HEAD_CHUNK_ELEMENTS // vocab)


def _chunks(n: int, vocab: int) -> list[slice]:
    """A batch's scored positions in chunks of `_chunk_rows`: the logits of one chunk are made and held at once
    (bounded memory for large vocabularies), each chunk one matmul per vocabulary slice."""
    step = _chunk_rows(vocab)
    return [slice(a, a + step) for a in range(0, n, step)]


def _targets(lay: _Layout, device):
    """(lines, slots, token ids) of the scored tokens, as tensors."""
    import torch

    return (torch.tensor(x, dtype=torch.long, device=device) for x in (lay.lines_of, lay.slots, lay.toks))


def _logps(logits, tokens) -> list[float]:
    """Log-prob of each row's token under its logits [m, V], LOG_SOFTMAX_ROWS rows at a time."""
    import torch

    t, out = tokens[:, None], []
    for r in range(0, logits.shape[0], LOG_SOFTMAX_ROWS):  # row by row the same numbers, less memory
        rows = slice(r, r + LOG_SOFTMAX_ROWS)
        out += torch.log_softmax(logits[rows].float(), dim=-1).gather(1, t[rows])[:, 0].tolist()
    return out


def _sums(lines: list[list[Row]], owner: list[tuple[int, int]], logp: list[float]) -> list[list[float]]:
    """Per row, in order, the summed log-prob of each choice."""
    sums = [[0.0] * len(r.targets) for line in lines for r in line]
    for (i, j), lp in zip(owner, logp):
        sums[i][j] += lp
    return sums


def _on_device(lay: _Layout, device) -> _Layout:
    """The layout's tensors on the model's device (the same object on the CPU)."""
    if device.type == "cpu":
        return lay
    return replace(lay, ids=lay.ids.to(device), pos=lay.pos.to(device), br=lay.br.to(device), doc=lay.doc.to(device))


def _pack(rows: list[Row], capacity: int) -> list[list[Row]]:
    """Rows into lines of at most `capacity` tokens (best fit, longest first)."""
    import bisect

    lines: list[list[Row]] = []
    free: list[tuple[int, int]] = []  # (room left, line index), sorted
    for r in sorted(rows, key=lambda r: -len(r.tokens)):
        need = len(r.tokens)
        k = bisect.bisect_left(free, (need, -1))
        if k == len(free):
            lines.append([r])
            room, li = capacity - need, len(lines) - 1
        else:
            room, li = free.pop(k)
            lines[li].append(r)
            room -= need
        bisect.insort(free, (room, li))
    return lines


def _batches(rows: list[Row], tree: bool, batch_size: int, max_tokens: int,
             pack_tokens: int) -> Iterator[list[list[Row]]]:
    """Batches of lines: tree mode packs several branched documents per line and gives each branchless
    one its own line (batched apart, maskless); plain mode one row per line."""
    def alone(rs):
        return [[r] for r in sorted(rs, key=lambda r: -len(r.tokens))]

    if tree:
        branched = [r for r in rows if not r.causal]
        yield from _batch_lines(alone([r for r in rows if r.causal]), batch_size, max_tokens)
        if branched:
            capacity = max(pack_tokens, max(len(r.tokens) for r in branched))
            yield from _batch_lines(_pack(branched, capacity), batch_size, max_tokens)
    else:
        yield from _batch_lines(alone(rows), batch_size, max_tokens)


def _batch_lines(lines: list[list[Row]], batch_size: int, max_tokens: int) -> Iterator[list[list[Row]]]:
    batch: list[list[Row]] = []
    docs = 0
    for line in lines:
        width = max(sum(len(r.tokens) for r in x) for x in batch + [line])
        if batch and (docs + len(line) > batch_size or (len(batch) + 1) * width > max_tokens):
            yield batch
            batch, docs = [], 0
        batch.append(line)
        docs += len(line)
    if batch:
        yield batch


def _tolerance(dtype) -> tuple[float, float]:
    import torch
    return (2e-3, 1e-4) if dtype in (torch.float32, torch.float64) else (0.25, 2e-2)


def _plain_lls(model, pairs, pad_id) -> list[float]:
    return [s[0] for s in _run(model, [[r] for r in plain_rows(0, pairs)], tree=False, pad_id=pad_id)]


def _check_tree(model, batch, pairs, pad_id) -> tuple[str | None, list[list[float]] | None]:
    """Run a masked batch and rescore its shortest document the plain way: (problem or None, the batch's sums)."""
    try:
        sums = _run(model, batch, True, pad_id)
    except Exception as e:  # noqa: BLE001 - e.g. a model that rejects custom masks
        return f"{type(e).__name__}: {e}", None
    rows = [r for line in batch for r in line]
    k = min(range(len(rows)), key=lambda i: len(rows[i].tokens))
    fast, want = sums[k], _plain_lls(model, pairs[rows[k].index], pad_id)
    atol, rtol = _tolerance(model.get_input_embeddings().weight.dtype)
    if any(abs(a - b) > atol + rtol * abs(b) for a, b in zip(fast, want)):
        return f"{fast} vs {want}", sums
    return None, sums


@dataclass(frozen=True)
class ScoreOptions:
    """How `score_docs` batches and checks (never what it computes: every setting gives the same records)."""
    batch_size: int = DEFAULT_BATCH_SIZE     # documents per forward pass at most
    max_tokens: int = DEFAULT_MAX_TOKENS     # lines x padded length per forward pass at most
    pack_tokens: int = DEFAULT_PACK_TOKENS   # tree mode: documents are packed into lines of this many tokens
    mode: str = "tree"                       # "tree" (shared prefix) or "plain" (every choice's full sequence)
    check: bool = True                       # tree mode: check one masked batch against plain scoring first
    threads: int | None = None               # torch threads while scoring (None: all cores)
    progress: bool = True
    part: tuple[int, int] | None = None      # (K, N): only the documents whose first batch is K, K+N, ... of the
                                             # plan made for all of them (N such calls give the one call's records)

    def __post_init__(self):
        if self.mode not in ("tree", "plain"):
            raise ValueError(f"mode must be 'tree' or 'plain', not {self.mode!r}")


@dataclass
class _Job:
    """One call's documents, tokenized: per document its requests' (context, continuation) token pairs."""
    task: Task
    docs: list[tuple[int, dict]]
    pairs: list[list[tuple[list[int], list[int]]]]
    meta: list[tuple[int, list[int]]]        # (gold, choice lengths) per document
    pad_id: int


def _job(tokenizer, task: Task, docs: list[tuple[int, dict]]) -> _Job:
    enc = Encoder(tokenizer)
    reqs = [task.requests(doc) for _, doc in docs]
    texts = []
    for rq in reqs:
        for ctx, cont in rq:
            c, k = enc.split_pair(ctx, cont)
            texts += [c, c + k] if c else [k]
    enc.encode_many(texts)
    pairs = [[enc.pair(ctx, cont) for ctx, cont in rq] for rq in reqs]
    meta = [(task.gold(doc), task.choice_lengths(doc)) for _, doc in docs]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return _Job(task, docs, pairs, meta, pad_id)


def score_docs(model, tokenizer, task: str | Task, docs, options: ScoreOptions | None = None,
               **settings) -> Iterator[dict]:
    """Score [(doc_id, doc)] of a task; yield one record per document as its batch finishes.

    `options` (or its fields as keywords, e.g. `batch_size=8, progress=False`): see `ScoreOptions`.
    Records come longest document first (not in doc_id order): task, doc_id, lls, lens (characters
    of each choice, what acc_norm divides by), pred, pred_norm, gold, correct, correct_norm (0/1),
    n_tokens (scored tokens per choice). mode: "tree" (shared prefix, the default) or "plain"
    (every choice's full sequence separately, as the harness runs them). part=(K, N): only part K of N of
    the documents, with the numbers the whole call gives them (the batches are planned over all documents).
    """
    opts = replace(options or ScoreOptions(), **settings)
    t = task if isinstance(task, Task) else get_task(task)
    docs = [d if isinstance(d, tuple) else (i, d) for i, d in enumerate(docs)]
    if not docs:
        return
    job = _job(tokenizer, t, docs)
    with torch_threads(opts.threads):
        yield from (_score_tree if opts.mode == "tree" else _score_plain)(model, job, opts)


def _score_tree(model, job: _Job, opts: ScoreOptions) -> Iterator[dict]:
    """Shared-prefix scoring; if its self-check on the first masked batch fails, plain scoring instead."""
    rows = [build_row(i, p) for i, p in enumerate(job.pairs)]
    batches = list(_batches(rows, True, opts.batch_size, opts.max_tokens, opts.pack_tokens))
    masked = next((b for b in batches if not _is_causal(b)), None) if opts.check else None
    checked = None
    if masked is not None:  # first, check one masked batch against plain scoring
        problem, checked = _check_tree(model, masked, job.pairs, job.pad_id)
        if problem:
            print(f"mixq: warning: shared-prefix scoring disagrees with plain scoring on this model "
                  f"({problem}); scoring every choice separately (slower)", file=sys.stderr)
            yield from _score_plain(model, job, opts)
            return
        batches = [masked] + [b for b in batches if b is not masked]
    yield from _scored(model, job, batches, True, opts, checked)


def _score_plain(model, job: _Job, opts: ScoreOptions) -> Iterator[dict]:
    """Every choice's full sequence through the unmodified model (full-vocabulary logits at every
    position: fewer tokens per batch)."""
    vocab = model.config.get_text_config().vocab_size
    max_tokens = max(1, min(opts.max_tokens, (1 << 28) // vocab))
    rows = [r for i, p in enumerate(job.pairs) for r in plain_rows(i, p)]
    yield from _scored(model, job, list(_batches(rows, False, opts.batch_size, max_tokens, opts.pack_tokens)),
                       False, opts)


def _part(batches, part: tuple[int, int] | None) -> tuple[set[int] | None, list[int]]:
    """The documents of part (K, N) (those whose first row is in batch K, K+N, ...) and the batches holding any
    of their rows; every document and batch without a part. The batches are the same in every part, so each
    document's numbers are the ones a single call computes."""
    if part is None:
        return None, list(range(len(batches)))
    k, n = part
    first: dict[int, int] = {}
    for i, batch in enumerate(batches):
        for line in batch:
            for r in line:
                first.setdefault(r.index, i)
    mine = {d for d, i in first.items() if i % n == k}
    return mine, [i for i, b in enumerate(batches) if any(r.index in mine for line in b for r in line)]


def _scored(model, job: _Job, batches, tree: bool, opts: ScoreOptions, first=None) -> Iterator[dict]:
    """Run the batches; yield each document's record once all its choices are scored. `first`: the
    sums of the first batch, already computed (by the self-check)."""
    from tqdm import tqdm

    mine, todo = _part(batches, opts.part)
    bar = tqdm(total=len(job.docs) if mine is None else len(mine), desc=job.task.name, unit="doc", file=sys.stderr,
               disable=not opts.progress, dynamic_ncols=True, leave=False)
    try:
        pending: dict[int, dict[int, float]] = {}
        done = first if todo[:1] == [0] else None
        for i, sums in zip(todo, _batch_sums(model, [batches[i] for i in todo], tree, job.pad_id, done)):
            batch = batches[i]
            trim_heap()
            for r, s in zip((r for line in batch for r in line), sums):
                if mine is not None and r.index not in mine:
                    continue   # another part's document, in a batch shared in plain mode
                got = pending.setdefault(r.index, {})
                got.update(enumerate(s) if r.choice is None else [(r.choice, s[0])])
                if len(got) < len(job.pairs[r.index]):
                    continue  # plain mode: the document's other choices are in other batches
                del pending[r.index]
                lls = [got[j] for j in range(len(got))]
                yield _record(job.task, job.docs[r.index][0], lls, *job.meta[r.index],
                              [len(c) for _, c in job.pairs[r.index]])
                bar.update(1)
    finally:
        bar.close()


def _batch_sums(model, batches, tree: bool, pad_id: int, first=None) -> Iterator[list[list[float]]]:
    """Each batch's sums (`_run`), in order; `first`: the first batch's, already computed."""
    if first is not None:
        yield first
        batches = batches[1:]
    if tree:
        yield from _tree_sums(model, batches, pad_id)
    else:
        yield from (_run(model, b, False, pad_id) for b in batches)


def _record(t: Task, doc_id, lls, gold, lens, n_tokens) -> dict:
    pred, pred_norm = predictions(lls, lens)
    return {"task": t.name, "doc_id": doc_id, "lls": lls, "lens": lens, "pred": pred, "pred_norm": pred_norm,
            "gold": gold, "correct": int(pred == gold), "correct_norm": int(pred_norm == gold),
            "n_tokens": n_tokens}


def task_metrics(records: list[dict]) -> dict:
    """{"n", "acc", "acc_stderr", "acc_norm", "acc_norm_stderr"} over a task's records."""
    acc, acc_se = mean_stderr(r["correct"] for r in records)
    norm, norm_se = mean_stderr(r["correct_norm"] for r in records)
    return {"n": len(records), "acc": acc, "acc_stderr": acc_se, "acc_norm": norm, "acc_norm_stderr": norm_se}

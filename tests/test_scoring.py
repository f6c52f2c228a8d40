"""Shared-prefix scoring gives the per-document log-likelihoods of scoring every sequence separately."""

import pytest
import torch
from test_tasks import ARC_EASY_8, BOOLQ_SHORT, HELLASWAG_0, HELLASWAG_3243, PIQA_0, WINOGRANDE_0

from mixq.eval import scoring
from mixq.eval.scoring import Encoder, ScoreOptions, build_row, score_docs
from mixq.eval.tasks import TASKS

torch.set_num_threads(2)

DOCS = {
    "arc_easy": [ARC_EASY_8, {**ARC_EASY_8, "question": "Which one is red?", "answerKey": "2"}],
    "boolq": [BOOLQ_SHORT, {**BOOLQ_SHORT, "question": "is paris the capital of france", "answer": False}],
    "hellaswag": [HELLASWAG_0, HELLASWAG_3243],
    "piqa": [PIQA_0],
    "winogrande": [WINOGRANDE_0, {"sentence": "The trophy doesn't fit into the suitcase because _ is too big.",
                                  "option1": "the trophy", "option2": "the suitcase", "answer": "1"}],
}


@pytest.fixture(scope="module", params=["llama", "gemma3_text"])
def tiny(request, tiny_model):
    """A tiny random model (gemma3_text: sliding-window layers of 8 tokens, shorter than the prompts)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_model(request.param)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)


def reference_lls(model, tokenizer, task, doc):
    """Independent reference: each request's whole sequence through the model alone, as the harness does."""
    out = []
    for ctx, cont in TASKS[task].requests(doc):
        n = len(ctx) - len(ctx.rstrip())
        if n:
            ctx, cont = ctx[:-n], ctx[-n:] + cont
        whole = tokenizer(ctx + cont)["input_ids"]
        c = tokenizer(ctx)["input_ids"]
        cont_ids = whole[len(c):]
        inp = torch.tensor([(c + cont_ids)[:-1]])
        with torch.no_grad():
            logp = torch.log_softmax(model(inp).logits[0].float(), -1)
        out.append(sum(logp[len(c) - 1 + k, t].item() for k, t in enumerate(cont_ids)))
    return out


@pytest.mark.parametrize("task", sorted(DOCS))
def test_shared_prefix_equals_separate_sequences(tiny, task):
    model, tok = tiny
    docs = list(enumerate(DOCS[task]))
    recs = {r["doc_id"]: r for r in score_docs(model, tok, task, docs, progress=False, batch_size=2)}
    plain = {r["doc_id"]: r for r in score_docs(model, tok, task, docs[:1], progress=False, mode="plain")}
    assert sorted(recs) == [i for i, _ in docs]
    for i, doc in docs:
        want = reference_lls(model, tok, task, doc)
        assert recs[i]["lls"] == pytest.approx(want, abs=1e-4)
        if i in plain:
            assert plain[i]["lls"] == pytest.approx(want, abs=1e-4)
        r = recs[i]
        assert r["task"] == task and r["gold"] == TASKS[task].gold(doc)
        assert r["lens"] == TASKS[task].choice_lengths(doc)
        assert r["correct"] == int(r["pred"] == r["gold"]) and r["correct_norm"] == int(r["pred_norm"] == r["gold"])
        assert r["pred"] == max(range(len(want)), key=lambda j: (r["lls"][j], -j))


def test_batching_does_not_change_results(tiny):
    model, tok = tiny
    docs = list(enumerate(DOCS["hellaswag"] + DOCS["arc_easy"] * 2))
    one = {r["doc_id"]: r["lls"] for r in score_docs(model, tok, "hellaswag", docs[:2], progress=False, batch_size=1)}
    opts = ScoreOptions(batch_size=8, max_tokens=100_000, progress=False)
    many = {r["doc_id"]: r["lls"] for r in score_docs(model, tok, "hellaswag", docs[:2], opts)}
    for i in one:
        assert one[i] == pytest.approx(many[i], abs=1e-4)
    with pytest.raises(ValueError, match="mode"):
        list(score_docs(model, tok, "hellaswag", docs[:2], opts, mode="fast"))


def causal_only(pos, br, doc, dtype, windows):
    """What a model that ignores custom masks would compute: plain causal attention over the whole line."""
    n = pos.shape[1]
    m = torch.full((n, n), torch.finfo(dtype).min, dtype=dtype).triu(1)
    return m.expand(pos.shape[0], 1, n, n).clone()


def test_a_model_ignoring_the_tree_mask_falls_back_to_plain(tiny, monkeypatch, capsys):
    model, tok = tiny
    docs = list(enumerate(DOCS["arc_easy"]))
    want = {i: reference_lls(model, tok, "arc_easy", d) for i, d in docs}

    monkeypatch.setattr(scoring, "_masks", causal_only)
    got = {r["doc_id"]: r["lls"] for r in score_docs(model, tok, "arc_easy", docs, progress=False)}
    assert "scoring every choice separately" in capsys.readouterr().err
    for i in want:
        assert got[i] == pytest.approx(want[i], abs=1e-4)


def test_encoder_moves_trailing_spaces_and_splits_whole():
    class Tok:  # a character-level tokenizer that merges "a " into one token, to expose the split rule
        bos_token_id, eos_token_id = None, 0

        def decode(self, i):
            return "<eos>"

        def __call__(self, texts, add_special_tokens=True):
            def enc(s):
                ids, i = [], 0
                while i < len(s):
                    if s[i:i + 2] == "a ":
                        ids.append(1000)
                        i += 2
                    else:
                        ids.append(ord(s[i]))
                        i += 1
                return ids
            return {"input_ids": [enc(s) for s in texts]}

    enc = Encoder(Tok())
    assert enc.pair("x ", "b") == ([ord("x")], [ord(" "), ord("b")])  # the trailing space joins the continuation
    assert enc.pair("x", "a b") == ([ord("x")], [1000, ord("b")])     # whole "xa b" = x, "a ", b
    # the whole is split at the context's token count, not by text: "xa" + " b" -> [x, "a "] | [b]
    assert enc.pair("xa ", "b") == ([ord("x"), ord("a")], [ord("b")])
    assert enc.pair("", "b") == ([0], [ord("b")])  # empty context: the prefix (EOS) token


def test_row_layout_shares_the_common_prefix():
    row = build_row(0, [([1, 2, 3], [4, 5]), ([1, 2, 3], [6])])
    assert row.tokens == [1, 2, 3, 4]          # inputs [1,2,3,4] and [1,2,3]: common prefix of 3
    assert row.positions == [0, 1, 2, 3] and row.branch == [-1, -1, -1, 0]
    assert row.targets == [[(2, 4), (3, 5)], [(2, 6)]]
    wino = build_row(0, [([7, 8, 9], [5, 6]), ([7, 8, 10], [5, 6])])  # different contexts, shared continuation
    assert wino.tokens == [7, 8, 9, 5, 10, 5] and wino.positions == [0, 1, 2, 3, 2, 3]
    assert wino.targets == [[(2, 5), (3, 6)], [(4, 5), (5, 6)]]


def test_packing_many_documents_per_line(tiny):
    """Documents packed together into lines give each document's own log-likelihoods."""
    model, tok = tiny
    docs = list(enumerate(DOCS["winogrande"] * 3))
    packed = {r["doc_id"]: r["lls"] for r in score_docs(model, tok, "winogrande", docs, progress=False,
                                                        pack_tokens=4096, check=False)}
    alone = {r["doc_id"]: r["lls"] for r in score_docs(model, tok, "winogrande", docs, progress=False,
                                                       pack_tokens=1, batch_size=1, check=False)}
    assert sorted(packed) == list(range(6))
    for i in packed:
        assert packed[i] == pytest.approx(alone[i], abs=1e-4)
    lines = scoring._pack([build_row(i, [([1] * n, [2])]) for i, n in enumerate([5, 4, 3, 2, 2])], 8)
    assert [[len(r.tokens) for r in line] for line in lines] == [[5, 3], [4, 2, 2]]  # best fit, longest first


ONE_TOKEN_ARC = {"id": "x", "question": "Which letter comes first?",
                 "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "A"}


def test_branchless_documents_run_maskless_and_a_fallback_scores_each_document_once(tiny, monkeypatch, capsys):
    """One-token answers make a branchless row (scored with plain causal attention, batched apart);
    the self-check runs on the first masked batch, and its fallback scores every document once."""
    model, tok = tiny
    docs = list(enumerate([ONE_TOKEN_ARC, ARC_EASY_8, ONE_TOKEN_ARC]))
    enc = Encoder(tok)
    rows = [build_row(i, [enc.pair(c, k) for c, k in TASKS["arc_easy"].requests(d)]) for i, d in docs]
    assert [r.causal for r in rows] == [True, False, True]
    batches = list(scoring._batches(rows, True, 64, 4096, 512))
    assert [scoring._is_causal(b) for b in batches] == [True, False]
    want = {i: reference_lls(model, tok, "arc_easy", d) for i, d in docs}

    monkeypatch.setattr(scoring, "_masks", causal_only)
    got = [r for r in score_docs(model, tok, "arc_easy", docs, progress=False)]
    assert "scoring every choice separately" in capsys.readouterr().err
    assert sorted(r["doc_id"] for r in got) == [0, 1, 2]
    for r in got:
        assert r["lls"] == pytest.approx(want[r["doc_id"]], abs=1e-4)

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


@pytest.fixture(scope="module", params=["gemma3_text", "llama"])
def engines(request, tiny_model):
    """(dense, packed) engines of a tiny model quantized 8/6-bit, tied head (gemma3_text: sliding windows)."""
    from mixq.eval.engine import load_model

    ref = f"{tiny_model(request.param)}@qx86-hi"
    return load_model(ref, packed=False, progress=False), load_model(ref, progress=False, max_memory=0)


def _records(lm, monkeypatch, group_rows: int, **settings) -> tuple[list[dict], list[int]]:
    """Records of 12 arc_easy documents in batches of about 2 documents, the head's logits made in
    chunks of 5 positions, by vocabulary slices of 100 rows; and per head pass the number of batches it served."""
    from mixq.eval import head as head_module

    vocab = lm.model.config.get_text_config().vocab_size
    monkeypatch.setattr(head_module, "VOCAB_SLICE", 100)
    monkeypatch.setattr(scoring, "HEAD_CHUNK_ELEMENTS", 5 * vocab)
    monkeypatch.setattr(scoring, "HEAD_GROUP_ROWS", group_rows)
    served = []
    run_head = scoring._head
    monkeypatch.setattr(scoring, "_head", lambda h, q: (served.append(len({id(p) for p, _ in q})), run_head(h, q)))
    docs = list(enumerate([{**ARC_EASY_8, "question": "Why? " * k} for k in range(10)] + DOCS["arc_easy"]))
    docs[3] = (3, ONE_TOKEN_ARC)
    recs = list(score_docs(lm.model, lm.tokenizer, "arc_easy", docs, progress=False, max_tokens=200, **settings))
    assert sorted(r["doc_id"] for r in recs) == list(range(12)) if "part" not in settings else True
    return recs, [n for n in served if n]


def test_packed_head_runs_once_per_group_of_batches(engines, monkeypatch):
    """A packed head runs on the scored positions of several batches at once, with the records of one batch at a
    time, bit for bit (each chunk is its batch's own); the dense head runs one chunk at a time."""
    dense, packed = engines
    today, per_chunk = _records(packed, monkeypatch, 0)
    grouped, groups = _records(packed, monkeypatch, 40)
    assert grouped == today and _records(dense, monkeypatch, 40)[0] == today
    assert max(per_chunk) == 1 and max(groups) > 1 and len(groups) < len(per_chunk)
    assert max(_records(dense, monkeypatch, 40)[1]) == 1
    one, groups = _records(packed, monkeypatch, 10_000, check=False)  # without the self-check: one group, all batches
    assert len(groups) == 1 and groups[0] > 1
    assert sorted(one, key=lambda r: r["doc_id"]) == sorted(today, key=lambda r: r["doc_id"])


def test_parts_with_a_grouped_head_give_the_single_call(engines, monkeypatch):
    """part=(K, N) calls (each grouping its own batches' heads) give the single call's records."""
    _, packed = engines
    whole = {r["doc_id"]: r for r in _records(packed, monkeypatch, 40)[0]}
    parts = [r for k in range(3) for r in _records(packed, monkeypatch, 40, part=(k, 3))[0]]
    assert sorted(r["doc_id"] for r in parts) == sorted(whole)
    assert all(r == whole[r["doc_id"]] for r in parts)


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_all_logits_of_is_all_logits_of_each(softcap):
    """Several inputs through one pass over the head's slices: each input's logits bit for bit those of its own
    call, whatever the others' row counts (a matmul's rows may depend on how many there are: 1-3 rows differ)."""
    from mixq.eval.head import OutputHead

    g = torch.Generator().manual_seed(0)
    head = OutputHead(torch.randn(300, 64, generator=g), torch.randn(300, generator=g), softcap)
    hs = [torch.randn(n, 64, generator=g) for n in (1, 2, 3, 5, 17, 64)]
    for step in (None, 100):
        got = head.all_logits_of(hs, step)
        assert all(torch.equal(x, head.all_logits(h, step)) for x, h in zip(got, hs))

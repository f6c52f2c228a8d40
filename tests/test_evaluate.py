"""mixq eval: run folder, schema, resume without re-scoring, on-the-fly recipe = converted folder."""

import json

import pytest
import torch
from tiny_models import _TEXT

import mixq.eval.evaluate
from mixq.errors import MixqError
from mixq.eval.evaluate import RESUME_KEYS, EvalConfig, evaluate, parse_tasks
from mixq.eval.runs import read_samples
from mixq.eval.tasks import TASKS as DEFS

torch.set_num_threads(2)

ARC = [{"question": q, "choices": {"text": c, "label": ["A", "B", "C", "D"][:len(c)]}, "answerKey": k}
       for q, c, k in [("Which is the capital of France?", ["Berlin", "Paris", "Rome"], "B"),
                       ("What do plants need to grow?", ["light", "darkness", "noise", "plastic"], "A"),
                       ("Which number is the largest?", ["10", "1000", "100"], "B"),
                       ("What does a fox jump over?", ["the dog", "the moon"], "A"),
                       ("Quantization maps weights to?", ["a few bits", "colours", "words"], "A"),
                       ("What is 2 plus 3?", ["5", "6", "23"], "A")]]
BOOLQ = [{"passage": p, "question": q, "label": l}
         for p, q, l in [("Paris is the capital of France.", "is paris the capital of france", 1),
                         ("Berlin is in Germany.", "is berlin in italy", 0),
                         ("The dog is lazy.", "is the dog lazy", 1),
                         ("Rome is the capital of Italy.", "is rome in spain", 0),
                         ("Numbers go up to 1000.", "do numbers stop at 10", 0)]]
WINO = [{"sentence": s, "option1": a, "option2": b, "answer": ans}
        for s, a, b, ans in [("The fox jumped over the dog because _ was quick.", "the fox", "the dog", "1"),
                             ("Paris is bigger than Rome, so _ has more people.", "Paris", "Rome", "1"),
                             ("The model reads the prompt before _ computes logits.", "the model", "the prompt", "1")]]
TASKS = "arc_easy,boolq,winogrande"
N_DOCS = len(ARC) + len(BOOLQ) + len(WINO)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXQ_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("ev")
    model = tiny_model("llama", num_hidden_layers=5)
    data = root / "data"
    data.mkdir()
    for name, rows in (("arc_easy", ARC), ("boolq", BOOLQ), ("winogrande", WINO)):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = root / "text.txt"
    text.write_text(_TEXT * 4)
    return model, data, text


def _run(model, out, setup, **kw):
    _, data, text = setup
    kw.setdefault("tasks", TASKS)
    kw.setdefault("device", "cpu")  # the same numbers on a machine with a GPU
    return evaluate(str(model), kw.pop("tasks"), out, data_dir=data, ppl_file=text, ctx=16, windows=3,
                    progress=False, **kw)


def test_parse_tasks():
    assert parse_tasks("all,ppl") == ["arc_challenge", "arc_easy", "boolq", "hellaswag", "openbookqa", "piqa",
                                      "winogrande", "ppl"]
    with pytest.raises(MixqError, match="unknown task"):
        parse_tasks("arc_easy,mmlu")


def test_config_options_and_resume_keys(tmp_path):
    """The options results.json records keep their names (old run folders resume); the ones that do not
    change a number (threads, batch size, progress, where to write) are not resume keys."""
    assert RESUME_KEYS == ("model", "recipe", "dtype", "device", "limit", "sample", "seed", "data_dir", "base",
                           "ppl_file", "ctx", "windows", "kld_topk")
    text = tmp_path / "t.txt"
    text.write_text("x")
    cfg = EvalConfig(model=tmp_path / "m", tasks="boolq,ppl", out=tmp_path / "run", ppl_file=text, ctx=0, windows=0,
                     kld_topk=0, threads=3, batch_size=5, device="cpu")
    assert cfg.options() == {"model": str(tmp_path / "m"), "recipe": None, "dtype": "float32", "device": "cpu",
                             "limit": None,
                             "sample": None, "seed": 0, "data_dir": None, "base": None, "ppl_file": str(text.resolve()),
                             "ctx": 512, "windows": None, "kld_topk": None, "tasks": ["boolq", "ppl"]}
    assert EvalConfig(model="m", tasks="boolq", out="r", ppl_file=text).ppl_file is None  # no text task
    assert cfg.kld_form == "exact" and EvalConfig(model="m", tasks="boolq", out="r", kld_topk=64).kld_form == 64
    with pytest.raises(MixqError, match="-o RUN_DIR"):
        EvalConfig(model="m", tasks="boolq")
    # a run folder from before --device ran on the CPU: it resumes on the CPU, not elsewhere
    from mixq.eval.evaluate import _check_resumable

    old = {k: v for k, v in cfg.options().items() if k != "device"}
    _check_resumable(tmp_path / "run", {"options": old}, cfg)
    with pytest.raises(MixqError, match="device"):
        _check_resumable(tmp_path / "run", {"options": {**old, "device": "cuda"}}, cfg)
    with pytest.raises(MixqError, match="--device"):
        EvalConfig(model="m", tasks="boolq", out="r", device="tpu")


def test_run_folder_schema_and_self_kld(tmp_path, setup):
    from mixq.eval.engine import load_model
    from mixq.eval.perplexity import make_windows, perplexity

    model = setup[0]
    out = tmp_path / "run"
    r = _run(model, out, setup, tasks=TASKS + ",ppl,kld", base=str(model))
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(r))
    for k in ("mixq_version", "model", "recipe", "kind", "provenance", "dtype", "size_bytes", "n_params",
              "bits_per_weight", "bits_per_weight_quantized", "memory_bytes_estimate", "tasks", "ppl", "kld",
              "versions", "seconds"):
        assert k in r, k
    assert r["complete"] and r["dtype"] == "float32" and r["bits_per_weight"] == 16.0
    for task, n in (("arc_easy", len(ARC)), ("boolq", len(BOOLQ)), ("winogrande", len(WINO))):
        m = r["tasks"][task]
        assert m["n"] == n and 0 <= m["acc"] <= 1 and m["acc_stderr"] >= 0 and m["split"] == "validation"
        assert m["source"].startswith("data-dir:") and m["version"] == DEFS[task].version
    assert r["task_versions"] == {t: DEFS[t].version for t in ("arc_easy", "boolq", "winogrande")}
    samples = read_samples(out)
    assert len(samples) == N_DOCS
    for s in samples:
        assert {"task", "doc_id", "lls", "pred", "pred_norm", "gold", "correct", "correct_norm"} <= set(s)
        assert s["correct"] in (0, 1)
    k = r["kld"]
    assert k["kld_mean"] == 0.0 and k["kld_max"] == 0.0 and k["top1_agreement"] == 1.0
    assert k["dp_rms"] == 0.0 and k["ln_ppl_ratio"] == 0.0 and k["ppl_base"] == k["ppl_quant"]
    lm = load_model(str(model), progress=False)
    want = perplexity(lm.model, make_windows(lm.tokenizer, setup[2], ctx=16, max_windows=3), progress=False)
    assert r["ppl"]["ppl"] == pytest.approx(want["ppl"], rel=1e-12)
    assert r["ppl"]["n_tokens"] == 3 * 15 == k["n_tokens"]
    assert k["ppl_quant"] == pytest.approx(want["ppl"], rel=1e-12)


def test_kld_needs_base_and_existing_dir_is_refused(tmp_path, setup):
    with pytest.raises(MixqError, match="--base"):
        _run(setup[0], tmp_path / "r0", setup, tasks="kld")
    out = tmp_path / "r1"
    _run(setup[0], out, setup, tasks="boolq")
    with pytest.raises(MixqError, match="--resume"):
        _run(setup[0], out, setup, tasks="boolq")
    r = _run(setup[0], out, setup, tasks="boolq", force=True)
    assert r["tasks"]["boolq"]["n"] == len(BOOLQ)
    with pytest.raises(MixqError, match="different options"):
        _run(setup[0], out, setup, tasks="boolq", resume=True, limit=2)


def test_task_versions_on_resume(tmp_path, setup, monkeypatch):
    """A run folder from before task versions resumes (its tasks count as the current version); a task
    whose definition changed since the run started refuses to resume."""
    import dataclasses

    out = tmp_path / "r"
    _run(setup[0], out, setup, tasks="boolq")
    old = json.loads((out / "results.json").read_text())
    del old["task_versions"], old["tasks"]["boolq"]["version"]
    (out / "results.json").write_text(json.dumps(old))
    r = _run(setup[0], out, setup, tasks="boolq,arc_easy", resume=True)
    assert r["tasks"]["boolq"]["version"] == DEFS["boolq"].version == r["tasks"]["arc_easy"]["version"]
    assert r["task_versions"] == {"boolq": DEFS["boolq"].version, "arc_easy": DEFS["arc_easy"].version}
    monkeypatch.setitem(DEFS, "boolq", dataclasses.replace(DEFS["boolq"], version="2"))
    with pytest.raises(MixqError, match=r"task definitions changed .*boolq 1 -> 2"):
        _run(setup[0], out, setup, tasks="boolq", resume=True)


def test_resume_scores_only_unfinished_documents(tmp_path, setup, monkeypatch):
    model = setup[0]
    full = _run(model, tmp_path / "full", setup)

    real = mixq.eval.evaluate.score_docs
    scored = []

    def interrupted(model, tok, task, docs, **kw):
        for rec in real(model, tok, task, docs, **kw):
            if len(scored) == len(ARC) + 2:  # all of arc_easy, then 2 boolq documents
                raise KeyboardInterrupt
            scored.append((task, rec["doc_id"]))
            yield rec

    monkeypatch.setattr(mixq.eval.evaluate, "score_docs", interrupted)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        _run(model, out, setup)
    part = json.loads((out / "results.json").read_text())
    assert list(part["tasks"]) == ["arc_easy"] and not part["complete"]
    assert len(read_samples(out)) == len(ARC) + 2
    with open(out / "samples.jsonl", "a") as f:
        f.write('{"task": "boolq", "doc_')  # a line cut by the interruption

    again = []

    def counting(model, tok, task, docs, **kw):
        again.extend((task, i) for i, _ in docs)
        yield from real(model, tok, task, docs, **kw)

    monkeypatch.setattr(mixq.eval.evaluate, "score_docs", counting)
    r = _run(model, out, setup, resume=True)
    assert len(again) == N_DOCS - len(ARC) - 2 and not set(again) & set(scored)
    assert r["complete"]
    for task in full["tasks"]:
        a = {k: v for k, v in full["tasks"][task].items() if k not in ("seconds", "n_scored_now")}
        b = {k: v for k, v in r["tasks"][task].items() if k not in ("seconds", "n_scored_now")}
        assert a == b, task
    key = lambda s: (s["task"], s["doc_id"])  # noqa: E731
    got = sorted(read_samples(out), key=key)
    want = sorted(read_samples(tmp_path / "full"), key=key)
    assert [key(s) for s in got] == [key(s) for s in want]
    for g, w in zip(got, want):
        # batches are composed differently after a resume: log-likelihoods agree to float32 rounding
        assert g["lls"] == pytest.approx(w["lls"], rel=1e-5)
        assert {k: v for k, v in g.items() if k != "lls"} == {k: v for k, v in w.items() if k != "lls"}


def test_recipe_on_the_fly_equals_converted_folder(tmp_path, setup):
    from mixq.quant.convert import convert

    model = setup[0]
    folder = convert(str(model), tmp_path / "qx86", recipe="qx86-hi", progress=False)
    a = _run(folder, tmp_path / "a", setup, tasks=TASKS + ",ppl,kld", base=str(model))
    b = _run(f"{model}@qx86-hi", tmp_path / "b", setup, tasks=TASKS + ",ppl,kld", base=str(model))
    assert a["recipe"] is None and b["recipe"] == "qx86-hi" and a["kind"] == "mlx"
    for k in ("size_bytes", "n_params", "bits_per_weight", "bits_per_weight_quantized"):
        assert a[k] == b[k], k
    assert a["kld"]["kld_mean"] > 0 and a["kld"]["top1_agreement"] < 1 or a["kld"]["kld_mean"] > 0
    strip = lambda d: {k: v for k, v in d.items() if k not in ("seconds", "base")}  # noqa: E731
    assert strip(a["kld"]) == strip(b["kld"]) and strip(a["ppl"]) == strip(b["ppl"])
    for task in a["tasks"]:
        assert strip(a["tasks"][task]) == strip(b["tasks"][task])
    sa, sb = read_samples(tmp_path / "a"), read_samples(tmp_path / "b")
    key = lambda s: (s["task"], s["doc_id"])  # noqa: E731
    assert sorted(sa, key=key) == sorted(sb, key=key)  # identical log-likelihoods, document by document


def test_base_distributions_are_cached(tmp_path, setup, monkeypatch):
    import mixq.eval.engine
    import mixq.eval.evaluate
    import mixq.eval.perplexity

    model = setup[0]
    loads = []
    real = mixq.eval.engine.load_model

    def counting(ref, **kw):
        loads.append(ref.ref)  # evaluate resolves each model once and passes the ResolvedModel on
        return real(ref, **kw)

    monkeypatch.setattr(mixq.eval.evaluate, "load_model", counting)
    monkeypatch.setattr(mixq.eval.perplexity, "load_model", counting)
    a = _run(f"{model}@q4", tmp_path / "a", setup, tasks="kld", base=str(model))
    assert loads == [str(model), f"{model}@q4"]
    b = _run(f"{model}@q4", tmp_path / "b", setup, tasks="kld", base=str(model))
    assert loads[2:] == [f"{model}@q4"]  # the base is not loaded again
    assert a["kld"]["kld_mean"] == b["kld"]["kld_mean"] > 0


def test_cli_prints_table(tmp_path, setup, capsys):
    import argparse

    from mixq.eval.evaluate import add_arguments, cli

    model, data, text = setup
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([str(model), "--tasks", "boolq,ppl", "--data-dir", str(data), "--ppl-file", str(text),
                              "--ctx", "16", "--windows", "2", "-o", str(tmp_path / "run")])
    rc = cli(args)
    assert rc == 0
    out = capsys.readouterr().out
    assert "boolq" in out and "ppl" in out and "results.json" in out


def test_second_writer_of_a_run_folder_is_refused(tmp_path, setup):
    """Two evaluations into one run folder would duplicate samples: the second is refused at once."""
    from mixq.io.files import output_lock

    out = tmp_path / "run"
    with output_lock(out):
        with pytest.raises(MixqError, match="another mixq process"):
            _run(str(setup[0]), out, setup, tasks="arc_easy")
    assert not out.exists()


def test_memory_budget_gives_identical_documents(tmp_path, setup, capsys, monkeypatch):
    """The dense engine (every weight dequantized at load), `--max-memory` below the model's dense size (some
    weights packed, dequantized per forward), the default (0: all packed) and `auto` (dense copies) score every document
    identically, on `--device cpu` given explicitly; results.json records device and peak memory, and the
    output states the peak memory."""
    from functools import partial

    from mixq.cli import main
    from mixq.eval import evaluate as ev_module

    model, data, text = setup

    def run(name, *extra, dense=False):
        out = tmp_path / name
        args = ["eval", f"{model}@q4-hi", "--tasks", TASKS + ",ppl", "--data-dir", str(data), "--ppl-file", str(text),
                "--ctx", "16", "--windows", "3", "--device", "cpu", "-o", str(out), *extra]
        with monkeypatch.context() as m:
            if dense:
                m.setattr(ev_module, "load_model", partial(ev_module.load_model, packed=False))
            assert main(args) == 0
        assert "peak memory:" in capsys.readouterr().out
        return json.loads((out / "results.json").read_text()), read_samples(out)

    dense, dense_docs = run("dense", dense=True)
    packed, packed_docs = run("packed")   # eval's default
    between = (packed["weights_bytes"] + dense["weights_bytes"]) / 2   # below the dense size, above the packed
    part, part_docs = run("part", "--max-memory", f"{between / 1e9:.9f}")
    auto, auto_docs = run("auto", "--max-memory", "auto")   # dense copies: everything fits
    assert len(dense_docs) == N_DOCS
    assert packed_docs == dense_docs and part_docs == dense_docs and auto_docs == dense_docs
    assert packed["ppl"]["ppl"] == part["ppl"]["ppl"] == auto["ppl"]["ppl"] == dense["ppl"]["ppl"]
    assert packed["weights_bytes"] < part["weights_bytes"] <= between < dense["weights_bytes"]
    assert packed["weights_bytes"] < 0.5 * dense["weights_bytes"] and auto["weights_bytes"] > part["weights_bytes"]
    for r in (dense, packed, part, auto):
        assert r["device"] == "cpu" and r["options"]["device"] == "cpu" and r["dtype"] == "float32"
        assert r["peak_memory_bytes"]["rss"] > 0

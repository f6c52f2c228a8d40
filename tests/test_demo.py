"""mixq demo on a tiny model: variants converted, evaluated, compared; a re-run reuses the work."""

import json

import pytest
from tiny_models import _TEXT, make_tiny_hf

import mixq.demo as demo
from mixq.eval.tasks import TASK_NAMES
from mixq.io.files import README_MARK

ARC = [{"question": q, "choices": {"text": c, "label": ["A", "B", "C"][:len(c)]}, "answerKey": k}
       for q, c, k in [("Which is the capital of France?", ["Berlin", "Paris", "Rome"], "B"),
                       ("What do plants need to grow?", ["light", "darkness"], "A"),
                       ("Which number is the largest?", ["10", "1000", "100"], "B"),
                       ("What is 2 plus 3?", ["5", "6", "23"], "A")]]


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXQ_CACHE", str(tmp_path / "cache"))
    model = make_tiny_hf("llama", tmp_path / "llama", num_hidden_layers=5)
    data = tmp_path / "data"
    data.mkdir()
    (data / "arc_easy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ARC))
    text = tmp_path / "text.txt"
    text.write_text(_TEXT * 4)
    return model, data, text


def _config(tiny, out):
    model, data, text = tiny
    return demo.DemoConfig(model=str(model), variants=("bf16", "q8-hi", "q4"), tasks=("arc_easy",), limit=3,
                           windows=2, out=out, ref="q8-hi",
                           extra_eval={"data_dir": data, "ppl_file": text, "ctx": 16, "progress": False})


def test_demo_builds_evaluates_and_reports(tiny, tmp_path, monkeypatch):
    out = tmp_path / "demo"
    report = demo.run_demo(_config(tiny, out))
    comparison = json.loads((report / "comparison.json").read_text())
    assert (report / "comparison.md").read_text().startswith("## mixq comparison")
    assert {p.name for p in report.glob("*.png")} >= {"accuracy_vs_bpw.png", "kld_vs_bpw.png"}
    for variant in ("bf16", "q8-hi", "q4"):
        folder = out / "models" / f"llama-{variant}"
        assert json.loads((folder / "mixq_provenance.json").read_text())["recipe"]["name"] == variant
        readme = (folder / "README.md").read_text()
        assert "library_name: mlx" in readme and README_MARK in readme
        evaluation = readme.split("## Evaluation")[1].split("## How it was made")[0]
        if variant == "q8-hi":   # the reference variant: its own scores, no comparison lines at all
            assert "| acc | q8-hi |" in evaluation
            for words in ("single run", "Holm", "Δ", "differences against"):
                assert words not in evaluation
        else:                    # every other variant: compared with the reference variant, paired
            assert f"| acc | {variant} | q8-hi (ref) | Δ {variant} |" in evaluation
            assert "differences against q8-hi" in evaluation and "Holm's adjustment over all 1 task comparisons" \
                in evaluation and "single run" not in evaluation
        results = json.loads((report.parent.parent / "runs" / report.name / variant / "results.json").read_text())
        assert results["tasks"]["arc_easy"]["n"] == 3 and results["kld"]["n_tokens"] > 0
    # fewer bits, further from the base
    kld = {r["label"]: r["kld"]["kld_mean"] for r in comparison["variants"]}
    assert kld["q4"] > kld["q8-hi"]

    # a re-run reuses the converted folders and finished runs: nothing is converted or scored again
    import importlib

    def refuse(*a, **k):
        raise AssertionError("re-run should reuse finished work")

    # (mixq.convert is the API function; patch the modules themselves)
    monkeypatch.setattr(importlib.import_module("mixq.demo"), "convert", refuse)
    monkeypatch.setattr(importlib.import_module("mixq.eval.evaluate"), "score_docs", refuse)
    assert demo.run_demo(_config(tiny, out)) == report


def test_demo_tasks_are_the_eval_tasks():
    assert demo.SEVEN_TASKS == TASK_NAMES == demo.DemoConfig().tasks and len(TASK_NAMES) == 7

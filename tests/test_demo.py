"""mixq demo on a tiny model: the built-in demo sweep with the demo's options; variants converted, evaluated,
compared; the documented outputs exist; a re-run runs no job."""

import json

import pytest
from tiny_models import _TEXT

import mixq.demo as demo
from mixq.cli import main
from mixq.eval.tasks import TASK_NAMES
from mixq.io.files import README_MARK
from mixq.sweep.command import run_sweep
from mixq.sweep.graph import build_graph
from mixq.sweep.spec import load_sweep, slug

ARC = [{"question": q, "choices": {"text": c, "label": ["A", "B", "C"][:len(c)]}, "answerKey": k}
       for q, c, k in [("Which is the capital of France?", ["Berlin", "Paris", "Rome"], "B"),
                       ("What do plants need to grow?", ["light", "darkness"], "A"),
                       ("Which number is the largest?", ["10", "1000", "100"], "B"),
                       ("What is 2 plus 3?", ["5", "6", "23"], "A")]]


@pytest.fixture
def tiny(tmp_path, tmp_cache, tiny_model):
    model = tiny_model("llama", num_hidden_layers=5)
    data = tmp_path / "data"
    data.mkdir()
    (data / "arc_easy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ARC))
    text = tmp_path / "text.txt"
    text.write_text(_TEXT * 4)
    return model, data, text


def _settings(tiny, **eval_settings) -> dict:
    model, data, text = tiny
    return {"models": [str(model)], "variants": ["bf16", "q8-hi", "q4"],
            "eval": {"tasks": ["arc_easy", "ppl", "kld"], "limit": 3, "windows": 2, "ctx": 16, "data_dir": str(data),
                     "ppl_file": str(text), **eval_settings}}


def test_demo_builds_evaluates_and_reports(tiny, tmp_path, capsys):
    out = tmp_path / "demo"
    sweep = demo.demo_sweep(out, **_settings(tiny))
    assert sweep.ref == "q8-hi" and sweep.dtype == "bfloat16" and sweep.eval["dtype"] == "float32"  # the demo's
    first = run_sweep(sweep, "serial", progress=False)
    assert len(first.ran) == len(build_graph(sweep).jobs) == 10
    demo.show(sweep)
    printed = capsys.readouterr().out
    m = slug(str(tiny[0]))
    report = out / "report"
    comparison = json.loads((report / m / "comparison.json").read_text())
    assert (report / m / "comparison.md").read_text().startswith("## mixq comparison")
    assert {p.name for p in (report / m).glob("*.png")} >= {"accuracy_vs_bpw.png", "kld_vs_bpw.png"}
    assert (report / "kld_vs_bpw.png").is_file() and "Size against KL divergence" in (report / "report.md").read_text()
    assert f"{report / m}/comparison.md" in printed and "q4" in printed and str(out / "models") in printed
    for variant in ("bf16", "q8-hi", "q4"):
        folder = out / "models" / f"{m}-{variant}"
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
        results = json.loads((report / m / "runs" / variant / "results.json").read_text())
        assert results["tasks"]["arc_easy"]["n"] == 3 and results["kld"]["n_tokens"] > 0
    # fewer bits, further from the base
    kld = {r["label"]: r["kld"]["kld_mean"] for r in comparison["variants"]}
    assert kld["q4"] > kld["q8-hi"]

    # a re-run reuses the converted folders and finished runs: no job runs again, nothing is rewritten
    def stamps():   # sweep.json, the index, is rewritten by every run
        return {p: p.stat().st_mtime_ns for p in (out / "jobs").rglob("*") if p.is_file()}

    before = stamps()
    assert run_sweep(demo.demo_sweep(out, **_settings(tiny)), "serial", progress=False).ran == []
    assert stamps() == before
    # a changed limit re-evaluates (and re-compares) without converting again
    again = demo.demo_sweep(out, **_settings(tiny, limit=4))
    ran = run_sweep(again, "serial", progress=False).ran
    kinds = sorted(build_graph(again).jobs[i].kind for i in ran)
    assert kinds == ["cards", "compare", "eval", "eval", "eval", "report"]
    assert json.loads((report / m / "runs" / "q4" / "results.json").read_text())["tasks"]["arc_easy"]["n"] == 4



def test_demo_options_set_the_sweep(tmp_path, capsys):
    out = tmp_path / "d"
    assert main(["demo", "--variants", "q4,q6-hi", "--tasks", "arc_easy", "--limit", "5", "--windows", "3",
                 "--dry-run", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "8 jobs (1 import, 2 convert, 2 eval, 1 compare, 1 cards, 1 report)" in text
    assert "1 tasks x 5 docs; ppl+kld on 3 windows" in text and not out.exists()
    assert main(["demo", "--full", "--dry-run", "-o", str(out)]) == 0
    assert "7 tasks x all docs; ppl+kld on 16 windows" in capsys.readouterr().out
    assert main(["demo", "--tasks", "arc_easy,mmlu", "--dry-run"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    (out / "report").mkdir(parents=True)   # e.g. the folder layout of an older demo: refused, nothing run
    assert main(["demo", "--serial", "-o", str(out)]) == 2
    assert "in the way" in capsys.readouterr().err and list(out.iterdir()) == [out / "report"]


def test_the_demo_is_the_builtin_sweep():
    sweep = load_sweep("demo")
    assert sweep.tasks == list(TASK_NAMES) + ["ppl", "kld"] and len(TASK_NAMES) == 7
    assert [v.label for v in sweep.variants] == ["bf16", "q8-hi", "q6-hi", "qx86-hi", "qx64-hi"]
    assert sweep.out.name == demo.DEFAULT_OUT == "mixq-demo" and sweep.eval["limit"] == 100

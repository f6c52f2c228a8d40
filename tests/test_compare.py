"""mixq compare: tables from synthetic run folders, pairing checks, summaries, plots."""

import argparse
import io
import json
import math
import re

import pytest
from fake_runs import kld_stats, write_run
from rich.console import Console

from mixq.errors import MixqError
from mixq.eval.metrics import proportion_stderr
from mixq.report import compare as cmp
from mixq.report import render, stats

N = 100


def _outs(n_correct: int, n: int = N, flips: list[int] = ()) -> list[int]:
    base = [1] * n_correct + [0] * (n - n_correct)
    for i in flips:
        base[i] ^= 1
    return base


@pytest.fixture
def runs(tmp_path):
    base_arc, base_boolq = _outs(60), _outs(70)
    bf16 = write_run(tmp_path / "bf16", recipe="bf16", size_bytes=270_000_000, bpw=16.0,
                     outcomes={"arc_easy": base_arc, "boolq": base_boolq}, ppl=20.0)
    # q8-hi: two documents flip each way per task -> no difference
    q8 = write_run(tmp_path / "q8", recipe="q8-hi", size_bytes=145_000_000, bpw=8.5,
                   outcomes={"arc_easy": _outs(60, flips=[0, 1, 80, 81]),
                             "boolq": _outs(70, flips=[5, 6, 90, 91])},
                   ppl=20.02, kld=kld_stats(0.0010, 0.0001, 0.985, ln_ratio=0.001, ln_se=0.0004))
    # qx64-hi: loses 12 arc_easy documents the base got right, gains none -> McNemar p = 2/4096
    qx = write_run(tmp_path / "qx64", recipe="qx64-hi", size_bytes=85_000_000, bpw=4.8,
                   outcomes={"arc_easy": _outs(60, flips=list(range(12))), "boolq": _outs(70, flips=[3, 95])},
                   ppl=21.5, kld=kld_stats(0.0300, 0.0015, 0.93, ln_ratio=0.072, ln_se=0.004))
    return [bf16, q8, qx]


def test_table_values_and_tests(runs):
    c = cmp.compare(runs)
    assert c.ref == "bf16"                                  # default: most bits per weight
    assert [v.label for v in c.variants] == ["bf16", "q8-hi", "qx64-hi"]
    arc = next(r for r in c.tasks if r.task == "arc_easy")
    assert arc.cells["bf16"].acc == pytest.approx(0.60)
    assert arc.cells["qx64-hi"].acc == pytest.approx(0.48)
    assert arc.cells["bf16"].se == pytest.approx(proportion_stderr(60, 100))
    d = arc.diffs["qx64-hi"]
    assert d.diff == pytest.approx(-0.12) and d.discordant == (0, 12)
    assert d.p == pytest.approx(2 / 2**12)
    assert d.hi < 0
    q8 = arc.diffs["q8-hi"]
    assert q8.diff == 0 and q8.p == 1.0 and q8.discordant == (2, 2)
    assert c.n_comparisons == 4
    assert arc.p_holm["qx64-hi"] == pytest.approx(4 * 2 / 2**12)
    # ppl ratio is paired because bf16 is the KLD base of the others (ppl_base == bf16's ppl)
    qxv = c.variant("qx64-hi")
    assert qxv.ppl_vs_ref is not None and qxv.ppl_vs_ref.p < 1e-6
    assert c.average is not None and c.average.diffs["qx64-hi"].diff == pytest.approx((-0.12 + 0.0) / 2)


def test_markdown_summary_and_footer(runs):
    c = cmp.compare(runs)
    md = render.to_markdown(c)
    assert "| arc_easy | 0.600 ±0.049 | 0.600 ±0.049 | 0.480 ±0.050 | +0.000 ≈ | -0.120 ** |" in md
    assert "Documents per task: arc_easy 100, boolq 100." in md
    assert "| size on disk | 270.0 MB | 145.0 MB | 85.0 MB | -46.3% | -68.5% |" in md
    assert "| bits per weight | 16.00 | 8.50 | 4.80 | -7.50 | -11.20 |" in md
    assert "| memory to load (est.) | 297.0 MB |" in md            # size + 10%, stated in the notes
    assert "size of the weights + 10%" in md
    assert "mean KLD vs base" in md and "0.0300 ± 0.0015" in md
    summary = "\n".join(c.summary)
    assert "Smallest: qx64-hi at 85.0 MB, 4.80 bits per weight (31% of bf16)" in summary
    assert "Closest to the base by mean KLD: q8-hi (0.0010 ± 0.0001)" in summary
    assert "No task difference between q8-hi and bf16 is significant at 5%" in summary
    assert "qx64-hi vs bf16: significant at 5% on arc_easy -0.120" in summary
    assert "4 task comparisons were tested" in summary and "1 remains significant after Holm" in summary
    assert "hellaswag" not in summary                          # nothing about tasks that were not run


def test_json_has_holm_and_everything(runs, tmp_path):
    c = cmp.compare(runs, ref="q8-hi")
    j = json.loads(json.dumps(render.to_json(c)))
    assert j["ref"] == "q8-hi" and j["paired"] is True and j["n_task_comparisons"] == 4
    arc = next(t for t in j["tasks"] if t["task"] == "arc_easy")
    diff = arc["diff_vs_ref"]["qx64-hi"]
    assert set(diff) >= {"diff", "ci95", "p", "p_holm", "significant", "discordant", "method"}
    assert diff["p_holm"] >= diff["p"]
    assert arc["scores"]["bf16"]["n"] == 100


def test_ref_selection(runs):
    assert cmp.compare(runs, ref="1").ref == "q8-hi"
    assert cmp.compare(runs, ref=2).ref == "qx64-hi"
    assert cmp.compare(runs, ref=str(runs[1])).ref == "q8-hi"      # a folder path (as the demo passes it)
    assert cmp.compare(runs, ref="qx64").ref == "qx64-hi"           # folder name
    with pytest.raises(MixqError, match="no such run"):
        cmp.compare(runs, ref="q3")
    with pytest.raises(MixqError, match="out of range"):
        cmp.compare(runs, ref="7")


def test_metric_acc_norm_uses_correct_norm(tmp_path):
    a = write_run(tmp_path / "a", recipe="bf16", bpw=16, outcomes={"piqa": _outs(50)},
                  norm_outcomes={"piqa": _outs(70)})
    b = write_run(tmp_path / "b", recipe="q6-hi", bpw=6.5, outcomes={"piqa": _outs(50)},
                  norm_outcomes={"piqa": _outs(50)})
    c = cmp.compare([a, b], metric="acc_norm")
    row = c.tasks[0]
    assert row.cells["bf16"].acc == pytest.approx(0.7)
    assert row.diffs["q6-hi"].discordant == (0, 20)
    assert cmp.compare([a, b], metric="acc").tasks[0].diffs["q6-hi"].diff == 0
    with pytest.raises(MixqError, match="--metric"):
        cmp.compare([a, b], metric="f1")


def test_refuses_to_pair_different_documents(tmp_path):
    a = write_run(tmp_path / "a", recipe="bf16", bpw=16, outcomes={"arc_easy": _outs(60)})
    b = write_run(tmp_path / "b", recipe="q6-hi", bpw=6.5, outcomes={"arc_easy": _outs(55)},
                  doc_ids={"arc_easy": list(range(100, 200))})
    with pytest.raises(MixqError, match=r"task arc_easy was scored on different documents.*--unpaired"):
        cmp.compare([a, b])
    c = cmp.compare([a, b], unpaired=True)
    assert not c.paired
    d = c.tasks[0].diffs["q6-hi"]
    assert d.method.startswith("unpaired") and d.diff == pytest.approx(-0.05) and d.lo < -0.05 < d.hi
    md = render.to_markdown(c)
    assert "UNPAIRED" in md and "UNPAIRED" in c.summary[0]


def test_refuses_different_split_and_missing_samples(tmp_path):
    a = write_run(tmp_path / "a", recipe="bf16", bpw=16, outcomes={"boolq": _outs(60)})
    b = write_run(tmp_path / "b", recipe="q6-hi", bpw=6.5, outcomes={"boolq": _outs(60)}, split="test")
    with pytest.raises(MixqError, match="different splits"):
        cmp.compare([a, b])
    (b / "samples.jsonl").unlink()
    with pytest.raises(MixqError, match="samples.jsonl: missing"):
        cmp.compare([a, b])
    c = cmp.compare([a, b], unpaired=True)                 # falls back to results.json counts
    assert c.tasks[0].cells["q6-hi"].n == 100
    with pytest.raises(MixqError, match="not a run folder"):
        cmp.compare([a, tmp_path / "nope"])


def test_unknown_task_in_one_run_only_is_shown_not_compared(tmp_path):
    a = write_run(tmp_path / "a", recipe="bf16", bpw=16, outcomes={"boolq": _outs(60), "piqa": _outs(50)})
    b = write_run(tmp_path / "b", recipe="q6-hi", bpw=6.5, outcomes={"boolq": _outs(60)})
    c = cmp.compare([a, b])
    piqa = next(r for r in c.tasks if r.task == "piqa")
    assert piqa.diffs["q6-hi"] is None and piqa.cells["q6-hi"] is None
    assert c.n_comparisons == 1
    assert "| piqa | 0.500 ±0.050 | — | — |" in render.to_markdown(c)


def test_cli_writes_report_and_plots(runs, tmp_path, capsys):
    p = argparse.ArgumentParser()
    cmp.add_arguments(p)
    out = tmp_path / "report"
    args = p.parse_args([str(r) for r in runs] + ["--ref", "bf16", "-o", str(out)])
    assert cmp.cli(args) == 0
    printed = capsys.readouterr().out
    assert "arc_easy" in printed and "Smallest: qx64-hi" in printed
    assert (out / "comparison.md").read_text().count("| arc_easy |") >= 2   # main table + details
    j = json.loads((out / "comparison.json").read_text())
    assert j["n_task_comparisons"] == 4
    for name in ("accuracy_vs_bpw.png", "kld_vs_bpw.png", "task_bars.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert "![task_bars](task_bars.png)" in (out / "comparison.md").read_text()
    assert not [f for f in out.iterdir() if f.name.startswith(".")]      # no temp files left


def test_ppl_ratio_against_a_non_base_ref_is_conservative(runs):
    c = cmp.compare(runs, ref="q8-hi")
    d = c.variant("qx64-hi").ppl_vs_ref
    assert d.diff == pytest.approx(0.072 - 0.001)
    assert (d.hi - d.lo) / 2 == pytest.approx(stats.z_value() * (0.004 ** 2 + 0.0004 ** 2) ** 0.5)
    assert "conservative" in d.method
    assert c.variant("bf16").ppl_vs_ref is None        # the base has no KLD statistics of its own


def test_single_run_renders(runs):
    c = cmp.compare(runs[:1])
    assert c.others == [] and c.n_comparisons == 0
    assert "a single run, so no differences are tested" in c.summary[0]
    assert "| arc_easy | 0.600 ±0.049 |" in render.to_markdown(c)


def test_label_from_provenance_and_incomplete_note(tmp_path):
    a = write_run(tmp_path / "run-a", recipe=None, bpw=16, outcomes={"boolq": _outs(60)})
    b = write_run(tmp_path / "run-b", recipe=None, bpw=6.5, outcomes={"boolq": _outs(60)})
    res = json.loads((b / "results.json").read_text())
    res["provenance"] = {"recipe": {"name": "q6-hi", "text": "..."}}
    res["complete"] = False
    (b / "results.json").write_text(json.dumps(res))
    c = cmp.compare([a, b])
    assert [v.label for v in c.variants] == ["run-a", "q6-hi"]
    assert any("q6-hi" in n and "incomplete" in n for n in c.notes)


def test_runs_of_different_task_versions_are_refused(tmp_path):
    a = write_run(tmp_path / "a", recipe="bf16", bpw=16, outcomes={"arc_easy": _outs(60), "boolq": _outs(60)})
    b = write_run(tmp_path / "b", recipe="q6-hi", bpw=6.5, outcomes={"arc_easy": _outs(60), "boolq": _outs(60)},
                  task_version={"arc_easy": "1", "boolq": "2"})
    for unpaired in (False, True):
        with pytest.raises(MixqError) as e:
            cmp.compare([a, b], unpaired=unpaired)
        msg = str(e.value)
        assert "\n" not in msg and "task boolq" in msg
        assert f"{b} ran version 2 but {a} ran version 1" in msg
    # a version recorded only in results["task_versions"] (not per task) is read too
    res = json.loads((b / "results.json").read_text())
    del res["tasks"]["boolq"]["version"]
    (b / "results.json").write_text(json.dumps(res))
    with pytest.raises(MixqError, match="task boolq: .* ran version 2 but .* ran version 1"):
        cmp.compare([a, b])


def test_runs_that_record_no_task_version_are_compared_with_a_note(tmp_path):
    a = write_run(tmp_path / "a", recipe="bf16", bpw=16, outcomes={"arc_easy": _outs(60)})
    b = write_run(tmp_path / "b", recipe="q6-hi", bpw=6.5, outcomes={"arc_easy": _outs(58)})
    c = cmp.compare([a, b])
    assert c.task_versions == {"arc_easy": "1"} and c.unversioned == []
    assert not any("versions" in n for n in c.notes)
    assert render.to_json(c)["task_versions"] == {"arc_easy": "1"}
    old = write_run(tmp_path / "old", recipe="q4", bpw=4.5, outcomes={"arc_easy": _outs(50)}, task_version=None)
    c = cmp.compare([a, b, old])
    assert c.tasks[0].diffs["q4"].diff == pytest.approx(-0.10)     # compared as before
    assert c.unversioned == ["q4"]
    assert "Task versions were not recorded by q4 (run by an older `mixq eval`), so they could not be checked " \
           "to match." in render.to_markdown(c)
    assert "versions" not in " ".join(cmp.compare([old]).notes)    # one run: nothing compared, nothing to check


def test_unknown_standard_errors_are_printed_as_unknown(tmp_path):
    # one document per task: every standard error is unknown (NaN), never "nan" and never "± 0"
    a = write_run(tmp_path / "a", recipe="bf16", bpw=16, outcomes={"arc_easy": [1], "boolq": [0]})
    b = write_run(tmp_path / "b", recipe="q6-hi", bpw=6.5, outcomes={"arc_easy": [0], "boolq": [0]},
                  kld=kld_stats(0.03, float("nan"), 0.93))
    for unpaired in (False, True):
        c = cmp.compare([a, b], unpaired=unpaired)
        assert math.isnan(c.tasks[0].cells["bf16"].se)
        md = render.to_markdown(c)
        assert "| arc_easy | 1.000 ±— | 0.000 ±— |" in md
        assert "| mean (2 tasks) | 0.500 ±— | 0.000 ±— |" in md
        assert "0.0300 ± —" in md
        console = Console(file=io.StringIO(), width=300)
        render.print_rich(c, console)
        text = json.dumps(render.to_json(c))
        json.loads(text, parse_constant=lambda s: pytest.fail(f"{s} in the JSON"))
        for out in (md, console.file.getvalue(), text):
            assert not re.search(r"\bnan\b", out, re.I) and not re.search(r"±\s?0(\.0+)?(?![.\d])", out)
    # unpaired, the task mean's difference has no known interval or p: not marked significant
    assert "| mean (2 tasks) | q6-hi | -0.500 ≈ | — | — |" in md
    assert "q6-hi -0.500 — (not significant)" in " ".join(c.summary)


def test_bad_sample_records_are_one_line_errors(tmp_path):
    a = write_run(tmp_path / "a", recipe="bf16", bpw=16, outcomes={"boolq": _outs(60)})
    b = write_run(tmp_path / "b", recipe="q6-hi", bpw=6.5, outcomes={"boolq": _outs(60)})
    lines = (b / "samples.jsonl").read_text().splitlines()
    (b / "samples.jsonl").write_text("\n".join(lines[:3] + ['{"task": "boolq", "correct": 1}'] + lines[3:]) + "\n")
    with pytest.raises(MixqError, match=r"samples.jsonl: bad sample record .*doc_id.*re-run `mixq eval`"):
        cmp.compare([a, b])
    (b / "samples.jsonl").write_text("\n".join(lines[:3] + ["{not json"] + lines[3:]) + "\n")
    with pytest.raises(MixqError, match=r"samples.jsonl:4: bad sample line"):
        cmp.compare([a, b])


def test_single_run_has_no_comparison_notes(runs):
    c = cmp.compare(runs[:1])
    notes = " ".join(c.notes)
    assert "Documents per task" in notes and "Holm" not in notes and "Δ" not in notes
    assert "The mean row averages the tasks every run has." in notes

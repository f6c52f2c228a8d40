"""Tests for mixq.tune.measure on a tiny random model: sane damages, both methods, resume."""

import json
import math

import pytest
import torch
from scipy.stats import spearmanr
from transformers import AutoModelForCausalLM

import mixq.tune.measure as M
from mixq.errors import MixqError
from mixq.tune.measure import Measurer, load_measurement, measure, smoothed_damages


@pytest.fixture(scope="module")
def tiny(tiny_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("measure")
    src = tiny_model("llama", num_hidden_layers=2)
    calib = d / "calib.txt"
    calib.write_text(("The quick brown fox jumps over the lazy dog. Paris is the capital of France. "
                      "Quantization maps each group of weights to a few bits. 0 1 2 3 4 5 6 7 8 9.\n") * 40)
    return src, calib, d


def _method_calib(calib):
    """gptq/awq's calibration for a measurement of the tiny text: every 64-token window of it."""
    from mixq.tune.calib import CalibConfig

    return CalibConfig(str(calib), samples=12, length=64)


def _mean_damage(doc, bits, gs=32):
    vals = [r["damage"][f"{bits}:{gs}"] for r in doc["tensors"].values() if f"{bits}:{gs}" in r["damage"]]
    return sum(vals) / len(vals)


@pytest.mark.parametrize("method", ["fisher", "direct"])
def test_measure_tiny_model_gives_monotone_damages(tiny, method):
    src, calib, d = tiny
    out = d / f"m_{method}.json"
    groups = (32, 64) if method == "fisher" else (32,)  # direct: one forward per tensor x candidate
    doc = measure(str(src), levels=(3, 4, 8), group_sizes=groups, calib=str(calib), tokens=128, ctx=64,
                  out=out, method=method, direct="all", draws=4, progress=False)
    doc = load_measurement(out)
    assert doc["complete"]
    # every quantizable 2-D weight: embed + 7 per layer (tied head: no lm_head)
    assert len(doc["tensors"]) == 1 + 7 * 2
    assert doc["calib"]["n_windows"] == 2 and doc["calib"]["ctx"] == 64
    modes = {"mxfp4", "nvfp4", "mxfp8"}   # the float modes are candidates by default
    assert doc["candidates"] == [f"{b}:{g}" for b in (3, 4, 8) for g in groups] + ["mxfp4", "nvfp4", "mxfp8"]
    for r in doc["tensors"].values():
        assert set(r["damage"]) == {f"{b}:{g}" for b in (3, 4, 8) for g in groups} | modes
        assert all(math.isfinite(v) and v >= 0 for v in r["damage"].values())
    # 8-bit floats damage less than 4-bit floats
    assert sum(r["damage"]["mxfp8"] < r["damage"]["mxfp4"] for r in doc["tensors"].values()) \
        >= 0.8 * len(doc["tensors"])
    # fewer bits -> more damage, on average and for most tensors
    assert _mean_damage(doc, 3) > _mean_damage(doc, 4) > _mean_damage(doc, 8) > 0
    ordered = sum(r["damage"]["3:32"] > r["damage"]["4:32"] > r["damage"]["8:32"] for r in doc["tensors"].values())
    assert ordered >= 0.8 * len(doc["tensors"])


def test_fisher_estimate_tracks_direct_measurement(tiny):
    src, calib, d = tiny
    f = load_measurement(d / "m_fisher.json") if (d / "m_fisher.json").exists() else None
    g = load_measurement(d / "m_direct.json") if (d / "m_direct.json").exists() else None
    if f is None or g is None:
        pytest.skip("needs the two measurements of the test above")
    keys = [(n, k) for n in g["tensors"] for k in g["tensors"][n]["damage"]]
    a = [f["tensors"][n]["damage"][k] for n, k in keys]
    b = [g["tensors"][n]["damage"][k] for n, k in keys]
    assert spearmanr(a, b).statistic > 0.9


def test_measure_refuses_existing_file_and_resumes(tiny):
    src, calib, d = tiny
    out = d / "resume.json"
    only = ["model.layers.0.mlp.down_proj.weight", "model.layers.1.self_attn.q_proj.weight"]
    measure(str(src), levels=(4,), group_sizes=(32,), calib=str(calib), tokens=64, ctx=64, out=out,
            method="direct", direct="all", progress=False, only=only[:1])
    with pytest.raises(MixqError, match="--resume"):
        measure(str(src), levels=(4,), group_sizes=(32,), calib=str(calib), tokens=64, ctx=64, out=out,
                method="direct", direct="all", progress=False, only=only)
    first = json.loads(out.read_text())["tensors"][only[0]]
    doc = measure(str(src), levels=(4,), group_sizes=(32,), calib=str(calib), tokens=64, ctx=64, out=out,
                  method="direct", direct="all", progress=False, only=only, resume=True)
    assert set(doc["tensors"]) == set(only)
    assert doc["tensors"][only[0]] == first  # kept, not re-measured
    with pytest.raises(MixqError, match="another"):
        measure(str(src), levels=(3,), group_sizes=(32,), calib=str(calib), tokens=64, ctx=64, out=out,
                method="direct", direct="all", progress=False, only=only, resume=True)


def test_fisher_resume_continues_from_saved_windows(tiny, monkeypatch):
    src, calib, d = tiny
    kw = dict(levels=(4,), group_sizes=(32,), calib=str(calib), tokens=128, ctx=64, method="fisher", draws=2,
              progress=False)
    full = measure(str(src), out=d / "f_full.json", **kw)
    assert full["fisher_state"]["windows_done"] == 2
    real_write = M.write_atomic

    def write_then_stop(path, data):  # interrupted right after the first window was saved
        real_write(path, data)
        raise KeyboardInterrupt

    monkeypatch.setattr(M, "write_atomic", write_then_stop)
    with pytest.raises(KeyboardInterrupt):
        measure(str(src), out=d / "f_part.json", **kw)
    monkeypatch.setattr(M, "write_atomic", real_write)
    part = load_measurement(d / "f_part.json")
    assert part["windows_done"] == 1 and not part["complete"]
    resumed = measure(str(src), out=d / "f_part.json", resume=True, **kw)
    assert resumed["complete"]
    for n, r in full["tensors"].items():
        assert resumed["tensors"][n]["damage"]["4:32"] == pytest.approx(r["damage"]["4:32"], rel=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_partial_forward_from_cached_layer_equals_full_forward(tiny_model, arch):
    src = tiny_model(arch, num_hidden_layers=4)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ids = torch.randint(0, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    m = Measurer(model, ids)
    assert m.kld(m.forward_from(3)) == 0.0  # stubs below layer 3 reproduce the base exactly
    p = dict(model.named_parameters())["model.layers.2.mlp.up_proj.weight"]
    with torch.no_grad():
        p.add_(torch.randn_like(p) * 0.05)
        full = model(input_ids=ids).logits[:, :-1].reshape(-1, model.config.vocab_size)
        part, _ = m.forward_from(2)
    assert torch.allclose(part, full, atol=1e-5)
    assert m.kld((part, torch.logsumexp(part.double(), -1))) > 0


def test_smoothed_damages_follow_the_step_law_and_pool_noise():
    law = {f"{b}:{g}": (3.0 if g == 64 else 2.0) / (2 ** b - 1) ** 2 for b in (3, 4, 5, 6, 8) for g in (32, 64)}
    noisy = dict(law)
    noisy["6:32"] *= 6.0       # one noisy sample: 6-bit g32 looks worse than 6-bit g64
    out = smoothed_damages({"tensors": {"t": {"damage": law}, "n": {"damage": noisy}}})
    assert out["t"] == pytest.approx(law)
    d = out["n"]
    for g in (32, 64):
        assert d[f"3:{g}"] > d[f"4:{g}"] > d[f"5:{g}"] > d[f"6:{g}"] > d[f"8:{g}"]
    for b in (3, 4, 5, 6, 8):
        assert d[f"{b}:32"] <= d[f"{b}:64"]


def test_measure_cli_device_cpu(tiny, capsys):
    """`mixq measure --device cpu --max-memory 0` measures what the API's defaults measure, and states its peak
    memory."""
    from mixq.cli import main

    src, calib, d = tiny
    kw = dict(levels=(4,), group_sizes=(32,), modes=(), calib=str(calib), tokens=64, ctx=64, method="fisher",
              draws=2, progress=False)
    api = measure(str(src), out=d / "api.json", **kw)
    argv = ["measure", str(src), "--levels", "4", "--group-sizes", "32", "--modes", "none", "--calib", str(calib),
            "--tokens", "64", "--ctx", "64", "--draws", "2", "--device", "cpu", "--max-memory", "0",
            "-o", str(d / "cli.json")]
    assert main(argv) == 0
    assert "peak memory:" in capsys.readouterr().out
    cli = load_measurement(d / "cli.json")
    assert cli["tensors"] == api["tensors"] and len(cli["tensors"]) == 1 + 7 * 2


@pytest.mark.parametrize("recipe", ["q4", "qx86-hi", "mxfp4"])
def test_round_trips_in_place_equal_the_recipe_on_the_fly(tiny_model, recipe):
    """`apply_round_trips` (what the benchmarks and measurements set a model to) computes what `mixq eval
    MODEL@RECIPE` computes: same logits, bit for bit."""
    from mixq.eval.engine import load_model
    from mixq.quant.prepare import prepare

    src = tiny_model("llama", num_hidden_layers=2)
    prep = prepare(str(src), recipe, "bfloat16")
    base = load_model(str(src), progress=False).model
    originals = {k: v.detach().clone() for k, v in base.named_parameters()}
    cache: dict = {}
    M.apply_round_trips(base, prep.plan, originals, cache)
    assert cache and all(k[1] is not None for k in cache)
    fly = load_model(f"{src}@{recipe}", dtype="float32", progress=False, packed=False).model
    ids = torch.tensor([[1, 5, 9, 42, 7, 3, 100, 11]])
    with torch.no_grad():
        assert torch.equal(base(ids).logits, fly(ids).logits)


def _gptq_and_rtn(tiny, tmp_path, **kw):
    src, calib, _ = tiny
    kw = dict(levels=(2, 3), group_sizes=(32,), modes=("mxfp4",), calib=str(calib), tokens=128, ctx=64,
              direct="all", progress=False, **kw)
    return measure(str(src), out=tmp_path / "gptq.json", quant="gptq", method_calib=_method_calib(calib), **kw), \
        measure(str(src), out=tmp_path / "rtn.json", **kw)


def test_measure_under_gptq_damages_at_most_rtn_and_plans(tiny, tmp_path):
    """`--method gptq` (direct KLD): each decoder linear and the tied head/embedding is perturbed by what convert's
    GPTQ stores, float-mode candidates too; every decoder linear's damage is at or below round to nearest's (the
    tied head/embedding's too at the affine candidates; at mxfp4 it measured 1.15x rtn's here: GPTQ fits the head's
    outputs, not its role as the embedding); `mixq plan` on it writes a valid recipe that says method = "gptq" for
    every quantized tensor."""
    from mixq.quant.recipe import parse_recipe
    from mixq.tune.allocate import allocate

    gq, rtn = _gptq_and_rtn(tiny, tmp_path, method="direct")
    assert gq["quant_method"] == "gptq" and rtn["quant_method"] == "rtn"
    assert gq["tensors"].keys() == rtn["tensors"].keys() and len(gq["tensors"]) == 1 + 7 * 2
    for name in gq["tensors"]:
        g, r = gq["tensors"][name]["damage"], rtn["tensors"][name]["damage"]
        for key in ("2:32", "3:32") if "embed_tokens" in name else ("2:32", "3:32", "mxfp4"):
            assert g[key] <= r[key] * 1.02, (name, key, g[key], r[key])
    for key in ("3:32", "mxfp4"):
        assert sum(t["damage"][key] for t in gq["tensors"].values()) < \
            0.8 * sum(t["damage"][key] for t in rtn["tensors"].values())
    alloc = allocate(str(tiny[0]), gq, target_bpw=4.0)
    assert alloc.total_bytes <= alloc.target_bytes and parse_recipe(alloc.text).method == "gptq"
    assert f"gptq fitted on {tiny[1]} (" in alloc.text   # the plan says which calibration its damages assume
    with pytest.raises(MixqError, match="older mixq"):   # a gptq measurement fitted on its own windows
        allocate(str(tiny[0]), {**gq, "revision": 1}, target_bpw=4.0)
    allocate(str(tiny[0]), {**rtn, "revision": 1}, target_bpw=4.0)   # rtn's damages mean what they meant
    assert {tp.method for tp in alloc.plan.quantized} == {"gptq"}
    assert {tp.method for tp in allocate(str(tiny[0]), rtn, target_bpw=4.0).plan.quantized} == {"rtn"}


def test_measure_under_gptq_fisher_sums_below_rtn(tiny, tmp_path):
    """The Fisher estimate under gptq: the summed damage per candidate is below rtn's (same windows, same label
    draws; per tensor the estimate is noisy at few draws)."""
    gq, rtn = _gptq_and_rtn(tiny, tmp_path, method="fisher", draws=16)
    for key in ("2:32", "3:32"):
        g, r = (sum(t["damage"][key] for t in d["tensors"].values()) for d in (gq, rtn))
        assert g < 0.8 * r, (key, g, r)


def test_method_options_of_measure_and_plan(tiny, tmp_path):
    """measure: --method names the quantization method (rtn, gptq) and, as before, fisher/direct the estimator;
    plan: --method gptq refuses a measurement made under rtn."""
    import argparse

    from mixq.cli import main
    from mixq.tune.measure import method_options

    def opts(method=None, estimator=None):
        return method_options(argparse.Namespace(method=method, estimator=estimator))

    assert opts() == ("rtn", "fisher") and opts("gptq", "direct") == ("gptq", "direct")
    assert opts("direct") == ("rtn", "direct") and opts("fisher", "fisher") == ("rtn", "fisher")
    with pytest.raises(MixqError, match="--estimator"):
        opts("direct", "fisher")
    src, calib, _ = tiny
    m = tmp_path / "m.json"
    measure(str(src), levels=(4,), group_sizes=(32,), modes=(), calib=str(calib), tokens=64, ctx=64, draws=1,
            progress=False, out=m)
    assert main(["plan", str(src), "--target-bpw", "5", "--measurement", str(m), "--method", "gptq",
                 "-o", str(tmp_path / "r.toml")]) == 2
    assert not (tmp_path / "r.toml").exists()


@pytest.mark.parametrize("quant", ["awq", "awq+gptq"])
def test_measure_under_awq_below_rtn_and_plans(tiny, tmp_path, quant):
    """`--method awq` (direct KLD): each decoder linear is perturbed by tune/awq.py's `awq_round_trip` (its own
    scale and the clipping search; o_proj under grouped-query attention and the tied head/embedding: clipping
    only), float-mode candidates too; the summed damage is well below rtn's; `mixq plan` on it writes method = "awq".
    `--method awq+gptq` likewise (the scale kept where GPTQ's error is lower with it, then GPTQ)."""
    from mixq.quant.recipe import parse_recipe
    from mixq.tune.allocate import allocate

    src, calib, _ = tiny
    kw = dict(levels=(2, 3), group_sizes=(32,), modes=("mxfp4",), calib=str(calib), tokens=128, ctx=64,
              direct="all", progress=False, method="direct")
    aw = measure(str(src), out=tmp_path / "awq.json", quant=quant, method_calib=_method_calib(calib), **kw)
    rtn = measure(str(src), out=tmp_path / "rtn.json", **kw)
    assert aw["quant_method"] == quant and aw["tensors"].keys() == rtn["tensors"].keys()
    for key in ("2:32", "3:32", "mxfp4"):   # awq's mxfp4 measured only 4% below rtn here (power-of-two scales)
        a, r = (sum(t["damage"][key] for t in d["tensors"].values()) for d in (aw, rtn))
        assert a < (0.99 if key == "mxfp4" else 0.8) * r, (key, a, r)
    alloc = allocate(str(src), aw, target_bpw=4.0)
    assert alloc.total_bytes <= alloc.target_bytes and parse_recipe(alloc.text).method == quant
    assert {tp.method for tp in alloc.plan.quantized if tp.spec.mode == "affine"} == {quant}


def test_gptq_measurement_never_fits_on_the_measured_windows(tiny, tmp_path):
    """Under gptq the Hessians come from the calibration text, less every window that shares a token with the
    measured ones (GPTQ fitted on the scored tokens underrated its damage ~3x on smollm2); provenance says which."""
    from mixq.tune.calib import CalibConfig, calibration, without_span
    from mixq.tune.measure import measure

    src, calib, _ = tiny
    doc = measure(str(src), levels=(3,), group_sizes=(32,), modes=(), calib=str(calib), tokens=128, ctx=64,
                  draws=1, progress=False, out=tmp_path / "g.json", quant="gptq", method_calib=_method_calib(calib))
    span = (doc["calib"]["first_window"] * 64, (doc["calib"]["first_window"] + 2) * 64)
    info = doc["method_calib"]
    assert info["file"] == str(calib) and info["samples_used"] == len(info["token_starts"]) <= 12
    assert all(s + 64 <= span[0] or s >= span[1] for s in info["token_starts"])
    # every window of the file: those over the measured span are dropped, the rest kept
    from mixq.eval.engine import load_model

    tok = load_model(str(src), dtype="float32", progress=False).tokenizer
    whole = calibration(tok, CalibConfig(str(calib), samples=span[1] // 64, length=64))
    kept = without_span(whole, calib, *span)
    assert kept.info["dropped_overlapping"] == [s for s in whole.info["token_starts"] if s >= span[0]] != []
    assert kept.ids.shape[0] == whole.ids.shape[0] - 2 and kept.info["samples_used"] == kept.ids.shape[0]
    assert torch.equal(kept.ids, whole.ids[:-2])
    with pytest.raises(MixqError, match="every calibration window overlaps"):
        without_span(whole, calib, 0, span[1])
    assert without_span(whole, tmp_path / "other.txt", 0, span[1]).ids.shape == whole.ids.shape


def test_measure_refuses_bad_method_calibration_by_its_option(tiny, tmp_path, capsys):
    from mixq.cli import main

    src, calib, _ = tiny
    for opts, name in ((["--method-calib-samples", "0"], "--method-calib-samples 0"),
                       (["--method-calib", str(tmp_path / "none.txt")], "--method-calib ")):
        assert main(["measure", str(src), "--method", "gptq", "--calib", str(calib), *opts,
                     "-o", str(tmp_path / "m.json")]) == 2
        err = capsys.readouterr().err
        assert name in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "m.json").exists()


def test_plan_caches_a_measurement_per_method_and_calibration(tmp_path, monkeypatch):
    """`mixq plan --method gptq` measuring now caches one file per model, method and calibration fitted on."""
    from mixq.tune.allocate import default_measurement_path
    from mixq.tune.calib import CalibConfig

    monkeypatch.setenv("MIXQ_CACHE", str(tmp_path))
    text = tmp_path / "t.txt"
    text.write_text("some text\n")
    paths = {default_measurement_path("m", q, c) for q in ("gptq", "awq")
             for c in (None, CalibConfig(samples=32), CalibConfig(seed=1), CalibConfig(str(text)))}
    assert len(paths) == 8
    assert default_measurement_path("m") == default_measurement_path("m", "rtn", CalibConfig(samples=32))
    assert default_measurement_path("m", "gptq") == default_measurement_path("m", "gptq", CalibConfig())


def test_calibrated_quant_needs_inputs_apart_from_the_measured_windows(tiny):
    """No path fits gptq/awq on the measured windows themselves: without method_inputs they refuse."""
    src, _, _ = tiny
    model = AutoModelForCausalLM.from_pretrained(str(src), torch_dtype=torch.float32)
    ids = torch.randint(0, 100, (1, 16))
    for quant in ("gptq", "awq"):
        with pytest.raises(ValueError, match="method_inputs"):
            Measurer(model, ids, quant=quant)
        with pytest.raises(ValueError, match="method_inputs"):
            M.measure_fisher(model, {}, None, out=None, header={}, quant=quant)
    assert Measurer(model, ids).method_inputs == ({}, {})

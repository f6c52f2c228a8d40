"""Tests for mixq.tune.allocate (`mixq plan`): the multiple-choice knapsack and the recipe it writes."""

import itertools
import json
import math
import re
import shutil

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from mixq.cli import main
from mixq.errors import MixqError
from mixq.eval.engine import load_model
from mixq.quant.artifact import module_spec, read_artifact
from mixq.quant.convert import convert
from mixq.quant.plan import plan_model
from mixq.quant.prepare import prepare
from mixq.quant.recipe import load_recipe
from mixq.quant.spec import Spec
from mixq.tune.allocate import allocate, parse_size, solve_mck
from mixq.tune.measure import FORMAT, candidate_table, key_of, parse_key


def brute_force_mck(costs, damages, budget: int) -> tuple[list[int], float] | None:
    """Exhaustive search: the optimum solve_mck must match."""
    best = None
    for pick in itertools.product(*[range(len(c)) for c in costs]):
        c = sum(int(costs[i][j]) for i, j in enumerate(pick))
        if c > budget:
            continue
        d = sum(float(damages[i][j]) for i, j in enumerate(pick))
        if best is None or d < best[1]:
            best = (list(pick), d)
    return best


def _instance(rng, n, k, scale):
    costs, dmgs = [], []
    for _ in range(n):
        c = rng.integers(1, scale, size=k)
        d = rng.random(k) * 10
        costs.append(c)
        dmgs.append(d)
    return costs, dmgs


@pytest.mark.parametrize("seed", range(40))
def test_knapsack_matches_brute_force_when_exact(seed):
    rng = np.random.default_rng(seed)
    n, k = int(rng.integers(2, 7)), int(rng.integers(2, 5))
    costs, dmgs = _instance(rng, n, k, 60)
    lo, hi = sum(c.min() for c in costs), sum(c.max() for c in costs)
    budget = int(rng.integers(lo, hi + 1))
    bf = brute_force_mck(costs, dmgs, budget)
    res = solve_mck(costs, dmgs, budget)  # free budget < bucket count: bucket size 1, exact
    assert res.cost <= budget
    assert res.cost == sum(int(costs[i][j]) for i, j in enumerate(res.choice))
    assert res.damage == pytest.approx(bf[1], abs=1e-9)
    assert res.lower_bound <= res.damage + 1e-9


@pytest.mark.parametrize("seed", range(30))
def test_knapsack_coarse_buckets_honour_budget_and_stay_near_optimum(seed):
    rng = np.random.default_rng(1000 + seed)
    n, k = 6, 4
    # byte-scale sizes like real tensors (monotone: more bytes -> less damage)
    costs, dmgs = [], []
    for _ in range(n):
        size = int(rng.integers(10_000, 2_000_000))
        c = np.sort(rng.integers(size // 4, size, size=k))
        d = np.sort(rng.random(k))[::-1] * rng.random() * 5
        costs.append(c)
        dmgs.append(d)
    lo, hi = sum(c.min() for c in costs), sum(c.max() for c in costs)
    budget = int(rng.integers(lo, hi + 1))
    bf = brute_force_mck(costs, dmgs, budget)
    res = solve_mck(costs, dmgs, budget, buckets=300)  # deliberately coarse
    assert res.cost <= budget  # in real bytes, never over
    assert res.damage >= bf[1] - 1e-9
    assert res.damage <= bf[1] + 0.05 * max(bf[1], 1e-9) + 1e-9
    fine = solve_mck(costs, dmgs, budget, buckets=200_000)
    assert fine.cost <= budget
    assert fine.damage <= bf[1] + 0.005 * max(bf[1], 1e-9) + 1e-9


def test_budget_exactly_at_an_achievable_total_is_reached():
    costs = [np.array([100, 300]), np.array([50, 251]), np.array([7, 8])]
    dmgs = [np.array([1.0, 0.0]), np.array([2.0, 0.0]), np.array([0.5, 0.0])]
    res = solve_mck(costs, dmgs, 300 + 251 + 8, buckets=3)
    assert res.cost == 559 and res.damage == 0.0
    res = solve_mck(costs, dmgs, 300 + 251 + 7, buckets=3)
    assert res.cost <= 558 and res.damage == pytest.approx(0.5)


def test_knapsack_infeasible_budget_is_a_user_error():
    with pytest.raises(MixqError, match="smallest possible size"):
        solve_mck([np.array([10, 20])], [np.array([1.0, 0.0])], 9)


# ---------------------------------------------------------------- recipes from a measurement

def _fake_damage(s, c: Spec, mode_factor=1.0):
    return s * 4.0 ** -c.bits * (1 + c.group_size / 128) * (mode_factor if c.mode != "affine" else 1.0)


def _fake_measurement(prep, specs, seed=0, mode_factor=1.0):
    """Damages like real ones: ~ 4^-bits, larger groups worse, a per-tensor sensitivity spread over decades
    (float modes: times `mode_factor`)."""
    rng = np.random.default_rng(seed)
    specs = [parse_key(c) if isinstance(c, str) else Spec(*c) for c in specs]
    table = candidate_table(prep, specs)
    tensors = {}
    for name, (dtype, cands) in table.items():
        s = 10 ** rng.uniform(-3, 1)
        tensors[name] = {"dtype": dtype, "damage": {key_of(c): _fake_damage(s, c, mode_factor) for c in cands}}
    return {"format": FORMAT, "model": "tiny", "candidates": [key_of(c) for c in specs], "complete": True,
            "method": "fake", "calib": {}, "tensors": tensors}


@pytest.fixture
def tiny_src(tiny_model):
    return tiny_model("llama", num_hidden_layers=4)


def test_planned_recipe_roundtrips_through_convert_with_predicted_size(tiny_src, tmp_path):
    prep = prepare(str(tiny_src), "bf16")
    meas = _fake_measurement(prep, [(b, g) for b in (3, 4, 5, 6, 8) for g in (32, 64)])
    q4 = plan_model([i for i, _ in prep.items], "q4-hi", prep.config)
    q8 = plan_model([i for i, _ in prep.items], "q8-hi", prep.config)
    target = (q4.bits_per_weight + q8.bits_per_weight) / 2
    alloc = allocate(str(tiny_src), meas, target_bpw=target, prep=prep)
    assert alloc.total_bytes <= alloc.target_bytes
    assert alloc.bits_per_weight <= target
    assert len({c for c in alloc.choices.values()}) > 1  # genuinely mixed
    recipe_file = tmp_path / "plan.toml"
    recipe_file.write_text(alloc.text)
    assert "predicted KLD" in alloc.text and "# damage" in alloc.text
    # the recipe plans to exactly the predicted size and choices
    plan = plan_model([i for i, _ in prep.items], load_recipe(str(recipe_file)), prep.config)
    assert plan.total_bytes == alloc.total_bytes
    assert plan.bits_per_weight == pytest.approx(alloc.bits_per_weight)
    # ... and converts to it: stored tensor bytes == predicted
    out = convert(str(tiny_src), tmp_path / "out", recipe=str(recipe_file), progress=False)
    assert read_artifact(out).size_bytes == alloc.total_bytes
    q = json.loads((out / "config.json").read_text())["quantization"]
    for name, c in alloc.choices.items():
        if c is not None:
            assert Spec(*module_spec(q, name.removesuffix(".weight"))) == c


def test_plan_more_budget_never_predicts_more_damage(tiny_src):
    prep = prepare(str(tiny_src), "bf16")
    meas = _fake_measurement(prep, [(b, 32) for b in (3, 4, 6, 8)], seed=3)
    prev = None
    for bpw in (4.6, 5.0, 6.0, 7.0, 9.0):
        a = allocate(str(tiny_src), meas, target_bpw=bpw, prep=prep)
        assert a.total_bytes <= a.target_bytes
        assert a.lower_bound <= a.predicted_kld + 1e-12
        if prev is not None:
            assert a.predicted_kld <= prev + 1e-12
        prev = a.predicted_kld


def test_plan_target_below_smallest_is_a_user_error(tiny_src):
    prep = prepare(str(tiny_src), "bf16")
    meas = _fake_measurement(prep, [(4, 32)])
    with pytest.raises(MixqError, match="smallest reachable"):
        allocate(str(tiny_src), meas, target_bpw=1.0, prep=prep)
    assert parse_size("1.2GB") == 1_200_000_000 and parse_size("512MiB") == 512 * 2**20
    with pytest.raises(MixqError):
        parse_size("big")


def test_mixq_plan_cli_writes_a_recipe_that_load_recipe_reads(tiny_src, tmp_path):
    prep = prepare(str(tiny_src), "bf16")
    mfile = tmp_path / "m.json"
    mfile.write_text(json.dumps(_fake_measurement(prep, [(4, 32), (6, 32), (8, 32)])))
    out = tmp_path / "r.toml"
    assert main(["plan", str(tiny_src), "--target-bpw", "7.5", "--measurement", str(mfile), "-o", str(out)]) == 0
    r = load_recipe(str(out))
    assert r.default is None and len(r.rules) == len(json.loads(mfile.read_text())["tensors"])
    assert main(["plan", str(tiny_src), "--target-bpw", "1", "--measurement", str(mfile), "-o", str(out)]) == 2


# ---------------------------------------------------------------- issue 17: the planned size is the size you get

def _float32_copy(src, dst):
    """A copy of a tiny HF folder stored in float32 (weights and config.json's dtype), like the embedded SmolLM2."""
    shutil.copytree(src, dst)
    f = dst / "model.safetensors"
    save_file({k: v.float() for k, v in load_file(f).items()}, f, metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    cfg["dtype"] = "float32"
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="module")
def float32_src(tiny_model, tmp_path_factory):
    return _float32_copy(tiny_model("llama", num_hidden_layers=4), tmp_path_factory.mktemp("f32") / "src")


@pytest.mark.parametrize("source,dtype", [("float32", None), ("bfloat16", None), ("float32", "float16")])
def test_planned_size_is_the_size_of_every_artifact(tiny_src, float32_src, tmp_path, capsys, source, dtype):
    src = str(float32_src if source == "float32" else tiny_src)
    stored = dtype or source
    # the target: qx86-hi's bits per weight at the storage dtype (the example: 8.53 bpw for float32)
    qx86 = prepare(src, "qx86-hi", dtype).plan
    assert qx86.recipe.dtype is None and qx86.tensors[0].dtype == stored
    target = round(qx86.bits_per_weight, 2)
    mfile = tmp_path / "m.json"
    mfile.write_text(json.dumps(_fake_measurement(prepare(src, None, dtype), [(b, g) for b in (3, 4, 6, 8)
                                                                               for g in (32, 64)])))
    recipe = tmp_path / "p.toml"
    argv = ["plan", src, "--target-bpw", str(target), "--measurement", str(mfile), "-o", str(recipe)]
    assert main(argv + (["--dtype", dtype] if dtype else [])) == 0
    text = recipe.read_text()
    planned = int(re.search(r"planned size: ([\d,]+) bytes", text).group(1).replace(",", ""))
    assert f"{planned:,} bytes" in capsys.readouterr().out
    assert load_recipe(str(recipe)).dtype == stored
    n_params = qx86.total_params
    assert planned <= math.floor(target * n_params / 8)
    # plan-show and convert --dry-run print prepare()'s plan: the same bytes
    assert prepare(src, str(recipe)).plan.total_bytes == planned
    for argv in (["plan-show", src, "--recipe", str(recipe)], ["convert", src, str(tmp_path / "dry"), "--recipe",
                                                                str(recipe), "--dry-run"]):
        assert main(argv) == 0
        assert f"size: {planned:,} bytes" in capsys.readouterr().out
    # converted: the folder's tensor bytes
    art = read_artifact(convert(src, tmp_path / "out", recipe=str(recipe), progress=False))
    assert art.size_bytes == planned and art.n_params == n_params
    assert art.bits_per_weight <= target
    assert {t.dtype for t in art.tensors if t.dtype != "uint32"} == {stored}
    # applied on the fly (MODEL@RECIPE and --recipe)
    for ref, kw in ((src, {"recipe": str(recipe)}), (f"{src}@{recipe}", {})):
        info = load_model(ref, progress=False, **kw).info
        assert info.size_bytes == planned and info.bits_per_weight <= target


def test_plan_dtype_option_is_checked(tiny_src, tmp_path):
    mfile = tmp_path / "m.json"
    mfile.write_text(json.dumps(_fake_measurement(prepare(str(tiny_src), None), [(4, 32)])))
    argv = ["plan", str(tiny_src), "--target-bpw", "6", "--measurement", str(mfile), "-o", str(tmp_path / "p.toml")]
    with pytest.raises(SystemExit):
        main(argv + ["--dtype", "float8"])


# ---------------------------------------------------------------- issue 14: modes among the candidates

def test_plan_chooses_among_modes(tiny_src, tmp_path, capsys):
    """With the float modes measured, the knapsack takes mxfp4 where it is cheaper for the same damage
    (4.25 bpw vs 4-bit g32's 4.5 at bfloat16), writes `mode = ...` rules, and the recipe converts to them."""
    prep = prepare(str(tiny_src), "bf16")
    specs = [(b, g) for b in (3, 4, 6, 8) for g in (32, 64)] + ["mxfp4", "nvfp4", "mxfp8"]
    meas = _fake_measurement(prep, specs, mode_factor=1.0)   # mxfp4 damage = 4-bit g32's, at fewer bytes
    alloc = allocate(str(tiny_src), meas, target_bpw=5.0, prep=prep)
    chosen = {c for c in alloc.choices.values() if c is not None}
    assert Spec(4, 32, "mxfp4") in chosen and Spec(4, 32) not in chosen   # dominated by mxfp4
    assert 'mode = "mxfp4"' in alloc.text and "# parameters: " in alloc.text and "mxfp4" in alloc.text
    recipe = tmp_path / "p.toml"
    recipe.write_text(alloc.text)
    plan = prepare(str(tiny_src), str(recipe)).plan
    assert plan.total_bytes == alloc.total_bytes and plan.total_bytes <= alloc.target_bytes
    out = convert(str(tiny_src), tmp_path / "out", recipe=str(recipe), progress=False)
    art = read_artifact(out)
    assert art.size_bytes == alloc.total_bytes
    q = json.loads((out / "config.json").read_text())["quantization"]
    for name, c in alloc.choices.items():
        if c is not None:
            assert Spec(*module_spec(q, name.removesuffix(".weight"))) == c
            assert art.spec(name).mode == c.mode
    # modes that cost more for the same damage are never taken
    worse = _fake_measurement(prep, specs, mode_factor=100.0)
    a2 = allocate(str(tiny_src), worse, target_bpw=5.0, prep=prep)
    assert all(c is None or c.mode == "affine" for c in a2.choices.values())
    # the CLI reports the chosen mix
    mfile = tmp_path / "m.json"
    mfile.write_text(json.dumps(meas))
    assert main(["plan", str(tiny_src), "--target-bpw", "5", "--measurement", str(mfile), "-o",
                 str(tmp_path / "r.toml")]) == 0
    assert re.search(r"chosen mix \(share of the parameters\): .*mxfp4 \d", capsys.readouterr().out)


def test_measurement_keys_round_trip():
    assert key_of(Spec(4, 64)) == "4:64" and parse_key("4:64") == Spec(4, 64)
    for m in ("mxfp4", "nvfp4", "mxfp8"):
        assert key_of(parse_key(m)) == m and parse_key(m).mode == m
    with pytest.raises(MixqError, match="neither bits:group nor a mode"):
        parse_key("fp4")

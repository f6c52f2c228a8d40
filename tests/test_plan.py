"""Tests for mixq.plan: the multiple-choice knapsack and the recipe it writes."""

import numpy as np
import pytest

from mixq.errors import MixqError
from mixq.tune.allocate import brute_force_mck, solve_mck


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

def _fake_measurement(prep, specs, seed=0):
    """Damages like real ones: ~ 4^-bits, larger groups worse, a per-tensor sensitivity spread over decades."""
    from mixq.tune.measure import FORMAT, candidate_table, spec_key

    rng = np.random.default_rng(seed)
    table = candidate_table(prep, specs)
    tensors = {}
    for name, (dtype, cands) in table.items():
        s = 10 ** rng.uniform(-3, 1)
        tensors[name] = {"dtype": dtype, "damage": {spec_key(b, g): s * 4.0 ** -b * (1 + g / 128) for b, g in cands}}
    return {"format": FORMAT, "model": "tiny", "candidates": [spec_key(*c) for c in specs], "complete": True,
            "method": "fake", "calib": {}, "tensors": tensors}


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory):
    from tiny_models import make_tiny_hf

    return make_tiny_hf("llama", tmp_path_factory.mktemp("plan") / "src", num_hidden_layers=4)


def test_planned_recipe_roundtrips_through_convert_with_predicted_size(tiny_src, tmp_path):
    import json

    from safetensors import safe_open

    from mixq.quant.convert import convert
    from mixq.quant.plan import plan_model
    from mixq.quant.prepare import prepare
    from mixq.quant.recipe import load_recipe
    from mixq.tune.allocate import allocate

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
    out = convert(str(tiny_src), tmp_path / "out", recipe=str(recipe_file))
    stored = 0
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            for k in sf.keys():
                t = sf.get_tensor(k)
                stored += t.numel() * t.element_size()
    assert stored == alloc.total_bytes
    q = json.loads((out / "config.json").read_text())["quantization"]
    for name, c in alloc.choices.items():
        path = name.removesuffix(".weight")
        if c is None:
            continue
        spec = q.get(path, {"bits": q["bits"], "group_size": q["group_size"]})
        assert (spec["bits"], spec["group_size"]) == c


def test_plan_more_budget_never_predicts_more_damage(tiny_src):
    from mixq.quant.prepare import prepare
    from mixq.tune.allocate import allocate

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
    from mixq.quant.prepare import prepare
    from mixq.tune.allocate import allocate, parse_size

    prep = prepare(str(tiny_src), "bf16")
    meas = _fake_measurement(prep, [(4, 32)])
    with pytest.raises(MixqError, match="smallest reachable"):
        allocate(str(tiny_src), meas, target_bpw=1.0, prep=prep)
    assert parse_size("1.2GB") == 1_200_000_000 and parse_size("512MiB") == 512 * 2**20
    with pytest.raises(MixqError):
        parse_size("big")


def test_mixq_plan_cli_writes_a_recipe_that_load_recipe_reads(tiny_src, tmp_path):
    import json

    from mixq.cli import main
    from mixq.quant.prepare import prepare
    from mixq.quant.recipe import load_recipe

    prep = prepare(str(tiny_src), "bf16")
    mfile = tmp_path / "m.json"
    mfile.write_text(json.dumps(_fake_measurement(prep, [(4, 32), (6, 32), (8, 32)])))
    out = tmp_path / "r.toml"
    assert main(["plan", str(tiny_src), "--target-bpw", "7.5", "--measurement", str(mfile), "-o", str(out)]) == 0
    r = load_recipe(str(out))
    assert r.default is None and len(r.rules) == len(json.loads(mfile.read_text())["tensors"])
    assert main(["plan", str(tiny_src), "--target-bpw", "1", "--measurement", str(mfile), "-o", str(out)]) == 2

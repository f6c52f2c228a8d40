"""Recipes: TOML parsing and errors, built-ins, rule semantics, and plans checked against mlx-lm."""

import argparse

import pytest

from mixq.errors import MixqError
from mixq.quant import recipe as R
from mixq.quant.plan import plan_model
from mixq.quant.recipe import builtin_recipes, keep_recipe, load_recipe, parse_recipe, uniform_recipe
from mixq.quant.spec import DTYPE_BYTES, Spec
from mixq.quant.tensors import TensorInfo


def llama_tensors(n_layers, hidden=128, inter=256, vocab=512, head=True, dtype="bfloat16", bias=False):
    ts = [TensorInfo("model.embed_tokens.weight", (vocab, hidden), dtype)]
    for i in range(n_layers):
        p = f"model.layers.{i}"
        for m, shape in [("self_attn.q_proj", (hidden, hidden)), ("self_attn.k_proj", (hidden // 2, hidden)),
                         ("self_attn.v_proj", (hidden // 2, hidden)), ("self_attn.o_proj", (hidden, hidden)),
                         ("mlp.gate_proj", (inter, hidden)), ("mlp.up_proj", (inter, hidden)),
                         ("mlp.down_proj", (hidden, inter))]:
            ts.append(TensorInfo(f"{p}.{m}.weight", shape, dtype))
            if bias and m.startswith("self_attn") and m != "self_attn.o_proj":
                ts.append(TensorInfo(f"{p}.{m}.bias", shape[:1], dtype))
        ts += [TensorInfo(f"{p}.input_layernorm.weight", (hidden,), dtype),
               TensorInfo(f"{p}.post_attention_layernorm.weight", (hidden,), dtype)]
    ts.append(TensorInfo("model.norm.weight", (hidden,), dtype))
    if head:
        ts.append(TensorInfo("lm_head.weight", (vocab, hidden), dtype))
    return ts


def specs_of(plan):
    return {t.module_path: t.spec for t in plan.tensors if t.spec is not None}


def write(tmp_path, text, name="r.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


# ------------------------------------------------------------------ built-ins

def test_builtins_listed_and_loadable():
    names = builtin_recipes()
    expected = ["bf16"] + [f"q{b}" for b in (2, 3, 4, 5, 6, 8)] + [f"q{b}-hi" for b in (2, 3, 4, 5, 6, 8)] \
        + ["mxfp4", "nvfp4", "mxfp8"] \
        + ["mixed_2_6", "mixed_3_4", "mixed_3_6", "mixed_4_6", "qx64-hi", "qx65-hi", "qx85-hi", "qx86-hi", "qx86-mx"]
    assert list(names) == expected
    for n in names:
        r = load_recipe(n)
        assert r.name == n and r.description and r.text.startswith("#")
    assert load_recipe("bf16").default is None and load_recipe("bf16").dtype == "bfloat16"
    for b in (2, 3, 4, 5, 6, 8):
        assert load_recipe(f"q{b}").default == Spec(b, 64) and not load_recipe(f"q{b}").rules
        assert load_recipe(f"q{b}-hi").default == Spec(b, 32)
    for n in ("qx64-hi", "qx65-hi", "qx85-hi", "qx86-hi"):
        text = load_recipe(n).text
        assert "reconstruction" in text and "published" in text


def test_bf16_keeps_everything():
    plan = plan_model(llama_tensors(2, dtype="float32"), "bf16", {"num_hidden_layers": 2})
    assert not plan.quantized and plan.quantization_config() is None
    assert all(t.dtype == "bfloat16" for t in plan.tensors)        # the recipe's dtype
    assert plan.total_bytes == plan.total_params * 2 and plan.bits_per_weight == 16.0
    assert all(t.reason in ("kept: recipe default", "norm", "1-D tensor") for t in plan.tensors)


@pytest.mark.parametrize("name,lo,hi", [("qx86-hi", 6, 8), ("qx64-hi", 4, 6), ("qx65-hi", 5, 6), ("qx85-hi", 5, 8)])
@pytest.mark.parametrize("tied", [False, True])
def test_qx_family(name, lo, hi, tied):
    n = 10
    plan = plan_model(llama_tensors(n, head=not tied), name, {"num_hidden_layers": n, "tie_word_embeddings": tied})
    s = specs_of(plan)
    assert s["model.embed_tokens"] == Spec(hi, 32)
    if not tied:
        assert s["lm_head"] == Spec(hi, 32)
    for i in range(n):
        for m in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert s[f"model.layers.{i}.self_attn.{m}"] == Spec(hi if i % 4 == 0 else lo, 32)
        for m in ("gate_proj", "up_proj", "down_proj"):
            assert s[f"model.layers.{i}.mlp.{m}"] == Spec(lo, 32)
    assert all(sp.group_size == 32 for sp in s.values())


# ------------------------------------------------------------------ mixed_* against mlx-lm's predicate

def _mlx_mixed_predicate(recipe, n_layers):
    """mlx-lm's own predicate, built on a fake model with n_layers layers."""
    from mlx_lm.convert import mixed_quant_predicate_builder

    class FakeModel:
        layers = [None] * n_layers

        def named_modules(self):
            return [(f"model.layers.{i}.mlp.down_proj", None) for i in range(n_layers)]

    return mixed_quant_predicate_builder(recipe, FakeModel(), 64)


@pytest.mark.mlx
@pytest.mark.parametrize("name", ["mixed_2_6", "mixed_3_4", "mixed_3_6", "mixed_4_6"])
def test_mixed_matches_mlx_lm_predicate(name):
    for n in (1, 2, 3, 5, 7, 8, 9, 12, 16, 22, 24, 28, 30, 32, 36, 40, 48, 61, 80):
        pred = _mlx_mixed_predicate(name, n)
        plan = plan_model(llama_tensors(n, head=True), name, {"num_hidden_layers": n, "tie_word_embeddings": False})
        ours = specs_of(plan)
        assert set(ours) == {t.module_path for t in plan.tensors if t.name.endswith("proj.weight")
                             or "embed" in t.name or "lm_head" in t.name}
        for path, spec in ours.items():
            want = pred(path, None)
            assert (spec.bits, spec.group_size) == (want["bits"], want["group_size"]), (name, n, path)
        # tied: mlx-lm never sees lm_head, so the embedding keeps the low bits
        tied = plan_model(llama_tensors(n, head=False), name, {"num_hidden_layers": n})
        e = pred("model.embed_tokens", None)
        assert specs_of(tied)["model.embed_tokens"] == Spec(e["bits"], e["group_size"])


# ------------------------------------------------------------------ end to end against mlx_lm.utils.quantize_model

def _mlx_quantized_specs(config, **qkw):
    """Build a tiny mlx-lm model from config, quantize it with mlx_lm; return its tensor infos and
    {module path: Spec} of what mlx-lm quantized."""
    import mlx_lm.utils as mlx_lm_utils
    from mlx.utils import tree_flatten

    model_cls, args_cls = mlx_lm_utils._get_classes(config)
    model = model_cls(args_cls.from_dict(config))
    infos = [TensorInfo(k, tuple(v.shape), str(v.dtype).split(".")[-1])
             for k, v in tree_flatten(model.parameters())]
    model, qcfg = mlx_lm_utils.quantize_model(model, dict(config), **qkw)
    got = {p: Spec(m.bits, m.group_size) for p, m in model.named_modules() if hasattr(m, "bits")}
    return infos, got, qcfg


def _specs_from_config(qcfg, paths):
    """What mlx_lm.load gives each quantized module, reading our config the way load_model does."""
    d = Spec(qcfg["bits"], qcfg["group_size"])
    return {p: (Spec(qcfg[p]["bits"], qcfg[p]["group_size"]) if p in qcfg else d) for p in paths}


LLAMA = {"model_type": "llama", "hidden_size": 128, "num_hidden_layers": 9, "intermediate_size": 192,
         "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "vocab_size": 256,
         "tie_word_embeddings": False}
QWEN3_MOE = {"model_type": "qwen3_moe", "hidden_size": 64, "num_hidden_layers": 3, "intermediate_size": 128,
             "num_attention_heads": 4, "num_experts": 4, "num_experts_per_tok": 2, "decoder_sparse_step": 1,
             "mlp_only_layers": [], "moe_intermediate_size": 64, "rms_norm_eps": 1e-6, "vocab_size": 256,
             "num_key_value_heads": 2, "head_dim": 16, "rope_theta": 1e6, "tie_word_embeddings": False,
             "max_position_embeddings": 512, "norm_topk_prob": True}
GPT_OSS = {"model_type": "gpt_oss", "num_hidden_layers": 2, "num_local_experts": 4, "num_experts_per_tok": 2,
           "vocab_size": 256, "hidden_size": 64, "intermediate_size": 64, "head_dim": 16,
           "num_attention_heads": 4, "num_key_value_heads": 2, "sliding_window": 16,
           "layer_types": ["sliding_attention", "full_attention"]}


@pytest.mark.mlx
@pytest.mark.parametrize("config,recipe,qkw", [
    (LLAMA, "q4", {"bits": 4, "group_size": 64}),
    (LLAMA, "q6-hi", {"bits": 6, "group_size": 32}),
    (LLAMA, "q8", {"bits": 8, "group_size": 64}),
    (LLAMA, parse_recipe("[recipe]\nbits = 4\ngroup_size = 128\n"), {"bits": 4, "group_size": 128}),  # 192 % 128
    (dict(LLAMA, tie_word_embeddings=True), "mixed_3_6", {"bits": 3, "group_size": 64, "quant": "mixed_3_6"}),
    (LLAMA, "mixed_2_6", {"bits": 2, "group_size": 64, "quant": "mixed_2_6"}),
    (dict(LLAMA, intermediate_size=96), "q4", {"bits": 4, "group_size": 64}),   # 96 % 64: kept by both
    (QWEN3_MOE, "q4", {"bits": 4, "group_size": 64}),
    (QWEN3_MOE, "q8-hi", {"bits": 8, "group_size": 32}),
    (GPT_OSS, "q5", {"bits": 5, "group_size": 64}),
    (GPT_OSS, "q3-hi", {"bits": 3, "group_size": 32}),
], ids=lambda v: v if isinstance(v, str) else None)
def test_plan_matches_mlx_lm_quantize_model(config, recipe, qkw):
    qkw = dict(qkw)
    quant = qkw.pop("quant", None)
    if quant:
        from mlx_lm.convert import mixed_quant_predicate_builder
        from mlx_lm.utils import _get_classes
        m_cls, a_cls = _get_classes(config)
        qkw["quant_predicate"] = mixed_quant_predicate_builder(quant, m_cls(a_cls.from_dict(config)), 64)
    infos, want, mlx_cfg = _mlx_quantized_specs(config, **qkw)
    plan = plan_model(infos, recipe, config)
    ours = specs_of(plan)
    assert ours == want
    qcfg = plan.quantization_config()
    assert {k: qcfg[k] for k in ("group_size", "bits", "mode")} == \
        {"group_size": qkw["group_size"], "bits": qkw["bits"], "mode": "affine"}
    assert _specs_from_config(qcfg, want) == want
    # every per-module entry has exactly mlx-lm's key set for such entries
    assert all(set(v) == {"group_size", "bits"} for k, v in qcfg.items() if isinstance(v, dict))
    # every tensor is accounted for, with a reason when kept
    assert len(plan.tensors) == len(infos)
    assert all(t.reason for t in plan.tensors)


@pytest.mark.mlx
def test_router_rules():
    infos, _, _ = _mlx_quantized_specs(QWEN3_MOE, bits=4, group_size=64)
    gate = "model.layers.0.mlp.gate"
    plan = plan_model(infos, "q4-hi", QWEN3_MOE)
    t = next(t for t in plan.tensors if t.module_path == gate)
    assert t.spec == Spec(8, 64) and "router" in t.reason
    assert plan.quantization_config()[gate] == {"group_size": 64, "bits": 8}
    experts = next(t for t in plan.tensors if t.module_path == "model.layers.0.mlp.switch_mlp.down_proj")
    assert len(experts.shape) == 3 and experts.spec == Spec(4, 32)
    # a rule naming the gate wins; a catch-all rule does not name it
    r = parse_recipe('[recipe]\nbits = 4\n[[rule]]\npattern = "*.mlp.gate"\nbits = 2\n'
                     '[[rule]]\npattern = "*"\nbits = 5\n')
    s = specs_of(plan_model(infos, r, QWEN3_MOE))
    assert s[gate] == Spec(2, 64) and s["model.layers.1.mlp.gate"] == Spec(2, 64)
    assert s["model.layers.0.mlp.switch_mlp.up_proj"] == Spec(5, 64)
    r = parse_recipe('[recipe]\nbits = 4\n[[rule]]\npattern = "*"\nbits = 5\n')
    assert specs_of(plan_model(infos, r, QWEN3_MOE))[gate] == Spec(8, 64)
    # recipe keeps -> router kept too; qx recipes name routers explicitly (8-bit, group 32)
    assert not plan_model(infos, "bf16", QWEN3_MOE).quantized
    assert specs_of(plan_model(infos, "qx64-hi", QWEN3_MOE))[gate] == Spec(8, 32)
    # the same name in a dense model type is an ordinary tensor
    gate = TensorInfo("model.layers.0.mlp.gate.weight", (64, 64), "bfloat16")
    dense = plan_model([gate], "q4", {"model_type": "llama"})
    assert dense.tensors[0].spec == Spec(4, 64)


# ------------------------------------------------------------------ rule semantics

def test_selectors_and_first_match(tmp_path):
    r = load_recipe(write(tmp_path, """
[recipe]
name = "t"
bits = 4
group_size = 64
[[rule]]
pattern = "*.q_proj"
first = 2
bits = 8
[[rule]]
pattern = "*.q_proj"
last = "n // 4"
bits = 6
group_size = 32
[[rule]]
pattern = ["*.k_proj", "*.v_proj"]
layers = [3, "n - 2"]
keep = true
[[rule]]
pattern = '\\.(k|v)_proj$'
regex = true
layer_range = [4, 6]
bits = 2
[[rule]]
pattern = "*.o_proj"
every = 3
offset = 1
bits = 5
[[rule]]
pattern = "*"
every = 100
bits = 3
"""))
    n = 12
    spec = lambda m, i: r.spec_for(f"model.layers.{i}.self_attn.{m}", n_layers=n)
    assert [spec("q_proj", i) for i in range(n)] == [Spec(8, 64)] * 2 + [Spec(4, 64)] * 7 + [Spec(6, 32)] * 3
    assert [spec("k_proj", i) is None for i in range(n)] == [i in (3, 10) for i in range(n)]
    assert [spec("v_proj", i) for i in (4, 5, 6)] == [Spec(2, 64), Spec(2, 64), Spec(4, 64)]
    assert [spec("o_proj", i).bits for i in range(8)] == [3, 5, 4, 4, 5, 4, 4, 5]   # layer 0: every=100 rule
    # a selector never matches outside the layers; no selector matches anything
    assert r.spec_for("model.embed_tokens", n_layers=n) == Spec(4, 64)
    assert r.spec_for("lm_head", n_layers=n) == Spec(4, 64)
    rule, _ = r.match("model.layers.1.self_attn.o_proj", n_layers=n)
    assert rule.index == 5 and "every=3" in rule.describe() and "offset=1" in rule.describe()
    with pytest.raises(MixqError, match="layer count"):
        r.spec_for("model.layers.1.self_attn.k_proj", n_layers=None)
    every = '[recipe]\nbits = 4\n[[rule]]\npattern = "*"\nevery = "n // 8"\nbits = 8\n'
    z = load_recipe(write(tmp_path, every, "z.toml"))
    assert z.spec_for("model.layers.3.mlp.up_proj", n_layers=16) == Spec(4, 64)
    with pytest.raises(MixqError, match="z.toml: rule 1: every = n // 8 is 0 for a 4-layer model"):
        z.spec_for("model.layers.3.mlp.up_proj", n_layers=4)


def test_group_size_inheritance_and_default_keep():
    r = parse_recipe('[recipe]\nkeep = true\n[[rule]]\npattern = "*mlp*"\nbits = 4\n')
    assert r.default is None and r.rules[0].spec == Spec(4, 64)
    r = parse_recipe('[recipe]\nbits = 6\ngroup_size = 32\n[[rule]]\npattern = "*mlp*"\nbits = 4\n')
    assert r.rules[0].spec == Spec(4, 32)
    # default keep: quantization_config takes the commonest quantized spec as the top-level default
    plan = plan_model(llama_tensors(2), parse_recipe(
        '[recipe]\nkeep = true\n[[rule]]\npattern = "*mlp*"\nbits = 4\n[[rule]]\npattern = "*.v_proj"\nbits = 8\n'),
        {"num_hidden_layers": 2})
    qc = plan.quantization_config()
    assert (qc["bits"], qc["group_size"]) == (4, 64)
    assert qc["model.layers.0.self_attn.v_proj"] == {"group_size": 64, "bits": 8}
    assert "model.layers.0.mlp.up_proj" not in qc and "model.layers.0.self_attn.q_proj" not in qc


def test_tied_head_takes_higher_precision():
    text = '[recipe]\nbits = 4\n[[rule]]\npattern = "lm_head"\nbits = 8\ngroup_size = 32\n'
    tied = plan_model(llama_tensors(2, head=False), parse_recipe(text), {"tie_word_embeddings": True})
    e = next(t for t in tied.tensors if t.name == "model.embed_tokens.weight")
    assert e.spec == Spec(8, 32) and "tied head" in e.reason and tied.tied
    # an explicit embedding rule with more precision wins over the head rule
    text2 = ('[recipe]\nbits = 4\n[[rule]]\npattern = "*embed_tokens"\nkeep = true\n'
             '[[rule]]\npattern = "lm_head"\nbits = 8\n')
    e = plan_model(llama_tensors(2, head=False), parse_recipe(text2), {}).tensors[0]
    assert e.spec is None and e.reason.startswith("kept")
    # untied: independent
    untied = plan_model(llama_tensors(2, head=True), parse_recipe(text), {"tie_word_embeddings": False})
    s = specs_of(untied)
    assert s["model.embed_tokens"] == Spec(4, 64) and s["lm_head"] == Spec(8, 32)
    # tied_head = false ignores the head rule
    off = parse_recipe(text.replace("bits = 4\n", "bits = 4\ntied_head = false\n", 1))
    assert specs_of(plan_model(llama_tensors(2, head=False), off, {}))["model.embed_tokens"] == Spec(4, 64)


# ------------------------------------------------------------------ plan details

def test_plan_never_quantized_and_sizes():
    from mixq.quant.spec import quantized_nbytes

    ts = llama_tensors(2, bias=True) + [
        TensorInfo("model.layers.0.mlp.odd.weight", (64, 100), "bfloat16"),
        TensorInfo("model.layers.0.conv.weight", (8, 4, 64), "bfloat16"),
        TensorInfo("model.layers.0.self_attn.sinks", (4,), "float32"),
        TensorInfo("model.layers.0.self_attn.q_norm.weight", (64,), "bfloat16"),
        TensorInfo("model.rope.inv_freq.weight", (64, 64), "int64"),
    ]
    plan = plan_model(ts, "q4", {"num_hidden_layers": 2})
    by = {t.name: t for t in plan.tensors}
    assert by["model.layers.0.mlp.odd.weight"].spec is None
    assert by["model.layers.0.mlp.odd.weight"].reason == "input dim 100 not divisible by group 64: kept"
    assert by["model.layers.0.self_attn.q_proj.bias"].reason == "bias"
    assert by["model.layers.0.input_layernorm.weight"].reason == "norm"
    assert by["model.layers.0.self_attn.q_norm.weight"].reason == "norm"
    assert by["model.layers.0.conv.weight"].spec is None and "3-D" in by["model.layers.0.conv.weight"].reason
    assert by["model.layers.0.self_attn.sinks"].spec is None
    assert by["model.rope.inv_freq.weight"].spec is None
    for t in plan.tensors:
        numel = t.params
        if t.spec:
            assert t.nbytes == quantized_nbytes(t.shape, t.spec.bits, t.spec.group_size, 2)
        else:
            assert t.nbytes == numel * DTYPE_BYTES[t.dtype]
    # bits per weight: quantized part 4.5 for 4-bit g64 bf16; whole model above it (norms, biases, kept)
    assert plan.bits_per_weight_quantized == 4.5
    assert plan.bits_per_weight == pytest.approx(plan.total_bytes * 8 / plan.total_params)
    assert 4.5 < plan.bits_per_weight < 16
    # float32 source: scales/biases in float32 (mlx keeps them in the weight's dtype)
    p32 = plan_model(llama_tensors(1, dtype="float32"), "q4", {})
    assert p32.bits_per_weight_quantized == 4 + 64 / 64
    # convert --dtype: floating tensors stored in that dtype
    pd = plan_model(llama_tensors(1, dtype="float32"), "q4", {}, dtype="bfloat16")
    assert pd.bits_per_weight_quantized == 4.5 and all(t.dtype == "bfloat16" for t in pd.tensors)


def test_table_rows_summary_specs():
    plan = plan_model(llama_tensors(4), "qx86-hi", {"num_hidden_layers": 4})
    rows = plan.table_rows()
    assert len(rows) == len(plan.tensors)
    row = next(r for r in rows if r["path"] == "model.layers.0.self_attn.q_proj.weight")
    assert (row["shape"], row["bits"], row["group_size"]) == ("128x128", 8, 32)
    assert row["mb"] == pytest.approx(quantized_bytes(128 * 128, 8, 32) / 1e6)
    norm = next(r for r in rows if r["path"] == "model.norm.weight")
    assert norm["bits"] is None and norm["reason"] == "norm"
    s = plan.summary()
    assert s["total_bytes"] == plan.total_bytes and s["n_quantized"] == len(plan.quantized)
    assert s["bits_per_weight"] == plan.bits_per_weight
    assert set(s["by_spec"]) == {"6-bit g32", "8-bit g32", "kept"}
    assert sum(e["share"] for e in s["by_spec"].values()) == pytest.approx(1.0)
    specs = plan.specs()
    assert specs["model.norm.weight"] is None and specs["lm_head.weight"] == {"bits": 8, "group_size": 32}
    qc = plan.quantization_config()
    assert (qc["bits"], qc["group_size"]) == (6, 32)
    assert qc["lm_head"] == {"group_size": 32, "bits": 8} and "model.layers.1.self_attn.q_proj" not in qc


def quantized_bytes(numel, bits, gs):
    return numel * bits // 8 + 2 * (numel // gs) * 2


# ------------------------------------------------------------------ bad recipes

@pytest.mark.parametrize("text,msg", [
    ('[recipe]\nbits = 4\nbogus = 1\n', "unknown key 'bogus'"),
    ('[recipe]\nbits = 4\n[other]\nx = 1\n', "unknown key 'other'"),
    ('[recipe]\nbits = 4\n[[rule]]\npattern = "*"\nbits = 4\nwhatever = 2\n', "rule 1: unknown key 'whatever'"),
    ('[recipe]\nbits = 7\n', r"bits 7 not in \{2, 3, 4, 5, 6, 8\}"),
    ('[recipe]\nbits = 4\ngroup_size = 16\n', r"group_size 16 not in \{32, 64, 128\}"),
    ('[recipe]\nbits = 4\n[[rule]]\npattern = "*"\nbits = 1\n', "rule 1 .*bits 1 not in"),
    ('[recipe]\nbits = 4\n[[rule]]\npattern = "(unclosed"\nregex = true\nbits = 4\n', "bad regex"),
    ('[recipe]\nbits = 4\n[[rule]]\npattern = "*"\nfirst = "n //"\nbits = 4\n', "bad layer expression"),
    ('[recipe]\nbits = 4\n[[rule]]\npattern = "*"\nfirst = "__import__(\'os\')"\nbits = 4\n', "bad layer expression"),
    ('[recipe]\nbits = 4\n[[rule]]\npattern = "*"\nlayer_range = [1]\nbits = 4\n', "layer_range: expected"),
    ('[recipe]\nbits = 4\n[[rule]]\npattern = "*"\noffset = 1\nbits = 4\n', "offset needs every"),
    ('[recipe]\nbits = 4\n[[rule]]\nbits = 4\n', "needs pattern"),
    ('[recipe]\nbits = 4\n[[rule]]\npattern = "*"\n', "needs bits"),
    ('[recipe]\nbits = 4\n[[rule]]\npattern = "*"\nkeep = true\nbits = 4\n', "not both"),
    ('[recipe]\ndescription = "x"\n', "needs bits"),
    ('[[rule]]\npattern = "*"\nbits = 4\n', "missing the \\[recipe\\] table"),
    ('[recipe\nbits = 4\n', "not valid TOML"),
    ('[recipe]\nbits = 4\ndtype = "int8"\n', "dtype 'int8'"),
])
def test_bad_recipe_files(tmp_path, text, msg):
    p = write(tmp_path, text, "bad.toml")
    with pytest.raises(MixqError, match=msg) as e:
        load_recipe(str(p))
    s = str(e.value)
    assert "\n" not in s and str(p) in s


def test_load_recipe_errors_and_files(tmp_path):
    with pytest.raises(MixqError, match="unknown recipe 'nope'.*qx86-hi"):
        load_recipe("nope")
    with pytest.raises(MixqError, match="not found"):
        load_recipe(str(tmp_path / "missing.toml"))
    p = write(tmp_path, '[recipe]\nbits = 5\n', "mine.toml")
    r = load_recipe(p)
    assert r.name == "mine" and r.default == Spec(5, 64) and r.path == str(p)


def test_cli(capsys):
    p = argparse.ArgumentParser()
    R.add_arguments(p)
    assert R.cli(p.parse_args([])) == 0
    out = capsys.readouterr().out
    assert "qx86-hi" in out and "mixed_3_6" in out and "uniform 4-bit, group 64" in out
    assert R.cli(p.parse_args(["q6-hi"])) == 0
    out = capsys.readouterr().out
    assert 'name = "q6-hi"' in out and "group_size = 32" in out
    with pytest.raises(MixqError, match="unknown recipe"):
        R.cli(p.parse_args(["zzz"]))


def test_uniform_and_keep_recipes():
    ts = llama_tensors(2)
    plan = plan_model(ts, uniform_recipe(4, 32), {"num_hidden_layers": 2})
    assert set(specs_of(plan).values()) == {Spec(4, 32)} and len(plan.quantized) == 1 + 7 * 2 + 1
    keep = plan_model(ts, keep_recipe(), {"num_hidden_layers": 2})
    assert not keep.quantized and keep.total_bytes == keep.total_params * 2

"""Calibrated quantization (tune/calib.py, tune/gptq.py, tune/methods.py): GPTQ lowers the layer output error it
minimises below round-to-nearest's for every bits value; the folder is plain MLX affine (mlx_lm.load, the engine);
a recipe rule's method touches only its tensors; calibration windows never overlap eval's default windows."""

from __future__ import annotations

import json

import pytest
import torch
from oracles import mlx_logits, rel_err
from safetensors.torch import load_file
from test_convert import TOKENS

from mixq.errors import MixqError
from mixq.eval.engine import load_model
from mixq.eval.evaluate import DEFAULT_WINDOWS
from mixq.eval.perplexity import DEFAULT_CTX, make_windows, tokenize_file
from mixq.quant.quantize import dequantize, quantize
from mixq.quant.recipe import parse_recipe
from mixq.tune.calib import CalibConfig, calibration
from mixq.tune.gptq import gptq_quantize
from mixq.tune.methods import convert

torch.set_num_threads(1)
CALIB = CalibConfig(samples=4, length=64)   # the default text: set to a generated one below, never the machine's


@pytest.fixture(scope="module")
def _default_text(tmp_path_factory):
    return _windows_file(tmp_path_factory.mktemp("calib"))


@pytest.fixture(autouse=True)
def _no_shared_data(_default_text, monkeypatch):
    """The default calibration text (WikiText-2 next to the project) is a generated text file here, long enough to
    leave windows after eval's default ones: the tests run the default path without depending on shared data."""
    monkeypatch.setenv("MIXQ_WIKITEXT", str(_default_text))


def _inputs(n=768, d=256, seed=0):
    """Correlated inputs with a few large channels, as a transformer layer's are."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d // 8, generator=g) @ torch.randn(d // 8, d, generator=g)
    x += 0.3 * torch.randn(n, d, generator=g)
    x[:, :4] *= 8
    return x


def _out_err(x, w, parts, bits, gs):
    wq = dequantize(*parts, bits, gs).float()
    return float(torch.linalg.norm(x @ w.T - x @ wq.T))


@pytest.mark.parametrize("gs", [32, 64, 128])
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_gptq_layer_error_below_rtn(bits, gs):
    """||XW^T - XWq^T|| on the calibration inputs: GPTQ's is below RTN's (same MLX grid, same stored format)."""
    x = _inputs()
    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16).float()
    H = 2 * x.T @ x / x.shape[0]
    g = gptq_quantize(w, H, bits, gs, dtype=torch.bfloat16)
    r = quantize(w.to(torch.bfloat16), bits, gs)
    assert [(t.shape, t.dtype) for t in g] == [(t.shape, t.dtype) for t in r]
    e_g, e_r = _out_err(x, w, g, bits, gs), _out_err(x, w, r, bits, gs)
    assert e_g < 0.9 * e_r, (bits, gs, e_g, e_r)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_identity_hessian_is_rtn(bits):
    """With nothing to compensate (H diagonal) GPTQ without its range search stores exactly what mx.quantize
    stores: same grid, same codes; with it (the default), never a larger rounding error."""
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    g = gptq_quantize(w, torch.eye(128), bits, 32, dtype=torch.bfloat16, clip=False)
    for a, b in zip(g, quantize(w, bits, 32)):
        assert torch.equal(a, b)
    searched = dequantize(*gptq_quantize(w, torch.eye(128), bits, 32, dtype=torch.bfloat16), bits, 32).float()
    err = ((searched - w.float()) ** 2).sum(), ((dequantize(*g, bits, 32).float() - w.float()) ** 2).sum()
    assert err[0] <= err[1]


def test_clip_search_never_worse_per_group():
    """The range search keeps mx.quantize's formula and picks, per row, a range no worse than max/min."""
    from mixq.tune.gptq import CLIP_GRID, _group_params

    g = torch.randn(64, 32, generator=torch.Generator().manual_seed(3))
    g[:, 0] *= 6  # an outlier per row: shrinking the range helps the rest
    d = torch.rand(32, generator=torch.Generator().manual_seed(4)) + 0.1

    def err(s, z):
        q = ((g - z[:, None]) / s[:, None]).clamp(0, 7).round()
        return ((g - (s[:, None] * q + z[:, None])) ** 2 * d).sum(-1)

    plain, best = _group_params(g, d, 3, torch.float32, (1.0,)), _group_params(g, d, 3, torch.float32, CLIP_GRID)
    assert (err(*best) <= err(*plain)).all() and (err(*best) < err(*plain)).any()
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(5))
    x = _inputs(n=512, d=128)
    parts = gptq_quantize(w, 2 * x.T @ x / 512, 3, 32, dtype=torch.float32, clip=True)
    assert _out_err(x, w, parts, 3, 32) < _out_err(x, w, quantize(w, 3, 32), 3, 32)


def test_range_search_is_convert_default(tiny_model, tmp_path):
    """`mixq convert --method gptq` searches each group's range unless --no-gptq-clip; the provenance says which,
    and the searched quant has the lower output error on the calibration windows."""
    from transformers import AutoTokenizer

    from mixq.cli import main

    src = tiny_model("llama")
    errs, ids = {}, calibration(AutoTokenizer.from_pretrained(str(src)), CALIB).ids
    with torch.no_grad():
        ref = load_model(str(src), progress=False).model(ids).logits
        for flag in ([], ["--no-gptq-clip"]):
            out = tmp_path / ("clip" if not flag else "plain")
            assert main(["convert", str(src), str(out), "--recipe", "q3", "--method", "gptq", "--calib-samples",
                         str(CALIB.samples), "--calib-len", str(CALIB.length), *flag]) == 0
            assert json.loads((out / "mixq_provenance.json").read_text())["calibration"]["clip_search"] == (not flag)
            assert f"gptq's range search {'off' if flag else 'on'}" in (out / "README.md").read_text()
            errs[out.name] = float((load_model(str(out), progress=False).model(ids).logits - ref).square().mean())
    assert errs["clip"] < errs["plain"], errs


def _windows_file(tmp_path, n_words=40000):
    import random

    rnd = random.Random(0)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "Paris", "capital", "model", "2", "(x)"]
    path = tmp_path / "wiki.test.raw"
    path.write_text(" ".join(rnd.choice(words) for _ in range(n_words)) + "\n")
    return path


def test_calibration_disjoint_from_kld_windows(tiny_model, tmp_path, monkeypatch):
    """Default calibration text = eval's default ppl/KLD text; its windows start after eval's default windows."""
    from transformers import AutoTokenizer

    path = _windows_file(tmp_path)
    monkeypatch.setenv("MIXQ_WIKITEXT", str(path))
    tok = AutoTokenizer.from_pretrained(str(tiny_model("llama")))
    cal = calibration(tok, CalibConfig(samples=16, length=128, seed=3))
    win = make_windows(tok, ctx=DEFAULT_CTX, max_windows=DEFAULT_WINDOWS)
    stream = tokenize_file(tok, path)
    eval_end = win.ids.numel()
    assert torch.equal(win.ids.flatten(), stream[:eval_end])
    starts = cal.info["token_starts"]
    assert min(starts) >= eval_end and cal.info["disjoint_from_eval"]
    assert len(set(starts)) == 16 and all(b - a >= 128 for a, b in zip(starts, starts[1:]))
    for row, s in zip(cal.ids, starts):
        assert torch.equal(row, stream[s:s + 128])
    assert cal.info["sha256"] and cal.info["seed"] == 3
    # another file is used whole (and said to be)
    other = tmp_path / "other.txt"
    other.write_text(path.read_text()[:20000])
    cal2 = calibration(tok, CalibConfig(file=str(other), samples=2, length=64))
    assert cal2.info["first_token"] == 0 and not cal2.info["disjoint_from_eval"]
    with pytest.raises(MixqError, match="calibration windows"):
        calibration(tok, CalibConfig(file=str(other), samples=10_000, length=64))


def _tensors(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_recipe_rule_method_touches_only_its_tensors(tiny_model, tmp_path):
    """A rule's method = "gptq" changes exactly the tensors that rule matches; everything else is RTN, bit-exact."""
    src = tiny_model("llama")
    text = ('[recipe]\nname = "r"\nbits = 3\ngroup_size = 32\n'
            '[[rule]]\npattern = "*.mlp.down_proj"\nbits = 3\nmethod = "gptq"\n')
    rtn = convert(src, tmp_path / "rtn", parse_recipe(text.replace('method = "gptq"\n', "")), progress=False)
    gq = convert(src, tmp_path / "gq", parse_recipe(text), calib=CALIB, progress=False)
    a, b = _tensors(rtn), _tensors(gq)
    assert a.keys() == b.keys()
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert changed and all(".mlp.down_proj." in k for k in changed)
    assert {k.rsplit(".", 1)[0] for k in changed} == {k.removesuffix(".weight") for k in a
                                                     if k.endswith("mlp.down_proj.weight")}
    prov = json.loads((gq / "mixq_provenance.json").read_text())
    methods = {t["name"]: t["method"] for t in prov["tensors"] if t["bits"]}
    assert {n for n, m in methods.items() if m == "gptq"} == {n for n in methods if ".mlp.down_proj." in n}
    assert prov["calibration"]["samples"] == 4 and prov["calibration"]["length"] == 64
    assert "gptq on 4 tensors" in (gq / "README.md").read_text()
    from mixq.report.card import read_folder, render_card
    card = render_card(read_folder(gq))
    assert "gptq on 4 tensors" in card and "4 windows of 64 tokens, seed 0, from token 32768" in card
    assert "gptq's range search on" in card and "act-order" not in card


def test_model_output_closer_with_gptq(tiny_model, tmp_path):
    """End to end on calibration windows: the converted model's logits are closer to the source's with gptq."""
    from transformers import AutoTokenizer

    src = tiny_model("llama")
    ids = calibration(AutoTokenizer.from_pretrained(str(src)), CALIB).ids
    errs = {}
    with torch.no_grad():
        ref = load_model(str(src), progress=False).model(ids).logits
        for method in ("rtn", "gptq"):
            out = convert(src, tmp_path / method, "q3", method=method, calib=CALIB, progress=False)
            errs[method] = float((load_model(str(out), progress=False).model(ids).logits - ref).square().mean())
    assert errs["gptq"] < errs["rtn"], errs


@pytest.mark.mlx
@pytest.mark.parametrize("arch_name", ["llama", "gemma3_text", "qwen3_moe"])
def test_gptq_folder_opens_in_mlx_lm(tiny_model, tmp_path, arch_name):
    """A gptq folder is plain MLX affine: mlx_lm.load opens it; its logits are the engine's (dequantized, float32)."""
    out = convert(tiny_model(arch_name), tmp_path / "out", "q4-hi", method="gptq", calib=CALIB, progress=False)
    prov = json.loads((out / "mixq_provenance.json").read_text())
    assert any(t["method"] == "gptq" for t in prov["tensors"])
    engine = load_model(str(out), progress=False).model(torch.tensor(TOKENS)).logits.detach().numpy()
    assert rel_err(mlx_logits(out, TOKENS), engine) < 1e-4


@pytest.mark.mlx
@pytest.mark.parametrize("arch_name", ["llama", "qwen2"])
def test_gptq_head(tiny_model, tmp_path, arch_name):
    """--gptq-head: the output head (tied llama: the embedding tensor; qwen2: lm_head) gets GPTQ on the final norm's
    outputs; the folder still opens in mlx_lm with the engine's logits."""
    out = convert(tiny_model(arch_name), tmp_path / "out", "q4-hi", method="gptq", calib=CALIB, head=True,
                  progress=False)
    prov = json.loads((out / "mixq_provenance.json").read_text())
    head = "model.embed_tokens.weight" if arch_name == "llama" else "lm_head.weight"
    assert {t["name"]: t["method"] for t in prov["tensors"]}[head] == "gptq" and prov["calibration"]["head"] == head
    engine = load_model(str(out), progress=False).model(torch.tensor(TOKENS)).logits.detach().numpy()
    assert rel_err(mlx_logits(out, TOKENS), engine) < 1e-4


def test_method_refusals(tiny_model, tmp_path):
    src = tiny_model("llama")
    with pytest.raises(MixqError, match="needs a quantized spec"):
        parse_recipe('[recipe]\nbits = 4\n[[rule]]\npattern = "*"\nkeep = true\nmethod = "gptq"\n')
    with pytest.raises(MixqError, match="method 'awqq' not in"):
        parse_recipe('[recipe]\nbits = 4\nmethod = "awqq"\n')
    recipe = parse_recipe('[recipe]\nname = "g"\nbits = 4\nmethod = "gptq"\n')
    with pytest.raises(MixqError, match="needs calibration"):  # never silently round-to-nearest
        load_model(str(src), recipe=recipe, progress=False)
    from mixq.quant.convert import convert as plain_convert
    with pytest.raises(MixqError, match="needs calibration"):
        plain_convert(src, tmp_path / "x", recipe=recipe, progress=False)
    assert not (tmp_path / "x").exists()


def test_plan_table_shows_each_tensors_method(tiny_model):
    """plan-show / convert --dry-run: a method column and a methods line once a recipe asks for a calibrated method."""
    from rich.console import Console

    from mixq.quant.plan_show import print_plan
    from mixq.quant.prepare import prepare

    text = ('[recipe]\nname = "r"\nbits = 4\ngroup_size = 32\n'
            '[[rule]]\npattern = "*.mlp.down_proj"\nbits = 4\nmethod = "gptq"\n')
    src = tiny_model("llama")
    for recipe, calibrated in ((parse_recipe(text), True), ("q4-hi", False)):
        console = Console(record=True, width=300)
        print_plan(prepare(src, recipe).plan, console=console)
        out = console.export_text()
        header = next(line for line in out.splitlines() if "path" in line and "reason" in line)
        assert ("method" in header) == calibrated and ("methods: " in out) == calibrated, out
        if calibrated:
            rows = [line for line in out.splitlines() if ".mlp." in line or ".self_attn." in line]
            assert rows and all(("gptq" in r) == (".down_proj" in r) for r in rows), rows


def _routed(src, ids, layer=0):
    """The float model's layer-`layer` experts module: its ExpertStack view and, per expert, the hidden states of the
    calibration tokens routed to it (captured by a pre-hook on the module, as the router sends them)."""
    import mixq.tune.gptq as G
    from mixq.quant.arch import model_type

    model = load_model(str(src), progress=False).model
    cfg = json.loads((src / "config.json").read_text())
    mod = model.model.layers[layer].mlp.experts
    seen = []
    h = mod.register_forward_pre_hook(lambda m, a: seen.append((a[0].detach().reshape(-1, a[0].shape[-1]), a[1])))
    with torch.no_grad():
        model(ids)
    h.remove()
    x = torch.cat([s[0] for s in seen])
    idx = torch.cat([s[1].reshape(s[0].shape[0], -1) for s in seen])
    st = G.ExpertStack(mod, model_type(cfg), {})
    return st, [x[(idx == e).any(-1)] for e in range(mod.gate_up_proj.shape[0])]


def _expert_names(arch_name, layer=0):
    stem = f"model.layers.{layer}.mlp." + ("switch_mlp" if arch_name == "qwen3_moe" else "experts")
    return {p: f"{stem}.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")}


@pytest.mark.parametrize("arch_name", ["qwen3_moe", "gpt_oss"])
def test_moe_experts_gptq_below_rtn_on_their_routed_tokens(tiny_model, tmp_path, arch_name):
    """Each expert gets its own Hessian from the tokens routed to it: on those tokens, every expert's GPTQ output error
    (gate, up: its hidden states; down: its activations) is below round to nearest's; an expert with fewer routed
    tokens than inputs is stored exactly as RTN stores it, and provenance lists it."""
    from transformers import AutoTokenizer

    from mixq.eval.engine import read_mlx_dequantized

    src = tiny_model(arch_name)
    ids = calibration(AutoTokenizer.from_pretrained(str(src)), CALIB).ids
    gq = convert(src, tmp_path / "gq", "q4-hi", method="gptq", calib=CALIB, head=False, progress=False)
    rtn = convert(src, tmp_path / "rtn", "q4-hi", progress=False)
    cfg = json.loads((gq / "config.json").read_text())
    wg, wr = dict(read_mlx_dequantized(gq, cfg)), dict(read_mlx_dequantized(rtn, cfg))
    prov = json.loads((gq / "mixq_provenance.json").read_text())
    names = _expert_names(arch_name)
    st, xs = _routed(src, ids)
    tokens = prov["calibration"]["expert_tokens"][names["down_proj"].rsplit(".", 2)[0]]
    assert tokens == [x.shape[0] for x in xs]
    n_gptq = 0
    for proj, name in names.items():
        w = st.weight(proj).float()
        for e, x in enumerate(xs):
            if proj == "down_proj":
                x = st.activations(e, x).detach()
            if x.shape[0] < w.shape[-1]:    # too few routed tokens: RTN, bit for bit, and said so
                assert torch.equal(wg[name][e], wr[name][e]) and e in prov["calibration"]["experts_rtn"][name]
                continue
            err = {k: float(torch.linalg.norm(x @ (w[e] - ws[name][e].float()).T)) for k, ws in (("g", wg), ("r", wr))}
            assert err["g"] < err["r"], (name, e, err)
            n_gptq += 1
    assert n_gptq >= 6
    assert all(t["method"].startswith("gptq") for t in prov["tensors"] if t["name"] in names.values())


def test_moe_expert_without_routed_tokens_falls_back_to_rtn(tiny_model, tmp_path):
    """gpt_oss with the router's bias shutting out expert 0 of layer 0: that expert falls back to RTN (bit-exact),
    the others get GPTQ; the tensor's method, the calibration record and the card say so."""
    import shutil

    from safetensors.torch import save_file

    src = tmp_path / "src"
    shutil.copytree(tiny_model("gpt_oss"), src)
    f = next(src.glob("*.safetensors"))
    sd = load_file(str(f))
    sd["model.layers.0.mlp.router.bias"][0] = -1e4
    save_file(sd, str(f), metadata={"format": "pt"})
    gq = convert(src, tmp_path / "gq", "q4-hi", method="gptq", calib=CALIB, head=False, progress=False)
    rtn = convert(src, tmp_path / "rtn", "q4-hi", progress=False)
    prov = json.loads((gq / "mixq_provenance.json").read_text())
    names = _expert_names("gpt_oss")
    cal = prov["calibration"]
    assert cal["expert_tokens"]["model.layers.0.mlp.experts"][0] == 0
    methods = {t["name"]: t["method"] for t in prov["tensors"]}
    a, b = _tensors(gq), _tensors(rtn)
    for name in names.values():
        assert 0 in cal["experts_rtn"][name] and methods[name].startswith("gptq (experts 0")
        for part in ("weight", "scales", "biases"):
            key = name.replace(".weight", f".{part}")
            assert torch.equal(a[key][0], b[key][0]) and not torch.equal(a[key], b[key])
    assert "some experts rounded to nearest" in (gq / "README.md").read_text()


@pytest.mark.parametrize("arch_name", ["llama", "qwen3_moe", "gpt_oss"])
def test_layer_loader_holds_one_layer_and_computes_the_model(tiny_model, arch_name):
    """gptq's model is built with placeholder decoder layers: nothing of a layer is in memory until it is loaded, and
    with every layer loaded it computes the engine's logits bit for bit; a released layer holds placeholders again."""
    from mixq.quant.prepare import prepare
    from mixq.tune.gptq import _decoder_layers, layer_loader

    src = tiny_model(arch_name)
    lazy = layer_loader(prepare(src, "q4-hi"))
    _, layers = _decoder_layers(lazy.model)

    def held(layer):
        return sum(p.untyped_storage().nbytes() for p in layer.parameters())

    assert all(held(layer) <= 4 * len(list(layer.parameters())) for layer in layers)   # one element each
    for i in range(len(layers)):
        lazy.load(i)
    ids = torch.tensor(TOKENS)
    with torch.no_grad():
        assert torch.equal(lazy.model(ids).logits, load_model(str(src), progress=False, packed=False).model(ids).logits)
    lazy.release(0)
    assert held(layers[0]) <= 4 * len(list(layers[0].parameters())) < held(layers[1])


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_act_order_static_groups(bits):
    """act-order with static groups: each group's scale and bias are mx.quantize's of the weight (MLX's contiguous
    groups, exact, without the range search), and the layer output error on the calibration inputs is below the
    natural order's."""
    x = _inputs()
    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16).float()
    H = 2 * x.T @ x / x.shape[0]
    act = gptq_quantize(w, H, bits, 32, dtype=torch.bfloat16, act_order=True, clip=False)
    plain = gptq_quantize(w, H, bits, 32, dtype=torch.bfloat16, clip=False)
    rtn = quantize(w.to(torch.bfloat16), bits, 32)
    assert torch.equal(act[1], rtn[1]) and torch.equal(act[2], rtn[2])
    assert _out_err(x, w, act, bits, 32) < _out_err(x, w, plain, bits, 32)


def test_act_order_model_output_not_worse(tiny_model, tmp_path):
    """End to end on the calibration windows (tiny llama, q3): --gptq-act-order's logits are no further from the
    source's than natural-order gptq's."""
    from transformers import AutoTokenizer

    src = tiny_model("llama")
    ids = calibration(AutoTokenizer.from_pretrained(str(src)), CALIB).ids
    errs = {}
    with torch.no_grad():
        ref = load_model(str(src), progress=False).model(ids).logits
        for act in (False, True):
            out = convert(src, tmp_path / str(act), "q3", method="gptq", calib=CALIB, act_order=act, progress=False)
            errs[act] = float((load_model(str(out), progress=False).model(ids).logits - ref).square().mean())
            prov = json.loads((out / "mixq_provenance.json").read_text())
            assert prov["calibration"]["act_order"] == ("static groups" if act else False)
    assert errs[True] <= errs[False], errs


def test_shared_input_hessian_computed_once(tiny_model):
    """q/k/v (and gate/up) read one input tensor: they get one Hessian object, equal to each one's own 2/n X^T X."""
    from mixq.quant.prepare import prepare
    from mixq.tune.gptq import _decoder_layers, _hessians, capture_inputs, layer_loader

    lazy = layer_loader(prepare(tiny_model("llama"), "q4-hi"))
    _, layers = _decoder_layers(lazy.model)
    ids = torch.tensor([TOKENS[0], TOKENS[0][::-1]])
    seen: dict = {}
    with torch.no_grad():
        hidden, calls = capture_inputs(lazy.model, layers, ids, 1)
        lazy.load(0)
        lin = {n: m for n, m in layers[0].named_modules() if isinstance(m, torch.nn.Linear)}
        hooks = [m.register_forward_pre_hook(lambda m, a, n=n: seen.setdefault(n, []).append(a[0].flatten(0, -2)))
                 for n, m in lin.items()]
        H = _hessians(layers[0], lin, hidden, calls[0])
        for h in hooks:
            h.remove()
    assert H["self_attn.q_proj"] is H["self_attn.k_proj"] is H["self_attn.v_proj"]
    assert H["mlp.gate_proj"] is H["mlp.up_proj"] and H["mlp.down_proj"] is not H["mlp.gate_proj"]
    for n, xs in seen.items():
        x = torch.cat(xs)
        torch.testing.assert_close(H[n], 2 * x.T @ x / x.shape[0], rtol=1e-5, atol=1e-6)


def test_layers_after_the_last_planned_one_are_not_run(tiny_model, tmp_path, monkeypatch):
    """With gptq only in layer 0 (and the head rounded to nearest) no later decoder layer runs on the calibration
    windows (layer 0's Hessians come from its own hooks, and its output feeds no planned tensor)."""
    from mixq.tune import gptq

    src = tiny_model("llama", num_hidden_layers=3)
    text = ('[recipe]\nname = "r"\nbits = 4\ngroup_size = 32\n'
            '[[rule]]\npattern = "*.layers.0.*"\nbits = 4\nmethod = "gptq"\n')
    runs: list = []
    real = gptq._run_layer
    monkeypatch.setattr(gptq, "_run_layer", lambda layer, *a: runs.append(layer) or real(layer, *a))
    out = convert(src, tmp_path / "q", parse_recipe(text), calib=CALIB, progress=False)
    prov = json.loads((out / "mixq_provenance.json").read_text())
    assert {t["method"] for t in prov["tensors"] if ".layers.0." in t["name"] and t["bits"]} == {"gptq"}
    assert all(t["method"] == "rtn" for t in prov["tensors"] if ".layers.0." not in t["name"] and t["bits"])
    assert runs == []

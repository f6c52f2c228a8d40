"""engine.load_model: HF folders, recipes on the fly, MLX folders (mixq's and mlx_lm's), errors."""

import json

import pytest
import torch

from mixq.errors import MixqError
from mixq.eval.engine import load_model, model_fingerprint, read_mlx_dequantized
from mixq.eval.packed import dense_state_dict
from mixq.quant.artifact import module_spec, quantization_config
from mixq.sources.resolve import resolve

torch.set_num_threads(2)


def _logits(lm, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, lm.model.config.vocab_size, (2, 19), generator=g)
    with torch.no_grad():
        return lm.model(x).logits


@pytest.fixture(scope="module")
def tiny_llama(tiny_model):
    return tiny_model("llama", num_hidden_layers=5)


def test_hf_folder_equals_transformers(tiny_llama):
    from transformers import AutoModelForCausalLM

    lm = load_model(str(tiny_llama), progress=False)
    ref = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    x = torch.arange(30)[None] % 300
    with torch.no_grad():
        assert torch.equal(lm.model(x).logits, ref(x).logits)
    i = lm.info
    assert (i.kind, i.recipe, i.dtype) == ("hf", None, "float32")
    assert i.n_params == sum(p.numel() for p in ref.parameters())  # tied: counted once
    assert i.bits_per_weight == 16.0 and i.bits_per_weight_quantized is None  # bfloat16 checkpoint
    assert lm.tokenizer("Paris")["input_ids"]


@pytest.mark.parametrize("arch,recipe", [("llama", "qx86-hi"), ("qwen3_moe", "q4-hi"), ("gemma3_text", "mixed_3_6"),
                                         ("gpt_oss", "q6-hi")])
def test_recipe_on_the_fly_equals_converted_folder(tmp_path, tiny_model, arch, recipe):
    from mixq.quant.convert import convert

    src = tiny_model(arch, **({"num_hidden_layers": 5} if arch == "llama" else {}))
    out = convert(str(src), tmp_path / f"{arch}-{recipe}", recipe=recipe, progress=False)
    folder = load_model(str(out), progress=False)
    fly = load_model(f"{src}@{recipe}", progress=False)
    assert folder.info.kind == "mlx" and fly.info.kind == "hf" and fly.info.recipe == recipe
    a, b = dense_state_dict(folder.model), dense_state_dict(fly.model)
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(_logits(folder), _logits(fly))                      # bit-exact
    for k in ("size_bytes", "n_params"):
        assert getattr(folder.info, k) == getattr(fly.info, k)
    assert folder.info.bits_per_weight == pytest.approx(fly.info.bits_per_weight)
    assert 2 < folder.info.bits_per_weight_quantized < 9
    # the quantization changed something, but not much
    lp, lf = _logits(load_model(str(src), progress=False)), _logits(fly)
    assert 0 < (lp - lf).norm() < lp.norm()


def test_recipe_option_and_suffix(tiny_llama):
    a = load_model(str(tiny_llama), recipe="q8", progress=False)
    b = load_model(f"{tiny_llama}@q8", progress=False)
    assert torch.equal(_logits(a), _logits(b))
    with pytest.raises(MixqError, match="two recipes"):
        load_model(f"{tiny_llama}@q8", recipe="q4", progress=False)


def test_resolved_model_is_accepted_as_is(tiny_llama):
    """A caller that resolved the reference once passes the ResolvedModel on: same model, same identity."""
    resolved = resolve(f"{tiny_llama}@q8")
    a, b = load_model(resolved, progress=False), load_model(f"{tiny_llama}@q8", progress=False)
    assert a.info.ref == b.info.ref == f"{tiny_llama}@q8" and a.info.recipe == "q8"
    assert torch.equal(_logits(a), _logits(b))
    assert model_fingerprint(resolved) == model_fingerprint(f"{tiny_llama}@q8") != model_fingerprint(str(tiny_llama))


@pytest.mark.mlx
def test_mlx_lm_folder_dequantizes_like_mlx(tmp_path, tiny_llama):
    import mlx.core as mx
    from mlx_lm import convert as mlx_convert

    out = tmp_path / "mlxq"
    mlx_convert(str(tiny_llama), str(out), quantize=True, q_group_size=32, q_bits=4, quant_predicate="mixed_3_6")
    config = json.loads((out / "config.json").read_text())
    q = quantization_config(config, out)
    assert (q["bits"], q["group_size"]) == (4, 32)
    assert {v["bits"] for v in q.values() if isinstance(v, dict)} == {3, 6}
    raw = mx.load(str(out / "model.safetensors"))
    ours = dict(read_mlx_dequantized(out, config))
    n_quant = 0
    for name, t in ours.items():
        module = name.rsplit(".", 1)[0]
        if module + ".scales" in raw:
            bits, group_size = module_spec(q, module)[:2]
            want = mx.dequantize(raw[name], raw[module + ".scales"], raw[module + ".biases"],
                                 group_size=group_size, bits=bits)
            n_quant += 1
        else:
            want = raw[name]
        want = torch.from_numpy(__import__("numpy").array(want.astype(mx.float32)))
        assert t.dtype == torch.bfloat16 and torch.equal(t.float(), want), name
    assert n_quant == 5 * 7 + 1

    lm = load_model(str(out), progress=False)
    assert lm.info.bits_per_weight == pytest.approx(4.340, abs=1e-3)  # what mlx_lm.convert printed
    # same next-token distribution as mlx_lm's own model
    from mlx_lm import load as mlx_load

    mmodel, _ = mlx_load(str(out))
    x = [[5, 17, 42, 99, 3, 250, 7, 8]]
    want = torch.from_numpy(__import__("numpy").array(mmodel(mx.array(x)).astype(mx.float32)))
    with torch.no_grad():
        got = lm.model(torch.tensor(x)).logits
    # mlx runs this folder in bfloat16 (its stored dtype): agreement to bfloat16 precision
    assert (got - want).norm() < 0.05 * want.norm()
    kl = torch.nn.functional.kl_div(want.log_softmax(-1), got.log_softmax(-1), log_target=True, reduction="none")
    assert kl.sum(-1).max() < 1e-3


def test_bfloat16_compute(tiny_llama):
    lm = load_model(str(tiny_llama), dtype="bfloat16", progress=False)
    assert lm.model.dtype == torch.bfloat16 and lm.info.dtype == "bfloat16"
    with pytest.raises(MixqError, match="dtype"):
        load_model(str(tiny_llama), dtype="int8", progress=False)


def test_unknown_path_is_one_line_error(tmp_path):
    with pytest.raises(MixqError) as e:
        load_model(str(tmp_path / "no-such-model"), progress=False)
    assert "\n" not in str(e.value)


def _broken_copy(src, dst, *, drop=None, add=None, reshape=None, config=None):
    """A copy of HF folder `src` with one weight dropped, added or re-shaped, or config.json changed."""
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    sd = load_file(str(dst / "model.safetensors"))
    if drop:
        del sd[drop]
    if add:
        sd[add] = torch.zeros(4)
    if reshape:
        sd[reshape] = sd[reshape][:-1].clone()
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    if config:
        cfg = json.loads((dst / "config.json").read_text())
        cfg.update(config)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("broken, says", [
    (dict(drop="model.layers.1.mlp.up_proj.weight"), "1 missing (model.layers.1.mlp.up_proj.weight)"),
    (dict(config={"num_hidden_layers": 30}), "missing"),
    (dict(add="model.layers.0.extra.weight"), "unexpected (model.layers.0.extra.weight)"),
    (dict(reshape="model.layers.0.self_attn.q_proj.weight"), "model.layers.0.self_attn.q_proj"),
])
@pytest.mark.parametrize("recipe", [None, "q4"])
def test_weights_must_match_config(tiny_model, tmp_path, broken, says, recipe):
    """A checkpoint whose weights do not cover its config exactly is refused, naming the tensors (never scored
    with randomly filled weights), as stored and with a recipe applied."""
    bad = _broken_copy(tiny_model("llama", num_hidden_layers=2), tmp_path / "bad", **broken)
    with pytest.raises(MixqError) as e:
        load_model(str(bad), recipe=recipe, progress=False)
    msg = str(e.value)
    assert "\n" not in msg and str(bad) in msg and ("do not match config.json" in msg or "shape" in msg), msg
    assert says in msg or "shape" in msg, msg


def test_eval_cli_refuses_a_broken_checkpoint(tiny_model, tmp_path, capsys):
    from mixq.cli import main

    bad = _broken_copy(tiny_model("llama", num_hidden_layers=2), tmp_path / "bad",
                       drop="model.layers.0.mlp.down_proj.weight")
    assert main(["eval", str(bad), "--tasks", "arc_easy", "--limit", "2", "-o", str(tmp_path / "run")]) == 2
    err = [x for x in capsys.readouterr().err.strip().splitlines() if not x.startswith("mixq: fetching")]  # first run
    assert len(err) == 1 and "model.layers.0.mlp.down_proj.weight" in err[0]
    assert not (tmp_path / "run" / "results.json").exists()

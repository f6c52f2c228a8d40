"""Checkpoints that ship quantized (gpt-oss's MXFP4 experts) kept as they ship: `keep_source = true` rules and
recipe `source` write them as MLX mxfp4 without a float round trip, exactly as mlx-lm's own load lays them out."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny_models import make_mxfp4_gpt_oss

from mixq.cli import main
from mixq.errors import MixqError
from mixq.quant import arch
from mixq.quant.checkpoint import Checkpoint
from mixq.quant.prepare import prepare
from mixq.quant.quantize import dequantize
from mixq.quant.recipe import parse_recipe

KEEP_EXPERTS = """[recipe]
name = "q6-keep-experts"
bits = 6
group_size = 32

[[rule]]
pattern = "*.mlp.experts.*"
keep_source = true
mode = "mxfp4"
"""


@pytest.fixture(scope="module")
def shipped(tiny_model, tmp_path_factory):
    return make_mxfp4_gpt_oss(tiny_model("gpt_oss"), tmp_path_factory.mktemp("gpt_oss_mxfp4") / "hf")


def _stored(folder) -> dict:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_source_loaders_are_the_shipped_bytes(shipped):
    """The kept tensors are the shipped blocks viewed as uint32 words and the shipped scales, gate/up split into
    even/odd rows; dequantized they are the float weights the plain (dequantizing) path reads."""
    ckpt = Checkpoint(shipped)
    kept = arch.source_loaders(ckpt)
    floats = {info.name: load for info, load in arch.mlx_tensors(ckpt)}
    assert sorted(kept) == sorted(n for n in floats if ".experts." in n and n.endswith("proj.weight"))
    infos = {info.name: info for info, _ in arch.mlx_tensors(ckpt)}
    for name, load in kept.items():
        q = load()
        assert infos[name].source_mode == "mxfp4" and q.spec.mode == "mxfp4" and q.biases is None
        w = dequantize(q.wq, q.scales, None, 4, 32, mode="mxfp4", dtype=torch.bfloat16)
        assert torch.equal(w, floats[name]()), name
    blocks = ckpt.get("model.layers.0.mlp.experts.gate_up_proj_blocks")
    up = kept["model.layers.0.mlp.experts.up_proj.weight"]()
    assert torch.equal(up.wq.view(torch.uint8).reshape(blocks[:, 1::2].shape), blocks[:, 1::2])


def test_keep_source_rule_plans_and_converts(shipped, tmp_path, tiny_model):
    recipe = parse_recipe(KEEP_EXPERTS, "<test>", "q6-keep-experts")
    plan = prepare(str(shipped), recipe).plan
    experts = [tp for tp in plan.tensors if ".experts." in tp.name and tp.name.endswith("proj.weight")]
    assert experts and all(tp.source and tp.spec.mode == "mxfp4" and "kept as it ships (mxfp4)" in tp.reason
                           for tp in experts)
    assert all(tp.spec.bits == 6 for tp in plan.tensors if tp.name.endswith("self_attn.q_proj.weight"))
    # a bf16 checkpoint (nothing shipped quantized): the rule's own spec applies, quantized from floats
    plain = prepare(str(tiny_model("gpt_oss")), recipe).plan
    assert not any(tp.source for tp in plain.tensors)
    assert all(tp.spec.mode == "mxfp4" and "kept as it ships" not in tp.reason
               for tp in plain.tensors if ".experts." in tp.name and tp.name.endswith("proj.weight"))
    out = tmp_path / "kept"
    recipe_file = tmp_path / "r.toml"
    recipe_file.write_text(KEEP_EXPERTS)
    assert main(["convert", str(shipped), str(out), "--recipe", str(recipe_file)]) == 0
    got, ckpt = _stored(out), Checkpoint(shipped)
    for name, load in arch.source_loaders(ckpt).items():
        q, base = load(), name.removesuffix(".weight")
        assert torch.equal(got[f"{base}.weight"], q.wq) and torch.equal(got[f"{base}.scales"], q.scales)
        assert f"{base}.biases" not in got


def test_source_recipe_needs_a_quantized_source(tiny_model):
    with pytest.raises(MixqError, match="keeps a source's own quantization"):
        prepare(str(tiny_model("gpt_oss")), "source")
    with pytest.raises(MixqError, match="keep_source must be true or false"):
        parse_recipe('[recipe]\nbits = 4\n[[rule]]\npattern = "*"\nkeep_source = 1\nbits = 4\n')


@pytest.mark.mlx
def test_source_recipe_equals_mlx_lm_load_of_the_shipped_checkpoint(shipped, tmp_path):
    """`convert --recipe source` of the MXFP4 checkpoint holds the parameters mlx_lm.load builds from the shipped
    checkpoint itself (its sanitize: blocks viewed as uint32, gate/up split), bit for bit, and the same logits."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm import load

    out = tmp_path / "source"
    assert main(["convert", str(shipped), str(out), "--recipe", "source"]) == 0
    prov = json.loads((out / "mixq_provenance.json").read_text())
    assert prov["recipe"]["name"] == "source"
    theirs, _ = load(str(shipped))
    ours, _ = load(str(out))
    a, b = dict(tree_flatten(theirs.parameters())), dict(tree_flatten(ours.parameters()))
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and mx.array_equal(a[k], b[k]).item(), k
    ids = mx.array([[1, 5, 9, 3, 7, 2]])
    np.testing.assert_array_equal(np.array(theirs(ids).astype(mx.float32)), np.array(ours(ids).astype(mx.float32)))


def test_engine_applies_kept_experts_like_convert(shipped, tmp_path):
    """MODEL@source in the engine: the experts are the shipped mxfp4 tensors, dequantized as the folder is."""
    from mixq.eval.engine import load_model

    out = tmp_path / "source"
    assert main(["convert", str(shipped), str(out), "--recipe", "source"]) == 0
    a = dict(load_model(f"{shipped}@source", progress=False, packed=False).model.named_parameters())
    b = dict(load_model(str(out), progress=False, packed=False).model.named_parameters())
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k

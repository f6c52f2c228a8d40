"""mixq card: the README of a fake mixed-precision MLX folder (config + provenance + safetensors)."""

import argparse
import json

import numpy as np
import pytest
from fake_runs import kld_stats, write_run
from safetensors.numpy import save_file

from mixq.errors import MixqError
from mixq.io.files import README_MARK
from mixq.report import card

H, I, V, L, GS = 64, 128, 256, 8, 32


def _is_8bit(module: str) -> bool:
    if "embed_tokens" in module:
        return True
    layer = int(module.split(".")[2]) if ".layers." in module else -1
    return "self_attn" in module and layer % 4 == 0


def make_mlx_folder(path, *, provenance=True, gguf=True, offgrid=True):
    """A tiny llama-like folder as `mixq convert --recipe qx86-hi` would write it (tied embeddings)."""
    path.mkdir(parents=True)
    tensors, quant = {}, {"group_size": GS, "bits": 6}
    mods = {"model.embed_tokens": (V, H)}
    for l in range(L):
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
            mods[f"model.layers.{l}.self_attn.{p}"] = (H, H)
        mods[f"model.layers.{l}.mlp.gate_proj"] = (I, H)
        mods[f"model.layers.{l}.mlp.up_proj"] = (I, H)
        mods[f"model.layers.{l}.mlp.down_proj"] = (H, I)
        tensors[f"model.layers.{l}.input_layernorm.weight"] = np.ones(H, np.float16)
        tensors[f"model.layers.{l}.post_attention_layernorm.weight"] = np.ones(H, np.float16)
    tensors["model.norm.weight"] = np.ones(H, np.float16)
    for m, (out, inp) in mods.items():
        bits = 8 if _is_8bit(m) else 6
        if bits == 8:
            quant[m] = {"group_size": GS, "bits": 8}
        tensors[m + ".weight"] = np.zeros((out, inp * bits // 32), np.uint32)
        tensors[m + ".scales"] = np.ones((out, inp // GS), np.float16)
        tensors[m + ".biases"] = np.zeros((out, inp // GS), np.float16)
    half = len(tensors) // 2
    names = sorted(tensors)
    save_file({k: tensors[k] for k in names[:half]}, str(path / "model-00001-of-00002.safetensors"))
    save_file({k: tensors[k] for k in names[half:]}, str(path / "model-00002-of-00002.safetensors"))
    config = {"model_type": "llama", "hidden_size": H, "intermediate_size": I, "num_hidden_layers": L,
              "vocab_size": V, "tie_word_embeddings": True, "quantization": quant, "quantization_config": quant}
    (path / "config.json").write_text(json.dumps(config))
    if provenance:   # the layout `mixq convert` writes, wrapping the import/off-grid/embedded record
        src_prov = {}
        if gguf:
            src_prov = {
                "mixq_version": "0.1.0", "kind": "gguf-import", "dequantized_from_gguf": True,
                "source": {"file": "smollm2-135m-instruct.q4_1.gguf", "sha256": "ab" * 32, "size_bytes": 1},
                "gguf": {"architecture": "llama", "name": "SmolLM2 135M Instruct", "license": None,
                         "tensor_types": {"Q4_1": 210, "F32": 61, "Q8_0": 1}},
                "embedded": {"name": "smollm2-135m", "license": "Apache-2.0",
                             "homepage": "https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct",
                             "gguf_sha256": "ab" * 32, "offgrid": offgrid}}
        if offgrid:
            src_prov["kind"] = src_prov.get("kind", "hf") + "+offgrid"
            src_prov["offgrid"] = {"seed": 0, "method": "per-channel", "factor_range": [0.5, 2.0]}
        prov = {"mixq_version": "0.1.0", "created": "2026-11-26T19:00:00Z", "recipe": {
                    "name": "qx86-hi",
                    "description": "6-bit data, 8-bit embeddings/head and every 4th layer's attention",
                    "text": 'name = "qx86-hi"\n[default]\nbits = 6\ngroup_size = 32\n'},
                "source": {"ref": "smollm2-135m", "path": "/cache/smollm2-135m",
                           "files": {"model.safetensors": "cd" * 32}, "provenance": src_prov},
                "tensors": []}
        (path / "mixq_provenance.json").write_text(json.dumps(prov))
    (path / "README.md").write_text(f"---\nlibrary_name: mlx\n---\n{README_MARK}\n\nstub\n")   # as convert writes
    return path


def _expected_sizes():
    params = bytes_ = 0
    n8 = 0
    for m_params, bits in ([(V * H, 8)] + [(H * H, 8 if l % 4 == 0 else 6) for l in range(L) for _ in range(4)]
                           + [(I * H, 6)] * (3 * L)):
        params += m_params
        bytes_ += m_params * bits // 8 + 2 * 2 * m_params // GS
        n8 += m_params if bits == 8 else 0
    norms = (2 * L + 1) * H
    return params + norms, bytes_ + 2 * norms, n8


def test_read_folder_counts_what_the_files_hold(tmp_path):
    info = card.read_folder(make_mlx_folder(tmp_path / "m"))
    n_params, size, n8 = _expected_sizes()
    assert info.n_params == n_params
    assert info.size_bytes == size
    assert info.bits_per_weight == pytest.approx(8 * size / n_params)
    assert sum(t.params for t in info.tensors if t.bits == 8) == n8
    kinds = {t.module: t.kind for t in info.tensors}
    assert kinds["model.embed_tokens"] == "embeddings (embed_tokens)"
    assert kinds["model.layers.3.self_attn.k_proj"] == "attention q/k/v/o"
    assert kinds["model.layers.3.mlp.down_proj"] == "MLP gate/up/down"
    assert kinds["model.norm"] == "norms, biases, other 1-D"
    assert card.tensor_kind("model.layers.0.mlp.switch_mlp.up_proj") == "MoE experts"
    assert card.tensor_kind("model.layers.0.mlp.gate") == "MoE router"
    assert card.tensor_kind("lm_head") == "output head (lm_head)"
    assert card.tensor_kind("model.layers.0.block_sparse_moe.experts") == "MoE experts"
    assert card.tensor_kind("model.layers.0.self_attn.rotary") == "other"
    assert {t.module: t.layer for t in info.tensors}["model.layers.3.mlp.down_proj"] == 3
    assert {t.module: t.layer for t in info.tensors}["model.embed_tokens"] is None


def test_card_for_mixed_recipe(tmp_path):
    folder = make_mlx_folder(tmp_path / "smollm2-135m-qx86-hi")
    out = card.write_card(folder)
    text = out.read_text()
    assert out == folder / "README.md" and "stub" not in text
    assert text.splitlines()[text.splitlines().index("---", 1) + 1] == README_MARK   # right after the front matter
    front = text.split("---")[1]
    for line in ("library_name: mlx", "base_model: HuggingFaceTB/SmolLM2-135M-Instruct",
                 "pipeline_tag: text-generation", "license: apache-2.0", "- mlx", "- mixq", "- quantized",
                 "- mixed-precision", "- qx86-hi"):
        assert line in front
    n_params, size, n8 = _expected_sizes()
    # recipe table: kinds -> precision, layers, share
    att_share = 8 * H * H / n_params           # 2 layers (0, 4) x 4 projections
    assert (f"| attention q/k/v/o | 8-bit, group 32 | 8 | 0, 4 (every 4) | {8 * H * H / 1e6:.2f} M | "
            f"{att_share:.1%} |") in text
    assert "| attention q/k/v/o | 6-bit, group 32 | 24 | all but 0, 4 (every 4) |" in text
    assert "| MLP gate/up/down | 6-bit, group 32 | 24 | all |" in text
    assert (f"| embeddings (embed_tokens) | 8-bit, group 32 | 1 | — | {V * H / 1e6:.2f} M | "
            f"{V * H / n_params:.1%} |") in text
    assert "| norms, biases, other 1-D | kept (float16) | 17 |" in text
    shares = [float(r.split("|")[6].strip().rstrip("%")) for r in text.splitlines() if r.startswith("| ") and
              r.split("|")[2].strip().startswith(("8-bit", "6-bit", "kept"))]
    assert sum(shares) == pytest.approx(100, abs=0.3)
    # words
    assert "Most weights" in text and "are 6-bit with group size 32" in text
    assert "attention q/k/v/o in layers 0, 4 (every 4) at 8-bit, group 32" in text
    # size vs bf16
    assert f"| bits per weight | {8 * size / n_params:.2f} | 16.00 |" in text
    assert f"{size / (2 * n_params):.1%} of the bf16 size" in text
    # how it was made, honestly
    assert "dequantized from a 4-bit GGUF" in text and "re-parametrized off-grid" in text
    assert "Q4_1: 210" in text and "**not** the original full-precision checkpoint" in text
    assert "sha256 `abababababababab…`" in text and "Source reference: `smollm2-135m`" in text
    assert "mixq 0.1.0 on 2026-11-26T19:00:00Z" in text and "Recipe: `qx86-hi`" in text and 'name = "qx86-hi"' in text
    # usage
    assert 'load("smollm2-135m-qx86-hi")' in text and "apply_chat_template" in text
    assert "generate(model, tokenizer, prompt=prompt" in text
    assert f"mixq generate {folder} -p" in text
    assert "## Evaluation" not in text
    assert not [f for f in folder.iterdir() if f.name.startswith(".README")]


def test_card_with_runs_has_eval_table(tmp_path):
    folder = make_mlx_folder(tmp_path / "m")
    base = write_run(tmp_path / "runs" / "bf16", recipe="bf16", bpw=16.0, size_bytes=270_000_000,
                     outcomes={"arc_easy": [1] * 60 + [0] * 40, "piqa": [1] * 65 + [0] * 35})
    q = write_run(tmp_path / "runs" / "qx86-hi", recipe="qx86-hi", bpw=6.9, size_bytes=117_000_000,
                  outcomes={"arc_easy": [0] * 2 + [1] * 58 + [0] * 40, "piqa": [1] * 65 + [0] * 35},
                  kld=kld_stats(0.007, 0.0004, 0.95, 0.004, 0.001))
    text = card.write_card(folder, runs=[base, q]).read_text()
    assert "## Evaluation" in text
    assert "| arc_easy | 0.600 ±0.049 | 0.580 ±0.050 | -0.020 ≈ |" in text
    assert "Documents per task: arc_easy 100, piqa 100." in text
    assert "No task difference between qx86-hi and bf16 is significant at 5%" in text
    assert "Differences against bf16 come with 95% intervals" in text and "Holm" in text
    # against another reference (as the demo compares each variant with its reference variant)
    vs_q = card.render_card(card.read_folder(folder), [q, base], ref=str(q))
    assert "| arc_easy | 0.580 ±0.050 | 0.600 ±0.049 | +0.020 ≈ |" in vs_q
    assert "differences against qx86-hi" in vs_q and "No task difference between bf16 and qx86-hi" in vs_q
    # a single run has no comparison: its scores, and no line about differences at all
    one = card.render_card(card.read_folder(folder), [q])
    assert "| arc_easy | 0.580 ±0.050 |" in one and "Smallest" not in one
    assert "- qx86-hi on 2 tasks (acc, n=100 documents per task).\n" in one and "| acc | qx86-hi |" in one
    for comparison_words in ("single run", "differences", "Differences", "Holm", "Δ", "≈", "significant", "paired"):
        assert comparison_words not in one.split("## Evaluation")[1].split("## How it was made")[0]


def test_card_does_not_replace_a_readme_mixq_did_not_write(tmp_path):
    folder = make_mlx_folder(tmp_path / "m")
    own = "---\nlicense: apache-2.0\n---\n# The model's own card\n"
    (folder / "README.md").write_text(own)
    with pytest.raises(MixqError) as e:
        card.write_card(folder)
    msg = str(e.value)
    assert "\n" not in msg and str(folder / "README.md") in msg and "not written by mixq" in msg
    assert "--force" in msg and "-o FILE" in msg
    assert (folder / "README.md").read_text() == own                       # untouched
    # written elsewhere with -o
    p = argparse.ArgumentParser()
    card.add_arguments(p)
    elsewhere = tmp_path / "cards" / "CARD.md"
    assert card.cli(p.parse_args([str(folder), "-o", str(elsewhere)])) == 0
    assert README_MARK in elsewhere.read_text() and (folder / "README.md").read_text() == own
    # a file mixq wrote is replaced; one it did not write is refused at -o FILE too
    assert card.write_card(folder, out=elsewhere) == elsewhere
    with pytest.raises(MixqError, match="not written by mixq"):
        card.write_card(folder, out=folder / "README.md")
    with pytest.raises(MixqError, match="is a folder"):
        card.write_card(folder, out=tmp_path)
    # --force replaces it, and the card it writes carries the mark, so the next card replaces it freely
    assert card.cli(p.parse_args([str(folder), "--force"])) == 0
    assert README_MARK in (folder / "README.md").read_text()
    assert card.write_card(folder) == folder / "README.md"


def test_card_tolerates_plain_mlx_folder_and_cli(tmp_path):
    folder = make_mlx_folder(tmp_path / "plain", provenance=False)
    p = argparse.ArgumentParser()
    card.add_arguments(p)
    assert card.cli(p.parse_args([str(folder), "--base-model", "org/model"])) == 0
    text = (folder / "README.md").read_text()
    assert "base_model: org/model" in text and "license:" not in text
    assert "no mixq provenance recorded" in text and "GGUF" not in text
    with pytest.raises(MixqError, match="no config.json"):
        card.write_card(tmp_path / "nothing-here")


def test_license_ids_and_gemma(tmp_path):
    assert card.license_id("Apache-2.0") == ("apache-2.0", None)
    assert card.license_id("Gemma Terms of Use") == ("gemma", None)
    assert card.license_id("Some Custom Licence") == ("other", "some-custom-licence")
    assert card.license_id(None) == (None, None)


def test_card_without_offgrid_says_on_grid_source(tmp_path):
    text = card.write_card(make_mlx_folder(tmp_path / "m", offgrid=False)).read_text()
    assert "dequantized from a 4-bit GGUF" in text and "off-grid" not in text


def test_layer_text():
    assert card.layer_text([0, 4, 8, 12], 16) == "0, 4, 8, 12 (every 4)"
    assert card.layer_text(list(range(30)), 30) == "all"
    assert card.layer_text([2, 3, 4], 30) == "2–4"
    assert card.layer_text([1, 5, 6], 30) == "1, 5, 6"
    assert card.layer_text([i for i in range(30) if i % 4], 30) == "all but 0, 4, 8, 12, 16, 20, 24, 28 (every 4)"
    assert card.layer_text([1, 2, 3], 4) == "1–3"
    assert card.layer_text(list(range(0, 120, 4)), 120) == "every 4 from 0 to 116"

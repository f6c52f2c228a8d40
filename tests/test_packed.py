"""Packed weights in the engine (mixq.eval.packed): the same logits, bit for bit, as the dense engine, for every
architecture, uniform and mixed recipes, MoE routing, tied heads; the memory of the quantized size."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import _TEXT, ARCHS

from mixq.eval.engine import load_model
from mixq.eval.head import OutputHead, head_from_state, head_state, output_head
from mixq.eval.packed import JitParam, dense_state_dict, keep_dense, packed_weights, weight_bytes

torch.set_num_threads(2)

# gate and up projections (MoE experts too) under different specs, or one kept dense: a fused parameter
# made of differently packed parts, or of a packed and a dense one
SPLIT = """
[recipe]
name = "split"
description = "gate 4-bit, up 8-bit group 64, the rest 6-bit"
bits = 6
group_size = 32

[[rule]]
pattern = "*.gate_proj"
bits = 4

[[rule]]
pattern = "*.up_proj"
bits = 8
group_size = 64
"""
KEEP_UP = """
[recipe]
name = "keep-up"
description = "up projections kept, the rest 4-bit"
bits = 4
group_size = 32

[[rule]]
pattern = "*.up_proj"
keep = true
"""


def _ids(lm, seed=0, n=23):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, lm.model.config.vocab_size, (2, n), generator=g)


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


def _same_weights(dense, packed):
    a, b = dense.state_dict(), dense_state_dict(packed)
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]) and a[k].stride() == b[k].stride() and a[k].dtype == b[k].dtype, k


def _pair(ref, **kw):
    """(the dense engine, the packed engine with no dense copies) of `ref`."""
    return load_model(ref, packed=False, progress=False, **kw), load_model(ref, progress=False, max_memory=0, **kw)


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_equals_dense_every_arch(tiny_model, arch):
    dense, packed = _pair(f"{tiny_model(arch)}@q4-hi")
    state = packed_weights(packed.model)
    assert state is not None and state.params and packed_weights(dense.model) is None
    x = _ids(dense)
    assert torch.equal(_logits(dense.model, x), _logits(packed.model, x))
    _same_weights(dense.model, packed.model)
    # between forwards every packed parameter holds a one-element placeholder: weights = the quantized size
    assert all(jp.holder.untyped_storage().nbytes() == jp.holder.element_size() for jp in state.params.values())
    assert weight_bytes(packed.model) < 0.4 * weight_bytes(dense.model)
    assert state.nbytes <= packed.info.size_bytes


@pytest.mark.parametrize("arch,recipe", [("llama-5l", "qx86-hi"), ("gemma3_text", "mixed_3_6"), ("qwen3_moe", SPLIT),
                                         ("gpt_oss", SPLIT), ("qwen3_moe", KEEP_UP), ("gpt_oss", KEEP_UP),
                                         ("phi3", "qx64-hi")])
def test_packed_equals_dense_mixed_recipes(tiny_model, tmp_path, arch, recipe):
    if "\n" in recipe:
        (tmp_path / "r.toml").write_text(recipe)
        recipe = str(tmp_path / "r.toml")
    dense, packed = _pair(str(tiny_model(arch)), recipe=recipe)
    x = _ids(dense, seed=3, n=31)
    assert torch.equal(_logits(dense.model, x), _logits(packed.model, x))
    _same_weights(dense.model, packed.model)


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
@pytest.mark.parametrize("impl", ["eager", "grouped_mm"])
def test_moe_routing_and_experts(tiny_model, arch, impl):
    """Routers pick the same experts and the expert stacks are the dense ones, in either experts implementation."""
    dense, packed = _pair(f"{tiny_model(arch)}@q4-hi")
    for lm in (dense, packed):
        lm.model.set_experts_implementation(impl)
    x = _ids(dense, seed=5, n=40)
    routed = {}
    for name, lm in (("dense", dense), ("packed", packed)):
        with torch.no_grad():
            out = lm.model(x, output_router_logits=True)
        routed[name] = (out.logits, out.router_logits)
    assert torch.equal(routed["dense"][0], routed["packed"][0])
    assert len(routed["dense"][1]) == dense.model.config.num_hidden_layers
    for a, b in zip(routed["dense"][1], routed["packed"][1]):
        assert torch.equal(a, b)
    experts = [k for k in packed_weights(packed.model).params if ".experts." in k]
    assert experts and all(k.endswith(("gate_up_proj", "down_proj")) for k in experts)


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
@pytest.mark.parametrize("impl", ["eager", "grouped_mm", "batched_mm"])
def test_moe_dequantizes_only_routed_experts(tiny_model, arch, impl, monkeypatch):
    """A packed expert stack is dequantized only for the experts the call routes tokens to; the logits stay the
    dense engine's, bit for bit (one token: top-k experts of each layer; many tokens: most experts)."""
    from mixq.eval.packed import Packed

    dense, packed = _pair(f"{tiny_model(arch)}@q4-hi")
    for lm in (dense, packed):
        lm.model.set_experts_implementation(impl)
    cfg = dense.model.config
    n_experts, top_k = getattr(cfg, "num_experts", None) or cfg.num_local_experts, cfg.num_experts_per_tok
    made: dict[str, int] = {}   # expert stack -> experts dequantized in one forward
    real = Packed.dense

    def counting(self, index=None):
        if self.wq.dim() == 3:
            n = self.wq.shape[0]
            k = n if index is None else len(range(n)[index]) if isinstance(index, slice) else int(index.numel())
            made[self.name] = made.get(self.name, 0) + k
        return real(self, index)

    monkeypatch.setattr(Packed, "dense", counting)
    for n in (1, 40):
        x = _ids(dense, seed=7, n=n)[:1]
        made.clear()
        assert torch.equal(_logits(dense.model, x), _logits(packed.model, x))
        assert len(made) == 3 * cfg.num_hidden_layers  # gate, up, down of every layer
        assert all(k <= min(n * top_k, n_experts) for k in made.values())
        if n == 1:
            assert set(made.values()) == {top_k} and top_k < n_experts


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_lazy_experts_one_expert_at_a_time(tiny_model, arch, monkeypatch):
    """The engine's experts run eagerly; a packed stack is then a `LazyExperts`: each routed expert dequantized
    alone when the forward indexes it (never a stack of all experts, never two experts of a stack alive at once),
    logits equal to the dense engine's bit for bit."""
    import weakref

    from mixq.eval.packed import JitParam, LazyExperts

    dense, packed = _pair(f"{tiny_model(arch)}@q4-hi")
    assert dense.model.config._experts_implementation == packed.model.config._experts_implementation == "eager"
    alive: dict[str, list] = {}   # stack -> weak references to the experts it made
    made, peak, stand_ins = [], [0], []
    real_expert, real_getitem = JitParam.expert, LazyExperts.__getitem__

    def expert(self, e):
        out = real_expert(self, e)
        refs = [r for r in alive.get(self.key, []) if r() is not None]
        alive[self.key] = [*refs, weakref.ref(out)]
        peak[0] = max(peak[0], len(alive[self.key]))
        made.append((self.key, e, out.numel()))
        return out

    def getitem(self, index):
        stand_ins.append(self)
        return real_getitem(self, index)

    monkeypatch.setattr(JitParam, "expert", expert)
    monkeypatch.setattr(JitParam, "routed", lambda *a: pytest.fail("a whole stack was made"))
    monkeypatch.setattr(LazyExperts, "__getitem__", getitem)
    x = _ids(dense, seed=11, n=40)
    assert torch.equal(_logits(dense.model, x), _logits(packed.model, x))
    cfg = dense.model.config
    n_experts = getattr(cfg, "num_experts", None) or cfg.num_local_experts
    stacks = {k for k, _, _ in made}
    assert len(stacks) == 2 * cfg.num_hidden_layers   # gate_up and down of every layer
    assert peak[0] == 1   # one expert of a stack alive at a time
    jps = packed_weights(packed.model).params
    assert all(n == math.prod(jps[k].shape[1:]) and e < n_experts for k, e, n in made)
    assert stand_ins and all(isinstance(s, LazyExperts) for s in stand_ins)
    # between forwards the placeholders are back
    assert all(jp.holder.untyped_storage().nbytes() == jp.holder.element_size() for jp in jps.values())


def test_converted_folder_packed(tiny_model, tmp_path):
    """A converted MLX folder held packed: the same logits as dequantized at load and as the recipe on the fly."""
    from mixq.quant.convert import convert

    src = tiny_model("gemma3_text")
    out = convert(str(src), tmp_path / "g", recipe="qx86-hi", progress=False)
    dense, packed = _pair(str(out))
    fly = load_model(f"{src}@qx86-hi", progress=False, max_memory=0)
    x = _ids(dense)
    want = _logits(dense.model, x)
    assert torch.equal(want, _logits(packed.model, x)) and torch.equal(want, _logits(fly.model, x))
    assert packed_weights(packed.model).nbytes == packed_weights(fly.model).nbytes
    assert packed.info.size_bytes == dense.info.size_bytes == fly.info.size_bytes


def _mapped_files() -> dict[str, list[tuple[int, int]]]:
    """file path -> its address ranges mapped into this process (Linux /proc/self/maps)."""
    out: dict[str, list[tuple[int, int]]] = {}
    for line in open("/proc/self/maps"):
        parts = line.split()
        if len(parts) >= 6:
            a, b = (int(x, 16) for x in parts[0].split("-"))
            out.setdefault(parts[5], []).append((a, b))
    return out


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/self/maps (Linux)")
@pytest.mark.parametrize("arch", ["llama", "gpt_oss"])
def test_mlx_folder_is_memory_mapped(tiny_model, tmp_path, arch):
    """An MLX folder's packed tensors are views of its memory-mapped files (nothing copied): the same tensors as
    safetensors reads, and the same logits as the dense engine."""
    from safetensors.torch import load_file

    from mixq.io.safetensors import mapped_tensors
    from mixq.quant.convert import convert

    out = convert(str(tiny_model(arch)), tmp_path / "m", recipe="q4-hi", shard_bytes=20_000, progress=False)
    files = sorted(out.glob("*.safetensors"))
    assert len(files) > 1  # sharded: every file mapped
    for f in files:
        mapped, copied = mapped_tensors(f), load_file(str(f))
        assert sorted(mapped) == sorted(copied)
        assert all(mapped[k].dtype == copied[k].dtype and torch.equal(mapped[k], copied[k]) for k in copied)
    dense, packed = _pair(str(out))
    x = _ids(dense, seed=11)
    assert torch.equal(_logits(dense.model, x), _logits(packed.model, x))
    ranges = [r for f in files for r in _mapped_files().get(str(f.resolve()), [])]
    words = [p.wq for jp in packed_weights(packed.model).params.values() for p in jp.parts if hasattr(p, "wq")]
    assert words and all(any(a <= w.data_ptr() < b for a, b in ranges) for w in words)


def _resident(path: Path) -> int:
    """Bytes of `path`'s maps resident in this process (Linux /proc/self/smaps)."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        first = line.split()[0]
        if "-" in first and ":" not in first:
            inside = line.rstrip().endswith(str(path))
        elif inside and first == "Rss:":
            total += int(line.split()[1]) * 1024
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads /proc/self/smaps (Linux)")
def test_drop_pages(tmp_path):
    """drop_pages gives back a mapped tensor's resident pages (its values read again from the file) and leaves any
    other tensor alone."""
    from safetensors.torch import save_file

    from mixq.io.safetensors import drop_pages, mapped_tensors

    want = {"a": torch.arange(1 << 20, dtype=torch.int32), "b": torch.randn(300, 1000)}
    save_file(want, tmp_path / "x.safetensors")
    got = mapped_tensors(tmp_path / "x.safetensors")
    assert all(torch.equal(got[k], want[k]) for k in want)  # every page read
    before = _resident(tmp_path / "x.safetensors")
    assert before >= 4 << 20
    assert drop_pages(got["a"], None) >= (4 << 20) - 8192
    assert _resident(tmp_path / "x.safetensors") <= before - ((4 << 20) - 8192)
    assert all(torch.equal(got[k], want[k]) for k in want)  # read again
    heap = want["b"].clone()
    assert drop_pages(heap, got["a"][:10]) == 0 and torch.equal(heap, want["b"])  # not mapped; under a page


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads /proc/self/smaps (Linux)")
def test_forward_drops_mapped_pages(tiny_model, tmp_path):
    """After each module's forward its packed weights' pages are given back: an MLX folder's files stay (almost)
    unread in memory after a forward, whatever the model's size, and the logits are the dense engine's."""
    from mixq.quant.convert import convert

    out = convert(str(tiny_model("llama", hidden_size=256, intermediate_size=1024)), tmp_path / "m", recipe="q8",
                  progress=False)
    dense, packed = _pair(str(out))
    x = _ids(dense, seed=3)
    assert torch.equal(_logits(dense.model, x), _logits(packed.model, x))
    (f,) = out.glob("*.safetensors")
    assert _resident(f.resolve()) < 0.25 * f.stat().st_size


@pytest.mark.parametrize("arch", ["gemma3_text", "qwen2"])
def test_output_head_rows(tiny_model, tmp_path, arch):
    """The packed head (tied to the embedding for gemma3) gives the dense head's rows and logits, slice by slice,
    and survives torch.save / torch.load(weights_only=True) packed."""
    dense, packed = _pair(f"{tiny_model(arch)}@q6-hi")
    hd, hp = output_head(dense.model), output_head(packed.model)
    assert isinstance(hp.weight, JitParam) and isinstance(hd.weight, torch.Tensor)
    assert hp.vocab_size == hd.vocab_size and hp.softcap == hd.softcap
    tied = packed.model.config.tie_word_embeddings
    emb = packed.model.get_input_embeddings().weight
    assert (packed.model.get_output_embeddings().weight is emb) == tied
    h = torch.randn(2, 7, packed.model.config.hidden_size)
    for a, b in ((0, None), (0, 100), (100, 250), (250, None)):
        assert torch.equal(hd.logits(h, a, b), hp.logits(h, a, b))
    rows = torch.tensor([5, 0, 99, 5, hd.vocab_size - 1])
    assert torch.equal(hd.logits(h, rows=rows), hp.logits(h, rows=rows))
    for step in (64, 100, hd.vocab_size - 10, 10_000):  # slice by slice (a narrow tail joins the slice before)
        assert torch.equal(hd.all_logits(h, step), hd.logits(h)) and torch.equal(hp.all_logits(h, step), hd.logits(h))
        assert all(b - a >= min(step, 64) for a, b in hd.slices(step)) and hd.slices(step)[-1][1] == hd.vocab_size
    torch.save(head_state(hp), tmp_path / "head.pt")
    back = head_from_state(torch.load(tmp_path / "head.pt", weights_only=True))
    assert isinstance(back.weight, JitParam) and torch.equal(back.logits(h), hd.logits(h))
    dense_back = head_from_state(head_state(hd))
    assert isinstance(dense_back, OutputHead) and torch.equal(dense_back.weight, hd.weight)


@pytest.mark.parametrize("arch", ["gemma3_text", "llama", "gpt_oss"])
def test_packed_head_forward_by_slices(tiny_model, arch, monkeypatch):
    """A packed output head (tied for gemma3) computes the model's logits by vocabulary slices, never dequantizing
    the whole head: the logits by slices equal the whole dense head's bit for bit (and the dense engine's); once
    `keep_dense` made the head dense it is a plain linear again."""
    import mixq.eval.head as head_mod
    from mixq.eval.head import vocab_slices

    dense, packed = _pair(f"{tiny_model(arch)}@q6-hi")
    lm_head = packed.model.get_output_embeddings()
    head_jp = next(p for p in packed_weights(packed.model).params.values() if p.holder is lm_head.weight)
    step = 64
    monkeypatch.setattr(head_mod, "VOCAB_SLICE", step)
    cuts = vocab_slices(head_jp.shape[0])
    assert len(cuts) > 2 and all(b - a >= step for a, b in cuts)
    asked = []
    real_rows, real_dense = JitParam.rows, JitParam.dense

    def rows(self, index):
        if self is head_jp:
            asked.append(len(range(head_jp.shape[0])[index]) if isinstance(index, slice) else int(index.numel()))
        return real_rows(self, index)

    def whole(self):
        assert self is not head_jp, "the whole head was made dense"
        return real_dense(self)

    monkeypatch.setattr(JitParam, "rows", rows)
    monkeypatch.setattr(JitParam, "dense", whole)
    x = _ids(dense, seed=13, n=17)
    assert torch.equal(_logits(dense.model, x), _logits(packed.model, x))
    assert asked and all(n <= step + 63 for n in asked)
    h = torch.randn(3, 5, lm_head.in_features, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole_head = torch.nn.functional.linear(h, real_dense(head_jp), lm_head.bias)
        assert torch.equal(lm_head(h), whole_head)
    monkeypatch.setattr(JitParam, "dense", real_dense)
    keep_dense(packed.model, 1 << 40)
    assert lm_head.weight is not head_jp.holder
    with torch.no_grad():
        assert torch.equal(lm_head(h), whole_head)


def test_embedding_dequantizes_only_rows_looked_up(tiny_model):
    dense, packed = _pair(f"{tiny_model('gemma3_text')}@q4-hi")  # gemma: the scaled embedding subclass
    emb_d, emb_p = dense.model.get_input_embeddings(), packed.model.get_input_embeddings()
    ids = torch.tensor([[7, 3, 7, 300, 0], [1, 1, 2, 3, 4]])
    seen = []
    jp = packed_weights(packed.model).params["model.embed_tokens.weight"]
    rows = jp.rows
    jp.rows = lambda index: (seen.append(index), rows(index))[1]
    with torch.no_grad():
        assert torch.equal(emb_d(ids), emb_p(ids))
    assert [i.tolist() for i in seen] == [[0, 1, 2, 3, 4, 7, 300]]
    assert emb_p.padding_idx == emb_d.padding_idx and emb_p.weight is jp.holder
    with pytest.raises(IndexError):
        emb_p(torch.tensor([[packed.model.config.vocab_size]]))
    assert emb_p.weight is jp.holder  # put back after a failed forward too


def test_keep_dense_budget(tiny_model):
    dense, packed = _pair(f"{tiny_model('llama')}@q4-hi")
    x = _ids(dense)
    before = weight_bytes(packed.model)
    state = packed_weights(packed.model)
    n = len(state.params)
    biggest = max(jp.dense_nbytes - jp.nbytes for k, jp in state.params.items() if "embed" not in k)
    kept = keep_dense(packed.model, biggest)
    assert 0 < kept <= biggest and len(state.params) < n
    assert 0 <= before + kept - weight_bytes(packed.model) <= 4 * n  # less the 4-byte placeholders
    assert torch.equal(_logits(dense.model, x), _logits(packed.model, x))
    keep_dense(packed.model, 1 << 40)  # everything: the tied embedding/head too
    assert not state.hooks and not state.params and weight_bytes(packed.model) == weight_bytes(dense.model)
    assert torch.equal(_logits(dense.model, x), _logits(packed.model, x))
    assert isinstance(output_head(packed.model).weight, torch.Tensor)


def test_memory_budget_on_load(tiny_model):
    """load_model keeps dense copies while the weights fit max_memory (auto: half the available memory, so a
    tiny model is all dense) and otherwise stays packed; the logits never change."""
    from mixq.eval.engine import parse_memory

    ref = f"{tiny_model('qwen2')}@q4-hi"
    dense, packed = _pair(ref)
    auto = load_model(ref, progress=False)
    some = load_model(ref, progress=False, max_memory=weight_bytes(packed.model) + 40_000)
    x = _ids(dense)
    want = _logits(dense.model, x)
    sizes = []
    for lm in (packed, some, auto):
        assert torch.equal(want, _logits(lm.model, x))
        sizes.append(weight_bytes(lm.model))
    assert sizes[0] < sizes[1] <= sizes[0] + 40_000 < sizes[2]
    assert not packed_weights(auto.model).hooks[1:]  # all dense but the untied embedding (rows on demand)
    assert parse_memory("auto") is None and parse_memory("0") == 0 and parse_memory("1.5") == 1_500_000_000
    from mixq.errors import MixqError
    for bad in ("-1", "lots", "nan"):
        with pytest.raises(MixqError, match="--max-memory"):
            parse_memory(bad)


def test_perplexity_and_kld_packed(tiny_model, tmp_path):
    """ppl and the exact KLD (vocabulary walk over the packed head; a packed base head too) equal the dense ones."""
    from mixq.eval.perplexity import base_dists, make_windows, token_nll, token_stats

    text = tmp_path / "t.txt"
    text.write_text(_TEXT * 3)
    src = tiny_model("gemma3_text")
    dense, packed = _pair(f"{src}@q4-hi")
    win = make_windows(dense.tokenizer, text, ctx=24)
    assert np.array_equal(token_nll(dense.model, win, progress=False), token_nll(packed.model, win, progress=False))
    base_d, base_p = _pair(f"{src}@q8")
    bd, bp = base_dists(base_d.model, win, progress=False), base_dists(base_p.model, win, progress=False)
    assert bd.k == bp.k == "exact" and isinstance(bp.head.weight, JitParam)
    a = token_stats(dense.model, win, bd, progress=False)
    b = token_stats(packed.model, win, bp, progress=False)
    for f in ("kld", "agree", "dp", "nll_quant", "nll_base"):
        assert np.array_equal(getattr(a, f), getattr(b, f)), f
    assert a.kld.mean() > 0


def test_scoring_records_packed(tiny_model):
    from test_scoring import DOCS

    from mixq.eval.scoring import score_docs

    dense, packed = _pair(f"{tiny_model('llama')}@qx86-hi")
    for task, docs in DOCS.items():
        a = list(score_docs(dense.model, dense.tokenizer, task, docs, progress=False))
        b = list(score_docs(packed.model, packed.tokenizer, task, docs, progress=False))
        assert a == b, task


def test_generation_packed(tiny_model):
    from mixq.infer.generate import TorchSession

    dense, packed = _pair(f"{tiny_model('qwen3_moe')}@q4-hi")
    ids = dense.tokenizer("The quick brown fox")["input_ids"]
    out = [[r.token for r in TorchSession(lm.model, lm.tokenizer).stream(ids, 12, 0.0, 1.0, None)]
           for lm in (dense, packed)]
    assert out[0] == out[1] and len(out[0]) > 1


def test_generate_cli_device_cpu_packed(tiny_model, capsys):
    from mixq.cli import main

    ref = f"{tiny_model('llama')}@q4-hi"
    assert main(["generate", ref, "-p", "The quick brown fox", "--max-tokens", "6", "--device", "cpu",
                 "--max-memory", "0", "--backend", "torch"]) == 0
    err = capsys.readouterr().err
    assert "Peak memory:" in err and "dequantized to" not in err  # packed: no dense copies to warn about
    assert "peak memory:" in err and "RSS" in err
    with pytest.raises(SystemExit):  # argparse: not a choice
        main(["generate", ref, "-p", "x", "--device", "tpu"])


def test_chat_cli_device_cpu_packed(tiny_model, capsys, monkeypatch):
    """`mixq chat --device cpu --max-memory 0` answers as the dense engine and states its peak memory at the end."""
    import io
    import sys

    from mixq.cli import main

    ref = f"{tiny_model('llama')}@q4-hi"
    outs = []
    for extra in (["--max-memory", "0"], ["--max-memory", "auto"]):
        monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\n/exit\n"))
        assert main(["chat", ref, "--max-tokens", "6", "--device", "cpu", "--backend", "torch", *extra]) == 0
        out, err = capsys.readouterr()
        assert "peak memory:" in err
        outs.append(out)
    assert outs[0] == outs[1] and len(outs[0]) > 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (runs where torch sees one)")
@pytest.mark.parametrize("arch", ["llama", "qwen3_moe", "gemma3_text"])
def test_cuda_matches_cpu(tiny_model, tmp_path, arch):
    """On CUDA: packed == dense bit for bit; float32 per-document results equal the CPU's; bfloat16 close;
    the exact KLD and generation run there."""
    from test_scoring import DOCS

    from mixq.eval.perplexity import base_dists, make_windows, token_stats
    from mixq.eval.scoring import score_docs

    ref = f"{tiny_model(arch)}@q4-hi"
    cpu = load_model(ref, progress=False, device="cpu")
    gpu32 = load_model(ref, progress=False, device="cuda")
    gpu_packed = load_model(ref, progress=False, device="cuda", max_memory=0)
    gpu16 = load_model(ref, progress=False, device="cuda", dtype="bfloat16")
    assert gpu32.info.device == "cuda" and gpu32.model.device.type == "cuda"
    assert packed_weights(gpu_packed.model).params
    x = _ids(cpu).cuda()
    assert torch.equal(_logits(gpu32.model, x), _logits(gpu_packed.model, x))
    for task, docs in DOCS.items():
        want = list(score_docs(cpu.model, cpu.tokenizer, task, docs, progress=False))
        for lm, tol in ((gpu32, 1e-3), (gpu_packed, 1e-3), (gpu16, 0.3)):
            got = list(score_docs(lm.model, lm.tokenizer, task, docs, progress=False))
            assert [r["doc_id"] for r in got] == [r["doc_id"] for r in want]
            for a, b in zip(want, got):
                assert max(abs(u - v) for u, v in zip(a["lls"], b["lls"])) < tol, (task, a, b)
                if tol < 0.01:
                    assert (a["pred"], a["pred_norm"]) == (b["pred"], b["pred_norm"])
    text = tmp_path / "t.txt"
    text.write_text(_TEXT * 3)
    win = make_windows(cpu.tokenizer, text, ctx=24)
    base_c, base_g = base_dists(cpu.model, win, progress=False), base_dists(gpu32.model, win, progress=False)
    kc = token_stats(cpu.model, win, base_c, progress=False).kld
    kg = token_stats(gpu_packed.model, win, base_g, progress=False).kld
    assert np.abs(kg).max() < 1e-4 and np.abs(kc).max() < 1e-9  # a model against itself
    from mixq.infer.generate import TorchSession

    ids = cpu.tokenizer("The quick brown fox")["input_ids"]
    toks = [[r.token for r in TorchSession(lm.model, lm.tokenizer).stream(ids, 8, 0.0, 1.0, None)]
            for lm in (cpu, gpu32)]
    assert toks[0][:4] == toks[1][:4]

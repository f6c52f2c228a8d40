"""`mixq generate`, `mixq chat` and the Python API on tiny random models (torch and mlx backends)."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
import torch

from mixq.cli import main
from mixq.errors import MixqError
from mixq.infer.chat import Chat
from mixq.infer.generate import (
    StreamDetokenizer,
    TorchSession,
    apply_chat_template,
    backend_of,
    dequantized_note,
    generate,
    load,
    pick_backend,
    prompt_ids,
    stream_generate,
)

PROMPT = "The capital of France is"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models decode fastest on one thread (and the test machine is shared); restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _only_our_commands(monkeypatch):
    """Build the CLI with just `generate` and `chat`, so other commands' work in progress can't break these."""
    import mixq.cli as cli

    monkeypatch.setattr(cli, "COMMANDS", {k: cli.COMMANDS[k] for k in ("generate", "chat")})


@pytest.fixture(scope="module")
def llama(tiny_model) -> Path:
    return tiny_model("llama")


@pytest.fixture(scope="module")
def gemma(tiny_model) -> Path:
    return tiny_model("gemma3_text")


@pytest.fixture(scope="module")
def mlx_folder(llama, tmp_path_factory) -> Path:
    """A tiny 4-bit MLX folder written by mlx_lm.convert (the format's reference writer)."""
    mlx_lm = pytest.importorskip("mlx_lm")

    out = tmp_path_factory.mktemp("gen") / "llama-mlx-q4"
    mlx_lm.convert(str(llama), str(out), quantize=True, q_group_size=32, q_bits=4)
    return out


@pytest.fixture(scope="module")
def loaded(llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(str(llama), dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(str(llama)))


def _tokens(model, tok, prompt, **kw) -> list[int]:
    return [r.token for r in stream_generate(model, tok, prompt, **kw) if r.finish_reason != "stop"]


# --- the API and the CLI agree --------------------------------------------------------------------

def test_greedy_deterministic_and_cli_equals_api(llama, capsys):
    model, tok = load(llama, backend="torch")
    a = generate(model, tok, PROMPT, max_tokens=24)
    b = generate(model, tok, PROMPT, max_tokens=24)
    assert a == b and len(a) > 0
    capsys.readouterr()
    assert main(["generate", str(llama), "-p", PROMPT, "--max-tokens", "24", "--backend", "torch"]) == 0
    out = capsys.readouterr()
    assert out.out == a + "\n"
    assert "Prompt:" in out.err and "Generation:" in out.err and "Peak memory:" in out.err
    # without the chat template, both sides run the plain prompt
    c = generate(model, tok, PROMPT, max_tokens=12, chat_template=False)
    assert main(["generate", str(llama), "-p", PROMPT, "-m", "12", "--no-chat-template"]) == 0
    assert capsys.readouterr().out == c + "\n"


def test_package_exports_load_and_generate():
    """`from mixq import load, generate` in a fresh interpreter gives the two functions (mlx-lm's shape)."""
    import subprocess

    code = ("from mixq import load, generate; import mixq.cli, mixq; "
            "assert callable(load) and callable(generate) and callable(mixq.generate), (load, generate)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert r.returncode == 0, r.stderr[-500:]


def test_text_equals_decoded_tokens(loaded):
    model, tok = loaded
    toks = _tokens(model, tok, PROMPT, max_tokens=20)
    assert len(toks) == 20  # a random tiny model does not stop early on this prompt
    assert generate(model, tok, PROMPT, max_tokens=20) == tok.decode(toks, skip_special_tokens=True)


def test_stops_at_eos(loaded):
    model, tok = loaded
    first = _tokens(model, tok, PROMPT, max_tokens=1)[0]
    model.generation_config.eos_token_id = [tok.eos_token_id, first]  # generation_config eos ids count too
    try:
        rs = list(stream_generate(model, tok, PROMPT, max_tokens=10))
    finally:
        model.generation_config.eos_token_id = tok.eos_token_id
    assert rs[-1].finish_reason == "stop" and rs[-1].generation_tokens == 0 and rs[-1].text == ""


# --- KV cache -----------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_cached_decoding_equals_full_recomputation(arch, request):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = request.getfixturevalue(arch)  # gemma3: sliding window 8, exceeded by the 20 tokens
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(path))
    ids = prompt_ids(tok, PROMPT)
    session = TorchSession(model, tok, prefill_step=7)  # several prefill chunks
    got = [r.token for r in session.stream(ids, max_tokens=20) if r.finish_reason != "stop"]
    seq, want = list(ids), []
    with torch.no_grad():
        for _ in range(len(got)):
            want.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
            seq.append(want[-1])
    assert got == want and len(got) == 20
    assert session.tokens == ids + got[:-1]  # the cache holds exactly what was run


def test_session_reuses_and_crops_cache(loaded):
    model, tok = loaded
    ids = prompt_ids(tok, PROMPT)
    s = TorchSession(model, tok)
    first = [r.token for r in s.stream(ids, max_tokens=8)]
    longer = ids + first[:-1] + prompt_ids(tok, "Next question?", chat_template=False)
    fresh = [r.token for r in TorchSession(model, tok).stream(longer, max_tokens=8)]
    assert [r.token for r in s.stream(longer, max_tokens=8)] == fresh
    assert s.reused == len(ids) + len(first) - 1  # only the new tokens ran
    other = ids[:5] + prompt_ids(tok, "Something else", chat_template=False)  # diverges: crop to 5
    fresh = [r.token for r in TorchSession(model, tok).stream(other, max_tokens=8)]
    assert [r.token for r in s.stream(other, max_tokens=8)] == fresh and s.reused == 5


# --- prompts, sampling, detokenization ---------------------------------------------------------

def test_chat_template_applied_as_tokenizer_defines(loaded):
    model, tok = loaded
    msgs = [{"role": "user", "content": PROMPT}]
    want = list(tok.apply_chat_template(msgs, add_generation_prompt=True)["input_ids"])
    assert prompt_ids(tok, PROMPT) == want
    assert tok.decode(want).endswith("<|im_start|>assistant\n")
    assert prompt_ids(tok, PROMPT, chat_template=False) == tok.encode(PROMPT)
    rs = list(stream_generate(model, tok, PROMPT, max_tokens=2))
    assert rs[-1].prompt_tokens == len(want)
    conv = msgs + [{"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And Italy?"}]
    want = tok.apply_chat_template(conv, add_generation_prompt=True)["input_ids"]
    assert apply_chat_template(tok, conv) == list(want)


def test_sampling_seeded_and_top_p(loaded):
    model, tok = loaded
    a = _tokens(model, tok, PROMPT, max_tokens=8, temp=1.0, seed=3)
    assert a == _tokens(model, tok, PROMPT, max_tokens=8, temp=1.0, seed=3)
    assert a != _tokens(model, tok, PROMPT, max_tokens=8, temp=1.0, seed=4)
    greedy = _tokens(model, tok, PROMPT, max_tokens=8)
    assert _tokens(model, tok, PROMPT, max_tokens=8, temp=1.0, top_p=1e-6, seed=5) == greedy  # top token only


def _metaspace_tokenizer():
    """A sentencepiece-style tokenizer (Metaspace '▁' word starts, byte fallback) for the detokenizer test."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    def configure(t):
        t.normalizer = normalizers.Replace(" ", "▁")
        t.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        t.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                       decoders.Strip(" ", 1, 0)])
        return t

    t = configure(Tokenizer(models.BPE(unk_token="<unk>")))
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "</s>"], show_progress=False)
    t.train_from_iterator(["hello world the quick brown fox", "über naïve café the world"] * 20, trainer=trainer)
    model = json.loads(t.to_str())["model"]
    vocab = dict(model["vocab"])
    for i in range(256):  # byte-fallback pieces, as Llama/Gemma sentencepiece vocabularies have them
        vocab.setdefault(f"<0x{i:02X}>", len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    t = configure(Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True)))
    t.add_special_tokens(["<unk>", "</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=t, eos_token="</s>", unk_token="<unk>")


def test_stream_detokenizer_utf8_and_spaces(loaded):
    text = "héllo wörld, 日本語 🙂 the quick  brown\nfox ünïcödé"
    for tok in (loaded[1], _metaspace_tokenizer()):
        ids = tok.encode(text, add_special_tokens=False)
        assert len(ids) > len(text.split())  # multi-token characters and words are in play
        d = StreamDetokenizer(tok)
        pieces = [d.add(t) for t in ids] + [d.finalize()]
        assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True)
        assert not any("\ufffd" in p for p in pieces)
        assert "".join(pieces).count(" ") == tok.decode(ids).count(" ")  # word-start spaces kept
    d = StreamDetokenizer(loaded[1])
    partial = loaded[1].encode("🙂", add_special_tokens=False)
    assert len(partial) > 1 and d.add(partial[0]) == "" and d.finalize() != ""  # held back, then flushed


# --- backends -----------------------------------------------------------------------------------

def test_backend_choice(llama, monkeypatch):
    import platform

    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(platform, "machine", lambda: "arm64")
    assert pick_backend("auto") == "mlx"
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    assert pick_backend("auto") == "torch" and pick_backend("mlx") == "mlx"
    model, _ = load(llama)  # auto on Linux -> torch
    assert backend_of(model) == "torch" and isinstance(model, torch.nn.Module)
    with pytest.raises(MixqError):
        pick_backend("cuda")


def test_mlx_backend_runs_mlx_lm(mlx_folder, capsys):
    import mlx_lm

    model, tok = load(mlx_folder, backend="mlx")
    assert backend_of(model) == "mlx"
    ours = generate(model, tok, PROMPT, max_tokens=12)
    theirs = mlx_lm.generate(model, tok, prompt_ids(tok, PROMPT), max_tokens=12)
    assert ours == theirs and len(ours) > 0
    capsys.readouterr()
    assert main(["generate", str(mlx_folder), "-p", PROMPT, "-m", "12", "--backend", "mlx"]) == 0
    assert capsys.readouterr().out == ours + "\n"
    with pytest.raises(MixqError, match="mixq convert"):
        load(f"{mlx_folder}@q4", backend="mlx", recipe="q4")


def test_mlx_chat_reuses_prompt_cache(mlx_folder):
    model, tok = load(mlx_folder, backend="mlx")
    chat = Chat(model, tok)
    a = "".join(r.text for r in chat.reply("Hello", max_tokens=6))
    "".join(r.text for r in chat.reply("More", max_tokens=6))
    assert chat.session.reused > 0
    chat.reset()
    assert "".join(r.text for r in chat.reply("Hello", max_tokens=6)) == a


def test_torch_backend_dequantizes_mlx_folder(mlx_folder, capsys):
    model, tok = load(mlx_folder, backend="torch")
    assert backend_of(model) == "torch"
    assert "dequantized" in capsys.readouterr().err
    assert len(generate(model, tok, PROMPT, max_tokens=8)) > 0


def test_dequantized_note(loaded):
    from mixq.eval.engine import ModelInfo

    model = loaded[0]
    q = ModelInfo(ref="x", path=Path("x"), kind="mlx", recipe=None, dtype="float32", size_bytes=1000, n_params=2000,
                  bits_per_weight=4.0, bits_per_weight_quantized=4.5)
    note = dequantized_note(model, q)
    assert note and "dequantized to float32" in note and "GB quantized" in note and "\n" not in note
    plain = ModelInfo(ref="x", path=Path("x"), kind="hf", recipe=None, dtype="float32", size_bytes=1000,
                      n_params=500, bits_per_weight=16.0, bits_per_weight_quantized=None)
    assert dequantized_note(model, plain) is None


# --- errors -------------------------------------------------------------------------------------

@pytest.mark.parametrize("cmd", ["generate", "chat"])
def test_bad_model_path_one_line_error(cmd, tmp_path, capsys):
    args = [cmd, str(tmp_path / "no-such-model")] + (["-p", "hi"] if cmd == "generate" else [])
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and "no-such-model" in err
    assert main(["generate", str(tmp_path / "model.gguf"), "-p", "hi"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


# --- chat ---------------------------------------------------------------------------------------

def _run_chat(llama, monkeypatch, capsys, script: str, *extra) -> tuple[int, str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    capsys.readouterr()
    code = main(["chat", str(llama), "--max-tokens", "10", *extra])
    return code, capsys.readouterr().out


def test_chat_multiturn_scripted(llama, monkeypatch, capsys):
    code, out = _run_chat(llama, monkeypatch, capsys, "Hello\nHow are you?\n/reset\nHello\n/exit\nnever read\n")
    assert code == 0
    replies = [part for part in out.split(">> ") if part]  # stdout: ">> reply\n" per answered turn
    assert len(replies) == 3 and all(r.endswith("\n") for r in replies)
    assert replies[0] == replies[2]  # /reset: the same first turn gives the same reply
    code, out2 = _run_chat(llama, monkeypatch, capsys, "Hello\n")  # EOF ends the chat
    assert code == 0 and replies[0] in out2


def test_chat_keeps_conversation_and_cache(loaded):
    model, tok = loaded
    chat = Chat(model, tok, system="You are terse.")
    r1 = "".join(r.text for r in chat.reply("Hello", max_tokens=8))
    r2 = "".join(r.text for r in chat.reply("And then?", max_tokens=8))
    assert [m["role"] for m in chat.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert chat.messages[2]["content"] == r1
    assert chat.session.reused > len(prompt_ids(tok, "Hello"))  # turn 2 ran only its new tokens
    conv = chat.messages[:4]
    fresh = "".join(r.text for r in TorchSession(model, tok).stream(apply_chat_template(tok, conv), max_tokens=8))
    assert r2 == fresh


def test_chat_ctrl_c_stops_reply_not_chat(llama, loaded, monkeypatch, capsys):
    calls = {"n": 0}
    orig = TorchSession._forward

    def flaky(self, ids):
        calls["n"] += 1
        if calls["n"] == 4:  # in the first reply's token loop
            raise KeyboardInterrupt
        return orig(self, ids)

    monkeypatch.setattr(TorchSession, "_forward", flaky)
    code, out = _run_chat(llama, monkeypatch, capsys, "Hello\nHello again\n/exit\n")
    assert code == 0 and "[stopped]" in out
    assert out.count(">> ") == 3  # the chat went on to the next turn and the /exit
    # a stopped reply joins the conversation and the next turn still matches a fresh run
    model, tok = loaded
    chat = Chat(model, tok)
    stream = chat.reply("Hello", max_tokens=10)
    partial = "".join(next(stream).text for _ in range(3))
    stream.close()
    assert chat.messages[-1] == {"role": "assistant", "content": partial}
    r2 = "".join(r.text for r in chat.reply("Hello again", max_tokens=6))
    fresh = "".join(r.text for r in TorchSession(model, tok).stream(apply_chat_template(tok, chat.messages[:-1]),
                                                                   max_tokens=6))
    assert r2 == fresh


def test_chat_without_template_uses_plain_transcript(loaded):
    model, tok = loaded
    chat = Chat(model, tok, chat_template=False)
    "".join(r.text for r in chat.reply("Hello", max_tokens=5))
    assert tok.decode(chat.prompt_ids()).startswith("User: Hello\n\nAssistant:")
    "".join(r.text for r in chat.reply("Again", max_tokens=5))
    assert chat.session.reused > 0

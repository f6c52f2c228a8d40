"""Text generation: the Python API (`load`, `generate`, `stream_generate`, mlx-lm shaped) and `mixq generate`.

Two backends. "torch": the model from `mixq.engine.load_model` (any ref; MLX weights dequantized),
decoded token by token with transformers' KV cache. "mlx": `mlx_lm` on an MLX or HF folder.
"auto" is mlx on Apple silicon, torch elsewhere.

    from mixq import load, generate
    model, tokenizer = load("smollm2-135m@qx86-hi")
    print(generate(model, tokenizer, "Name three colours.", max_tokens=64))
"""

from __future__ import annotations

import inspect
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from mixq.errors import MixqError
from mixq.eval.engine import (
    add_device_arguments,
    default_dtype,
    device_options,
    load_model,
    peak_memory,
    peak_memory_line,
    resolve_device,
)
from mixq.eval.packed import packed_weights, path_lines, weight_bytes, weight_paths
from mixq.sources.resolve import resolve

BACKENDS = ("auto", "torch", "mlx")
DTYPES = ("float32", "bfloat16", "float16")
PREFILL_STEP = 512  # prompt tokens per forward pass (bounds the attention scores' memory)


@dataclass
class GenerationResponse:
    """One step of `stream_generate`: the new piece of text plus running statistics."""
    text: str
    token: int | None
    prompt_tokens: int        # prompt tokens run through the model (new ones only, when a cache is reused)
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float        # GB: peak resident set size of the process (and mlx's peak, if larger)
    finish_reason: str | None = None   # "stop" (EOS), "length" (max_tokens) or None while going
    weight_paths: dict | None = None   # the last response of the torch backend: spec -> {path: tensors}
                                       # (`mixq.eval.packed.weight_paths`; empty when nothing is packed)


# --- backends and loading ---------------------------------------------------------------------

def native_mlx() -> bool:
    """True on Apple silicon, where mlx runs natively (on Linux it is a slow reference build)."""
    return sys.platform == "darwin" and platform.machine() == "arm64"


def pick_backend(backend: str = "auto") -> str:
    if backend not in BACKENDS:
        raise MixqError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "mlx" if native_mlx() else "torch"
    return backend


def backend_of(model) -> str:
    """The backend a loaded model belongs to: "mlx" for mlx_lm models, else "torch"."""
    return "mlx" if type(model).__module__.split(".")[0] in ("mlx", "mlx_lm") else "torch"


def _check_ref(ref: str) -> None:
    """Fail early, in one line, on a ref that names a path that does not exist."""
    base = ref.rsplit("@", 1)[0] if "@" in ref and not Path(ref).exists() else ref
    p = Path(base).expanduser()
    looks_like_path = ("/" in base or "\\" in base or base.startswith((".", "~"))
                       or p.suffix.lower() in (".gguf", ".safetensors", ".json"))
    if looks_like_path and not p.exists():
        raise MixqError(f"{base}: no such file or folder; give a Hugging Face or MLX folder, a .gguf file, "
                        f"an embedded model name (see `mixq models`) or NAME@RECIPE")


def load(path_or_ref, backend: str = "auto", recipe: str | None = None, dtype: str | None = None,
         device: str = "auto", max_memory: int | None = None):
    """Load a model for generation: `model, tokenizer = load("folder" | "x.gguf" | "name" | "name@recipe")`.

    torch backend: on `device` (auto: cuda when torch sees one), in `dtype` (None: float32 on the CPU,
    bfloat16 on a GPU); quantized weights kept dense while they fit `max_memory` bytes (None: auto, see
    `mixq.eval.engine.load_model`), packed beyond."""
    ref = str(path_or_ref)
    _check_ref(ref)
    if dtype is not None and dtype not in DTYPES:
        raise MixqError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if pick_backend(backend) == "mlx":
        return _load_mlx(ref, recipe)
    device = resolve_device(device)
    return _load_torch(ref, recipe, dtype or default_dtype(device), device, max_memory)


def _load_torch(ref: str, recipe: str | None, dtype: str, device: str = "cpu", max_memory: int | None = None):

    try:
        loaded = load_model(ref, recipe=recipe, dtype=dtype, device=device, max_memory=max_memory, fused=True)
    except OSError as e:  # transformers' "can't load ..." for a folder that is not a model
        raise MixqError(f"{ref}: cannot load the model ({str(e).splitlines()[0]})") from None
    model, info = loaded.model, loaded.info
    model.mixq_info = info
    note = dequantized_note(model, info)
    for line in ([note] if note else []) + path_lines(weight_paths(model)):
        print(line, file=sys.stderr)
    return model, loaded.tokenizer


def param_bytes(model) -> int:
    """Bytes held by a torch model's weights: parameters and buffers (tied weights counted once), and packed
    weights as stored (`mixq.eval.packed`)."""
    return weight_bytes(model)


def dequantized_note(model, info) -> str | None:
    """One line saying quantized weights are held dequantized (dense copies for speed), if that costs memory."""
    bpw_q = getattr(info, "bits_per_weight_quantized", None) or 0
    recipe = getattr(info, "recipe", None)
    quantized = 0 < bpw_q < 16 and (getattr(info, "kind", None) == "mlx" or recipe not in (None, "bf16"))
    size = getattr(info, "size_bytes", None) or 0
    if not quantized or not size:
        return None
    state = packed_weights(model)
    mem = param_bytes(model) - (sum(f.nbytes for f in state.fused.values()) if state else 0)  # fused: ~packed size
    if mem <= 1.05 * size:  # packed (buffers and placeholders aside)
        return None
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    return (f"note: torch backend: quantized weights ({bpw_q:.2f} bits/weight) dequantized to {dtype} at load: "
            f"{mem / 1e9:.2f} GB in memory vs {size / 1e9:.2f} GB quantized ({mem / size:.1f}x), kept dense for "
            f"speed (--max-memory 0 keeps them packed: affine 4-bit layers then run a fused int4 matmul, other specs "
            f"are dequantized per forward, slower); the mlx backend runs them quantized")


def _mlx_folder(ref: str, recipe: str | None) -> Path:
    """The folder mlx_lm should open for a ref: a folder as given, or what mixq.sources resolves it to."""
    p = Path(ref).expanduser()
    if not p.is_dir():
        resolved = resolve(ref)
        p, recipe = Path(resolved.path), recipe or resolved.recipe
    if recipe:
        raise MixqError(f"{ref}: the mlx backend runs converted folders only; run `mixq convert {ref.split('@')[0]} "
                        f"OUT --recipe {recipe}` first, or use --backend torch to apply the recipe on the fly")
    if not (p / "config.json").is_file():
        raise MixqError(f"{p}: no config.json; the mlx backend needs an MLX or Hugging Face model folder")
    return p


def _load_mlx(ref: str, recipe: str | None):
    folder = _mlx_folder(ref, recipe)
    try:
        import mlx_lm
    except ImportError:
        raise MixqError("the mlx backend needs mlx-lm: pip install mlx-lm (or use --backend torch)") from None
    if not native_mlx():
        print("note: mlx on this platform is a slow reference build; --backend torch is much faster here",
              file=sys.stderr)
    return mlx_lm.load(str(folder))


# --- prompts ----------------------------------------------------------------------------------

def hf_tokenizer(tokenizer):
    """The transformers tokenizer inside mlx_lm's TokenizerWrapper (or the tokenizer itself)."""
    return tokenizer._tokenizer if type(tokenizer).__name__ == "TokenizerWrapper" else tokenizer


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(hf_tokenizer(tokenizer), "chat_template", None))


def apply_chat_template(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation rendered by the tokenizer's chat template, with the generation prompt."""
    from jinja2 import TemplateError

    tok = hf_tokenizer(tokenizer)
    try:
        out = tok.apply_chat_template(messages, add_generation_prompt=True)
    except TemplateError as e:  # a template with an error, or one the sandbox refuses to run
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise MixqError(f"{getattr(tok, 'name_or_path', '') or 'the tokenizer'}: its chat template fails "
                        f"({type(e).__name__}: {first}); fix chat_template in tokenizer_config.json or pass "
                        "--no-chat-template") from None
    if hasattr(out, "keys"):  # transformers 5 returns a BatchEncoding by default
        out = out["input_ids"]
    return [int(t) for t in out]


def prompt_ids(tokenizer, prompt, chat_template: bool = True) -> list[int]:
    """The token ids to run for a prompt: its chat-template rendering when there is one, else plain encoding."""
    if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
        return list(prompt)
    if chat_template and has_chat_template(tokenizer):
        return apply_chat_template(tokenizer, [{"role": "user", "content": prompt}])
    return [int(t) for t in hf_tokenizer(tokenizer).encode(prompt)]


def eos_ids(tokenizer, model=None) -> set[int]:
    """End-of-sequence ids: the tokenizer's eos plus the model's generation_config eos ids."""
    ids: set[int] = set()
    tok = hf_tokenizer(tokenizer)
    if getattr(tok, "eos_token_id", None) is not None:
        ids.add(int(tok.eos_token_id))
    for eos in (getattr(tokenizer, "eos_token_ids", None),  # mlx_lm's wrapper: a set
                getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if eos is not None:
            ids.update(int(t) for t in (eos if isinstance(eos, (list, tuple, set)) else [eos]))
    return ids


# --- detokenization ---------------------------------------------------------------------------

class StreamDetokenizer:
    """Turns tokens into text pieces as they come, holding back partial UTF-8 characters.

    Each new piece is decode(anchor + pending) minus decode(anchor), where the anchor is the last few
    tokens already shown: so sentencepiece word-start spaces and multi-token characters come out right,
    and the pieces concatenate to decode(all tokens).
    """
    ANCHOR = 4

    def __init__(self, tokenizer):
        self.tok = hf_tokenizer(tokenizer)
        self.tokens: list[int] = []
        self.anchor: list[int] = []
        self.pending: list[int] = []
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True) if ids else ""

    def add(self, token: int) -> str:
        self.tokens.append(int(token))
        self.pending.append(int(token))
        prefix, full = self._decode(self.anchor), self._decode(self.anchor + self.pending)
        if full.endswith("\ufffd"):
            return ""
        if full.startswith(prefix) and (prefix or not self.text):
            piece = full[len(prefix):]
        else:  # an anchor with no text (e.g. only special tokens: a decoder may strip the space after it)
            # or a decoder that rewrites earlier text: take the difference on the whole reply
            whole = self._decode(self.tokens)
            piece = whole[len(self.text):] if whole.startswith(self.text) else ""
        self.anchor = self._clean_anchor(self.anchor + self.pending)
        self.pending = []
        self.text += piece
        return piece

    def _clean_anchor(self, ids: list[int]) -> list[int]:
        """The longest suffix (at most ANCHOR tokens) that decodes without a broken character at its start.

        (Byte-fallback decoders turn a whole run of byte tokens into replacement characters when the run
        starts mid-character, so an anchor must not.)"""
        for k in range(min(self.ANCHOR, len(ids)), 0, -1):
            if "\ufffd" not in self._decode(ids[-k:]):
                return ids[-k:]
        return []

    def finalize(self) -> str:
        """The held-back rest (e.g. an incomplete character at the end)."""
        if not self.pending:
            return ""
        whole = self._decode(self.tokens)
        piece = whole[len(self.text):] if whole.startswith(self.text) else self._decode(self.pending)
        self.pending = []
        self.text += piece
        return piece


# --- sampling and memory ----------------------------------------------------------------------

def check_generation(max_tokens=256, temp=0.0, top_p=1.0, seed=None) -> None:
    """Refuse sampling settings that would fail mid-generation or sample garbage (NaN temperature, empty
    nucleus), naming the option."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise MixqError(f"--max-tokens {max_tokens!r}: must be a positive number of tokens")
    if not (isinstance(temp, (int, float)) and math.isfinite(temp) and temp >= 0):
        raise MixqError(f"--temp {temp!r}: must be a finite number >= 0 (0: greedy)")
    if not (isinstance(top_p, (int, float)) and math.isfinite(top_p) and 0 < top_p <= 1):
        raise MixqError(f"--top-p {top_p!r}: must be in (0, 1] (1: off)")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise MixqError(f"--seed {seed!r}: must be a whole number >= 0")


def context_length(model) -> int | None:
    """The longest sequence the model was built for (config max_position_embeddings), if it says."""
    cfg = getattr(model, "config", None)
    n = getattr(cfg, "max_position_embeddings", None) or getattr(getattr(cfg, "text_config", None),
                                                                 "max_position_embeddings", None)
    return n if isinstance(n, int) and n > 0 else None


def make_generator(seed: int | None):
    import torch

    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(int(seed))
    return g


def sample(logits, temp: float = 0.0, top_p: float = 1.0, generator=None) -> int:
    """Next token from 1-D logits: greedy at temp 0, else temperature + nucleus (top-p) sampling (on the CPU:
    the same draws for a seed whatever the device)."""
    import torch

    logits = logits.cpu()
    if temp <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temp, dim=-1)
    if top_p < 1.0:
        p_sorted, idx = torch.sort(probs, descending=True)
        keep = (torch.cumsum(p_sorted, 0) - p_sorted) < top_p  # smallest set reaching top_p (at least one)
        p_sorted = p_sorted * keep
        return int(idx[torch.multinomial(p_sorted, 1, generator=generator)])
    return int(torch.multinomial(probs, 1, generator=generator))


def peak_rss_gb() -> float:
    """Peak resident set size of this process, in GB."""
    return peak_memory()["rss"] / 1e9


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# --- sessions: a model plus the KV cache and the tokens it holds -------------------------------

class TorchSession:
    """A transformers model with a KV cache kept between calls; each call runs only the new tokens."""

    def __init__(self, model, tokenizer, prefill_step: int = PREFILL_STEP):
        self.model, self.tokenizer, self.prefill_step = model, tokenizer, prefill_step
        self.eos = eos_ids(tokenizer, model)
        # transformers >= 5.2x names the KV cache argument `cache` (`past_key_values` before)
        self._cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.cache = None
        self.tokens: list[int] = []   # exactly the tokens whose keys/values the cache holds
        self.reused = 0               # prompt tokens taken from the cache in the last call

    def reset(self) -> None:
        self.cache, self.tokens = None, []

    def _forward(self, ids: list[int]):
        """Run new tokens through the model on top of the cache; logits of the last one."""
        import torch

        try:
            out = self.model(input_ids=torch.tensor([ids], dtype=torch.long, device=self.model.device), use_cache=True,
                             logits_to_keep=1,
                             **{self._cache_arg: self.cache})
        except BaseException:  # e.g. Ctrl-C mid-forward: the cache may be half-updated
            self.reset()
            raise
        self.cache = out["cache"] if "cache" in out else out["past_key_values"]
        self.tokens.extend(ids)
        return out.logits[0, -1]

    def _reuse(self, ids: list[int]) -> int:
        """Keep the cached prefix shared with `ids` (at most len(ids)-1 tokens); return its length."""
        n = min(common_prefix(self.tokens, ids), len(ids) - 1)
        if n < len(self.tokens):
            try:
                if n <= 0:
                    raise ValueError("nothing to keep")
                self.cache.crop(n - len(self.tokens))  # a negative count: remove that many tokens
                self.tokens = self.tokens[:n]
            except Exception:  # a cache that cannot be cropped (or nothing shared): start over
                self.reset()
                n = 0
        return n

    def prefill(self, ids: list[int]):
        """Bring the cache to `ids` (re-using the shared prefix); logits after the last token."""
        if not ids:
            raise MixqError("empty prompt: nothing to generate from")
        self.reused = n = self._reuse(ids)
        logits = None
        for i in range(n, len(ids), self.prefill_step):
            logits = self._forward(ids[i:i + self.prefill_step])
        return logits

    def stream(self, ids: list[int], max_tokens: int = 256, temp: float = 0.0, top_p: float = 1.0,
               seed: int | None = None) -> Iterator[GenerationResponse]:
        import torch

        check_generation(max_tokens, temp, top_p, seed)
        ctx = context_length(self.model)
        if ctx is not None and len(ids) >= ctx:
            raise MixqError(f"the prompt is {len(ids)} tokens, the model's context is {ctx} (config.json "
                            "max_position_embeddings): shorten the prompt (in chat: /reset)")
        if ctx is not None:
            max_tokens = min(max_tokens, ctx - len(ids))  # stops with finish_reason "length" at the context
        gen = make_generator(seed) if temp > 0 else None
        detok = StreamDetokenizer(self.tokenizer)
        with torch.inference_mode():
            tic = time.perf_counter()
            logits = self.prefill(ids)
            n_prompt = len(ids) - self.reused
            prompt_tps = n_prompt / max(time.perf_counter() - tic, 1e-9)
            tic = time.perf_counter()
            n, token, text, finish = 0, None, "", "length"

            def response(text, reason=None):
                tps = n / max(time.perf_counter() - tic, 1e-9)
                return GenerationResponse(text, token, n_prompt, prompt_tps, n, tps, peak_rss_gb(), reason)

            while n < max_tokens:
                token = sample(logits, temp, top_p, gen)
                if token in self.eos:
                    finish, text = "stop", ""
                    break
                n += 1
                text = detok.add(token)
                if n == max_tokens:
                    break
                yield response(text)
                logits = self._forward([token])
        last = response(text + detok.finalize(), finish)
        last.weight_paths = weight_paths(self.model)
        yield last


class MlxSession:
    """An mlx_lm model with its prompt cache kept between calls (trimmed to the shared prefix)."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.eos = eos_ids(tokenizer, model)
        self.cache = None
        self.tokens: list[int] = []
        self.reused = 0

    def reset(self) -> None:
        self.cache, self.tokens = None, []

    def _reuse(self, ids: list[int]) -> int:
        from mlx_lm.models import cache as mlx_cache

        if self.cache is None:
            self.cache, self.tokens = mlx_cache.make_prompt_cache(self.model), []
            return 0
        n = min(common_prefix(self.tokens, ids), len(ids) - 1)
        if n < len(self.tokens):
            if n > 0 and mlx_cache.can_trim_prompt_cache(self.cache):
                mlx_cache.trim_prompt_cache(self.cache, len(self.tokens) - n)
                self.tokens = self.tokens[:n]
            else:
                self.cache, self.tokens, n = mlx_cache.make_prompt_cache(self.model), [], 0
        return n

    def _cached_count(self) -> int | None:
        offsets = [getattr(c, "offset", None) for c in self.cache]
        return offsets[0] if offsets and all(o == offsets[0] for o in offsets) and offsets[0] is not None else None

    def stream(self, ids: list[int], max_tokens: int = 256, temp: float = 0.0, top_p: float = 1.0,
               seed: int | None = None) -> Iterator[GenerationResponse]:
        import mlx.core as mx
        from mlx_lm import stream_generate as mlx_stream
        from mlx_lm.sample_utils import make_sampler

        if not ids:
            raise MixqError("empty prompt: nothing to generate from")
        check_generation(max_tokens, temp, top_p, seed)
        if seed is not None:
            mx.random.seed(int(seed))
        self.reused = n = self._reuse(ids)
        generated: list[int] = []
        ok = False
        try:
            for r in mlx_stream(self.model, self.tokenizer, mx.array(ids[n:]), max_tokens=max_tokens,
                                sampler=make_sampler(temp, top_p), prompt_cache=self.cache):
                if r.finish_reason != "stop":
                    generated.append(int(r.token))
                yield GenerationResponse(r.text, int(r.token), len(ids) - n, r.prompt_tps, r.generation_tokens,
                                         r.generation_tps, max(r.peak_memory, peak_rss_gb()), r.finish_reason)
            ok = True
        finally:
            held = self._cached_count() if ok else None
            all_tokens = list(ids) + generated
            if held is None or held > len(all_tokens):
                self.reset()  # interrupted or unknown cache state: start over next time
            else:
                self.tokens = all_tokens[:held]


def make_session(model, tokenizer):
    """A TorchSession or MlxSession for a loaded model."""
    return (MlxSession if backend_of(model) == "mlx" else TorchSession)(model, tokenizer)


# --- the API ----------------------------------------------------------------------------------

def stream_generate(model, tokenizer, prompt, max_tokens: int = 256, temp: float = 0.0, top_p: float = 1.0,
                    seed: int | None = None, chat_template: bool = True) -> Iterator[GenerationResponse]:
    """Yield a GenerationResponse per generated token (`.text` is the new piece); the last has finish_reason."""
    ids = prompt_ids(tokenizer, prompt, chat_template)
    yield from make_session(model, tokenizer).stream(ids, max_tokens=max_tokens, temp=temp, top_p=top_p, seed=seed)


def generate(model, tokenizer, prompt, max_tokens: int = 256, temp: float = 0.0, top_p: float = 1.0,
             seed: int | None = None, verbose: bool = False, chat_template: bool = True) -> str:
    """Generate a reply to `prompt` (a string, or token ids) and return its text."""
    text, last = "", None
    for r in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, temp=temp, top_p=top_p, seed=seed,
                             chat_template=chat_template):
        if verbose:
            print(r.text, end="", flush=True)
        text += r.text
        last = r
    if verbose:
        print()
        print_stats(last, sys.stderr)
    return text


def print_stats(r: GenerationResponse | None, file=sys.stderr) -> None:
    if r is None:
        return
    print(f"Prompt: {r.prompt_tokens} tokens, {r.prompt_tps:.1f} tokens-per-sec", file=file)
    print(f"Generation: {r.generation_tokens} tokens, {r.generation_tps:.1f} tokens-per-sec", file=file)
    gpu = peak_memory().get("gpu")
    print(f"Peak memory: {r.peak_memory:.3f} GB" + (f" (GPU: {gpu / 1e9:.3f} GB)" if gpu else ""), file=file)


# --- CLI --------------------------------------------------------------------------------------

def add_model_arguments(p) -> None:
    """Arguments shared by `mixq generate` and `mixq chat`."""
    p.add_argument("model", help="HF or MLX folder, .gguf file, embedded name (mixq models) or NAME@RECIPE")
    p.add_argument("--max-tokens", "-m", type=int, default=256, help="most tokens to generate (default 256)")
    p.add_argument("--temp", type=float, default=0.0, help="sampling temperature; 0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default 1.0: off)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--no-chat-template", action="store_true", help="use the prompt as is, without the chat template")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="auto (default): mlx on Apple silicon, torch elsewhere")
    p.add_argument("--recipe", default=None, help="apply a recipe on the fly (torch backend)")
    add_device_arguments(p)


def add_arguments(p) -> None:
    add_model_arguments(p)
    p.add_argument("--prompt", "-p", required=True, help="the prompt ('-' reads it from stdin)")


def cli(args) -> int:
    check_generation(args.max_tokens, args.temp, args.top_p, args.seed)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt.strip():
        raise MixqError("--prompt is empty: give the text to continue (or '-' to read it from stdin)")
    opts = device_options(args)
    model, tokenizer = load(args.model, backend=args.backend, recipe=args.recipe, dtype=opts.dtype,
                            device=opts.device, max_memory=opts.max_memory)
    last, code = None, 0
    try:
        for r in stream_generate(model, tokenizer, prompt, max_tokens=args.max_tokens, temp=args.temp,
                                 top_p=args.top_p, seed=args.seed, chat_template=not args.no_chat_template):
            sys.stdout.write(r.text)
            sys.stdout.flush()
            last = r
    except KeyboardInterrupt:
        code = 130
    sys.stdout.write("\n")
    sys.stdout.flush()
    print_stats(last, sys.stderr)
    print(peak_memory_line(), file=sys.stderr)
    return code

"""`mixq chat`: a multi-turn terminal chat that keeps the conversation and the KV cache between turns.

Each turn renders the whole conversation with the chat template; the cache keeps the longest prefix
it shares with what it already ran, so only the new turn's tokens go through the model (when the
template renders the previous conversation as a prefix; otherwise the cache is cut back or rebuilt).
"""

from __future__ import annotations

import sys
from typing import Iterator

from mixq.errors import MixqError
from mixq.eval.engine import device_options, peak_memory_line
from mixq.infer.generate import (
    GenerationResponse,
    add_model_arguments,
    apply_chat_template,
    check_generation,
    has_chat_template,
    hf_tokenizer,
    load,
    make_session,
    print_stats,
)

HELP = "/reset clears the conversation, /exit (or Ctrl-D) leaves; Ctrl-C stops a reply"


class Chat:
    """A conversation with a model: `for r in chat.reply("hi"): print(r.text, end="")`."""

    def __init__(self, model, tokenizer, system: str | None = None, chat_template: bool = True):
        self.tokenizer = tokenizer
        self.session = make_session(model, tokenizer)
        self.system = system
        self.use_template = chat_template and has_chat_template(tokenizer)
        self.messages: list[dict] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.session.reset()

    def prompt_ids(self) -> list[int]:
        """The conversation so far, rendered and tokenized, ending with the assistant's turn to speak."""
        if self.use_template:
            return apply_chat_template(self.tokenizer, self.messages)
        text = "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in self.messages) + "Assistant:"
        return [int(t) for t in hf_tokenizer(self.tokenizer).encode(text)]

    def reply(self, text: str, **gen) -> Iterator[GenerationResponse]:
        """Add a user turn and stream the reply; the reply (even a stopped one) joins the conversation."""
        self.messages.append({"role": "user", "content": text})
        answer = ""
        try:
            for r in self.session.stream(self.prompt_ids(), **gen):
                answer += r.text
                yield r
        finally:
            self.messages.append({"role": "assistant", "content": answer})


def add_arguments(p) -> None:
    add_model_arguments(p)
    p.set_defaults(max_tokens=512)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--verbose", "-v", action="store_true", help="print tokens/s and memory after each reply")


def _read(prompt: str) -> str | None:
    """One line from the user; None at end of input or Ctrl-C."""
    try:
        return input(prompt)
    except (EOFError, KeyboardInterrupt):
        print(file=sys.stderr)
        return None


def cli(args) -> int:
    check_generation(args.max_tokens, args.temp, args.top_p, args.seed)
    opts = device_options(args)
    model, tokenizer = load(args.model, backend=args.backend, recipe=args.recipe, dtype=opts.dtype,
                            device=opts.device, max_memory=opts.max_memory)
    chat = Chat(model, tokenizer, system=args.system, chat_template=not args.no_chat_template)
    gen = dict(max_tokens=args.max_tokens, temp=args.temp, top_p=args.top_p, seed=args.seed)
    print(f"[chat with {args.model}: {HELP}]", file=sys.stderr)
    while True:
        line = _read(">> ")
        if line is None or line.strip() == "/exit":
            print(peak_memory_line(), file=sys.stderr)
            return 0
        if line.strip() == "/reset":
            chat.reset()
            print("[conversation cleared]", file=sys.stderr)
            continue
        if not line.strip():
            continue
        stream, last = chat.reply(line, **gen), None
        try:
            for r in stream:
                sys.stdout.write(r.text)
                sys.stdout.flush()
                last = r
        except KeyboardInterrupt:
            stream.close()
            sys.stdout.write("\n[stopped]")
        except MixqError as e:  # e.g. the conversation outgrew the context: say so, forget the turn, go on
            del chat.messages[-2:]
            print(f"[error: {e}]", file=sys.stderr)
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        if last is not None and args.verbose:
            print_stats(last, sys.stderr)

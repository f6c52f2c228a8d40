"""The `mixq` command line: one subcommand per pipeline step.

Each subcommand lives in its own module, which defines `add_arguments(parser)` and
`cli(args) -> int | None`. Heavy imports (torch, transformers, mlx) happen inside those modules.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from mixq.errors import MixqError
from mixq.io.files import os_error

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "models": ("mixq.sources.embedded", "list the embedded default models (size, source, licence, cached?)"),
    "import": ("mixq.quant.importer", "import a GGUF file or embedded model into a Hugging Face folder"),
    "recipes": ("mixq.quant.recipe", "list the built-in recipes"),
    "plan-show": ("mixq.quant.plan_show", "print the per-tensor table a recipe gives for a source"),
    "convert": ("mixq.tune.methods", "convert a checkpoint to an MLX model folder under a recipe"),
    "eval": ("mixq.eval.evaluate", "evaluate a model: the seven tasks, perplexity, KL divergence"),
    "measure": ("mixq.tune.measure", "measure each tensor's quantization sensitivity"),
    "plan": ("mixq.tune.allocate", "allocate bits per tensor to hit a target size"),
    "compare": ("mixq.report.compare", "compare eval runs with paired significance tests"),
    "card": ("mixq.report.card", "write the model card README.md of a converted folder"),
    "generate": ("mixq.infer.generate", "generate text from a model"),
    "chat": ("mixq.infer.chat", "chat with a model in the terminal"),
    "sweep": ("mixq.sweep.command", "many models x variants: convert, evaluate, compare, report (locally or on Ray)"),
    "demo": ("mixq.demo", "convert, evaluate and compare the standard variants of a model"),
}


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the option, what is wrong, where to look (no usage block)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="mixq", description="Mixed-precision MLX quantization toolkit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_run=module.cli)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except MixqError as e:
        print(f"mixq {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a disk or permission problem no module turned into a MixqError: still one line
        print(f"mixq {args.command}: error: {os_error(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mixq {args.command}: interrupted (partial output removed; re-run to resume where supported)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

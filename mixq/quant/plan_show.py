"""`mixq plan-show SOURCE --recipe R`: the per-tensor table a recipe gives, and its totals."""

from __future__ import annotations

from mixq.quant.prepare import prepare

_SHORT = {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}


def _fmt_shape(shape) -> str:
    return "×".join(str(d) for d in shape)


def print_plan(plan, source: str = "", console=None) -> None:
    """Print the plan as a table (path, shape, dtype, bits, group, mode, [method,] MB, reason), then the totals."""
    from rich.console import Console
    from rich.table import Table

    if console is None:
        console = Console()
        if not console.is_terminal:  # piped: wide enough for the table, not the 80 columns default
            path_w = max((len(tp.name) for tp in plan.tensors), default=10)
            reason_w = max((len(tp.reason) for tp in plan.tensors), default=10)
            console = Console(width=min(path_w + reason_w + 68, 400))
    table = Table(title=f"{source}  recipe {plan.recipe.name}" if source else f"recipe {plan.recipe.name}",
                  show_lines=False, header_style="bold")
    calibrated = any(tp.method != "rtn" for tp in plan.tensors)   # a method column only when it says something
    cols = [("path", "left"), ("shape", "right"), ("dtype", "left"), ("bits", "right"), ("group", "right"),
            ("mode", "left")] + ([("method", "left")] if calibrated else []) + [("MB", "right"), ("reason", "left")]
    for col, just in cols:
        table.add_column(col, justify=just, no_wrap=col != "reason")
    for tp in plan.tensors:
        path = tp.name.removesuffix(".weight") if tp.spec else tp.name
        bits = str(tp.spec.bits) if tp.spec else "-"
        group = str(tp.spec.group_size) if tp.spec else "-"
        mode = tp.spec.mode if tp.spec else "-"
        method = [tp.method if tp.spec else "-"] if calibrated else []
        style = None if tp.spec else "dim"
        table.add_row(path, _fmt_shape(tp.shape), _SHORT.get(tp.dtype, tp.dtype), bits, group, mode, *method,
                      f"{tp.nbytes / 1e6:.3f}", tp.reason, style=style)
    console.print(table)
    for line in summary_lines(plan):
        console.print(line)


def summary_lines(plan) -> list[str]:
    """The totals (all from the Plan: the sizes convert writes and MODEL@RECIPE applies): size, parameters,
    bits per weight (quantized tensors, whole model), spec histogram."""
    n_q = len(plan.quantized)
    lines = [
        f"tensors: {len(plan.tensors)} ({n_q} quantized, {len(plan.tensors) - n_q} kept)",
        f"size: {plan.total_bytes:,} bytes ({plan.total_bytes / 1e6:,.2f} MB) for {plan.total_params / 1e6:,.2f} M "
        f"parameters, stored as {', '.join(sorted({tp.dtype for tp in plan.tensors}))}",
    ]
    if plan.quantized_params:
        lines.append(f"bits per weight: {plan.bits_per_weight_quantized:.3f} over the quantized tensors "
                     f"({plan.quantized_params / plan.total_params:.1%} of the parameters), "
                     f"{plan.bits_per_weight:.3f} over the whole model")
    else:
        lines.append(f"bits per weight: {plan.bits_per_weight:.3f} (nothing quantized)")
    hist: dict = {}
    for tp in plan.tensors:
        key = str(tp.spec) if tp.spec else "kept"
        hist[key] = hist.get(key, 0) + tp.params
    total = max(plan.total_params, 1)
    lines.append("share of parameters: " + ", ".join(f"{k} {v / total:.1%}" for k, v in sorted(hist.items())))
    methods: dict = {}
    for tp in plan.quantized:
        methods[tp.method] = methods.get(tp.method, 0) + tp.params
    if set(methods) - {"rtn"}:
        lines.append("methods: " + ", ".join(f"{m} {v / total:.1%}" for m, v in sorted(methods.items())))
    return lines


def add_arguments(p):
    p.add_argument("source", help="Hugging Face folder, .gguf file or embedded model name")
    p.add_argument("--recipe", "-r", default=None, help="built-in recipe name or TOML file (default: q6-hi)")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                   help="dtype of unquantized tensors, scales and biases (default: config.json's)")


def cli(args):
    prep = prepare(args.source, args.recipe, args.dtype)
    print_plan(prep.plan, source=args.source)
    return 0

"""`mixq demo`: the built-in `demo` sweep (mixq/sweep/builtin/demo.toml) with the demo's options on top.

The README's main command. On the embedded default (smollm2-135m) it builds bf16 (the base), q8-hi, q6-hi,
qx86-hi and qx64-hi, evaluates each on the seven tasks (first 100 documents), perplexity and KL divergence
against the unquantized source, compares them against q8-hi, and writes the sweep's report and a card in
every converted folder. The work is the sweep's jobs (`mixq sweep demo` is the same sweep, in the same
folder), so a re-run, or an interrupted demo, does only what is missing.
"""

from __future__ import annotations

from mixq.report.compare import compare
from mixq.report.render import print_rich
from mixq.sweep.command import MODELS_DIR, add_executor_arguments, executor_of, run_from_args
from mixq.sweep.graph import build_graph, dry_run_text
from mixq.sweep.spec import Sweep, load_sweep, slug

DEMO = "demo"                  # the built-in sweep's name
TEXT_TASKS = ("ppl", "kld")    # always evaluated by the demo (the report's KLD and frontier need them)
DEFAULT_OUT = "mixq-demo"


def demo_sweep(out=DEFAULT_OUT, **settings) -> Sweep:
    """The demo's sweep; `settings` replace the built-in file's (sweep-file keys; `eval` key by key)."""
    return load_sweep(DEMO, out=out, settings=settings)


def settings_from_args(args) -> dict:
    """The demo's options as sweep-file settings (None: the built-in file's)."""
    s: dict = {"eval": {}}
    if args.model:
        s["models"] = [args.model]
    if args.variants:
        s["variants"] = [v for v in args.variants.split(",") if v]
        if not args.ref and load_sweep(DEMO).ref not in s["variants"]:
            s["ref"] = s["variants"][0]   # the default reference is not among them: the first is
    if args.ref:
        s["ref"] = args.ref
    if args.tasks:
        s["eval"]["tasks"] = [t for t in args.tasks.split(",") if t and t not in TEXT_TASKS] + list(TEXT_TASKS)
    if args.full:
        s["eval"]["limit"] = None   # every document
    elif args.limit is not None:
        s["eval"]["limit"] = args.limit
    if args.windows is not None:
        s["eval"]["windows"] = args.windows
    if args.dtype:
        s["eval"]["dtype"] = args.dtype
    return s


def show(sweep: Sweep) -> None:
    """Print each model's comparison and where the report, the comparison files and the models are."""
    ref = sweep.ref_variant.slug
    for model in sweep.models:
        folder = sweep.out / "report" / slug(model)
        print_rich(compare(sorted((folder / "runs").iterdir()), ref=str(folder / "runs" / ref)))
        print(f"[demo] comparison: {folder}/comparison.md (.json, accuracy_vs_bpw.png, kld_vs_bpw.png)")
    print(f"[demo] report: {sweep.out / 'report' / 'report.md'}; models, each with its card README.md: "
          f"{sweep.out / MODELS_DIR}/")


def add_arguments(p) -> None:
    demo = load_sweep(DEMO)
    p.add_argument("--model", help=f"any model ref (default: {demo.models[0]})")
    p.add_argument("--variants", help=f"comma-separated recipes (default: {','.join(v.label for v in demo.variants)})")
    p.add_argument("--tasks", help="comma-separated tasks (default: the seven); ppl and kld are always evaluated")
    p.add_argument("--limit", type=int, help=f"documents per task, the first N (default: {demo.eval['limit']})")
    p.add_argument("--full", action="store_true", help="evaluate every document of each split")
    p.add_argument("--windows", type=int, help=f"512-token windows for ppl/KLD (default: {demo.eval['windows']})")
    p.add_argument("--ref", help=f"variant the differences are taken against (default: {demo.ref})")
    p.add_argument("--dtype", choices=["float32", "bfloat16"],
                   help=f"compute dtype of the evaluation (default: {demo.eval['dtype']})")
    p.add_argument("-o", "--out", default=DEFAULT_OUT, help="output folder (the sweep's; default: %(default)s)")
    p.add_argument("--dry-run", action="store_true", help="print the sweep's jobs, what is done and the work")
    add_executor_arguments(p)


def cli(args) -> int:
    executor_of(args)   # options checked before the sweep is read
    sweep = demo_sweep(args.out, **settings_from_args(args))
    if args.dry_run:
        print(dry_run_text(build_graph(sweep)))
        return 0
    run_from_args(sweep, args)
    show(sweep)
    return 0

"""`mixq convert` with calibrated methods: `--method gptq|awq|awq+gptq|dwq|gptq+dwq|awq+dwq|awq+gptq+dwq` (or a
recipe rule's `method`), `--calib FILE`, `--dwq-steps/--dwq-lr/--dwq-batch`.

The plan (quant.prepare) says each tensor's method; tensors with a calibrated method are quantized here
(tune/gptq.py; tune/awq.py when any tensor asks for awq or awq+gptq: it runs the gptq ones too, in the same pass;
tune/dwq.py when any asks for a dwq method: the start pass above on the plan with each dwq method replaced by its
start, then the scales and biases tuned) on calibration windows (tune/calib.py) and handed to convert's one writer
(`quant.convert.write_mlx_folder(..., precomputed=)`), which rounds every other tensor to nearest. The
folder is plain MLX (affine, or the float modes mxfp4 / nvfp4 / mxfp8 where the plan says so: gptq and awq work on
both); its provenance records the calibration and each tensor's method.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mixq.errors import MixqError
from mixq.quant import convert as quant_convert
from mixq.quant.convert import SHARD_BYTES, Precomputed
from mixq.quant.prepare import Prepared, prepare
from mixq.quant.recipe import METHODS
from mixq.tune.calib import CalibConfig, add_calib_arguments, calib_config, calibration
from mixq.tune.dwq import DEFAULT_BATCH, DEFAULT_LR, DEFAULT_STEPS, DWQ_METHODS, DwqConfig


def precompute(prep: Prepared, calib: CalibConfig | None = None, *, progress: bool = True,
               clip: bool | None = None, head: bool = True, act_order: bool = False,
               dwq: DwqConfig | None = None) -> Precomputed:
    """Run the calibrated methods the plan of `prep` asks for on the calibration text (`clip`: gptq's range
    search per group, tune/gptq.py CLIP_GRID; None: its default, tune/gptq.py CLIP; `head`: gptq for the output
    head too; `act_order`: gptq's columns in act order with static groups; `dwq`: the dwq methods' steps, learning
    rate and batch)."""
    from transformers import AutoTokenizer

    from mixq.tune.awq import CALIBRATED

    methods = {tp.method for tp in prep.plan.calibrated()}
    unknown = methods - set(CALIBRATED) - set(DWQ_METHODS)
    if unknown:
        raise MixqError(f"method {sorted(unknown)[0]!r} is not implemented yet; use one of {', '.join(METHODS)}")
    (dwq or DwqConfig()).check()
    tok = AutoTokenizer.from_pretrained(str(prep.path))
    cal = calibration(tok, calib)

    def start(p: Prepared) -> Precomputed:
        return _calibrated(p, cal, progress=progress, clip=clip, head=head, act_order=act_order)

    if methods & set(DWQ_METHODS):
        from mixq.tune.dwq import dwq_tensors

        return dwq_tensors(prep, cal, dwq or DwqConfig(), start, progress=progress)
    return start(prep)


def _calibrated(prep: Prepared, cal, *, progress: bool, clip: bool | None, head: bool,
                act_order: bool) -> Precomputed:
    """gptq, awq and awq+gptq on the calibration windows `cal` (awq's pass when any tensor asks for awq)."""
    from mixq.tune.awq import AWQ_METHODS, awq_tensors
    from mixq.tune.gptq import CLIP, gptq_tensors

    clip = CLIP if clip is None else clip

    if {tp.method for tp in prep.plan.calibrated()} & set(AWQ_METHODS):
        if act_order:
            raise MixqError("--gptq-act-order applies to --method gptq only (awq and awq+gptq run their own pass); "
                            "drop it or use --method gptq")
        return awq_tensors(prep, cal, progress=progress, clip=clip, head=head)
    return gptq_tensors(prep, cal, progress=progress, clip=clip, head=head, act_order=act_order)


def convert(source, out, recipe=None, *, method: str | None = None, calib: CalibConfig | None = None,
            dtype=None, force: bool = False, shard_bytes: int = SHARD_BYTES, progress: bool = True,
            clip: bool | None = None, head: bool = True, act_order: bool = False, dwq: DwqConfig | None = None) -> Path:
    """`quant.convert.convert` with the calibrated methods: the recipe's (or `method` for every tensor whose
    rule names none)."""
    (calib or CalibConfig()).check()
    (dwq or DwqConfig()).check()
    prep = prepare(source, recipe, dtype, method=method)
    pre = (precompute(prep, calib, progress=progress, clip=clip, head=head, act_order=act_order, dwq=dwq)
           if prep.plan.calibrated() else None)
    return quant_convert.write_mlx_folder(prep, out, force=force, shard_bytes=shard_bytes, progress=progress,
                                          precomputed=pre)


def add_arguments(p):
    quant_convert.add_arguments(p)
    p.add_argument("--method", choices=METHODS, default=None,
                   help="quantization method of tensors whose recipe rule names none (default: the recipe's, rtn); "
                        "gptq, awq and awq+gptq (AWQ's scales, then GPTQ) run the model on calibration text; "
                        "dwq (round to nearest), gptq+dwq, awq+dwq, awq+gptq+dwq: that start, then each group's "
                        "scale and bias tuned to the unquantized model's next-token distributions (KL)")
    add_calib_arguments(p)
    p.add_argument("--gptq-clip", action=argparse.BooleanOptionalAction, default=None,
                   help="gptq, awq+gptq: search each group's range (max/min shrunk by up to 30%%) for the least "
                        "Hessian-weighted rounding error (affine tensors only; float-mode tensors take each group's "
                        "max |w|); default on (its measured gain: README, Calibrated methods)")
    p.add_argument("--gptq-head", action=argparse.BooleanOptionalAction, default=True,
                   help="gptq, awq: the output head too, when the recipe gives it a calibrated method (awq: its "
                        "clipping search only; with tied embeddings: the embedding tensor, which is the head); "
                        "default on")
    p.add_argument("--gptq-act-order", action="store_true",
                   help="gptq: columns in order of decreasing input activity, with static groups (each group's scale "
                        "and bias fixed before, codes stored in MLX's order; affine tensors only, float-mode tensors "
                        "keep the natural order)")
    p.add_argument("--dwq-steps", type=int, default=DEFAULT_STEPS,
                   help=f"dwq methods: Adam steps (default {DEFAULT_STEPS}); the parameters with the least KL on the "
                        "held-out eighth of the calibration windows are kept")
    p.add_argument("--dwq-lr", type=float, default=DEFAULT_LR,
                   help=f"dwq methods: Adam's learning rate (default {DEFAULT_LR})")
    p.add_argument("--dwq-batch", type=int, default=DEFAULT_BATCH,
                   help=f"dwq methods: calibration windows per step (default {DEFAULT_BATCH})")


def cli(args):
    cfg = calib_config(args)
    dwq = DwqConfig(args.dwq_steps, args.dwq_lr, args.dwq_batch)
    dwq.check()
    return quant_convert.cli(args, precompute=lambda prep: precompute(prep, cfg, clip=args.gptq_clip,
                                                                             head=args.gptq_head,
                                                                             act_order=args.gptq_act_order, dwq=dwq))

"""Calibration text for the calibrated quantization methods (GPTQ...): `--calib FILE`, samples, length, seed.

The text file is tokenized whole (no special tokens, `perplexity.tokenize_file`, as eval does) and cut into
consecutive non-overlapping windows of `length` tokens; `samples` of them are drawn with `seed`. The default
file is the one eval's ppl/KLD windows read (WikiText-2 test, `perplexity.default_text_file`). Eval's default
windows are the first `DEFAULT_WINDOWS` windows of `DEFAULT_CTX` tokens counted from the start of that file
(`eval.evaluate`), so for that file calibration windows start after token `DEFAULT_WINDOWS * DEFAULT_CTX`:
calibration and the default evaluation never share a token (`info["disjoint_from_eval"]`).

`mixq measure` calibrates on `tail_windows`: the *last* windows of the file (the part furthest from eval's
windows, which are counted from the start); both read the text through `perplexity` (tokenize_file / make_windows).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from mixq.errors import MixqError
from mixq.eval.evaluate import DEFAULT_WINDOWS
from mixq.eval.perplexity import DEFAULT_CTX, default_text_file, make_windows, tokenize_file
from mixq.io.files import sha256_file

DEFAULT_SAMPLES = 128   # GPTQ/AWQ papers: 128 random segments ...
DEFAULT_LENGTH = 512    # ... of 512 (AWQ) to 2048 (GPTQ) tokens
DEFAULT_SEED = 0


@dataclass(frozen=True)
class CalibConfig:
    file: str | None = None       # None: the default ppl/KLD text, minus eval's default windows
    samples: int = DEFAULT_SAMPLES
    length: int = DEFAULT_LENGTH
    seed: int = DEFAULT_SEED

    def check(self, prefix: str = "") -> None:
        """Options checked before anything is loaded (`prefix`: of the option names, as add_calib_arguments')."""
        for opt, v, low in ((f"--{prefix}calib-samples", self.samples, 1), (f"--{prefix}calib-len", self.length, 2)):
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise MixqError(f"{opt} {v!r}: give an integer of {low} or more")
        if self.file is not None and not Path(self.file).expanduser().is_file():
            raise MixqError(f"--{prefix}calib {self.file}: no such text file; give a plain text file")


@dataclass
class Calibration:
    ids: object        # torch.int64 [samples, length]
    info: dict         # provenance: file, sha256, samples, length, seed, token ranges, disjoint_from_eval


def eval_tokens(path: Path) -> int:
    """Tokens of `path` that eval's default ppl/KLD windows cover from its start (0 for another file)."""
    try:
        same = path.resolve() == default_text_file().resolve()
    except MixqError:  # no default text here: nothing to keep apart
        same = False
    return DEFAULT_WINDOWS * DEFAULT_CTX if same else 0


def calibration(tokenizer, cfg: CalibConfig | None = None) -> Calibration:
    """The calibration windows of `cfg` in this tokenizer's tokens, and what provenance records of them."""
    import torch

    cfg = cfg or CalibConfig()
    cfg.check()
    path = Path(cfg.file).expanduser() if cfg.file else default_text_file()
    stream = tokenize_file(tokenizer, path)
    skip = eval_tokens(path)
    n_avail = max(0, (stream.numel() - skip) // cfg.length)
    if n_avail < cfg.samples:
        where = f" after the {skip} tokens eval's default windows read" if skip else ""
        raise MixqError(f"{path}: {stream.numel()} tokens give {n_avail} calibration windows of {cfg.length} "
                        f"tokens{where}, {cfg.samples} asked; lower --calib-samples / --calib-len or pass a "
                        f"longer --calib file")
    chosen = sorted(random.Random(cfg.seed).sample(range(n_avail), cfg.samples))
    starts = [skip + k * cfg.length for k in chosen]
    ids = torch.stack([stream[s:s + cfg.length] for s in starts]).clone()
    info = {"file": str(path), "sha256": sha256_file(path), "samples": cfg.samples, "length": cfg.length,
            "seed": cfg.seed, "tokens_in_file": int(stream.numel()), "first_token": skip,
            "token_starts": starts, "eval_tokens_excluded": skip, "disjoint_from_eval": bool(skip),
            "note": (f"calibration windows drawn after token {skip}: eval's default ppl/KLD windows "
                     f"({DEFAULT_WINDOWS} x {DEFAULT_CTX} tokens from the start) are not used"
                     if skip else "calibration text is not the default ppl/KLD text")}
    return Calibration(ids, info)


def without_span(cal: Calibration, path, start: int, end: int) -> Calibration:
    """`cal` without its samples that share a token with tokens [start, end) of the text file `path` (e.g. the
    windows `mixq measure` scores): the dropped starts go to `info["dropped_overlapping"]`."""
    import torch

    same = Path(cal.info["file"]).resolve() == Path(path).resolve()
    starts, length = cal.info["token_starts"], cal.info["length"]
    overlaps = [same and s < end and start < s + length for s in starts]
    keep = [i for i, o in enumerate(overlaps) if not o]
    if not keep:
        raise MixqError(f"{path}: every calibration window overlaps tokens {start}..{end} that are measured; "
                        "pass another calibration file or more samples")
    info = {**cal.info, "token_starts": [starts[i] for i in keep], "samples_used": len(keep),
            "dropped_overlapping": [s for s, o in zip(starts, overlaps) if o]}
    return Calibration(cal.ids[torch.tensor(keep)].clone(), info)


def tail_windows(tokenizer, path=None, n_tokens: int = 1024, ctx: int = 256):
    """(perplexity.Windows, info): the last n_tokens // ctx windows of `ctx` tokens of a text file (default:
    perplexity.default_text_file), `mixq measure`'s calibration. Evaluation's ppl/kld windows are counted from the
    start of the file, so this slice is the part furthest from them."""
    n = max(1, n_tokens // ctx)
    win = make_windows(tokenizer, path, ctx=ctx)
    total = int(win.ids.shape[0])
    if total < n:
        raise MixqError(f"{win.file}: holds only {total} windows of {ctx} tokens; need {n} "
                        f"(lower --tokens / --ctx or pass a longer --calib file)")
    sub = win.subset(range(total - n, total))
    return sub, {"file": win.file, "ctx": ctx, "n_windows": n, "first_window": total - n,
                 "windows_in_file": total, "scored_tokens": sub.n_tokens, "digest": sub.digest}


def add_calib_arguments(p, prefix: str = "", what: str = "calibration") -> None:
    """--calib, --calib-samples, --calib-len, --calib-seed (each after `prefix`: measure's are --method-calib...)."""
    p.add_argument(f"--{prefix}calib", default=None, metavar="FILE",
                   help=f"{what} text file (default: WikiText-2 test after eval's default ppl/KLD windows)")
    p.add_argument(f"--{prefix}calib-samples", type=int, default=DEFAULT_SAMPLES,
                   help=f"{what} windows (default {DEFAULT_SAMPLES})")
    p.add_argument(f"--{prefix}calib-len", type=int, default=DEFAULT_LENGTH,
                   help=f"tokens per {what} window (default {DEFAULT_LENGTH})")
    p.add_argument(f"--{prefix}calib-seed", type=int, default=DEFAULT_SEED,
                   help=f"seed choosing the {what} windows (default {DEFAULT_SEED})")


def calib_config(args, prefix: str = "") -> CalibConfig:
    """The CalibConfig of the options `add_calib_arguments(p, prefix)` added."""
    dest = prefix.replace("-", "_")
    cfg = CalibConfig(*(getattr(args, f"{dest}calib{k}") for k in ("", "_samples", "_len", "_seed")))
    cfg.check(prefix)
    return cfg

"""The one place mixq changes torch's thread count: a context manager that restores it afterwards."""

from __future__ import annotations

import os
from contextlib import contextmanager


def available_cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@contextmanager
def torch_threads(n: int | None = None, *, at_most: bool = False):
    """Run the block with `n` torch intra-op threads (None: all available cores), then restore the old number.

    `at_most=True` only ever lowers the count. Many short element-wise ops (quantizing in small chunks)
    are 20-100x faster on one thread than on two on a busy machine; big matmuls want every core.
    """
    import torch

    old = torch.get_num_threads()
    n = available_cores() if n is None else max(1, int(n))
    if n == old or (at_most and old <= n):
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)

"""The C library's memory calls (glibc, Linux; elsewhere nothing): the heap given back, mapped pages dropped."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys


def _load_libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return libc
    except (OSError, AttributeError):
        return None


LIBC = _load_libc()


def trim_heap() -> None:
    """Give the heap's free pages back to the system (glibc; elsewhere nothing). After loading: reading, casting and
    quantizing leave ~170 MB of freed blocks in the heap for SmolLM2-135M that would count in every later peak.
    After each batch of scoring or perplexity: every forward allocates vocabulary-sized blocks and dense weights of
    several sizes; glibc keeps blocks under its adaptive mmap threshold (up to 32 MB) on the heap, where they
    fragment (without it, a 64-window KLD run on SmolLM2 grew to 5.3 GB)."""
    if LIBC is not None and hasattr(LIBC, "malloc_trim"):
        LIBC.malloc_trim(0)

"""Give freed heap back to the operating system between stages.

A long process that evaluated a model (lm-eval, hundreds of MB of temporary logits) keeps that memory in glibc's
arenas after the tensors are freed: its RSS stays at the high-water mark, and the next stage's peak stacks on it
(bench/README.md, "Memory: the demo's peak RSS"). `gc.collect()` drops cycles still holding tensors; glibc's
`malloc_trim(0)` returns free arena pages. Elsewhere (macOS, musl) only the collection runs."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    return getattr(libc, "malloc_trim", None)


def release_heap() -> bool:
    """Collect garbage and return free heap pages to the OS; whether glibc's malloc_trim ran."""
    gc.collect()
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True

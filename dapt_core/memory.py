"""Give freed heap back to the operating system between stages; keep the cyclic collector off a corpus's file list.

A long process that evaluated a model (lm-eval, hundreds of MB of temporary logits) keeps that memory in glibc's
arenas after the tensors are freed: its RSS stays at the high-water mark, and the next stage's peak stacks on it
(bench/README.md, "Memory: the demo's peak RSS"). `gc.collect()` drops cycles still holding tensors; glibc's
`malloc_trim(0)` returns free arena pages. Elsewhere (macOS, musl) only the collection runs."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
from collections.abc import Callable, Iterator
from contextlib import contextmanager


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


@contextmanager
def long_lived_heap() -> Iterator[Callable[[], None]]:
    """For a run that builds many objects it keeps to its end: a prepare run's file list, a few tracked objects a
    file. The cyclic collector is paused while they are built (each pass walked the growing heap again); `settled()`,
    called once they are, freezes them (gc.freeze: no later pass walks them) and resumes collection. On exit they are
    put back (gc.unfreeze), so a cycle that became garbage meanwhile is collected by a later pass. The passes cost
    about 1.3 s of a 7 s refresh of 105,000 files: 0.35 s in discovery, 1 s in the rest of the flow (bench/README.md,
    "Incremental refresh, third session")."""
    was_enabled = gc.isenabled()
    gc.disable()

    def settled() -> None:
        gc.freeze()
        if was_enabled:
            gc.enable()

    try:
        yield settled
    finally:
        gc.unfreeze()
        if was_enabled:
            gc.enable()

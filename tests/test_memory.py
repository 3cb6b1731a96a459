"""dapt_core/memory.py: the collector is paused while a run builds its long-lived objects, they are frozen once built,
and everything is as before when the run ends (also when it fails)."""

from __future__ import annotations

import gc

import pytest

from dapt_core.memory import long_lived_heap


class Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cyclic collector frees it


def test_objects_built_before_settled_are_frozen_until_the_run_ends():
    assert gc.isenabled() and gc.get_freeze_count() == 0
    with long_lived_heap() as settled:
        assert not gc.isenabled()  # paused while the file list is built
        kept = [Node() for _ in range(1000)]
        settled()
        assert gc.isenabled() and gc.get_freeze_count() >= len(kept)  # no later pass walks them
        del kept
        assert gc.collect() < 1000  # frozen: the dropped cycles are not collected yet
    assert gc.isenabled() and gc.get_freeze_count() == 0
    assert gc.collect() >= 1000  # put back: a later pass frees them


def test_a_failed_run_leaves_the_collector_as_it_was():
    with pytest.raises(RuntimeError), long_lived_heap():
        raise RuntimeError("discovery failed")
    assert gc.isenabled() and gc.get_freeze_count() == 0
    gc.disable()
    try:
        with long_lived_heap() as settled:
            settled()
        assert not gc.isenabled()  # it was off before: it stays off
    finally:
        gc.enable()

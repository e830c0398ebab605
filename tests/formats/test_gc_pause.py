"""Reading pauses the cyclic collector and hands what it made to the oldest generation: the
collector is back on afterwards, garbage cycles made meanwhile are still collected, and a
process's own frozen objects stay frozen."""

from __future__ import annotations

import gc
import weakref

import surgery
from surgery.checkpoint import gc_paused


class _Node:
    pass


def _cycle() -> weakref.ref:
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    return weakref.ref(a)


def test_collector_is_back_and_cycles_made_meanwhile_are_collected(make):
    assert gc.isenabled()
    with gc_paused():
        assert not gc.isenabled()
        ref = _cycle()
        with gc_paused():  # nested: still paused after the inner one
            pass
        assert not gc.isenabled()
        surgery.open(make("plain_pt"))
    assert gc.isenabled() and ref() is not None
    gc.collect()
    assert ref() is None


def test_objects_a_process_froze_stay_frozen():
    keep = [_Node() for _ in range(10)]
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        with gc_paused():
            _cycle()
        # Neither unfrozen (the count would drop to 0) nor frozen again (it would grow); frozen
        # objects that die meanwhile (another thread's, as in a pytest-xdist worker) leave it.
        assert frozen // 2 < gc.get_freeze_count() <= frozen and gc.isenabled()
    finally:
        gc.unfreeze()
    del keep


def test_a_disabled_collector_stays_disabled():
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()

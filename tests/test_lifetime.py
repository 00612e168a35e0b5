"""ReleaseLater: objects outlive their last use by the delay, then are dropped by a later hold()."""

import gc
import time
import weakref

from mmtriton.lifetime import ReleaseLater


class Thing:
    pass


def test_an_object_stays_alive_for_the_delay_then_is_dropped():
    keep = ReleaseLater(delay_s=0.2)
    thing = Thing()
    ref = weakref.ref(thing)
    keep.hold(thing)
    del thing
    gc.collect()
    assert ref() is not None, "dropped before its delay"
    keep.hold(Thing())  # too early: nothing expires yet
    assert ref() is not None and len(keep) == 2
    time.sleep(0.25)
    keep.hold(Thing())
    gc.collect()
    assert ref() is None, "kept after its delay"
    assert len(keep) == 1


def test_expired_objects_are_dropped_in_order():
    keep = ReleaseLater(delay_s=0.05)
    things = [Thing() for _ in range(5)]
    refs = [weakref.ref(t) for t in things]
    for t in things:
        keep.hold(t)
    del things, t
    time.sleep(0.1)
    keep.hold(Thing())
    gc.collect()
    assert all(r() is None for r in refs)

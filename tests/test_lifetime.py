"""ReleaseLater: objects outlive their last use by the delay, then are dropped by a later hold()."""

import gc
import weakref

from mmtriton.lifetime import ReleaseLater


class Thing:
    pass


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_an_object_stays_alive_for_the_delay_then_is_dropped():
    clock = Clock()
    keep = ReleaseLater(delay_s=10.0, clock=clock)
    thing = Thing()
    ref = weakref.ref(thing)
    keep.hold(thing)
    del thing
    gc.collect()
    assert ref() is not None, "dropped at once"
    clock.now += 9.9
    keep.hold(Thing())  # too early: nothing expires yet
    gc.collect()
    assert ref() is not None and len(keep) == 2
    clock.now += 0.2
    keep.hold(Thing())
    gc.collect()
    assert ref() is None, "kept after its delay"
    assert len(keep) == 2


def test_expired_objects_are_dropped_in_order():
    clock = Clock()
    keep = ReleaseLater(delay_s=1.0, clock=clock)
    things = [Thing() for _ in range(5)]
    refs = [weakref.ref(t) for t in things]
    for i, t in enumerate(things):
        clock.now = 100.0 + i / 10
        keep.hold(t)
    del things, t
    clock.now = 101.25  # the first three (held at 100.0, 100.1 and 100.2) have expired
    keep.hold(Thing())
    gc.collect()
    assert [r() is None for r in refs] == [True, True, True, False, False]

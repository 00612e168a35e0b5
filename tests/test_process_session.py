"""mmtriton.process_session: where the launcher's children run for the CPU scheduler (real child processes)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mmtriton.process_session import autogroup_of, popen_session_kwargs, set_autogroup_nice

# The switch can read 1 and /proc/PID/autogroup still be empty (a CI sandbox did that): then nothing can be checked.
needs_autogroups = pytest.mark.skipif(autogroup_of(os.getpid()) is None,
                                      reason="this process's autogroup cannot be read (autogroups off, or a sandbox)")


def sleeper(session_nice: int | None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"],
                            **popen_session_kwargs(session_nice))


def test_a_child_gets_its_own_process_group_and_a_session_only_when_asked():
    for session_nice, own_session in ((None, False), (3, True)):
        child = sleeper(session_nice)
        try:
            assert os.getpgid(child.pid) == child.pid  # stop() can signal the child and all it starts
            assert (os.getsid(child.pid) == child.pid) is own_session
            assert (os.getsid(child.pid) == os.getsid(0)) is not own_session
        finally:
            child.kill()
            child.wait()


@needs_autogroups
def test_only_a_child_in_a_session_of_its_own_is_in_another_autogroup():
    ours = autogroup_of(os.getpid())
    same, own = sleeper(None), sleeper(0)
    try:
        assert autogroup_of(same.pid) == ours
        assert autogroup_of(own.pid)[0] != ours[0]
    finally:
        for child in (same, own):
            child.kill()
            child.wait()


@needs_autogroups
def test_session_nice_is_set_on_the_childs_autogroup_and_ours_is_untouched():
    ours = autogroup_of(os.getpid())
    child = sleeper(7)
    try:
        assert set_autogroup_nice(child.pid, 7) is None
        assert autogroup_of(child.pid)[1] == 7
        assert autogroup_of(os.getpid()) == ours
    finally:
        child.kill()
        child.wait()


def test_refusals_say_why():
    assert "outside -20..19" in set_autogroup_nice(os.getpid(), 25)
    child = sleeper(None)
    child.kill()
    child.wait()
    reason = set_autogroup_nice(child.pid, 5)
    assert reason is not None and (str(child.pid) in reason or "does not group" in reason)
    if autogroup_of(os.getpid()) is None:  # a refusal, not a silent no-op, where no group can be read
        alive = sleeper(None)
        try:
            assert set_autogroup_nice(alive.pid, 5) is not None
        finally:
            alive.kill()
            alive.wait()


def test_an_unreadable_autogroup_is_a_refusal_not_a_silent_no_op(monkeypatch):
    import mmtriton.process_session as process_session

    monkeypatch.setattr(process_session, "autogroups_enabled", lambda: True)
    monkeypatch.setattr(process_session, "autogroup_of", lambda pid: None)
    reason = set_autogroup_nice(os.getpid(), 5)
    assert reason is not None and f"/proc/{os.getpid()}/autogroup" in reason

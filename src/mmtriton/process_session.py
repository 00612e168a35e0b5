"""Which Linux session, and so which scheduler *autogroup*, the launcher's child processes run in.

With ``CONFIG_SCHED_AUTOGROUP`` (built into most distribution kernels, on when
``/proc/sys/kernel/sched_autogroup_enabled`` is 1) the CPU scheduler shares time between *sessions* first, then
between the processes of one session. Measured on a 2-vCPU machine (docs/streaming.md): with tritonserver started
in a session of its own, a client in another session (our OpenAI server, a benchmark, a test) woke up as much as
660 ms late while a vLLM engine ran, so it read a streamed answer in one burst at the end, though Triton had written
every response on time. With tritonserver in the client's session the same client woke at most 3 ms late.

Default: a child gets a process group of its own (``stop()`` signals it and all it started, as before) inside the
caller's session. ``session_nice=N`` gives tritonserver a session of its own instead, whose autogroup gets nice N:
for clients that run in *other* sessions of the same machine (another terminal, a benchmark started elsewhere).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

AUTOGROUP_SWITCH = Path("/proc/sys/kernel/sched_autogroup_enabled")


def popen_session_kwargs(session_nice: int | None = None) -> dict[str, Any]:
    """``subprocess.Popen`` keywords: a process group of its own in the caller's session (``session_nice`` None),
    or a session of its own (then call :func:`set_autogroup_nice`)."""
    return {"process_group": 0} if session_nice is None else {"start_new_session": True}


def autogroups_enabled() -> bool:
    try:
        return AUTOGROUP_SWITCH.read_text().strip() == "1"
    except OSError:  # a kernel without CONFIG_SCHED_AUTOGROUP
        return False


def autogroup_of(pid: int) -> tuple[str, int] | None:
    """(group name, nice) of ``pid``'s autogroup, e.g. ("/autogroup-314", 0). None when that cannot be read:
    autogroups off, the process gone, or a sandbox whose /proc does not show it though the switch reads 1 (seen
    on a CI machine), where nothing here can tell which group a process is in."""
    try:
        name, _, nice = Path(f"/proc/{pid}/autogroup").read_text().split()
    except (OSError, ValueError):
        return None
    return name, int(nice)


def set_autogroup_nice(pid: int, nice: int) -> str | None:
    """Give the autogroup of ``pid``'s session nice ``nice`` (-20..19). Returns None when done, else why not, in
    words for a log line (raising the nice needs no privilege; lowering it below 0 needs CAP_SYS_NICE)."""
    if not -20 <= nice <= 19:
        return f"autogroup nice {nice} is outside -20..19"
    if not autogroups_enabled():
        return f"the kernel does not group by session ({AUTOGROUP_SWITCH} is not 1), so nice {nice} has no effect"
    if autogroup_of(pid) is None and Path(f"/proc/{pid}").exists():  # a pid that is gone fails the write below
        return f"/proc/{pid}/autogroup shows no group here (a sandboxed /proc?), so nice {nice} cannot be set"
    try:
        Path(f"/proc/{pid}/autogroup").write_text(str(nice))
    except FileNotFoundError:
        return f"pid {pid} is gone"
    except PermissionError:
        return f"not allowed to set autogroup nice {nice} for pid {pid} (below 0 needs CAP_SYS_NICE)"
    except OSError as exc:
        return f"could not set autogroup nice {nice} for pid {pid}: {exc}"
    return None

"""Heals models whose Python-backend stub process died.

Triton 2.51 (python_backend r24.10) never restarts a dead stub: ``TRITONBACKEND_ModelInstanceExecute`` lost its
restart path in r24.07 ("TODO: Implement restart on decoupled" is all that is left), the backend has no
``TRITONBACKEND_ModelInstanceReady`` (added in r26.01), and ``StubLauncher::StubActive`` only checks that a pid was
recorded. So a killed stub leaves its model READY while every request fails "Stub process '<instance>' is not
healthy", and the dead stub stays a zombie (tritonserver reaps it only when the instance is destroyed).

``StubSupervisor`` watches the stubs under the tritonserver the launcher started and, when one dies while its model
is still READY, unloads and loads that model through the repository API (explicit model control). Triton then
reloads the ensembles that compose it by itself (measured: an unloaded composing model makes its ensemble
UNAVAILABLE, and loading it again brings the ensemble back); the supervisor loads any dependent ensemble that is
still not ready afterwards. A model that calls the dead one by BLS (``bls_calls`` in its config.pbtxt: Triton does
not know) is unloaded first and loaded after, so it too is not ready meanwhile. During the reload Triton's own
readiness is truthful: ``/v2/health/ready``, the model's and the ensemble's ``ready`` answer 400 until the load is
done.
"""

from __future__ import annotations

import json
import re
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

STUB_BINARY = "triton_python_backend_stub"
# argv of a stub (python_backend stub_launcher.cc, StubLauncher::Launch): stub model_path shm_region default_size
# growth_size parent_pid python_lib ipc_handle stub_name runtime_modeldir.
_ARGV_MODEL_PATH = 1
_ARGV_STUB_NAME = 8


@dataclass(frozen=True)
class StubProcess:
    pid: int
    model: str
    instance: str  # e.g. encoder_image_0_0
    create_time: float
    # Processes the stub started (e.g. vLLM's engine), as (pid, create_time): they outlive a killed stub.
    descendants: tuple[tuple[int, float], ...] = ()


def list_stubs(server_pid: int) -> list[StubProcess]:
    """The live Python-backend stubs among the children of ``server_pid`` (zombies are left out)."""
    try:
        children = psutil.Process(server_pid).children()
    except psutil.NoSuchProcess:
        return []
    stubs = []
    for child in children:
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                continue
            argv = child.cmdline()
            if len(argv) <= _ARGV_STUB_NAME or not argv[0].endswith(STUB_BINARY):
                continue  # not a stub, or still the bash that execs it
            model_path = Path(argv[_ARGV_MODEL_PATH])  # <repository>/<model>/<version>/model.py
            descendants = tuple((d.pid, d.create_time()) for d in child.children(recursive=True))
            stubs.append(StubProcess(child.pid, model_path.parents[1].name, argv[_ARGV_STUB_NAME],
                                     child.create_time(), descendants))
        except (psutil.NoSuchProcess, psutil.AccessDenied, IndexError):
            continue
    return stubs


def command_line(proc: psutil.Process) -> str:
    """``proc``'s name and command line; empty for one gone or a zombie (killed earlier, not reaped yet)."""
    try:
        return proc.name() + " " + " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return ""


def newest_stub(server_pid: int, model: str) -> StubProcess | None:
    """The newest live stub of ``model``: an older one may be a version Triton has not finished unloading."""
    return max((s for s in list_stubs(server_pid) if s.model == model), key=lambda s: s.create_time, default=None)


def descendant_named(pid: int, marker: str) -> psutil.Process | None:
    """The first process under ``pid`` whose name or command line holds ``marker`` (e.g. vLLM's "EngineCore")."""
    return next((c for c in psutil.Process(pid).children(recursive=True) if marker in command_line(c)), None)


def wait_status(pid: int) -> int | None:
    """The waitpid-style status of a zombie (field 52 of /proc/<pid>/stat), None once it has been reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[-1]) if fields and fields[0] == "Z" else None


def describe_exit(status: int | None) -> str:
    if status is None:
        return "exit status unknown (already reaped)"
    if status & 0x7F:
        sig = status & 0x7F
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = "?"
        return f"killed by signal {sig} ({name})"
    return f"exited with code {status >> 8}"


def kill_if_same(pid: int, create_time: float) -> bool:
    """SIGKILL ``pid`` only if it is still the process that started at ``create_time`` (no pid reuse)."""
    try:
        proc = psutil.Process(pid)
        if abs(proc.create_time() - create_time) > 0.01 or proc.status() == psutil.STATUS_ZOMBIE:
            return False
        proc.kill()
        return True
    except psutil.NoSuchProcess:
        return False


_STEP_MODEL = re.compile(r'\bmodel_name\s*:\s*"([^"]+)"')
_ENSEMBLE = re.compile(r'\bplatform\s*:\s*"ensemble"')


def ensemble_dependents(repository: Path) -> dict[str, set[str]]:
    """For each model, the ensembles of ``repository`` that call it, directly or through another ensemble
    (read from the ensembles' config.pbtxt steps)."""
    composes: dict[str, set[str]] = {}
    for config in sorted(repository.glob("*/config.pbtxt")):
        text = "\n".join(line.split("#", 1)[0] for line in config.read_text().splitlines())
        if _ENSEMBLE.search(text):
            composes[config.parent.name] = set(_STEP_MODEL.findall(text))
    dependents: dict[str, set[str]] = {}
    for ensemble, steps in composes.items():
        pending, seen = list(steps), set()
        while pending:
            model = pending.pop()
            if model in seen:
                continue
            seen.add(model)
            dependents.setdefault(model, set()).add(ensemble)
    # An ensemble inside an ensemble: whoever depends on the inner one depends on what it composes too.
    changed = True
    while changed:
        changed = False
        for ensembles in dependents.values():
            extra = set().union(*(dependents.get(e, set()) for e in ensembles)) - ensembles
            if extra:
                ensembles |= extra
                changed = True
    return dependents


_BLS_CALLS = re.compile(r'key\s*:\s*"bls_calls"\s*value\s*\{\s*string_value\s*:\s*"([^"]*)"')


def bls_callers(repository: Path) -> dict[str, set[str]]:
    """For each model, the models of ``repository`` that call it by BLS (their config.pbtxt parameter
    ``bls_calls``: Triton itself does not know who calls whom by BLS)."""
    callers: dict[str, set[str]] = {}
    for config in sorted(repository.glob("*/config.pbtxt")):
        text = "\n".join(line.split("#", 1)[0] for line in config.read_text().splitlines())
        for match in _BLS_CALLS.finditer(text):
            for callee in filter(None, (m.strip() for m in match.group(1).split(","))):
                callers.setdefault(callee, set()).add(config.parent.name)
    return callers


class RepositoryError(RuntimeError):
    pass


class TritonRepository:
    """The bits of Triton's HTTP repository API the supervisor needs, every call with a timeout."""

    def __init__(self, http_url: str, timeout_s: float = 5.0, load_timeout_s: float = 900.0):
        self.base = f"http://{http_url}"
        self.timeout_s = timeout_s
        self.load_timeout_s = load_timeout_s

    def _post(self, path: str, timeout_s: float) -> bytes:
        request = urllib.request.Request(self.base + path, data=b"{}", method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                return response.read()
        except urllib.error.HTTPError as exc:
            raise RepositoryError(f"POST {path}: {exc.code} {exc.read().decode(errors='replace')[:500]}") from exc
        except (urllib.error.URLError, OSError) as exc:
            raise RepositoryError(f"POST {path}: {exc}") from exc

    def states(self) -> dict[str, str]:
        """Model name → state (READY, LOADING, UNLOADING, UNAVAILABLE) from the repository index."""
        index = json.loads(self._post("/v2/repository/index", self.timeout_s) or b"[]")
        return {entry["name"]: entry.get("state", "") for entry in index}

    def unload(self, model: str) -> None:
        self._post(f"/v2/repository/models/{model}/unload", self.timeout_s)

    def load(self, model: str) -> None:
        # Synchronous in Triton: answers once the model is loaded (vLLM models take minutes on 2 cores).
        self._post(f"/v2/repository/models/{model}/load", self.load_timeout_s)


@dataclass
class ModelRecovery:
    """What the supervisor did for one model."""

    restarts: int = 0  # successful reloads after a stub died
    failed_attempts: int = 0  # reload attempts that failed (retried with back-off)
    last_cause: str = ""  # e.g. "stub encoder_image_0_0 (pid 123) killed by signal 9 (SIGKILL)"
    last_restart_s: float | None = None  # from noticing the death to the model (and its ensembles) loaded again
    healing: bool = False


@dataclass
class StubSupervisor:
    """Polls ``list_stubs`` every ``poll_s``; a stub that is gone while its model is still READY (and no newer live
    stub serves that instance) gets its model reloaded; a stub superseded by a newer one for longer than
    ``superseded_grace_s`` is killed. Everything it touches is injectable for tests."""

    list_stubs: Callable[[], Iterable[StubProcess]]
    repository: TritonRepository
    dependents: dict[str, set[str]] = field(default_factory=dict)
    # Models that call one by BLS: unloaded while it is reloaded (else they stay READY and fail every request),
    # loaded again after.
    bls_callers: dict[str, set[str]] = field(default_factory=dict)
    exit_status: Callable[[int], int | None] = wait_status
    kill: Callable[[int, float], bool] = kill_if_same
    clock: Callable[[], float] = time.monotonic
    log: Callable[[str], None] = print
    poll_s: float = 0.5
    backoff_s: tuple[float, float] = (1.0, 60.0)  # first delay after a failed reload, and the most
    # Before the unload: requests already on the dead instance fail by themselves within ~1-3.3 s (measured);
    # an encoder_image request still executing when its model was unloaded never got an answer and kept the
    # old version alive until shutdown.
    settle_s: float = 3.5
    # A stub whose instance has a newer stub belongs to a version Triton is unloading. Seen in the fault run: an
    # old multimodal_bls stub idle for 20 min after Triton had replaced it (its unload never completed), with
    # its model's name. After this long it is killed (with its children): nothing may outlive its model.
    superseded_grace_s: float = 300.0

    def __post_init__(self) -> None:
        self._known: dict[int, StubProcess] = {}
        self._superseded_since: dict[tuple[int, float], float] = {}
        self._recovery: dict[str, ModelRecovery] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # ---- what others read
    def stats(self) -> dict[str, dict]:
        with self._lock:
            return {model: asdict(r) for model, r in self._recovery.items()}

    def healing(self) -> set[str]:
        with self._lock:
            return {model for model, r in self._recovery.items() if r.healing}

    def stubs(self) -> dict[int, StubProcess]:
        """The stubs seen alive at the last poll, by pid."""
        with self._lock:
            return dict(self._known)

    # ---- the loop
    def start(self) -> None:
        if self._thread is None:
            self.poll_once()  # know the stubs before returning, so a death right after start is noticed
            self._thread = threading.Thread(target=self._run, name="stub-supervisor", daemon=True)
            self._thread.start()

    def stop(self, timeout_s: float = 2.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)  # a reload in progress ends when the server goes
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.poll_once()
            except Exception as exc:  # noqa: BLE001 - the watcher must outlive one bad poll
                self.log(f"[supervisor] poll failed: {exc!r}")

    def poll_once(self) -> None:
        alive = {s.pid: s for s in self.list_stubs()}
        with self._lock:
            gone = [s for pid, s in self._known.items() if pid not in alive]
            self._known = alive
        newest: dict[str, float] = {}
        for stub in alive.values():
            newest[stub.instance] = max(newest.get(stub.instance, stub.create_time), stub.create_time)
        self._reap_superseded(alive.values(), newest)
        if not gone:
            return
        # A stub replaced by a newer one for the same instance is a reload someone else did, not a crash. An
        # older one still alive (a version Triton never finished unloading) does not serve: its death is one.
        dead = [s for s in gone if newest.get(s.instance, float("-inf")) <= s.create_time]
        if not dead:
            return
        try:
            states = self.repository.states()
        except RepositoryError as exc:
            # Keep them known, so the next poll looks again.
            with self._lock:
                self._known.update({s.pid: s for s in dead})
            self.log(f"[supervisor] cannot read the model states ({exc}); will look again")
            return
        by_model: dict[str, list[StubProcess]] = {}
        for stub in dead:
            # READY with a dead stub is the case Triton never heals; anything else is an unload in progress.
            if states.get(stub.model) == "READY":
                by_model.setdefault(stub.model, []).append(stub)
        for model, stubs in by_model.items():
            causes = []
            for stub in stubs:
                causes.append(f"stub {stub.instance} (pid {stub.pid}) {describe_exit(self.exit_status(stub.pid))}")
                orphans = [pid for pid, t in stub.descendants if self.kill(pid, t)]
                if orphans:
                    causes[-1] += f"; killed its orphaned processes {orphans}"
            self._heal(model, "; ".join(causes), states)

    def _reap_superseded(self, alive: Iterable[StubProcess], newest: dict[str, float]) -> None:
        superseded = {(s.pid, s.create_time): s for s in alive if s.create_time < newest[s.instance]}
        if not superseded and not self._superseded_since:
            return
        now = self.clock()
        self._superseded_since = {key: self._superseded_since.get(key, now) for key in superseded}
        for key, stub in superseded.items():
            if now - self._superseded_since[key] < self.superseded_grace_s:
                continue
            killed = [pid for pid, t in ((stub.pid, stub.create_time), *stub.descendants) if self.kill(pid, t)]
            self._superseded_since.pop(key, None)
            self.log(f"[supervisor] stub {stub.instance} (pid {stub.pid}) of a {stub.model} version Triton replaced "
                     f"{self.superseded_grace_s:.0f}+ s ago is still running: killed {killed}")

    def _heal(self, model: str, cause: str, states: dict[str, str]) -> None:
        t0 = self.clock()
        with self._lock:
            recovery = self._recovery.setdefault(model, ModelRecovery())
            recovery.healing = True
            recovery.last_cause = cause
        ensembles = sorted(e for e in self.dependents.get(model, set()) | self.bls_callers.get(model, set())
                           if states.get(e) == "READY")
        self.log(f"[supervisor] {cause}: reloading {model}" + (f" (then {', '.join(ensembles)})" if ensembles else ""))
        delay = self.backoff_s[0]
        self._stop.wait(self.settle_s)
        while not self._stop.is_set():
            try:
                self._reload(model, ensembles)
                break
            except RepositoryError as exc:
                with self._lock:
                    recovery.failed_attempts += 1
                self.log(f"[supervisor] reloading {model} failed ({exc}); next try in {delay:g} s")
                if self._stop.wait(delay):
                    break
                delay = min(delay * 2, self.backoff_s[1])
        with self._lock:
            recovery.healing = False
            if not self._stop.is_set():
                recovery.restarts += 1
                recovery.last_restart_s = self.clock() - t0
        if not self._stop.is_set():
            self.log(f"[supervisor] {model} is back after {recovery.last_restart_s:.1f} s "
                     f"(restart {recovery.restarts})")

    def _reload(self, model: str, ensembles: list[str]) -> None:
        for caller in sorted(self.bls_callers.get(model, set()) & set(ensembles)):
            try:
                self.repository.unload(caller)  # not ready while what it calls is down
            except RepositoryError as exc:
                self.log(f"[supervisor] unloading {caller} (calls {model}): {exc}")
        try:
            # The old instance's teardown SIGKILLs and reaps the dead stub (StubLauncher::TerminateStub).
            self.repository.unload(model)
        except RepositoryError as exc:
            self.log(f"[supervisor] unloading {model}: {exc} (loading anyway)")
        self.repository.load(model)
        # Triton reloads the ensembles itself once their composing model is back; load any it left out.
        states = self.repository.states()
        for ensemble in ensembles:
            if states.get(ensemble) != "READY":
                self.repository.load(ensemble)

"""The stub supervisor and the launcher's start-error extraction, without a tritonserver: real processes stand in
for stubs, a small HTTP server records the repository calls Triton would get."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest

from mmtriton.server import ServerConfig, TritonServer, first_log_error
from mmtriton.supervisor import (
    StubProcess,
    StubSupervisor,
    TritonRepository,
    descendant_named,
    describe_exit,
    ensemble_dependents,
    list_stubs,
    newest_stub,
    wait_status,
)

REPO = Path(__file__).resolve().parents[1] / "model_repository"

# Recorded from a CPU-only tritonserver 2.51 whose model's initialize raised, with a stub's shutdown crash after.
FAILED_START_LOG = "".join([
    'W1201 10:30:09.440531 8419 pinned_memory_manager.cc:273] "Unable to allocate pinned system'
    ' memory, pinned memory pool will not be available: CUDA driver version is insufficient for'
    ' CUDA runtime version"\n',
    'E1201 10:30:09.440705 8419 server.cc:241] "CudaDriverHelper has not been initialized."\n',
    'I1201 10:30:09.442328 8419 model_lifecycle.cc:472] "loading: broken:1"\n',
    'I1201 10:30:11.011593 8419 pb_stub.cc:366] "Failed to initialize Python stub: ValueError: '
    'broken on purpose: no weights here\\n\\nAt:\\n  /tmp/sv/repo_bad/broken/1/model.py(5): initia'
    'lize\\n"\n',
    'E1201 10:30:11.208423 8419 backend_model.cc:692] "ERROR: Failed to create instance: ValueE'
    'rror: broken on purpose: no weights here\\n\\nAt:\\n  /tmp/sv/repo_bad/broken/1/model.py(5): '
    'initialize\\n"\n',
    'E1201 10:30:11.208556 8419 model_lifecycle.cc:642] "failed to load \'broken\' version 1: Int'
    'ernal: ValueError: broken on purpose: no weights here\\n\\nAt:\\n  /tmp/sv/repo_bad/broken/1/'
    'model.py(5): initialize\\n"\n',
    'I1201 10:30:11.208576 8419 model_lifecycle.cc:777] "failed to load \'broken\'"\n',
    'E1201 10:30:11.208910 8419 ensemble_scheduler.cc:1468] "unable to create stream for ens: C'
    'UDA driver version is insufficient for CUDA runtime version"\n',
    'I1201 10:30:11.209461 8419 server.cc:305] "Waiting for in-flight requests to complete."\n',
    'Signal (11) received.\n',
    ' 0# 0x000055F1C0A3B2AD in /usr/bin/triton_python_backend_stub\n',
    ' 1# 0x00007F5A2E1C3050 in /lib/x86_64-linux-gnu/libc.so.6\n',
    'E1201 10:30:13.100000 8419 pb_stub.cc:999] "Stub process shut down with a segfault"\n',
    'error: creating server: Internal - failed to load all models\n',
])


def test_first_log_error_is_the_model_that_failed_not_the_noise_or_the_crash_after():
    assert first_log_error(FAILED_START_LOG) == (
        "failed to load 'broken' version 1: Internal: ValueError: broken on purpose: no weights here "
        "(at /tmp/sv/repo_bad/broken/1/model.py(5): initialize)")


def test_first_log_error_without_a_model_failure():
    text = FAILED_START_LOG.split("I1201 10:30:09.442328")[0] + 'E1201 10:30:12.1 8419 server.cc:1] "boom"\n'
    assert first_log_error(text) == "boom"
    assert first_log_error("error: creating server: Invalid argument - --model-repository must be specified\n") \
        == "error: creating server: Invalid argument - --model-repository must be specified"
    assert first_log_error('E1201 10:30:09.440705 8419 server.cc:241] "CudaDriverHelper has not been initialized."') \
        is None


def test_start_failure_message_leads_with_the_first_error(tmp_path):
    log = tmp_path / "ts.log"
    log.write_text(FAILED_START_LOG)
    server = TritonServer(ServerConfig(log_file=log))
    message = server._start_failure()
    assert message.splitlines()[0].endswith("no weights here (at /tmp/sv/repo_bad/broken/1/model.py(5): initialize)")
    assert "Signal (11)" not in message and "0x000055F1C0A3B2AD" not in message


def test_command_is_always_explicit_with_every_model_and_a_short_exit_timeout(tmp_path):
    for name in ("b", "a"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.pbtxt").write_text(f'name: "{name}"')
    (tmp_path / "not_a_model").mkdir()
    cmd = TritonServer(ServerConfig(model_repository=tmp_path)).command()
    assert "--model-control-mode=explicit" in cmd and "--exit-timeout-secs=5" in cmd
    assert [c for c in cmd if c.startswith("--load-model=")] == ["--load-model=a", "--load-model=b"]
    cmd = TritonServer(ServerConfig(models=["encoder_image"], exit_timeout_s=2)).command()
    assert [c for c in cmd if c.startswith("--load-model=")] == ["--load-model=encoder_image"]
    assert "--exit-timeout-secs=2" in cmd


def test_ensemble_dependents_come_from_the_config_files(tmp_path):
    deps = ensemble_dependents(REPO)
    for model in ("preprocess", "encoder_image", "llm_prefill", "llm_decode"):
        assert deps[model] == {"multimodal"}, model
    assert "multimodal_agg" not in deps
    # An ensemble of an ensemble: the outer one depends on the inner one's steps too; comments don't count.
    for name, steps in {"inner": ["m1"], "outer": ["inner", "m2"]}.items():
        (tmp_path / name).mkdir()
        body = " ".join(f'{{ model_name: "{s}" model_version: -1 }}' for s in steps)
        (tmp_path / name / "config.pbtxt").write_text(
            f'name: "{name}"\n# model_name: "ghost"\nplatform: "ensemble"\nensemble_scheduling {{ step [ {body} ] }}\n')
    assert ensemble_dependents(tmp_path) == {"m1": {"inner", "outer"}, "inner": {"outer"}, "m2": {"outer"}}


def test_describe_exit():
    assert describe_exit(9) == "killed by signal 9 (SIGKILL)"
    assert describe_exit(11) == "killed by signal 11 (SIGSEGV)"
    assert describe_exit(3 << 8) == "exited with code 3"
    assert describe_exit(None).startswith("exit status unknown")


# ---------------------------------------------------------------- real processes standing in for stubs


def _fake_stub(repo: Path, model: str, with_child: bool = False) -> subprocess.Popen:
    """A child of this test whose argv is a stub's (python runs argv[1], the 'model.py', which just sleeps)."""
    script = repo / model / "1" / "model.py"
    script.parent.mkdir(parents=True, exist_ok=True)
    child = f"import subprocess; subprocess.Popen([{sys.executable!r}, '-c', 'import time; time.sleep(60)'])\n"
    script.write_text(textwrap.dedent(f"""
        import time
        {child if with_child else ''}
        time.sleep(60)
        """))
    argv = [str(repo / "triton_python_backend_stub"), str(script), "triton_python_backend_shm_region_x", "1048576",
            "1048576", str(os.getpid()), "/backends/python", "336", f"{model}_0_0", "DEFAULT"]
    return subprocess.Popen(argv, executable=sys.executable)


def _wait(predicate, timeout_s: float = 10.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_list_stubs_and_the_exit_status_of_a_dead_one(tmp_path):
    proc = _fake_stub(tmp_path, "encoder_image", with_child=True)
    stub = None
    try:
        stub = _wait(lambda: next((s for s in list_stubs(os.getpid()) if s.pid == proc.pid and s.descendants), None))
        assert (stub.model, stub.instance) == ("encoder_image", "encoder_image_0_0")
        (grandchild, _), = stub.descendants
        assert newest_stub(os.getpid(), "encoder_image").pid == proc.pid
        assert newest_stub(os.getpid(), "llm_decode") is None
        assert descendant_named(proc.pid, "time.sleep(60)").pid == grandchild
        assert descendant_named(proc.pid, "EngineCore") is None
        proc.kill()
        _wait(lambda: psutil.Process(proc.pid).status() == psutil.STATUS_ZOMBIE)
        # A zombie (Triton 2.51 never reaps a crashed stub) is not listed, and its status is still readable.
        assert proc.pid not in [s.pid for s in list_stubs(os.getpid())]
        assert wait_status(proc.pid) == 9
        assert psutil.pid_exists(grandchild)
    finally:
        proc.kill()
        proc.wait()
        for pid, _ in stub.descendants if stub else ():
            if psutil.pid_exists(pid):
                psutil.Process(pid).kill()
    assert wait_status(proc.pid) is None  # reaped


def test_newest_stub_is_the_latest_started_of_its_model(monkeypatch):
    import mmtriton.supervisor as supervisor

    stubs = [_stub(1, created=5.0), _stub(2, created=9.0), _stub(3, model="llm_decode", created=99.0)]
    monkeypatch.setattr(supervisor, "list_stubs", lambda _server_pid: stubs)
    assert newest_stub(0, "encoder_image").pid == 2  # an older one may be a version still being unloaded


class FakeTriton(http.server.ThreadingHTTPServer):
    """Triton's repository endpoints: states in ``states``, every call in ``calls``, loads fail ``fail_loads``
    times. An unload makes the model UNAVAILABLE and its ensembles too; a load brings them back (as Triton does,
    unless ``keep_ensembles_down``)."""

    def __init__(self, states: dict[str, str], ensembles: dict[str, set[str]]):
        super().__init__(("127.0.0.1", 0), _FakeTritonHandler)
        self.states, self.ensembles, self.calls = states, ensembles, []
        self.fail_loads = 0
        self.keep_ensembles_down = False

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"


class _FakeTritonHandler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 - http.server's name
        srv: FakeTriton = self.server
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        parts = self.path.strip("/").split("/")
        status, body = 200, b""
        if self.path == "/v2/repository/index":
            body = json.dumps([{"name": n, "version": "1", "state": s} for n, s in srv.states.items()]).encode()
        else:
            model, action = parts[3], parts[4]
            srv.calls.append((action, model))
            if action == "unload":
                srv.states[model] = "UNAVAILABLE"
                for e in srv.ensembles.get(model, ()):
                    srv.states[e] = "UNAVAILABLE"
            elif srv.fail_loads > 0:
                srv.fail_loads -= 1
                status, body = 400, b'{"error":"failed to load"}'
            else:
                srv.states[model] = "READY"
                if not srv.keep_ensembles_down:
                    for e in srv.ensembles.get(model, ()):
                        srv.states[e] = "READY"
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_triton():
    servers = []

    def make(states, ensembles=None):
        srv = FakeTriton(states, ensembles or {})
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return srv

    yield make
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def _stub(pid: int, model: str = "encoder_image", instance: str | None = None, descendants=(),
          created: float = 1.0) -> StubProcess:
    return StubProcess(pid, model, instance or f"{model}_0_0", created, tuple(descendants))


class Scripted:
    """What list_stubs returns, poll by poll."""

    def __init__(self, *polls: list[StubProcess]):
        self.polls = list(polls)

    def __call__(self) -> list[StubProcess]:
        return self.polls.pop(0) if len(self.polls) > 1 else self.polls[0]


def _supervisor(stubs, triton: FakeTriton, **kw) -> tuple[StubSupervisor, list[str], list]:
    logs: list[str] = []
    killed: list = []
    sup = StubSupervisor(list_stubs=stubs, repository=TritonRepository(triton.url, timeout_s=2, load_timeout_s=5),
                         dependents=kw.pop("dependents", {}), exit_status=lambda pid: 9,
                         kill=lambda pid, t: killed.append((pid, t)) or True, log=logs.append, settle_s=0,
                         backoff_s=(0.01, 0.02), **kw)
    return sup, logs, killed


def test_a_dead_stub_of_a_ready_model_reloads_it_then_its_ensembles(fake_triton):
    triton = fake_triton({"encoder_image": "READY", "multimodal": "READY", "llm_decode": "READY"},
                         {"encoder_image": {"multimodal"}})
    triton.keep_ensembles_down = True  # so the supervisor has to load the ensemble itself
    clock = iter([100.0, 103.5])
    sup, logs, killed = _supervisor(
        Scripted([_stub(10, descendants=[(11, 5.0)]), _stub(20, "llm_decode")], [_stub(20, "llm_decode")]),
        triton, dependents={"encoder_image": {"multimodal"}}, clock=lambda: next(clock))
    sup.poll_once()
    assert triton.calls == []  # all alive
    sup.poll_once()
    assert triton.calls == [("unload", "encoder_image"), ("load", "encoder_image"), ("load", "multimodal")]
    assert killed == [(11, 5.0)]  # the dead stub's orphaned engine
    stats = sup.stats()["encoder_image"]
    assert stats["restarts"] == 1 and stats["last_restart_s"] == 3.5 and not stats["healing"]
    assert "stub encoder_image_0_0 (pid 10) killed by signal 9 (SIGKILL)" in stats["last_cause"]
    assert any("reloading encoder_image (then multimodal)" in line for line in logs), logs


def test_a_model_that_calls_the_dead_one_by_bls_is_unloaded_first_and_loaded_after(fake_triton):
    """Triton does not know BLS callers: left loaded, multimodal_bls would stay READY while llm_decode is down."""
    triton = fake_triton({"llm_decode": "READY", "multimodal_bls": "READY", "multimodal": "READY"},
                         {"llm_decode": {"multimodal"}})
    sup, logs, _ = _supervisor(Scripted([_stub(20, "llm_decode")], []), triton,
                               dependents={"llm_decode": {"multimodal"}},
                               bls_callers={"llm_decode": {"multimodal_bls"}})
    sup.poll_once()
    sup.poll_once()
    assert triton.calls == [("unload", "multimodal_bls"), ("unload", "llm_decode"), ("load", "llm_decode"),
                            ("load", "multimodal_bls")]
    assert triton.states == {"llm_decode": "READY", "multimodal_bls": "READY", "multimodal": "READY"}
    assert any("reloading llm_decode (then multimodal, multimodal_bls)" in line for line in logs), logs


def test_bls_callers_come_from_the_bls_calls_parameter(tmp_path):
    from mmtriton.supervisor import bls_callers

    assert bls_callers(REPO) == {k: {"multimodal_bls"} for k in
                                 ("encoder_image", "encoder_audio", "llm_prefill", "llm_decode")}
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.pbtxt").write_text(
        '# parameters { key: "bls_calls" value { string_value: "ghost" } }\n'
        'parameters { key: "bls_calls" value { string_value: "x, y" } }\n')
    assert bls_callers(tmp_path) == {"x": {"b"}, "y": {"b"}}


def test_ensembles_triton_brought_back_are_not_loaded_again(fake_triton):
    triton = fake_triton({"encoder_image": "READY", "multimodal": "READY"}, {"encoder_image": {"multimodal"}})
    sup, _, _ = _supervisor(Scripted([_stub(10)], []), triton, dependents={"encoder_image": {"multimodal"}})
    sup.poll_once()
    sup.poll_once()
    assert triton.calls == [("unload", "encoder_image"), ("load", "encoder_image")]


def test_no_reload_for_an_unload_in_progress_or_a_stub_replaced_by_a_new_one(fake_triton):
    triton = fake_triton({"encoder_image": "UNLOADING", "llm_decode": "READY"})
    sup, _, _ = _supervisor(Scripted([_stub(10), _stub(20, "llm_decode")], [_stub(21, "llm_decode", created=2.0)]),
                            triton)
    sup.poll_once()
    sup.poll_once()  # 10 gone while UNLOADING; 20 replaced by 21 for the same instance
    assert triton.calls == [] and sup.stats() == {}


def test_the_serving_stub_dying_beside_an_older_one_of_its_instance_is_a_crash(fake_triton):
    """Seen in the fault run: an old multimodal_bls stub Triton never finished unloading lived on beside the new
    one. When the new (serving) one was killed, the old one's same instance name read as "replaced" and the model
    stayed broken. Only a *newer* stub of the instance means a reload."""
    triton = fake_triton({"multimodal_bls": "READY"})
    old, new = _stub(30, "multimodal_bls", created=1.0), _stub(31, "multimodal_bls", created=2.0)
    sup, logs, _ = _supervisor(Scripted([old, new], [old]), triton)
    sup.poll_once()
    sup.poll_once()
    assert triton.calls == [("unload", "multimodal_bls"), ("load", "multimodal_bls")]
    assert "pid 31" in sup.stats()["multimodal_bls"]["last_cause"], logs


def test_a_superseded_stub_is_killed_after_the_grace_with_its_children(fake_triton):
    triton = fake_triton({"multimodal_bls": "READY"})
    old = _stub(30, "multimodal_bls", created=1.0, descendants=[(33, 1.5)])
    new = _stub(31, "multimodal_bls", created=2.0)
    now = [1000.0]
    sup, logs, killed = _supervisor(Scripted([old, new]), triton, clock=lambda: now[0], superseded_grace_s=300)
    sup.poll_once()
    now[0] += 299
    sup.poll_once()
    assert killed == []  # within the grace: it may still be finishing requests of the old version
    now[0] += 2
    sup.poll_once()
    assert killed == [(30, 1.0), (33, 1.5)] and triton.calls == []  # the serving stub is left alone
    assert any("pid 30" in line and "still running: killed" in line for line in logs), logs


def test_failed_reloads_back_off_and_are_counted(fake_triton):
    triton = fake_triton({"encoder_image": "READY"})
    triton.fail_loads = 2
    sup, logs, _ = _supervisor(Scripted([_stub(10)], []), triton)
    sup.poll_once()
    sup.poll_once()
    assert triton.calls == [("unload", "encoder_image"), ("load", "encoder_image")] * 3
    stats = sup.stats()["encoder_image"]
    assert stats["failed_attempts"] == 2 and stats["restarts"] == 1
    assert [line.rsplit(" ", 2)[-2] for line in logs if "next try in" in line] == ["0.01", "0.02"]


def test_an_unreachable_server_keeps_the_dead_stub_for_the_next_poll(fake_triton):
    triton = fake_triton({"encoder_image": "READY"})
    sup, logs, _ = _supervisor(Scripted([_stub(10)], []), triton)
    sup.poll_once()
    good = sup.repository.base
    sup.repository.base = "http://127.0.0.1:1"  # nothing listens there
    sup.poll_once()
    assert triton.calls == [] and any("will look again" in line for line in logs)
    sup.repository.base = good
    sup.poll_once()
    assert triton.calls == [("unload", "encoder_image"), ("load", "encoder_image")]


def test_the_thread_heals_within_a_poll_and_stops(fake_triton):
    triton = fake_triton({"encoder_image": "READY"})
    alive = [[_stub(10)]]
    sup, _, _ = _supervisor(lambda: alive[0], triton, poll_s=0.05)
    sup.start()
    try:
        alive[0] = []
        _wait(lambda: sup.stats().get("encoder_image", {}).get("restarts") == 1, timeout_s=5)
    finally:
        sup.stop()
    assert sup._thread is None

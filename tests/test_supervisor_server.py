"""The launcher heals a model whose stub was killed (Triton 2.51 does not), tells the truth about readiness
meanwhile, and shows the first real error when a model cannot start. One encoder_image server (starts in seconds)
plus two tiny Python-backend repositories written here."""

from __future__ import annotations

import base64
import json
import textwrap
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from conftest import ROOT, free_port, pattern_image, png_bytes
from mmtriton.server import ServerConfig, ServerError, TritonServer
from mmtriton.supervisor import list_stubs

pytestmark = pytest.mark.integration

RECOVERY_LIMIT_S = 60.0  # measured: ~3 s for encoder_image, ~2 s for the tiny model


def _config(repository: Path, log_name: str, models: list[str] | None, env: dict[str, str] | None = None):
    return ServerConfig(model_repository=repository, http_port=free_port(), grpc_port=free_port(),
                        metrics_port=free_port(), models=models, log_file=ROOT / "logs" / log_name, env=env or {})


def _http(server: TritonServer, method: str, path: str, body: dict | None = None, timeout_s: float = 10.0):
    """(status, parsed body) of one call; the timeout makes a hang a failure instead of a stuck test."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://{server.config.http_url}{path}", data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as r:
            raw = r.read()
            return r.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        return exc.code, json.loads(raw) if raw else None
    except (urllib.error.URLError, OSError) as exc:  # a timeout, a reset connection: no HTTP answer at all
        return type(exc).__name__, str(exc)


def _ready(server: TritonServer, model: str | None = None) -> int:
    return _http(server, "GET", f"/v2/models/{model}/ready" if model else "/v2/health/ready", timeout_s=5)[0]


def _left_running(pids: set[int] | list[int], within_s: float = 5.0) -> list[int]:
    """Those of ``pids`` still running (not gone, not a zombie) after ``within_s``."""
    deadline = time.monotonic() + within_s
    while True:
        running = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    running.append(pid)
            except psutil.NoSuchProcess:
                pass
        if not running or time.monotonic() > deadline:
            return running
        time.sleep(0.2)


def _stub_of(server: TritonServer, model: str) -> psutil.Process:
    stubs = [s for s in list_stubs(server.process.pid) if s.model == model]
    assert len(stubs) == 1, stubs
    return psutil.Process(stubs[0].pid)


def _wait_back(server: TritonServer, model: str, old_pid: int, t0: float) -> float:
    """Seconds from t0 until the supervisor counted a restart of ``model`` and a new stub serves it."""
    deadline = t0 + RECOVERY_LIMIT_S
    while time.monotonic() < deadline:
        stats = server.supervisor.stats().get(model, {})
        if stats.get("restarts") == 1 and not stats["healing"]:
            new = [s for s in list_stubs(server.process.pid) if s.model == model]
            if new and new[0].pid != old_pid:
                return time.monotonic() - t0
        time.sleep(0.1)
    raise AssertionError(f"{model} not restarted within {RECOVERY_LIMIT_S} s: {server.supervisor.stats()}")


class _Sampler:
    """Readiness (server, model, ensemble) every 0.1 s in a thread, as the changes it saw."""

    def __init__(self, server: TritonServer, models: list[str]):
        self.server, self.models, self.seen, self._stop = server, models, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            state = tuple([_ready(self.server)] + [_ready(self.server, m) for m in self.models])
            if not self.seen or self.seen[-1] != state:
                self.seen.append(state)
            time.sleep(0.1)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)


# ---------------------------------------------------------------- encoder_image: the real model


@pytest.fixture(scope="module")
def encoder_server(tiny_models):
    config = _config(ROOT / "model_repository", "test-supervisor-tritonserver.log", ["encoder_image"],
                     {"MMT_MODEL": str(tiny_models["qwen2-vl"])})
    server = TritonServer(config)
    server.start()
    try:
        server.wait_ready(timeout_s=300)
        yield server
    finally:
        t = time.monotonic()
        server.stop()
        stopped_s = time.monotonic() - t
    print(f"encoder server stopped in {stopped_s:.1f} s")
    assert stopped_s < 15 and not _left_running(STUBS_SEEN), STUBS_SEEN


STUBS_SEEN: set[int] = set()  # stub pids of the encoder server, dead or alive, for the after-stop check


def _encode(server: TritonServer, image_uri: str, timeout_s: float = 20.0):
    body = {"inputs": [{"name": "image_url", "shape": [1, 1], "datatype": "BYTES", "data": [image_uri]}]}
    return _http(server, "POST", "/v2/models/encoder_image/infer", body, timeout_s)


def _descriptor_shape(answer: dict) -> tuple[list[int], str, int]:
    (out,) = answer["outputs"]
    desc = json.loads(out["data"][0])
    return desc["shape"], desc["dtype"], desc["nbytes"]


def test_killed_encoder_stub_is_reloaded_and_encodes_again(encoder_server):
    server = encoder_server
    assert "--model-control-mode=explicit" in server.command() and server.supervisor is not None
    uri = "data:image/png;base64," + base64.b64encode(png_bytes(pattern_image(100, 80, seed=1))).decode()
    status, before = _encode(server, uri)
    assert status == 200, before

    stub = _stub_of(server, "encoder_image")
    with _Sampler(server, ["encoder_image"]) as sampler:
        t0 = time.monotonic()
        stub.kill()  # by its exact pid, found under this server's tritonserver
        outage = []
        while server.supervisor.stats().get("encoder_image", {}).get("restarts", 0) == 0:
            t = time.monotonic()
            status, answer = _encode(server, uri, timeout_s=10)
            if status == 200 and outage:
                # Back: the supervisor loads the model first and counts the restart only after reloading what
                # depends on it, so an answer can come in between. The outage is what came before it.
                break
            outage.append((status, time.monotonic() - t, answer))
            if time.monotonic() - t0 > RECOVERY_LIMIT_S:
                break
            time.sleep(0.2)
        recovered_s = _wait_back(server, "encoder_image", stub.pid, t0)
        time.sleep(0.3)
    print(f"encoder_image back {recovered_s:.1f} s after the kill; readiness seen: {sampler.seen}; "
          f"outage answers: {[(s, round(d, 2)) for s, d, _ in outage]}")

    # While it was down, no request got a result; they got an error within a few seconds: "not healthy" (500)
    # from the dead stub, then "no available versions" (404) during the reload. Known Triton 2.51 gap: the one
    # request still executing on the dead instance when the supervisor unloads it never gets an answer (seen
    # with encoder_image, not with the tiny model below), so at most one request may end on the client timeout.
    assert outage and all(s != 200 for s, _, _ in outage), outage
    answered = [(s, d) for s, d, _ in outage if isinstance(s, int)]
    # Each "not healthy" takes Triton ~1 s (one health-check wait per try); under a loaded CI run one took 9.5 s.
    assert len(outage) - len(answered) <= 1 and all(d < 15 for _, d in answered), outage
    assert outage[0][0] == 500 and "is not healthy" in outage[0][2]["error"], outage[0]
    # Triton itself said not ready while the supervisor reloaded the model, then ready again.
    assert (400, 400) in sampler.seen and sampler.seen[-1] == (200, 200), sampler.seen
    stats = server.supervisor.stats()["encoder_image"]
    assert "killed by signal 9 (SIGKILL)" in stats["last_cause"] and stats["last_restart_s"] < RECOVERY_LIMIT_S
    # The model encodes the same image the same way. (The dead stub stays a zombie while the request that never
    # got its answer holds the old version; the fixture checks nothing is left after stop.)
    STUBS_SEEN.update([stub.pid, *(s.pid for s in list_stubs(server.process.pid))])
    status, after = _encode(server, uri)
    assert status == 200, after
    assert _descriptor_shape(after) == _descriptor_shape(before)


# ---------------------------------------------------------------- tiny repositories written here


def _python_model(root: Path, name: str, body: str) -> None:
    (root / name / "1").mkdir(parents=True)
    (root / name / "config.pbtxt").write_text(textwrap.dedent(f"""
        name: "{name}"
        backend: "python"
        max_batch_size: 0
        input [ {{ name: "x", data_type: TYPE_FP32, dims: [ -1 ] }} ]
        output [ {{ name: "y", data_type: TYPE_FP32, dims: [ -1 ] }} ]
        instance_group [ {{ count: 1, kind: KIND_CPU }} ]
        """))
    (root / name / "1" / "model.py").write_text(textwrap.dedent(body))


DOUBLE = """
    import triton_python_backend_utils as pb_utils

    class TritonPythonModel:
        def execute(self, requests):
            return [pb_utils.InferenceResponse([pb_utils.Tensor(
                "y", pb_utils.get_input_tensor_by_name(r, "x").as_numpy() * 2)]) for r in requests]
    """

ENSEMBLE = """
name: "twice"
platform: "ensemble"
max_batch_size: 0
input [ { name: "x", data_type: TYPE_FP32, dims: [ -1 ] } ]
output [ { name: "y", data_type: TYPE_FP32, dims: [ -1 ] } ]
ensemble_scheduling { step [ { model_name: "double" model_version: -1
  input_map { key: "x" value: "x" } output_map { key: "y" value: "y" } } ] }
"""

X = {"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1, 2]}]}


def test_ensemble_over_a_killed_stub_comes_back_with_it(tmp_path):
    """No --models: every model directory is loaded (explicit control); a killed composing model is reloaded
    and Triton brings its ensemble back too."""
    _python_model(tmp_path, "double", DOUBLE)
    (tmp_path / "twice" / "1").mkdir(parents=True)
    (tmp_path / "twice" / "config.pbtxt").write_text(ENSEMBLE)
    server = TritonServer(_config(tmp_path, "test-supervisor-tiny.log", None))
    server.start()
    try:
        server.wait_ready(timeout_s=60)
        assert _http(server, "POST", "/v2/models/twice/infer", X)[1]["outputs"][0]["data"] == [2.0, 4.0]
        stub = _stub_of(server, "double")
        with _Sampler(server, ["double", "twice"]) as sampler:
            t0 = time.monotonic()
            stub.kill()
            recovered_s = _wait_back(server, "double", stub.pid, t0)
            time.sleep(0.3)
        print(f"double back after {recovered_s:.1f} s; readiness (server, double, twice): {sampler.seen}")
        assert (400, 400, 400) in sampler.seen and sampler.seen[-1] == (200, 200, 200), sampler.seen
        assert _http(server, "POST", "/v2/models/twice/infer", X)[1]["outputs"][0]["data"] == [2.0, 4.0]
        stubs = [s.pid for s in list_stubs(server.process.pid)]
    finally:
        t = time.monotonic()
        server.stop()
        stopped_s = time.monotonic() - t
    assert stopped_s < 15 and not _left_running(stubs)


def test_failed_start_shows_the_first_real_error(tmp_path):
    _python_model(tmp_path, "broken", """
        class TritonPythonModel:
            def initialize(self, args):
                raise ValueError("broken on purpose: no weights here")
        """)
    server = TritonServer(_config(tmp_path, "test-supervisor-broken.log", None))
    server.start()
    try:
        with pytest.raises(ServerError) as info:
            server.wait_ready(timeout_s=60)
    finally:
        server.stop()
    first_line = str(info.value).splitlines()[0]
    assert first_line.startswith("tritonserver exited with code 1 during start: failed to load 'broken' version 1")
    assert "ValueError: broken on purpose: no weights here" in first_line
    assert "broken/1/model.py(4): initialize" in first_line

"""Launcher for a real ``tritonserver``: find it, prepare it, start it, wait for it, stop it.

The server binary comes from the ``nvidia-pytriton`` wheel (Triton 2.51). Three things make its Python
backend run this project's environment (see docs/triton-2.51.md):
- the 3.11 backend stub is copied next to the Python backend;
- the stub takes its interpreter from the first ``python3`` on PATH, so the venv's ``bin`` goes first;
- the stub links the system libpython, so LD_LIBRARY_PATH points at this interpreter's LIBDIR.
Used by ``python -m mmtriton.server`` (the serve command) and by the test fixtures.
"""

from __future__ import annotations

import argparse
import filecmp
import importlib.util
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from mmtriton.process_session import popen_session_kwargs, set_autogroup_nice
from mmtriton.settings import repo_root
from mmtriton.supervisor import StubSupervisor, TritonRepository, bls_callers, ensemble_dependents, list_stubs


class ServerError(RuntimeError):
    pass


def triton_home() -> Path:
    """The ``pytriton/tritonserver`` folder of the installed nvidia-pytriton wheel."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ServerError("nvidia-pytriton is not installed: run bin/setup")
    home = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
    if not (home / "bin" / "tritonserver").exists():
        raise ServerError(f"no tritonserver binary under {home}")
    return home


def install_python_stub(home: Path | None = None) -> Path:
    """Copy the stub matching this Python next to the Python backend (idempotent)."""
    home = home or triton_home()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    src = home / "python_backend_stubs" / version / "triton_python_backend_stub"
    dst = home / "backends" / "python" / "triton_python_backend_stub"
    if not src.exists():
        raise ServerError(f"nvidia-pytriton ships no Python backend stub for Python {version}")
    if not dst.exists() or not filecmp.cmp(src, dst, shallow=False):
        shutil.copy2(src, dst)
    return dst


def stub_environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment tritonserver (and so every stub) must start with."""
    env = dict(os.environ if base is None else base)
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([venv_bin, env.get("PATH", "")])
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in [libdir, env.get("LD_LIBRARY_PATH", "")] if p)
    env.setdefault("LANG", "C.UTF-8")
    env.setdefault("LC_ALL", "C.UTF-8")
    # The stub ignores PYTHONPATH: the venv's mmtriton.pth (bin/setup) puts src/ on its path. PYTHONPATH still
    # serves processes started from the stub environment with another interpreter.
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(repo_root() / "src"), env.get("PYTHONPATH", "")] if p)
    return env


@dataclass
class ServerConfig:
    model_repository: Path = field(default_factory=lambda: repo_root() / "model_repository")
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    log_file: Path | None = None
    log_verbose: int = 0
    # Load only these models; None loads every model directory of the repository. Model control is always
    # explicit, so the repository API (load/unload) works: the stub supervisor reloads models through it.
    models: list[str] | None = None
    env: dict[str, str] = field(default_factory=dict)
    # Seconds tritonserver waits at shutdown for in-flight requests and open connections, then for models to
    # unload (its default, 60, made Ctrl-C take ~65 s with a client connected).
    exit_timeout_s: int = 5
    # Watch the stubs and reload a model whose stub died (mmtriton.supervisor); started once the server is ready.
    supervise_stubs: bool = True
    # None: tritonserver runs in the caller's session (one scheduler autogroup with its clients; see
    # mmtriton.process_session). N: a session of its own whose autogroup gets nice N, so that clients in other
    # sessions of this machine are not starved by the engines.
    session_nice: int | None = None

    def model_names(self) -> list[str]:
        return list(self.models) if self.models is not None else repository_models(self.model_repository)

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"


def repository_models(repository: Path) -> list[str]:
    """Every model directory (one with a config.pbtxt) of ``repository``."""
    return sorted(p.parent.name for p in repository.glob("*/config.pbtxt")) if repository.is_dir() else []


# Errors tritonserver logs on every CPU-only start: never the reason it stopped.
_BENIGN_ERRORS = ("CudaDriverHelper has not been initialized", "unable to create stream for")
_LOG_LINE = re.compile(r'^([EWI])\d{4} [\d:.]+ +\d+ [\w.]+:\d+\] "?(.*?)"?$')


def first_log_error(text: str) -> str | None:
    """The first real error of a tritonserver log: a model that failed to load (with the model.py line its
    traceback points at), else the first other E-line that is not CPU-only noise, else tritonserver's own
    ``error: ...`` line. Not what comes after, such as a stub's segfault backtrace during the shutdown."""
    lines = text.splitlines()
    errors: list[str] = []
    for line in lines:
        m = _LOG_LINE.match(line)
        if not m or m.group(1) != "E":
            continue
        # Triton 2.51 quotes each message and escapes its newlines.
        message = m.group(2).replace("\\n", "\n").replace('\\"', '"')
        if any(noise in message for noise in _BENIGN_ERRORS):
            continue
        errors.append(message)
    failed = [e for e in errors if e.startswith("failed to load")]
    chosen = failed[0] if failed else (errors[0] if errors else None)
    if chosen is None:
        return next((ln for ln in lines if ln.startswith("error: ")), None)
    head, _, trace = chosen.partition("\n\nAt:\n")
    frames = [f.strip() for f in trace.splitlines() if f.strip()]
    # The innermost frame is the first one listed (python_backend prints "At:" innermost first).
    return head.strip() + (f" (at {frames[0]})" if frames else "")


def stop_process_group(proc: subprocess.Popen, timeout_s: float, *, interrupt_group: bool) -> None:
    """SIGINT (to the whole process group, or to its leader only), up to ``timeout_s`` for a graceful exit, then
    SIGKILL to whatever of the group is left (children such as engine processes can outlive their parent)."""
    if proc.poll() is None:
        try:
            if interrupt_group:
                os.killpg(proc.pid, signal.SIGINT)
            else:
                proc.send_signal(signal.SIGINT)
            proc.wait(timeout=timeout_s)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


class TritonServer:
    """One tritonserver process. Use as a context manager or call start()/wait_ready()/stop()."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.process: subprocess.Popen | None = None
        self._log_handle = None
        # Set once the server is ready (wait_ready), when config.supervise_stubs.
        self.supervisor: StubSupervisor | None = None

    def command(self) -> list[str]:
        home = triton_home()
        c = self.config
        cmd = [
            str(home / "bin" / "tritonserver"),
            f"--model-repository={c.model_repository}",
            f"--backend-directory={home / 'backends'}",
            f"--cache-directory={home / 'caches'}",
            f"--http-address={c.host}",
            f"--grpc-address={c.host}",
            f"--metrics-address={c.host}",
            f"--http-port={c.http_port}",
            f"--grpc-port={c.grpc_port}",
            f"--metrics-port={c.metrics_port}",
            "--allow-gpu-metrics=false",
            "--allow-cpu-metrics=true",
            f"--log-verbose={c.log_verbose}",
            # Shutdown only: how long to wait for in-flight requests / connections and model unloads.
            f"--exit-timeout-secs={c.exit_timeout_s}",
            "--model-control-mode=explicit",
        ]
        cmd += [f"--load-model={m}" for m in c.model_names()]
        return cmd

    def start(self) -> None:
        if self.process is not None:
            raise ServerError("server already started")
        install_python_stub()
        _check_port_free(self.config.host, [self.config.http_port, self.config.grpc_port, self.config.metrics_port])
        env = stub_environment()
        # The key our prefill signs KV hand-overs with (mmtriton.wire): fresh for every server.
        env.setdefault("MMT_PIPELINE_SECRET", secrets.token_hex(32))
        if self.config.supervise_stubs:
            # A dead engine ends its stub and the supervisor reloads the model: not ready until it is back.
            env.setdefault("MMT_ENGINE_ON_DEATH", "exit")
        env.update(self.config.env)
        log_file = self.config.log_file or (repo_root() / "logs" / "tritonserver.log")
        log_file.parent.mkdir(parents=True, exist_ok=True)
        self.config.log_file = log_file
        self._log_handle = open(log_file, "wb")  # noqa: SIM115 - lives as long as the process
        # Own process group, so stop() reaches the stubs and vLLM's engine processes too.
        # stdin: in the caller's session but not its foreground group, a read from the terminal would stop it.
        self.process = subprocess.Popen(self.command(), stdout=self._log_handle, stderr=subprocess.STDOUT, env=env,
                                        stdin=subprocess.DEVNULL, **popen_session_kwargs(self.config.session_nice))
        if self.config.session_nice is not None:
            why_not = set_autogroup_nice(self.process.pid, self.config.session_nice)
            if why_not is not None:
                print(f"mmtriton.server: session nice not applied: {why_not}", file=sys.stderr, flush=True)

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.config.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout_s: float = 600.0, progress: bool = False) -> float:
        """Block until the server reports ready; returns seconds waited. Raises with the log tail on failure."""
        assert self.process is not None, "start() first"
        t0 = time.monotonic()
        last_report = t0
        while True:
            if self.process.poll() is not None:
                raise ServerError(self._start_failure())
            if self.is_ready():
                if self.config.supervise_stubs and self.supervisor is None:
                    self.start_supervisor()
                return time.monotonic() - t0
            now = time.monotonic()
            if now - t0 > timeout_s:
                self.stop()
                raise ServerError(f"tritonserver not ready after {timeout_s:.0f} s\n{self.log_tail()}")
            if progress and now - last_report >= 10:
                last_report = now
                print(f"  … waiting for models to load ({now - t0:.0f} s): {self._last_log_line()}", flush=True)
            time.sleep(0.5)

    def start_supervisor(self, log=None) -> StubSupervisor:
        """Watch this server's stubs; a model whose stub dies is reloaded (see mmtriton.supervisor)."""
        assert self.process is not None, "start() first"
        if self.supervisor is None:
            server_pid = self.process.pid
            self.supervisor = StubSupervisor(
                list_stubs=lambda: list_stubs(server_pid),
                repository=TritonRepository(self.config.http_url),
                dependents=ensemble_dependents(self.config.model_repository),
                bls_callers=bls_callers(self.config.model_repository),
                log=log or (lambda message: print(message, file=sys.stderr, flush=True)),
            )
            self.supervisor.start()
        return self.supervisor

    def _start_failure(self) -> str:
        """Why the server stopped during its start: the first real error of the log, then the log up to it."""
        code = self.process.returncode if self.process else None
        text = self.config.log_file.read_text(errors="replace") if self.config.log_file else ""
        error = first_log_error(text)
        if error is None:
            return f"tritonserver exited with code {code}\n{self.log_tail()}"
        lines = text.splitlines()
        # The log up to that error: what follows it (unloads, a stub's segfault backtrace) is its consequence.
        marker = error.split("\n", 1)[0][:60]
        upto = next((i for i, ln in enumerate(lines) if marker in ln.replace("\\n", "\n")), len(lines) - 1)
        context = "\n".join(["---- tritonserver log tail ----", *lines[max(0, upto - 15):upto + 1]])
        return (f"tritonserver exited with code {code} during start: {error}\n"
                f"(whole log: {self.config.log_file})\n{context}")

    def log_tail(self, lines: int = 60) -> str:
        if not self.config.log_file or not self.config.log_file.exists():
            return ""
        text = self.config.log_file.read_text(errors="replace").splitlines()
        return "\n".join(["---- tritonserver log tail ----", *text[-lines:]])

    def _last_log_line(self) -> str:
        tail = self.log_tail(1).splitlines()
        return tail[-1][:160] if len(tail) > 1 else ""

    def stop(self, timeout_s: float | None = None) -> int | None:
        """SIGINT to tritonserver (graceful: models' finalize shuts their engines down), then SIGKILL to the
        whole group after ``timeout_s`` (default: its exit timeout + 5 s). Not SIGINT to the group: engine
        processes would die under their models, whose watchdogs would then restart them during the shutdown.
        The supervisor stops first, so the stubs' exit is not taken for a crash."""
        if self.supervisor is not None:
            self.supervisor.stop()
            self.supervisor = None
        proc, self.process = self.process, None
        if proc is None:
            return None
        stop_process_group(proc, self.config.exit_timeout_s + 5 if timeout_s is None else timeout_s,
                           interrupt_group=False)
        if self._log_handle:
            self._log_handle.close()
            self._log_handle = None
        return proc.returncode

    def __enter__(self) -> TritonServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _check_port_free(host: str, ports: list[int]) -> None:
    import socket

    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError as exc:
                raise ServerError(f"port {host}:{port} is in use ({exc}); choose other ports") from exc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmtriton.server", description="Serve the model repository.")
    parser.add_argument("--model-repository", type=Path, default=repo_root() / "model_repository")
    parser.add_argument("--model", default=os.environ.get("MMT_MODEL", ""),
                        help="checkpoint directory (default: the embedded tiny Qwen2-VL, built if missing)")
    parser.add_argument("--tiny", default="qwen2-vl", metavar="FAMILY",
                        help="without --model: which embedded tiny model to serve (built if missing): qwen2-vl "
                             "(image, video), qwen2-audio (audio), qwen2.5-omni (image + audio + video, "
                             "multimodal_agg)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--models", nargs="*", default=None, help="load only these models (default: all)")
    parser.add_argument("--log-verbose", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for readiness")
    parser.add_argument("--openai-port", type=int, default=9000,
                        help="also serve the OpenAI-compatible API (mmtriton.openai_server) here; 0: don't")
    parser.add_argument("--session-nice", type=int, default=None, metavar="N",
                        help="run tritonserver in a session of its own with scheduler autogroup nice N (0..19), "
                             "so that clients started in other sessions of this machine (another terminal) are "
                             "not held up by the engines; default: tritonserver shares this command's session "
                             "(docs/streaming.md)")
    args = parser.parse_args(argv)

    env: dict[str, str] = {}
    if args.model:
        env["MMT_MODEL"] = str(Path(args.model).resolve())
    else:
        from mmtriton.tiny_models import BUILDERS, ensure_tiny_models

        if args.tiny not in BUILDERS:
            parser.error(f"--tiny {args.tiny!r}: one of {', '.join(BUILDERS)}")
        print(f"No --model given: using the embedded tiny {args.tiny}.", flush=True)
        paths = ensure_tiny_models(progress=True)
        env["MMT_MODEL"] = str(paths[args.tiny])

    config = ServerConfig(
        model_repository=args.model_repository, host=args.host, http_port=args.http_port,
        grpc_port=args.grpc_port, metrics_port=args.metrics_port, models=args.models,
        log_verbose=args.log_verbose, env=env, session_nice=args.session_nice,
    )
    server = TritonServer(config)
    openai = None
    if args.openai_port:
        from mmtriton.openai_server import OpenAIServerConfig, OpenAIServerProcess

        _check_port_free(args.host, [args.openai_port])
        openai = OpenAIServerProcess(
            OpenAIServerConfig(triton_url=config.grpc_url, host=args.host, port=args.openai_port),
            log_file=(config.log_file or repo_root() / "logs" / "tritonserver.log").with_name("openai-server.log"),
        )
    print(f"Starting tritonserver (log: {config.log_file or repo_root() / 'logs' / 'tritonserver.log'}) …", flush=True)
    server.start()
    config.supervise_stubs = False  # started below with a log that goes to this terminal
    stopping = False

    def _on_signal(signum, _frame):
        nonlocal stopping
        if not stopping:
            stopping = True
            raise KeyboardInterrupt

    # Both explicitly: a shell starting us in the background leaves SIGINT ignored, and Python then never
    # raises KeyboardInterrupt.
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    # The terminal closing: stop the servers too (they share its session but not its foreground group).
    signal.signal(signal.SIGHUP, _on_signal)
    try:
        waited = server.wait_ready(args.timeout, progress=True)
        server.start_supervisor(log=lambda message: print(message, flush=True))
        if openai is not None:
            openai.start()
            openai.wait_ready()
        print(_ready_banner(config, waited, openai.base_url if openai else None), flush=True)
        while server.process is not None and server.process.poll() is None:
            time.sleep(1)
        print(server.log_tail(), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nStopping tritonserver …", flush=True)
        return 0
    except ServerError as exc:
        print(exc, file=sys.stderr)
        return 1
    finally:
        if server.supervisor is not None and server.supervisor.stats():
            print(f"Stub restarts: {server.supervisor.stats()}", flush=True)
        # Both at once: each may take its whole grace period with clients still connected.
        stopping_openai = threading.Thread(target=openai.stop) if openai is not None else None
        if stopping_openai is not None:
            stopping_openai.start()
        server.stop()
        if stopping_openai is not None:
            stopping_openai.join()


def _ready_banner(c: ServerConfig, waited: float, openai_url: str | None) -> str:
    openai = "" if openai_url is None else f"""
OpenAI-compatible API: {openai_url} (log: logs/openai-server.log)
  curl -s {openai_url}/chat/completions -H 'Content-Type: application/json' \\
       -d '{{"model": "multimodal_agg", "messages": [{{"role": "user", "content": "Hello"}}], "max_tokens": 16}}'"""
    return f"""
tritonserver is ready after {waited:.0f} s: HTTP {c.http_url}, gRPC {c.grpc_url}, metrics {c.host}:{c.metrics_port}
Send a request:
  .venv/bin/python -m client --url {c.grpc_url} "Describe the image." --image tests/data/pattern.png
  curl -s -X POST http://{c.http_url}/v2/models/multimodal_agg/generate \\
       -d '{{"text_input": "Hello", "sampling_parameters": "{{\\"max_tokens\\": 16}}"}}'{openai}
Ctrl-C stops the servers.
"""


if __name__ == "__main__":
    sys.exit(main())

"""The OpenAI-compatible server's configuration, and the server as a child process.

:class:`OpenAIServerProcess` runs ``python -m mmtriton.openai_server`` (see :mod:`mmtriton.openai_server`) for
the launcher, the tests and the benchmarks; it needs none of the server's own dependencies.
"""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from mmtriton.process_session import popen_session_kwargs

CONTRACT_MODELS = ["multimodal_agg", "multimodal", "multimodal_bls"]


@dataclass
class OpenAIServerConfig:
    triton_url: str = "127.0.0.1:8001"
    host: str = "127.0.0.1"
    port: int = 9000
    # Triton models offered as OpenAI models (those that follow the public contract), when Triton has them ready.
    models: list[str] = field(default_factory=lambda: list(CONTRACT_MODELS))
    # max_tokens when a request gives neither max_tokens nor max_completion_tokens.
    default_max_tokens: int = 256
    # Whole-request limit (Triton stream deadline); a request past it answers 504.
    request_timeout_s: float = 600.0
    # gRPC channels to Triton shared by all requests (each carries many concurrent streams).
    grpc_channels: int = 2
    max_body_bytes: int = 64 * 1024 * 1024
    # How long the list of ready Triton models is trusted before asking Triton again.
    model_list_ttl_s: float = 5.0
    log_level: str = "info"


class OpenAIServerProcess:
    """``python -m mmtriton.openai_server`` as a child process: for the launcher, the tests and the benchmarks."""

    def __init__(self, config: OpenAIServerConfig, log_file: Path | None = None):
        self.config = config
        self.log_file = log_file
        self.process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.config.host}:{self.config.port}/v1"

    def command(self) -> list[str]:
        c = self.config
        return [sys.executable, "-m", "mmtriton.openai_server", "--triton-url", c.triton_url, "--host", c.host,
                "--port", str(c.port), "--models", ",".join(c.models), "--default-max-tokens",
                str(c.default_max_tokens), "--request-timeout", str(c.request_timeout_s),
                "--grpc-channels", str(c.grpc_channels), "--log-level", c.log_level]

    def start(self) -> None:
        out = subprocess.DEVNULL
        if self.log_file is not None:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            out = open(self.log_file, "w")  # noqa: SIM115 - the child owns it from here
        self.process = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        **popen_session_kwargs())

    def wait_ready(self, timeout_s: float = 60.0, triton_ready: bool = True) -> None:
        """Until /health answers (200 if ``triton_ready``: Triton behind it is ready too)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"the OpenAI server exited with {self.process.returncode}; log: {self.log_file}")
            try:
                with urllib.request.urlopen(f"http://{self.config.host}:{self.config.port}/health", timeout=5):
                    return
            except urllib.error.HTTPError:
                if not triton_ready:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"the OpenAI server was not ready within {timeout_s:.0f} s; log: {self.log_file}")

    def stop(self, timeout_s: float = 15.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout_s)

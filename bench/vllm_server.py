"""vLLM's own OpenAI server (``python -m vllm.entrypoints.openai.api_server``) as a child process: the reference
the benchmarks measure our paths against. Built like ``mmtriton.openai_server.OpenAIServerProcess``.

    with VllmOpenAIServerProcess(model, free_port(), extra_args=TINY_MODEL_ARGS) as vllm:
        send(vllm.base_url, ...)
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

from mmtriton.process_session import popen_session_kwargs
from mmtriton.server import stop_process_group

# The tiny models as our engines run them: the checkpoint's float32 (vLLM would choose bf16 on CPU), no CUDA
# graphs, the server's max_model_len (mmtriton.settings) and a fixed seed.
TINY_MODEL_ARGS = ("--dtype", "float32", "--enforce-eager", "--max-model-len", "4096", "--seed", "0")

# A 1 GiB KV cache is plenty for the tiny models (vLLM's CPU default is 4 GiB); no usage reports.
DEFAULT_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1"}


class VllmOpenAIServerProcess:
    """One vLLM OpenAI server in its own process group; ``with`` starts it, waits until ready and stops it."""

    def __init__(self, model: str | Path, port: int, *, served_model_name: str | None = None,
                 extra_args: Sequence[str] = (), log_file: Path | None = None, host: str = "127.0.0.1",
                 env: Mapping[str, str] | None = None, ready_timeout_s: float = 600.0):
        self.model = str(model)
        self.port = port
        # None: vLLM serves the model under its path (--model).
        self.served_model_name = served_model_name
        self.extra_args = list(extra_args)
        self.log_file = log_file
        self.host = host
        self.env = {**DEFAULT_ENV, **(env or {})}
        self.ready_timeout_s = ready_timeout_s  # for ``with``
        self.process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model]
        if self.served_model_name is not None:
            cmd += ["--served-model-name", self.served_model_name]
        return [*cmd, "--host", self.host, "--port", str(self.port), *self.extra_args]

    def start(self) -> None:
        if self.process is not None:
            raise RuntimeError("vLLM's OpenAI server already started")
        out = subprocess.DEVNULL
        if self.log_file is not None:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            out = open(self.log_file, "wb")  # noqa: SIM115 - closed below, once the child has its own copy
        try:
            # Own process group (stop() reaches vLLM's engine core processes too) in our session, as our own
            # servers are (mmtriton.process_session): the same scheduling for the yardstick.
            self.process = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env={**os.environ, **self.env},
                                            **popen_session_kwargs())
        finally:
            if out is not subprocess.DEVNULL:
                out.close()

    def wait_ready(self, timeout_s: float = 600.0) -> float:
        """Until /health answers 200 (vLLM opens its port only once the engine is up); returns seconds waited.
        Raises, with the log's tail, as soon as the server exits or when the time is up."""
        assert self.process is not None, "start() first"
        t0 = time.monotonic()
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"vLLM's OpenAI server exited with code {self.process.returncode}; "
                                   f"log: {self.log_file}\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"http://{self.host}:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return time.monotonic() - t0
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() - t0 > timeout_s:
                raise TimeoutError(f"vLLM's OpenAI server was not ready within {timeout_s:.0f} s; "
                                   f"log: {self.log_file}\n{self.log_tail()}")
            time.sleep(0.5)

    def log_tail(self, lines: int = 40) -> str:
        if self.log_file is None or not self.log_file.exists():
            return ""
        text = self.log_file.read_text(errors="replace").splitlines()
        return "\n".join([f"---- {self.log_file} (tail) ----", *text[-lines:]])

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGINT to the process group (a graceful shutdown), then SIGKILL to whatever of the group is left:
        the engine core processes can outlive the API server."""
        proc, self.process = self.process, None
        if proc is not None:
            stop_process_group(proc, timeout_s, interrupt_group=True)

    def __enter__(self) -> VllmOpenAIServerProcess:
        self.start()
        try:
            self.wait_ready(self.ready_timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

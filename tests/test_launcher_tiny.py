"""The server launcher's pieces (no server started here) and the tiny-model builder's determinism."""

from __future__ import annotations

import socket
import sys
import sysconfig
from pathlib import Path

import pytest

from mmtriton.server import ServerConfig, ServerError, TritonServer, install_python_stub, stub_environment, triton_home
from mmtriton.tiny_models import build_all, tree_digest


def test_stub_is_installed_next_to_the_python_backend():
    stub = install_python_stub()
    assert stub == triton_home() / "backends" / "python" / "triton_python_backend_stub"
    assert stub.stat().st_size > 0 and install_python_stub() == stub  # idempotent


def test_stub_environment_puts_this_venv_and_libpython_first():
    env = stub_environment({"PATH": "/usr/bin", "LD_LIBRARY_PATH": "/x"})
    assert env["PATH"].split(":")[0] == str(Path(sys.executable).parent)
    assert env["LD_LIBRARY_PATH"].split(":") == [sysconfig.get_config_var("LIBDIR"), "/x"]


def test_command_has_ports_and_explicit_models():
    cfg = ServerConfig(http_port=18000, grpc_port=18001, metrics_port=18002, models=["multimodal_agg"])
    cmd = TritonServer(cfg).command()
    assert cmd[0].endswith("bin/tritonserver")
    for flag in ("--http-port=18000", "--grpc-port=18001", "--metrics-port=18002", "--http-address=127.0.0.1",
                 "--model-control-mode=explicit", "--load-model=multimodal_agg"):
        assert flag in cmd


def test_port_in_use_is_a_clear_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        server = TritonServer(ServerConfig(http_port=port))
        with pytest.raises(ServerError, match=f"port 127.0.0.1:{port} is in use"):
            server.start()
        assert server.process is None


def test_failing_server_surfaces_its_log(tmp_path):
    """A repository that does not exist: the server exits, and wait_ready says why."""
    cfg = ServerConfig(model_repository=tmp_path / "nope", http_port=0, grpc_port=0, metrics_port=0,
                       log_file=tmp_path / "ts.log")
    server = TritonServer(cfg)
    server.start()
    try:
        with pytest.raises(ServerError, match="exited with code") as info:
            server.wait_ready(timeout_s=60)
        assert "tritonserver log tail" in str(info.value)
    finally:
        server.stop()


def test_tiny_models_are_byte_identical_on_every_build(tmp_path, tiny_models):
    built = build_all(tmp_path / "a")
    for name, path in built.items():
        assert tree_digest(path) == tree_digest(tiny_models[name]), name
        assert (path / "model.safetensors").stat().st_size < 5_000_000
    cfg = (built["qwen2-vl"] / "config.json").read_text()
    assert '"model_type": "qwen2_vl"' in cfg

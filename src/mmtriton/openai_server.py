"""An OpenAI-compatible HTTP server in front of tritonserver: ``/v1/chat/completions`` with images, audio and
video, streamed as Server-Sent Events; ``/v1/models``; ``/health``.

    python -m mmtriton.openai_server --triton-url 127.0.0.1:8001 --port 9000

Its own process: it talks to Triton over gRPC streaming (one Triton stream per request, on a small pool of
shared channels), so Triton stays the one place models run. Model ids are Triton model names (those of
``--models`` that Triton reports ready). A client that goes away cancels its Triton request.

The pieces: :mod:`mmtriton.openai_app` (the FastAPI app, SSE), :mod:`mmtriton.openai_gateway` (the Triton
gRPC side), :mod:`mmtriton.openai_process` (:class:`OpenAIServerConfig`, :class:`OpenAIServerProcess`). This
module is the ``python -m`` entry point and re-exports their public names.
"""

from __future__ import annotations

import argparse
import logging

from mmtriton.openai_app import _read_request, create_app  # noqa: F401 - bench/fuzz.py reads _read_request here
from mmtriton.openai_gateway import TritonGateway
from mmtriton.openai_process import CONTRACT_MODELS, OpenAIServerConfig, OpenAIServerProcess

__all__ = ["CONTRACT_MODELS", "OpenAIServerConfig", "OpenAIServerProcess", "TritonGateway", "create_app", "main"]

log = logging.getLogger("mmtriton.openai")


def main(argv: list[str] | None = None) -> int:
    defaults = OpenAIServerConfig()
    p = argparse.ArgumentParser(prog="python -m mmtriton.openai_server", description=__doc__.splitlines()[0])
    p.add_argument("--triton-url", default=defaults.triton_url, help="Triton gRPC host:port")
    p.add_argument("--host", default=defaults.host)
    p.add_argument("--port", type=int, default=defaults.port)
    p.add_argument("--models", default=",".join(defaults.models),
                   help="comma-separated Triton models to offer (those ready in Triton are listed)")
    p.add_argument("--default-max-tokens", type=int, default=defaults.default_max_tokens)
    p.add_argument("--request-timeout", type=float, default=defaults.request_timeout_s, help="seconds")
    p.add_argument("--grpc-channels", type=int, default=defaults.grpc_channels)
    p.add_argument("--log-level", default=defaults.log_level)
    args = p.parse_args(argv)
    config = OpenAIServerConfig(
        triton_url=args.triton_url, host=args.host, port=args.port,
        models=[m.strip() for m in args.models.split(",") if m.strip()],
        default_max_tokens=args.default_max_tokens, request_timeout_s=args.request_timeout,
        grpc_channels=args.grpc_channels,
    )
    import uvicorn

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.info("OpenAI-compatible API on http://%s:%d/v1 → Triton gRPC %s (models: %s)", config.host, config.port,
             config.triton_url, ", ".join(config.models))
    uvicorn.run(create_app(config), host=config.host, port=config.port, log_level=args.log_level,
                access_log=False, timeout_graceful_shutdown=5)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

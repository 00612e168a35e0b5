"""Send a prompt (with any number of images, audio clips, videos) to a multimodal model and stream the answer.

    python -m client "Describe the image." --image tests/data/pattern.png
    python -m client "Compare them." --image a.png --image https://example.com/b.jpg --model multimodal
    python -m client "Hi" --protocol http --json
    python -m client "What do you hear?" --audio clip.wav --protocol openai --url 127.0.0.1:9000

Local files become data: URIs; URLs are sent as they are (the server fetches them).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import uuid
from collections.abc import Iterator
from typing import Any

from client import InferenceFailed, build_inputs, cancel_decode, chat_messages, generate_http, stream_grpc, stream_http

DEFAULT_URLS = {"grpc": "127.0.0.1:8001", "http": "127.0.0.1:8000", "openai": "127.0.0.1:9000"}


def _openai_stream(args, sampling: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The OpenAI-compatible server (mmtriton.openai_server), through the openai SDK."""
    import openai

    client = openai.OpenAI(base_url=f"http://{args.url}/v1", api_key="unused", max_retries=0)
    extra = {k: v for k, v in sampling.items() if k in ("top_k", "min_tokens")}
    try:
        stream = client.chat.completions.create(
            model=args.model, messages=chat_messages(args.prompt, args.image, args.audio, args.video, args.system),
            max_tokens=sampling["max_tokens"], temperature=sampling["temperature"], top_p=sampling.get("top_p"),
            seed=sampling.get("seed"), stop=sampling.get("stop"), stream=True,
            extra_body={"return_token_ids": True, **extra},
        )
        for chunk in stream:
            raw = chunk.model_dump(exclude_none=True)
            choice = chunk.choices[0] if chunk.choices else None
            yield {"text_output": (choice.delta.content or "") if choice else "", "raw": raw}
    except openai.APIError as exc:
        raise InferenceFailed(str(exc)) from exc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m client", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("prompt")
    p.add_argument("--image", action="append", default=[], help="path or URL (repeatable)")
    p.add_argument("--audio", action="append", default=[], help="path or URL (repeatable)")
    p.add_argument("--video", action="append", default=[], help="path or URL (repeatable)")
    p.add_argument("--system", default=None, help="a system message")
    p.add_argument("--model", default="multimodal_agg", help="Triton model (or OpenAI model id)")
    p.add_argument("--protocol", choices=["grpc", "http", "openai"], default="grpc",
                   help="Triton gRPC streaming, Triton HTTP generate_stream, or the OpenAI-compatible server")
    p.add_argument("--url", default=None, help="host:port (default: " +
                   ", ".join(f"{k} {v}" for k, v in DEFAULT_URLS.items()) + ")")
    p.add_argument("--no-stream", action="store_true", help="one final response instead of one per token")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds")
    p.add_argument("--json", action="store_true", help="print the raw responses as JSON lines")
    args = p.parse_args(argv)
    args.url = args.url or DEFAULT_URLS[args.protocol]

    sampling: dict[str, Any] = {"max_tokens": args.max_tokens, "temperature": args.temperature}
    for name in ("top_p", "seed", "stop"):
        if getattr(args, name) is not None:
            sampling[name] = getattr(args, name)
    request_id = uuid.uuid4().hex
    responses = None
    try:
        if args.protocol == "openai":
            responses = _openai_stream(args, sampling)
        else:
            inputs = build_inputs(args.prompt, args.image, args.audio, args.video, sampling=sampling,
                                  stream=not args.no_stream)
            if args.system:
                inputs.text_input = None
                inputs.image_url = inputs.audio_url = inputs.video_url = None
                inputs.messages = chat_messages(args.prompt, args.image, args.audio, args.video, args.system)
            if args.protocol == "grpc":
                responses = stream_grpc(args.url, args.model, inputs, timeout_s=args.timeout,
                                        request_id=request_id)
            elif args.no_stream:
                responses = iter([generate_http(args.url, args.model, inputs, timeout_s=args.timeout)])
            else:
                responses = stream_http(args.url, args.model, inputs, timeout_s=args.timeout)
        last = None
        for last in responses:
            if args.json:
                print(json.dumps(last.get("raw", last)), flush=True)
            else:
                print(last["text_output"], end="", flush=True)
        if not args.json:
            print()
        # A server must answer a failure with an error; an answer that ends otherwise is one all the same.
        reason = (last or {}).get("finish_reason", "")
        if last is None or reason in ("error", "abort"):
            print(f"error: the answer ended without success (finish_reason {reason!r})", file=sys.stderr)
            return 1
        return 0
    except (InferenceFailed, TimeoutError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if hasattr(responses, "close"):
            responses.close()  # a gRPC stream closes with cancel_requests: Triton cancels the request
        if args.protocol == "grpc" and args.model == "multimodal":
            with contextlib.suppress(Exception):  # best effort: the decode would end at max_tokens anyway
                cancel_decode(args.url, request_id, timeout_s=5)
        print("\ncancelled", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

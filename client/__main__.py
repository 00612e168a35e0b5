"""Send a prompt (with images, audio, video) to a multimodal model on Triton and stream the answer.

    python -m client "Describe the image." --image tests/data/pattern.png
    python -m client "Hi" --protocol http --json
"""

from __future__ import annotations

import argparse
import json
import sys

from client import InferenceFailed, build_inputs, generate_http, stream_grpc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m client", description=__doc__.splitlines()[0])
    p.add_argument("prompt")
    p.add_argument("--image", action="append", default=[], help="path or URL (repeatable)")
    p.add_argument("--audio", action="append", default=[], help="path or URL (repeatable)")
    p.add_argument("--video", action="append", default=[], help="path or URL (repeatable)")
    p.add_argument("--model", default="multimodal_agg")
    p.add_argument("--protocol", choices=["grpc", "http"], default="grpc")
    p.add_argument("--url", default=None, help="host:port (default 127.0.0.1:8001 for gRPC, :8000 for HTTP)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--json", action="store_true", help="print the raw responses as JSON lines")
    args = p.parse_args(argv)

    url = args.url or ("127.0.0.1:8001" if args.protocol == "grpc" else "127.0.0.1:8000")
    inputs = build_inputs(
        args.prompt, args.image, args.audio, args.video,
        sampling={"max_tokens": args.max_tokens, "temperature": args.temperature},
        stream=args.protocol == "grpc",
    )
    try:
        if args.protocol == "http":
            result = generate_http(url, args.model, inputs)
            print(json.dumps(result) if args.json else result["text_output"])
            return 0
        for response in stream_grpc(url, args.model, inputs):
            if args.json:
                print(json.dumps(response), flush=True)
            else:
                print(response["text_output"], end="", flush=True)
        if not args.json:
            print()
        return 0
    except InferenceFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

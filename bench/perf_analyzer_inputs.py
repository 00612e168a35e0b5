"""Write a perf_analyzer ``--input-data`` JSON file of text + image requests for our decoupled models.

    .venv/bin/python bench/perf_analyzer_inputs.py -o bench/results/inputs.json \
        --image-size 224x224 --image-size 448x336 --images-per-request 1 --variants 8

Each entry gives every input as {"content": [...], "shape": [...]}: perf_analyzer needs a shape for inputs with
dynamic dims (image_url is [-1]), and an entry-level shape lets entries carry different numbers of images.
perf_analyzer sends the entries round-robin; each has its own seeded images, so the server's decoded-image
cache cannot answer all of them from the first one (it still does once the entries repeat).
"""

from __future__ import annotations

import argparse
import base64
import json
from pathlib import Path
from typing import Any

from mmtriton.testing import pattern_image, png_bytes  # noqa: E402

PROMPT = "Describe the image."


def synthetic_png(width: int, height: int, seed: int) -> bytes:
    """A gradient with seeded noise (the tests' pattern image): decodes like a photo and differs per seed."""
    return png_bytes(pattern_image(width, height, seed))


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def parse_size(text: str) -> tuple[int, int]:
    w, h = text.lower().split("x")
    return int(w), int(h)


def build_entries(sizes: list[tuple[int, int]], images_per_request: int = 1, variants: int = 4,
                  max_tokens: int = 24, prompt: str = PROMPT, seed: int = 0) -> list[dict[str, Any]]:
    """``variants`` entries; entry i's images cycle through ``sizes``, seeded by (seed, i, image index)."""
    # min_tokens = max_tokens: every request generates the same number of tokens (the tiny model may stop early).
    sampling = json.dumps({"max_tokens": max_tokens, "min_tokens": max_tokens, "temperature": 0})
    entries = []
    for i in range(variants):
        urls = [data_uri(synthetic_png(*sizes[(i + k) % len(sizes)], seed=seed * 1_000_000 + i * 1000 + k))
                for k in range(images_per_request)]
        entry: dict[str, Any] = {
            "text_input": {"content": [prompt], "shape": [1]},
            "sampling_parameters": {"content": [sampling], "shape": [1]},
            "stream": {"content": [True], "shape": [1]},
        }
        if urls:  # text-only requests leave image_url out (an empty [0] tensor is not a request we serve)
            entry["image_url"] = {"content": urls, "shape": [len(urls)]}
        entries.append(entry)
    return entries


def write_input_data(path: Path, entries: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"data": entries}))
    return path


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--image-size", action="append", type=parse_size, metavar="WxH",
                    help="image size, repeatable (entries cycle through them); default 224x224")
    ap.add_argument("--images-per-request", type=int, default=1, help="0 = text-only requests")
    ap.add_argument("--variants", type=int, default=8, help="distinct entries (different images)")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--seed", type=int, default=0)


def entries_from_args(args: argparse.Namespace) -> list[dict[str, Any]]:
    return build_entries(args.image_size or [(224, 224)], args.images_per_request, args.variants,
                         args.max_tokens, args.prompt, args.seed)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-o", "--output", type=Path, default=Path("bench/results/perf_analyzer_inputs.json"))
    add_arguments(ap)
    args = ap.parse_args(argv)
    path = write_input_data(args.output, entries_from_args(args))
    print(f"{path} ({path.stat().st_size / 1e6:.1f} MB, {args.variants} entries)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

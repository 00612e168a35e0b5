"""Write a perf_analyzer ``--input-data`` JSON file of text + image, video or audio requests for our decoupled models.

    .venv/bin/python bench/perf_analyzer_inputs.py -o bench/results/inputs.json \
        --image-size 224x224 --image-size 448x336 --images-per-request 1 --variants 8
    .venv/bin/python bench/perf_analyzer_inputs.py --modality video --video-size 320x240 --seconds 4 --num-frames 8
    .venv/bin/python bench/perf_analyzer_inputs.py --modality audio --seconds 2

Each entry gives every input as {"content": [...], "shape": [...]}: perf_analyzer needs a shape for inputs with
dynamic dims (image_url / video_url / audio_url are [-1]), and an entry-level shape lets entries carry different
numbers of items. perf_analyzer sends the entries round-robin; each has its own seeded media (an image, an H.264
MP4 as data:video/mp4, a 16 kHz WAV tone with seeded noise as data:audio/wav), so the server's decoded-media
cache cannot answer all of them from the first one (it still does once the entries repeat). Video sampling is the
server's default (MMT_VIDEO_*) unless ``--num-frames`` puts ``media_io_kwargs.video.num_frames`` in each request's
sampling_parameters. Audio requests need a server on an audio checkpoint (the tiny Qwen2-Audio).
"""

from __future__ import annotations

import argparse
import base64
import json
from pathlib import Path
from typing import Any

import numpy as np

from mmtriton.testing import pattern_image, png_bytes, tone, video_bytes, wav_bytes  # noqa: E402

MODALITIES = ("image", "video", "audio")
PROMPTS = {"image": "Describe the image.", "video": "Describe the video.", "audio": "What do you hear?"}
PROMPT = PROMPTS["image"]
AUDIO_RATE = 16000  # Qwen2-Audio's feature extractor rate: the server does not resample
DEFAULT_SIZES = {"image": (224, 224), "video": (320, 240)}
DEFAULT_SECONDS = {"video": 4.0, "audio": 2.0}
VIDEO_FPS = 30


def synthetic_png(width: int, height: int, seed: int) -> bytes:
    """A gradient with seeded noise (the tests' pattern image): decodes like a photo and differs per seed."""
    return png_bytes(pattern_image(width, height, seed))


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def video_uri(width: int, height: int, seconds: float, fps: int, seed: int) -> str:
    """An H.264 MP4 (mmtriton.testing.video_bytes: a keyframe every 2 s) as a data:video/mp4 URI."""
    return data_uri(video_bytes(width, height, seconds, fps, "mp4", seed=seed), "video/mp4")


def audio_uri(seconds: float, seed: int, rate: int = AUDIO_RATE) -> str:
    """Two tones plus a little seeded noise (a different clip per seed), 16-bit WAV, as a data:audio/wav URI."""
    noise = 0.01 * np.random.default_rng(seed).standard_normal(int(seconds * rate))
    return data_uri(wav_bytes(tone(seconds, rate) + noise.astype(np.float32), rate), "audio/wav")


def media_uri(modality: str, size: tuple[int, int], seconds: float, fps: int, seed: int) -> str:
    if modality == "image":
        return data_uri(synthetic_png(*size, seed=seed))
    if modality == "video":
        return video_uri(*size, seconds, fps, seed)
    if modality == "audio":
        return audio_uri(seconds, seed)
    raise ValueError(f"modality must be one of {MODALITIES}, not {modality!r}")


def parse_size(text: str) -> tuple[int, int]:
    w, h = text.lower().split("x")
    return int(w), int(h)


def sampling_parameters(max_tokens: int, num_frames: int | None = None) -> dict[str, Any]:
    # min_tokens = max_tokens: every request generates the same number of tokens (the tiny model may stop early).
    sampling: dict[str, Any] = {"max_tokens": max_tokens, "min_tokens": max_tokens, "temperature": 0}
    if num_frames is not None:  # the request's own video sampling (docs/contract.md, Video)
        sampling["media_io_kwargs"] = {"video": {"num_frames": num_frames}}
    return sampling


def build_entries(sizes: list[tuple[int, int]], images_per_request: int = 1, variants: int = 4,
                  max_tokens: int = 24, prompt: str | None = None, seed: int = 0, *, modality: str = "image",
                  seconds: float | None = None, fps: int = VIDEO_FPS,
                  num_frames: int | None = None) -> list[dict[str, Any]]:
    """``variants`` entries of ``images_per_request`` items of ``modality`` each; entry i's items cycle through
    ``sizes`` (images and videos), seeded by (seed, i, item index). ``seconds``: a video's or clip's length."""
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, not {modality!r}")
    length = seconds if seconds is not None else DEFAULT_SECONDS.get(modality, 0.0)
    sampling = json.dumps(sampling_parameters(max_tokens, num_frames))
    entries = []
    for i in range(variants):
        urls = [media_uri(modality, sizes[(i + k) % len(sizes)], length, fps, seed * 1_000_000 + i * 1000 + k)
                for k in range(images_per_request)]
        entry: dict[str, Any] = {
            "text_input": {"content": [prompt or PROMPTS[modality]], "shape": [1]},
            "sampling_parameters": {"content": [sampling], "shape": [1]},
            "stream": {"content": [True], "shape": [1]},
        }
        if urls:  # text-only requests leave the media input out (an empty [0] tensor is not a request we serve)
            entry[f"{modality}_url"] = {"content": urls, "shape": [len(urls)]}
        entries.append(entry)
    return entries


def write_input_data(path: Path, entries: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"data": entries}))
    return path


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--modality", choices=MODALITIES, default="image", help="what each request carries")
    ap.add_argument("--image-size", action="append", type=parse_size, metavar="WxH",
                    help="image size, repeatable (entries cycle through them); default 224x224")
    ap.add_argument("--video-size", action="append", type=parse_size, metavar="WxH",
                    help="video frame size, repeatable; default 320x240")
    ap.add_argument("--seconds", type=float, help="video / audio length (default: video 4, audio 2)")
    ap.add_argument("--fps", type=int, default=VIDEO_FPS, help="the video's frame rate")
    ap.add_argument("--num-frames", type=int, help="video frames the server samples (default: its MMT_VIDEO_*)")
    ap.add_argument("--images-per-request", "--items-per-request", dest="images_per_request", type=int, default=1,
                    help="media items per request; 0 = text-only requests")
    ap.add_argument("--variants", type=int, default=8, help="distinct entries (different media)")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--prompt", help="default: one per modality")
    ap.add_argument("--seed", type=int, default=0)


def entries_from_args(args: argparse.Namespace) -> list[dict[str, Any]]:
    sizes = (args.video_size if args.modality == "video" else args.image_size) or [DEFAULT_SIZES.get(args.modality,
                                                                                                    (0, 0))]
    return build_entries(sizes, args.images_per_request, args.variants, args.max_tokens, args.prompt, args.seed,
                         modality=args.modality, seconds=args.seconds, fps=args.fps, num_frames=args.num_frames)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-o", "--output", type=Path, default=Path("bench/results/perf_analyzer_inputs.json"))
    add_arguments(ap)
    args = ap.parse_args(argv)
    path = write_input_data(args.output, entries_from_args(args))
    print(f"{path} ({path.stat().st_size / 1e6:.1f} MB, {args.variants} entries of {args.modality})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

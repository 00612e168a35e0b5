"""Video decode time as the video grows, with fixed sampling: only the sampled frames are decoded.

One 320x240 H.264 MP4 at 30 fps (a keyframe every 2 s) of 2, 8 and 32 s; each decoded by media/video.py with a
fixed number of sampled frames, against PyAV decoding every frame. Prints a table (median of --repeat runs).

    .venv/bin/python bench/video_decode.py [--num-frames 8] [--repeat 5]
"""

from __future__ import annotations

import argparse
import io
import statistics
import time

from mmtriton.media.video import VideoLimits, decode_video
from mmtriton.settings import Settings
from mmtriton.testing import video_bytes


def median_ms(fn, repeat: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), out


def decode_all(data: bytes) -> int:
    import av

    with av.open(io.BytesIO(data)) as container:
        return sum(1 for _ in container.decode(video=0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-frames", type=int, default=8)
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--seconds", type=float, nargs="+", default=[2.0, 8.0, 32.0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    limits = VideoLimits.from_settings(Settings())
    print(f"320x240 H.264 MP4, {args.fps} fps, keyframe every 2 s; sampled: num_frames={args.num_frames} "
          f"(and fps=2, at most {limits.max_frames} frames); median of {args.repeat}")
    header = (f"{'seconds':>7} {'bytes':>9} {'frames':>6} | {'sampled':>7} {'decoded':>7} {'ms':>7} | "
              f"{'fps=2 T':>7} {'decoded':>7} {'ms':>7} | {'all frames ms':>13}")
    print(header)
    print("-" * len(header))
    for seconds in args.seconds:
        data = video_bytes(320, 240, seconds, args.fps, "mp4", seed=1, gop=2 * args.fps)
        by_count_ms, by_count = median_ms(
            lambda data=data: decode_video(data, "video", limits, num_frames=args.num_frames), args.repeat)
        by_rate_ms, by_rate = median_ms(lambda data=data: decode_video(data, "video", limits, fps=2.0), args.repeat)
        all_ms, _ = median_ms(lambda data=data: decode_all(data), args.repeat)
        print(f"{seconds:>7g} {len(data):>9} {by_count.total_frames:>6} | {len(by_count.indices):>7} "
              f"{by_count.frames_decoded:>7} {by_count_ms:>7.1f} | {len(by_rate.indices):>7} "
              f"{by_rate.frames_decoded:>7} {by_rate_ms:>7.1f} | {all_ms:>13.1f}")


if __name__ == "__main__":
    main()

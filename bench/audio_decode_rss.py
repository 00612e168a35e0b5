"""Peak RSS and time of decode_audio on the longest allowed clip, per format, each in a fresh subprocess.

The clip is ``max_audio_seconds`` long (MMT_MAX_AUDIO_SECONDS, default 600 s from Settings), a tone plus a
little noise so the codecs have something to code. Each decode runs in its own process, after a warm-up
decode of a short clip (imports, codec init), so the figure is the growth of peak RSS caused by that decode
alone; it is printed next to the size of the decoded float32 array. Then the same clip 10 s over the limit,
to time its refusal (from the header, or from counting where the header does not tell). "flac-nolen" is the
FLAC with STREAMINFO's total_samples zeroed ("unknown"): no header length, so PyAV decodes it and counts.

    .venv/bin/python bench/audio_decode_rss.py [--rate 16000] [--channels 1] [--target-rate 16000]
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from mmtriton.settings import Settings  # noqa: E402

FORMATS = {"wav": ("WAV", "PCM_16"), "flac": ("FLAC", None), "flac-nolen": ("FLAC", None), "mp3": ("MP3", None)}


def signal(seconds: float, rate: int, channels: int, seed: int) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    rng = np.random.default_rng(seed)
    mono = 0.4 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * 1234 * t)
    return np.stack([mono + 0.01 * rng.standard_normal(t.size) for _ in range(channels)], axis=1).astype(np.float32)


def encode(name: str, samples: np.ndarray, rate: int) -> bytes:
    import soundfile

    fmt, subtype = FORMATS[name]
    buf = io.BytesIO()
    soundfile.write(buf, samples, rate, format=fmt, subtype=subtype)
    data = bytearray(buf.getvalue())
    if name == "flac-nolen":
        # STREAMINFO sits right after "fLaC" + its 4-byte block header; total_samples is the low 36 bits of [18:26].
        word = int.from_bytes(data[18:26], "big") & ~((1 << 36) - 1)
        data[18:26] = word.to_bytes(8, "big")
    return bytes(data)


def reset_peak_rss() -> int:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; returns the current RSS in KiB."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # not Linux, or not allowed: the peak then also covers what ran before
    return peak_rss_kib()


def peak_rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def child(path: str, target_rate: int, max_seconds: float) -> None:
    from mmtriton.media.audio import decode_audio
    from mmtriton.protocol import InvalidInput

    data = Path(path).read_bytes()
    warm = Path(path + ".warm").read_bytes()
    decode_audio(warm, "warm-up", target_rate, max_seconds)
    before = reset_peak_rss()
    start = time.perf_counter()
    try:
        wave = decode_audio(data, "audio_url[0]", target_rate, max_seconds)
        result = f"{wave.size / target_rate:.1f} s decoded"
        out_bytes = wave.nbytes
    except InvalidInput as exc:
        result, out_bytes = f"refused: {exc}", 0
    seconds = time.perf_counter() - start
    peak = peak_rss_kib()
    print(json.dumps({"growth_mib": (peak - before) / 1024, "seconds": seconds, "result": result, "out": out_bytes}))


def run_child(path: Path, target_rate: int, max_seconds: float) -> dict:
    cmd = [sys.executable, __file__, "--child", str(path), "--target-rate", str(target_rate), "--max", str(max_seconds)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=600)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=int, default=16000, help="source sample rate")
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--target-rate", type=int, default=16000, help="the model's rate (Qwen2-Audio: 16000)")
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--max", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.target_rate, args.max)
        return
    max_seconds = Settings.load().max_audio_seconds
    out_mib = max_seconds * args.target_rate * 4 / 2**20
    src_mib = max_seconds * args.rate * args.channels * 4 / 2**20
    print(
        f"clip {max_seconds:g} s, {args.rate} Hz x {args.channels} ch -> mono {args.target_rate} Hz; decoded float32: "
        f"{out_mib:.1f} MiB at the target rate ({src_mib:.1f} MiB all channels at the source rate)"
    )
    print(f"{'format':<11} {'bytes':>11} {'peak RSS +MiB':>14} {'decode s':>9} {'over-limit refusal s':>21}  result")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.formats.split(","):
            path = Path(tmp) / f"clip.{name}"
            path.write_bytes(encode(name, signal(max_seconds, args.rate, args.channels, 0), args.rate))
            Path(str(path) + ".warm").write_bytes(encode(name, signal(1.0, args.rate, args.channels, 1), args.rate))
            over = Path(tmp) / f"over.{name}"
            over.write_bytes(encode(name, signal(max_seconds + 10, args.rate, args.channels, 2), args.rate))
            Path(str(over) + ".warm").write_bytes(Path(str(path) + ".warm").read_bytes())
            fit = run_child(path, args.target_rate, max_seconds)
            refused = run_child(over, args.target_rate, max_seconds)
            print(
                f"{name:<11} {path.stat().st_size:>11} {fit['growth_mib']:>14.1f} {fit['seconds']:>9.2f} "
                f"{refused['seconds']:>21.3f}  {fit['result']}; over: {refused['result'][:70]}"
            )


if __name__ == "__main__":
    main()

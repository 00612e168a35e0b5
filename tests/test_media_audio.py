"""decode_audio: formats, downmix and resampling (bit-identical to the soundfile + librosa path), and its limits
checked before the cost: header durations refused before decoding, streams that do not tell (or lie about) their
length stopped at the limit with bounded memory, minimum length, garbage, and the decoded-audio cache helpers."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import av
import librosa
import numpy as np
import pytest
import soundfile

from mmtriton.media.audio import audio_cache_key, audio_nbytes, check_audio_seconds, decode_audio
from mmtriton.media.cache import ByteLRU
from mmtriton.protocol import InvalidInput
from mmtriton.testing import audio_bytes, tone, wav_bytes

RATE = 16000


encoded = audio_bytes


def wav8_bytes(samples: np.ndarray, rate: int) -> bytes:
    return wav_bytes(samples, rate, sample_width=1)


def av_encoded(samples: np.ndarray, rate: int, container: str, codec: str, options: dict | None = None,
               bit_rate: int | None = None) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format=container, options=options or {}) as out:
        stream = out.add_stream(codec, rate=rate, layout="mono")
        if bit_rate:
            stream.bit_rate = bit_rate
        frame = av.AudioFrame.from_ndarray(samples[None, :].astype(np.float32), format="fltp", layout="mono")
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


def without_flac_length(data: bytes) -> bytes:
    """Zero STREAMINFO's total_samples: legal FLAC meaning "length unknown" (the header no longer tells)."""
    out = bytearray(data)
    # "fLaC" + 4-byte block header, then STREAMINFO: total_samples is the low 36 bits of bytes [18:26].
    word = int.from_bytes(out[18:26], "big") & ~((1 << 36) - 1)
    out[18:26] = word.to_bytes(8, "big")
    return bytes(out)


def best_correlation(decoded: np.ndarray, source: np.ndarray, max_lag: int = 2500) -> float:
    """Highest normalised correlation over small lags (lossy codecs delay the signal by their priming)."""
    n = source.size - max_lag
    ref = source[:n]
    best = 0.0
    for lag in range(0, max_lag, 1):
        part = decoded[lag : lag + n]
        if part.size < n:
            break
        best = max(best, float(np.dot(part, ref) / (np.linalg.norm(part) * np.linalg.norm(ref) + 1e-12)))
    return best


def soundfile_librosa(data: bytes, sample_rate: int) -> np.ndarray:
    """The whole-clip path decode_audio replaced: it must give the same samples."""
    wave_, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    wave_ = wave_.mean(axis=1)
    if rate != sample_rate:
        wave_ = librosa.resample(wave_, orig_sr=rate, target_sr=sample_rate)
    return np.ascontiguousarray(wave_, dtype=np.float32)


SOURCE = tone(1.0, RATE)
CLIPS = {
    "wav16": lambda: wav_bytes(SOURCE, RATE),
    "wav8": lambda: wav8_bytes(SOURCE, RATE),
    "flac": lambda: encoded(SOURCE, RATE, "FLAC"),
    "ogg-vorbis": lambda: encoded(SOURCE, RATE, "OGG", "VORBIS"),
    "mp3": lambda: encoded(SOURCE, RATE, "MP3"),
    # Through FFmpeg: a FLAC that does not tell its length, and AAC (libsndfile reads neither).
    "flac-no-length": lambda: without_flac_length(encoded(SOURCE, RATE, "FLAC")),
    "aac": lambda: av_encoded(SOURCE, RATE, "adts", "aac"),
}


@pytest.mark.parametrize("name", list(CLIPS))
def test_formats_decode_to_the_right_length_and_content(name):
    wave_ = decode_audio(CLIPS[name](), "audio_url[0]", RATE, max_seconds=10)
    assert wave_.dtype == np.float32 and wave_.ndim == 1 and wave_.flags.c_contiguous
    if name in ("mp3", "aac"):
        # Encoder priming and frame padding: at most two codec frames more.
        assert SOURCE.size <= wave_.size <= SOURCE.size + 2 * 1152
        assert best_correlation(wave_, SOURCE) > 0.9
    else:
        assert wave_.size == SOURCE.size
        tolerance = 0.02 if name in ("wav8", "ogg-vorbis") else 1e-3
        if name == "ogg-vorbis":
            assert best_correlation(wave_, SOURCE, max_lag=4) > 0.9
        else:
            assert float(np.abs(wave_ - SOURCE).max()) < tolerance


def test_mp3_written_by_ffmpeg_decodes():
    encoder = "libmp3lame" if "libmp3lame" in av.codecs_available else "mp3"
    if encoder not in av.codecs_available:
        pytest.skip("no MP3 encoder in this FFmpeg")
    wave_ = decode_audio(av_encoded(SOURCE, RATE, "mp3", encoder), "audio_url[0]", RATE, max_seconds=10)
    assert SOURCE.size <= wave_.size <= SOURCE.size + 3 * 1152 and best_correlation(wave_, SOURCE) > 0.9


@pytest.mark.parametrize(("rate", "channels", "fmt", "subtype"), [
    (16000, 1, "WAV", "PCM_16"), (16000, 2, "WAV", "PCM_16"), (16000, 2, "FLAC", None),
    (16000, 1, "MP3", None), (16000, 2, "MP3", None), (16000, 2, "OGG", "VORBIS"), (8000, 1, "WAV", "PCM_U8"),
    (44100, 2, "FLAC", None), (48000, 2, "OGG", "VORBIS"),
])
def test_samples_are_bit_identical_to_the_whole_clip_path(rate, channels, fmt, subtype):
    # More frames than one 256 Ki-sample block, so block-wise reading, downmix and resampling are all covered.
    rng = np.random.default_rng(rate + channels)
    samples = (0.2 * rng.standard_normal((300_017, channels))).astype(np.float32)
    data = encoded(samples, rate, fmt, subtype)
    assert np.array_equal(decode_audio(data, "a", RATE, max_seconds=60), soundfile_librosa(data, RATE))


def test_resampled_mp3_matches_the_whole_clip_path_to_an_ulp():
    # mpg123 rounds some samples 1 ulp differently when read in blocks; only same-rate MP3 is read whole.
    rng = np.random.default_rng(48)
    data = encoded((0.2 * rng.standard_normal((300_017, 2))).astype(np.float32), 48000, "MP3")
    decoded, whole = decode_audio(data, "a", RATE, max_seconds=60), soundfile_librosa(data, RATE)
    assert decoded.shape == whole.shape and float(np.abs(decoded - whole).max()) < 1e-6


def test_stereo_48k_becomes_mono_16k():
    t = np.arange(48000) / 48000
    left, right = 0.6 * np.sin(2 * np.pi * 300 * t), 0.2 * np.sin(2 * np.pi * 300 * t)
    data = encoded(np.stack([left, right], axis=1).astype(np.float32), 48000, "WAV", "FLOAT")
    wave_ = decode_audio(data, "audio_url[0]", RATE, max_seconds=10)
    assert wave_.size == RATE
    expected = 0.4 * np.sin(2 * np.pi * 300 * np.arange(RATE) / RATE)  # the channel mean, resampled
    assert float(np.abs(wave_[100:-100] - expected[100:-100]).max()) < 1e-3


def test_ffmpeg_downmix_is_the_channel_mean_too():
    # Stereo AAC through PyAV: the same loudness as libsndfile's mean, not FFmpeg's (L + R) / sqrt(2).
    t = np.arange(RATE) / RATE
    stereo = np.stack([0.6 * np.sin(2 * np.pi * 300 * t), 0.2 * np.sin(2 * np.pi * 300 * t)]).astype(np.float32)
    buf = io.BytesIO()
    with av.open(buf, "w", format="adts") as out:
        stream = out.add_stream("aac", rate=RATE, layout="stereo")
        frame = av.AudioFrame.from_ndarray(stereo, format="fltp", layout="stereo")
        frame.sample_rate = RATE
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)
    wave_ = decode_audio(buf.getvalue(), "a", RATE, max_seconds=10)
    peak = float(np.abs(wave_[2048:-2048]).max())
    assert 0.36 < peak < 0.44  # mean: 0.4; FFmpeg's own downmix would give 0.57


def silent_flac(seconds: int, rate: int = 8000) -> bytes:
    buf = io.BytesIO()
    with soundfile.SoundFile(buf, "w", rate, 1, format="FLAC") as f:
        block = np.zeros(rate * 60, dtype=np.float32)
        for _ in range(seconds // 60):
            f.write(block)
    return buf.getvalue()


def silent_mp3_frames(seconds: int, xing: bool) -> bytes:
    """Low-bitrate CBR MP3 of silence; without the Xing frame its frames can be repeated into a longer stream."""
    options = {"write_xing": "1" if xing else "0", "id3v2_version": "0"}
    return av_encoded(np.zeros(8000 * seconds), 8000, "mp3", "libmp3lame", options, bit_rate=8000)


def test_too_long_is_refused_from_the_header_before_decoding():
    hour_flac = silent_flac(3600)
    hour_mp3 = silent_mp3_frames(10, xing=False) * 360  # FFmpeg/mpg123 tell its length from the bitrate
    # Small in bytes (8 kbit/s MP3: 3.6 MB) for an hour: 220 MiB of float32 at 16 kHz.
    assert len(hour_flac) < 300_000 and len(hour_mp3) < 4_000_000
    for data in (hour_flac, hour_mp3):
        start = time.perf_counter()
        header_refusal = r"^audio_url\[3\]: audio is 36\d\d\.\d s long by its header, limit is 600 s"
        with pytest.raises(InvalidInput, match=header_refusal):
            decode_audio(data, "audio_url[3]", RATE, max_seconds=600)
        assert time.perf_counter() - start < 0.2  # decoding 600 s would take far longer than reading a header


def test_length_limit_is_inclusive_and_names_the_limit():
    assert decode_audio(wav_bytes(tone(2.0), RATE), "a", RATE, max_seconds=2).size == 2 * RATE
    with pytest.raises(InvalidInput, match=r"^a: audio is 2\.0 s long by its header, limit is 1\.5 s"):
        decode_audio(wav_bytes(tone(2.0), RATE), "a", RATE, max_seconds=1.5)


def test_stream_without_a_length_is_stopped_at_the_limit():
    data = without_flac_length(silent_flac(600))
    start = time.perf_counter()
    with pytest.raises(InvalidInput, match=r"^audio_url\[0\]: audio is over 30\.\d s long \(decoding stopped there\), "
                                           r"limit is 30 s"):
        decode_audio(data, "audio_url[0]", RATE, max_seconds=30)
    assert time.perf_counter() - start < 1.0  # 30 s decoded, not 600 s


def test_wav_header_that_claims_less_than_it_holds_is_bounded_by_the_claim():
    data = bytearray(wav_bytes(tone(3.0), RATE))
    at = data.find(b"data")
    data[at + 4 : at + 8] = struct.pack("<I", RATE * 2)  # 1 s of 16-bit samples claimed, 3 s held
    assert decode_audio(bytes(data), "a", RATE, max_seconds=10).size == RATE


@pytest.mark.parametrize("claim", [0, 0xFFFFFFFF])
def test_wav_header_that_claims_nothing_or_everything_is_still_limited(claim):
    data = bytearray(wav8_bytes(np.zeros(8000 * 40), 8000))
    at = data.find(b"data")
    data[at + 4 : at + 8] = struct.pack("<I", claim)
    assert decode_audio(bytes(data), "a", RATE, max_seconds=60).size == 40 * RATE
    with pytest.raises(InvalidInput, match="limit is 30 s"):
        decode_audio(bytes(data), "a", RATE, max_seconds=30)


PEAK_RSS_CHILD = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from mmtriton.media.audio import decode_audio
    from mmtriton.protocol import InvalidInput

    def peak_kib():
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])

    decode_audio(Path(sys.argv[1]).read_bytes(), "warm-up", 16000, 600.0)  # imports, codec set-up
    results = {}
    for path in sys.argv[2:]:
        data = Path(path).read_bytes()
        Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
        before = peak_kib()
        try:
            outcome = "%d samples" % decode_audio(data, "audio_url[0]", 16000, 60.0).size
        except InvalidInput as exc:
            outcome = str(exc)
        results[Path(path).name] = [(peak_kib() - before) / 1024, outcome]
    print(json.dumps(results))
""")


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's resettable peak RSS")
def test_hour_long_compressed_clips_decode_in_bounded_memory(tmp_path):
    # An hour at 16 kHz is 220 MiB of float32; the 60 s limit is 3.7 MiB. Whatever the header says, the peak
    # must stay near the limit, not the clip.
    clips = {
        "no-length.flac": without_flac_length(silent_flac(3600)),
        # A Xing header that claims 10 s in front of an hour of frames.
        "lying-xing.mp3": silent_mp3_frames(10, xing=True) + silent_mp3_frames(10, xing=False) * 360,
    }
    (tmp_path / "warm.wav").write_bytes(wav_bytes(tone(0.5), RATE))
    for name, data in clips.items():
        (tmp_path / name).write_bytes(data)
    done = subprocess.run(
        [sys.executable, "-c", PEAK_RSS_CHILD, str(tmp_path / "warm.wav"), *(str(tmp_path / n) for n in clips)],
        capture_output=True, text=True, timeout=60, check=True,
    )
    results = json.loads(done.stdout.strip().splitlines()[-1])
    growth, outcome = results["no-length.flac"]
    assert "decoding stopped there" in outcome and growth < 30, results
    growth, outcome = results["lying-xing.mp3"]
    # libsndfile believes the Xing frame count: 10 s come back, the rest is never decoded.
    assert outcome == f"{10 * RATE} samples" and growth < 30, results


def test_too_short_is_refused_naming_the_minimum():
    with pytest.raises(InvalidInput, match=r"^audio_url\[0\]: audio is 0\.010 s long, shorter than the model's "
                                           r"minimum of 0\.020 s$"):
        decode_audio(wav_bytes(tone(0.01), RATE), "audio_url[0]", RATE, max_seconds=10, min_seconds=0.02)
    assert decode_audio(wav_bytes(tone(0.02), RATE), "a", RATE, max_seconds=10, min_seconds=0.02).size == 320


@pytest.mark.parametrize(("data", "message"), [
    (b"", r"^audio_url\[1\]: audio is empty$"),
    (b"not audio at all" * 10, r"^audio_url\[1\]: cannot decode audio \("),
    (bytes(np.random.default_rng(0).integers(0, 256, 200_000, dtype=np.uint8)), r"^audio_url\[1\]: cannot decode"),
    (encoded(SOURCE, RATE, "FLAC")[:60], r"^audio_url\[1\]: cannot decode audio"),
    (encoded(SOURCE, RATE, "FLAC")[:5000], r"^audio_url\[1\]: cannot decode audio"),
    (encoded(SOURCE, RATE, "OGG", "VORBIS")[:3000], r"^audio_url\[1\]: cannot decode audio"),
    (encoded(SOURCE, RATE, "MP3")[:60], r"^audio_url\[1\]: cannot decode audio"),
    (wav_bytes(SOURCE, RATE)[:44], r"^audio_url\[1\]: audio has no samples$"),
], ids=["empty", "text", "noise", "flac-header-cut", "flac-cut", "ogg-cut", "mp3-cut", "wav-header-only"])
def test_garbage_truncated_and_empty_are_refused_fast(data, message):
    start = time.perf_counter()
    with pytest.raises(InvalidInput, match=message):
        decode_audio(data, "audio_url[1]", RATE, max_seconds=10)
    assert time.perf_counter() - start < 1.0  # FFmpeg's probe of garbage must not hang


def test_a_container_without_audio_is_refused():
    buf = io.BytesIO()
    with av.open(buf, "w", format="matroska") as out:
        stream = out.add_stream("mpeg4", rate=5)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for _ in range(3):
            frame = av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), dtype=np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    with pytest.raises(InvalidInput, match=r"^audio_url\[0\]: no audio stream found$"):
        decode_audio(buf.getvalue(), "audio_url[0]", RATE, max_seconds=10)


def test_decoding_is_bounded_in_time():
    with pytest.raises(InvalidInput, match=r"^a: cannot decode audio \(decoding took longer than 1e-09 s\)"):
        decode_audio(CLIPS["flac-no-length"](), "a", RATE, max_seconds=10, timeout_s=1e-9)


def test_cache_helpers():
    assert audio_cache_key("sha256:ab", 16000) != audio_cache_key("sha256:ab", 24000)
    assert audio_cache_key("sha256:ab", 16000) == audio_cache_key("sha256:ab", 16000)
    wave_ = decode_audio(wav_bytes(tone(1.0), RATE), "a", RATE, max_seconds=10)
    assert audio_nbytes(wave_) == RATE * 4
    cache: ByteLRU[str, np.ndarray] = ByteLRU(RATE * 4, audio_nbytes)
    assert cache.put(audio_cache_key("sha256:ab", RATE), wave_) and cache.bytes == RATE * 4
    assert not cache.put(audio_cache_key("sha256:cd", RATE), np.zeros(RATE + 1, np.float32))  # over budget
    # A cached waveform is re-checked against the limits of the request that hits it.
    check_audio_seconds(wave_.size / RATE, "a", max_seconds=1.0)
    with pytest.raises(InvalidInput, match="limit is 0.5 s"):
        check_audio_seconds(wave_.size / RATE, "a", max_seconds=0.5)
    with pytest.raises(InvalidInput, match="minimum of 2.000 s"):
        check_audio_seconds(wave_.size / RATE, "a", max_seconds=10, min_seconds=2)

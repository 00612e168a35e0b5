"""Audio bytes → mono float32 waveform at the model's sample rate, with the limits checked before the cost.

The duration is read from the container header first (libsndfile's frame count, FFmpeg's stream / container
duration) and a clip over the limit is refused before any sample is decoded. Headers may be missing or lie, so
decoding then runs block by block (libsndfile) or packet by packet (PyAV): each block is downmixed and resampled
at once, the source frames are counted, and decoding stops as soon as the count passes the limit. Peak memory
is therefore about one output at the *target* rate for ``max_seconds`` (plus one block), whatever the source
rate, channel count or header.

Resampling uses soxr's streaming resampler at librosa.resample's default quality ('soxr_hq'); its output is
bit-identical to ``librosa.resample(wave, orig_sr=..., target_sr=...)`` (same length fix: ceil(n * ratio)), and
input already at the target rate is not resampled at all.
"""

from __future__ import annotations

import io
import math
import time
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from mmtriton.protocol import InvalidInput

# Wall-clock bound on one decode (PyAV's own open/read interrupt uses it too): garbage must fail fast, and even a
# hostile stream that decodes slowly cannot hold a worker thread for long.
DECODE_TIMEOUT_S = 30.0
# Samples (all channels together) libsndfile reads per block: ~1 MiB of float32 at a time.
_BLOCK_SAMPLES = 1 << 18
# libsndfile reports SF_COUNT_MAX frames when a stream does not tell its length (e.g. FLAC total_samples = 0).
_UNKNOWN_FRAMES = 1 << 62
_SOXR_QUALITY = "HQ"  # = librosa.resample's default res_type "soxr_hq"


def decode_audio(
    data: bytes,
    where: str,
    sample_rate: int,
    max_seconds: float,
    min_seconds: float = 0.0,
    *,
    timeout_s: float = DECODE_TIMEOUT_S,
) -> np.ndarray:
    """Decode WAV/FLAC/OGG/MP3 (libsndfile) or anything else FFmpeg reads (PyAV) to mono float32 at ``sample_rate``.

    ``where`` names the item in errors (e.g. ``audio_url[0]``). Every refusal is ``InvalidInput``: empty, garbage,
    truncated or corrupt, no audio stream, no samples, longer than ``max_seconds``, shorter than ``min_seconds``,
    or slower to decode than ``timeout_s``.
    """
    if not data:
        raise InvalidInput(f"{where}: audio is empty")
    deadline = (time.monotonic() + timeout_s, timeout_s)
    out = _decode_with_soundfile(data, where, sample_rate, max_seconds, deadline)
    if out is None:  # not a libsndfile format, or one whose length it cannot tell: FFmpeg instead
        out = _decode_with_av(data, where, sample_rate, max_seconds, deadline)
    wave = out.finish()
    check_audio_seconds(out.frames / out.source_rate, where, max_seconds, min_seconds)
    return wave


def check_audio_seconds(seconds: float, where: str, max_seconds: float, min_seconds: float = 0.0) -> None:
    """Refuse a duration outside [min_seconds, max_seconds]; also for a cached waveform (``wave.size / rate``)."""
    if seconds > max_seconds:
        raise InvalidInput(f"{where}: audio is {seconds:.1f} s long, limit is {max_seconds:g} s")
    if seconds <= 0:
        raise InvalidInput(f"{where}: audio has no samples")
    if seconds < min_seconds:
        raise InvalidInput(
            f"{where}: audio is {seconds:.3f} s long, shorter than the model's minimum of {min_seconds:.3f} s"
        )


def audio_cache_key(source_key: str, sample_rate: int) -> str:
    """Key of a decoded waveform: the same bytes decoded for another model rate is another entry.

    ``source_key`` says which bytes (``"url:<normalised url>"``, ``"data-sha256:<hex>"`` or ``"sha256:<hex>"``, as
    for images).
    """
    return f"audio@{int(sample_rate)}Hz:{source_key}"


def audio_nbytes(wave: np.ndarray) -> int:
    """Cache cost of a decoded waveform (ByteLRU ``size_of``)."""
    return int(wave.nbytes)


@dataclass(frozen=True)
class AudioDecoder:
    """MediaDecoder for audio: mono float32 at ``sample_rate``, within [min_seconds, max_seconds]."""

    sample_rate: int
    max_seconds: float
    min_seconds: float = 0.0
    kind: ClassVar[str] = "audio"

    def cache_key(self, source_key: str) -> str:
        return audio_cache_key(source_key, self.sample_rate)

    def decode(self, data: bytes, where: str) -> np.ndarray:
        return decode_audio(data, where, self.sample_rate, self.max_seconds, self.min_seconds)

    def nbytes(self, value: np.ndarray) -> int:
        return audio_nbytes(value)


class _MonoAtTargetRate:
    """Collects mono float32 blocks at the source rate into one waveform at the target rate, within the limit."""

    def __init__(self, where: str, source_rate: int, target_rate: int, max_seconds: float, expected_frames: int):
        import soxr

        self.where = where
        self.source_rate = source_rate
        self.target_rate = target_rate
        self.max_seconds = max_seconds
        self.frames = 0  # source frames seen: what the limits are checked against
        self.ratio = float(target_rate) / source_rate  # as librosa computes it, for the same output length
        self._resampler = (
            None
            if source_rate == target_rate
            else soxr.ResampleStream(source_rate, target_rate, 1, dtype="float32", quality=_SOXR_QUALITY)
        )
        # Sized from the header when it tells, never beyond the limit however much it claims; grown if it lied.
        max_frames = int(max_seconds * source_rate) + 1
        self._buf = np.empty(self._out_len(min(max(expected_frames, 0), max_frames)) + 16, dtype=np.float32)
        self._size = 0

    def add(self, mono: np.ndarray) -> None:
        if mono.size == 0:
            return
        self.frames += mono.size
        if self.frames / self.source_rate > self.max_seconds:
            raise InvalidInput(
                f"{self.where}: audio is over {self.frames / self.source_rate:.1f} s long (decoding stopped there), "
                f"limit is {self.max_seconds:g} s"
            )
        self._append(mono if self._resampler is None else self._resampler.resample_chunk(mono))

    def finish(self) -> np.ndarray:
        if self._resampler is not None:
            self._append(self._resampler.resample_chunk(np.zeros(0, dtype=np.float32), last=True))
        n_out = self._out_len(self.frames)
        if self._size < n_out:  # librosa's fix_length pads the resampler's short tail with zeros
            self._append(np.zeros(n_out - self._size, dtype=np.float32))
        wave = self._buf
        self._buf = np.empty(0, dtype=np.float32)
        # Shrinking in place is a realloc (mremap for big buffers): no second copy of the waveform at the peak.
        wave.resize(n_out, refcheck=False)
        return wave

    def _out_len(self, frames: int) -> int:
        return frames if self._resampler is None else int(math.ceil(frames * self.ratio))

    def _append(self, block: np.ndarray) -> None:
        end = self._size + block.size
        if end > self._buf.size:
            self._buf.resize(max(end, self._buf.size * 2), refcheck=False)
        self._buf[self._size : end] = block
        self._size = end


def _decode_with_soundfile(
    data: bytes, where: str, sample_rate: int, max_seconds: float, deadline: tuple[float, float]
) -> _MonoAtTargetRate | None:
    """libsndfile, block by block; None where it cannot read the data (the caller tries FFmpeg)."""
    import soundfile

    try:
        with soundfile.SoundFile(io.BytesIO(data)) as f:
            rate, frames, channels = int(f.samplerate), int(f.frames), int(f.channels)
            if rate <= 0 or channels <= 0 or frames <= 0 or frames >= _UNKNOWN_FRAMES:
                # A length it cannot tell (soundfile's reads seek past it and fail) or none at all: FFmpeg
                # streams those, and says "no samples" if there really are none.
                return None
            _check_header_seconds(frames / rate, where, max_seconds)
            out = _MonoAtTargetRate(where, rate, sample_rate, max_seconds, frames)
            # libsndfile's MP3 decoder (mpg123) rounds some samples 1 ulp differently when a clip is read in
            # pieces. Input already at the model's rate must come out exactly as soundfile.read gives it, so such
            # MP3 is read in one piece: its frame count is known and within the limit by now, libsndfile returns
            # no more than that, and MPEG audio has at most 2 channels (peak ~2-3x the output, not unbounded).
            whole = rate == sample_rate and f.subtype.startswith("MPEG_LAYER")
            block_frames = frames if whole else max(1, _BLOCK_SAMPLES // channels)
            f.seek(0)  # as soundfile.read does before reading (it resets mpg123's state: same samples)
            while True:
                block = f.read(block_frames, dtype="float32", always_2d=True)
                if block.shape[0] == 0:
                    break
                # Channel mean per row, as the whole-clip mean would compute it (bit-identical).
                out.add(block[:, 0] if channels == 1 else block.mean(axis=1))
                _check_deadline(deadline, where)
            return out
    except InvalidInput:
        raise
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError):
        return None


def _decode_with_av(
    data: bytes, where: str, sample_rate: int, max_seconds: float, deadline: tuple[float, float]
) -> _MonoAtTargetRate:
    """FFmpeg via PyAV, packet by packet."""
    import av

    try:
        # The timeouts arm FFmpeg's interrupt callback for opening (probing) and for each read.
        timeout_s = deadline[1]
        with av.open(io.BytesIO(data), mode="r", timeout=(timeout_s, timeout_s)) as container:
            stream = next((s for s in container.streams if s.type == "audio"), None)
            if stream is None:
                raise InvalidInput(f"{where}: no audio stream found")
            rate = int(stream.rate or 0)
            if rate <= 0:
                raise InvalidInput(f"{where}: cannot decode audio (no sample rate)")
            header_seconds = av_header_seconds(container, stream)
            if header_seconds is not None:
                _check_header_seconds(header_seconds, where, max_seconds)
            expected = int(header_seconds * rate) if header_seconds is not None else 0
            out = _MonoAtTargetRate(where, rate, sample_rate, max_seconds, expected)
            # Packed (interleaved) float at the source rate and layout; the channel mean is ours (FFmpeg's own
            # downmix of stereo is (L + R) / sqrt(2), louder than libsndfile's mean for the same audio). Packed,
            # not planar: PyAV 18's to_ndarray() on a planar frame of 8 channels reads a 9th plane and segfaults
            # (found by bench/fuzz.py), which would kill the model's stub.
            resampler = av.AudioResampler(format="flt", rate=rate)
            for packet in container.demux(stream):  # the last, empty packet flushes the decoder
                for frame in packet.decode():
                    for converted in resampler.resample(frame):
                        out.add(_mono(converted.to_ndarray(), len(converted.layout.channels)))
                _check_deadline(deadline, where)
            for converted in resampler.resample(None):
                out.add(_mono(converted.to_ndarray(), len(converted.layout.channels)))
            return out
    except InvalidInput:
        raise
    except Exception as exc:  # FFmpeg raises many types for garbage and truncated input
        raise InvalidInput(f"{where}: cannot decode audio ({type(exc).__name__}: {exc})") from exc


def _mono(packed: np.ndarray, channels: int) -> np.ndarray:
    # (1, samples * channels) interleaved float32; mono is taken as is (no arithmetic on mono input).
    frames = packed.reshape(-1, channels)
    return np.ascontiguousarray(frames[:, 0] if channels == 1 else frames.mean(axis=1), dtype=np.float32)


def av_header_seconds(container, stream) -> float | None:
    """The duration FFmpeg tells before decoding (stream header, else container), or None. (Video too.)"""
    if stream.duration is not None and stream.duration > 0 and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None and container.duration > 0:
        import av

        return container.duration / av.time_base
    return None


def _check_header_seconds(seconds: float, where: str, max_seconds: float) -> None:
    if seconds > max_seconds:
        raise InvalidInput(
            f"{where}: audio is {seconds:.1f} s long by its header, limit is {max_seconds:g} s (not decoded)"
        )


def _check_deadline(deadline: tuple[float, float], where: str) -> None:
    ends_at, timeout_s = deadline
    if time.monotonic() > ends_at:
        raise InvalidInput(f"{where}: cannot decode audio (decoding took longer than {timeout_s:g} s)")

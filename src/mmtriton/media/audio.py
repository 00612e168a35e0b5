"""Audio bytes → mono float32 waveform at the model's sample rate."""

from __future__ import annotations

import io

import numpy as np

from mmtriton.protocol import InvalidInput


def decode_audio(data: bytes, where: str, sample_rate: int, max_seconds: float) -> np.ndarray:
    """Decode WAV/FLAC/OGG (libsndfile) or anything FFmpeg reads (PyAV), resample, downmix to mono."""
    if not data:
        raise InvalidInput(f"{where}: audio is empty")
    import librosa
    import soundfile

    try:
        wave, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
        wave = wave.mean(axis=1)
    except (soundfile.LibsndfileError, RuntimeError, TypeError):
        wave, rate = _decode_with_av(data, where)
    if wave.size == 0:
        raise InvalidInput(f"{where}: audio has no samples")
    if wave.size / rate > max_seconds:
        raise InvalidInput(f"{where}: audio is {wave.size / rate:.1f} s long, limit is {max_seconds:.0f} s")
    if rate != sample_rate:
        wave = librosa.resample(wave, orig_sr=rate, target_sr=sample_rate)
    return np.ascontiguousarray(wave, dtype=np.float32)


def _decode_with_av(data: bytes, where: str) -> tuple[np.ndarray, int]:
    import av

    try:
        with av.open(io.BytesIO(data)) as container:
            stream = next((s for s in container.streams if s.type == "audio"), None)
            if stream is None:
                raise InvalidInput(f"{where}: no audio stream found")
            rate = int(stream.rate)
            # Resample to packed float mono at the source rate: one flat array, whatever the codec's layout.
            resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
            frames = [f for packet_frame in container.decode(stream) for f in resampler.resample(packet_frame)]
            frames += resampler.resample(None)  # flush
            chunks = [f.to_ndarray().reshape(-1) for f in frames]
    except InvalidInput:
        raise
    except Exception as exc:
        raise InvalidInput(f"{where}: cannot decode audio ({type(exc).__name__}: {exc})") from exc
    if not chunks:
        raise InvalidInput(f"{where}: audio has no samples")
    return np.concatenate(chunks).astype(np.float32), rate

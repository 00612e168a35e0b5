"""Video bytes → a few sampled RGB frames as one uint8 [T, H, W, 3] array, with the limits checked before the cost.

Only real video containers are opened (MP4/MOV, WebM/Matroska, AVI: sniffed by magic number, then FFmpeg is told
that one demuxer, so no other demuxer parses untrusted bytes); GIF, images and audio files are refused by name.

The header gives size and duration, checked first. Headers lie or say nothing (a WebM has no frame count; a
variable-frame-rate file's "fps" is an average), so the stream is then *demuxed* once, packets only, nothing
decoded: each packet with a timestamp is one frame, which gives the true frame count and every frame's
presentation time. Frames are sampled from that index (:func:`sample_indices`: by count, or by fps over the
timestamps), and only those are decoded: the decoder seeks to the keyframe before a sampled frame when one lies
between it and where decoding already is, and stops after the last sampled frame. Each frame is rotated by the
stream's display matrix (multiples of 90°) and resized down (PIL, box = area filter) to fit the frame-pixel limit.
"""

from __future__ import annotations

import io
import math
import time
from array import array
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, ClassVar

import numpy as np

from mmtriton.media.audio import av_header_seconds
from mmtriton.protocol import InvalidInput, VideoOptions
from mmtriton.settings import Settings

__all__ = ["VideoOptions", "SampledVideo", "VideoLimits", "VideoDecoder", "decode_video", "sample_indices"]

# Wall-clock bound on one decode (FFmpeg's open/read interrupt uses it too).
DECODE_TIMEOUT_S = 30.0
# Frames one stream may index (600 s at 500 fps): a file of millions of tiny packets is refused, not listed.
MAX_STREAM_FRAMES = 300_000
# The name vLLM's metadata carries for the loader that made the frames.
VIDEO_BACKEND = "mmtriton-pyav"

# Allowed containers: what the client calls them → the FFmpeg demuxer we force for them.
ALLOWED_VIDEO_CONTAINERS = {"MP4/MOV": "mov", "WebM/Matroska": "matroska", "AVI": "avi"}
# ISO BMFF top-level boxes a MP4/QuickTime file starts with (old QuickTime files have no ftyp).
_MOV_FIRST_BOXES = frozenset({b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip", b"pnot"})
# ftyp major brands of still images in an ISO BMFF box structure.
_IMAGE_BRANDS = {b"heic": "HEIC", b"heix": "HEIC", b"mif1": "HEIF", b"msf1": "HEIF", b"avif": "AVIF"}


@dataclass(frozen=True, eq=False)
class SampledVideo:
    """Sampled frames of one video, ready for a processor (read-only: cached values are shared)."""

    frames: np.ndarray  # [T, H, W, 3] uint8, C-contiguous, rotation applied, resized within limits
    indices: tuple[int, ...]  # the sampled frame indices in the stream (presentation order; unique, sorted)
    fps: float  # the stream's average frame rate
    duration_s: float
    total_frames: int  # frames in the stream, counted from its packets (the header's count may be 0 / wrong)
    # How it was made (for stats and tests): the header's frame count, the display rotation applied
    # (degrees counterclockwise), the source size, and how many frames the decoder produced.
    header_frames: int = 0
    rotation: int = 0
    source_size: tuple[int, int] = (0, 0)  # (width, height) as coded, before rotation
    frames_decoded: int = 0
    timestamps_s: tuple[float, ...] = field(default=())  # presentation time of each sampled frame

    @property
    def sampled_fps(self) -> float:
        """The rate the frames were sampled at (frames per second of video): what a processor that spaces
        temporal positions by fps (Qwen2.5-Omni) must be told; the stream's own rate for a whole-stream sample."""
        if len(self.indices) >= self.total_frames or self.duration_s <= 0:
            return self.fps
        return len(self.indices) / self.duration_s

    def vllm_metadata(self) -> dict[str, Any]:
        """Metadata for ``multi_modal_data={"video": [(frames, video.vllm_metadata())]}``.

        The keys of vLLM 0.32's own loaders (``VideoLoader.create_hf_metadata``), with ``do_sample_frames``
        False: the frames are already sampled, so no processor samples them again (Qwen3-VL / Omni-style
        processors read ``fps`` and ``frames_indices`` for timestamps; Qwen2-VL's parser drops the metadata and
        its processor then leaves the frames as they are, its default)."""
        return {
            "total_num_frames": self.total_frames,
            "fps": self.fps,
            "duration": self.duration_s,
            "video_backend": VIDEO_BACKEND,
            "frames_indices": list(self.indices),
            "do_sample_frames": False,
        }


@dataclass(frozen=True)
class VideoLimits:
    """The video settings, read once per loader."""

    default_fps: float
    default_num_frames: int  # 0: sample by fps
    max_frames: int
    max_seconds: float
    max_source_pixels: int
    max_frame_pixels: int
    max_total_pixels: int

    @classmethod
    def from_settings(cls, settings: Settings) -> VideoLimits:
        return cls(
            default_fps=settings.video_fps,
            default_num_frames=settings.video_num_frames,
            max_frames=settings.video_max_frames,
            max_seconds=settings.max_video_seconds,
            max_source_pixels=settings.max_video_source_pixels,
            max_frame_pixels=settings.max_video_frame_pixels,
            max_total_pixels=settings.max_video_total_pixels,
        )

    def sampling(self, options: VideoOptions | None, where: str) -> tuple[int | None, float | None]:
        """(num_frames, fps) to sample by: the request's choice, else the settings' defaults; exactly one set."""
        if options is not None:
            if options.num_frames is not None and options.fps is not None:
                raise InvalidInput(f"{where}: set num_frames or fps, not both")
            if options.num_frames is not None and options.num_frames > self.max_frames:
                raise InvalidInput(
                    f"{where}: too many frames: num_frames={options.num_frames}, limit is {self.max_frames} "
                    "(MMT_VIDEO_MAX_FRAMES)"
                )
            if options.num_frames is not None:
                return options.num_frames, None
            if options.fps is not None:
                return None, options.fps
        if self.default_num_frames > 0:
            return min(self.default_num_frames, self.max_frames), None
        return None, self.default_fps


def sample_indices(
    total_frames: int,
    *,
    num_frames: int | None = None,
    fps: float | None = None,
    max_frames: int,
    timestamps: Sequence[float] | None = None,
    stream_fps: float | None = None,
) -> list[int]:
    """Indices (presentation order) of the frames to decode: unique, sorted, inside [0, total_frames).

    By count: ``num_frames`` evenly, ``floor(i * total / n)`` as Qwen2-VL's processor samples (it starts at
    frame 0). By rate: ``fps`` frames per second of video, at most ``max_frames`` (then spread evenly over the
    whole video): over ``timestamps`` (each frame's presentation time in seconds, sorted) when given, so a
    variable-frame-rate stream is sampled evenly in time (the last frame at or before each target time),
    else over the index at ``stream_fps``. Fewer frames than asked come back when the stream has fewer.
    """
    if (num_frames is None) == (fps is None):
        raise ValueError("sample by num_frames or by fps, exactly one")
    if total_frames <= 0:
        return []
    if num_frames is not None:
        n = min(num_frames, total_frames)
        return [i * total_frames // n for i in range(n)]
    assert fps is not None
    if timestamps is not None:
        if len(timestamps) != total_frames:
            raise ValueError(f"{len(timestamps)} timestamps for {total_frames} frames")
        start = timestamps[0]
        # The last frame lasts as long as the one before it (or one stream_fps period when there is one frame).
        last_frame_s = (timestamps[-1] - timestamps[-2]) if total_frames > 1 else 1.0 / (stream_fps or 1.0)
        duration = max(timestamps[-1] - start + last_frame_s, 0.0)
    else:
        duration = total_frames / stream_fps if stream_fps else 0.0
    # A hair over: 2 s at 2 fps is 4 frames even when the timestamps sum to 1.9999999.
    n = max(1, min(int(duration * fps + 1e-6), total_frames, max_frames))
    if timestamps is None or n == 1:
        return [i * total_frames // n for i in range(n)]
    step = duration / n
    picked = [max(0, bisect_right(timestamps, start + k * step + 1e-9) - 1) for k in range(n)]
    return sorted(set(picked))  # a long gap (VFR) can map two targets onto one frame


def fit_within(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """(width, height) scaled down, keeping the aspect ratio, to at most ``max_pixels``; never up."""
    if width * height <= max_pixels:
        return width, height
    scale = math.sqrt(max_pixels / (width * height))
    w, h = max(1, int(width * scale)), max(1, int(height * scale))
    while w * h > max_pixels:  # float rounding
        if w >= h:
            w -= 1
        else:
            h -= 1
    return w, h


def sniff_container(data: bytes, where: str) -> str:
    """The FFmpeg demuxer to open ``data`` with; refuses (naming the format where known) anything else."""
    head = data[:16]
    if len(head) >= 8 and head[4:8] in _MOV_FIRST_BOXES:
        brand = head[8:12] if head[4:8] == b"ftyp" else b""
        if brand in _IMAGE_BRANDS:
            raise _container_refusal(where, f"{_IMAGE_BRANDS[brand]} image")
        return ALLOWED_VIDEO_CONTAINERS["MP4/MOV"]
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return ALLOWED_VIDEO_CONTAINERS["WebM/Matroska"]
    if head.startswith(b"RIFF") and head[8:12] == b"AVI ":
        return ALLOWED_VIDEO_CONTAINERS["AVI"]
    raise _container_refusal(where, _known_other_format(head))


def _known_other_format(head: bytes) -> str | None:
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if head.startswith(b"RIFF"):
        return {b"WAVE": "WAV audio", b"WEBP": "WEBP image"}.get(head[8:12], "RIFF (not AVI)")
    for magic, name in (
        (b"\x89PNG", "PNG image"), (b"\xff\xd8\xff", "JPEG image"), (b"OggS", "Ogg"), (b"fLaC", "FLAC audio"),
        (b"ID3", "MP3 audio"), (b"\x00\x00\x01\xba", "MPEG program stream"), (b"FLV", "FLV"),
    ):
        if head.startswith(magic):
            return name
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0:
        return "MPEG audio"
    if len(head) >= 1 and head[0] == 0x47:
        return "MPEG transport stream"
    return None


def _container_refusal(where: str, name: str | None) -> InvalidInput:
    what = f"{name} is not an allowed video container" if name else "not a recognised video container"
    return InvalidInput(f"{where}: {what} (allowed: {', '.join(ALLOWED_VIDEO_CONTAINERS)})")


def decode_video(
    data: bytes,
    where: str,
    limits: VideoLimits,
    *,
    num_frames: int | None = None,
    fps: float | None = None,
    timeout_s: float = DECODE_TIMEOUT_S,
) -> SampledVideo:
    """Decode the sampled frames of ``data`` (exactly one of ``num_frames`` / ``fps``); ``where`` names the item
    in every refusal (InvalidInput): empty, garbage, not an allowed container (GIF …), truncated or corrupt, no
    video stream, no decodable frames, too long, too large, too many frames, too many pixels, too slow."""
    if not data:
        raise InvalidInput(f"{where}: video is empty")
    demuxer = sniff_container(data, where)
    import av

    deadline = time.monotonic() + timeout_s
    try:
        # The timeouts arm FFmpeg's interrupt callback for opening (probing) and for each read.
        with av.open(io.BytesIO(data), mode="r", format=demuxer, timeout=(timeout_s, timeout_s)) as container:
            return _decode_open(container, where, limits, num_frames, fps, deadline, timeout_s)
    except InvalidInput:
        raise
    except Exception as exc:  # FFmpeg raises many types for garbage and truncated input
        raise InvalidInput(
            f"{where}: cannot decode video: garbage, truncated or corrupt ({type(exc).__name__}: {str(exc)[:200]})"
        ) from exc


@dataclass
class _Index:
    """The stream's frames in presentation order, from its packets: timestamps (stream time base) and which
    packets are keyframes."""

    pts: array  # int64, sorted, unique
    keyframe_pts: array  # int64, sorted
    by_timestamp: bool  # False: the packets carried no timestamps, frames are counted in packet order


def _decode_open(container, where: str, limits: VideoLimits, num_frames: int | None, fps: float | None,
                 deadline: float, timeout_s: float) -> SampledVideo:

    stream = next(iter(container.streams.video), None)
    if stream is None:
        has_audio = any(s.type == "audio" for s in container.streams)
        raise InvalidInput(f"{where}: no video stream found" + (" (an audio-only file)" if has_audio else ""))
    ctx = stream.codec_context
    width, height = int(ctx.width or 0), int(ctx.height or 0)
    if width <= 0 or height <= 0:
        raise InvalidInput(f"{where}: cannot decode video (no frame size in the header)")
    if width * height > limits.max_source_pixels:
        raise InvalidInput(
            f"{where}: video is too large: {width}x{height} = {width * height} pixels a frame, limit is "
            f"{limits.max_source_pixels} (MMT_MAX_VIDEO_SOURCE_PIXELS; not decoded)"
        )
    header_seconds = av_header_seconds(container, stream)
    if header_seconds is not None and header_seconds > limits.max_seconds:
        raise InvalidInput(
            f"{where}: video is {header_seconds:.1f} s long by its header, limit is {limits.max_seconds:g} s "
            "(MMT_MAX_VIDEO_SECONDS; not decoded)"
        )
    time_base = stream.time_base or Fraction(1, 1)
    index = _index_packets(container, stream, where, deadline, timeout_s)
    total = len(index.pts)
    if total == 0:
        raise InvalidInput(f"{where}: video has no frames")
    times = [float(p * time_base) for p in index.pts] if index.by_timestamp else None
    header_fps = float(stream.average_rate) if stream.average_rate else 0.0
    if times is not None and total > 1:
        span = times[-1] - times[0] + (times[-1] - times[-2])
        duration = span if span > 0 else (header_seconds or 0.0)
    else:
        duration = header_seconds or (total / header_fps if header_fps else 0.0)
    if duration > limits.max_seconds:
        raise InvalidInput(
            f"{where}: video is {duration:.1f} s long by its frames' timestamps, limit is {limits.max_seconds:g} s "
            "(MMT_MAX_VIDEO_SECONDS; not decoded)"
        )
    stream_fps = header_fps or (total / duration if duration > 0 else 1.0)
    if duration <= 0:
        duration = total / stream_fps
    if num_frames is not None and num_frames > limits.max_frames:
        raise InvalidInput(f"{where}: too many frames: num_frames={num_frames}, limit is {limits.max_frames}")
    wanted = sample_indices(total, num_frames=num_frames, fps=fps, max_frames=limits.max_frames,
                            timestamps=times, stream_fps=stream_fps)
    if len(wanted) > limits.max_frames:  # cannot happen by sample_indices' contract; the limit itself
        raise InvalidInput(f"{where}: too many frames: {len(wanted)} to decode, limit is {limits.max_frames}")
    out_w, out_h = fit_within(width, height, limits.max_frame_pixels)
    if len(wanted) * out_w * out_h > limits.max_total_pixels:
        raise InvalidInput(
            f"{where}: video is too large: {len(wanted)} frames of {out_w}x{out_h} = "
            f"{len(wanted) * out_w * out_h} pixels, limit is {limits.max_total_pixels} "
            "(MMT_MAX_VIDEO_TOTAL_PIXELS; not decoded)"
        )
    decoder = _SampledFrameDecoder(container, stream, index, where, deadline, timeout_s)
    frames_by_index = decoder.decode(wanted)
    if not frames_by_index:
        raise InvalidInput(f"{where}: video has no decodable frames (of {len(wanted)} sampled)")
    kept = sorted(frames_by_index)
    rotation = _rotation_of(frames_by_index[kept[0]], stream)
    turns = (rotation // 90) % 4
    rot_w, rot_h = (out_h, out_w) if turns % 2 else (out_w, out_h)
    frames = np.empty((len(kept), rot_h, rot_w, 3), dtype=np.uint8)
    for t, i in enumerate(kept):
        frames[t] = _to_rgb(frames_by_index[i], out_w, out_h, turns)
    return SampledVideo(
        frames=frames,
        indices=tuple(kept),
        fps=stream_fps,
        duration_s=duration,
        total_frames=total,
        header_frames=int(stream.frames or 0),
        rotation=turns * 90,
        source_size=(width, height),
        frames_decoded=decoder.frames_decoded,
        timestamps_s=tuple(times[i] - times[0] for i in kept) if times is not None else
        tuple(i / stream_fps for i in kept),
    )


def _index_packets(container, stream, where: str, deadline: float, timeout_s: float) -> _Index:
    """Demux (never decode) the whole stream: each non-empty packet is one frame."""
    pts, keys = array("q"), array("q")
    no_timestamp = 0
    for n, packet in enumerate(container.demux(stream)):
        if packet.size == 0 or packet.is_discard:  # the final flush packet, an AVI "dropped frame", or a frame
            continue  # an MP4 edit list cuts (its decoder drops it too)
        ts = packet.pts if packet.pts is not None else packet.dts
        if ts is None:
            no_timestamp += 1
            ts = n  # counted in packet order
        pts.append(ts)
        if packet.is_keyframe:
            keys.append(ts)
        if len(pts) > MAX_STREAM_FRAMES:
            raise InvalidInput(f"{where}: video has over {MAX_STREAM_FRAMES} frames (not decoded)")
        if n % 256 == 0:
            _check_deadline(deadline, timeout_s, where)
    by_timestamp = no_timestamp == 0
    if by_timestamp:
        pts = array("q", sorted(set(pts)))
        keys = array("q", sorted(set(keys)))
    else:  # no timestamps to seek by: decoded linearly, frames counted in order
        pts = array("q", range(len(pts)))
        keys = array("q")
    return _Index(pts, keys, by_timestamp)


class _SampledFrameDecoder:
    """Decodes just the frames at given indices: seeks to the keyframe before a wanted frame when that skips
    frames, and stops after the last one. ``frames_decoded`` counts every frame the codec produced."""

    def __init__(self, container, stream, index: _Index, where: str, deadline: float, timeout_s: float):
        self.container, self.stream, self.index = container, stream, index
        self.where, self.deadline, self.timeout_s = where, deadline, timeout_s
        self.frames_decoded = 0
        self.seeks = 0

    def decode(self, wanted: list[int]) -> dict[int, Any]:
        if not self.index.by_timestamp:
            return self._linear(set(wanted))
        got: dict[int, Any] = {}
        pts_list = self.index.pts
        position: int | None = None  # pts of the last frame decoded since the last seek
        frames = None
        k = 0
        while k < len(wanted):
            target = pts_list[wanted[k]]
            if frames is None or self._seek_skips(position, target):
                frames = self._frames_from(target)
                position = None
            frame = next(frames, None)
            if frame is None:  # stream ended: what is left is not decodable
                break
            ts = frame.pts if frame.pts is not None else frame.dts
            if ts is None:
                continue
            position = ts
            # Every wanted frame at or before this timestamp is settled: taken if it is this one, else lost.
            while k < len(wanted) and pts_list[wanted[k]] <= ts:
                if pts_list[wanted[k]] == ts:
                    got[wanted[k]] = frame
                k += 1
        missing = set(wanted) - set(got)
        if missing and self.seeks:  # a seek may have landed late: once more from the start, linearly
            pts_to_index = {pts_list[i]: i for i in missing}
            for frame in self._frames_from(None):
                ts = frame.pts if frame.pts is not None else frame.dts
                if ts in pts_to_index:
                    got[pts_to_index.pop(ts)] = frame
                if not pts_to_index or (ts is not None and ts > max(pts_list[i] for i in missing)):
                    break
        return got

    def _seek_skips(self, position: int | None, target: int) -> bool:
        """Whether seeking to ``target`` lands after where the decoder already is (a keyframe lies between)."""
        keys = self.index.keyframe_pts
        at = bisect_right(keys, target) - 1
        if at < 0:
            return False
        return position is not None and keys[at] > position

    def _frames_from(self, target: int | None):
        """Frames from the keyframe at or before ``target`` (None: from the start)."""
        if target is not None and self.index.keyframe_pts and target > self.index.keyframe_pts[0]:
            self.container.seek(int(target), stream=self.stream, backward=True, any_frame=False)
            self.seeks += 1
        else:
            self.container.seek(0, stream=self.stream, backward=True, any_frame=False)
        return self._frames()

    def _frames(self):
        import av

        for packet in self.container.demux(self.stream):
            try:
                decoded = packet.decode()
            except av.error.InvalidDataError:  # one corrupt packet: FFmpeg itself carries on
                decoded = []
            for frame in decoded:
                self.frames_decoded += 1
                yield frame
            _check_deadline(self.deadline, self.timeout_s, self.where)

    def _linear(self, wanted: set[int]) -> dict[int, Any]:
        got: dict[int, Any] = {}
        last = max(wanted)
        self.container.seek(0, stream=self.stream, backward=True, any_frame=False)
        for n, frame in enumerate(self._frames()):
            if n in wanted:
                got[n] = frame
            if n >= last:
                break
        return got


def _rotation_of(frame, stream) -> int:
    """Degrees counterclockwise that display rotates the coded frame by, rounded to a multiple of 90: the
    display matrix (FFmpeg puts the stream's on every frame), else the legacy ``rotate`` tag (clockwise)."""
    angle = frame.rotation or 0
    if not angle:
        try:
            angle = -int(float(stream.metadata.get("rotate", 0)))
        except ValueError:
            angle = 0
    return int(round(angle / 90.0)) * 90 % 360


def _to_rgb(frame, out_w: int, out_h: int, turns: int) -> np.ndarray:
    from PIL import Image

    image = frame.to_image()  # RGB24 at the coded size
    if image.size != (out_w, out_h):
        image = image.resize((out_w, out_h), Image.Resampling.BOX)  # box = area averaging when shrinking
    rgb = np.asarray(image, dtype=np.uint8)
    return np.rot90(rgb, k=turns) if turns else rgb


def _check_deadline(deadline: float, timeout_s: float, where: str) -> None:
    if time.monotonic() > deadline:
        raise InvalidInput(f"{where}: cannot decode video (decoding took longer than {timeout_s:g} s)")


def video_cache_key(source_key: str, limits: VideoLimits, num_frames: int | None, fps: float | None) -> str:
    sampling = f"n={num_frames}" if num_frames is not None else f"fps={fps!r}"
    return (
        f"video[{sampling},max_frames={limits.max_frames},frame_px={limits.max_frame_pixels},"
        f"total_px={limits.max_total_pixels},max_s={limits.max_seconds!r},src_px={limits.max_source_pixels}]"
        f":{source_key}"
    )


@dataclass(frozen=True)
class VideoDecoder:
    """MediaDecoder for video: the frames sampled by ``num_frames`` or ``fps`` (exactly one), within ``limits``."""

    limits: VideoLimits
    num_frames: int | None = None
    fps: float | None = None
    kind: ClassVar[str] = "video"

    @classmethod
    def for_request(cls, limits: VideoLimits, options: VideoOptions | None, where: str) -> VideoDecoder:
        num_frames, fps = limits.sampling(options, where)
        return cls(limits, num_frames, fps)

    def cache_key(self, source_key: str) -> str:
        return video_cache_key(source_key, self.limits, self.num_frames, self.fps)

    def decode(self, data: bytes, where: str) -> SampledVideo:
        return decode_video(data, where, self.limits, num_frames=self.num_frames, fps=self.fps)

    def nbytes(self, value: SampledVideo) -> int:
        return int(value.frames.nbytes)

"""Decode a video into N sampled frames and M audio segments with PyAV.

Frames are sampled uniformly in time: frame i is the one on screen at the centre of the i-th of
N equal bins of the video. Each is reached by seeking to the keyframe before it and decoding
forward; consecutive targets inside one GOP share that decode. The cost therefore grows with N,
not with the length of the video. Timestamps are presentation times in seconds, so variable frame
rate videos come out right, and the display matrix (phones' rotation) is applied.

Audio is resampled to mono float32 at 16 kHz and cut into M equal segments that cover the video.
A video without audio gets silence and `has_audio=False`.

Nothing here raises for bad input: `decode_clip` returns a `MediaError` with a machine-readable
`reason` and a human message for every kind of broken, missing or unreadable file.
"""

from __future__ import annotations

import bisect
import contextlib
import enum
import io
import math
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import av
import numpy as np

from damo.storage import Reason, Storage, StorageError, parse_uri

if TYPE_CHECKING:
    from damo.config.data import DecodeConfig


class MediaReason(enum.StrEnum):
    EMPTY = "empty_file"
    TRUNCATED = "truncated"
    NOT_MEDIA = "not_media"
    NO_VIDEO = "no_video_stream"
    CORRUPT = "corrupt_stream"
    ABSURD_DIMENSIONS = "absurd_dimensions"
    ZERO_DURATION = "zero_duration"
    NOT_FOUND = "not_found"
    ACCESS_DENIED = "access_denied"
    TIMEOUT = "timeout"
    STORAGE = "storage_error"
    DECODE = "decode_error"
    DECODER_CRASH = "decoder_crash"


# Reasons that are a property of the file's bytes: decoding the same object version again gives
# the same answer, so its error row is final. Every other reason (storage trouble, time limits,
# unexpected exceptions) may pass, and `damo extract --retry-errors` redoes those rows.
# A decoder crash counts as the file's own only after it repeats in a fresh process.
DETERMINISTIC_REASONS = frozenset(
    {
        MediaReason.EMPTY,
        MediaReason.TRUNCATED,
        MediaReason.NOT_MEDIA,
        MediaReason.NO_VIDEO,
        MediaReason.CORRUPT,
        MediaReason.ABSURD_DIMENSIONS,
        MediaReason.ZERO_DURATION,
        MediaReason.DECODER_CRASH,
    }
)


@dataclass(frozen=True)
class MediaError:
    """Why one input could not be decoded. `reason` is for machines, `message` for people."""

    uri: str
    reason: MediaReason
    message: str

    def to_row(self) -> dict[str, str]:
        return {"uri": self.uri, "reason": str(self.reason), "message": self.message}


class MediaFailure(Exception):
    """Raised inside this module, turned into a `MediaError` at the API boundary."""

    def __init__(self, reason: MediaReason, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class ProbeInfo:
    duration: float
    fps: float
    width: int  # as displayed, i.e. after rotation
    height: int
    rotation: int  # counter-clockwise degrees from the display matrix
    video_codec: str
    audio_codec: str | None
    audio_sample_rate: int | None
    audio_channels: int | None
    num_frames: int | None  # from the container header; None when unknown
    streams: tuple[str, ...]  # e.g. ("video:h264", "audio:aac")
    container: str
    size_bytes: int

    @property
    def has_audio(self) -> bool:
        return self.audio_codec is not None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["streams"] = list(self.streams)
        return out


@dataclass
class DecodedClip:
    """What the encoders need from one video; every array is numpy.

    frames: (N, 3, S, S) uint8 RGB, or float32 normalised with `normalize_frames=True`.
    frame_times: (N,) float64 seconds, presentation times of the frames returned.
    audio: (M, L) float32 mono at `sample_rate`; segment k is centred on its bounds' centre.
    segment_bounds: (M, 2) float64 seconds [start, end); together they cover [0, duration].
    """

    uri: str
    probe: ProbeInfo
    frames: np.ndarray
    frame_times: np.ndarray
    audio: np.ndarray
    segment_bounds: np.ndarray
    sample_rate: int
    has_audio: bool
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def duration(self) -> float:
        return self.probe.duration


# ---- opening -------------------------------------------------------------------------------
STORAGE_REASONS = {
    Reason.NOT_FOUND: MediaReason.NOT_FOUND,
    Reason.NO_BUCKET: MediaReason.NOT_FOUND,
    Reason.PERMISSION: MediaReason.ACCESS_DENIED,
    Reason.AUTH: MediaReason.ACCESS_DENIED,
}

# Leading bytes of containers we know; a file that has one but will not open is damaged, not
# "some other kind of file".
_CONTAINER_MAGIC = (
    (4, b"ftyp"),  # mp4 / mov
    (4, b"moov"),
    (4, b"mdat"),
    (4, b"free"),
    (0, b"\x1a\x45\xdf\xa3"),  # matroska / webm
    (0, b"RIFF"),  # avi
    (0, b"OggS"),
    (0, b"FLV"),
)


def _looks_like_container(head: bytes) -> bool:
    return any(head[offset : offset + len(magic)] == magic for offset, magic in _CONTAINER_MAGIC)


class _RangeFile(io.RawIOBase):
    """A seekable, read-only view of a remote object; each read is one ranged GET.

    Wrapped in a large `io.BufferedReader`, it lets PyAV seek inside a big S3 object and fetch
    only the parts it decodes instead of downloading the whole object.
    """

    def __init__(self, native_file):
        self._file = native_file

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self._file.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()

    def close(self) -> None:
        if not self.closed:
            self._file.close()
        super().close()


def _read_source(
    uri: str, storage: Storage | None, stream_min_bytes: int | None = None
) -> tuple[Any, int, bytes]:
    """(something av.open accepts, size in bytes, first bytes).

    Local files are opened in place. Remote objects are downloaded, unless they are at least
    `stream_min_bytes` long: then they are read by ranges, only where the decoder looks.
    """
    storage = storage or Storage()
    try:
        loc = parse_uri(uri)
        if loc.scheme == "file":
            size = storage.stat(uri)["size"]
            head = storage.read_bytes(uri, 0, 16) if size else b""
            return loc.path, size, head
        if stream_min_bytes is not None:
            size = storage.stat(uri)["size"]
            if size >= stream_min_bytes and size > 0:
                fs, path = storage.pyarrow_filesystem(uri)
                reader = io.BufferedReader(_RangeFile(fs.open_input_file(path)), 1 << 20)
                return reader, size, reader.peek(16)[:16]
        data = storage.read_bytes(uri)
        return io.BytesIO(data), len(data), data[:16]
    except StorageError as err:
        reason = STORAGE_REASONS.get(err.reason, MediaReason.STORAGE)
        raise MediaFailure(reason, f"cannot read {uri}: {err.reason.value}: {err.detail}") from err


def _closing(source):
    """Close a file object source afterwards; a path needs nothing."""
    return contextlib.closing(source) if hasattr(source, "close") else contextlib.nullcontext()


def _open(source: Any, size: int, head: bytes) -> av.container.InputContainer:
    if size == 0:
        raise MediaFailure(MediaReason.EMPTY, "the file is empty (0 bytes)")
    try:
        return av.open(source, mode="r", metadata_errors="ignore")
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError) as err:
        if _looks_like_container(head):
            raise MediaFailure(
                MediaReason.TRUNCATED,
                f"the file starts like a video container but cannot be opened "
                f"(truncated or damaged header): {err}",
            ) from err
        raise MediaFailure(MediaReason.NOT_MEDIA, f"not a media file: {err}") from err


def _probe(container: av.container.InputContainer, size: int, max_w: int, max_h: int) -> ProbeInfo:
    if not container.streams.video:
        kinds = ", ".join(s.type for s in container.streams) or "none"
        raise MediaFailure(MediaReason.NO_VIDEO, f"no video stream (streams: {kinds})")
    video = container.streams.video[0]
    audio = container.streams.audio[0] if container.streams.audio else None
    if audio is not None and audio.codec_context is None:
        audio = None  # an audio track we cannot decode counts as none; the video still can be
    if video.codec_context is None:
        raise MediaFailure(
            MediaReason.TRUNCATED,
            "the video stream has no codec parameters: the header is incomplete "
            "(truncated or damaged)",
        )
    width, height = video.codec_context.width, video.codec_context.height
    if width <= 0 or height <= 0:
        raise MediaFailure(MediaReason.CORRUPT, f"video stream has no size ({width}x{height})")
    if width > max_w or height > max_h:
        raise MediaFailure(
            MediaReason.ABSURD_DIMENSIONS,
            f"{width}x{height} exceeds the limit of {max_w}x{max_h}",
        )
    # The container's duration (what ffprobe calls the format duration) spans all streams;
    # the video stream's own is the fallback.
    duration = container.duration / av.time_base if container.duration else 0.0
    if duration <= 0 and video.duration and video.time_base:
        duration = float(video.duration * video.time_base)
    if duration <= 0:
        raise MediaFailure(MediaReason.ZERO_DURATION, "the video has no frames or zero duration")
    _check_index_fits(container, video, size)
    rotation = _rotation(container, video)
    if rotation % 180:
        width, height = height, width
    fps = float(video.average_rate or video.guessed_rate or 0)
    return ProbeInfo(
        duration=duration,
        fps=fps,
        width=width,
        height=height,
        rotation=rotation,
        video_codec=video.codec_context.name,
        audio_codec=audio.codec_context.name if audio else None,
        audio_sample_rate=audio.codec_context.sample_rate if audio else None,
        audio_channels=audio.codec_context.channels if audio else None,
        num_frames=video.frames or None,
        streams=tuple(f"{s.type}:{_codec_name(s)}" for s in container.streams),
        container=container.format.name,
        size_bytes=size,
    )


def _codec_name(stream) -> str:
    return stream.codec_context.name if stream.codec_context is not None else "unknown"


def _check_index_fits(container, video, size: int) -> None:
    """A header that indexes bytes past the end of the file means the file was cut short."""
    entries = video.index_entries or []
    if entries and size:
        end = max(e.pos + e.size for e in entries)
        if end > size:
            raise MediaFailure(
                MediaReason.TRUNCATED,
                f"the index needs {end} bytes but the file has {size} (truncated)",
            )


def _rotation(container, video) -> int:
    """Counter-clockwise display rotation in degrees, a multiple of 90 (from the first frame)."""
    try:
        frame = next(container.decode(video))
        degrees = int(round(frame.rotation or 0))
    except (StopIteration, av.error.FFmpegError):
        degrees = 0  # a broken first frame is reported by sampling, with its time
    return (round(degrees / 90) * 90) % 360


def probe(uri: str, storage: Storage | None = None) -> ProbeInfo | MediaError:
    """Duration, fps, size, rotation and streams of one video, or why it cannot be read."""
    try:
        source, size, head = _read_source(uri, storage)
        with _closing(source), _open(source, size, head) as container:
            return _probe(container, size, 1 << 30, 1 << 30)
    except MediaFailure as err:
        return MediaError(uri, err.reason, err.message)
    except Exception as err:  # never crash on bad media
        return MediaError(uri, MediaReason.DECODE, f"unexpected {type(err).__name__}: {err}")


# ---- sampling ------------------------------------------------------------------------------
def uniform_times(duration: float, num: int) -> np.ndarray:
    """Centres of `num` equal bins of [0, duration]: strictly increasing and inside the video."""
    return (np.arange(num) + 0.5) * (duration / num)


def segment_bounds(duration: float, num: int) -> np.ndarray:
    """(num, 2) [start, end) of `num` equal segments covering [0, duration]."""
    edges = np.linspace(0.0, duration, num + 1)
    return np.stack([edges[:-1], edges[1:]], axis=1)


class _Deadline:
    def __init__(self, seconds: float):
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def check(self) -> None:
        if time.monotonic() > self.end:
            raise MediaFailure(
                MediaReason.TIMEOUT, f"decoding took longer than {self.seconds:g} s (time limit)"
            )


def _keyframe_times(video) -> list[float]:
    entries = video.index_entries or []
    tb = float(video.time_base)
    start = float(video.start_time or 0) * tb
    return sorted(e.timestamp * tb - start for e in entries if e.is_keyframe)


def _next_frame(decoder, start: float, near: float, deadline: _Deadline):
    """(frame, seconds) of the next decodable frame, or None at the end of the stream."""
    while True:
        deadline.check()
        try:
            frame = next(decoder)
        except StopIteration:
            return None
        except av.error.FFmpegError as err:
            raise MediaFailure(
                MediaReason.CORRUPT, f"decode error near {near:.2f} s: {err}"
            ) from err
        if frame.is_corrupt:
            raise MediaFailure(MediaReason.CORRUPT, f"corrupt frame near {near:.2f} s")
        if frame.pts is not None:
            return frame, frame.time - start


def _seek(container, video, target: float, start: float, deadline: _Deadline):
    """(decoder, its first frame) with that frame at or before `target`.

    An indexed container lands on the keyframe before the target at once; where a seek lands
    late (a poor or missing index), step further back.
    """
    back = 0.0
    while True:
        at = max(0.0, target - back)
        container.seek(int((at + start) / float(video.time_base)), stream=video, backward=True)
        decoder = container.decode(video)
        first = _next_frame(decoder, start, target, deadline)
        landed = first is not None and first[1] <= target + _EPSILON
        if landed or at == 0.0 or back >= 64.0:
            return decoder, first
        back = max(1.0, back * 4)


_EPSILON = 1e-6


def sample_frames(
    container: av.container.InputContainer,
    targets: np.ndarray,
    deadline: _Deadline,
    duration: float | None = None,
) -> tuple[list[av.VideoFrame], list[float]]:
    """The frame on screen at each target time (seconds), by seek + forward decode.

    A seek happens only when a keyframe lies between the last decoded frame and the target
    (or, without an index, when the target is more than 2 s ahead); otherwise decoding simply
    continues, so targets inside one GOP share its decode. When the frames stop well before the
    `duration` the header promises, the file was cut short (containers without an index).
    """
    video = container.streams.video[0]
    start = float((video.start_time or 0) * video.time_base)
    keyframes = _keyframe_times(video)
    frames: list[av.VideoFrame] = []
    times: list[float] = []
    decoder = None
    previous = None  # (frame, seconds): the last decoded frame at or before the last target
    lookahead = None  # (frame, seconds): a decoded frame after it
    for target in targets:
        here = previous[1] if previous else None
        key = keyframes[bisect.bisect_right(keyframes, target) - 1] if keyframes else None
        must_seek = (
            decoder is None
            or here is None
            or target < here
            or (key is not None and key > here)
            or (key is None and target - here > 2.0)
        )
        if must_seek:
            decoder, lookahead = _seek(container, video, target, start, deadline)
            previous = None
        while True:
            if lookahead is None:
                lookahead = _next_frame(decoder, start, target, deadline)
                if lookahead is None:
                    _check_not_cut_short(previous, target, duration)
                    break  # end of stream: the last frame stays on screen
            if lookahead[1] > target + _EPSILON:
                break
            previous, lookahead = lookahead, None
        if previous is None and lookahead is not None:
            # the seek landed after the target even from the start: the closest frame we have
            previous, lookahead = lookahead, None
        if previous is None:
            raise MediaFailure(
                MediaReason.TRUNCATED, f"no frame could be decoded at or before {target:.2f} s"
            )
        frames.append(previous[0])
        times.append(previous[1])
    return frames, times


def _check_not_cut_short(last, target: float, duration: float | None) -> None:
    if last is None or duration is None:
        return
    if target - last[1] > max(2.0, 0.1 * duration):
        raise MediaFailure(
            MediaReason.TRUNCATED,
            f"the frames end at {last[1]:.2f} s but the header says {duration:.2f} s (truncated)",
        )


def frame_to_array(
    frame: av.VideoFrame, rotation: int, size: int, mode: str = "center_crop"
) -> np.ndarray:
    """(3, size, size) uint8 RGB as displayed: rotated, then resized (and cropped)."""
    coded_w, coded_h = frame.width, frame.height
    shown_w, shown_h = (coded_h, coded_w) if rotation % 180 else (coded_w, coded_h)
    if mode == "squash":
        out_w = out_h = size
    else:
        scale = size / min(shown_w, shown_h)
        out_w, out_h = max(size, round(shown_w * scale)), max(size, round(shown_h * scale))
    coded_out = (out_h, out_w) if rotation % 180 else (out_w, out_h)
    array = frame.reformat(
        width=coded_out[0], height=coded_out[1], format="rgb24", interpolation="BILINEAR"
    ).to_ndarray()
    if rotation:
        array = np.rot90(array, k=rotation // 90)
    top, left = (array.shape[0] - size) // 2, (array.shape[1] - size) // 2
    array = array[top : top + size, left : left + size]
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def normalize(frames: np.ndarray, mean, std) -> np.ndarray:
    """uint8 (..., 3, H, W) -> float32 (x / 255 - mean) / std per channel."""
    mean = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)
    return (frames.astype(np.float32) / 255.0 - mean) / std


_AUDIO_PRE_ROLL_S = 0.25  # decoded before a window and dropped: AAC frames overlap their neighbours


def read_audio(
    container: av.container.InputContainer,
    duration: float,
    sample_rate: int,
    deadline: _Deadline,
) -> np.ndarray | None:
    """The whole audio track as mono float32 at `sample_rate`, aligned to t=0 of the video."""
    if not container.streams.audio:
        return None
    track = np.zeros(int(math.ceil(duration * sample_rate)), dtype=np.float32)
    _decode_audio_span(container, track, 0, sample_rate, deadline, 0.0, None)
    return track


def _decode_audio_span(container, target, origin, sample_rate, deadline, start, end) -> None:
    """Decode [start, end) seconds (end None: to the end) into `target`, whose item i is the sample
    at `origin + i` of the track (t=0 of the video is sample 0)."""
    stream = container.streams.audio[0]
    video = container.streams.video[0]
    video_start = float((video.start_time or 0) * video.time_base)
    seek_to = start - _AUDIO_PRE_ROLL_S
    if seek_to > 0:
        offset = int((seek_to + video_start) / float(stream.time_base))
        container.seek(offset, stream=stream, backward=True)
    else:
        container.seek(0)
    resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
    chunks: list[np.ndarray] = []
    first = None
    try:
        for frame in container.decode(stream):
            deadline.check()
            if first is None:
                if frame.pts is None:
                    continue
                first = int(round((frame.time - video_start) * sample_rate))
            chunks.extend(piece.to_ndarray().reshape(-1) for piece in resampler.resample(frame))
            if end is not None and frame.time - video_start > end:
                break
        chunks.extend(piece.to_ndarray().reshape(-1) for piece in resampler.resample(None))
    except av.error.FFmpegError as err:
        raise MediaFailure(
            MediaReason.CORRUPT, f"audio decode error near {start:.2f} s: {err}"
        ) from err
    if first is None or not chunks:
        return
    samples = np.concatenate(chunks)
    lo = max(origin, int(round(start * sample_rate)), first)
    hi = min(origin + target.size, first + samples.size)
    if end is not None:
        hi = min(hi, int(round(end * sample_rate)))
    if hi > lo:
        target[lo - origin : hi - origin] = samples[lo - first : hi - first]


def segment_samples(bounds: np.ndarray, sample_rate: int, max_seconds: float | None) -> int:
    """Samples per audio segment: the longest segment, capped at `max_seconds`."""
    length = int(math.ceil(((bounds[:, 1] - bounds[:, 0]) * sample_rate).max()))
    if max_seconds is not None:
        length = min(length, int(round(max_seconds * sample_rate)))
    return length


def _segment_starts(bounds: np.ndarray, sample_rate: int, length: int) -> list[int]:
    """First sample of each segment: `length` samples centred on the segment's bounds."""
    return [int(round((start + end) / 2 * sample_rate - length / 2)) for start, end in bounds]


def cut_segments(
    track: np.ndarray, bounds: np.ndarray, sample_rate: int, max_seconds: float | None
) -> np.ndarray:
    """(M, L) equal-length segments; each centred on its bounds, zero-padded at the edges."""
    length = segment_samples(bounds, sample_rate, max_seconds)
    out = np.zeros((len(bounds), length), dtype=np.float32)
    for k, first in enumerate(_segment_starts(bounds, sample_rate, length)):
        lo, hi = max(0, first), min(track.size, first + length)
        if hi > lo:
            out[k, lo - first : hi - first] = track[lo:hi]
    return out


def audio_segments(
    container: av.container.InputContainer,
    duration: float,
    bounds: np.ndarray,
    sample_rate: int,
    max_seconds: float | None,
    deadline: _Deadline,
) -> np.ndarray | None:
    """The (M, L) audio segments, or None without an audio track.

    When the segments keep less than half of the track (long videos, capped segments), only
    their spans are decoded, one seek each, and the whole track is never held in memory;
    otherwise one pass decodes the track. Both give the same samples.
    """
    if not container.streams.audio:
        return None
    length = segment_samples(bounds, sample_rate, max_seconds)
    if len(bounds) * length > duration * sample_rate / 2:
        return cut_segments(
            read_audio(container, duration, sample_rate, deadline), bounds, sample_rate, max_seconds
        )
    total = int(math.ceil(duration * sample_rate))
    out = np.zeros((len(bounds), length), dtype=np.float32)
    for k, first in enumerate(_segment_starts(bounds, sample_rate, length)):
        start, end = max(0, first), min(total, first + length)
        if end > start:
            _decode_audio_span(
                container, out[k], first, sample_rate, deadline,
                start / sample_rate, end / sample_rate,
            )  # fmt: skip
    return out


# ---- the API -------------------------------------------------------------------------------
def decode_clip(
    uri: str,
    storage: Storage | None = None,
    num_frames: int = 24,
    num_segments: int = 8,
    image_size: int = 224,
    resize_mode: str = "center_crop",
    normalize_frames: bool = False,
    mean=(0.48145466, 0.4578275, 0.40821073),
    std=(0.26862954, 0.26130258, 0.27577711),
    sample_rate: int = 16000,
    max_segment_seconds: float | None = 30.0,
    time_limit_s: float = 60.0,
    max_width: int = 7680,
    max_height: int = 7680,
    threads: int = 1,
    with_audio: bool = True,
    stream_min_mb: float | None = 64.0,
) -> DecodedClip | MediaError:
    """Decode one video for the encoders; never raises for bad input (returns a MediaError).

    The time limit is checked between packets, so a file that is slow to decode stops soon
    after the limit; it cannot interrupt a single blocking read. Remote objects of at least
    `stream_min_mb` are read by byte ranges where the decoder seeks (None: always download).
    """
    deadline = _Deadline(time_limit_s)
    timings: dict[str, float] = {}
    tick = time.perf_counter()
    try:
        stream_min_bytes = None if stream_min_mb is None else int(stream_min_mb * (1 << 20))
        source, size, head = _read_source(uri, storage, stream_min_bytes)
        timings["read_s"] = time.perf_counter() - tick
        with _closing(source), _open(source, size, head) as container:
            if container.streams.video and threads != 1:
                # must be set before the first decode opens the codec
                container.streams.video[0].thread_type = "AUTO"
                container.streams.video[0].codec_context.thread_count = threads
            info = _probe(container, size, max_width, max_height)
            tick = time.perf_counter()
            targets = uniform_times(info.duration, num_frames)
            frames, times = sample_frames(container, targets, deadline, info.duration)
            arrays = np.stack(
                [frame_to_array(f, info.rotation, image_size, resize_mode) for f in frames]
            )
            if normalize_frames:
                arrays = normalize(arrays, mean, std)
            timings["frames_s"] = time.perf_counter() - tick
            tick = time.perf_counter()
            bounds = segment_bounds(info.duration, num_segments)
            audio = (
                audio_segments(
                    container, info.duration, bounds, sample_rate, max_segment_seconds, deadline
                )
                if with_audio and info.has_audio
                else None
            )
            has_audio = audio is not None
            if audio is None:
                length = segment_samples(bounds, sample_rate, max_segment_seconds)
                audio = np.zeros((num_segments, length), np.float32)
            timings["audio_s"] = time.perf_counter() - tick
    except MediaFailure as err:
        return MediaError(uri, err.reason, err.message)
    except av.error.FFmpegError as err:
        return MediaError(uri, MediaReason.DECODE, f"{type(err).__name__}: {err}")
    except Exception as err:  # bad media must never crash a job: record what happened instead
        return MediaError(uri, MediaReason.DECODE, f"unexpected {type(err).__name__}: {err}")
    return DecodedClip(
        uri=uri,
        probe=info,
        frames=arrays,
        frame_times=np.asarray(times, dtype=np.float64),
        audio=audio,
        segment_bounds=bounds,
        sample_rate=sample_rate,
        has_audio=has_audio,
        timings=timings,
    )


def decode_with_config(
    uri: str, config: DecodeConfig, storage: Storage | None = None, **overrides
) -> DecodedClip | MediaError:
    """`decode_clip` with the settings of a `DecodeConfig` (data.decode in DamoConfig)."""
    kwargs = config.model_dump()
    kwargs.update(overrides)
    return decode_clip(uri, storage, **kwargs)

"""A corpus of good and deliberately broken media, each with the error reason it must produce.

Tests of decoding and the extraction acceptance test use it: every bad kind the pipeline must
survive (empty, truncated, not a video, audio only, corrupt packets, absurd size, zero duration,
missing, access denied) next to good clips (with audio, without, rotated, variable frame rate).
"""

from __future__ import annotations

import io
import json
import os
import struct
from dataclasses import dataclass

import av
import numpy as np

from damo.media.decode import MediaReason
from damo.media.encode import encode_mp4
from damo.storage import Storage, join, parse_uri


@dataclass(frozen=True)
class CorpusItem:
    name: str
    uri: str
    expected: MediaReason | None  # None: decodes fine

    @property
    def is_bad(self) -> bool:
        return self.expected is not None


def _noise_frames(rng: np.random.Generator, count: int, size=(64, 64)) -> list[np.ndarray]:
    # Noisy frames: nearly every bit of the stream matters, so corrupt bytes cannot be
    # concealed by the decoder and must surface as errors.
    return [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(count)]


def _moving_bar_frames(count: int, size=(48, 64)) -> list[np.ndarray]:
    frames = []
    for i in range(count):
        frame = np.full((*size, 3), 30, np.uint8)
        frame[:, (i * 3) % size[1] : (i * 3) % size[1] + 6] = (220, 60, 60)
        frames.append(frame)
    return frames


def _tone(seconds: float, hz: float = 440.0, rate: int = 16000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def audio_only_mp4(seconds: float = 3.0, rate: int = 16000) -> bytes:
    buffer = io.BytesIO()
    samples = _tone(seconds, rate=rate)[None, :]
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=rate)
        stream.layout = "mono"
        for offset in range(0, samples.shape[1], 1024):
            piece = np.ascontiguousarray(samples[:, offset : offset + 1024])
            frame = av.AudioFrame.from_ndarray(piece, format="fltp", layout="mono")
            frame.sample_rate, frame.pts = rate, offset
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def zero_duration_mp4() -> bytes:
    """A one-frame mp4 whose header says it lasts 0 s (durations and sample deltas zeroed)."""
    data = bytearray(encode_mp4([np.zeros((64, 64, 3), np.uint8)], fps=8))
    moov = data.find(b"moov")

    def zero_field(tag: bytes, offset_in_box: int) -> None:
        at = data.find(tag, moov)
        while at != -1:
            box = at - 4
            data[box + offset_in_box : box + offset_in_box + 4] = bytes(4)
            at = data.find(tag, at + 4)

    zero_field(b"mvhd", 24)  # version-0 boxes: duration after the timescale
    zero_field(b"mdhd", 24)
    zero_field(b"tkhd", 28)
    for tag, first, stride in ((b"stts", 4, 8), (b"elst", 0, 12)):
        at = data.find(tag, moov)
        if at == -1:
            continue
        (count,) = struct.unpack(">I", data[at + 8 : at + 12])
        for k in range(count):
            field_at = at + 12 + stride * k + first
            data[field_at : field_at + 4] = bytes(4)
    return bytes(data)


def _deny_prefix(storage: Storage, prefix_uri: str) -> bool:
    """Make reads under an s3:// prefix fail with AccessDenied (a bucket policy).

    Local files cannot be made unreadable for root, so there the item is left out.
    """
    loc = parse_uri(prefix_uri)
    if loc.scheme == "file":
        return hasattr(os, "geteuid") and os.geteuid() != 0
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Deny",
                "Principal": "*",
                "Action": "s3:GetObject",
                "Resource": f"arn:aws:s3:::{loc.bucket}/{loc.key.rstrip('/')}/*",
            }
        ],
    }
    storage.client.put_bucket_policy(Bucket=loc.bucket, Policy=json.dumps(policy))
    return True


def build_media_corpus(root: str, storage: Storage, seed: int = 0) -> list[CorpusItem]:
    """Write good and bad media under `root` and return each item with its expected reason.

    On S3 the access-denied item sets a bucket policy denying reads under `root/denied/`
    (the bucket's policy is replaced). Running as root on local disk, that item is omitted.
    """
    rng = np.random.default_rng(seed)
    storage.ensure_bucket(root)
    noise = encode_mp4(_noise_frames(rng, 48), fps=8, audio=_tone(6.0), gop_seconds=1.0)
    good = encode_mp4(_moving_bar_frames(40), fps=8, audio=_tone(5.0, 660.0))
    faststart = encode_mp4(_moving_bar_frames(40), fps=8, audio=_tone(5.0), faststart=True)
    corrupt = bytearray(noise)
    third = len(corrupt) // 3
    corrupt[third : 2 * third] = rng.integers(0, 256, third, dtype=np.uint8).tobytes()
    matroska = encode_mp4(
        _moving_bar_frames(80), fps=8, audio=_tone(10.0), container_format="matroska"
    )
    vfr_times = np.cumsum(np.r_[0.0, rng.uniform(0.05, 0.3, 39)])

    files: list[tuple[str, bytes, MediaReason | None]] = [
        ("good_av.mp4", good, None),
        ("good_no_audio.mp4", encode_mp4(_moving_bar_frames(32), fps=8), None),
        ("good_rotated.mp4", encode_mp4(_moving_bar_frames(32), fps=8, rotation=90), None),
        (
            "good_vfr.mp4",
            encode_mp4(_moving_bar_frames(40), fps=8, frame_times=vfr_times, audio=_tone(4)),
            None,
        ),
        ("empty.mp4", b"", MediaReason.EMPTY),
        ("truncated.mp4", good[: len(good) * 6 // 10], MediaReason.TRUNCATED),
        ("truncated_faststart.mp4", faststart[: len(faststart) * 6 // 10], MediaReason.TRUNCATED),
        # no index to check: the frames stop long before the duration the header promises
        ("truncated_matroska.mkv", matroska[: len(matroska) // 2], MediaReason.TRUNCATED),
        ("not_a_video.mp4", b"this is a text file, not a video\n" * 64, MediaReason.NOT_MEDIA),
        ("audio_only.mp4", audio_only_mp4(), MediaReason.NO_VIDEO),
        ("corrupt_middle.mp4", bytes(corrupt), MediaReason.CORRUPT),
        (
            "absurd_dimensions.mp4",
            encode_mp4([np.zeros((16, 8208, 3), np.uint8)] * 2, fps=8),
            MediaReason.ABSURD_DIMENSIONS,
        ),
        ("zero_duration.mp4", zero_duration_mp4(), MediaReason.ZERO_DURATION),
    ]
    items = []
    for name, data, expected in files:
        uri = join(root, name)
        storage.write_bytes(uri, data)
        items.append(CorpusItem(os.path.splitext(name)[0], uri, expected))
    items.append(CorpusItem("missing", join(root, "missing.mp4"), MediaReason.NOT_FOUND))

    denied_root = join(root, "denied")
    denied_uri = join(denied_root, "clip.mp4")
    storage.write_bytes(denied_uri, good)
    if _deny_prefix(storage, denied_root):
        loc = parse_uri(denied_uri)
        if loc.scheme == "file":
            os.chmod(loc.path, 0)
        items.append(CorpusItem("access_denied", denied_uri, MediaReason.ACCESS_DENIED))
    return items

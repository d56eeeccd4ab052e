"""Write mp4 files (H.264 video + AAC audio) from numpy arrays with PyAV.

Used by the synthetic world, the bad-media corpus and the benchmarks; no system ffmpeg needed.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Iterable
from fractions import Fraction

import av
import numpy as np


def encode_mp4(
    frames: Iterable[np.ndarray],
    fps: float,
    audio: np.ndarray | None = None,
    sample_rate: int = 16000,
    frame_times: Iterable[float] | None = None,
    gop_seconds: float = 2.0,
    crf: int = 23,
    rotation: int = 0,
    preset: str = "veryfast",
    faststart: bool = False,
    codec: str = "libx264",
    audio_bitrate: int = 48000,
    container_format: str = "mp4",
) -> bytes:
    """Encode RGB frames (H, W, 3 uint8) and optional mono float audio into mp4 bytes.

    `frame_times` (seconds, increasing) gives each frame its own timestamp, which makes a
    variable-frame-rate video; by default frame i is at i / fps. `rotation` (counter-clockwise
    degrees) is stored as the display matrix, as phones do. `faststart` puts the index first.
    `container_format` other than mp4 ("matroska", "mpegts") serves tests of other containers.
    """
    settings = dict(
        frames=frames,
        fps=fps,
        audio=audio,
        sample_rate=sample_rate,
        frame_times=frame_times,
        gop_seconds=gop_seconds,
        crf=crf,
        rotation=rotation,
        preset=preset,
        codec=codec,
        audio_bitrate=audio_bitrate,
        container_format=container_format,
    )
    if faststart:
        # faststart rewrites the file to move the index first, which needs a real file.
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "clip.mp4")
            _encode(path, {"movflags": "faststart"}, **settings)
            with open(path, "rb") as f:
                return f.read()
    buffer = io.BytesIO()
    _encode(buffer, {}, **settings)
    return buffer.getvalue()


def _encode(
    target,
    options,
    frames,
    fps,
    audio,
    sample_rate,
    frame_times,
    gop_seconds,
    crf,
    rotation,
    preset,
    codec,
    audio_bitrate,
    container_format,
) -> None:
    with av.open(target, "w", format=container_format, options=options) as container:
        frames = iter(frames)
        first = next(frames)
        height, width = first.shape[:2]
        # A fine time base so that VFR timestamps keep their precision.
        time_base_den = 1000 if frame_times is not None else int(round(fps))
        video = container.add_stream(codec, rate=int(round(fps)))
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.codec_context.time_base = Fraction(1, time_base_den)
        video.gop_size = max(1, int(round(gop_seconds * fps)))
        if codec == "libx264":
            video.options = {"crf": str(crf), "preset": preset, "bf": "0"}
        if rotation:
            video.set_display_rotation(rotation)
        audio_stream = None
        if audio is not None:
            audio_stream = container.add_stream("aac", rate=sample_rate)
            audio_stream.layout = "mono"
            audio_stream.bit_rate = audio_bitrate
        times = iter(frame_times) if frame_times is not None else None
        samples = None if audio is None else np.asarray(audio, dtype=np.float32).reshape(1, -1)
        audio_done = 0
        chunk = 1024  # one AAC frame

        def encode_audio_until(seconds: float) -> None:
            # Interleave audio with video as a real recording would be.
            nonlocal audio_done
            if audio_stream is None:
                return
            stop = min(samples.shape[1], seconds * sample_rate)
            while audio_done < stop:
                piece = np.ascontiguousarray(samples[:, audio_done : audio_done + chunk])
                frame = av.AudioFrame.from_ndarray(piece, format="fltp", layout="mono")
                frame.sample_rate = sample_rate
                frame.pts = audio_done
                audio_done += piece.shape[1]
                for packet in audio_stream.encode(frame):
                    container.mux(packet)

        def all_frames():
            yield first
            yield from frames

        for index, array in enumerate(all_frames()):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")
            seconds = next(times) if times is not None else index / fps
            frame.pts = int(round(seconds * time_base_den))
            frame.time_base = video.codec_context.time_base
            encode_audio_until(seconds)
            for packet in video.encode(frame):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
        if audio_stream is not None:
            encode_audio_until(float("inf"))
            for packet in audio_stream.encode():
                container.mux(packet)

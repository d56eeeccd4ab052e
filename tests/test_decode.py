"""Decoding: frame sampling by seeking, audio segments, rotation, VFR, and every bad kind."""

from __future__ import annotations

import json

import av
import numpy as np
import pytest

from damo.config.data import DecodeConfig
from damo.data.badmedia import build_media_corpus
from damo.media.decode import (
    DecodedClip,
    MediaError,
    MediaReason,
    decode_clip,
    decode_with_config,
    frame_to_array,
    probe,
    uniform_times,
)
from damo.media.encode import encode_mp4
from damo.storage import Storage


@pytest.fixture(scope="module")
def bunny(fixtures_dir):
    return str(fixtures_dir / "media" / "bigbuckbunny.mp4")


def test_bigbuckbunny_acceptance(bunny):
    clip = decode_clip(bunny, num_frames=24, num_segments=8, image_size=64)
    assert isinstance(clip, DecodedClip), clip
    assert clip.duration == pytest.approx(5.31, abs=0.05)
    assert clip.has_audio and clip.probe.has_audio
    assert clip.probe.width == 1280 and clip.probe.height == 720 and clip.probe.rotation == 0
    assert clip.frames.shape == (24, 3, 64, 64) and clip.frames.dtype == np.uint8
    times = clip.frame_times
    assert times.shape == (24,)
    assert np.all(np.diff(times) > 0)
    assert times[0] >= 0 and times[-1] < clip.duration
    bounds = clip.segment_bounds
    assert bounds.shape == (8, 2)
    assert bounds[0, 0] == 0 and bounds[-1, 1] == pytest.approx(clip.duration)
    np.testing.assert_allclose(bounds[1:, 0], bounds[:-1, 1])  # contiguous: they cover it
    assert clip.audio.shape[0] == 8 and clip.audio.dtype == np.float32
    assert clip.audio.shape[1] == pytest.approx(clip.duration / 8 * 16000, abs=1)
    assert np.abs(clip.audio).max(axis=1).min() > 0  # real sound in every segment


def test_sampled_frames_equal_a_full_decode(bunny):
    """Seeking must pick exactly the frame a full decode shows at each target time."""
    clip = decode_clip(bunny, num_frames=24, image_size=32, with_audio=False)
    with av.open(bunny) as container:
        full = [(f.time, frame_to_array(f, 0, 32)) for f in container.decode(video=0)]
    full_times = np.array([t for t, _ in full])
    for target, got_time, got in zip(
        uniform_times(clip.duration, 24), clip.frame_times, clip.frames, strict=True
    ):
        index = np.searchsorted(full_times, target, side="right") - 1
        assert got_time == pytest.approx(full_times[index])
        np.testing.assert_array_equal(got, full[index][1])


def test_probe_and_config(bunny):
    info = probe(bunny)
    assert info.fps == pytest.approx(25) and info.streams == ("video:h264", "audio:aac")
    clip = decode_with_config(
        bunny, DecodeConfig(num_frames=4, num_segments=2, image_size=16), normalize_frames=True
    )
    assert clip.frames.shape == (4, 3, 16, 16) and clip.frames.dtype == np.float32
    assert -3 < clip.frames.min() < clip.frames.max() < 3
    assert clip.audio.shape[0] == 2


def _bar_frames(count, height=32, width=48):
    frames = []
    for i in range(count):
        frame = np.zeros((height, width, 3), np.uint8)
        frame[:, :8] = 255  # a white band on the left edge
        frame[0, 0] = i  # makes every frame distinct
        frames.append(frame)
    return frames


def test_rotation_is_applied(tmp_path):
    path = tmp_path / "rot.mp4"
    path.write_bytes(encode_mp4(_bar_frames(16), fps=8, rotation=90))
    clip = decode_clip(str(path), num_frames=2, image_size=24, resize_mode="squash")
    assert clip.probe.rotation == 90 and (clip.probe.width, clip.probe.height) == (32, 48)
    frame = clip.frames[0, 0].astype(int)
    # 90 degrees counter-clockwise: the left band ends up along the bottom edge.
    assert frame[-3:].mean() > 200 and frame[:3].mean() < 50


def test_variable_frame_rate_uses_presentation_times(tmp_path):
    times = np.array([0.0, 0.1, 0.15, 1.0, 1.05, 2.5, 2.6, 4.0, 4.9, 5.0])
    frames = [np.full((16, 16, 3), 20 * i, np.uint8) for i in range(len(times))]
    path = tmp_path / "vfr.mp4"
    path.write_bytes(encode_mp4(frames, fps=8, frame_times=times))
    clip = decode_clip(str(path), num_frames=5, image_size=16, resize_mode="squash")
    for target, got in zip(uniform_times(clip.duration, 5), clip.frame_times, strict=True):
        assert got == pytest.approx(times[np.searchsorted(times, target, side="right") - 1])


def test_audio_lands_in_the_right_segment_and_silence_is_flagged(tmp_path):
    rate = 16000
    audio = np.zeros(8 * rate, np.float32)
    audio[4 * rate : 6 * rate] = 0.5 * np.sin(2 * np.pi * 1000 * np.arange(2 * rate) / rate)
    path = tmp_path / "tone.mp4"
    path.write_bytes(encode_mp4(_bar_frames(64), fps=8, audio=audio, sample_rate=rate))
    clip = decode_clip(str(path), num_frames=4, num_segments=4, image_size=16)
    energy = np.sqrt((clip.audio**2).mean(axis=1))
    assert clip.has_audio
    assert energy[2] > 0.2 and energy[0] < 0.01 and energy[1] < 0.05 and energy[3] < 0.05
    silent = tmp_path / "silent.mp4"
    silent.write_bytes(encode_mp4(_bar_frames(16), fps=8))
    clip = decode_clip(str(silent), num_frames=4, num_segments=3, image_size=16)
    assert clip.has_audio is False and clip.audio.shape[0] == 3 and not clip.audio.any()


def test_time_limit_gives_a_timeout_record(bunny):
    result = decode_clip(bunny, num_frames=24, time_limit_s=1e-4)
    assert isinstance(result, MediaError) and result.reason is MediaReason.TIMEOUT
    assert "time limit" in result.message


def _check_corpus(items, storage):
    reasons = {}
    for item in items:
        result = decode_clip(item.uri, storage, num_frames=8, num_segments=4, image_size=32)
        if item.expected is None:
            assert isinstance(result, DecodedClip), (item.name, result)
            assert result.frames.shape == (8, 3, 32, 32)
        else:
            assert isinstance(result, MediaError), item.name
            assert result.reason is item.expected, (item.name, result)
            assert result.message and result.to_row()["reason"] == item.expected.value
        reasons[item.name] = result
    return reasons


def test_bad_media_corpus_local(tmp_path):
    storage = Storage()
    items = build_media_corpus(str(tmp_path / "corpus"), storage)
    results = _check_corpus(items, storage)
    assert results["good_no_audio"].has_audio is False
    assert results["good_av"].has_audio is True
    expected = {
        MediaReason.EMPTY,
        MediaReason.TRUNCATED,
        MediaReason.NOT_MEDIA,
        MediaReason.NO_VIDEO,
        MediaReason.CORRUPT,
        MediaReason.ABSURD_DIMENSIONS,
        MediaReason.ZERO_DURATION,
        MediaReason.NOT_FOUND,
    }
    assert expected <= {i.expected for i in items}


def test_bad_media_corpus_on_s3(s3_storage):
    items = build_media_corpus("s3://damo-badmedia/corpus", s3_storage)
    assert MediaReason.ACCESS_DENIED in {i.expected for i in items}
    _check_corpus(items, s3_storage)


@pytest.mark.parametrize("container_format", ["mp4", "matroska", "mpegts"])
def test_seeking_is_exact_in_every_container(tmp_path, container_format):
    """mpegts has no index (seeks land by timestamp search): the frames must still be exact."""
    frames = []
    for i in range(160):
        frame = np.full((32, 32, 3), (i * 37) % 256, np.uint8)
        frame[0, :8] = i
        frames.append(frame)
    data = encode_mp4(
        frames, 8, audio=np.zeros(20 * 16000, np.float32), container_format=container_format
    )
    path = tmp_path / f"clip.{container_format}"
    path.write_bytes(data)
    clip = decode_clip(str(path), num_frames=24, image_size=32, resize_mode="squash")
    assert isinstance(clip, DecodedClip), clip
    assert clip.duration == pytest.approx(20.0, abs=0.15) and clip.has_audio
    with av.open(str(path)) as container:
        full = [(f.time, frame_to_array(f, 0, 32, "squash")) for f in container.decode(video=0)]
    full_times = np.array([t for t, _ in full]) - full[0][0]
    for target, got_time, got in zip(
        uniform_times(clip.duration, 24), clip.frame_times, clip.frames, strict=True
    ):
        index = np.searchsorted(full_times, target, side="right") - 1
        assert got_time == pytest.approx(full_times[index])
        np.testing.assert_array_equal(got, full[index][1])


def test_audio_windows_decode_the_same_samples_as_one_pass(tmp_path, monkeypatch):
    """Long videos with short segments decode only the audio the segments keep (by seeking)."""
    import damo.media.decode as decode

    rate = 16000
    t = np.arange(60 * rate) / rate
    audio = (0.3 * np.sin(2 * np.pi * (200 + 20 * t) * t)).astype(np.float32)  # a chirp
    path = tmp_path / "long.mp4"
    path.write_bytes(encode_mp4([np.zeros((16, 16, 3), np.uint8)] * 240, 4, audio=audio))
    options = dict(num_frames=2, num_segments=8, image_size=16, max_segment_seconds=2.0)
    full_tracks = []
    monkeypatch.setattr(decode, "read_audio", lambda *a: full_tracks.append(a))  # must not run
    windowed = decode_clip(str(path), **options)
    assert not full_tracks
    assert windowed.audio.shape == (8, 2 * rate)
    # the one-pass reference: the whole track, then cut
    monkeypatch.undo()
    with av.open(str(path)) as container:
        track = decode.read_audio(container, windowed.duration, rate, decode._Deadline(60))
    expected = decode.cut_segments(track, windowed.segment_bounds, rate, 2.0)
    np.testing.assert_allclose(windowed.audio, expected, atol=1e-4)
    assert np.sqrt((windowed.audio**2).mean(axis=1)).min() > 0.15


def test_header_cut_inside_the_index_is_truncated(tmp_path):
    frames = [np.full((32, 32, 3), (i * 37) % 256, np.uint8) for i in range(160)]
    data = encode_mp4(frames, 8, audio=np.zeros(20 * 16000, np.float32))
    path = tmp_path / "cut.mp4"
    path.write_bytes(data[: len(data) * 6 // 10])  # the index (moov, at the end) is half there
    result = decode_clip(str(path), num_frames=4, image_size=16)
    assert isinstance(result, MediaError) and result.reason is MediaReason.TRUNCATED


def test_unexpected_errors_become_records(monkeypatch, bunny):
    import damo.media.decode as decode

    def broken(*args, **kwargs):
        raise RuntimeError("a bug or a surprise in a library")

    monkeypatch.setattr(decode, "frame_to_array", broken)
    result = decode_clip(bunny, num_frames=2, image_size=16)
    assert isinstance(result, MediaError) and result.reason is MediaReason.DECODE
    assert "RuntimeError" in result.message


def test_cli_data_probe(bunny, tmp_path):
    from typer.testing import CliRunner

    from damo.cli import app

    result = CliRunner().invoke(app, ["data", "probe", bunny])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["duration"] == pytest.approx(5.31, abs=0.05)
    (tmp_path / "x.mp4").write_text("not a video")
    result = CliRunner().invoke(app, ["data", "probe", str(tmp_path / "x.mp4")])
    assert result.exit_code == 1 and "not_media" in result.output


def test_large_remote_objects_are_read_by_ranges(s3_storage, bunny):
    uri = "s3://damo-test/decode-test/bunny.mp4"
    s3_storage.upload_file(bunny, uri)
    local = decode_clip(bunny, num_frames=6, num_segments=3, image_size=32)
    downloaded = decode_clip(
        uri, s3_storage, num_frames=6, num_segments=3, image_size=32, stream_min_mb=None
    )
    streamed = decode_clip(
        uri, s3_storage, num_frames=6, num_segments=3, image_size=32, stream_min_mb=0
    )
    for clip in (downloaded, streamed):
        assert isinstance(clip, DecodedClip), clip
        np.testing.assert_array_equal(clip.frames, local.frames)
        np.testing.assert_array_equal(clip.frame_times, local.frame_times)
        np.testing.assert_array_equal(clip.audio, local.audio)
    missing = decode_clip("s3://damo-test/decode-test/none.mp4", s3_storage, stream_min_mb=0)
    assert isinstance(missing, MediaError) and missing.reason is MediaReason.NOT_FOUND
    s3_storage.write_bytes("s3://damo-test/decode-test/empty.mp4", b"")
    empty = decode_clip("s3://damo-test/decode-test/empty.mp4", s3_storage, stream_min_mb=0)
    assert isinstance(empty, MediaError) and empty.reason is MediaReason.EMPTY

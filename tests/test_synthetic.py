"""The synthetic AV world: determinism, vocabulary, annotation consistency."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from damo.data.synthetic import COLOURS, SOUNDS, annotations, sample_clip, text_corpus

SPAN_TEXT = re.compile(r"from (\d+\.\d) to (\d+\.\d) seconds")


def test_text_corpus_is_deterministic_and_small_vocabulary():
    a = text_corpus(50, seed=3)
    assert a == text_corpus(50, seed=3)
    assert a != text_corpus(50, seed=4)
    vocab = {w for t in a for w in re.findall(r"[a-z]+", t)}
    assert len(vocab) < 100
    assert set(COLOURS) <= vocab
    assert any("what colour" in t for t in a) and any("what sound" in t for t in a)
    assert any("what happens after" in t for t in a)


def test_clip_is_a_function_of_seed_and_index():
    assert sample_clip(7, 12) == sample_clip(7, 12)
    # a bigger world extends a smaller one
    assert text_corpus(5, 1) == text_corpus(10, 1)[: len(text_corpus(5, 1))]


def test_events_are_unambiguous_and_inside_the_clip():
    kinds = set()
    for index in range(200):
        spec = sample_clip(0, index)
        assert 6.0 <= spec.duration <= 30.0
        assert spec.events
        for e in spec.events:
            kinds.add(e.kind)
            assert 0.0 <= e.start < e.end <= spec.duration
            assert e.end - e.start >= 2.0
            assert (e.start * 2).is_integer() and (e.end * 2).is_integer()
            assert (e.sound in SOUNDS) == e.audible
        shapes = [e.shape for e in spec.events if e.visible]
        sounds = [e.sound for e in spec.events if e.audible]
        assert len(shapes) == len(set(shapes)) and len(sounds) == len(set(sounds))
    assert kinds == {"visual", "audio", "both"}


def test_annotations_cover_every_stage_and_text_matches_spans():
    tasks = set()
    splits = {sample_clip(0, i).split for i in range(20)}
    assert splits == {"train", "val", "test"}
    for index in range(40):
        spec = sample_clip(0, index)
        for record in annotations(spec):
            tasks.add(record["task"])
            if record["task"] == "grounding":
                ((start, end),) = record["spans"]
                assert SPAN_TEXT.fullmatch(record["answer"].rstrip(".")).groups() == (
                    f"{start:.1f}",
                    f"{end:.1f}",
                )
            if record["task"] == "dialogue":
                assert [t["role"] for t in record["turns"]] == ["user", "assistant"] * 3
    assert tasks == {"caption", "qa", "grounding", "temporal_qa", "dialogue"}


def test_rendered_frames_and_audio_follow_the_events():
    from damo.data.synthetic import POSITIONS, render_audio, render_frames

    spec = sample_clip(0, 1)
    frames = render_frames(spec, 96, 96, 8)
    audio = render_audio(spec, 0, 16000)
    assert frames.shape == (int(spec.duration * 8), 96, 96, 3)
    assert audio.shape == (int(spec.duration * 16000),) and audio.dtype == np.float32
    for e in spec.events:
        middle = (e.start + e.end) / 2
        if e.visible:
            cx, cy = POSITIONS[e.position]
            pixel = frames[int(middle * 8), int(cy * 96), int(cx * 96)]
            assert tuple(pixel) == COLOURS[e.colour]
            assert (
                tuple(frames[int(e.end * 8) - 1, int(cy * 96), int(cx * 96)]) == COLOURS[e.colour]
            )
            if int(e.end * 8) < len(frames):
                assert (
                    tuple(frames[int(e.end * 8), int(cy * 96), int(cx * 96)]) != COLOURS[e.colour]
                )
        window = audio[int(middle * 16000) - 800 : int(middle * 16000) + 800]
        assert (np.sqrt((window**2).mean()) > 0.1) == e.audible or any(
            o.audible and o.start <= middle < o.end for o in spec.events
        )


def test_generate_world_on_s3_and_decode_it(s3_storage):
    from damo.config.data import SyntheticConfig
    from damo.data.records import read_records
    from damo.data.synthetic import generate_world, video_uri
    from damo.media.decode import decode_clip

    root = "s3://damo-test/synthetic-test"
    settings = SyntheticConfig(num_clips=20, seed=5)
    summary = generate_world(root, s3_storage, settings, workers=2, overwrite=True, progress=False)
    assert summary.rendered == 20
    assert len(s3_storage.list(f"{root}/videos/")) == 20
    manifest = json.loads(s3_storage.read_bytes(f"{root}/world.json"))
    assert manifest["num_clips"] == 20 and manifest["settings"]["seed"] == 5
    tables = {s: read_records(f"{root}/records/{s}.parquet", s3_storage) for s in summary.records}
    assert {s: t.num_rows for s, t in tables.items()} == summary.records
    train = tables["train"].to_pylist()
    assert {r["task"] for r in train} == {"caption", "qa", "grounding", "temporal_qa", "dialogue"}
    assert all(r["source"] == "synthetic" and r["video_uri"].startswith(root) for r in train)
    from damo.data.synthetic import load_world_clips, load_world_records

    assert load_world_records(root, s3_storage).num_rows == sum(summary.records.values())
    assert load_world_clips(root, s3_storage) == [sample_clip(5, i) for i in range(20)]
    # a re-run keeps what exists
    assert generate_world(root, s3_storage, settings, workers=1, progress=False).rendered == 0

    spec = sample_clip(5, 0)
    clip = decode_clip(
        video_uri(root, spec.clip_id),
        s3_storage,
        num_frames=24,
        num_segments=8,
        image_size=96,
        resize_mode="squash",
    )
    assert clip.duration == pytest.approx(spec.duration, abs=0.1) and clip.has_audio
    from damo.data.synthetic import POSITIONS

    for e in spec.events:
        if not e.visible:
            continue
        cx, cy = POSITIONS[e.position]
        for frame, t in zip(clip.frames, clip.frame_times, strict=True):
            pixel = frame[:, int(cy * 96), int(cx * 96)].astype(int)
            lit = np.abs(pixel - np.array(COLOURS[e.colour])).max() < 40
            if e.start + 0.2 < t < e.end - 0.2:
                assert lit, (e, t, pixel)
            elif t < e.start - 0.2 or t > e.end + 0.2:
                assert not lit, (e, t, pixel)


def test_cli_data_synth(tmp_path):
    from typer.testing import CliRunner

    from damo.cli import app

    out = tmp_path / "world"
    result = CliRunner().invoke(
        app, ["data", "synth", "--out", str(out), "--clips", "3", "--seed", "2", "--workers", "1"]
    )
    assert result.exit_code == 0, result.output
    assert "world of 3 clips" in result.output
    assert sorted(p.name for p in (out / "videos").iterdir()) == [
        f"syn2-{i:05d}.mp4" for i in range(3)
    ]


def test_a_large_world_has_consistent_records_without_rendering():
    from damo.data.synthetic import world_records

    specs = [sample_clip(11, i) for i in range(1000)]
    records = world_records("s3://bucket/world", specs)
    assert len({r["id"] for r in records}) == len(records)
    splits = {
        s: {r["video_id"] for r in records if r["split"] == s} for s in ("train", "val", "test")
    }
    assert [len(splits[s]) for s in ("train", "val", "test")] == [800, 100, 100]
    # every colour, shape and sound is asked about, so a model sees all of them
    queries = " ".join(r["query"] for r in records)
    assert all(word in queries for word in [*COLOURS, *SOUNDS, "triangle", "cross"])

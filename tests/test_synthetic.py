"""The synthetic AV world: determinism, vocabulary, annotation consistency."""

from __future__ import annotations

import re

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

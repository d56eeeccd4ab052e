"""Grounding, retrieval and QA metrics on cases whose answers are known by hand."""

from __future__ import annotations

import numpy as np
import pytest

from damo.eval.metrics import (
    grounding_metrics,
    normalize_answer,
    qa_accuracy,
    retrieval_metrics,
    temporal_iou_cross,
    temporal_iou_paired,
)


def test_iou_paired_and_cross():
    pred = np.array([[0, 10], [5, 15], [20, 30], [0, 0]])
    gt = np.array([[0, 10], [0, 10], [0, 10], [0, 10]])
    assert temporal_iou_paired(pred, gt).tolist() == [1.0, 5 / 15, 0.0, 0.0]
    cross = temporal_iou_cross(np.array([[0, 10]]), np.array([[0, 10], [5, 15], [10, 20]]))
    assert cross.tolist() == [[1.0, 5 / 15, 0.0]]


def test_grounding_thresholds_are_applied_without_rounding():
    gt = [(0.0, 10.0)] * 4
    # IoU exactly 0.5, just under 0.5, exactly 0.7, and an unparsable answer
    pred = [(0.0, 5.0), (0.0, 4.9999), (0.0, 7.0), None]
    m = grounding_metrics(pred, gt)
    assert m["R1@0.5"] == pytest.approx(50.0)  # 0.5 and 0.7 pass, 0.49999 does not
    assert m["R1@0.7"] == pytest.approx(25.0)
    assert m["R1@0.3"] == pytest.approx(75.0)
    assert m["mIoU"] == pytest.approx(100 * (0.5 + 0.49999 + 0.7 + 0) / 4)
    assert m["unparsable"] == 1 and m["count"] == 4


def test_grounding_input_errors():
    with pytest.raises(ValueError, match="2 predictions for 1"):
        grounding_metrics([(0, 1), (0, 1)], [(0, 1)])
    with pytest.raises(ValueError, match="no ground truth"):
        grounding_metrics([], [])


def test_retrieval_ranks_and_ties():
    sim = np.array(
        [
            [0.9, 0.1, 0.0],  # rank 1
            [0.8, 0.5, 0.1],  # rank 2
            [0.3, 0.2, 0.1],  # rank 3
        ]
    )
    m = retrieval_metrics(sim, ks=(1, 2, 3))
    assert (m["R@1"], m["R@2"], m["R@3"]) == pytest.approx((100 / 3, 200 / 3, 100.0))
    assert m["median_rank"] == 2.0
    constant = retrieval_metrics(np.ones((5, 5)), ks=(1,))
    assert constant["R@1"] == 0.0 and constant["median_rank"] == 5.0  # ties count against


def test_qa_accuracy_normalises_and_splits_by_type():
    m = qa_accuracy(
        ["Red.", "a blue circle", "Low tone", "square"],
        ["red", "Blue circle", "high tone", "circle"],
        ["colour", "colour", "sound", "shape"],
    )
    assert m["accuracy"] == 50.0
    assert m["accuracy/colour"] == 100.0 and m["accuracy/sound"] == 0.0
    assert normalize_answer("  The  RED, square! ") == "red square"


def test_timed_answers_score_event_and_span_apart():
    from damo.eval.metrics import timed_answer_metrics
    from damo.eval.parse import Span, split_timed_answer

    assert split_timed_answer("a red square appears from 3.0 to 7.5 seconds.") == (
        "a red square appears .",
        Span(3.0, 7.5),
    )
    assert split_timed_answer("a low tone is heard between 2 and 4.5 s.")[1] == Span(2.0, 4.5)
    assert split_timed_answer("nothing else happens.") == ("nothing else happens.", None)
    truth = "a red square appears from 3.0 to 7.5 seconds."
    predictions = [
        "a red square appears from 3.0 to 6.0 seconds.",  # event right, IoU 3 / 4.5
        "a blue circle appears from 3.0 to 7.5 seconds.",  # event wrong, span right
        "a red square appears from 9.0 to 12.0 seconds.",  # event right, IoU 0
        "no idea.",  # neither; unparsable span
    ]
    m = timed_answer_metrics(predictions, [truth] * 4, [(3.0, 7.5)] * 4, [12.0] * 4)
    assert m["event_accuracy"] == 50.0
    assert m["span_R1@0.5"] == 50.0
    assert m["span_mIoU"] == pytest.approx(100 * (3 / 4.5 + 1.0) / 4)
    assert m["joint_accuracy"] == 25.0
    assert (m["count"], m["unparsable"]) == (4, 1)


def test_audio_swap_gives_every_video_another_track_of_similar_length():
    from damo.eval.batch import ablate_audio, audio_donors

    uris = ["a", "b", "c", "d", "a"]  # a video may appear twice (several records)
    donors = audio_donors(uris, [10.0, 20.0, 11.0, 19.0, 10.0])
    assert donors == {"a": "c", "c": "d", "d": "b", "b": "a"}
    with pytest.raises(ValueError, match="two videos"):
        audio_donors(["a", "a"], [1.0, 1.0])
    batch = {
        "video_uri": np.array(["a", "b"]),
        "audio_features": np.stack([np.full((2, 3), 1.0), np.full((2, 3), 2.0)]),
        "has_audio": np.array([True, True]),
    }
    tracks = {
        "a": {"audio_features": np.full((2, 3), 7.0), "has_audio": True},
        "b": {"audio_features": np.full((2, 3), 8.0), "has_audio": False},
    }
    swapped = ablate_audio(batch, "swap", tracks)
    assert swapped["audio_features"][:, 0, 0].tolist() == [7.0, 8.0]
    assert swapped["has_audio"].tolist() == [True, False]
    assert batch["audio_features"][0, 0, 0] == 1.0  # the input batch is not touched
    assert not ablate_audio(batch, "mask", {})["has_audio"].any()
    assert not ablate_audio(batch, "zero", {})["audio_features"].any()
    with pytest.raises(ValueError, match="ablation"):
        ablate_audio(batch, "louder", {})

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

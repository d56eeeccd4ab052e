"""Metrics in numpy: temporal IoU, grounding recall, retrieval recall, QA accuracy.

Nothing is rounded before a threshold is applied, and an unparsable answer (span None) counts
as IoU 0 and is reported separately, never dropped.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

import numpy as np

GROUNDING_THRESHOLDS = (0.3, 0.5, 0.7)


def temporal_iou_paired(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """IoU of each pair of spans. pred, gt: (N, 2) [start, end] in seconds -> (N,).

    union = max(e1, e2) - min(s1, s2) (the hull), as in DESIGN §6 and the official QVHighlights
    code; for overlapping spans it equals the true union, for disjoint ones the IoU is 0 anyway.
    """
    pred = np.asarray(pred, dtype=float).reshape(-1, 2)
    gt = np.asarray(gt, dtype=float).reshape(-1, 2)
    inter = np.maximum(0.0, np.minimum(pred[:, 1], gt[:, 1]) - np.maximum(pred[:, 0], gt[:, 0]))
    union = np.maximum(pred[:, 1], gt[:, 1]) - np.minimum(pred[:, 0], gt[:, 0])
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def temporal_iou_cross(spans1: np.ndarray, spans2: np.ndarray) -> np.ndarray:
    """IoU of every span in spans1 (N, 2) with every span in spans2 (M, 2) -> (N, M)."""
    spans1 = np.asarray(spans1, dtype=float).reshape(-1, 2)
    spans2 = np.asarray(spans2, dtype=float).reshape(-1, 2)
    left = np.maximum(spans1[:, None, 0], spans2[None, :, 0])  # (N, M)
    right = np.minimum(spans1[:, None, 1], spans2[None, :, 1])  # (N, M)
    inter = np.clip(right - left, 0.0, None)
    union = (spans1[:, 1] - spans1[:, 0])[:, None] + (spans2[:, 1] - spans2[:, 0])[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return inter / union


def grounding_metrics(
    pred_spans: Sequence[tuple[float, float] | None],
    gt_spans: Sequence[tuple[float, float]],
    thresholds: Sequence[float] = GROUNDING_THRESHOLDS,
) -> dict[str, float]:
    """R@1 at IoU >= m (in %) and mIoU (in %); None predictions count as IoU 0.

    Returns also `count` and `unparsable` (how many predictions were None).
    """
    if len(pred_spans) != len(gt_spans):
        raise ValueError(f"{len(pred_spans)} predictions for {len(gt_spans)} ground truths")
    if not gt_spans:
        raise ValueError("no ground truth spans to evaluate")
    parsed = np.array([p is not None for p in pred_spans])
    pred = np.array([p if p is not None else (0.0, 0.0) for p in pred_spans], dtype=float)
    iou = np.where(parsed, temporal_iou_paired(pred, np.asarray(gt_spans, dtype=float)), 0.0)
    out = {f"R1@{m}": float(100.0 * np.mean(iou >= m)) for m in thresholds}
    out["mIoU"] = float(100.0 * iou.mean())
    out["count"] = len(gt_spans)
    out["unparsable"] = int((~parsed).sum())
    return out


def retrieval_metrics(similarity: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Text->video retrieval. similarity: (Q, C), query i's true candidate is column i.

    Returns R@k (in %) and the median rank (1 = best). Ties are broken against the truth, so
    a constant similarity matrix scores the worst, not the best.
    """
    similarity = np.asarray(similarity, dtype=float)
    queries, candidates = similarity.shape
    if queries > candidates:
        raise ValueError(f"{queries} queries but only {candidates} candidates")
    truth = similarity[np.arange(queries), np.arange(queries)][:, None]  # (Q, 1)
    rank = (similarity >= truth).sum(axis=1)  # (Q,) counts the truth itself, so best is 1
    out = {f"R@{k}": float(100.0 * np.mean(rank <= k)) for k in ks}
    out["median_rank"] = float(np.median(rank))
    out["candidates"] = candidates
    return out


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (SQuAD-style)."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION))
    return " ".join(text.split())


def qa_accuracy(
    predictions: Sequence[str], answers: Sequence[str], question_types: Sequence[str] | None = None
) -> dict[str, float]:
    """Normalised exact match in %, overall and per question type."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answers")
    if not answers:
        raise ValueError("no answers to evaluate")
    correct = np.array(
        [
            normalize_answer(p) == normalize_answer(a)
            for p, a in zip(predictions, answers, strict=True)
        ]
    )
    out: dict[str, float] = {"accuracy": float(100.0 * correct.mean()), "count": len(answers)}
    if question_types is not None:
        types = np.asarray(question_types)
        for kind in sorted(set(question_types)):
            out[f"accuracy/{kind}"] = float(100.0 * correct[types == kind].mean())
    return out


def timed_answer_metrics(
    predictions: Sequence[str],
    answers: Sequence[str],
    gt_spans: Sequence[tuple[float, float]],
    durations: Sequence[float] | None = None,
) -> dict[str, float]:
    """Temporal QA answers a clause with a span ("a red square appears from 3.0 to 7.5
    seconds."). Exact match of the whole clause is near 0 for any model that is a little off
    in time, so the event part and the span are scored apart, as grounded dialogue is:

    event_accuracy  the clause without its span matches the reference's (normalised), in %
    span_mIoU, span_R1@0.5  the predicted span against the reference span (None: IoU 0)
    joint_accuracy  event right and span IoU >= 0.5, in %
    """
    from damo.eval.parse import split_timed_answer

    if not (len(predictions) == len(answers) == len(gt_spans)):
        raise ValueError(
            f"{len(predictions)} predictions, {len(answers)} answers, {len(gt_spans)} spans"
        )
    if not answers:
        raise ValueError("no answers to evaluate")
    durations = durations if durations is not None else [None] * len(answers)
    predicted = [split_timed_answer(p, d) for p, d in zip(predictions, durations, strict=True)]
    expected = [normalize_answer(split_timed_answer(a)[0]) for a in answers]
    event = np.array(
        [normalize_answer(e) == x for (e, _), x in zip(predicted, expected, strict=True)]
    )
    spans = grounding_metrics([s for _, s in predicted], gt_spans, thresholds=(0.5,))
    parsed = np.array([s is not None for _, s in predicted])
    pred = np.array([s if s is not None else (0.0, 0.0) for _, s in predicted], dtype=float)
    iou = np.where(parsed, temporal_iou_paired(pred, np.asarray(gt_spans, dtype=float)), 0.0)
    return {
        "event_accuracy": float(100.0 * event.mean()),
        "span_mIoU": spans["mIoU"],
        "span_R1@0.5": spans["R1@0.5"],
        "joint_accuracy": float(100.0 * (event & (iou >= 0.5)).mean()),
        "count": len(answers),
        "unparsable": spans["unparsable"],
    }

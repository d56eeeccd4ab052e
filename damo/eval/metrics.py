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

"""The QVHighlights evaluation: moment retrieval (MR) and highlight detection (HL).

Reproduces the official standalone evaluator (Moment-DETR, `standalone_eval/eval.py`) number
for number, including its conventions:
- MR mAP: per query, the first 10 predicted windows *in file order*, then stably sorted by
  score; greedy matching to ground-truth windows per IoU threshold (0.5:0.05:0.95); VOC
  (all-point interpolated) AP; mean over queries, then over thresholds.
- MR R1: the *first* predicted window against the ground-truth window it overlaps most.
- Length buckets short (0, 10], middle (10, 30], long (30, 150] keep only the ground-truth
  windows in the bucket (and the queries that still have one); "full" keeps everything.
- HL: clips are 2 s; a clip is positive when an annotator scored it >= 2 / 3 / 4 (Fair / Good /
  VeryGood); mAP averages per-annotator AP over queries; HIT@1 takes the top-scored clip and
  the best of the three annotators.
- Every reported number is a percentage rounded to two decimals at the very end.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from damo.eval.metrics import temporal_iou_cross, temporal_iou_paired

MR_IOU_THRESHOLDS = np.array([float(f"{t:.2f}") for t in np.linspace(0.5, 0.95, 10)])
MAX_PRED_WINDOWS = 10
LENGTH_BUCKETS = {"short": (0, 10), "middle": (10, 30), "long": (30, 150), "full": None}
SALIENCY_LEVELS = {"Fair": 2, "Good": 3, "VeryGood": 4}
CLIP_SECONDS = 2


def _pct(value: float) -> float:
    return float(f"{100 * value:.2f}")


def load_jsonl(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ---- moment retrieval -------------------------------------------------------------------
def voc_average_precision(tp: np.ndarray, num_positive: int) -> np.ndarray:
    """All-point interpolated AP per row. tp: (T, P) 0/1 in score order -> (T,)."""
    tp_cum = np.cumsum(tp, axis=1)
    fp_cum = np.cumsum(1 - tp, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = tp_cum / num_positive
        precision = tp_cum / (tp_cum + fp_cum)
    rows = tp.shape[0]
    precision = np.hstack([np.zeros((rows, 1)), precision, np.zeros((rows, 1))])
    recall = np.hstack([np.zeros((rows, 1)), recall, np.ones((rows, 1))])
    envelope = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]  # monotone from right
    return np.sum((recall[:, 1:] - recall[:, :-1]) * envelope[:, 1:], axis=1)


def detection_ap(gt_windows: np.ndarray, pred_windows: np.ndarray) -> np.ndarray:
    """AP of one query at every MR IoU threshold.

    gt_windows: (G, 2); pred_windows: (P, 3) [start, end, score] already truncated to 10.
    """
    thresholds = MR_IOU_THRESHOLDS
    if len(pred_windows) == 0:
        return np.zeros(len(thresholds))
    order = np.argsort(-pred_windows[:, 2], kind="stable")  # Python's stable sort by -score
    preds = pred_windows[order]
    iou = temporal_iou_cross(preds[:, :2], gt_windows)  # (P, G)
    locked = np.zeros((len(thresholds), len(gt_windows)), dtype=bool)  # (T, G)
    tp = np.zeros((len(thresholds), len(preds)))  # (T, P)
    for p in range(len(preds)):  # greedy matching is sequential by nature
        gt_order = np.argsort(iou[p])[::-1]
        # a GT qualifies if its IoU is not below the threshold (NaN qualifies, as officially)
        qualifies = ~(iou[p][gt_order][None, :] < thresholds[:, None])  # (T, G)
        # the official loop stops at the first GT below the threshold; later ones are lower
        qualifies &= np.cumprod(qualifies, axis=1).astype(bool)
        free = qualifies & ~locked[:, gt_order]
        matched = free.any(axis=1)  # (T,)
        first = free.argmax(axis=1)
        tp[matched, p] = 1
        locked[np.flatnonzero(matched), gt_order[first[matched]]] = True
    return voc_average_precision(tp, len(gt_windows))


def _bucket(ground_truth: list[dict], bounds: tuple[float, float] | None) -> list[dict]:
    if bounds is None:
        return ground_truth
    low, high = bounds
    kept = []
    for item in ground_truth:
        windows = [w for w in item["relevant_windows"] if low < w[1] - w[0] <= high]
        if windows:
            kept.append({**item, "relevant_windows": windows})
    return kept


def moment_retrieval(submission: list[dict], ground_truth: list[dict]) -> dict:
    """{"full"|"short"|"middle"|"long": {"MR-mAP": {...}, "MR-R1": {...}}}."""
    preds = {
        d["qid"]: np.asarray(d["pred_relevant_windows"], dtype=float).reshape(-1, 3)
        for d in submission
    }
    out = {}
    for name, bounds in LENGTH_BUCKETS.items():
        gts = {
            d["qid"]: np.asarray(d["relevant_windows"], dtype=float).reshape(-1, 2)
            for d in _bucket(ground_truth, bounds)
        }
        qids = [q for q in preds if q in gts]
        ap = np.array([detection_ap(gts[q], preds[q][:MAX_PRED_WINDOWS]) for q in qids])  # (Q, T)
        ap_per_threshold = ap.mean(axis=0)
        mr_map = {str(t): _pct(v) for t, v in zip(MR_IOU_THRESHOLDS, ap_per_threshold, strict=True)}
        mr_map["average"] = _pct(np.mean(ap_per_threshold))

        top1 = np.array([preds[q][0, :2] for q in qids])  # (Q, 2)
        best_gt = np.array(
            [
                gts[q][np.argmax(temporal_iou_cross(top1[i : i + 1], gts[q])[0])]
                for i, q in enumerate(qids)
            ]
        )
        iou = temporal_iou_paired(top1, best_gt)
        mr_r1 = {str(t): _pct(np.mean(iou >= t)) for t in MR_IOU_THRESHOLDS}
        out[name] = {"MR-mAP": mr_map, "MR-R1": mr_r1}
    return out


# ---- highlight detection ----------------------------------------------------------------
def saliency_ap(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """Interpolated AP of one ranking, as the official `get_ap` (via precision-recall curve)."""
    if np.all(y_true == y_true[0]):
        return 0.0 if y_true[0] == 0 else 1.0
    order = np.argsort(y_score, kind="mergesort")[::-1]  # descending, ties as scikit-learn
    scores, labels = y_score[order], y_true[order]
    cut = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]  # one point per distinct score
    tps = np.cumsum(labels)[cut]
    fps = 1 + cut - tps
    precision = np.r_[(tps / (tps + fps))[::-1], 1.0]
    recall = np.r_[(tps / tps[-1])[::-1], 0.0].astype(np.float32)
    precision = np.maximum.accumulate(precision)
    return float(np.mean(precision[np.flatnonzero(np.diff(recall))]))


def clip_scores(item: dict) -> np.ndarray:
    """(num_clips, 3) annotator scores over the whole video, 0 outside the relevant clips."""
    scores = np.zeros((int(item["duration"] / CLIP_SECONDS), 3))
    scores[np.asarray(item["relevant_clip_ids"], dtype=int)] = np.asarray(item["saliency_scores"])
    return scores


def _fit(scores: np.ndarray, length: int) -> np.ndarray:
    """Truncate, or pad with zeros, predicted clip scores to the number of GT clips."""
    fitted = np.zeros(length)
    fitted[: min(length, len(scores))] = scores[:length]
    return fitted


def highlight_detection(submission: list[dict], ground_truth: list[dict]) -> dict:
    gt_scores = {d["qid"]: clip_scores(d) for d in ground_truth}
    preds = {d["qid"]: np.asarray(d["pred_saliency_scores"], dtype=float) for d in submission}
    out = {}
    for name, level in SALIENCY_LEVELS.items():
        positives = {q: (s >= level).astype(float) for q, s in gt_scores.items()}
        hits, aps = [], []
        for qid, pred in preds.items():
            truth = positives[qid]  # (clips, 3)
            top = int(np.argmax(pred))
            hits.append(truth[top].max() if top < len(truth) else 0.0)
            fitted = _fit(pred, len(truth))
            aps.append([saliency_ap(truth[:, a], fitted) for a in range(3)])
        out[f"HL-min-{name}"] = {"HL-mAP": _pct(np.mean(aps)), "HL-Hit1": _pct(np.mean(hits))}
    return out


# ---- the whole report -------------------------------------------------------------------
def validate_submission(submission: list[dict]) -> None:
    """Refuse, with the line and qid, what the official evaluator would crash or misread on."""
    if not submission:
        raise ValueError("the submission is empty")
    for line, item in enumerate(submission, start=1):
        if "qid" not in item:
            raise ValueError(f"submission line {line}: no 'qid'")
        where = f"submission line {line} (qid {item['qid']})"
        if "pred_relevant_windows" not in item and "pred_saliency_scores" not in item:
            raise ValueError(f"{where}: neither pred_relevant_windows nor pred_saliency_scores")
        windows = item.get("pred_relevant_windows")
        if windows is not None and (
            not windows or any(not isinstance(w, list) or len(w) != 3 for w in windows)
        ):
            raise ValueError(f"{where}: pred_relevant_windows must be [start, end, score] triples")
        scores = item.get("pred_saliency_scores")
        if scores is not None and not scores:
            raise ValueError(f"{where}: pred_saliency_scores is empty")


def evaluate(submission: list[dict], ground_truth: list[dict], allow_partial: bool = False) -> dict:
    """The official JSON layout: {"brief": {...}, then the detailed sections sorted by name}."""
    validate_submission(submission)
    pred_qids = {d["qid"] for d in submission}
    gt_qids = {d["qid"] for d in ground_truth}
    if pred_qids != gt_qids:
        if not allow_partial:
            raise ValueError(
                f"qids of submission and ground truth differ: {len(pred_qids - gt_qids)} only in "
                f"the submission, {len(gt_qids - pred_qids)} only in the ground truth "
                "(use allow_partial to evaluate the shared ones)"
            )
        shared = pred_qids & gt_qids
        submission = [d for d in submission if d["qid"] in shared]
        ground_truth = [d for d in ground_truth if d["qid"] in shared]
    details: dict = {}
    brief: dict = {}
    if "pred_relevant_windows" in submission[0]:
        mr = moment_retrieval(submission, ground_truth)
        details.update(mr)
        brief.update(
            sorted(
                {
                    "MR-full-mAP": mr["full"]["MR-mAP"]["average"],
                    "MR-full-mAP@0.5": mr["full"]["MR-mAP"]["0.5"],
                    "MR-full-mAP@0.75": mr["full"]["MR-mAP"]["0.75"],
                    "MR-short-mAP": mr["short"]["MR-mAP"]["average"],
                    "MR-middle-mAP": mr["middle"]["MR-mAP"]["average"],
                    "MR-long-mAP": mr["long"]["MR-mAP"]["average"],
                    "MR-full-R1@0.5": mr["full"]["MR-R1"]["0.5"],
                    "MR-full-R1@0.7": mr["full"]["MR-R1"]["0.7"],
                }.items()
            )
        )
    if "pred_saliency_scores" in submission[0]:
        hl = highlight_detection(submission, ground_truth)
        details.update(hl)
        for section, values in hl.items():
            for key, value in values.items():
                brief[f"{section}-{key.split('-')[1]}"] = value
    return {"brief": brief, **dict(sorted(details.items()))}


def evaluate_files(pred_path: str | Path, gt_path: str | Path, allow_partial: bool = False) -> dict:
    return evaluate(load_jsonl(pred_path), load_jsonl(gt_path), allow_partial=allow_partial)

"""The QVHighlights evaluator reproduces the official numbers, on the shipped submission and on
perturbed real submissions checked against a loop-by-loop transcription of the official code."""

from __future__ import annotations

import copy
import json
import random

import numpy as np
import pytest
from sklearn.metrics import precision_recall_curve
from typer.testing import CliRunner

from damo.cli import app
from damo.eval.qvhighlights import evaluate, load_jsonl


@pytest.fixture(scope="module")
def qvh(fixtures_dir):
    root = fixtures_dir / "qvhighlights"
    return {
        "gt": load_jsonl(root / "highlight_val_release.jsonl"),
        "pred": load_jsonl(root / "sample_val_preds.jsonl"),
        "expected": json.loads((root / "sample_val_preds_metrics_raw.json").read_text()),
        "root": root,
    }


def flatten(tree: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}/"))
        else:
            out[prefix + key] = value
    return out


def assert_same_numbers(ours: dict, expected: dict, tolerance: float = 0.01) -> None:
    ours_flat, expected_flat = flatten(ours), flatten(expected)
    assert ours_flat.keys() == expected_flat.keys()
    off = {
        k: (ours_flat[k], v)
        for k, v in expected_flat.items()
        if not abs(ours_flat[k] - v) <= tolerance
    }
    assert not off, off


def test_reproduces_every_official_number(qvh):
    ours = evaluate(qvh["pred"], qvh["gt"])
    assert_same_numbers(ours, qvh["expected"])
    assert len(flatten(qvh["expected"])) == 104
    assert list(ours) == list(qvh["expected"])  # same layout and order
    assert list(ours["brief"]) == list(qvh["expected"]["brief"])


def test_cli_prints_the_official_layout(qvh, tmp_path):
    out = tmp_path / "metrics.json"
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "qvh",
            "--gt",
            str(qvh["root"] / "highlight_val_release.jsonl"),
            "--pred",
            str(qvh["root"] / "sample_val_preds.jsonl"),
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert_same_numbers(json.loads(result.output), qvh["expected"])
    assert json.loads(out.read_text()) == json.loads(result.output)


def test_bad_submissions_are_refused_clearly(qvh, tmp_path):
    with pytest.raises(ValueError, match="qids of submission and ground truth differ"):
        evaluate(qvh["pred"][:-1], qvh["gt"])
    partial = evaluate(qvh["pred"][:100], qvh["gt"], allow_partial=True)
    assert 0 < partial["brief"]["MR-full-mAP"] <= 100
    broken = copy.deepcopy(qvh["pred"][:3])
    broken[1]["pred_relevant_windows"] = [[1.0, 2.0]]
    with pytest.raises(ValueError, match=r"line 2 .*\[start, end, score\]"):
        evaluate(broken, qvh["gt"], allow_partial=True)
    gt_path = qvh["root"] / "highlight_val_release.jsonl"
    result = CliRunner().invoke(app, ["eval", "qvh", "--gt", str(gt_path), "--pred", str(gt_path)])
    assert result.exit_code == 2
    assert "neither pred_relevant_windows nor pred_saliency_scores" in result.output


# ---- a literal, loop-based transcription of the official algorithm ---------------------------
def official_like(submission: list[dict], ground_truth: list[dict]) -> dict:
    thresholds = [float(f"{t:.2f}") for t in np.linspace(0.5, 0.95, 10)]

    def iou(a, b):
        inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
        union = (a[1] - a[0]) + (b[1] - b[0]) - inter
        return inter / union

    def interp_ap(precision, recall):
        mp, mr = [0.0, *precision, 0.0], [0.0, *recall, 1.0]
        for i in range(len(mp) - 2, -1, -1):
            mp[i] = max(mp[i], mp[i + 1])
        return sum((mr[i] - mr[i - 1]) * mp[i] for i in range(1, len(mr)) if mr[i] != mr[i - 1])

    def detection_ap(gts, preds):
        preds = sorted(preds, key=lambda w: -w[2])
        aps = []
        for thr in thresholds:
            locked, tp = set(), []
            for p in preds:
                ious = np.array([iou(p, g) for g in gts])
                hit = 0
                for j in ious.argsort()[::-1]:
                    if ious[j] < thr:
                        break
                    if j in locked:
                        continue
                    hit = 1
                    locked.add(j)
                    break
                tp.append(hit)
            tps = np.cumsum(tp)
            fps = np.cumsum([1 - t for t in tp])
            aps.append(interp_ap(list(tps / (tps + fps)), list(tps / len(gts))))
        return aps

    out = {}
    for name, (low, high) in {
        "short": (0, 10),
        "middle": (10, 30),
        "long": (30, 150),
        "full": (None, None),
    }.items():
        gts = {}
        for d in ground_truth:
            windows = (
                d["relevant_windows"]
                if low is None
                else [w for w in d["relevant_windows"] if low < w[1] - w[0] <= high]
            )
            if windows:
                gts[d["qid"]] = windows
        subs = [d for d in submission if d["qid"] in gts]
        ap = np.mean(
            [detection_ap(gts[d["qid"]], d["pred_relevant_windows"][:10]) for d in subs], axis=0
        )
        r1 = []
        for d in subs:
            top = d["pred_relevant_windows"][0][:2]
            best = max(range(len(gts[d["qid"]])), key=lambda j: (iou(top, gts[d["qid"]][j]), -j))
            r1.append(iou(top, gts[d["qid"]][best]))
        out[name] = {"ap": ap, "r1": [np.mean(np.array(r1) >= t) for t in thresholds]}

    for level in (2, 3, 4):
        hits, aps = [], []
        for d in submission:
            g = next(x for x in ground_truth if x["qid"] == d["qid"])
            full = np.zeros((int(g["duration"] / 2), 3))
            full[g["relevant_clip_ids"]] = g["saliency_scores"]
            truth = (full >= level).astype(float)
            pred = np.array(d["pred_saliency_scores"], dtype=float)
            top = int(np.argmax(pred))
            hits.append(truth[top].max() if top < len(truth) else 0.0)
            fitted = np.zeros(len(truth))
            fitted[: min(len(truth), len(pred))] = pred[: len(truth)]
            for a in range(3):
                y = truth[:, a]
                if len(set(y)) == 1:
                    aps.append(float(y[0] != 0))
                    continue
                precision, recall, _ = precision_recall_curve(y, fitted)
                recall = recall.astype(np.float32)
                for i in range(1, len(precision)):
                    precision[i] = max(precision[i - 1], precision[i])
                aps.append(np.mean(precision[np.where(np.diff(recall))]))
        out[level] = {"map": np.mean(aps), "hit": np.mean(hits)}
    return out


def perturbed(submission: list[dict], seed: int) -> list[dict]:
    """Real predictions reshuffled: window order, score ties, >10 windows, ragged saliency."""
    rng = random.Random(seed)
    out = []
    for d in copy.deepcopy(submission):
        windows = d["pred_relevant_windows"]
        rng.shuffle(windows)
        if rng.random() < 0.3:  # ties in score
            for w in windows[: rng.randint(2, len(windows))]:
                w[2] = 0.5
        if rng.random() < 0.2:  # more than 10 windows: only the first 10 in file order count
            windows += [[w[0], w[1], 1.0] for w in windows[:3]]
        if rng.random() < 0.2:  # a different number of clips than the video has
            d["pred_saliency_scores"] = d["pred_saliency_scores"][: rng.randint(1, 80)]
        out.append(d)
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_the_official_algorithm_on_perturbed_real_submissions(qvh, seed):
    rng = random.Random(seed)
    sample_qids = {d["qid"] for d in rng.sample(qvh["gt"], 300)}
    gt = [d for d in qvh["gt"] if d["qid"] in sample_qids]
    sub = perturbed([d for d in qvh["pred"] if d["qid"] in sample_qids], seed)
    ours = evaluate(sub, gt)
    reference = official_like(sub, gt)
    for name in ("short", "middle", "long", "full"):
        expected_ap = [float(f"{100 * v:.2f}") for v in reference[name]["ap"]]
        assert list(ours[name]["MR-mAP"].values())[:10] == pytest.approx(expected_ap, abs=0.01)
        expected_r1 = [float(f"{100 * v:.2f}") for v in reference[name]["r1"]]
        assert list(ours[name]["MR-R1"].values()) == pytest.approx(expected_r1, abs=0.01)
    for level, name in ((2, "Fair"), (3, "Good"), (4, "VeryGood")):
        assert ours[f"HL-min-{name}"]["HL-mAP"] == pytest.approx(
            100 * reference[level]["map"], abs=0.01
        )
        assert ours[f"HL-min-{name}"]["HL-Hit1"] == pytest.approx(
            100 * reference[level]["hit"], abs=0.01
        )

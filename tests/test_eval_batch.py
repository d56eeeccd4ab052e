"""Batch evaluation: every record gets an answer, metrics sit beside baselines, a report."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_config

from damo.data.synthetic import QUESTION_TYPES
from damo.eval.batch import EvalSettings, evaluate_checkpoint
from damo.model.checkpoint import save_checkpoint
from damo.model.damo import DamoModel
from damo.storage import Storage


@pytest.fixture(scope="module")
def checkpoint(tiny_backbones, tmp_path_factory):
    model = DamoModel.from_config(tiny_config(tiny_backbones).model)
    return save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "model", stage=4)


@pytest.mark.parametrize("audio", ["as_is", "swap"])
def test_evaluate_a_split(audio, checkpoint, tiny_backbones, tiny_world, tiny_features, tmp_path):
    cfg = tiny_config(tiny_backbones)
    out = tmp_path / "eval"
    settings = EvalSettings(max_new_tokens=8, batch_size=4, plots=2, audio=audio)
    result = evaluate_checkpoint(
        cfg,
        str(checkpoint),
        str(tiny_features),
        str(tiny_world / "records" / "train.parquet"),
        str(out),
        settings,
        Storage(),
    )
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    tasks = {
        task: sum(r["task"] == task for r in rows) for task in ("grounding", "qa", "temporal_qa")
    }
    metrics = result["metrics"]
    assert metrics["grounding"]["model"]["count"] == tasks["grounding"] > 0
    assert metrics["qa"]["model"]["count"] == tasks["qa"] > 0
    assert all(isinstance(r["prediction"], str) for r in rows)
    # unparsable answers are counted, never dropped
    unparsable = sum(r["pred_span"] is None for r in rows if r["task"] == "grounding")
    assert metrics["grounding"]["model"]["unparsable"] == unparsable
    whole = metrics["grounding"]["baseline_whole_clip"]
    assert whole["unparsable"] == 0 and 0 < whole["mIoU"] <= 100
    assert {"model/visual_only", "model/audio_only"} <= set(metrics["grounding"])
    assert {"baseline_whole_clip/audio_only", "baseline_random_span/audio_only"} <= set(
        metrics["grounding"]
    )
    assert metrics["retrieval"]["model"]["candidates"] == len({r["video_uri"] for r in rows})
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["run"]["audio"] == audio
    types = {k for k in metrics["qa"]["model"] if k.startswith("accuracy/")}
    assert types and types <= {f"accuracy/{t}" for t in QUESTION_TYPES}
    if tasks["temporal_qa"]:  # a small world may have no event after another
        assert {"event_accuracy", "span_mIoU", "joint_accuracy"} <= set(
            metrics["temporal_qa"]["model"]
        )
    else:
        assert "temporal_qa" not in metrics
    assert saved["run"]["frames"] == cfg.data.decode.num_frames == 16
    assert saved["run"]["audio_segments"] == cfg.data.decode.num_segments == 16
    assert saved["run"]["decoding"]["greedy"] is True
    report = (out / "report.md").read_text()
    assert "| baseline_whole_clip |" in report and str(checkpoint) in report
    assert len(list((out / "plots").glob("timeline_*.png"))) == 2

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


def test_actors_use_cuda_only_when_ray_gave_them_a_gpu(monkeypatch):
    import ray
    import torch

    from damo.eval.batch import actor_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU node
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [])
    assert actor_device() == "cpu"  # the actor asked for none
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [0])
    assert actor_device() == "cuda"


def test_eval_run_passes_gpus_per_actor(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from damo.cli import app

    seen = {}

    def evaluate(cfg, checkpoint, features, records, out, settings):
        seen["settings"] = settings
        return {"metrics": {}}

    monkeypatch.setattr("damo.eval.batch.evaluate_checkpoint", evaluate)
    monkeypatch.setattr("damo.data.extract.connect_ray", lambda cfg: None)
    args = ["eval", "run", "--checkpoint", "ckpt", "--out", str(tmp_path), "--gpus-per-actor", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert seen["settings"].gpus_per_actor == 1.0
    bad = CliRunner().invoke(app, [*args[:-1], "-1"])
    assert bad.exit_code == 2


def test_retrieval_embeds_the_split_in_actors_like_the_driver_did(
    checkpoint, tiny_backbones, tiny_world, tiny_features
):
    """Same metrics as the former driver-side implementation, over the split's videos only."""
    import numpy as np
    import torch

    from damo.data.extract import feature_config_hash
    from damo.data.records import read_records
    from damo.data.training import read_feature_table, table_to_numpy, video_tensors
    from damo.eval.batch import load_model, retrieval
    from damo.eval.metrics import retrieval_metrics
    from damo.model.video import VideoFeatures

    storage = Storage()
    feature_hash = feature_config_hash(tiny_config(tiny_backbones))
    records_uri = str(tiny_world / "records" / "train.parquet")
    ranked = retrieval(
        str(checkpoint),
        str(tiny_features),
        records_uri,
        storage,
        feature_hash,
        EvalSettings(batch_size=3),  # several batches, so batching must not matter
    )

    # the former implementation: every feature row read and embedded on the driver
    captions = {
        r["video_uri"]: r["answer"]
        for r in read_records(records_uri, storage).to_pylist()
        if r["task"] == "caption"
    }
    table = table_to_numpy(read_feature_table(str(tiny_features), storage, feature_hash))
    keep = [i for i, uri in enumerate(table["video_uri"]) if uri in captions]
    assert 2 <= len(keep) < len(table["video_uri"])  # the split is a strict subset
    model = load_model(str(checkpoint), storage)
    batch = {k: v[keep] for k, v in table.items()}
    with torch.no_grad():
        video_emb = model.embed_video(VideoFeatures.from_batch(video_tensors(batch)))
        text_emb = model.embed_text([captions[u] for u in batch["video_uri"]])
    expected = retrieval_metrics((text_emb @ video_emb.T).float().numpy())

    assert ranked["model"]["candidates"] == len(keep)
    for key, value in expected.items():
        assert np.isclose(ranked["model"][key], value), (key, ranked["model"][key], value)

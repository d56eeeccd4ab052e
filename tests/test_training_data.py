"""Feature shards + records -> per-stage Ray Datasets -> batches DamoModel trains on."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_config

from damo.data.extract import feature_config_hash
from damo.data.records import read_records, write_records
from damo.data.training import StageCollator, conversation, training_dataset
from damo.model.damo import DamoModel
from damo.storage import Storage, join

STAGES = {1: ("caption",), 2: ("qa",), 3: ("grounding", "temporal_qa"), 4: ("dialogue",)}


@pytest.fixture(scope="module")
def feature_hash(tiny_backbones) -> str:
    return feature_config_hash(tiny_config(tiny_backbones))


@pytest.fixture(scope="module")
def model(tiny_backbones):
    torch.manual_seed(0)
    return DamoModel.from_config(tiny_config(tiny_backbones).model)


def test_conversation_of_each_task():
    assert conversation(
        {
            "task": "grounding",
            "query": "when is a high tone heard?",
            "answer": "from 1.0 to 2.5 seconds.",
        }
    ) == [
        {"role": "user", "content": "when is a high tone heard?"},
        {"role": "assistant", "content": "from 1.0 to 2.5 seconds."},
    ]
    turns = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert conversation({"task": "dialogue", "turns": turns, "query": "", "answer": ""}) == turns
    assert (
        conversation({"task": "caption", "query": "", "answer": "a red circle."})[0]["content"]
        == "describe the video."
    )


@pytest.mark.parametrize("stage", [1, 2, 3, 4])
def test_each_stage_yields_batches_the_model_trains_on(
    stage, tiny_world, tiny_features, model, feature_hash
):
    storage = Storage()
    records_uri = str(tiny_world / "records" / "train.parquet")
    dataset, report = training_dataset(
        str(tiny_features), records_uri, STAGES[stage], storage, feature_hash
    )
    assert report.unmatched == 0 and report.matched > 0
    assert dataset.count() == report.matched
    objective = model.cfg.stages.get(stage).objective
    collate = StageCollator(objective, model.prompt_builder, model.tokenize_text)
    batch = next(iter(dataset.iter_torch_batches(batch_size=4, collate_fn=collate)))
    frames, segments = model.cfg.frames, model.cfg.audio_segments  # tiny: 16 and 16
    assert batch["visual"].shape == (4, frames, 17, 32)
    assert batch["audio"].shape == (4, segments, 50, 32)
    assert batch["visual_times"].shape == (4, frames) and batch["audio_mask"].dtype == torch.bool
    if objective == "lm":
        answer_tokens = (batch["labels"] != -100).sum(dim=1)
        assert (answer_tokens > 0).all()  # every example has something to learn
        assert ((batch["labels"] != -100) <= batch["attention_mask"].bool()).all()
    model.set_stage(stage)
    model.train()
    losses = model(batch, stage)
    assert torch.isfinite(losses["loss"])
    losses["loss"].backward()
    grads = [p.grad for p in model.trainable_parameters(stage)]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    model.zero_grad(set_to_none=True)


def test_records_without_features_are_reported(tiny_world, tiny_features, tmp_path, feature_hash):
    storage = Storage()
    records = read_records(str(tiny_world / "records" / "train.parquet"), storage).to_pylist()
    ghost = {**records[0], "id": "ghost-1", "video_uri": join(str(tiny_world), "videos/ghost.mp4")}
    uri = str(tmp_path / "records.parquet")
    write_records([*records, ghost], uri, storage)
    tasks = (records[0]["task"],)
    dataset, report = training_dataset(str(tiny_features), uri, tasks, storage, feature_hash)
    assert report.videos_without_features == [ghost["video_uri"]]
    assert report.unmatched == 1
    assert dataset.count() == report.matched
    assert json.loads(dataset.take(1)[0]["conversation"])

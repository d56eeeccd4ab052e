"""Feature shards + records -> per-stage Ray Datasets -> batches DamoModel trains on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from damo.config import load_config
from damo.data.extract import feature_config_hash
from damo.data.records import read_records, write_records
from damo.data.training import StageCollator, conversation, training_dataset
from damo.model.damo import DamoModel
from damo.model.video import VideoFeatures
from damo.storage import Storage, join
from damo.train.stages import stage_spec

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
    collate = StageCollator(objective, model.conversation_inputs, model.tokenize_text)
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


def test_task_repeats_read_a_task_more_often_per_epoch(tiny_world, tiny_features, feature_hash):
    """A data mixture: each grounding record yields 3 rows, the others 1; validation (no
    repeats) and the join report's record counts are unchanged."""
    storage = Storage()
    records_uri = str(tiny_world / "records" / "train.parquet")
    tasks = ("grounding", "qa")
    plain, plain_report = training_dataset(
        str(tiny_features), records_uri, tasks, storage, feature_hash
    )
    mixed, report = training_dataset(
        str(tiny_features), records_uri, tasks, storage, feature_hash, task_repeats={"grounding": 3}
    )
    assert report.matched == plain_report.matched == plain_report.rows
    counts = {}
    for row in plain.select_columns(["record_id", "task"]).take_all():
        counts[row["task"]] = counts.get(row["task"], 0) + 1
    assert counts["grounding"] > 0 and counts["qa"] > 0
    assert report.rows == counts["qa"] + 3 * counts["grounding"]
    rows = mixed.select_columns(["record_id", "task"]).take_all()
    assert len(rows) == report.rows
    per_record = {}
    for row in rows:
        per_record.setdefault((row["task"], row["record_id"]), 0)
        per_record[(row["task"], row["record_id"])] += 1
    assert {n for (task, _), n in per_record.items() if task == "grounding"} == {3}
    assert {n for (task, _), n in per_record.items() if task == "qa"} == {1}


def test_task_repeats_must_name_a_trained_task():
    with pytest.raises(ValueError, match="does not train"):
        load_config("tiny", ["train.stages.stage3.task_repeats={dialogue: 2}"])
    with pytest.raises(ValueError, match="at least 1"):
        load_config("tiny", ["train.stages.stage3.task_repeats={grounding: 0}"])
    cfg = load_config("tiny", ["train.stages.stage3.task_repeats={grounding: 2}"])
    assert stage_spec(cfg, 3).task_repeats == {"grounding": 2}
    assert stage_spec(cfg, 4).task_repeats == {}


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


def test_stale_and_duplicate_feature_rows_are_not_read(
    tiny_world, tiny_features, tmp_path, feature_hash
):
    """Rows of an older feature config, a re-run's copy and an older object version: training
    and evaluation see exactly one current row per video, and stale shards are not read."""
    import os
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from damo.data.training import feature_dataset, read_feature_table, select_feature_rows

    storage = Storage()
    features = tmp_path / "features-mixed"
    shutil.copytree(tiny_features / "features", features / "features")
    shards = sorted((features / "features").glob("*.parquet"))
    table = pq.read_table(shards[0])
    rows = table.num_rows

    def replaced(table: pa.Table, name: str, values: list) -> pa.Table:
        return table.set_column(table.schema.get_field_index(name), name, pa.array(values))

    # an older decode config wrote the same videos under another hash
    stale = replaced(table, "config_hash", ["0ld-config"] * rows)
    stale = replaced(stale, "key", [f"stale-{i}" for i in range(rows)])
    pq.write_table(stale, features / "features" / "stale.parquet")
    # a re-run wrote the same rows (same keys) again
    shutil.copy(shards[0], features / "features" / "rerun.parquet")
    # the first video's object changed (new etag -> new key), extracted last
    newer = replaced(table.slice(0, 1), "key", ["newer-version"])
    newer_path = features / "features" / "zz-newer.parquet"
    pq.write_table(newer, newer_path)
    later = os.stat(newer_path).st_mtime + 60
    os.utime(newer_path, (later, later))
    changed_video = table.column("video_uri")[0].as_py()

    records_uri = str(tiny_world / "records" / "train.parquet")
    tasks = ("caption", "qa", "grounding", "temporal_qa", "dialogue")
    dataset, report = training_dataset(str(features), records_uri, tasks, storage, feature_hash)
    assert report.unmatched == 0
    assert report.stale_rows == rows
    # duplicates are counted among the split's videos: the re-run's copies and the older version
    split_videos = set(read_records(records_uri, storage).column("video_uri").to_pylist())
    copied = sum(uri in split_videos for uri in table.column("video_uri").to_pylist())
    assert copied > 0 and report.duplicate_rows == copied + (changed_video in split_videos)
    trained = dataset.select_columns(["record_id", "video_uri"]).take_all()
    ids = [r["record_id"] for r in trained]
    assert len(ids) == len(set(ids)) == report.matched  # one row per record, none twice

    selection = select_feature_rows(str(features), storage, feature_hash)
    read = {Path(p).name for p in selection.paths}
    assert "stale.parquet" not in read and shards[0].name not in read  # superseded: not read
    assert selection.chosen[changed_video] == (str(newer_path), "newer-version")

    videos = {r["video_uri"] for r in trained}
    evaluated = read_feature_table(str(features), storage, feature_hash)
    uris = evaluated.column("video_uri").to_pylist()
    assert len(uris) == len(set(uris)) == len(selection.chosen) >= len(videos)
    assert set(evaluated.column("config_hash").to_pylist()) == {feature_hash}
    assert evaluated.filter(pa.compute.equal(evaluated["video_uri"], changed_video))[
        "key"
    ].to_pylist() == ["newer-version"]
    one_per_video = feature_dataset(selection, feature_hash).select_columns(["video_uri"])
    assert sorted(r["video_uri"] for r in one_per_video.take_all()) == sorted(uris)


def test_an_anchored_lm_stage_trains_the_stage1_heads_on_captions(
    tiny_world, tiny_features, model, feature_hash
):
    """`train.stages.stageK.anchor`: stage 1's losses on a caption batch join the LM loss in
    the same forward, and reach the heads and the pathway, not the LLM's adapter."""
    storage = Storage()
    records_uri = str(tiny_world / "records" / "train.parquet")
    batches = {}
    for stage in (1, 3):
        dataset, _ = training_dataset(
            str(tiny_features), records_uri, STAGES[stage], storage, feature_hash
        )
        objective = model.cfg.stages.get(stage).objective
        collate = StageCollator(objective, model.conversation_inputs, model.tokenize_text)
        batches[stage] = next(iter(dataset.iter_torch_batches(batch_size=4, collate_fn=collate)))
    names = {id(p): n for n, p in model.named_parameters()}
    plain = {names[id(p)] for p in model.set_stage(3)}
    anchored = {names[id(p)] for p in model.set_stage(3, anchored=True)}
    heads = {n for n in names.values() if n.startswith("heads.")}
    assert not plain & heads and anchored == plain | heads
    groups = model.parameter_groups(3, 1e-3, {"heads": 0.5}, anchored=True)
    assert {names[id(p)] for g in groups for p in g["params"]} == anchored
    assert {g["lr"] for g in groups if names[id(g["params"][0])].startswith("heads.")} == {5e-4}

    model.train()
    losses = model(batches[3], 3, batches[1])
    assert torch.isfinite(losses["anchor"]) and losses["loss"] is losses["lm"]
    losses["anchor"].backward()
    reached = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum()}
    assert heads <= reached
    assert any(n.startswith("pathway.bridge.") for n in reached)  # the bridge, in stage 3
    assert not any("lora_" in n for n in reached)  # the LLM never sees the captions
    model.zero_grad(set_to_none=True)

    # `anchor.losses` picks the terms: without VTG the captioning head gets no gradient
    cheap = model(batches[3], 3, batches[1], ["vtc", "vtm"])["anchor"]
    cheap.backward()
    reached = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum()}
    assert not any(n.startswith("heads.vtg.") for n in reached)
    assert any(n.startswith("heads.vtc.") for n in reached)
    assert any(n.startswith("heads.vtm.") for n in reached)
    model.zero_grad(set_to_none=True)
    model.eval()  # no audio dropped at random, so the two calls see the same videos
    with torch.no_grad():
        video = VideoFeatures.from_batch(batches[1])
        ids, mask = batches[1]["text_input_ids"], batches[1]["text_attention_mask"]
        torch.manual_seed(1)  # VTM draws its hard negatives
        full = model.alignment_losses(video, ids, mask)
        torch.manual_seed(1)
        cheap = model(batches[3], 3, batches[1], ["vtc", "vtm"])["anchor"]
    weights = model.cfg.heads
    assert set(model.alignment_losses(video, ids, mask, ["vtg"])) == {"vtg", "loss"}
    torch.testing.assert_close(
        cheap, weights.vtc_weight * full["vtc"] + weights.vtm_weight * full["vtm"]
    )
    torch.testing.assert_close(
        full["loss"],
        weights.vtc_weight * full["vtc"]
        + weights.vtm_weight * full["vtm"]
        + weights.vtg_weight * full["vtg"],
    )

    with pytest.raises(ValueError, match="anchor needs an LM stage"):
        stage_spec(load_config("tiny", ["train.stages.stage1.anchor.weight=1"]), 1)
    with pytest.raises(ValueError, match="lists a loss twice"):
        load_config("tiny", ["train.stages.stage3.anchor.losses=[vtc,vtc]"])
    with pytest.raises(ValueError, match="at least 1"):
        load_config("tiny", ["train.stages.stage3.anchor.losses=[]"])
    with pytest.raises(ValueError, match="vtx"):
        load_config("tiny", ["train.stages.stage3.anchor.losses=[vtx]"])

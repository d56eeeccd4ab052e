"""Training: the 4-stage chain, resuming after the driver dies, and surviving a dead worker.

Each scenario runs `damo train` in a subprocess (with its own local Ray cluster), kills a process
by PID, and checks the run manifest.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from damo.config import load_config
from damo.data.extract import feature_config_hash
from damo.data.training import read_feature_table, table_to_numpy, video_tensors
from damo.model.checkpoint import load_checkpoint
from damo.storage import Storage
from damo.train.loop import MODEL_DIR

DAMO = str(Path(sys.executable).parent / "damo")
pytestmark = pytest.mark.slow


def write_config(
    path: Path, backbones: Path, world: Path, features: Path, stages: dict, **train
) -> Path:
    config = {
        "base": "tiny",
        "model": {
            name: {"path": str(backbones / name)}
            for name in ("vision", "audio", "text_encoder", "llm")
        },
        "ray": {"num_cpus": 2, "object_store_memory_mb": 256},
        "train": {
            "runs_root": str(path.parent / "runs"),
            "data": {"features": str(features), "records": str(world / "records")},
            "stages": stages,
            **train,
        },
    }
    path.write_text(yaml.safe_dump(config))
    return path


def start_train(config: Path, run_id: str, *extra: str) -> subprocess.Popen:
    env = {
        **os.environ,
        "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_OFFLINE": "1",
        "RAY_AUTH_MODE": "disabled",
    }
    log = open(config.parent / f"{run_id}.log", "ab")  # noqa: SIM115 (the child owns it)
    return subprocess.Popen(
        [DAMO, "train", "--config", str(config), "--run-id", run_id, *extra],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )


def manifest(config: Path, run_id: str) -> dict:
    path = config.parent / "runs" / run_id / "manifest.json"
    return json.loads(path.read_text()) if path.exists() else {"stages": {}}


def read_metrics(config: Path, run_id: str, stage: int) -> list[dict]:
    path = config.parent / "runs" / run_id / "metrics" / f"stage{stage}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def wait_for(condition, what: str, proc: subprocess.Popen, timeout_s: float = 420) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited ({proc.returncode}) before {what}")
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


def stage_checkpoints(config: Path, run_id: str, stage: int) -> list[dict]:
    """Checkpoints Ray Train has registered for a stage (a directory alone may be half-made)."""
    run = config.parent / "runs" / run_id / "ray" / f"{run_id}-stage{stage}"
    try:
        snapshot = json.loads((run / "checkpoint_manager_snapshot.json").read_text())
        return snapshot["checkpoint_results"]
    except (OSError, ValueError, KeyError):
        return []


def kill_group(proc: subprocess.Popen) -> None:
    """Whatever the dead driver left behind (its local Ray cluster) goes with it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


def finish(proc: subprocess.Popen, config: Path, run_id: str, timeout_s: float = 600) -> None:
    try:
        code = proc.wait(timeout=timeout_s)
    finally:
        kill_group(proc)
    log = (config.parent / f"{run_id}.log").read_text(errors="replace")
    assert code == 0, log[-4000:]


SMALL = {"max_steps": 4, "batch_size": 8, "log_every": 2}
LONG = {"epochs": 2, "batch_size": 4, "log_every": 5, "checkpoint_every": 5}


def test_a_failed_stage_is_recorded_and_reported_in_one_line(
    tmp_path, tiny_backbones, tiny_world, tiny_features
):
    """A stage that fails inside the worker (a text encoder directory without a model): the
    manifest says failed with the error, and the CLI prints one line and where the logs are."""
    from typer.testing import CliRunner

    from damo.cli import app

    config = write_config(
        tmp_path / "run.yaml", tiny_backbones, tiny_world, tiny_features, {"stage1": SMALL}
    )
    missing = tmp_path / "no-text-encoder"
    missing.mkdir()  # there, but holding no model: transformers refuses it in the worker
    args = ["train", "--config", str(config), "--run-id", "bad", "--stages", "1"]
    args += ["--set", f"model.text_encoder.path={missing}", "--set", "train.scaling.max_failures=0"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "stage 1 (video-text alignment) failed" in errors[0], errors
    assert "Traceback" not in result.output
    assert f"logs: run {tmp_path / 'runs' / 'bad'}" in result.output
    entry = manifest(config, "bad")["stages"]["1"]
    assert entry["status"] == "failed"
    # the worker's own error, in one line (not Ray Train's wrapper around it)
    assert "no-text-encoder" in entry["error"] and "\n" not in entry["error"], entry
    assert not entry["error"].startswith(("WorkerGroupError", "TrainingFailedError")), entry
    assert entry["logs"]["run"] == str(tmp_path / "runs" / "bad")


@pytest.mark.timeout(1500)  # four stages and a resume; the shared 2-core machine is slow
def test_driver_killed_in_stage_3_resumes_there(
    tmp_path, tiny_backbones, tiny_world, tiny_features
):
    stages = {"stage1": SMALL, "stage2": SMALL, "stage3": LONG, "stage4": SMALL}
    config = write_config(tmp_path / "run.yaml", tiny_backbones, tiny_world, tiny_features, stages)
    first = start_train(config, "dk")
    try:
        wait_for(
            lambda: (
                manifest(config, "dk")["stages"].get("3", {}).get("status") == "running"
                and stage_checkpoints(config, "dk", 3)
            ),
            "a stage-3 checkpoint",
            first,
            timeout_s=900,  # stages 1 and 2 come first; a shared 2-core machine is slow
        )
        before = manifest(config, "dk")["stages"]
        os.kill(first.pid, signal.SIGKILL)  # the driver, by PID
    finally:
        kill_group(first)
    assert before["1"]["status"] == before["2"]["status"] == "finished"

    # resumed on a resized cluster: two workers where the first driver had one
    resized = ("--set", "train.scaling.num_workers=2", "--set", "train.scaling.cpus_per_worker=0.5")
    second = start_train(config, "dk", *resized)
    finish(second, config, "dk")
    after = manifest(config, "dk")["stages"]
    for stage in ("1", "2"):  # not redone
        assert after[stage] == before[stage]
    assert after["3"]["status"] == after["4"]["status"] == "finished"
    assert after["3"]["attempts"] == 2
    # the preset anchors stages 2 and 3 with 16 captions a batch; this world has fewer
    log = (config.parent / "dk.log").read_text(errors="replace")
    for stage in (2, 3):
        assert f"warning: stage {stage}: the anchor's batches hold" in log, log[-3000:]
    assert after["3"]["metrics"]["restarts"] >= 1  # resumed from its checkpoint, not step 0
    history = read_metrics(config, "dk", 3)
    assert [r["workers"] for r in history if r["restarts"] == 0][-1] == 1
    resumed = [r for r in history if r["restarts"] >= 1]
    assert resumed and {r["workers"] for r in resumed} == {2}
    assert resumed[-1]["epoch"] == 2  # both epochs finished on the resized cluster
    for stage in ("1", "2", "3", "4"):  # validation loss fell in every stage
        metrics = after[stage]["metrics"]
        assert metrics["best_val_loss"] < metrics["first_val_loss"], (stage, metrics)
    assert (config.parent / "runs" / "dk" / "loss_curves.png").stat().st_size > 10_000
    assert list((config.parent / "runs" / "dk" / "tensorboard" / "stage4").glob("events.*"))

    # the stage-4 checkpoint loads into a fresh DamoModel and generates text
    model = load_checkpoint(Path(after["4"]["checkpoint"]) / MODEL_DIR)
    cfg = load_config(str(config))
    table = read_feature_table(str(tiny_features), Storage(), feature_config_hash(cfg)).slice(0, 2)
    batch = table_to_numpy(table)
    from damo.model.video import VideoFeatures

    video = VideoFeatures.from_batch(video_tensors(batch))
    with torch.no_grad():
        texts = model.generate(video, ["what colour is the circle?"] * 2, max_new_tokens=12)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    assert any(t.strip() for t in texts)


def checkpoint_tensors(checkpoint: str) -> dict[str, torch.Tensor]:
    """Every tensor a training checkpoint's model files hold, by file and name."""
    from safetensors.torch import load_file

    folder = Path(checkpoint) / MODEL_DIR
    return {
        f"{path.name}:{name}": tensor
        for path in sorted(folder.glob("*.safetensors"))
        for name, tensor in load_file(path).items()
    }


def read_record_ids(config: Path, run_id: str, stage: int) -> dict[int, list[dict]]:
    """attempt -> the batches rank 0 logged (train.record_ids)."""
    folder = config.parent / "runs" / run_id / "record_ids" / f"stage{stage}"
    out = {}
    for path in folder.glob("rank0-attempt*.jsonl"):
        attempt = int(path.stem.rsplit("attempt", 1)[1])
        out[attempt] = [json.loads(line) for line in path.read_text().splitlines() if line]
    return out


@pytest.mark.timeout(1200)
def test_a_killed_worker_restarts_from_the_last_checkpoint(
    tmp_path, tiny_backbones, tiny_world, tiny_features
):
    """With the default (global, seeded) shuffle, the interrupted epoch still trains every
    row exactly once counting from the checkpoint: the rows trained before it, plus the rows
    of the restarted worker. Rows trained after the checkpoint (lost with the worker) are
    trained again, once. The stage is anchored (stage 1's losses on caption batches every
    other step), so the anchor's caption stream must carry on from the checkpoint too. Its
    batch (16, the default) is more than the tiny world's 10 training captions, so the anchor
    uses batches of 10 and says so."""
    anchor = {"weight": 1.0, "every": 2}
    config = write_config(
        tmp_path / "run.yaml",
        tiny_backbones,
        tiny_world,
        tiny_features,
        {"stage3": {**LONG, "anchor": anchor}},
        record_ids=True,
    )
    proc = start_train(config, "wk", "--stages", "3")
    try:
        wait_for(lambda: stage_checkpoints(config, "wk", 3), "a stage-3 checkpoint", proc)
        workers = [
            p
            for p in psutil.Process(proc.pid).children(recursive=True)
            if "RayTrainWorker" in " ".join(p.cmdline())
        ]
        assert len(workers) == 1, workers
        os.kill(workers[0].pid, signal.SIGKILL)  # one training worker, by PID
        finish(proc, config, "wk")
    finally:
        kill_group(proc)
    entry = manifest(config, "wk")["stages"]["3"]
    assert entry["status"] == "finished" and entry["attempts"] == 1
    assert entry["metrics"]["restarts"] >= 1
    # all of both epochs' steps ran: a restart neither skips nor repeats the schedule
    rows = entry["metrics"]["train_rows"]
    assert entry["metrics"]["steps"] == math.ceil(rows / 4) * 2
    history = read_metrics(config, "wk", 3)
    steps = [r["step"] for r in history if "train_loss" in r]
    assert max(steps) == entry["metrics"]["steps"]
    anchor_losses = [r["train_anchor_loss"] for r in history if "train_anchor_loss" in r]
    assert anchor_losses and all(math.isfinite(loss) for loss in anchor_losses)
    assert max(r["anchor_pass"] for r in history) >= 1  # the captions are read pass after pass
    log = (config.parent / "wk.log").read_text(errors="replace")
    assert "warning: stage 3: the anchor's batches hold 10 captions, not 16" in log, log[-3000:]

    logged = read_record_ids(config, "wk", 3)
    first, last = logged[0], logged[max(logged)]
    resumed_at = last[0]["step"] - 1  # the checkpoint's step
    kept = [b for b in first if b["step"] <= resumed_at] + last
    for epoch in (0, 1):
        ids = [i for b in kept if b["epoch"] == epoch for i in b["ids"]]
        assert len(ids) == len(set(ids)) == rows, (epoch, len(ids), len(set(ids)), rows)
    orders = [[i for b in kept if b["epoch"] == e for i in b["ids"]] for e in (0, 1)]
    assert orders[0] != orders[1]  # each epoch its own shuffle
    # rows of one video are spread out, not next to each other as in the shards
    videos = ["-".join(i.split("-")[:2]) for i in orders[0]]  # syn<seed>-<clip>-<task>-<n>
    assert sum(a == b for a, b in zip(videos, videos[1:], strict=False)) < len(videos) // 2

    # and it ends with the weights of a run never interrupted: the rows, the optimiser and the
    # random stream (the tiny preset drops audio at random) all carry on from the checkpoint
    whole = start_train(config, "wk-whole", "--stages", "3")
    finish(whole, config, "wk-whole")
    uninterrupted = manifest(config, "wk-whole")["stages"]["3"]
    assert uninterrupted["metrics"]["restarts"] == 0
    assert uninterrupted["metrics"]["best_val_loss"] == entry["metrics"]["best_val_loss"]
    restarted, never = (
        checkpoint_tensors(entry["checkpoint"]),
        checkpoint_tensors(uninterrupted["checkpoint"]),
    )
    assert restarted.keys() == never.keys()
    differing = [name for name in never if not torch.equal(restarted[name], never[name])]
    assert not differing, f"{len(differing)} of {len(never)} tensors differ, e.g. {differing[:3]}"


def test_an_anchor_needs_two_captions_per_worker_and_is_refused_before_training(
    tmp_path, tiny_backbones, tiny_world, tiny_features, ray_cluster, capsys
):
    """An anchor's batches shrink on a split with fewer captions per worker than its batch
    (the killed-worker test above sees the warning), but VTC needs two captions to contrast,
    so fewer than two per worker stops the stage before any training. A caption whose video
    has no features is reported for the anchor's dataset, as for the stage's own splits."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from damo.train.pipeline import TrainError, fit_stage

    records = tmp_path / "records"
    shutil.copytree(tiny_world / "records", records)
    train = pq.read_table(records / "train.parquet")
    ghost = train.filter(pa.compute.equal(train["task"], "caption")).slice(0, 1).to_pylist()[0]
    ghost.update(id="ghost-caption-0", video_id="ghost", video_uri="/nowhere/ghost.mp4")
    pq.write_table(
        pa.concat_tables([train, pa.Table.from_pylist([ghost], train.schema)]),
        records / "train.parquet",
    )
    config = write_config(
        tmp_path / "run.yaml", tiny_backbones, tiny_world, tiny_features, {"stage3": SMALL}
    )
    cfg = load_config(
        str(config),
        [
            "train.scaling.num_workers=64",
            "train.stages.stage3.anchor.weight=1",
            f"train.data.records={records}",
        ],
    )
    with pytest.raises(TrainError, match="at least 2 captions per worker.*for 64 workers"):
        fit_stage(cfg, 3, str(tmp_path / "runs" / "few"), "few", None, Storage())
    assert not (tmp_path / "runs" / "few").exists()  # nothing ran, nothing was written
    printed = capsys.readouterr().out
    captions = sum(1 for task in train["task"].to_pylist() if task == "caption") + 1
    warning = f"warning: stage 3 anchor: 1 of {captions} records have no features"
    assert f"{warning} (e.g. ['/nowhere/ghost.mp4'])" in printed, printed


def test_ranks_share_an_unsplit_split_without_dropping_or_repeating_rows(ray_cluster):
    """Each rank reads the validation split whole, as Ray Train hands it over, and keeps its
    share of the batches: over 3 ranks, 101 rows in 7 blocks of uneven work all count once."""
    import numpy as np
    import ray.data

    from damo.train.loop import rank_share

    def slow_odd_blocks(batch):  # blocks finish out of order unless the order is preserved
        if batch["id"][0] % 2:
            time.sleep(0.05)
        return batch

    dataset = ray.data.range(101, override_num_blocks=7).map_batches(slow_odd_blocks)
    dataset.context.execution_options.preserve_order = True  # as the training ingest sets it
    shares = [
        np.concatenate([rows["id"] for rows in rank_share(dataset, 4, rank, 3)])
        for rank in range(3)
    ]
    seen = np.concatenate(shares)
    assert sorted(seen.tolist()) == list(range(101))
    assert [len(share) for share in shares] == [36, 33, 32]  # 26 batches: 9, 9, 8; the last of 1


def test_a_new_worker_removes_the_staging_dirs_of_dead_workers(tmp_path):
    """A worker killed while it saved a checkpoint leaves the staging dir in the node's temp
    dir; the next one removes it, and never a live worker's."""
    from damo.train.loop import remove_orphaned_staging_dirs

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphans = [tmp_path / f"damo-ckpt-{dead.pid}-x1", tmp_path / f"damo-tb-{dead.pid}-x2"]
    live = [tmp_path / f"damo-ckpt-{os.getpid()}-x3", tmp_path / "damo-ckpt-notapid"]
    for path in orphans + live:
        path.mkdir()
        (path / "train_state.pt").write_bytes(b"x")
    assert sorted(remove_orphaned_staging_dirs(str(tmp_path))) == sorted(orphans)
    assert sorted(tmp_path.iterdir()) == sorted(live)

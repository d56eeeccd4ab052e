"""Training: the 4-stage chain, resuming after the driver dies, and surviving a dead worker.

Each scenario runs `damo train` in a subprocess (with its own local Ray cluster), kills a process
by PID, and checks the run manifest.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from damo.data.training import read_feature_table, table_to_numpy, video_tensors
from damo.model.checkpoint import load_checkpoint
from damo.storage import Storage
from damo.train.loop import MODEL_DIR

DAMO = str(Path(sys.executable).parent / "damo")
pytestmark = pytest.mark.slow


def write_config(path: Path, backbones: Path, world: Path, features: Path, stages: dict) -> Path:
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
            "shuffle_buffer": 0,
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
        )
        before = manifest(config, "dk")["stages"]
        os.kill(first.pid, signal.SIGKILL)  # the driver, by PID
    finally:
        kill_group(first)
    assert before["1"]["status"] == before["2"]["status"] == "finished"

    second = start_train(config, "dk")
    finish(second, config, "dk")
    after = manifest(config, "dk")["stages"]
    for stage in ("1", "2"):  # not redone
        assert after[stage] == before[stage]
    assert after["3"]["status"] == after["4"]["status"] == "finished"
    assert after["3"]["attempts"] == 2
    assert after["3"]["metrics"]["restarts"] >= 1  # resumed from its checkpoint, not step 0
    for stage in ("1", "2", "3", "4"):  # validation loss fell in every stage
        metrics = after[stage]["metrics"]
        assert metrics["best_val_loss"] < metrics["first_val_loss"], (stage, metrics)
    assert (config.parent / "runs" / "dk" / "loss_curves.png").stat().st_size > 10_000
    assert list((config.parent / "runs" / "dk" / "tensorboard" / "stage4").glob("events.*"))

    # the stage-4 checkpoint loads into a fresh DamoModel and generates text
    model = load_checkpoint(Path(after["4"]["checkpoint"]) / MODEL_DIR)
    table = read_feature_table(str(tiny_features), Storage()).slice(0, 2)
    batch = table_to_numpy(table)
    from damo.model.video import VideoFeatures

    video = VideoFeatures.from_batch(video_tensors(batch))
    with torch.no_grad():
        texts = model.generate(video, ["what colour is the circle?"] * 2, max_new_tokens=12)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    assert any(t.strip() for t in texts)


def test_a_killed_worker_restarts_from_the_last_checkpoint(
    tmp_path, tiny_backbones, tiny_world, tiny_features
):
    config = write_config(
        tmp_path / "run.yaml", tiny_backbones, tiny_world, tiny_features, {"stage3": LONG}
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
    assert entry["metrics"]["steps"] == math.ceil(entry["metrics"]["train_rows"] / 4) * 2
    steps = [r["step"] for r in read_metrics(config, "wk", 3) if "train_loss" in r]
    assert max(steps) == entry["metrics"]["steps"]

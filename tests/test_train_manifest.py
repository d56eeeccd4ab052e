"""The run manifest without a cluster: a stage that fails (or is interrupted) is recorded as
failed with its error, and the resume key ignores the scaling config."""

from __future__ import annotations

import json

import pytest

import damo.train.pipeline as pipeline
from damo.config import load_config
from damo.train.pipeline import TrainError, train_pipeline, training_hash


def config(tmp_path, *extra: str):
    return load_config("tiny", [f"train.runs_root={tmp_path / 'runs'}", *extra])


def stage_entry(tmp_path, run_id: str, stage: int) -> dict:
    manifest = json.loads((tmp_path / "runs" / run_id / "manifest.json").read_text())
    return manifest["stages"][str(stage)]


def test_the_resume_key_ignores_scaling(tmp_path):
    one = config(tmp_path)
    two = config(tmp_path, "train.scaling.num_workers=2", "train.scaling.cpus_per_worker=0.5")
    assert training_hash(one) == training_hash(two)
    assert training_hash(one) != training_hash(config(tmp_path, "train.stages.stage1.epochs=9"))


def test_a_stage_whose_fit_raises_is_recorded_as_failed(tmp_path, monkeypatch):
    def fit_stage(*args, **kwargs):
        raise RuntimeError("Traceback (most recent call last):\n  ...\nworker ran out of disk")

    monkeypatch.setattr(pipeline, "fit_stage", fit_stage)
    with pytest.raises(TrainError, match="stage 1 .* failed: RuntimeError: worker ran out") as err:
        train_pipeline(config(tmp_path), "boom", stages=(1,), log=lambda *_: None)
    entry = stage_entry(tmp_path, "boom", 1)
    assert entry["status"] == "failed"
    assert entry["error"] == "RuntimeError: worker ran out of disk"
    assert err.value.logs["run"] == str(tmp_path / "runs" / "boom")


def test_a_stage_whose_result_has_an_error_is_recorded_as_failed(tmp_path, monkeypatch):
    class Result:
        error = ValueError("bad batch")

    monkeypatch.setattr(pipeline, "fit_stage", lambda *a, **k: (Result(), {}, 0))
    with pytest.raises(TrainError, match="ValueError: bad batch"):
        train_pipeline(config(tmp_path), "res", stages=(1,), log=lambda *_: None)
    assert stage_entry(tmp_path, "res", 1)["status"] == "failed"


def test_an_interrupted_stage_is_recorded_and_the_interrupt_goes_on(tmp_path, monkeypatch):
    def fit_stage(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "fit_stage", fit_stage)
    with pytest.raises(KeyboardInterrupt):
        train_pipeline(config(tmp_path), "ctrl-c", stages=(1,), log=lambda *_: None)
    entry = stage_entry(tmp_path, "ctrl-c", 1)
    assert entry["status"] == "failed" and entry["error"] == "KeyboardInterrupt"


def test_an_error_while_the_caller_stops_the_run_leaves_the_stage_running(tmp_path, monkeypatch):
    def fit_stage(*args, **kwargs):
        raise RuntimeError("the trainer's controller died")  # as when Tune kills a stopped trial

    monkeypatch.setattr(pipeline, "fit_stage", fit_stage)
    with pytest.raises(RuntimeError):
        train_pipeline(
            config(tmp_path), "asha", stages=(1,), log=lambda *_: None, stopping=lambda: True
        )
    entry = stage_entry(tmp_path, "asha", 1)
    assert entry["status"] == "running" and "error" not in entry
    with pytest.raises(TrainError):  # the same error while nobody stops the run is a failure
        train_pipeline(
            config(tmp_path), "asha", stages=(1,), log=lambda *_: None, stopping=lambda: False
        )
    assert stage_entry(tmp_path, "asha", 1)["status"] == "failed"


def test_one_line_reaches_the_worker_error_behind_ray_trains_wrapper():
    from ray.train.v2.api.exceptions import WorkerGroupError

    from damo.train.pipeline import one_line

    worker = OSError("Traceback (most recent call last):\n  File ...\nno such dir: /x/text")
    wrapped = WorkerGroupError("rank 1 and 0 failed", {1: ValueError("other"), 0: worker})
    assert one_line(wrapped) == "OSError: no such dir: /x/text"

"""A real sweep, as a user runs it: `damo tune` in a subprocess (its own Ray cluster, dashboard
on), sweep state and the registry on the session's S3 server.

Four grid trials train stage 3 from a given checkpoint for two short epochs, in the grid's
order: a good learning rate; a recipe that trains only the alignment heads, which the LM loss
never reaches (the trial fails, is recorded, and the sweep goes on); a learning rate too small
to learn (ASHA stops it after its first epoch, behind the first trial); another broken one.
The driver is killed by PID once the first trial has finished; the same command resumes the
sweep without retraining it.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from conftest import tiny_config

from damo.model.checkpoint import save_checkpoint
from damo.model.damo import DamoModel
from damo.storage import Storage

DAMO = str(Path(sys.executable).parent / "damo")
pytestmark = pytest.mark.slow
SWEEP = "ci-sweep"

SPACE = {
    "description": "stage-3 learning rate x what stage 3 trains (the heads alone: the LM loss "
    "reaches no trained weight, and those trials fail)",
    "grid": True,
    "parameters": {
        "train.stages.stage3.optimizer.lr": {"values": [3.0e-3, 1.0e-7]},
        "model.stages.stage3.trainable": {"values": [["bridge", "lora"], ["heads"]]},
    },
}


@pytest.fixture
def ray_tmp():
    directory = tempfile.mkdtemp(prefix="rt-", dir="/tmp")
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def sweep_setup(tiny_backbones, tiny_world, tiny_features, s3_server, tmp_path, ray_tmp):
    storage = Storage(s3_server.s3_config())
    bucket = f"s3://damo-tune-{int(time.time())}"
    storage.ensure_bucket(bucket)
    # the trials' starting point: the tiny model before training (stage 3 needs a checkpoint)
    init = tmp_path / "init"
    save_checkpoint(
        DamoModel.from_config(tiny_config(tiny_backbones).model), init / "model", stage=2
    )
    config = {
        "base": "tiny",
        "model": {
            name: {"path": str(tiny_backbones / name)}
            for name in ("vision", "audio", "text_encoder", "llm")
        },
        # S3 comes from the environment (endpoint and keys), as on a cluster
        "ray": {"num_cpus": 2, "object_store_memory_mb": 256},
        "train": {
            "runs_root": f"{bucket}/runs",
            "data": {"features": str(tiny_features), "records": str(tiny_world / "records")},
            "scaling": {"cpus_per_worker": 0.5},
            # without the preset's stage-1 anchor, which would train the heads of the heads-only
            # trials and keep them from failing
            "stages": {
                "stage3": {"epochs": 2, "batch_size": 8, "log_every": 50, "anchor": {"weight": 0}}
            },
        },
        "tune": {
            "sweeps_root": f"{bucket}/sweeps",
            "registry": f"{bucket}/registry",
            "init_checkpoint": str(init),
            # a 12-clip world's validation split has one grounding record: its mIoU can tie at
            # 0 between trials, while the validation loss always orders them
            "metric": "val_loss",
            "mode": "min",
            "trial_cpus": 0.5,
            "max_failures": 0,
            "asha": {"grace_period": 1, "reduction_factor": 2},
        },
    }
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(SPACE))
    env = {
        **os.environ,
        **s3_server.env(),
        "HF_HUB_OFFLINE": "1",
        "RAY_AUTH_MODE": "disabled",
        "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
        # its own cluster, never joining another; short, for Ray's 107-byte socket paths
        "RAY_TMPDIR": ray_tmp,
        "COLUMNS": "160",
    }
    return tmp_path, bucket, storage, env


def start_sweep(
    workdir: Path,
    env: dict,
    log_name: str,
    config: str = "sweep.yaml",
    space: str = "space.yaml",
    name: str = SWEEP,
) -> subprocess.Popen:
    log = open(workdir / log_name, "ab")  # noqa: SIM115 (the child owns it)
    command = [DAMO, "tune", "--config", config, "--space", space, "--name", name]
    return subprocess.Popen(
        command,
        cwd=workdir,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )


def wait_for(proc: subprocess.Popen, timeout: float, log: Path, env: dict) -> int:
    """The sweep's exit code; past the timeout, a failure that shows where the sweep was: its
    log's tail (the trial table) and its Ray cluster's resources, demands and live actors."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        tail = log.read_text(errors="replace")[-6000:]
        pytest.fail(
            f"`damo tune` still ran after {timeout:.0f} s; its log ends:\n{tail}\n"
            f"its Ray cluster:\n{ray_state(env)}"
        )


def ray_state(env: dict) -> str:
    """`ray status -v`, the live actors and the latest worker logs of the sweep's own cluster
    (in its RAY_TMPDIR): a trial waiting for CPUs, its Ray Data waiting, or a stuck stage."""
    ports = sorted(Path(env["RAY_TMPDIR"]).glob("ray/session_latest/gcs_server_port_*"))
    if not ports:
        return "(no Ray session)"
    import ray

    # the sweep's connect_ray puts its GCS on this node's address
    address = f"{ray.util.get_node_ip_address()}:{ports[0].read_text().strip()}"
    shown = []
    for command in (["status", "-v"], ["list", "actors", "--filter", "state!=DEAD"]):
        try:
            done = subprocess.run(
                [str(Path(DAMO).parent / "ray"), *command, "--address", address],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            shown.append(done.stdout[-4000:] + done.stderr[-1000:])
        except subprocess.TimeoutExpired:
            shown.append(f"ray {' '.join(command)}: no answer in 60 s")
    logs = sorted(ports[0].parent.glob("logs/worker-*"), key=lambda f: f.stat().st_mtime)
    for worker_log in logs[-4:]:
        shown.append(f"--- {worker_log.name}:\n{worker_log.read_text(errors='replace')[-1500:]}")
    return "\n".join(shown)


def kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


def trial_manifests(storage: Storage, bucket: str, sweep: str = SWEEP) -> dict[str, dict]:
    prefix = f"{bucket}/sweeps/{sweep}/trials/"
    manifests = {}
    for info in storage.list_objects(prefix):
        if info.uri.endswith("/manifest.json"):
            manifests[info.uri[len(prefix) :].split("/")[0]] = json.loads(
                storage.read_bytes(info.uri)
            )
    return manifests


def finished_trials(storage: Storage, bucket: str) -> list[str]:
    return sorted(
        trial
        for trial, manifest in trial_manifests(storage, bucket).items()
        if manifest["stages"].get("3", {}).get("status") == "finished"
    )


@pytest.mark.timeout(1500)  # two sweeps' Ray clusters, four trials, evaluation: ~9 min idle
def test_sweep_stops_early_survives_a_failure_and_a_killed_driver(sweep_setup):
    workdir, bucket, storage, env = sweep_setup
    first = start_sweep(workdir, env, "first.log")
    try:
        deadline = time.monotonic() + 900
        while not finished_trials(storage, bucket):
            assert first.poll() is None, (workdir / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no trial finished in 15 minutes"
            time.sleep(2)
        time.sleep(3)  # let Tune note the finished trial, as a user's Ctrl-C would come later
        os.kill(first.pid, signal.SIGKILL)  # the driver, by PID
    finally:
        kill_group(first)  # and the local Ray cluster it started
    done_before = finished_trials(storage, bucket)
    started_before = {
        t: trial_manifests(storage, bucket)[t]["stages"]["3"]["started"] for t in done_before
    }

    second = start_sweep(workdir, env, "second.log")
    try:
        code = wait_for(second, 1200, workdir / "second.log", env)
    finally:
        kill_group(second)
    log = (workdir / "second.log").read_text(errors="replace")
    assert code == 0, log[-4000:]

    # the finished trial was kept, not trained again
    manifests = trial_manifests(storage, bucket)
    for trial, started in started_before.items():
        assert manifests[trial]["stages"]["3"]["started"] == started
        assert manifests[trial]["stages"]["3"]["attempts"] == 1

    sweep = f"{bucket}/sweeps/{SWEEP}"
    rows = list(csv.DictReader(io.StringIO(storage.read_bytes(f"{sweep}/results.csv").decode())))
    assert len(rows) == 4
    by_params = {
        (float(r["train.stages.stage3.optimizer.lr"]), r["model.stages.stage3.trainable"]): r
        for r in rows
    }
    good = by_params[(3.0e-3, str(["bridge", "lora"]))]
    slow = by_params[(1.0e-7, str(["bridge", "lora"]))]
    broken = [r for (_, trained), r in by_params.items() if "heads" in trained]
    assert good["status"] == "finished" and good["epochs"] == "2", good
    assert len(broken) == 2
    assert all(r["status"] == "failed" and "empty parameter list" in r["error"] for r in broken)
    assert float(good["best_val_loss"]) < float(slow["best_val_loss"])
    assert "failed" in log  # the live table's lines

    for name in ("results.md", "curves.png"):
        assert storage.exists(f"{sweep}/{name}"), name

    # the registry's best is the good trial's best epoch, and evaluation takes `best`
    best = json.loads(storage.read_bytes(f"{bucket}/registry/best.json"))
    assert best["sweep"] == SWEEP and best["trial_id"] == good["trial_id"]
    assert best["checkpoint"] == good["checkpoint"] and best["checkpoint"].startswith("s3://")
    assert best["config"]["train"]["stages"]["stage3"]["optimizer"]["lr"] == 3.0e-3
    assert best["code_version"]
    shown = subprocess.run(
        [DAMO, "tune", "best", SWEEP, "--config", "sweep.yaml"],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shown.returncode == 0 and best["checkpoint"] in shown.stdout, shown.stderr
    evaluated = subprocess.run(
        [
            DAMO,
            "eval",
            "run",
            "--config",
            "sweep.yaml",
            "--checkpoint",
            "best",
            "--split",
            "val",
            "--out",
            f"{bucket}/eval-best",
            "--max-new-tokens",
            "8",
        ],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert evaluated.returncode == 0, evaluated.stdout[-2000:] + evaluated.stderr[-2000:]

    # ASHA stops the slow trial at its first rung, by comparison with the good trial's result
    # there, also when the good trial had finished before the kill and is not re-run: the
    # resumed scheduler refills its rungs from the trials' epoch records (ResumableASHA)
    assert slow["status"] == "stopped early" and slow["epochs"] == "1", slow
    assert "stopped early" in log
    # the stopped trial's run says so (the scheduler killed it inside stage 3)
    stopped = trial_manifests(storage, bucket)[slow["trial_id"]]["stages"]["3"]
    assert stopped["status"] == "stopped" and "ASHA" in stopped["note"], json.dumps(stopped)
    metrics = json.loads(storage.read_bytes(f"{bucket}/eval-best/metrics.json"))
    assert metrics["run"]["checkpoint"] == best["checkpoint"]
    assert metrics["metrics"]["grounding"]["model"]["count"] >= 1


@pytest.mark.timeout(900)  # one Ray cluster, one trial through stages 1-3, one through stage 1
def test_the_stage1_rung_stops_a_trial_before_stage_2(sweep_setup):
    """`tune.asha.stage1_rung`: two trials train from stage 1, in the grid's order: a stage-1
    learning rate that learns, then one too small to (a higher stage-1 validation loss). ASHA
    (reduction factor 2) stops the second at the end of stage 1, so its run never starts
    stage 2, and the first goes on to its stage-3 epoch."""
    workdir, bucket, storage, env = sweep_setup
    config = yaml.safe_load((workdir / "sweep.yaml").read_text())
    config["tune"]["asha"]["stage1_rung"] = True
    config["tune"].pop("init_checkpoint")
    config["train"]["stages"] = {
        "stage1": {"max_steps": 6},
        "stage2": {"max_steps": 2},
        "stage3": {"epochs": 1, "max_steps": 2, "batch_size": 8, "log_every": 50},
    }
    (workdir / "stage1.yaml").write_text(yaml.safe_dump(config))
    space = {
        "grid": True,
        "parameters": {"train.stages.stage1.optimizer.lr": {"values": [3.0e-3, 1.0e-9]}},
    }
    (workdir / "stage1-space.yaml").write_text(yaml.safe_dump(space))
    name = "ci-stage1-rung"
    sweep = start_sweep(workdir, env, "stage1.log", "stage1.yaml", "stage1-space.yaml", name)
    try:
        code = wait_for(sweep, 780, workdir / "stage1.log", env)
    finally:
        kill_group(sweep)
    log = (workdir / "stage1.log").read_text(errors="replace")
    assert code == 0, log[-4000:]

    results = storage.read_bytes(f"{bucket}/sweeps/{name}/results.csv").decode()
    rows = {
        float(r["train.stages.stage1.optimizer.lr"]): r
        for r in csv.DictReader(io.StringIO(results))
    }
    learns, stalls = rows[3.0e-3], rows[1.0e-9]
    assert float(learns["stage1_val_loss"]) < float(stalls["stage1_val_loss"]), rows
    assert learns["status"] == "finished" and learns["epochs"] == "1", learns
    assert stalls["status"] == "stopped early" and stalls["epochs"] == "0", stalls
    assert not stalls["best_val_loss"] and not stalls["checkpoint"], stalls
    assert "at the stage-1 rung" in log

    manifests = trial_manifests(storage, bucket, name)
    stopped = manifests[stalls["trial_id"]]
    assert set(stopped["stages"]) == {"1"}, stopped["stages"]  # stage 2 never started
    assert stopped["stages"]["1"]["status"] == "finished"
    assert "stage-1 rung" in stopped["stopped"]
    assert manifests[learns["trial_id"]]["stages"]["3"]["status"] == "finished"
    best = json.loads(storage.read_bytes(f"{bucket}/sweeps/{name}/best.json"))
    assert best["trial_id"] == learns["trial_id"]

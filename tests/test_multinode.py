"""The pipeline on a two-node Ray cluster whose only shared storage is the embedded S3 server.

Each node is its own raylet (tests/ray_nodes.py) with its own HOME, TMPDIR and DAMO_CACHE, and
every driver runs from an empty directory with a HOME of its own. So a path that one process
writes and another expects to find is not there, and anything written outside S3 other than a
cache shows up in those directories. The run: extraction, the four stages with two DDP workers
on two different nodes, a killed driver in stage 3 and its resume, then evaluation.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import yaml

from damo.config import load_config
from damo.config.data import SyntheticConfig
from damo.data.synthetic import generate_world
from damo.storage import Storage, join

pytestmark = [pytest.mark.slow, pytest.mark.multinode]

DAMO = str(Path(sys.executable).parent / "damo")
BUCKET = "s3://damo-multinode"
RUN_ID = "mn"


def node_env(home: Path, s3_server) -> dict:
    """What a cloud node would have: its own disk, and credentials from its instance role
    (here: the environment), never from the pipeline config."""
    (home / "tmp").mkdir(parents=True, exist_ok=True)
    return {
        "HOME": str(home),
        "TMPDIR": str(home / "tmp"),
        "DAMO_CACHE": str(home / ".cache" / "damo"),
        **s3_server.env(),
    }


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3_server):
    """Two raylets (2 logical CPUs each) on 127.0.0.1; yields (address, nodes, env for drivers)."""
    root = tmp_path_factory.mktemp("nodes")
    # Ray's unix sockets live under RAY_TMPDIR: keep that path short
    ray_tmp = tempfile.mkdtemp(prefix="rmn-", dir="/tmp")
    spec = {
        "nodes": [
            {"num_cpus": 2, "object_store_mb": 200, "env": node_env(root / f"node{i}", s3_server)}
            for i in range(2)
        ]
    }
    (root / "spec.json").write_text(json.dumps(spec))
    env = {
        **os.environ,
        "RAY_TMPDIR": ray_tmp,
    }
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).parent / "ray_nodes.py"), str(root / "spec.json")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=open(root / "cluster.log", "wb"),  # noqa: SIM115 (the child owns it)
        env=env,
        start_new_session=True,
    )
    try:
        line = proc.stdout.readline()
        assert line, (root / "cluster.log").read_text()[-3000:]
        info = json.loads(line)
        driver_env = {
            **os.environ,
            "RAY_TMPDIR": ray_tmp,
            "RAY_ADDRESS": info["address"],
            # Ray turns a loopback bootstrap address into this machine's outward IP unless it
            # believes clusters are single-host; the nodes listen on 127.0.0.1 only
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
            "HF_HUB_OFFLINE": "1",
        }
        yield info, driver_env
    finally:
        with contextlib.suppress(Exception):
            proc.stdin.close()
        try:
            proc.wait(timeout=120)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)


def write_config(path: Path, s3_server) -> Path:
    """The pipeline's config, with the server's credentials in it: a configured secret that no
    file the run writes may contain."""
    config = {
        "base": "tiny",
        "storage": {
            "root": BUCKET,
            "s3": {
                "endpoint_url": s3_server.endpoint_url,
                "access_key_id": s3_server.access_key_id,
                "secret_access_key": s3_server.secret_access_key,
            },
        },
        "model": {
            name: {"path": join(BUCKET, "backbones", "tiny", name)}
            for name in ("vision", "audio", "text_encoder", "llm")
        },
        "train": {
            "runs_root": join(BUCKET, "runs"),
            "data": {
                "features": join(BUCKET, "features"),
                "records": join(BUCKET, "world", "records"),
            },
            "scaling": {
                "num_workers": 2,
                "cpus_per_worker": 0.5,
                "placement_strategy": "STRICT_SPREAD",
            },
            # one epoch each: every validation pass reads the whole split on both workers
            "stages": {
                "stage1": {"epochs": 1, "max_steps": 3, "batch_size": 4, "log_every": 1},
                "stage2": {"epochs": 1, "max_steps": 3, "batch_size": 4, "log_every": 1},
                "stage3": {"epochs": 1, "batch_size": 2, "log_every": 2, "checkpoint_every": 2},
                "stage4": {"epochs": 1, "max_steps": 3, "batch_size": 4, "log_every": 1},
            },
        },
    }
    path.write_text(yaml.safe_dump(config))
    return path


class Driver:
    """`damo ...` run as a driver process from an empty directory with its own HOME."""

    def __init__(self, root: Path, env: dict):
        self.cwd = root / "cwd"
        self.home = root / "home"
        self.cwd.mkdir(parents=True)
        self.home.mkdir(parents=True)
        self.env = {
            **env,
            "HOME": str(self.home),
            "TMPDIR": str(self.home),
            "DAMO_CACHE": str(self.home / ".cache" / "damo"),
        }
        self.logs = root / "logs"
        self.logs.mkdir()

    def start(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 (the child owns it)
        return subprocess.Popen(
            [DAMO, *args],
            cwd=self.cwd,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def run(self, name: str, *args: str, timeout_s: float = 900) -> str:
        proc = self.start(name, *args)
        try:
            code = proc.wait(timeout=timeout_s)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        assert code == 0, self.log(name)[-5000:]
        return self.log(name)


def read_json(storage: Storage, uri: str) -> dict | None:
    return json.loads(storage.read_bytes(uri)) if storage.exists(uri) else None


def wait_for(condition, what: str, proc: subprocess.Popen, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the driver exited ({proc.returncode}) before {what}")
        time.sleep(2)
    raise AssertionError(f"timed out waiting for {what}")


def files_outside_caches(root: Path) -> list[str]:
    """Files under a node's or driver's own directories that are not caches."""
    allowed = (".cache/", ".config/matplotlib/")
    out = []
    for path in root.rglob("*"):
        if path.is_file():
            relative = path.relative_to(root).as_posix()
            if not relative.startswith(allowed):
                out.append(relative)
    return out


def driver_val_loss(cfg, checkpoint_uri: str, stage: int, storage: Storage):
    """Per-record (loss x weight, weight) of a stage's val split, computed here, on one process,
    the way the train loop weighs them: answer tokens (LM) or examples (alignment)."""
    from damo.data.extract import feature_config_hash
    from damo.data.training import StageCollator, training_dataset
    from damo.model.checkpoint import load_checkpoint
    from damo.train.loop import MODEL_DIR
    from damo.train.stages import stage_spec

    spec = stage_spec(cfg, stage)
    local = storage.fetch_dir(checkpoint_uri) / MODEL_DIR
    model = load_checkpoint(local, resolve=storage.fetch_dir).eval()
    data = cfg.train.data
    dataset, _ = training_dataset(
        data.features,
        join(data.records, f"{data.val_split}.parquet"),
        spec.tasks,
        storage,
        feature_config_hash(cfg),
    )
    collate = StageCollator(spec.objective, model.conversation_inputs, model.tokenize_text)
    terms = []
    with torch.no_grad():
        for batch in dataset.iter_torch_batches(batch_size=1, collate_fn=collate):
            if spec.objective == "lm":
                weight = float((batch["labels"][:, 1:] != -100).sum())
            else:
                weight = 1.0
            terms.append((float(model(batch, stage)["loss"]) * weight, weight))
    return terms


@pytest.mark.timeout(2400)  # extraction, 4 stages twice over, evaluation: ~10 min on 2 idle cores
def test_pipeline_on_two_nodes_with_s3_as_the_only_shared_storage(
    cluster, s3_server, tiny_backbones, ray_cluster, tmp_path
):
    info, env = cluster
    config = write_config(tmp_path / "pipeline.yaml", s3_server)
    secret = s3_server.secret_access_key.encode()
    storage = Storage(s3_server.s3_config())
    storage.ensure_bucket(BUCKET)
    storage.put_dir(tiny_backbones, join(BUCKET, "backbones", "tiny"))
    settings = SyntheticConfig(num_clips=12, seed=3, min_duration_s=6.0, max_duration_s=12.0)
    generate_world(join(BUCKET, "world"), storage, settings, workers=2, progress=False)
    driver = Driver(tmp_path / "driver", env)

    # extraction
    driver.run(
        "extract",
        *("extract", "--config", str(config), "--videos", join(BUCKET, "world", "videos")),
        *("--out", join(BUCKET, "features")),
    )
    summary = read_json(storage, join(BUCKET, "features", "summary.json"))
    assert summary["ok"] == 12 and summary["errors"] == {}, summary

    # training, with the driver killed by PID once stage 3 has a checkpoint
    run = join(BUCKET, "runs", RUN_ID)
    train_args = ("train", "--config", str(config), "--run-id", RUN_ID)
    first = driver.start("train-1", *train_args)
    try:
        snapshot = join(run, "ray", f"{RUN_ID}-stage3", "checkpoint_manager_snapshot.json")
        wait_for(
            lambda: (
                (read_json(storage, join(run, "manifest.json")) or {"stages": {}})["stages"]
                .get("3", {})
                .get("status")
                == "running"
                and (read_json(storage, snapshot) or {}).get("checkpoint_results")
            ),
            "a stage-3 checkpoint",
            first,
            timeout_s=1800,  # stages 1 and 2 come first
        )
        os.kill(first.pid, signal.SIGKILL)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=60)
    driver.run("train-2", *train_args)
    manifest = read_json(storage, join(run, "manifest.json"))
    stages = manifest["stages"]
    assert all(stages[s]["status"] == "finished" for s in ("1", "2", "3", "4")), stages
    assert stages["3"]["attempts"] == 2 and stages["3"]["metrics"]["restarts"] >= 1
    assert all(stages[s]["checkpoint"].startswith(BUCKET + "/") for s in stages)

    # the two workers of every stage ran on two different nodes
    node_ids = {n["node_id"] for n in info["nodes"]}
    for stage in (1, 2, 3, 4):
        placed = [
            read_json(storage, uri)
            for uri in storage.list(join(run, "workers", f"stage{stage}") + "/")
        ]
        assert {p["world_size"] for p in placed} == {2}, placed
        assert {p["node_id"] for p in placed} == node_ids, (stage, placed)

    # the reported validation loss is the whole val split's, whichever rank reported it
    cfg = load_config(str(config))
    terms = driver_val_loss(cfg, stages["4"]["checkpoint"], 4, storage)
    expected = sum(t for t, _ in terms) / sum(w for _, w in terms)
    reported = stages["4"]["metrics"]["best_val_loss"]
    assert abs(expected - reported) < 1e-3 * expected, (reported, expected, len(terms))

    # evaluation of the last checkpoint, on the cluster
    driver.run(
        "eval",
        *("eval", "run", "--config", str(config), "--checkpoint", stages["4"]["checkpoint"]),
        *("--out", join(BUCKET, "eval", RUN_ID), "--split", "val"),
    )
    metrics = read_json(storage, join(BUCKET, "eval", RUN_ID, "metrics.json"))
    assert metrics["metrics"]["grounding"]["model"]["count"] > 0

    # nothing but caches was written outside S3, on any node or by the driver
    for node in info["nodes"]:
        assert files_outside_caches(Path(node["home"])) == [], node["home"]
    assert files_outside_caches(driver.home) == []
    assert list(driver.cwd.iterdir()) == []

    # no file that the run wrote holds the configured secret
    for uri in storage.list(BUCKET + "/"):
        assert secret not in storage.read_bytes(uri), uri
    for root in [Path(n["home"]) for n in info["nodes"]] + [driver.home, driver.logs]:
        for path in root.rglob("*"):
            if path.is_file():
                assert secret not in path.read_bytes(), path

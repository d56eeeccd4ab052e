"""`ray job submit` against a real Ray head, as a user runs it: `damo cluster up` starts the
head from this environment with the embedded S3 server's endpoint and credentials, and
`jobs/pipeline.py` runs backbones -> world -> extract -> 4 stages -> evaluate as a job.

- the job succeeds, its artefacts are in S3 and `ray job logs` shows each step;
- a second submit with the same run id does no work;
- `ray job stop` during training leaves a run that the next submit resumes;
- `damo cluster down` (`ray stop`) leaves no Ray process.

`ray stop` stops every Ray process on the machine, the session's own cluster included, so
conftest runs this module last.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import REPO_ROOT

from damo.storage.s3server import free_ports

pytestmark = [pytest.mark.slow, pytest.mark.stops_ray, pytest.mark.jobs]

BIN = Path(sys.executable).parent
BUCKET = f"s3://damo-jobs-{int(time.time())}"
BACKBONES = ("vision", "audio", "text_encoder", "llm")


def run(command: list[str], env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def head(s3_server):
    """A Ray head started by `damo cluster up` on free loopback ports, in its own temp dir;
    `damo cluster down` at the end."""
    import ray

    if ray.is_initialized():  # the session's cluster: `ray stop` below would end it anyway
        ray.shutdown()
    ray_tmp = tempfile.mkdtemp(prefix="rj-", dir="/tmp")  # unix sockets need a short path
    dashboard = free_ports(1)[0]
    env = {
        **os.environ,
        "RAY_TMPDIR": ray_tmp,
        "RAY_ADDRESS": f"http://127.0.0.1:{dashboard}",
        "COLUMNS": "200",
        "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    }
    # the job's config: the tiny preset pointed at the bucket, as --set overrides on its
    # command line (a config file would have to be in the uploaded working dir)
    overrides = [
        *(f"model.{name}.path={BUCKET}/backbones/{name}" for name in BACKBONES),
        "ray.num_cpus=2",
        f"train.runs_root={BUCKET}/runs",
        f"train.data.features={BUCKET}/features",
        f"train.data.records={BUCKET}/world/records",
        "train.scaling.cpus_per_worker=0.5",
        *(f"train.stages.stage{k}.max_steps=2" for k in (1, 2, 3, 4)),
        "pipeline.tiny_backbones=true",
        "pipeline.lm_steps=20",
        f"pipeline.synthetic_world={BUCKET}/world",
        "pipeline.clips=12",
    ]
    config_args = ["--config", "tiny", *(f"--set={o}" for o in overrides)]
    # Ray's default agent port held, as another Ray cluster on the machine holds it: a head
    # on that port has no job agent, and refuses every job ("No available agent to submit
    # job"), which is how this test once failed beside a benchmark's Ray cluster
    agent_port_holder = socket.socket()
    with contextlib.suppress(OSError):  # already held by someone: the same situation
        agent_port_holder.bind(("0.0.0.0", 52365))
        agent_port_holder.listen()
    up = run(
        [
            str(BIN / "damo"),
            "cluster",
            "up",
            f"--port={free_ports(1)[0]}",
            f"--dashboard-port={dashboard}",
            f"--storage-dir={s3_server.data_dir}",
            "--set=ray.num_cpus=2",
        ],
        env,
        timeout=240,
    )
    assert up.returncode == 0, up.stdout + up.stderr
    assert "embedded S3 server" in up.stdout  # its endpoint and credentials reach the jobs
    try:
        yield env, config_args
    finally:
        agent_port_holder.close()
        down = run([str(BIN / "damo"), "cluster", "down"], env, timeout=240)
        assert down.returncode == 0, down.stdout + down.stderr
        leftover = subprocess.run(["pgrep", "-f", f"{ray_tmp}"], capture_output=True, text=True)
        assert leftover.stdout == "", f"Ray processes left: {leftover.stdout}"


def submit(env: dict, *args: str) -> str:
    """`ray job submit --no-wait`; the submission id."""
    out = run(
        [str(BIN / "ray"), "job", "submit", "--no-wait", "--working-dir", ".", "--"]
        + ["python", "jobs/pipeline.py", *args],
        env,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    found = re.search(r"raysubmit_\w+", out.stdout + out.stderr)
    assert found, out.stdout + out.stderr
    return found.group(0)


def status(env: dict, job: str) -> str:
    """The job's state from the job API (the CLI words it differently once the job ended)."""
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(env["RAY_ADDRESS"]).get_job_status(job).value


def logs(env: dict, job: str) -> str:
    return run([str(BIN / "ray"), "job", "logs", job], env, timeout=60).stdout


def wait(env: dict, job: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = status(env, job)
        if state in ("SUCCEEDED", "FAILED", "STOPPED"):
            return state
        time.sleep(3)
    raise AssertionError(f"job {job} still {status(env, job)} after {timeout}s:\n{logs(env, job)}")


@pytest.mark.timeout(1800)
def test_a_pipeline_job_runs_skips_when_done_and_resumes_after_a_stop(head, s3_server):
    from damo.storage import Storage

    env, config = head
    job = submit(env, *config, "--run-id", "job1")
    assert wait(env, job, 1200) == "SUCCEEDED", logs(env, job)[-4000:]
    text = logs(env, job)
    for step in ("backbones", "world", "extract", "train", "evaluate"):
        assert re.search(rf"\[\d/5\] {step}: running", text), text[-3000:]
    assert "stage 4 (" in text  # training's own progress lines come through

    store = Storage(s3_server.s3_config())
    state = json.loads(store.read_bytes(f"{BUCKET}/runs/job1/pipeline.json"))
    assert all(entry["status"] == "finished" for entry in state["steps"].values())
    for artefact in (
        f"{BUCKET}/backbones/llm/config.json",
        f"{BUCKET}/world/world.json",
        f"{BUCKET}/features/summary.json",
        f"{BUCKET}/runs/job1/manifest.json",
        f"{BUCKET}/runs/job1/eval/test/metrics.json",
    ):
        assert store.exists(artefact), artefact

    again = submit(env, *config, "--run-id", "job1")
    assert wait(env, again, 600) == "SUCCEEDED", logs(env, again)[-4000:]
    text = logs(env, again)
    skipped = re.findall(r"\[\d/5\] \w+: done before", text)
    assert len(skipped) == 5 and ": running" not in text, text[-3000:]

    # a stop while stage 2 trains (long enough here to be caught at it); the next submit
    # resumes the run there
    config = [*config, "--set=train.stages.stage2.max_steps=40"]
    stopped = submit(env, *config, "--run-id", "job2")
    deadline = time.monotonic() + 900
    manifest = f"{BUCKET}/runs/job2/manifest.json"
    while True:
        assert time.monotonic() < deadline, logs(env, stopped)[-3000:]
        assert status(env, stopped) in ("PENDING", "RUNNING"), logs(env, stopped)[-3000:]
        if store.exists(manifest):
            stages = json.loads(store.read_bytes(manifest))["stages"]
            if stages.get("2", {}).get("status") == "running":
                break
        time.sleep(2)
    out = run([str(BIN / "ray"), "job", "stop", stopped], env, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert wait(env, stopped, 120) == "STOPPED"
    stages = json.loads(store.read_bytes(manifest))["stages"]
    first_stage_started = stages["1"]["started"]
    assert stages["1"]["status"] == "finished" and stages["2"]["status"] != "finished"

    resumed = submit(env, *config, "--run-id", "job2")
    assert wait(env, resumed, 1200) == "SUCCEEDED", logs(env, resumed)[-4000:]
    stages = json.loads(store.read_bytes(manifest))["stages"]
    assert stages["1"]["started"] == first_stage_started and stages["1"]["attempts"] == 1
    assert stages["2"]["attempts"] == 2 and stages["4"]["status"] == "finished"
    assert "stage 1 (" in logs(env, resumed) and "already finished" in logs(env, resumed)

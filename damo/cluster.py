"""`damo cluster up/down`: a Ray head on this machine that `ray job submit` can use as written.

A job's driver runs whatever `python` the head's environment finds, with the head's
environment variables. So the head is started from this environment (its `bin/` first on
PATH, so `python jobs/x.py` imports this package and its dependencies) with the embedded S3
server's endpoint and credentials exported when that server runs, and token auth off: the
head listens on 127.0.0.1 only, and RAY_NOTES explains why a token there breaks
`ray job submit`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from damo.config import DamoConfig
from damo.storage.s3server import EmbeddedS3Server, free_ports


class ClusterError(RuntimeError):
    """The head could not be started or stopped (Ray's own message included)."""


@dataclass(frozen=True)
class HeadPorts:
    gcs: int = 6379
    dashboard: int = 8265
    client: int = 10001
    # The dashboard agent, which runs every submitted job. Ray's fixed default (52365) is taken
    # whenever another Ray cluster runs on the machine (a notebook's `ray.init()`, a benchmark):
    # the new head then starts without an agent and refuses every job ("No available agent to
    # submit job"). 0: a free port, picked at start.
    agent: int = 0

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard}"


def ray_binary() -> str:
    beside_python = Path(sys.executable).parent / "ray"
    found = str(beside_python) if beside_python.exists() else shutil.which("ray")
    if not found:
        raise ClusterError("the 'ray' command was not found: pip install 'ray[default]'")
    return found


def head_environment(cfg: DamoConfig, storage_dir: Path | None = None) -> tuple[dict, str]:
    """The environment the head (and so every job's driver) gets, and where its storage
    settings came from."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_AUTH_MODE"] = "disabled"
    env.pop("RAY_ADDRESS", None)  # the head starts a cluster; it joins none
    env.setdefault("HF_HUB_OFFLINE", "1")
    server = EmbeddedS3Server(cfg.storage.embedded, data_dir=str(storage_dir or "") or None)
    state = server.running_state()
    if state is None:
        return env, "the environment (no embedded S3 server is running)"
    env.update(state.env())
    return env, f"the embedded S3 server at {state.endpoint_url}"


def start_head(
    cfg: DamoConfig,
    ports: HeadPorts = HeadPorts(),
    storage_dir: Path | None = None,
    timeout_s: float = 120.0,
) -> str:
    """`ray start --head` on loopback ports from this environment, returning once it can take
    jobs (within `timeout_s`); what the storage env is."""
    env, storage = head_environment(cfg, storage_dir)
    command = [
        ray_binary(),
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={ports.gcs}",
        f"--ray-client-server-port={ports.client}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={ports.dashboard}",
        "--disable-usage-stats",
    ]
    if cfg.ray.num_cpus is not None:
        command.append(f"--num-cpus={cfg.ray.num_cpus}")
    if cfg.ray.object_store_memory_mb:
        command.append(f"--object-store-memory={cfg.ray.object_store_memory_mb * 1024 * 1024}")
    agent_port = ports.agent or free_ports(1, host="0.0.0.0")[0]  # it binds the node's IP too
    command.append(f"--dashboard-agent-listen-port={agent_port}")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    if done.returncode != 0:
        raise ClusterError(f"ray start failed:\n{(done.stdout + done.stderr)[-3000:]}")
    if not wait_for_job_agent(ports, timeout_s):
        raise ClusterError(
            f"the Ray head is up, but its job agent did not register within {timeout_s:.0f} s, "
            "so it cannot take jobs yet; see dashboard_agent.log in the head's session logs "
            "(<RAY_TMPDIR or /tmp/ray>/session_latest/logs); `damo cluster down` stops it"
        )
    return storage


def wait_for_job_agent(ports: HeadPorts, timeout_s: float) -> bool:
    """Wait until the head can take a job: `ray start` returns before its dashboard agent has
    registered, and a job submitted before then is refused. The dashboard's job module looks
    the agent up in the GCS (the head node's id, then the agent's address); so does this."""
    from ray._private import ray_constants
    from ray._raylet import GcsClient
    from ray.dashboard.consts import DASHBOARD_AGENT_ADDR_NODE_ID_PREFIX

    gcs = None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):  # the GCS may still be starting
            gcs = gcs or GcsClient(address=f"127.0.0.1:{ports.gcs}")
            head = gcs.internal_kv_get(
                ray_constants.KV_HEAD_NODE_ID_KEY,
                namespace=ray_constants.KV_NAMESPACE_JOB,
                timeout=5,
            )
            agent = head and gcs.internal_kv_get(
                f"{DASHBOARD_AGENT_ADDR_NODE_ID_PREFIX}{head.decode()}".encode(),
                namespace=ray_constants.KV_NAMESPACE_DASHBOARD,
                timeout=5,
            )
            if agent:
                return True
        time.sleep(0.5)
    return False


def stop_head() -> None:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    done = subprocess.run(
        [ray_binary(), "stop"], env=env, capture_output=True, text=True, timeout=180
    )
    if done.returncode != 0:
        raise ClusterError(f"ray stop failed:\n{(done.stdout + done.stderr)[-3000:]}")


def head_is_up(ports: HeadPorts = HeadPorts()) -> bool:
    try:
        with urllib.request.urlopen(f"{ports.dashboard_url}/api/version", timeout=3) as reply:
            return reply.status == 200
    except OSError:
        return False

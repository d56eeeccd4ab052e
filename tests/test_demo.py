"""The demo's whole path, at smoke size: server, backbones, world, extraction, four training
stages, a sweep, evaluation of its best, deployment, questions to the service, report; and
nothing left running afterwards."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


# six Ray Train runs at about a minute of start-up each: over the suite's 600 s default on a
# loaded 2-core machine
@pytest.mark.timeout(1500)
def test_smoke_demo_runs_the_whole_pipeline(tmp_path):
    damo = str(Path(sys.executable).parent / "damo")
    keep = tmp_path / "demo"
    env = {**os.environ, "COLUMNS": "200", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    out = subprocess.run(
        [damo, "demo", "--size", "smoke", "--keep", str(keep)],
        capture_output=True,
        text=True,
        timeout=1200,
        env=env,
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "demo finished" in out.stdout
    for line in ("### grounding", "| baseline_whole_clip |", "### qa", "### retrieval"):
        assert line in out.stdout
    for step in ("backbones", "world", "extract", "train", "tune", "evaluate", "deploy"):
        assert f"] {step}: running" in out.stdout, step  # one progress line per step
    assert "the deployed service, asked about held-out clips" in out.stdout
    assert "web page: http://127.0.0.1:" in out.stdout
    assert "sweep demo-" in out.stdout  # the sweep's summary line
    # Ray's and the libraries' own chatter went to the log file, not to the console
    noises = ("(raylet)", "Started a local Ray instance", "Writing model shards", "Started Serve")
    for noise in noises:
        assert noise not in out.stdout + out.stderr, noise
    reports = list((keep / "report").glob("demo-*"))
    assert len(reports) == 1
    report = reports[0]
    assert (report / "report.md").stat().st_size > 500
    assert (report / "loss_curves.png").stat().st_size > 10_000
    assert list((report / "plots").glob("timeline_*.png"))
    assert not (keep / "storage" / "server.json").exists()  # the server stopped
    leftover = subprocess.run(["pgrep", "-f", f"weed mini -dir={keep}"], capture_output=True)
    assert leftover.stdout == b""
    # the demo's own Ray cluster (its session dir was printed) is gone too
    logs = re.search(r"Ray joined; its logs: (\S+)/logs", out.stdout)
    assert logs, out.stdout[-3000:]
    ray_left = subprocess.run(["pgrep", "-f", logs.group(1)], capture_output=True)
    assert ray_left.stdout == b"", ray_left.stdout

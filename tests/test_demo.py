"""`make demo` (today: the object-storage round trip) runs and earns its success line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_demo_round_trips_through_a_real_server(fixtures_dir):
    damo = str(Path(sys.executable).parent / "damo")
    out = subprocess.run(
        [damo, "demo"],
        capture_output=True,
        text=True,
        timeout=180,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "bigbuckbunny.mp4" in out.stdout
    for check in ("round trip (sha256)", "range read", "list", "delete", "server stopped"):
        line = next(line for line in out.stdout.splitlines() if check in line)
        assert "ok" in line and "FAILED" not in line
    assert "demo passed" in out.stdout

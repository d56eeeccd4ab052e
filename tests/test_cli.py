"""The `damo` command: help everywhere, version, config show, and the storage server CLI."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
import typer.main
import yaml
from botocore.config import Config
from botocore.exceptions import ClientError
from typer.testing import CliRunner

import damo
from damo.cli import app
from damo.config import load_config
from damo.storage.s3server import pid_alive, port_in_use

runner = CliRunner()
DAMO = str(Path(sys.executable).parent / "damo")


def all_command_paths(group, prefix=()) -> list[tuple[str, ...]]:
    paths = [prefix]
    for name, command in group.commands.items():
        if hasattr(command, "commands"):  # a group (typer ships its own click fork)
            paths += all_command_paths(command, prefix + (name,))
        else:
            paths.append(prefix + (name,))
    return paths


def test_every_command_has_help():
    paths = all_command_paths(typer.main.get_command(app))
    assert ("storage", "up") in paths and ("config", "show") in paths
    for path in paths:
        result = runner.invoke(app, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output)
        assert "Usage" in result.output


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"damo {damo.__version__}"


def test_console_script_help():
    out = subprocess.run([DAMO, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "storage" in out.stdout


def test_config_show_prints_the_resolved_config():
    result = runner.invoke(app, ["config", "show", "default", "--set", "seed=5"])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(result.output) == load_config("default", ["seed=5"]).model_dump(
        mode="json"
    )


def test_config_errors_exit_2_with_the_field():
    result = runner.invoke(app, ["config", "show", "--set", "storage.s3.regoin=x"])
    assert result.exit_code == 2
    assert "storage.s3.regoin: unknown field" in result.output
    assert "Traceback" not in result.output


def test_storage_up_status_down(tmp_path):
    """The acceptance path: up prints an endpoint, its credentials work, down leaves nothing."""
    data_dir = tmp_path / "storage"
    env = {**os.environ, "COLUMNS": "200"}
    args = ["--data-dir", str(data_dir)]
    up = subprocess.run(
        [DAMO, "storage", "up", *args], capture_output=True, text=True, env=env, timeout=120
    )
    try:
        assert up.returncode == 0, up.stderr
        endpoint = re.search(r"endpoint:\s+(http://127\.0\.0\.1:\d+)", up.stdout).group(1)
        env_file = data_dir / "credentials.env"
        assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
        creds = dict(
            line.removeprefix("export ").split("=", 1) for line in env_file.read_text().splitlines()
        )
        assert creds["AWS_ENDPOINT_URL"] == endpoint

        def client(secret):
            return boto3.client(
                "s3",
                endpoint_url=endpoint,
                region_name="us-east-1",
                aws_access_key_id=creds["AWS_ACCESS_KEY_ID"],
                aws_secret_access_key=secret,
                config=Config(s3={"addressing_style": "path"}),
            )

        good = client(creds["AWS_SECRET_ACCESS_KEY"])
        good.create_bucket(Bucket="cli-test")
        good.put_object(Bucket="cli-test", Key="k", Body=b"payload")
        assert good.get_object(Bucket="cli-test", Key="k")["Body"].read() == b"payload"
        with pytest.raises(ClientError, match="SignatureDoesNotMatch"):
            client("not-the-secret").get_object(Bucket="cli-test", Key="k")

        again = subprocess.run(
            [DAMO, "storage", "up", *args], capture_output=True, text=True, env=env, timeout=60
        )
        assert again.returncode == 0 and "already running" in again.stdout
        status = subprocess.run(
            [DAMO, "storage", "status", *args], capture_output=True, text=True, env=env, timeout=60
        )
        assert status.returncode == 0 and endpoint in status.stdout
        state = yaml.safe_load((data_dir / "server.json").read_text())
    finally:
        down = subprocess.run(
            [DAMO, "storage", "down", *args], capture_output=True, text=True, env=env, timeout=120
        )
    assert down.returncode == 0, down.stderr
    assert "stopped" in down.stdout
    assert not pid_alive(state["pid"])
    assert not any(port_in_use(port) for port in state["ports"].values())
    leftover = subprocess.run(["pgrep", "-f", f"weed mini -dir={data_dir}"], capture_output=True)
    assert leftover.stdout == b""
    status = subprocess.run(
        [DAMO, "storage", "status", *args], capture_output=True, text=True, env=env, timeout=60
    )
    assert status.returncode == 1 and "not running" in status.stdout


@pytest.mark.parametrize("job", ["extract", "train", "tune"])
def test_job_scripts_are_the_cli(job):
    from conftest import REPO_ROOT

    out = subprocess.run(
        [sys.executable, f"jobs/{job}.py", "--help"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert out.returncode == 0, out.stderr
    assert f"Usage: jobs/{job}.py" in out.stdout


def test_extract_progress_prints_sparse_lines_off_a_terminal():
    """In `ray job logs` or a log file: a first line, then one per interval, and the last."""
    import io

    from rich.console import Console

    from damo.cli.data import ExtractionProgressView

    out = io.StringIO()
    with ExtractionProgressView(Console(file=out, force_terminal=False), every_s=3600) as view:
        view.update({"encoded": 4}, 10)
        view.update({"encoded": 8, "written": 4}, 10)  # within the interval: not printed
        view.update({"encoded": 10, "written": 10, "errors": 2}, 10)
        view.update({"encoded": 10, "written": 10, "errors": 2}, 10)  # the final report again
    assert out.getvalue().splitlines() == [
        "extracting: 4/10 encoded, 0 written, 0 failed",
        "extracting: 10/10 encoded, 10 written, 2 failed",
    ]


def test_extract_progress_draws_a_bar_on_a_terminal():
    import io

    from rich.console import Console

    from damo.cli.data import ExtractionProgressView

    out = io.StringIO()
    with ExtractionProgressView(Console(file=out, force_terminal=True, width=120)) as view:
        view.update({"encoded": 6, "written": 3, "errors": 1}, 10)
        task = view.bar.tasks[0]
        assert (task.completed, task.total) == (6, 10)
        assert task.fields["detail"] == "3 written, 1 failed"
    assert "extracting" in out.getvalue()

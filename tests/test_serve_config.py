"""The serve: config section, `damo serve` without a cluster, and platform/serve/config.yaml."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml
from conftest import REPO_ROOT
from typer.testing import CliRunner

from damo.cli import app
from damo.config import ConfigError, load_config

PLATFORM_CONFIG = REPO_ROOT / "platform" / "serve" / "config.yaml"


def test_deployment_options_come_from_config():
    cfg = load_config(
        "tiny",
        [
            "serve.model.autoscaling.max_replicas=4",
            "serve.model.max_queued_requests=7",
            "serve.model.num_cpus=0.25",
        ],
    )
    model = cfg.serve.model
    options = model.deployment_options(cluster_gpus=0)
    assert options["autoscaling_config"]["max_replicas"] == 4
    assert options["autoscaling_config"]["min_replicas"] == 1  # other defaults survive --set
    assert options["max_queued_requests"] == 7 and options["max_ongoing_requests"] == 16
    assert options["ray_actor_options"] == {"num_cpus": 0.25, "num_gpus": 0.0}
    assert model.deployment_options(cluster_gpus=8)["ray_actor_options"]["num_gpus"] == 1.0
    featurizer = cfg.serve.featurizer.deployment_options()
    assert featurizer["num_replicas"] == 1 and "autoscaling_config" not in featurizer


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("serve.model.autoscaling.max_replicas=0", "serve.model.autoscaling.max_replicas"),
        ("serve.limits.max_upload_mb=0", "serve.limits.max_upload_mb"),
        ("serve.model.num_gpus=some", "serve.model.num_gpus"),
        ("serve.tokenn=x", "serve.tokenn"),
    ],
)
def test_bad_serve_config_names_the_field(override, field):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", [override])
    assert field in str(err.value)


def test_min_above_max_replicas_is_refused():
    with pytest.raises(ConfigError, match="max_replicas"):
        load_config("tiny", ["serve.model.autoscaling.min_replicas=3"])


def test_serve_command_help_and_best_without_registry(tmp_path):
    runner = CliRunner()
    shown = runner.invoke(app, ["serve", "--help"])
    assert shown.exit_code == 0 and "--checkpoint" in shown.output
    registry = f"tune.registry={tmp_path / 'registry'}"
    refused = runner.invoke(
        app, ["serve", "--checkpoint", "best", "--config", "tiny", "--set", registry]
    )
    assert refused.exit_code == 2
    assert "no registry entry for any sweep" in refused.output


def test_platform_has_no_python_package():
    platform_dir = REPO_ROOT / "platform"
    assert not list(platform_dir.rglob("__init__.py"))
    assert not list(platform_dir.rglob("platform.py"))


@pytest.mark.slow
def test_platform_serve_config_is_what_serve_build_makes(tmp_path):
    """Rebuild platform/serve/config.yaml with `serve build`; it must match the committed one."""
    out = tmp_path / "config.yaml"
    env = {
        **os.environ,
        "DAMO_SERVE_SET": "serve.model.num_gpus=1",
        "PYTHONPATH": str(REPO_ROOT),
    }
    env.pop("DAMO_SERVE_CONFIG", None)
    env.pop("DAMO_SERVE_CHECKPOINT", None)
    serve_cli = [sys.executable, "-m", "ray.serve.scripts"]
    subprocess.run(
        [*serve_cli, "build", "damo.serve.deploy:app", "-o", str(out)],
        check=True,
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        timeout=300,
    )
    built = yaml.safe_load(out.read_text())
    built["applications"][0]["name"] = "damo"
    committed = yaml.safe_load(PLATFORM_CONFIG.read_text())
    assert committed == built, "platform/serve/config.yaml drifted: rebuild it (see its header)"

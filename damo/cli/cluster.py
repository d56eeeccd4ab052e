"""`damo cluster`: a Ray head on this machine for `ray job submit`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from damo.cli.common import ConfigName, Overrides, console, err_console, friendly_errors
from damo.config import load_config

cluster_app = typer.Typer(
    help="A local Ray head that `ray job submit` can use as written.", no_args_is_help=True
)

DashboardPort = Annotated[int, typer.Option(min=1, max=65535, help="The dashboard's port.")]


@cluster_app.command("up")
@friendly_errors
def cluster_up(
    config: ConfigName = None,
    overrides: Overrides = None,
    port: Annotated[int, typer.Option(min=1, max=65535, help="The GCS port.")] = 6379,
    dashboard_port: DashboardPort = 8265,
    agent_port: Annotated[
        int,
        typer.Option(
            min=0,
            max=65535,
            help="The dashboard agent's port, which runs the jobs (0: a free one; Ray's own "
            "default, 52365, is taken when another Ray cluster runs here).",
        ),
    ] = 0,
    storage_dir: Annotated[
        Path | None,
        typer.Option(help="The embedded S3 server's data dir (default storage.embedded)."),
    ] = None,
) -> None:
    """Start a Ray head on 127.0.0.1 from this environment, so that a job's `python` imports
    this package, with the embedded S3 server's endpoint and credentials when it runs."""
    from damo.cluster import HeadPorts, head_is_up, start_head

    ports = HeadPorts(gcs=port, dashboard=dashboard_port, agent=agent_port)
    if head_is_up(ports):
        console.print(f"a Ray head already answers at {ports.dashboard_url}")
        raise typer.Exit(code=0)
    storage = start_head(load_config(config, overrides or []), ports, storage_dir)
    console.print(
        f"Ray head started, ready for jobs; dashboard and job API at {ports.dashboard_url}"
    )
    console.print(f"storage settings for jobs: {escape(storage)}", highlight=False)
    console.print(f"submit jobs with:\n  export RAY_ADDRESS={ports.dashboard_url}")
    console.print("  ray job submit --working-dir . -- python jobs/pipeline.py --help")
    console.print("stop it with: damo cluster down")


@cluster_app.command("down")
@friendly_errors
def cluster_down() -> None:
    """Stop every Ray process on this machine (`ray stop`)."""
    from damo.cluster import stop_head

    stop_head()
    console.print("Ray stopped")


@cluster_app.command("status")
def cluster_status(dashboard_port: DashboardPort = 8265) -> None:
    """Say whether a Ray head answers on 127.0.0.1."""
    from damo.cluster import HeadPorts, head_is_up

    ports = HeadPorts(dashboard=dashboard_port)
    if not head_is_up(ports):
        err_console.print(f"no Ray head answers at {ports.dashboard_url}")
        raise typer.Exit(code=1)
    console.print(f"a Ray head answers at {ports.dashboard_url}")

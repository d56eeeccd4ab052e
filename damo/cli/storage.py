"""`damo storage`: the embedded S3 server."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from damo.cli.common import (
    ConfigName,
    Overrides,
    console,
    friendly_errors,
)
from damo.config import load_config
from damo.storage.s3server import EmbeddedS3Server

storage_app = typer.Typer(help="The embedded S3 server (SeaweedFS).", no_args_is_help=True)


def _embedded_server(config: str | None, overrides: list[str] | None, data_dir: Path | None):
    cfg = load_config(config, overrides or [])
    return EmbeddedS3Server(cfg.storage.embedded, data_dir=str(data_dir) if data_dir else None)


DataDir = Annotated[
    Path | None, typer.Option(help="Where the server keeps its data (default .damo/storage).")
]


@storage_app.command("up")
@friendly_errors
def storage_up(config: ConfigName = None, overrides: Overrides = None, data_dir: DataDir = None):
    """Start the embedded S3 server on 127.0.0.1 in the background and print its endpoint."""
    server = _embedded_server(config, overrides, data_dir)
    already = server.running_state()
    state = server.start(detach=True)
    verb = "already running" if already else "started"
    console.print(f"embedded S3 server {verb} (pid {state.pid})")
    console.print(f"endpoint:    {state.endpoint_url}")
    console.print(f"credentials: {server.env_path}  (source it: `. {server.env_path}`)")


@storage_app.command("down")
@friendly_errors
def storage_down(config: ConfigName = None, overrides: Overrides = None, data_dir: DataDir = None):
    """Stop the embedded S3 server and wait until its ports are free."""
    server = _embedded_server(config, overrides, data_dir)
    if server.stop():
        console.print("embedded S3 server stopped; ports released")
    else:
        console.print("no embedded S3 server was running")


@storage_app.command("status")
@friendly_errors
def storage_status(
    config: ConfigName = None, overrides: Overrides = None, data_dir: DataDir = None
):
    """Say whether the embedded S3 server runs, and where."""
    server = _embedded_server(config, overrides, data_dir)
    state = server.running_state()
    if state is None:
        console.print("not running")
        raise typer.Exit(code=1)
    console.print(f"running (pid {state.pid}) at {state.endpoint_url}; data in {state.data_dir}")

"""`damo pipeline` and `damo demo`: the whole pipeline as one resumable run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from damo.cli.common import (
    Overrides,
    console,
    friendly_errors,
)
from damo.config import load_config


@friendly_errors
def demo_command(
    config: Annotated[str, typer.Option("--config", "-c", help="Named config or YAML.")] = "tiny",
    overrides: Overrides = None,
    size: Annotated[
        str, typer.Option(help="full (make demo) or smoke (a minutes-long CI run).")
    ] = "full",
    keep: Annotated[Path, typer.Option(help="Where the server data and report stay.")] = Path(
        ".damo/demo"
    ),
) -> None:
    """Run the whole pipeline on an embedded S3 server: backbones, world, features, four
    training stages, evaluation; print the metrics and where the report is."""
    from damo.demo import run_demo

    ok = run_demo(load_config(config, overrides or []), console, size=size, keep=keep)
    raise typer.Exit(code=0 if ok else 1)

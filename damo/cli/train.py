"""`damo train`: the four stages with Ray Train."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from damo.cli.common import (
    ConfigName,
    Overrides,
    console,
    err_console,
    friendly_errors,
    require_allowed_options,
)
from damo.config import load_config

train_app = typer.Typer(help="Train DaMO's four stages with Ray Train.")


def parse_stages(text: str) -> tuple[int, ...]:
    try:
        stages = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise typer.BadParameter(f"'{text}' is not a list like 1,2,3,4") from None
    if not stages or not set(stages) <= {1, 2, 3, 4}:
        raise typer.BadParameter(f"stages must be among 1,2,3,4, got '{text}'")
    return stages


@train_app.callback(invoke_without_command=True)
@friendly_errors
def train_command(
    ctx: typer.Context,
    config: ConfigName = None,
    overrides: Overrides = None,
    run_id: Annotated[
        str | None,
        typer.Option(help="Name of the run; re-use it to resume. Default: a new timestamped id."),
    ] = None,
    stages: Annotated[str, typer.Option(help="Stages to train, e.g. 3,4.")] = "1,2,3,4",
    init_checkpoint: Annotated[
        str | None, typer.Option(help="Start the first stage from this checkpoint URI.")
    ] = None,
) -> None:
    """Train the stages in order, each from the previous stage's best checkpoint.

    A run's manifest lives in object storage; re-running the same --run-id skips finished
    stages and resumes an interrupted one from its latest checkpoint.
    """
    if ctx.invoked_subcommand is not None:
        return
    import time

    from damo.data.extract import connect_ray
    from damo.train.pipeline import TrainError, train_pipeline

    cfg = load_config(config, overrides or [])
    require_allowed_options(cfg, init_checkpoint=init_checkpoint)
    run_id = run_id or time.strftime("run-%Y%m%d-%H%M%S")
    console.print(f"run id: [bold]{run_id}[/] (re-run with --run-id {run_id} to resume)")
    connect_ray(cfg)
    try:
        manifest = train_pipeline(
            cfg, run_id, parse_stages(stages), init_checkpoint, log=console.print
        )
    except TrainError as err:
        err_console.print(f"[bold red]error:[/] {escape(str(err))}", soft_wrap=True)
        print_log_hint(err.logs, run_id)
        raise typer.Exit(code=1) from None
    except KeyboardInterrupt:
        err_console.print(
            f"[bold red]interrupted:[/] the running stage is recorded as failed; "
            f"re-run with --run-id {escape(run_id)} to resume it",
            soft_wrap=True,
        )
        raise typer.Exit(code=130) from None
    _print_manifest(manifest)


def print_log_hint(logs: dict, run_id: str) -> None:
    if not logs:
        return
    where = f"logs: run {logs['run']} (manifest, metrics, Ray Train's {logs['ray_run']})"
    if logs.get("ray_logs"):
        where += f"; worker logs on the driver's node under {logs['ray_logs']}"
    err_console.print(escape(where), soft_wrap=True, highlight=False)
    err_console.print(
        f"fix the cause and re-run with --run-id {escape(run_id)} to resume", highlight=False
    )


def _print_manifest(manifest: dict) -> None:
    table = Table(title=f"run {manifest['run_id']} (config {manifest['config_hash']})")
    for column in ("stage", "name", "status", "wall s", "steps", "val loss", "checkpoint"):
        table.add_column(column)
    for stage in sorted(manifest["stages"], key=int):
        entry = manifest["stages"][stage]
        metrics = entry.get("metrics", {})
        val = ""
        if metrics.get("first_val_loss") is not None:
            val = f"{metrics['first_val_loss']:.3f} -> {metrics['best_val_loss']:.3f}"
        table.add_row(
            stage,
            entry["name"],
            entry["status"],
            str(entry.get("wall_s", "")),
            str(metrics.get("steps", "")),
            val,
            entry.get("checkpoint", ""),
        )
    console.print(table)
    for stage in sorted(manifest["stages"], key=int):
        entry = manifest["stages"][stage]
        if entry["status"] == "failed" and entry.get("error"):
            console.print(f"stage {stage} failed: {escape(entry['error'])}", highlight=False)
    if manifest.get("loss_curves"):
        console.print(f"loss curves: {manifest['loss_curves']}")


@train_app.command("status")
@friendly_errors
def train_status(
    run_id: Annotated[str, typer.Argument(help="The run id.")],
    config: ConfigName = None,
    overrides: Overrides = None,
) -> None:
    """Print a run's manifest as a table."""
    from damo.storage import Storage
    from damo.train.pipeline import read_manifest, run_uri

    cfg = load_config(config, overrides or [])
    run = run_uri(cfg, run_id)
    manifest = read_manifest(Storage(cfg.storage.s3), run)
    if manifest is None:
        err_console.print(f"[bold red]error:[/] no run '{escape(run_id)}' under {escape(run)}")
        raise typer.Exit(code=1)
    _print_manifest(manifest)

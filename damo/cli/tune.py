"""`damo tune`: sweeps with Ray Tune and the `best` registry."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from damo.cli.common import (
    ConfigName,
    Overrides,
    console,
    err_console,
    friendly_errors,
)
from damo.config import load_config

tune_app = typer.Typer(help="Sweep config fields with Ray Tune; register the best checkpoint.")


@tune_app.callback(invoke_without_command=True)
@friendly_errors
def tune_command(
    ctx: typer.Context,
    space: Annotated[
        Path | None, typer.Option(help="Search space YAML, e.g. tune_spaces/fuseformer.yaml.")
    ] = None,
    name: Annotated[
        str | None, typer.Option(help="Sweep name; re-run the same name to resume it.")
    ] = None,
    config: ConfigName = None,
    overrides: Overrides = None,
) -> None:
    """Run a sweep: each trial trains the stages its parameters change and reports the
    validation grounding mIoU per epoch; ASHA stops weak trials early.

    Results (results.csv/.md, heatmap.png, curves.png, best.json) go to
    <tune.sweeps_root>/NAME/, and the best trial is registered as `best`.
    """
    if ctx.invoked_subcommand is not None:
        return
    if space is None or name is None:
        err_console.print("[bold red]error:[/] --space and --name are required (see --help)")
        raise typer.Exit(code=2)
    from damo.data.extract import connect_ray
    from damo.tune.progress import TrialTable
    from damo.tune.space import load_space
    from damo.tune.sweep import last_stage_epochs, run_sweep, sweep_uri
    from damo.tune.trial import trial_stages

    cfg = load_config(config, overrides or [])
    loaded = load_space(space, cfg)
    paths = [p.path for p in loaded.parameters]
    stages = trial_stages(paths, cfg)
    uri = sweep_uri(cfg, name)
    console.print(
        f"sweep [bold]{escape(name)}[/] at {escape(uri)}: stages {','.join(map(str, stages))} "
        f"per trial, {cfg.tune.metric} ({cfg.tune.mode}), {cfg.tune.scheduler}, "
        f"{'grid' if loaded.grid else cfg.tune.searcher} search",
        highlight=False,
    )
    connect_ray(cfg, log_to_driver=False)
    from damo.train.pipeline import ray_log_dir

    console.print(f"worker logs: {ray_log_dir()}", highlight=False)
    table = TrialTable(paths, cfg.tune.metric, last_stage_epochs(cfg), console)
    try:
        result = run_sweep(cfg, loaded, name, callbacks=[table])
    except KeyboardInterrupt:
        err_console.print(
            f"[bold red]interrupted:[/] re-run with --name {escape(name)} to resume the sweep",
            soft_wrap=True,
        )
        raise typer.Exit(code=130) from None
    if result.resumed:
        console.print("(resumed: finished trials were kept)")
    for label, uri in result.files.items():
        console.print(f"{label}: {uri}", highlight=False)
    if result.best is None:
        err_console.print("[bold red]error:[/] no trial reported a metric with a checkpoint")
        raise typer.Exit(code=1)
    best = result.best
    console.print(
        f"best: trial {best['trial_id']} {best['metric']} {best['value']:.3f} "
        f"{best['params']} -> {best['checkpoint']}",
        highlight=False,
        soft_wrap=True,
    )


@tune_app.command("best")
@friendly_errors
def tune_best(
    name: Annotated[
        str | None, typer.Argument(help="Sweep name (default: the latest finished sweep).")
    ] = None,
    config: ConfigName = None,
    overrides: Overrides = None,
) -> None:
    """Print a sweep's registry entry: its best checkpoint, metric, parameters and config."""
    import json

    from damo.train.registry import read_entry

    cfg = load_config(config, overrides or [])
    entry = read_entry(cfg, name)
    summary = {k: v for k, v in entry.items() if k != "config"}
    console.print_json(json.dumps(summary))
    console.print(
        f"use it with --checkpoint best:{entry['sweep']} (or best for the latest sweep)",
        highlight=False,
    )

"""`damo pipeline` and `damo demo`: the whole pipeline as one resumable run."""

from __future__ import annotations

import os
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
    require_allowed_options,
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
    wait: Annotated[
        bool,
        typer.Option(
            help="On a terminal, keep the service up until Enter (never when stdin is not a "
            "terminal)."
        ),
    ] = True,
) -> None:
    """Run the whole pipeline on an embedded S3 server: backbones, world, features, four
    training stages, a small sweep, evaluation of its best, deployment; ask the service about
    held-out clips; print the metrics, the answers and the web page's URL."""
    from damo.demo import run_demo

    cfg = load_config(config, overrides or [])
    ok = run_demo(cfg, console, size=size, keep=keep, wait=wait)
    raise typer.Exit(code=0 if ok else 1)


@friendly_errors
def pipeline_command(
    run_id: Annotated[
        str, typer.Option(help="Name of the run; re-use it to resume or to skip what is done.")
    ],
    config: ConfigName = None,
    overrides: Overrides = None,
    videos: Annotated[
        str | None,
        typer.Option(help="Extract every object under this prefix (pipeline.videos)."),
    ] = None,
    synthetic_world: Annotated[
        str | None,
        typer.Option(
            help="Make a synthetic world here first; train.data.records must be <it>/records "
            "(pipeline.synthetic_world)."
        ),
    ] = None,
    clips: Annotated[
        int | None, typer.Option(min=1, help="The synthetic world's clips (pipeline.clips).")
    ] = None,
    tiny_backbones: Annotated[
        bool | None,
        typer.Option(
            help="Build the tiny backbones where model.*.path point, if not there "
            "(pipeline.tiny_backbones)."
        ),
    ] = None,
    lm_steps: Annotated[
        int | None, typer.Option(min=0, help="The tiny LLM's pre-training (pipeline.lm_steps).")
    ] = None,
    stages: Annotated[
        str | None,
        typer.Option(help="Stages to train, e.g. 3,4; 'none' for none (pipeline.stages)."),
    ] = None,
    init_checkpoint: Annotated[
        str | None,
        typer.Option(help="Start the first stage from this checkpoint (pipeline.init_checkpoint)."),
    ] = None,
    space: Annotated[
        str | None,
        typer.Option(help="Search space YAML: sweep after training (pipeline.space)."),
    ] = None,
    split: Annotated[
        str | None,
        typer.Option(help="Split to evaluate; 'none' to skip (pipeline.evaluate_split)."),
    ] = None,
    deploy: Annotated[
        bool | None,
        typer.Option(
            help="Deploy the best checkpoint with Ray Serve at the end (pipeline.deploy): on a "
            "cluster it stays up after the job; locally this command serves until Ctrl-C."
        ),
    ] = None,
) -> None:
    """Run the pipeline as one resumable run: (tiny backbones) -> (synthetic world) ->
    extract -> train -> (sweep) -> evaluate -> (deploy).

    The config's `pipeline:` section says what runs (configs/*.yaml set it for their
    dataset); each option here overrides one of its fields. Each step's outcome goes to
    <train.runs_root>/RUN_ID/pipeline.json. Re-running the same --run-id skips the steps that
    finished (their output still there) and resumes the one that was interrupted: extraction
    keeps its shards, training its finished stages and checkpoints, a sweep its finished trials.
    """
    import time

    from damo.cli.train import parse_stages, print_log_hint
    from damo.config.pipeline import PipelineConfig
    from damo.pipeline import PipelineError, PipelinePlan, check_plan, run_pipeline
    from damo.train.pipeline import TrainError

    cfg = load_config(config, overrides or [])
    given = {
        "videos": videos,
        "synthetic_world": synthetic_world,
        "clips": clips,
        "tiny_backbones": tiny_backbones,
        "lm_steps": lm_steps,
        "init_checkpoint": init_checkpoint,
        "space": space,
        "deploy": deploy,
    }
    if stages is not None:
        given["stages"] = [] if stages.strip() in ("", "none") else list(parse_stages(stages))
    if split is not None:
        given["evaluate_split"] = None if split == "none" else split
    given = {k: v for k, v in given.items() if v is not None or k == "evaluate_split"}
    settings = PipelineConfig.model_validate({**cfg.pipeline.model_dump(), **given})
    cfg = cfg.model_copy(update={"pipeline": settings})
    require_allowed_options(
        cfg, videos=videos, synthetic_world=synthetic_world, init_checkpoint=init_checkpoint
    )
    plan = PipelinePlan.from_config(cfg, run_id)
    check_plan(cfg, plan)  # a plan that cannot work is bad input (exit 2), not a failed run
    console.print(f"pipeline run [bold]{escape(run_id)}[/]: {' -> '.join(plan.steps)}")
    try:
        state = run_pipeline(
            cfg, plan, log=lambda line: console.print(escape(line), highlight=False)
        )
    except PipelineError as err:
        err_console.print(f"[bold red]error:[/] {escape(str(err))}", soft_wrap=True)
        if isinstance(err.__cause__, TrainError):
            print_log_hint(err.__cause__.logs, run_id)
        else:
            err_console.print(f"fix the cause and re-run with --run-id {escape(run_id)}")
        raise typer.Exit(code=1) from None
    except KeyboardInterrupt:
        err_console.print(
            f"[bold red]interrupted:[/] re-run with --run-id {escape(run_id)} to resume",
            soft_wrap=True,
        )
        raise typer.Exit(code=130) from None
    console.print(f"pipeline run {escape(run_id)} finished", highlight=False)
    deployed = state["steps"].get("deploy", {}).get("url")
    if deployed and cfg.ray.address is None and "RAY_ADDRESS" not in os.environ:
        # a local cluster ends with this process: keep serving until the user stops it
        from ray import serve

        console.print(f"serving at {deployed} until Ctrl-C")
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            console.print("stopping")
        finally:
            serve.shutdown()

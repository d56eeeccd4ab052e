"""`damo eval`: score predictions and evaluate checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, get_args

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

eval_app = typer.Typer(help="Evaluate predictions and models.", no_args_is_help=True)


@eval_app.command("qvh")
@friendly_errors
def eval_qvh(
    gt: Annotated[Path, typer.Option(help="QVHighlights ground truth jsonl.", exists=True)],
    pred: Annotated[Path, typer.Option(help="Submission jsonl (official format).", exists=True)],
    out: Annotated[Path | None, typer.Option(help="Also write the metrics JSON here.")] = None,
    allow_partial: Annotated[
        bool, typer.Option(help="Evaluate only the qids present in both files.")
    ] = False,
) -> None:
    """QVHighlights moment retrieval + highlight detection, in the official JSON layout."""
    import json

    from damo.eval.qvhighlights import evaluate_files

    try:
        metrics = evaluate_files(pred, gt, allow_partial=allow_partial)
    except (ValueError, KeyError) as err:
        err_console.print(f"[bold red]error:[/] {escape(str(err))}", soft_wrap=True)
        raise typer.Exit(code=2) from None
    text = json.dumps(metrics, indent=4)
    typer.echo(text)
    if out is not None:
        out.write_text(text + "\n")


@eval_app.command("run")
@friendly_errors
def eval_run(
    checkpoint: Annotated[
        str,
        typer.Option(
            help="Checkpoint URI (a training checkpoint), or 'best' (the latest sweep's best "
            "trial) or 'best:SWEEP'."
        ),
    ],
    out: Annotated[str, typer.Option(help="Where the report, metrics and predictions go.")],
    split: Annotated[str, typer.Option(help="Records split to evaluate.")] = "test",
    config: ConfigName = None,
    overrides: Overrides = None,
    features: Annotated[
        str | None, typer.Option(help="Feature shards (default: train.data.features).")
    ] = None,
    records: Annotated[
        str | None, typer.Option(help="Records prefix (default: train.data.records).")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 24,
    batch_size: Annotated[int, typer.Option(min=1)] = 8,
    actors: Annotated[int, typer.Option(min=1, help="Model replicas answering in parallel.")] = 1,
    gpus_per_actor: Annotated[
        float, typer.Option(min=0, help="GPUs per answering actor (0: CPU only).")
    ] = 0.0,
    audio: Annotated[
        str,
        typer.Option(
            help="Audio ablation at inference: as_is, swap (each video hears another's), "
            "mask (no audio) or zero (zero features, mask says present)."
        ),
    ] = "as_is",
) -> None:
    """Answer every grounding/QA record of a split with greedy decoding; score and report."""
    from damo.data.extract import connect_ray
    from damo.eval.batch import AudioAblation, EvalSettings, evaluate_checkpoint
    from damo.eval.report import metrics_table
    from damo.storage import join
    from damo.train.registry import is_registry_name, resolve_checkpoint

    cfg = load_config(config, overrides or [])
    require_allowed_options(cfg, out=out, features=features, records=records)
    if is_registry_name(checkpoint):
        named, checkpoint = checkpoint, resolve_checkpoint(checkpoint, cfg)
        console.print(f"{named}: {checkpoint}", highlight=False)
    require_allowed_options(cfg, checkpoint=checkpoint)
    records_uri = join(records or cfg.train.data.records, f"{split}.parquet")
    connect_ray(cfg)
    if audio not in get_args(AudioAblation):
        err_console.print(
            f"[bold red]error:[/] --audio {escape(audio)}: expected one of "
            + ", ".join(get_args(AudioAblation))
        )
        raise typer.Exit(code=2)
    settings = EvalSettings(
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        actors=actors,
        gpus_per_actor=gpus_per_actor,
        audio=audio,
    )
    result = evaluate_checkpoint(
        cfg, checkpoint, features or cfg.train.data.features, records_uri, out, settings
    )
    console.print(metrics_table(result["metrics"]), markup=False, highlight=False)
    console.print(f"report: {join(out, 'report.md')}")

"""`damo data` and `damo extract`: datasets, media checks and feature extraction."""

from __future__ import annotations

import time
from typing import Annotated

import typer
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
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


class ExtractionProgressView:
    """`damo extract`'s progress: a bar on a terminal; elsewhere (a log file, `ray job logs`)
    one line at most every `every_s` seconds, and the last one."""

    def __init__(self, console, every_s: float = 30.0):
        self.console = console
        self.every_s = every_s
        self.bar: Progress | None = None
        self.task = None
        self.last_line = ""
        self.last_line_at = float("-inf")

    def __enter__(self) -> ExtractionProgressView:
        if self.console.is_terminal:
            self.bar = Progress(
                TextColumn("extracting"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[detail]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=self.console,
                transient=True,  # the summary table follows
            )
            self.bar.start()
            self.task = self.bar.add_task("extract", total=None, detail="planning")
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()

    def update(self, counts: dict[str, int], total: int) -> None:
        """`extract_features`' on_progress: the bar counts encoded clips; written shards (and
        the errors among them) are what a killed run keeps."""
        encoded, written = counts.get("encoded", 0), counts.get("written", 0)
        detail = f"{written} written, {counts.get('errors', 0)} failed"
        if self.bar is not None:
            self.bar.update(self.task, total=total, completed=min(encoded, total), detail=detail)
            return
        line = f"extracting: {encoded}/{total} encoded, {detail}"
        now = time.monotonic()
        due = now - self.last_line_at >= self.every_s or written >= total
        if due and line != self.last_line:
            self.last_line, self.last_line_at = line, now
            self.console.print(line, highlight=False)


@friendly_errors
def extract_command(
    out: Annotated[str, typer.Option(help="Where features/, errors/ and summary.json go.")],
    videos: Annotated[
        str | None, typer.Option(help="Extract every object under this prefix (URI or path).")
    ] = None,
    config: ConfigName = None,
    overrides: Overrides = None,
    batch_size: Annotated[
        int | None, typer.Option(min=1, help="Clips per encoder batch (data.extract.batch_size).")
    ] = None,
    actors: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Encoder actors, one model copy each (data.extract.num_actors; default: one "
            "per GPU, or one per CPU core).",
        ),
    ] = None,
    gpus_per_actor: Annotated[
        float | None,
        typer.Option(
            min=0,
            help="GPUs per encoder actor (data.extract.gpus_per_actor; default: 1 on a cluster "
            "with GPUs, else 0).",
        ),
    ] = None,
    retry_errors: Annotated[
        bool,
        typer.Option(
            "--retry-errors",
            help="Redo the inputs whose error may pass (storage trouble, timeouts, unexpected "
            "exceptions). Errors that are properties of the file (not_media, truncated, "
            "corrupt_stream, decoder_crash, ...) are final.",
        ),
    ] = False,
) -> None:
    """Decode videos and run the frozen encoders with Ray Data into Parquet feature shards.

    Shards are written as rows finish; a re-run (after a crash or a kill) keeps them and does
    only what is missing."""
    from damo.data.extract import extract_features, video_uris
    from damo.pipeline import join_ray_quietly
    from damo.storage import Storage

    if videos is None:
        err_console.print("[bold red]error:[/] give --videos PREFIX")
        raise typer.Exit(code=2)
    cfg = load_config(config, overrides or [])
    require_allowed_options(cfg, videos=videos, out=out)
    storage = Storage(cfg.storage.s3)
    uris = video_uris(storage, videos)
    if not uris:
        err_console.print(f"[bold red]error:[/] no objects under {escape(videos)}")
        raise typer.Exit(code=2)
    where = join_ray_quietly(cfg)
    console.print(f"Ray joined; its logs: {escape(where)}", style="dim", highlight=False)
    with ExtractionProgressView(console) as progress:
        summary = extract_features(
            uris,
            out,
            cfg,
            batch_size=batch_size,
            num_actors=actors,
            num_gpus_per_actor=gpus_per_actor,
            storage=storage,
            retry_errors=retry_errors,
            on_progress=progress.update,
        )
    table = Table(title=f"feature extraction -> {out}")
    for column in ("inputs", "skipped (done before)", "ok", "errors", "clips/s"):
        table.add_column(column)
    table.add_row(
        str(summary.inputs),
        str(summary.skipped),
        str(summary.ok),
        str(sum(summary.errors.values())),
        f"{summary.clips_per_second:.2f}",
    )
    console.print(table)
    for reason, count in sorted(summary.errors.items()):
        console.print(f"  error {reason}: {count}")
    if summary.retryable_errors:
        console.print(
            f"{summary.retryable_errors} error(s) may pass (storage, timeouts, unexpected); "
            "run again with --retry-errors to redo them"
        )


data_app = typer.Typer(help="Datasets: the synthetic AV world, media checks.", no_args_is_help=True)


@data_app.command("synth")
@friendly_errors
def data_synth(
    out: Annotated[str, typer.Option(help="Root URI or path of the world (videos/, records/).")],
    clips: Annotated[int | None, typer.Option(min=1, help="Number of clips.")] = None,
    seed: Annotated[int | None, typer.Option(help="World seed (same seed, same world).")] = None,
    workers: Annotated[int | None, typer.Option(min=1, help="Processes; default all CPUs.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Re-render clips that already exist.")] = False,
    config: ConfigName = None,
    overrides: Overrides = None,
) -> None:
    """Generate the synthetic AV world (mp4 clips + annotation records) into object storage."""
    from damo.data.synthetic import generate_world
    from damo.storage import Storage

    cfg = load_config(config, overrides or [])
    require_allowed_options(cfg, out=out)
    settings = cfg.data.synthetic.model_copy(
        update={k: v for k, v in {"num_clips": clips, "seed": seed}.items() if v is not None}
    )
    summary = generate_world(
        out, Storage(cfg.storage.s3), settings, workers=workers, overwrite=overwrite
    )
    records = ", ".join(f"{split} {n}" for split, n in summary.records.items())
    console.print(
        f"world of {summary.num_clips} clips at {escape(out)} ({summary.rendered} rendered, "
        f"{summary.seconds:.1f}s); records: {records}"
    )


@data_app.command("import")
@friendly_errors
def data_import(
    dataset: Annotated[
        str, typer.Argument(help="Annotation format: charades-sta, qvhighlights or activitynet.")
    ],
    videos: Annotated[str, typer.Option(help="Prefix holding the videos, <video id>.<ext>.")],
    out: Annotated[str, typer.Option(help="Records prefix to write <split>.parquet under.")],
    annotations: Annotated[
        str | None,
        typer.Option(help="Prefix holding the official annotation files (default file names)."),
    ] = None,
    split: Annotated[
        list[str] | None,
        typer.Option(
            help="NAME=FILE, repeatable: import only these splits from these files (a bare "
            "file name is under --annotations), e.g. --split test=val_2.json.",
        ),
    ] = None,
    durations: Annotated[
        list[str] | None,
        typer.Option(help="Charades_v1_{train,test}.csv (repeatable): durations for Charades-STA."),
    ] = None,
    val_from_train: Annotated[
        float | None,
        typer.Option(help="Hold out this fraction of the training videos as split val."),
    ] = None,
    drop_missing: Annotated[
        bool, typer.Option(help="Leave out annotations whose video is not under --videos.")
    ] = False,
    config: ConfigName = None,
    overrides: Overrides = None,
) -> None:
    """Turn a dataset's official annotation files into records (<out>/<split>.parquet) whose
    video URIs point under --videos; report each split's annotations without a video."""
    from damo.data.dataset_import import dataset_format, import_dataset, split_files
    from damo.storage import Storage

    files = {}
    for spec in split or []:
        name, sep, file = spec.partition("=")
        if not sep or not name or not file:
            raise typer.BadParameter(f"'{spec}' is not NAME=FILE", param_hint="--split")
        files[name] = file
    cfg = load_config(config, overrides or [])
    require_allowed_options(cfg, videos=videos, out=out)
    resolved = split_files(dataset_format(dataset), annotations, files)
    inputs = {f"split {name}": uri for name, uri in resolved.items()}
    inputs.update({f"durations {uri}": uri for uri in durations or []})
    require_allowed_options(cfg, **inputs)
    report = import_dataset(
        dataset,
        videos,
        out,
        Storage(cfg.storage.s3),
        annotations=annotations,
        splits=files,
        durations=durations,
        val_from_train=val_from_train,
        drop_missing=drop_missing,
    )
    console.print(f"{report.videos_listed} videos listed under {escape(videos)}", soft_wrap=True)
    kept = "left out" if drop_missing else "kept"
    for item in report.splits:
        more = ", ..." if len(item.missing_videos) > 3 else ""
        missing = ", ".join(item.missing_videos[:3]) + more
        console.print(
            f"{item.split}: {item.records} records, {item.videos} videos; "
            f"{len(item.missing_videos)} videos not listed ({item.missing_records} annotations "
            f"{kept})" + (f": {escape(missing)}" if item.missing_videos else ""),
            highlight=False,
            soft_wrap=True,
        )
    if report.ambiguous_ids:
        console.print(f"{len(report.ambiguous_ids)} video ids listed twice; the first is used")
    console.print(f"records and import.json under {escape(out)}", soft_wrap=True)


@data_app.command("probe")
@friendly_errors
def data_probe(
    uri: Annotated[str, typer.Argument(help="Video URI or path.")],
    config: ConfigName = None,
    overrides: Overrides = None,
) -> None:
    """Say what a video is (duration, size, rotation, streams) or why it cannot be decoded."""
    import json

    from damo.media.decode import MediaError, probe
    from damo.storage import Storage, require_allowed

    cfg = load_config(config, overrides or [])
    require_allowed(uri, cfg.storage, "the video URI")
    info = probe(uri, Storage(cfg.storage.s3))
    if isinstance(info, MediaError):
        err_console.print(f"[bold red]{info.reason}:[/] {escape(info.message)}", highlight=False)
        raise typer.Exit(code=1)
    typer.echo(json.dumps(info.to_dict(), indent=2))

"""The `damo` command. Each subcommand parses options and calls into the package."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated, get_args

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import damo
from damo.config import ConfigError, available_configs, config_to_yaml, load_config
from damo.storage import StorageError
from damo.storage.s3server import EmbeddedS3Error, EmbeddedS3Server

app = typer.Typer(
    help="DaMO platform: train, tune, evaluate and serve an audio-visual Video LLM on Ray.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Inspect pipeline configs.", no_args_is_help=True)
storage_app = typer.Typer(help="The embedded S3 server (SeaweedFS).", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(storage_app, name="storage")

console = Console()
err_console = Console(stderr=True)

ConfigName = Annotated[
    str | None, typer.Option("--config", "-c", help="Named config or path to a YAML file.")
]
Overrides = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Dotted override, e.g. --set storage.s3.region=eu-west-1."),
]


# Expected errors of modules that load lazily (torch, transformers): an error can only be of one
# of these types once its module is loaded, so the check never imports them.
LAZY_ERRORS = (
    ("damo.model.backbones", "MissingBackboneError"),
    ("damo.model.llava", "LlavaConversionError"),
    ("damo.train.registry", "RegistryError"),
    ("damo.tune.trial", "SweepError"),
    ("damo.tune.space", "SpaceError"),
    ("damo.data.records", "RecordFormatError"),
    ("damo.data.dataset_import", "DatasetImportError"),
)


def expected_errors() -> tuple[type[Exception], ...]:
    lazy = tuple(
        getattr(sys.modules[module], name) for module, name in LAZY_ERRORS if module in sys.modules
    )
    return (ConfigError, StorageError, EmbeddedS3Error, *lazy)


def friendly_errors(func):
    """Turn the project's expected errors into a one-line message and exit code 2."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except Exception as err:
            if not isinstance(err, expected_errors()):
                raise
            err_console.print(
                f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True
            )
            raise typer.Exit(code=2) from None

    return wrapper


def require_allowed_options(cfg, **uris: str | None) -> None:
    """Every URI given on the command line must lie under `storage.allowed_prefixes` (when
    that list is set); the error names the option. Config values are the operator's own."""
    from damo.storage import require_allowed

    for option, uri in uris.items():
        if uri is not None:
            require_allowed(uri, cfg.storage, f"--{option.replace('_', '-')}")


def _version(value: bool) -> None:
    if value:
        console.print(f"damo {damo.__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """DaMO platform command line."""


# ---- config ---------------------------------------------------------------------------------
@config_app.command("show")
@friendly_errors
def config_show(
    name: Annotated[str, typer.Argument(help="Named config or path to a YAML file.")] = "default",
    overrides: Overrides = None,
) -> None:
    """Print the fully resolved config (bases merged, overrides applied, defaults filled)."""
    typer.echo(config_to_yaml(load_config(name, overrides or [])), nl=False)


@config_app.command("list")
def config_list() -> None:
    """List the named configs shipped with the package."""
    for name in available_configs():
        console.print(name)


# ---- storage --------------------------------------------------------------------------------
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


# ---- demo -----------------------------------------------------------------------------------
@app.command("demo")
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


# ---- eval -----------------------------------------------------------------------------------
eval_app = typer.Typer(help="Evaluate predictions and models.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")


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


# ---- extract --------------------------------------------------------------------------------
@app.command("extract")
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
    from damo.data.extract import connect_ray, extract_features, video_uris
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
    connect_ray(cfg)
    summary = extract_features(
        uris,
        out,
        cfg,
        batch_size=batch_size,
        num_actors=actors,
        num_gpus_per_actor=gpus_per_actor,
        storage=storage,
        retry_errors=retry_errors,
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


# ---- model ----------------------------------------------------------------------------------
model_app = typer.Typer(help="Inspect DaMO model presets (no weights).", no_args_is_help=True)
backbones_app = typer.Typer(help="Backbone checkpoints for DaMO.", no_args_is_help=True)
app.add_typer(model_app, name="model")
app.add_typer(backbones_app, name="backbones")
Preset = Annotated[str, typer.Argument(help="Named config (tiny, paper) or a YAML file.")]


@model_app.command("tokens")
@friendly_errors
def model_tokens(preset: Preset, overrides: Overrides = None) -> None:
    """Tokens per video at each step, encoders to soft prompt, and the compression ratio."""
    from rich.table import Table

    from damo.model.accounting import compression_ratio, naive_visual_tokens, token_steps

    cfg = load_config(preset, overrides or []).model
    table = Table(title=f"DaMO tokens per video ({preset})")
    for column in ("step", "visual", "audio", "total"):
        table.add_column(column, justify="left" if column == "step" else "right")
    for step in token_steps(cfg):
        table.add_row(step.name, f"{step.visual:,}", f"{step.audio:,}", f"{step.total:,}")
    console.print(table)
    console.print(
        f"naive per-patch concatenation of every frame: {naive_visual_tokens(cfg):,} tokens; "
        f"soft prompt: {cfg.bridge.queries} tokens; ratio {compression_ratio(cfg):.1f}x"
    )


@model_app.command("params")
@friendly_errors
def model_params(preset: Preset, overrides: Overrides = None) -> None:
    """Parameter counts (frozen backbones, trainable components, per stage), on meta device."""
    from rich.table import Table

    from damo.model.accounting import compression_ratio, naive_visual_tokens, parameter_counts

    cfg = load_config(preset, overrides or []).model
    counts = parameter_counts(cfg)
    table = Table(title=f"DaMO parameters ({preset})")
    table.add_column("group")
    table.add_column("name")
    table.add_column("parameters", justify="right")
    for group in ("frozen", "components", "stages"):
        label = {"frozen": "frozen", "components": "trainable", "stages": "trained in"}[group]
        for name, value in counts[group].items():
            table.add_row(label, name, f"{value:,}")
    console.print(table)
    console.print(f"frozen total: {sum(counts['frozen'].values()):,}")
    console.print(f"trainable total: {sum(counts['components'].values()):,}")
    vision = cfg.vision.hub_id or cfg.vision.model_type
    llm = cfg.llm.hub_id or cfg.llm.model_type
    console.print(f"backbones: vision {vision} ({cfg.vision.library}), LLM {llm}", soft_wrap=True)
    console.print(
        f"LLM input tokens per video: {cfg.bridge.queries} soft-prompt tokens for "
        f"{naive_visual_tokens(cfg):,} per-patch tokens: ratio {compression_ratio(cfg):.1f}x",
        soft_wrap=True,
    )


@backbones_app.command("make-tiny")
@friendly_errors
def backbones_make_tiny(
    out: Annotated[str, typer.Option(help="Where to write vision/, audio/, text_encoder/, llm/.")],
    steps: Annotated[int, typer.Option(min=0, help="Pre-training steps of the tiny LLM.")] = 300,
    clips: Annotated[int, typer.Option(min=1, help="Synthetic clips whose text it reads.")] = 200,
    seed: int = 0,
    config: Annotated[
        str, typer.Option("--config", "-c", help="Config whose model.* arch fields to build.")
    ] = "tiny",
    overrides: Overrides = None,
) -> None:
    """Write tiny real HF backbones (tokenizer and LLM pre-trained on synthetic-world text)."""
    from damo.data.backbones import make_tiny_backbones
    from damo.storage import Storage

    cfg = load_config(config, overrides or [])
    require_allowed_options(cfg, out=out)
    timings = make_tiny_backbones(
        out,
        cfg=cfg.model,
        storage=Storage(cfg.storage.s3),
        steps=steps,
        num_clips=clips,
        seed=seed,
        log=console.print,
    )
    total = sum(v for k, v in timings.items() if k.endswith("_s"))
    console.print(f"tiny backbones written to {escape(out)} in {total:.1f}s")


@backbones_app.command("prepare")
@friendly_errors
def backbones_prepare(
    out: Annotated[
        str,
        typer.Option(
            help="Backbone root (path, file:// or s3://): writes <out>/llm, <out>/vision..."
        ),
    ],
    llava: Annotated[
        str | None,
        typer.Option(
            help="A LlavaNext checkpoint (hf download llava-hf/llava-v1.6-mistral-7b-hf): its "
            "language model becomes <out>/llm; the vision tower and projector are dropped."
        ),
    ] = None,
    vision: Annotated[
        str | None, typer.Option(help="A downloaded vision checkpoint, copied to <out>/vision.")
    ] = None,
    audio: Annotated[
        str | None, typer.Option(help="A downloaded Whisper checkpoint, copied to <out>/audio.")
    ] = None,
    text_encoder: Annotated[
        str | None,
        typer.Option(help="A downloaded text encoder, copied to <out>/text_encoder."),
    ] = None,
    config: ConfigName = None,
    overrides: Overrides = None,
) -> None:
    """Put downloaded checkpoints into the backbone layout the platform loads (local or S3).

    The paper's LLM is the Mistral-7B inside LLaVA-v1.6: --llava extracts it as a standard
    causal-LM directory (safetensors, config, tokenizer, chat template) and reports what it
    dropped.
    """
    from damo.data.backbones import prepare_backbones
    from damo.storage import Storage

    sources = {
        name: source
        for name, source in (
            ("llm", llava),
            ("vision", vision),
            ("audio", audio),
            ("text_encoder", text_encoder),
        )
        if source is not None
    }
    if not sources:
        err_console.print(
            "[bold red]error:[/] nothing to prepare: pass --llava, --vision, --audio "
            "or --text-encoder"
        )
        raise typer.Exit(code=2)
    cfg = load_config(config or "default", overrides or [])
    prepare_backbones(
        out,
        sources,
        storage=Storage(cfg.storage.s3),
        log=lambda message: console.print(escape(message), soft_wrap=True),
    )
    console.print(f"backbones prepared under {escape(out)}: {', '.join(sources)}")


# ---- data -----------------------------------------------------------------------------------
data_app = typer.Typer(help="Datasets: the synthetic AV world, media checks.", no_args_is_help=True)
app.add_typer(data_app, name="data")


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


# ---- train ----------------------------------------------------------------------------------
train_app = typer.Typer(help="Train DaMO's four stages with Ray Train.")
app.add_typer(train_app, name="train")


def _parse_stages(text: str) -> tuple[int, ...]:
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
            cfg, run_id, _parse_stages(stages), init_checkpoint, log=console.print
        )
    except TrainError as err:
        err_console.print(f"[bold red]error:[/] {escape(str(err))}", soft_wrap=True)
        _print_log_hint(err.logs, run_id)
        raise typer.Exit(code=1) from None
    except KeyboardInterrupt:
        err_console.print(
            f"[bold red]interrupted:[/] the running stage is recorded as failed; "
            f"re-run with --run-id {escape(run_id)} to resume it",
            soft_wrap=True,
        )
        raise typer.Exit(code=130) from None
    _print_manifest(manifest)


def _print_log_hint(logs: dict, run_id: str) -> None:
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


# ---- tune ------------------------------------------------------------------------------------
tune_app = typer.Typer(help="Sweep config fields with Ray Tune; register the best checkpoint.")
app.add_typer(tune_app, name="tune")


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


# ---- serve ----------------------------------------------------------------------------------
@app.command("serve")
@friendly_errors
def serve_command(
    checkpoint: Annotated[
        str, typer.Option(help="Checkpoint URI to serve ('best': the tuning registry's best).")
    ],
    config: ConfigName = None,
    overrides: Overrides = None,
    host: Annotated[str | None, typer.Option(help="Bind address (default serve.host).")] = None,
    port: Annotated[
        int | None, typer.Option(min=0, max=65535, help="Port (default serve.port; 0: free).")
    ] = None,
) -> None:
    """Run the grounding and QA service locally (Ray Serve) and print its URL; Ctrl-C stops it.

    The bearer token, when wanted, comes from the environment variable named by
    serve.auth_token_env (DAMO_SERVE_TOKEN); media URIs must lie in storage.allowed_prefixes.
    """
    import time

    from damo.data.extract import connect_ray
    from damo.serve.local import start
    from damo.train.registry import is_registry_name, resolve_checkpoint

    cfg = load_config(config, overrides or [])
    if is_registry_name(checkpoint):
        named, checkpoint = checkpoint, resolve_checkpoint(checkpoint, cfg)
        console.print(f"{named}: {checkpoint}", highlight=False)
    update = {k: v for k, v in (("host", host), ("port", port)) if v is not None}
    cfg = cfg.model_copy(update={"serve": cfg.serve.model_copy(update=update)})
    connect_ray(cfg)
    from ray import serve

    try:
        url = start(cfg, checkpoint)
        console.print(f"DaMO is served at {url}  (API docs: {url}docs)")
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        console.print("stopping")
    finally:
        serve.shutdown()

"""`make demo`: the whole platform end to end on one machine, with nothing set up beforehand.

embedded S3 server -> tiny backbones -> synthetic AV world -> Ray Data feature extraction ->
the four training stages (Ray Train) -> batch evaluation (Ray Data) -> metrics table; then
the report is copied to a local folder and the server stops.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from damo.config import DamoConfig
from damo.storage import Storage, join
from damo.storage.s3server import EmbeddedS3Server

BUCKET = "s3://damo-demo"


@dataclass
class DemoSize:
    """How big the demo is: `full` for `make demo`, `smoke` for the CI test of the same path."""

    clips: int
    lm_steps: int
    max_steps: int | None  # per stage; None: the preset's epochs

    @classmethod
    def named(cls, name: str) -> DemoSize:
        sizes = {
            "full": cls(clips=60, lm_steps=300, max_steps=None),
            "smoke": cls(clips=20, lm_steps=30, max_steps=2),
        }
        if name not in sizes:
            raise ValueError(f"unknown demo size {name!r} (known: {', '.join(sizes)})")
        return sizes[name]


def timed_step(console: Console, timings: dict, name: str, work: Callable):
    """Run one named step under a rule; its seconds go into `timings[name]`."""
    console.rule(f"[bold]{name}")
    started = time.monotonic()
    result = work()
    timings[name] = time.monotonic() - started
    console.print(f"{name}: {timings[name]:.1f}s")
    return result


def demo_config(cfg: DamoConfig, server_s3, size: DemoSize) -> DamoConfig:
    """The given config pointed at the demo bucket (and shortened for the smoke size)."""
    update = {
        "storage": cfg.storage.model_copy(update={"s3": server_s3, "root": BUCKET}),
        "model": cfg.model.with_backbones_at(join(BUCKET, "backbones", "tiny")),
        "train": cfg.train.model_copy(
            update={
                "runs_root": join(BUCKET, "runs"),
                "data": cfg.train.data.model_copy(
                    update={
                        "features": join(BUCKET, "features"),
                        "records": join(BUCKET, "world", "records"),
                    }
                ),
            }
        ),
    }
    demo = cfg.model_copy(update=update, deep=True)
    if size.max_steps is not None:
        for stage in (1, 2, 3, 4):
            demo.train.stages.get(stage).max_steps = size.max_steps
    return DamoConfig.model_validate(demo.model_dump())


def run_demo(
    cfg: DamoConfig, console: Console, size: str = "full", keep: Path = Path(".damo/demo")
) -> bool:
    """Run the pipeline; True when every step finished. The report is copied under `keep`."""
    import ray

    from damo.config.data import SyntheticConfig
    from damo.data.backbones import make_tiny_backbones
    from damo.data.extract import connect_ray, extract_features, video_uris
    from damo.data.synthetic import generate_world
    from damo.eval.batch import EvalSettings, evaluate_checkpoint
    from damo.eval.report import metrics_table
    from damo.train.pipeline import train_pipeline

    demo_size = DemoSize.named(size)
    timings: dict[str, float] = {}
    keep.mkdir(parents=True, exist_ok=True)
    server = EmbeddedS3Server(cfg.storage.embedded, data_dir=str(keep / "storage"))
    started = time.monotonic()
    with server as state:
        console.print(
            f"embedded S3 server at [bold]{state.endpoint_url}[/] (data in {server.data_dir})"
        )
        cfg = demo_config(cfg, state.s3_config(), demo_size)
        storage = Storage(cfg.storage.s3)
        storage.ensure_bucket(BUCKET)
        try:
            timed_step(
                console,
                timings,
                "tiny backbones",
                lambda: make_tiny_backbones(
                    join(BUCKET, "backbones", "tiny"),
                    cfg.model,
                    storage,
                    steps=demo_size.lm_steps,
                    num_clips=demo_size.clips,
                ),
            )
            world = join(BUCKET, "world")
            settings = cfg.data.synthetic.model_copy(update={"num_clips": demo_size.clips})
            timed_step(
                console,
                timings,
                "synthetic world",
                lambda: generate_world(
                    world, storage, SyntheticConfig.model_validate(settings.model_dump())
                ),
            )
            connect_ray(cfg)
            extracted = timed_step(
                console,
                timings,
                "feature extraction",
                lambda: extract_features(
                    video_uris(storage, join(world, "videos")),
                    cfg.train.data.features,
                    cfg,
                    storage=storage,
                ),
            )
            console.print(f"  {extracted.ok} clips with features, errors: {extracted.errors}")
            run_id = time.strftime("demo-%Y%m%d-%H%M%S")
            manifest = timed_step(
                console,
                timings,
                "training (4 stages)",
                lambda: train_pipeline(cfg, run_id, storage=storage, log=console.print),
            )
            checkpoint = manifest["stages"]["4"]["checkpoint"]
            eval_uri = join(BUCKET, "eval", run_id)
            result = timed_step(
                console,
                timings,
                "evaluation",
                lambda: evaluate_checkpoint(
                    cfg,
                    checkpoint,
                    cfg.train.data.features,
                    join(cfg.train.data.records, "test.parquet"),
                    eval_uri,
                    EvalSettings(plots=4),
                    storage,
                ),
            )
            local_report = keep / "report" / run_id
            for uri in storage.list(eval_uri + "/"):
                storage.download_file(uri, local_report / uri[len(eval_uri) + 1 :])
            storage.download_file(
                join(cfg.train.runs_root, run_id, "loss_curves.png"),
                local_report / "loss_curves.png",
            )
        finally:
            if ray.is_initialized():
                ray.shutdown()
    table = Table(title="training")
    for column in ("stage", "val loss (start -> best)", "steps", "wall s"):
        table.add_column(column)
    for stage, entry in sorted(manifest["stages"].items()):
        m = entry["metrics"]
        table.add_row(
            f"{stage} {entry['name']}",
            f"{m['first_val_loss']:.3f} -> {m['best_val_loss']:.3f}",
            str(m["steps"]),
            str(entry["wall_s"]),
        )
    console.print(table)
    console.print(metrics_table(result["metrics"]), markup=False, highlight=False)
    console.print(f"report, plots and loss curves: [bold]{local_report}[/] (report.md)")
    console.print(
        "timings: "
        + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items())
        + f"; total {time.monotonic() - started:.0f}s"
    )
    finished = all(e["status"] == "finished" for e in manifest["stages"].values())
    console.print("[bold green]demo finished[/]" if finished else "[bold red]demo FAILED[/]")
    return finished

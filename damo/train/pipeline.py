"""Chain the four stages: one TorchTrainer per stage, a manifest in object storage, resume.

    <runs_root>/<run_id>/manifest.json      each stage's status, checkpoint, metrics, hashes
                          loss_curves.png    train/val loss of every finished stage
                          metrics/stageK.jsonl, tensorboard/stageK/, ray/<run_id>-stageK/

Re-running a run id resumes at the first unfinished stage; inside a stage, Ray Train restores
the latest checkpoint (same run name) and `FailureConfig` restarts failed workers from it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from damo.config import DamoConfig, config_hash
from damo.data.extract import feature_config_hash
from damo.data.training import training_dataset
from damo.storage import Storage, join, parse_uri
from damo.train.loop import ANCHOR_DATASET, optimizer_steps, train_loop_per_worker
from damo.train.stages import STAGE_NAMES, stage_spec
from damo.version import code_version

MANIFEST = "manifest.json"
LOSS_PLOT = "loss_curves.png"


class TrainError(RuntimeError):
    """A run that cannot start or a stage that failed; `logs` says where to look."""

    def __init__(self, message: str, logs: dict | None = None):
        super().__init__(message)
        self.logs = logs or {}


class StageFailed(Exception):
    """A stage whose `TorchTrainer.fit()` returned an error instead of raising it."""

    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error


def root_error(err: BaseException) -> BaseException:
    """The error behind Ray Train's wrappers: the lowest rank's worker failure, or the
    controller's."""
    failures = getattr(err, "worker_failures", None)
    if isinstance(failures, dict) and failures:
        return root_error(failures[min(failures)])
    controller = getattr(err, "controller_failure", None)
    if isinstance(controller, BaseException):
        return root_error(controller)
    return err


def one_line(err: BaseException) -> str:
    """An error as one line: its type and the last non-empty line of its message (a worker's
    error arrives with the worker's traceback in the message)."""
    err = root_error(err)
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    message = lines[-1] if lines else ""
    name = type(err).__name__
    return f"{name}: {message}" if message and not message.startswith(name) else message or name


def ray_log_dir() -> str | None:
    """This node's Ray session log directory, when Ray is running here."""
    try:
        import ray

        node = ray._private.worker._global_node  # no public API names the session dir
        return node.get_logs_dir_path() if ray.is_initialized() and node else None
    except Exception:  # noqa: BLE001  only a hint for the user
        return None


def stage_logs(run: str, stage: int, run_id: str) -> dict:
    logs = {
        "run": run,
        "metrics": join(run, "metrics", f"stage{stage}.jsonl"),
        "ray_run": join(run, "ray", f"{run_id}-stage{stage}"),
    }
    local = ray_log_dir()
    if local:
        logs["ray_logs"] = local
    return logs


def training_hash(cfg: DamoConfig) -> str:
    """What must not change within a run: the model, the data and the training recipe.

    Not the scaling: a run resumes on more or fewer workers (positions are kept in rows)."""
    train = cfg.train.model_dump(mode="json", exclude={"scaling"})
    return config_hash({"model": cfg.model, "data": cfg.data, "train": train})


def train_dataset_names(cfg: DamoConfig, epochs: int) -> list[str]:
    """The Ray Train dataset each epoch reads: a differently shuffled one per epoch."""
    return [f"train_epoch{e}" for e in range(epochs)] if cfg.train.shuffle else ["train"] * epochs


def run_uri(cfg: DamoConfig, run_id: str) -> str:
    if not run_id or "/" in run_id or run_id.startswith("."):
        raise TrainError(f"bad run id {run_id!r}: use letters, digits, '-' and '_'")
    return join(cfg.train.runs_root, run_id)


def read_manifest(storage: Storage, run: str) -> dict | None:
    uri = join(run, MANIFEST)
    return json.loads(storage.read_bytes(uri)) if storage.exists(uri) else None


def write_manifest(storage: Storage, run: str, manifest: dict) -> None:
    storage.write_bytes(join(run, MANIFEST), json.dumps(manifest, indent=2).encode())


def storage_uri(run: str, path: str) -> str:
    """A path inside the run's filesystem (as Ray reports it) -> a URI for `Storage`."""
    return f"s3://{path}" if parse_uri(run).scheme == "s3" else path


def print_join_report(what: str, report) -> None:
    """What joining a split's records to the features left out, so a user sees it before the
    stage trains (`what` names the stage and dataset)."""
    if report.stale_rows or report.duplicate_rows:
        print(
            f"{what}: skipped {report.stale_rows} feature rows of another feature config and "
            f"{report.duplicate_rows} older duplicates"
        )
    if report.rows != report.matched:
        print(f"{what}: {report.matched} records read as {report.rows} rows (task_repeats)")
    if report.unmatched:
        print(
            f"warning: {what}: {report.unmatched} of {report.records} records have no "
            f"features (e.g. {report.videos_without_features[:3]})"
        )


def fit_stage(
    cfg: DamoConfig,
    stage: int,
    run: str,
    run_id: str,
    init_checkpoint: str | None,
    storage: Storage,
    callbacks: list | None = None,
):
    """Run one stage's TorchTrainer; return (result, rows, total_steps). `callbacks` are Ray
    Train callbacks (Tune passes the one that reports to it)."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    spec = stage_spec(cfg, stage)
    data = cfg.train.data
    feature_hash = feature_config_hash(cfg)
    datasets, matched = {}, {}
    for name, split in (("train", data.train_split), ("val", data.val_split)):
        records = join(data.records, f"{split}.parquet")
        datasets[name], report = training_dataset(
            data.features,
            records,
            spec.tasks,
            storage,
            feature_hash,
            task_repeats=spec.task_repeats if name == "train" else None,
        )
        print_join_report(f"stage {stage} {name}", report)
        matched[name] = report.rows
        if name == "val" and spec.val_grounding:  # answered and scored at each epoch end
            datasets["val_grounding"], grounding = training_dataset(
                data.features, records, ("grounding",), storage, feature_hash
            )
            if not grounding.matched:
                raise TrainError(
                    f"stage {stage}: val_grounding is on, but no {split} grounding record has "
                    f"features (config {feature_hash}) under {data.features}"
                )
        if not report.matched:
            raise TrainError(
                f"stage {stage}: no {name} records for tasks {spec.tasks} have "
                f"features (config {feature_hash}) under {data.features}"
            )
    names = train_dataset_names(cfg, spec.epochs)
    if cfg.train.shuffle:  # a global, seeded shuffle per epoch; rows of a video spread out
        train = datasets.pop("train")
        for epoch, name in enumerate(names):
            datasets[name] = train.random_shuffle(seed=cfg.seed + epoch)
    split = sorted(set(names))
    anchor_batch_size = None
    if spec.anchored:  # stage 1's captions, read in passes for as long as the stage runs
        records = join(data.records, f"{data.train_split}.parquet")
        captions, report = training_dataset(
            data.features, records, ("caption",), storage, feature_hash
        )
        print_join_report(f"stage {stage} anchor", report)
        workers = cfg.train.scaling.num_workers
        anchor_batch_size = min(spec.anchor.batch_size, report.matched // workers)
        if anchor_batch_size < 2:  # VTC contrasts the captions of one batch
            raise TrainError(
                f"stage {stage}: the anchor needs at least 2 captions per worker; "
                f"{report.matched} {data.train_split} captions have features (config "
                f"{feature_hash}) under {data.features} for {workers} workers"
            )
        if anchor_batch_size < spec.anchor.batch_size:
            print(
                f"warning: stage {stage}: the anchor's batches hold {anchor_batch_size} "
                f"captions, not {spec.anchor.batch_size} (train.stages.stage{stage}.anchor."
                f"batch_size): {report.matched} {data.train_split} captions have features, "
                f"for {workers} workers"
            )
        datasets[ANCHOR_DATASET] = captions.random_shuffle(seed=cfg.seed)
        split.append(ANCHOR_DATASET)
    # Deterministic order per epoch: a resumed epoch skips exactly the rows it trained
    ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = True
    scaling = cfg.train.scaling
    batches, total_steps = optimizer_steps(matched["train"], scaling.num_workers, spec)
    if batches == 0:
        raise TrainError(
            f"stage {stage}: {matched['train']} rows are not enough for "
            f"{scaling.num_workers} workers"
        )
    resources = {"CPU": scaling.cpus_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = scaling.gpus_per_worker
    fs, ray_path = storage.pyarrow_filesystem(join(run, "ray"))
    if parse_uri(run).scheme == "file":
        Path(ray_path).mkdir(parents=True, exist_ok=True)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            # the model itself, not a JSON dump: a dump masks secrets, a pickle keeps them for
            # the workers, and Ray's run state records only str(cfg), which masks them too
            "cfg": cfg,
            "stage": stage,
            "init_checkpoint": init_checkpoint,
            "total_steps": total_steps,
            "batches_per_epoch": batches,
            "anchor_batch_size": anchor_batch_size,
            "train_datasets": names,
            "run_uri": run,
        },
        scaling_config=ScalingConfig(
            num_workers=scaling.num_workers,
            use_gpu=scaling.use_gpu,
            resources_per_worker=resources,
            placement_strategy=scaling.placement_strategy,
        ),
        run_config=RunConfig(
            name=f"{run_id}-stage{stage}",  # the run id keeps stages of other runs apart
            storage_path=ray_path,
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=scaling.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=None),
            callbacks=callbacks,
        ),
        datasets=datasets,
        # the validation splits are not cut by Ray: an equal split drops rows to even the
        # shards out (1 row over 2 workers gives each none). Every rank reads them whole and
        # computes its share of the batches (damo.train.loop.rank_share)
        dataset_config=DataConfig(datasets_to_split=split, execution_options=ingest),
    )
    return trainer.fit(), matched, total_steps


def best_checkpoint(result, run: str, metric: str = "val_loss") -> tuple[str, dict]:
    """The checkpoint with the best `metric` (lowest val_loss, highest val_grounding_miou), as
    a URI, and its metrics."""
    scored = [(c, m) for c, m in result.best_checkpoints if m.get(metric) is not None]
    if not scored:
        raise TrainError(f"the stage reported no checkpoint with {metric}")
    sign = 1 if metric == "val_loss" else -1
    checkpoint, metrics = min(scored, key=lambda pair: sign * pair[1][metric])
    return storage_uri(run, checkpoint.path), metrics


def read_stage_metrics(storage: Storage, run: str, stage: int) -> list[dict]:
    uri = join(run, "metrics", f"stage{stage}.jsonl")
    if not storage.exists(uri):
        return []
    return [json.loads(line) for line in storage.read_bytes(uri).decode().splitlines() if line]


def plot_loss_curves(storage: Storage, run: str, stages: list[int]) -> str:
    """One panel per stage: train loss and validation loss against optimiser steps."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6), squeeze=False)
    for ax, stage in zip(axes[0], (1, 2, 3, 4), strict=True):
        rows = read_stage_metrics(storage, run, stage) if stage in stages else []
        for key, style in (("train_loss", "-"), ("val_loss", "o-")):
            points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points, strict=True), style, label=key.replace("_", " "))
        ax.set_title(f"stage {stage}: {STAGE_NAMES[stage]}", fontsize=10)
        ax.set_xlabel("optimiser step")
        if rows:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not run", ha="center", va="center", transform=ax.transAxes)
    axes[0][0].set_ylabel("loss")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    uri = join(run, LOSS_PLOT)
    storage.write_bytes(uri, buffer.getvalue())
    return uri


def train_pipeline(
    cfg: DamoConfig,
    run_id: str,
    stages: tuple[int, ...] = (1, 2, 3, 4),
    init_checkpoint: str | None = None,
    storage: Storage | None = None,
    log=print,
    callbacks: dict[int, list] | None = None,
    stopping: Callable[[], bool] | None = None,
    after_stage: dict[int, Callable[[dict], None]] | None = None,
) -> dict:
    """Train `stages` in order, each from the previous one's best checkpoint; return the
    manifest. Finished stages of an existing run are skipped, not redone. `callbacks` maps a
    stage to the Ray Train callbacks of its trainer; `stopping` says whether the caller has
    begun stopping the run, so that the errors of that teardown are not recorded as failures.
    `after_stage` maps a stage to a function of its finished manifest entry, called when the
    stage finishes or is skipped as finished before the next one starts."""
    after_stage = after_stage or {}
    storage = storage or Storage(cfg.storage.s3)
    stages = tuple(sorted(set(stages)))
    if not stages or not set(stages) <= {1, 2, 3, 4}:
        raise TrainError(f"stages must be a subset of 1,2,3,4; got {stages}")
    run = run_uri(cfg, run_id)
    storage.ensure_bucket(run)
    digest = training_hash(cfg)
    manifest = read_manifest(storage, run) or {
        "run_id": run_id,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config_hash": digest,
        "config": cfg.model_dump(mode="json"),
        "stages": {},
    }
    if manifest["config_hash"] != digest:
        raise TrainError(
            f"run '{run_id}' was started with another config (hash {manifest['config_hash']}, "
            f"now {digest}); use a new run id to train with this one"
        )
    previous = init_checkpoint
    for stage in stages:
        entry = manifest["stages"].get(str(stage), {})
        if entry.get("status") == "finished":
            log(f"stage {stage} ({STAGE_NAMES[stage]}) already finished: {entry['checkpoint']}")
            previous = entry["checkpoint"]
            if stage in after_stage:
                after_stage[stage](entry)
            continue
        if previous is None and stage > 1:
            log(
                f"warning: stage {stage} starts from the pretrained backbones alone "
                "(no earlier stage and no --init-checkpoint)"
            )
        started = time.monotonic()
        entry = {
            "name": STAGE_NAMES[stage],
            "status": "running",
            "attempts": entry.get("attempts", 0) + 1,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "init_checkpoint": previous,
            "config_hash": digest,
            "code_version": code_version(),
        }
        manifest["stages"][str(stage)] = entry
        write_manifest(storage, run, manifest)
        log(f"stage {stage} ({STAGE_NAMES[stage]}) starting")
        try:
            result, rows, total_steps = fit_stage(
                cfg, stage, run, run_id, previous, storage, (callbacks or {}).get(stage)
            )
            if result.error is not None:
                raise StageFailed(result.error)
            checkpoint, best = best_checkpoint(
                result, run, stage_spec(cfg, stage).checkpoint_metric
            )
        except BaseException as err:  # noqa: BLE001  recorded, then raised on
            if stopping is not None and stopping():
                # the caller stopped the run (Tune ending a trial its scheduler stopped), and this
                # error is its teardown, not a failure: the stage stays "running" (resumable) and
                # whoever stopped it says why
                raise
            cause = err.error if isinstance(err, StageFailed) else err
            entry.update(
                status="failed",
                error=one_line(cause),
                finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                logs=stage_logs(run, stage, run_id),
            )
            write_manifest(storage, run, manifest)
            if isinstance(err, Exception):
                raise TrainError(
                    f"stage {stage} ({STAGE_NAMES[stage]}) failed: {one_line(cause)}",
                    logs=entry["logs"],
                ) from cause
            raise  # KeyboardInterrupt, SystemExit: recorded, then as they were
        history = read_stage_metrics(storage, run, stage)
        val = [r["val_loss"] for r in history if r.get("val_loss") is not None]
        miou = [r["val_grounding_miou"] for r in history if "val_grounding_miou" in r]
        entry.update(
            status="finished",
            checkpoint=checkpoint,
            finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            wall_s=round(time.monotonic() - started, 1),
            metrics={
                "first_val_loss": val[0] if val else None,
                "best_val_loss": best["val_loss"],  # the kept checkpoint's
                **({"best_val_grounding_miou": max(miou)} if miou else {}),
                "final_val_loss": val[-1] if val else None,
                "steps": total_steps,
                "train_rows": rows["train"],
                "val_rows": rows["val"],
                "restarts": max((r.get("restarts", 0) for r in history), default=0),
            },
        )
        write_manifest(storage, run, manifest)
        manifest["loss_curves"] = plot_loss_curves(
            storage, run, [int(s) for s in manifest["stages"]]
        )
        write_manifest(storage, run, manifest)
        log(
            f"stage {stage} finished in {entry['wall_s']}s: val loss "
            f"{entry['metrics']['first_val_loss']:.4f} -> {best['val_loss']:.4f}"
        )
        previous = checkpoint
        if stage in after_stage:
            after_stage[stage](entry)
    return manifest

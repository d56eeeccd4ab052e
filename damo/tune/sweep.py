"""Run (or resume) a sweep: Ray Tune over a search space, trials as pipeline runs.

    <tune.sweeps_root>/<name>/
        sweep.json           the space, the base config's hash, status, when
        tuner/               Ray Tune's experiment state (what `Tuner.restore` reads)
        trials/<trial id>/   each trial's pipeline run (manifest, metrics, checkpoints)
        results.csv, results.md, heatmap.png, curves.png, best.json

Re-running the same name resumes: finished trials are kept (with their ASHA rung results),
unfinished ones restart from their own run (finished stages skipped, the running stage from
its latest checkpoint).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass

from damo.config import DamoConfig, config_hash
from damo.storage import Storage, join, parse_uri
from damo.tune.space import SearchSpace
from damo.tune.trial import SweepError, has_stage1_rung, run_trial, trial_stages
from damo.version import code_version

SWEEP_FILE = "sweep.json"
TUNER_DIR = "tuner"  # Ray Tune's experiment name inside the sweep directory


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C: Tune saved the sweep's state and stopped; the same name resumes it."""


def unfinished_trials(grid) -> list[str]:
    """Trials Tune left running or pending: it returns from `fit()` on Ctrl-C instead of
    raising. ResultGrid has no public status per trial, so this reads its trials."""
    trials = grid._experiment_analysis.trials  # noqa: SLF001
    return [t.trial_id for t in trials if t.status not in ("TERMINATED", "ERROR")]


@dataclass
class SweepResult:
    name: str
    uri: str
    trials: list[dict]
    best: dict | None
    files: dict[str, str]
    resumed: bool


def sweep_uri(cfg: DamoConfig, name: str) -> str:
    if not name or "/" in name or name.startswith(".") or ":" in name:
        raise SweepError(f"bad sweep name {name!r}: use letters, digits, '-' and '_'")
    return join(cfg.tune.sweeps_root, name)


def base_hash(cfg: DamoConfig) -> str:
    """What a resumed sweep must share with its start: everything but how it runs."""
    return config_hash(cfg.model_dump(mode="json", exclude={"ray", "serve"}))


def last_stage_epochs(cfg: DamoConfig) -> int:
    return cfg.train.stages.get(cfg.tune.last_stage).epochs


def make_scheduler(cfg: DamoConfig, uri: str, stages: tuple[int, ...] = ()):
    from ray.tune.schedulers import FIFOScheduler

    from damo.tune.scheduler import EpochHistory, ResumableASHA, Stage1Record, use_storage

    use_storage(uri, cfg.storage.s3)
    if cfg.tune.scheduler == "fifo":
        return FIFOScheduler()
    return ResumableASHA(
        epoch_history=EpochHistory(uri, cfg.tune.last_stage, cfg.tune.metric),
        stage1_record=Stage1Record(uri) if stages and has_stage1_rung(cfg, stages) else None,
        time_attr="epoch",  # the validated epoch of the last stage that each report carries
        max_t=last_stage_epochs(cfg),
        grace_period=min(cfg.tune.asha.grace_period, last_stage_epochs(cfg)),
        reduction_factor=cfg.tune.asha.reduction_factor,
        # a trial at its last epoch ends by itself: stopping it there would kill the trial
        # before its run records the stage as finished
        stop_last_trials=False,
    )


def make_searcher(cfg: DamoConfig, space: SearchSpace):
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if cfg.tune.searcher == "optuna":
        if space.grid:
            raise SweepError(f"{space.source} is a grid: use tune.searcher=random for grids")
        from damo.tune.scheduler import MetricRowsOnlyOptuna

        return MetricRowsOnlyOptuna(seed=cfg.tune.seed)
    # a generator instance takes its own concurrency limit (Tune ignores max_concurrent_trials
    # for one, and would start every trial at once)
    return BasicVariantGenerator(
        max_concurrent=cfg.tune.max_concurrent_trials, random_state=cfg.tune.seed
    )


def space_record(space: SearchSpace) -> dict:
    """The space as it was loaded (not its file's text): a comment edit is not a new space."""
    return {"grid": space.grid, "parameters": [asdict(p) for p in space.parameters]}


def check_room_for_data(cfg: DamoConfig, cluster_cpus: float) -> None:
    """Concurrent trials must leave a CPU for Ray Data's read tasks, or ingest waits forever
    for resources that never free up (RAY_NOTES)."""
    scaling = cfg.train.scaling
    per_trial = cfg.tune.trial_cpus + scaling.num_workers * scaling.cpus_per_worker
    taken = cfg.tune.max_concurrent_trials * per_trial
    if cluster_cpus - taken < 1:
        raise SweepError(
            f"{cfg.tune.max_concurrent_trials} concurrent trial(s) x {per_trial:g} CPUs "
            f"(tune.trial_cpus {cfg.tune.trial_cpus:g} + {scaling.num_workers} worker(s) x "
            f"train.scaling.cpus_per_worker {scaling.cpus_per_worker:g}) leave "
            f"{cluster_cpus - taken:g} of the cluster's {cluster_cpus:g} CPUs for Ray Data, "
            "which needs 1: lower tune.max_concurrent_trials, tune.trial_cpus or "
            "train.scaling.cpus_per_worker"
        )


def check_resumable(storage: Storage, uri: str, space: SearchSpace, cfg: DamoConfig) -> dict:
    """The sweep record of `uri`, after checking it was started with this space and config."""
    record = json.loads(storage.read_bytes(join(uri, SWEEP_FILE)))
    if json.loads(json.dumps(space_record(space))) != record["space"]:
        raise SweepError(
            f"sweep '{record['name']}' was started with another search space "
            f"({record['space_source']}); use a new --name for this one"
        )
    if record["config_hash"] != base_hash(cfg):
        raise SweepError(
            f"sweep '{record['name']}' was started with another config (hash "
            f"{record['config_hash']}, now {base_hash(cfg)}); use a new --name for this one"
        )
    return record


def run_sweep(
    cfg: DamoConfig,
    space: SearchSpace,
    name: str,
    storage: Storage | None = None,
    callbacks: list | None = None,
) -> SweepResult:
    """Run the sweep `name` to the end (or resume it), then write its results and register
    its best trial. Ray must be connected, with the dashboard on (RAY_NOTES: ASHA's early
    stops leak Train placement groups without it)."""
    import ray
    from ray import tune

    from damo.tune.results import write_results

    storage = storage or Storage(cfg.storage.s3)
    uri = sweep_uri(cfg, name)
    paths = [p.path for p in space.parameters]
    stages = trial_stages(paths, cfg)  # fails early on a space that cannot run as configured
    check_room_for_data(cfg, ray.cluster_resources().get("CPU", 0.0))
    storage.ensure_bucket(uri)
    fs, tuner_root = storage.pyarrow_filesystem(uri)
    if parse_uri(uri).scheme == "file":
        from pathlib import Path

        Path(tuner_root).mkdir(parents=True, exist_ok=True)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=cfg, sweep_uri=uri),
        {"cpu": cfg.tune.trial_cpus},
    )
    experiment = f"{tuner_root.rstrip('/')}/{TUNER_DIR}"
    resumed = storage.exists(join(uri, SWEEP_FILE)) and tune.Tuner.can_restore(
        experiment, storage_filesystem=fs
    )
    if resumed:
        from damo.tune.scheduler import use_storage

        use_storage(uri, cfg.storage.s3)  # for the restored scheduler (damo.tune.scheduler)
        record = check_resumable(storage, uri, space, cfg)
        tuner = tune.Tuner.restore(
            experiment,
            trainable,
            resume_unfinished=True,
            resume_errored=True,  # an errored trial gets its retries again
            storage_filesystem=fs,
        )
    else:
        record = {
            "name": name,
            "space_source": space.source,
            "space": space_record(space),
            "config_hash": base_hash(cfg),
            "stages": list(stages),
            "metric": cfg.tune.metric,
            "mode": cfg.tune.mode,
            "scheduler": cfg.tune.scheduler,
            "searcher": cfg.tune.searcher,
            "code_version": code_version(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "config": cfg.model_dump(mode="json"),
        }
        tuner = tune.Tuner(
            trainable,
            param_space=space.param_space(),
            tune_config=tune.TuneConfig(
                metric=cfg.tune.metric,
                mode=cfg.tune.mode,
                scheduler=make_scheduler(cfg, uri, stages),
                search_alg=make_searcher(cfg, space),
                num_samples=1 if space.grid else cfg.tune.num_samples,
                # random/grid search limits itself (make_searcher); Tune limits a Searcher
                max_concurrent_trials=cfg.tune.max_concurrent_trials
                if cfg.tune.searcher == "optuna"
                else None,
            ),
            run_config=tune.RunConfig(
                name=TUNER_DIR,
                storage_path=tuner_root,
                storage_filesystem=fs,
                failure_config=tune.FailureConfig(max_failures=cfg.tune.max_failures),
                callbacks=callbacks,
                verbose=0,  # the caller's callbacks show progress
            ),
        )
    record.update(status="running", resumed_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    storage.write_bytes(join(uri, SWEEP_FILE), json.dumps(record, indent=2).encode())
    # Tune's new console output would draw its own tables around the caller's
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    if has_stage1_rung(cfg, stages):
        # the stage-1 rung's report has no sweep metric, which Tune's driver would refuse
        os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    grid = tuner.fit()
    unfinished = unfinished_trials(grid)
    if unfinished:
        record.update(status="interrupted", unfinished=unfinished)
        storage.write_bytes(join(uri, SWEEP_FILE), json.dumps(record, indent=2).encode())
        raise SweepInterrupted(f"{len(unfinished)} trials unfinished")
    trials, best, files = write_results(cfg, space, name, uri, grid, storage)
    record.update(status="finished", finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    record["best"] = best
    storage.write_bytes(join(uri, SWEEP_FILE), json.dumps(record, indent=2).encode())
    return SweepResult(name, uri, trials, best, files, resumed)

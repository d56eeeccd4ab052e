"""One Tune trial: the training stages that its parameters invalidate, as a pipeline run.

A trial is `damo.train.pipeline.train_pipeline` under <sweep>/trials/<trial id>/, so it has a
manifest, metrics and checkpoints like any run, and a retried or restored trial resumes there
(finished stages are skipped; Ray Train restores the running stage). Each stage is a
`TorchTrainer` named `<trial id>-stageK` (the Train V2 pattern: Tune runs this function, the
function runs the trainers). Only the last stage reports to Tune, once per epoch, through
`EpochReportCallback`.
"""

from __future__ import annotations

from typing import Any

from damo.config import DamoConfig
from damo.config.loader import with_overrides
from damo.storage import join
from damo.train.stages import STAGE_NAMES

CHECKPOINT_KEY = "checkpoint_path"  # where Tune's TuneReportCallback puts a checkpoint's path


class SweepError(ValueError):
    """A sweep that cannot start as configured; the message says what to change."""


def first_stage(path: str, cfg: DamoConfig) -> int:
    """The first stage whose training a change of the config field `path` invalidates.

    The model's architecture and data enter at stage 1; a stage's own recipe
    (`train.stages.stageK.*`, `model.stages.stageK.*`) at stage K; LoRA settings at the first
    stage that trains the adapter. Scaling changes nothing that is learned: the last stage.
    """
    parts = path.split(".")
    if parts[0] in ("train", "model") and len(parts) > 2 and parts[1] == "stages":
        return int(parts[2].removeprefix("stage"))
    if parts[:3] == ["model", "llm", "lora"]:
        training = [k for k in STAGE_NAMES if "lora" in cfg.model.stages.get(k).trainable]
        return min(training, default=cfg.tune.last_stage)
    if parts[:2] == ["train", "scaling"] or parts[0] in ("tune", "serve", "ray", "storage"):
        return cfg.tune.last_stage
    return 1


def trial_stages(paths: list[str], cfg: DamoConfig) -> tuple[int, ...]:
    """The stages every trial trains: from the earliest one a parameter invalidates to
    `tune.last_stage`. Starting after stage 1 needs `tune.init_checkpoint`."""
    last = cfg.tune.last_stage
    first = min([first_stage(p, cfg) for p in paths] + [last])
    if cfg.model.stages.get(last).objective != "lm" and cfg.tune.metric == "val_grounding_miou":
        raise SweepError(
            f"tune.last_stage {last} trains no answers, so it has no grounding mIoU: use a "
            "later stage (3 learns grounding) or tune.metric=val_loss"
        )
    if first > 1 and not cfg.tune.init_checkpoint:
        touched = ", ".join(p for p in paths if first_stage(p, cfg) == first)
        raise SweepError(
            f"the space's parameters ({touched}) first change stage {first}, so trials start "
            f"there: set tune.init_checkpoint to a stage-{first - 1} checkpoint "
            "(e.g. --set tune.init_checkpoint=s3://damo/runs/RUN/ray/RUN-stage2/checkpoint_...)"
        )
    return tuple(range(first, last + 1))


def has_stage1_rung(cfg: DamoConfig, stages: tuple[int, ...]) -> bool:
    """ASHA stops trials at the end of stage 1 too: asked for, and the trials train stage 1
    and at least one stage after it."""
    return (
        cfg.tune.scheduler == "asha"
        and cfg.tune.asha.stage1_rung
        and stages[0] == 1
        and stages[-1] > 1
    )


def trial_config(base: DamoConfig, params: dict[str, Any], sweep_uri: str) -> DamoConfig:
    """The base config with the trial's parameters; its runs go under the sweep, and its last
    stage answers the validation split's grounding records each epoch and keeps the
    checkpoint of the best epoch by the sweep's metric."""
    from damo.tune.space import trial_overrides

    last = f"train.stages.stage{base.tune.last_stage}"
    return with_overrides(
        base,
        [
            *trial_overrides(params),
            f"train.runs_root={join(sweep_uri, 'trials')}",
            f"{last}.val_grounding=true",
            f"{last}.checkpoint_metric={base.tune.metric}",
        ],
    )


def epoch_report_callback(metric: str):
    """Ray Tune's `TuneReportCallback`, forwarding only the epoch ends: the reports with a
    checkpoint and `metric`.

    The training loop also reports step-level training losses (no validation metric: Tune
    refuses results without the metric it optimises) and the validation loss before the first
    step (no checkpoint to keep); ASHA's rungs count validated epochs, so one epoch end is one
    Tune iteration."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class EpochReportCallback(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if checkpoint is not None and metric in metrics[0]:
                super().after_report(run_context, metrics, checkpoint)

    return EpochReportCallback()


def report_finished_stage(cfg: DamoConfig, trial_id: str, stage: int) -> bool:
    """Report a finished last stage's epochs to Tune again, from Ray Train's record of them.

    A driver killed after a trial finished but before Tune saved that restarts the trial; its
    run skips the finished stages and would report nothing, leaving the trial without its
    metrics. False when the stage has not finished."""
    import ray.tune
    from ray.train import Result

    from damo.storage import Storage
    from damo.train.pipeline import read_manifest, run_uri

    storage = Storage(cfg.storage.s3)
    run = run_uri(cfg, trial_id)
    manifest = read_manifest(storage, run) or {"stages": {}}
    if manifest["stages"].get(str(stage), {}).get("status") != "finished":
        return False
    fs, path = storage.pyarrow_filesystem(join(run, "ray", f"{trial_id}-stage{stage}"))
    result = Result.from_path(path, storage_filesystem=fs)
    epochs = [(c, m) for c, m in result.best_checkpoints if cfg.tune.metric in m]
    for checkpoint, metrics in sorted(epochs, key=lambda pair: pair[1]["step"]):
        ray.tune.report({**metrics, CHECKPOINT_KEY: checkpoint.path})
    return True


def run_trial(params: dict[str, Any], base: DamoConfig, sweep_uri: str) -> None:
    """The Tune trainable (a function): train this trial's stages, reporting the last."""
    import ray.tune

    from damo.train.pipeline import train_pipeline

    trial_id = ray.tune.get_context().get_trial_id()
    cfg = trial_config(base, params, sweep_uri)
    stages = trial_stages(list(params), cfg)
    after_stage = {1: report_stage1} if has_stage1_rung(cfg, stages) else None
    init = cfg.tune.init_checkpoint if stages[0] > 1 else None
    if report_finished_stage(cfg, trial_id, stages[-1]):
        print(f"trial {trial_id}: already trained; its epochs were reported again", flush=True)
        return
    print(f"trial {trial_id}: stages {stages} with {params}", flush=True)
    train_pipeline(
        cfg,
        trial_id,
        stages,
        init,
        callbacks={stages[-1]: [epoch_report_callback(cfg.tune.metric)]},
        stopping=tune_is_stopping_this_trial,
        after_stage=after_stage,
    )


def report_stage1(entry: dict) -> None:
    """The stage-1 rung's report (damo.tune.scheduler): the loss of the stage-1 checkpoint
    that stage 2 starts from. Tune holds the trial here until its scheduler has decided; a
    trial it stops ends before stage 2 starts. Sent again when a restarted trial skips its
    finished stage 1, where the rung already has it and lets the trial go on."""
    import ray.tune

    from damo.tune.scheduler import STAGE1_KEY

    ray.tune.report({STAGE1_KEY: entry["metrics"]["best_val_loss"], "stage": 1})


def tune_is_stopping_this_trial() -> bool:
    """Tune stops a trial by removing its placement group. The trainer's controller lives in
    that group and dies first, so the stage sees an `ActorDiedError` while the trial actor
    is still alive: that error is the stop's teardown, not a failure of the stage."""
    from ray.train._internal.session import get_session
    from ray.util import get_current_placement_group, placement_group_table

    session = get_session()
    if session is not None and session.stop_event.is_set():  # a stop through Tune's API
        return True
    group = get_current_placement_group()
    return group is not None and placement_group_table(group).get("state") == "REMOVED"

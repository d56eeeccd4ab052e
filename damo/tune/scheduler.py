"""ASHA that keeps its rungs when a sweep is resumed, with an optional stage-1 rung.

Tune pickles the scheduler with the Tuner when a sweep starts, and `Tuner.restore` brings back
that pickled copy: empty, because the rungs are not part of the experiment state. A resumed
sweep then has nothing to compare its remaining trials with, and lets them all finish. This
scheduler refills a restored trial's rungs from the trial's own epoch record (the metrics JSONL
of its last stage, written as it trained) when Tune adds the trial back.

The stage-1 rung (`tune.asha.stage1_rung`) is a cheaper proxy for the first rung of a sweep
whose trials train from stage 1: each trial reports its stage-1 validation loss once, when
stage 1 ends (`STAGE1_KEY`), and a trial behind the best 1/rf of those seen so far stops there,
before it pays for stages 2 to the last. The loss is the alignment the Fuseformer and the
compression are trained for, so it ranks a Fuseformer change before any answer is generated.
That report carries no sweep metric, so the searcher must skip it (`MetricRowsOnlyOptuna`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.schedulers.async_hyperband import _Bracket
from ray.tune.search.optuna import OptunaSearch

from damo.config.schema import S3Config
from damo.storage import Storage, join

# This driver's S3 settings per sweep URI. The scheduler travels inside the Tuner's pickle in
# object storage, so it names its sweep and never holds credentials; `run_sweep` registers
# them here before Tune starts.
_DRIVER_S3: dict[str, S3Config] = {}

STAGE1_KEY = "stage1_val_loss"  # the stage-1 rung's report: the kept stage-1 checkpoint's loss


def use_storage(sweep_uri: str, s3: S3Config) -> None:
    _DRIVER_S3[sweep_uri] = s3


def _driver_storage(sweep_uri: str) -> Storage:
    if sweep_uri not in _DRIVER_S3:
        raise RuntimeError(f"no storage registered for sweep {sweep_uri}: use_storage")
    return Storage(_DRIVER_S3[sweep_uri])


@dataclass(frozen=True)
class EpochHistory:
    """A trial's validated epochs of the sweep's last stage, as (epoch, metric) in order;
    empty for a trial that has not trained its last stage yet, as for every new trial."""

    sweep_uri: str
    stage: int
    metric: str

    def __call__(self, trial_id: str) -> list[tuple[int, float]]:
        storage = _driver_storage(self.sweep_uri)
        uri = join(self.sweep_uri, "trials", trial_id, "metrics", f"stage{self.stage}.jsonl")
        if not storage.exists(uri):
            return []
        by_epoch = {}  # a stage resumed from a checkpoint logs its later epochs again: keep last
        for line in storage.read_bytes(uri).decode().splitlines():
            row = json.loads(line) if line.strip() else {}
            if row.get("epoch", 0) >= 1 and row.get(self.metric) is not None:
                by_epoch[row["epoch"]] = float(row[self.metric])
        return sorted(by_epoch.items())


@dataclass(frozen=True)
class Stage1Record:
    """A trial's stage-1 validation loss, from its run's manifest once stage 1 has finished
    (the loss of the checkpoint that stage 2 starts from); None before that."""

    sweep_uri: str

    def __call__(self, trial_id: str) -> float | None:
        storage = _driver_storage(self.sweep_uri)
        uri = join(self.sweep_uri, "trials", trial_id, "manifest.json")
        if not storage.exists(uri):
            return None
        stage1 = json.loads(storage.read_bytes(uri))["stages"].get("1", {})
        if stage1.get("status") != "finished":
            return None
        return float(stage1["metrics"]["best_val_loss"])


class ResumableASHA(ASHAScheduler):
    """`ASHAScheduler` whose rungs survive `Tuner.restore` (module docstring).

    Rung times are the last stage's validated epochs (`time_attr="epoch"`, the epoch each
    report carries), so epoch k of the record is rung time k; the stage-1 report, when there
    is one, is not an epoch and goes to its own rung."""

    def __init__(
        self,
        *,
        epoch_history: EpochHistory,
        stage1_record: Stage1Record | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.epoch_history = epoch_history
        self.stage1_record = stage1_record
        # one rung at "time 1", lower loss better (its own sign, whatever the sweep's mode);
        # a trial already recorded there (a re-report after a restore) continues
        self._stage1_rung = (
            _Bracket(1, 1, kwargs.get("reduction_factor", 4), 0, stop_last_trials=False)
            if stage1_record is not None
            else None
        )

    def on_trial_add(self, tune_controller, trial) -> None:
        super().on_trial_add(tune_controller, trial)
        bracket = self._trial_info[trial.trial_id]
        for epoch, value in self.epoch_history(trial.trial_id):
            # records the value at the rung this epoch reaches, exactly as a live report
            # would; the action it returns was taken (or not needed) before the restore
            bracket.on_result(trial, epoch, self._metric_op * value)
        if self._stage1_rung is not None:
            loss = self.stage1_record(trial.trial_id)
            if loss is not None:
                self._stage1_rung.on_result(trial, 1, -loss)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if self._stage1_rung is not None and STAGE1_KEY in result:
            action = self._stage1_rung.on_result(trial, 1, -float(result[STAGE1_KEY]))
            if action == TrialScheduler.STOP:
                self._num_stopped += 1
            return action
        return super().on_trial_result(tune_controller, trial, result)

    def stage1_results(self) -> dict[str, float]:
        """The stage-1 rung's recorded losses, by trial."""
        if self._stage1_rung is None:
            return {}
        return {t: -v for t, v in self._stage1_rung._rungs[0][1].items()}  # noqa: SLF001

    def rung_results(self) -> dict[int, dict[str, float]]:
        """Each rung's recorded results, by milestone (in the metric's own sign)."""
        rungs: dict[int, dict[str, float]] = {}
        for bracket in self._brackets:
            for milestone, recorded in bracket._rungs:  # noqa: SLF001
                rungs.setdefault(int(milestone), {}).update(
                    {t: self._metric_op * v for t, v in recorded.items()}
                )
        return rungs


class MetricRowsOnlyOptuna(OptunaSearch):
    """Optuna (TPE) that skips the reports without the sweep's metric: the stage-1 rung's.
    A trial stopped there ends without the metric, which Optuna records as pruned."""

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if self.metric in result:
            super().on_trial_result(trial_id, result)

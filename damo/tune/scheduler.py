"""ASHA that keeps its rungs when a sweep is resumed.

Tune pickles the scheduler with the Tuner when a sweep starts, and `Tuner.restore` brings back
that pickled copy: empty, because the rungs are not part of the experiment state. A resumed
sweep then has nothing to compare its remaining trials with, and lets them all finish. This
scheduler refills a restored trial's rungs from the trial's own epoch record (the metrics JSONL
of its last stage, written as it trained) when Tune adds the trial back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ray.tune.schedulers import ASHAScheduler

from damo.config.schema import S3Config
from damo.storage import Storage, join

# This driver's S3 settings per sweep URI. The scheduler travels inside the Tuner's pickle in
# object storage, so it names its sweep and never holds credentials; `run_sweep` registers
# them here before Tune starts.
_DRIVER_S3: dict[str, S3Config] = {}


def use_storage(sweep_uri: str, s3: S3Config) -> None:
    _DRIVER_S3[sweep_uri] = s3


@dataclass(frozen=True)
class EpochHistory:
    """A trial's validated epochs of the sweep's last stage, as (epoch, metric) in order;
    empty for a trial that has not trained its last stage yet, as for every new trial."""

    sweep_uri: str
    stage: int
    metric: str

    def __call__(self, trial_id: str) -> list[tuple[int, float]]:
        if self.sweep_uri not in _DRIVER_S3:
            raise RuntimeError(f"no storage registered for sweep {self.sweep_uri}: use_storage")
        storage = Storage(_DRIVER_S3[self.sweep_uri])
        uri = join(self.sweep_uri, "trials", trial_id, "metrics", f"stage{self.stage}.jsonl")
        if not storage.exists(uri):
            return []
        by_epoch = {}  # a stage resumed from a checkpoint logs its later epochs again: keep last
        for line in storage.read_bytes(uri).decode().splitlines():
            row = json.loads(line) if line.strip() else {}
            if row.get("epoch", 0) >= 1 and row.get(self.metric) is not None:
                by_epoch[row["epoch"]] = float(row[self.metric])
        return sorted(by_epoch.items())


class ResumableASHA(ASHAScheduler):
    """`ASHAScheduler` whose rungs survive `Tuner.restore` (module docstring).

    Rung iterations are validated epochs (one Tune report per epoch), so epoch k of the
    record is iteration k."""

    def __init__(self, *, epoch_history: EpochHistory, **kwargs):
        super().__init__(**kwargs)
        self.epoch_history = epoch_history

    def on_trial_add(self, tune_controller, trial) -> None:
        super().on_trial_add(tune_controller, trial)
        bracket = self._trial_info[trial.trial_id]
        for epoch, value in self.epoch_history(trial.trial_id):
            # records the value at the rung this epoch reaches, exactly as a live report
            # would; the action it returns was taken (or not needed) before the restore
            bracket.on_result(trial, epoch, self._metric_op * value)

    def rung_results(self) -> dict[int, dict[str, float]]:
        """Each rung's recorded results, by milestone (in the metric's own sign)."""
        rungs: dict[int, dict[str, float]] = {}
        for bracket in self._brackets:
            for milestone, recorded in bracket._rungs:  # noqa: SLF001
                rungs.setdefault(int(milestone), {}).update(
                    {t: self._metric_op * v for t, v in recorded.items()}
                )
        return rungs

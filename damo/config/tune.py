"""The `tune:` section: a Ray Tune sweep over config fields (damo/tune, `damo tune`).

The search space itself lives in `tune_spaces/*.yaml` (damo.tune.space); this section says how
trials run: which stages, the metric ASHA compares, the scheduler and searcher, concurrency,
resources, and where sweep state and the `best` registry go in object storage.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from damo.config.schema import Section


class AshaConfig(Section):
    """ASHA's rungs count validation epochs of the trial's last stage (one Tune report each),
    with an optional first rung at the end of stage 1."""

    grace_period: int = Field(default=1, ge=1, description="Epochs before a trial can stop.")
    reduction_factor: float = Field(
        default=3.0, gt=1, description="Keep the best 1/rf at each rung (Hyperband's eta)."
    )
    stage1_rung: bool = Field(
        default=True,
        description="For trials that train from stage 1: a first rung at the end of stage 1, on "
        "its validation loss (the contrastive alignment the Fuseformer is trained for), so that "
        "trials behind the best 1/rf there stop before paying for stages 2 to the last "
        "(benchmarks/README.md section 8). No effect on trials that start later.",
    )


class TuneConfig(Section):
    sweeps_root: str = Field(
        default="s3://damo/sweeps",
        description="Sweep state, trial runs and results: <sweeps_root>/<name>/.",
    )
    registry: str = Field(
        default="s3://damo/registry",
        description="Where `best` entries go: <registry>/best.json (latest sweep) and "
        "<registry>/sweeps/<name>.json.",
    )
    metric: str = Field(
        default="val_grounding_miou",
        description="Reported at each epoch end of the last stage: val_grounding_miou (mIoU of "
        "greedy answers on the validation split's grounding records, %) or val_loss.",
    )
    mode: Literal["max", "min"] = "max"
    last_stage: int = Field(default=3, ge=1, le=4, description="Trials train up to this stage.")
    init_checkpoint: str | None = Field(
        default=None,
        description="Checkpoint the trials start from when no parameter touches stage 1 (e.g. "
        "a stage-2 checkpoint for a space over stage-3 learning rates).",
    )
    scheduler: Literal["asha", "fifo"] = "asha"
    asha: AshaConfig = AshaConfig()
    searcher: Literal["random", "optuna"] = Field(
        default="random",
        description="random (grid when the space says grid: true) or optuna (TPE).",
    )
    num_samples: int = Field(default=8, ge=1, description="Trials to sample (grids: repeats).")
    max_concurrent_trials: int = Field(default=1, ge=1)
    trial_cpus: float = Field(
        default=1.0,
        gt=0,
        description="CPUs of each trial's driver actor, on top of its Ray Train workers "
        "(train.scaling); on a 2-CPU machine leave room for Ray Data.",
    )
    max_failures: int = Field(
        default=1, ge=0, description="Retries of a failed trial; then it is recorded as failed."
    )
    seed: int = 0

    @model_validator(mode="after")
    def _metric_mode(self) -> TuneConfig:
        expected = {"val_grounding_miou": "max", "val_loss": "min"}
        if self.metric not in expected:
            raise ValueError(
                f"tune.metric must be one of {', '.join(expected)}, got {self.metric!r}"
            )
        if self.mode != expected[self.metric]:
            raise ValueError(
                f"tune.metric {self.metric} is maximised/minimised: mode must be "
                f"{expected[self.metric]!r}"
            )
        return self

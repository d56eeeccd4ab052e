"""Config sections for training: the data a run reads, each stage's recipe, and scaling.

What a stage *trains* (objective, trainable components) lives in `model.stages`; how it is
trained (tasks, optimiser, schedule, epochs, batch) lives here. `damo.train.stages` joins them
into one `StageSpec` per stage.
"""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import Field, model_validator

from damo.config.model import Component
from damo.config.schema import Section

Task = Literal["caption", "qa", "grounding", "temporal_qa", "dialogue"]
AlignmentLoss = Literal["vtc", "vtm", "vtg"]
ALIGNMENT_LOSSES: tuple[AlignmentLoss, ...] = get_args(AlignmentLoss)  # stage 1's losses


class OptimizerConfig(Section):
    """AdamW; the paper uses lr 1e-4 and weight decay 0.02 in every stage."""

    lr: float = Field(default=1e-4, gt=0)
    weight_decay: float = Field(default=0.02, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = Field(default=1.0, gt=0, description="Max grad norm; None: off.")
    lr_scale: dict[Component, float] = Field(
        default_factory=dict,
        description="Per-component multiplier of lr, e.g. {fuseformer: 0.1}; unlisted: 1.",
    )


class ScheduleConfig(Section):
    """Linear warm-up, then cosine decay to `min_lr_ratio` x lr."""

    warmup_ratio: float = Field(default=0.05, ge=0, lt=1)
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)


class AnchorConfig(Section):
    """Stage 1's alignment losses (VTC + VTM + VTG on a caption batch, or those in `losses`)
    added to an LM stage's loss, so that a pathway trained on the LM loss keeps telling videos
    apart: without it the tiny preset's Fuseformer learned one soft prompt for every video
    (benchmarks/README.md, section 5). The stage-1 heads train with it; a head whose loss is
    not listed gets no gradient and stays as stage 1 left it."""

    weight: float = Field(default=0.0, ge=0, description="0: off.")
    every: int = Field(
        default=1,
        ge=1,
        description="Anchor one optimiser step in this many (each costs a stage-1 forward and "
        "backward).",
    )
    batch_size: int = Field(default=16, ge=2, description="Captions per anchor batch, per worker.")
    losses: list[AlignmentLoss] = Field(
        default=list(ALIGNMENT_LOSSES),
        min_length=1,
        description="Which stage-1 losses anchor (each at its model.heads weight). VTG, the "
        "captioning head, is about 90% of an anchor step's cost on the tiny preset unless "
        "model.heads.vtg_vocabulary is 'batch'.",
    )

    @model_validator(mode="after")
    def _distinct_losses(self) -> AnchorConfig:
        if len(set(self.losses)) != len(self.losses):
            raise ValueError(f"anchor.losses lists a loss twice: {self.losses}")
        return self


class StageTrainConfig(Section):
    tasks: list[Task]
    epochs: int = Field(default=1, ge=1)
    batch_size: int = Field(default=8, ge=1, description="Per worker.")
    grad_accum: int = Field(default=1, ge=1, description="Micro-batches per optimiser step.")
    max_steps: int | None = Field(
        default=None, ge=1, description="Stop after this many optimiser steps (None: epochs)."
    )
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    anchor: AnchorConfig = AnchorConfig()
    log_every: int = Field(default=10, ge=1, description="Optimiser steps between log lines.")
    checkpoint_every: int | None = Field(
        default=None, ge=1, description="Optimiser steps between checkpoints (and epoch ends)."
    )
    task_repeats: dict[Task, int] = Field(
        default_factory=dict,
        description="How many times each record of a task is read per epoch of the train split "
        "(a data mixture, e.g. {grounding: 2}); unlisted tasks: 1. Validation reads each record "
        "once.",
    )
    val_grounding: bool = Field(
        default=False,
        description="At each epoch end also answer the validation split's grounding records "
        "(greedy) and report val_grounding_miou (%); LM stages only. Tune turns it on.",
    )
    checkpoint_metric: Literal["val_loss", "val_grounding_miou"] = Field(
        default="val_loss",
        description="Which epoch's checkpoint the stage keeps as its result: the lowest "
        "val_loss or the highest val_grounding_miou (needs val_grounding).",
    )

    @model_validator(mode="after")
    def _repeats_name_trained_tasks(self) -> StageTrainConfig:
        untrained = sorted(set(self.task_repeats) - set(self.tasks))
        if untrained:
            raise ValueError(f"task_repeats names tasks this stage does not train: {untrained}")
        low = {task: n for task, n in self.task_repeats.items() if n < 1}
        if low:
            raise ValueError(f"task_repeats must be at least 1: {low}")
        return self

    @model_validator(mode="after")
    def _metric_is_measured(self) -> StageTrainConfig:
        if self.checkpoint_metric == "val_grounding_miou" and not self.val_grounding:
            raise ValueError("checkpoint_metric val_grounding_miou needs val_grounding: true")
        return self


# Paper (DESIGN §4): epochs 4 / ? / 2 / 2, batch 40 / 8 / 8 / 8.
class Stage1TrainConfig(StageTrainConfig):
    tasks: list[Task] = ["caption"]
    epochs: int = Field(default=4, ge=1)
    batch_size: int = Field(default=40, ge=1)


class Stage2TrainConfig(StageTrainConfig):
    tasks: list[Task] = ["caption", "qa"]
    epochs: int = Field(default=1, ge=1, description="(default) the paper does not say.")


class Stage3TrainConfig(StageTrainConfig):
    tasks: list[Task] = ["grounding", "temporal_qa", "qa"]
    epochs: int = Field(default=2, ge=1)


class Stage4TrainConfig(StageTrainConfig):
    # Dialogues with grounding and QA mixed back in, as the paper's stage 4 mixes instruction
    # data: on dialogue alone the learning bar's grounding lost points (benchmarks/README.md).
    tasks: list[Task] = ["dialogue", "grounding", "qa"]
    epochs: int = Field(default=2, ge=1)


class StagesTrainConfig(Section):
    stage1: Stage1TrainConfig = Stage1TrainConfig()
    stage2: Stage2TrainConfig = Stage2TrainConfig()
    stage3: Stage3TrainConfig = Stage3TrainConfig()
    stage4: Stage4TrainConfig = Stage4TrainConfig()

    def get(self, stage: int) -> StageTrainConfig:
        if stage not in (1, 2, 3, 4):
            raise ValueError(f"stage must be 1, 2, 3 or 4, got {stage!r}")
        return getattr(self, f"stage{stage}")


class ScalingConfig(Section):
    """Ray Train's ScalingConfig. On a 2-CPU machine give 2 workers 0.5 CPU each, or Ray
    Data ingest starves (RAY_NOTES)."""

    num_workers: int = Field(default=1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(default=1.0, gt=0)
    gpus_per_worker: float = Field(default=1.0, ge=0, description="Used when use_gpu.")
    max_failures: int = Field(default=2, ge=0, description="Worker-group restarts per stage.")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        default="PACK",
        description="How workers are placed on nodes; STRICT_SPREAD puts each on its own node.",
    )


class TrainDataConfig(Section):
    features: str = Field(default="s3://damo/features", description="`damo extract` output.")
    records: str = Field(
        default="s3://damo/world/records", description="Prefix holding <split>.parquet records."
    )
    train_split: str = "train"
    val_split: str = "val"


class TrainConfig(Section):
    runs_root: str = Field(default="s3://damo/runs", description="Manifests, checkpoints, logs.")
    data: TrainDataConfig = TrainDataConfig()
    stages: StagesTrainConfig = StagesTrainConfig()
    scaling: ScalingConfig = ScalingConfig()
    shuffle: bool = Field(
        default=True,
        description="Shuffle the training rows globally each epoch (seeded: seed + epoch).",
    )
    shuffle_buffer: int = Field(
        default=0, ge=0, description="An extra local shuffle buffer in rows; 0: off."
    )
    record_ids: bool = Field(
        default=False,
        description="Debug: each rank writes the record ids it trains on to "
        "<run>/record_ids/stageK/rankR-attemptA.jsonl.",
    )

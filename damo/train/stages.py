"""One declarative spec per stage, resolved from the config (DESIGN §4).

stage  name                     objective                  trainable (default)
1      video-text alignment     VTC + VTM + VTG            residual, temporal, Fuseformer, bridge
2      representation bridging  LM loss, frozen LLM        bridge (+ Fuseformer)
3      temporal perception      LM loss, grounded QA       bridge, Fuseformer, LoRA
4      dialogue tuning          LM loss, dialogues         bridge, LoRA
"""

from __future__ import annotations

from dataclasses import dataclass, field

from damo.config import DamoConfig
from damo.config.train import AnchorConfig, OptimizerConfig, ScheduleConfig

STAGE_NAMES = {
    1: "video-text alignment",
    2: "representation bridging",
    3: "temporal perception",
    4: "dialogue tuning",
}


@dataclass(frozen=True)
class StageSpec:
    stage: int
    name: str
    objective: str  # "alignment" or "lm"
    tasks: tuple[str, ...]
    task_repeats: dict[str, int]  # train-split reads per epoch of each task's records
    loss_weights: dict[str, float]
    trainable: tuple[str, ...]
    optimizer: OptimizerConfig
    schedule: ScheduleConfig
    epochs: int
    batch_size: int
    grad_accum: int
    max_steps: int | None
    log_every: int
    checkpoint_every: int | None
    val_grounding: bool = False
    checkpoint_metric: str = "val_loss"
    anchor: AnchorConfig = field(default_factory=AnchorConfig)

    @property
    def anchored(self) -> bool:
        return self.anchor.weight > 0


def stage_spec(cfg: DamoConfig, stage: int) -> StageSpec:
    model_stage = cfg.model.stages.get(stage)
    recipe = cfg.train.stages.get(stage)
    if recipe.val_grounding and model_stage.objective != "lm":
        raise ValueError(
            f"train.stages.stage{stage}.val_grounding needs an LM stage: stage {stage}'s "
            f"objective is {model_stage.objective} (no answers to score)"
        )
    if recipe.anchor.weight > 0 and model_stage.objective != "lm":
        raise ValueError(
            f"train.stages.stage{stage}.anchor needs an LM stage: stage {stage}'s objective is "
            f"{model_stage.objective} (its loss is the anchor already)"
        )
    heads = cfg.model.heads
    weights = (
        {"vtc": heads.vtc_weight, "vtm": heads.vtm_weight, "vtg": heads.vtg_weight}
        if model_stage.objective == "alignment"
        else {"lm": 1.0}
    )
    return StageSpec(
        stage=stage,
        name=STAGE_NAMES[stage],
        objective=model_stage.objective,
        tasks=tuple(recipe.tasks),
        task_repeats=dict(recipe.task_repeats),
        loss_weights=weights,
        trainable=tuple(model_stage.trainable),
        optimizer=recipe.optimizer,
        schedule=recipe.schedule,
        epochs=recipe.epochs,
        batch_size=recipe.batch_size,
        grad_accum=recipe.grad_accum,
        max_steps=recipe.max_steps,
        log_every=recipe.log_every,
        checkpoint_every=recipe.checkpoint_every,
        val_grounding=recipe.val_grounding,
        checkpoint_metric=recipe.checkpoint_metric,
        anchor=recipe.anchor,
    )

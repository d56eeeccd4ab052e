"""The `pipeline:` section: what `damo pipeline` (and `jobs/pipeline.py`) runs, so that a
dataset's config says how its pipeline goes and a job's command line stays short. Each option
of `damo pipeline` overrides one of these fields."""

from __future__ import annotations

from pydantic import Field, field_validator

from damo.config.schema import Section


class PipelineConfig(Section):
    tiny_backbones: bool = Field(
        default=False, description="Build the tiny backbones where model.*.path point, if absent."
    )
    lm_steps: int = Field(default=300, ge=0, description="The tiny LLM's pre-training steps.")
    synthetic_world: str | None = Field(
        default=None,
        description="Make a synthetic world here first (train.data.records must be "
        "<synthetic_world>/records).",
    )
    clips: int | None = Field(
        default=None, ge=1, description="The synthetic world's clips (default data.synthetic)."
    )
    videos: str | None = Field(
        default=None,
        description="Extract every object under this prefix (default: the synthetic world's "
        "videos; neither: no extraction step).",
    )
    stages: list[int] = Field(
        default=[1, 2, 3, 4], description="Stages to train, in order ([] for none)."
    )
    init_checkpoint: str | None = Field(
        default=None, description="The checkpoint the first stage starts from."
    )
    space: str | None = Field(
        default=None, description="A search space YAML: run a sweep after training."
    )
    evaluate_split: str | None = Field(
        default="test", description="Evaluate the best checkpoint on this split (null: don't)."
    )
    deploy: bool = Field(default=False, description="Deploy the best checkpoint with Ray Serve.")

    @field_validator("stages")
    @classmethod
    def _known_stages(cls, stages: list[int]) -> list[int]:
        if not set(stages) <= {1, 2, 3, 4}:
            raise ValueError(f"stages must be among 1, 2, 3, 4; got {stages}")
        return sorted(set(stages))

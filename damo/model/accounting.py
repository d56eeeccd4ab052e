"""Token and parameter accounting for a preset, computed from the config alone.

Parameters are counted on a model built on the meta device: no weights, no downloads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from damo.config.model import Component, ModelConfig
from damo.model.backbones import FrozenEncoders, vision_geometry
from damo.model.video import patch_grid


@dataclass(frozen=True)
class TokenStep:
    name: str
    visual: int
    audio: int

    @property
    def total(self) -> int:
        return self.visual + self.audio


def conv_length(steps: int, kernel: int, stride: int) -> int:
    """Frames after the temporal conv (padding kernel // 2)."""
    return (steps + 2 * (kernel // 2) - kernel) // stride + 1


def token_steps(cfg: ModelConfig) -> list[TokenStep]:
    """Tokens per video at each step from the encoders to the LLM's soft prompt."""
    _, patches = vision_geometry(cfg.vision)
    audio_tokens = cfg.audio.tokens_per_segment
    rows, cols = cfg.residual.visual_pool_grid(*patch_grid(patches))
    visual_slots = rows * cols
    audio_slots = max(1, audio_tokens // cfg.residual.audio_compression)
    frames_after_conv = conv_length(cfg.frames, cfg.temporal.kernel, cfg.temporal.stride)
    fuse = cfg.fuseformer
    return [
        TokenStep(
            "encoders: frames x (CLS + patches), segments x tokens",
            cfg.frames * (1 + patches),
            cfg.audio_segments * audio_tokens,
        ),
        TokenStep(
            "global residual: frames x L', segments x L'",
            cfg.frames * visual_slots,
            cfg.audio_segments * audio_slots,
        ),
        TokenStep(
            "temporal pathway (conv stride)",
            frames_after_conv * visual_slots,
            cfg.audio_segments * audio_slots,
        ),
        TokenStep("T-Fuseformer queries (per layer)", fuse.visual_queries, fuse.audio_queries),
        TokenStep("T-Fuseformer fusion tokens", fuse.fusion_tokens, 0),
        TokenStep("bridge: soft prompt (LLM input tokens)", cfg.bridge.queries, 0),
    ]


def naive_visual_tokens(cfg: ModelConfig) -> int:
    """Tokens if every patch of every frame went to the LLM, as per-patch concatenation would."""
    _, patches = vision_geometry(cfg.vision)
    return cfg.frames * patches


def compression_ratio(cfg: ModelConfig) -> float:
    """Naive per-patch tokens / soft prompt tokens."""
    return naive_visual_tokens(cfg) / cfg.bridge.queries


def count(params) -> int:
    return sum(p.numel() for p in params)


def parameter_counts(cfg: ModelConfig) -> dict[str, dict[str, int]]:
    """{"frozen": per backbone, "components": per trainable component, "stages": per stage}."""
    from damo.model.damo import DamoModel

    model = DamoModel.from_config(cfg, pretrained=False, device="meta")
    with torch.device("meta"):
        encoders = FrozenEncoders.from_config(cfg, pretrained=False)
    lora = model.component_parameters("lora")
    llm_base = count(p for n, p in model.llm.named_parameters() if f"llm.{n}" not in lora)
    components: list[Component] = ["residual", "temporal", "fuseformer", "bridge", "heads", "lora"]
    return {
        "frozen": {
            "vision": count(encoders.vision.parameters()),
            "audio": count(encoders.audio.parameters()),
            "text_encoder": count(model.text_encoder.parameters()),
            "llm": llm_base,
        },
        "components": {c: count(model.component_parameters(c).values()) for c in components},
        "stages": {
            f"stage{stage}": count(model.trainable_parameters(stage)) for stage in (1, 2, 3, 4)
        },
    }

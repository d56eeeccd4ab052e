"""Model configuration: one section per component of DaMO (DESIGN §3) and the stage table (§4).

The defaults are the `paper` preset. Values the paper states are marked (paper); the rest are
our choices where it is silent (default). Backbones are named by `path` (a local directory, a
`file://` or `s3://` URI, or a hub name) and described by `arch`, the HF config fields that let
the same classes be built on the meta device without downloading anything (parameter counts,
shape checks) or at random for the tiny backbones.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, field_validator

from damo.config.schema import Section

Component = Literal["residual", "temporal", "fuseformer", "bridge", "heads", "lora"]


class BackboneConfig(Section):
    path: str = Field(
        description="Where the platform loads the weights from: a local dir, a file:// or s3:// "
        "URI (the backbone layout, <root>/vision, <root>/llm, ...), or a hub name."
    )
    model_type: str = Field(description="HF model type, for building from `arch` alone.")
    arch: dict[str, Any] = Field(
        default_factory=dict, description="HF config fields used when building without weights."
    )
    hub_id: str | None = Field(
        default=None,
        description="The hub repository the weights come from; named, with the `hf download` "
        "command that fetches it, when `path` holds no weights.",
    )


# (paper) EVA-CLIP ViT-L/14, i.e. EVA02-CLIP-L/14 (the EVA-CLIP family's only ViT-L/14), at
# 224 px: 256 patches + CLS. Its image tower is timm's `eva02_large_patch14_clip_224` (the CLIP
# text tower is not needed). `library: transformers` with `model_type: clip_vision_model` and
# CLIP's arch fields selects the HF stand-in, OpenAI CLIP ViT-L/14, instead.
class VisionEncoderConfig(BackboneConfig):
    path: str = "s3://damo/backbones/paper/vision"
    library: Literal["timm", "transformers"] = Field(
        default="timm",
        description="timm: `model_type` is a timm architecture and `arch` its create_model "
        "arguments; transformers: an HF vision model type and config fields.",
    )
    model_type: str = "eva02_large_patch14_clip_224"
    arch: dict[str, Any] = Field(
        default_factory=lambda: {
            "img_size": 224,
            "patch_size": 14,
            "embed_dim": 1024,
            "depth": 24,
            "num_heads": 16,
        }
    )
    hub_id: str | None = "timm/eva02_large_patch14_clip_224.merged2b"
    feature_layer: int = Field(
        default=-1,
        description="(default) whose output the features are, counted as HF's hidden_states: "
        "-1 the last layer, -2 the penultimate (LLaVA's choice), k > 0 the k-th layer.",
    )

    @field_validator("feature_layer")
    @classmethod
    def _not_the_embeddings(cls, value: int) -> int:
        if value == 0:
            raise ValueError("feature_layer 0 is the patch embeddings, not a layer's output")
        return value


# (paper) whisper-small; only its encoder is used.
class AudioEncoderConfig(BackboneConfig):
    path: str = "s3://damo/backbones/paper/audio"
    model_type: str = "whisper"
    hub_id: str | None = "openai/whisper-small"
    arch: dict[str, Any] = Field(
        default_factory=lambda: {
            "d_model": 768,
            "encoder_layers": 12,
            "encoder_attention_heads": 12,
            "encoder_ffn_dim": 3072,
            "decoder_layers": 12,
            "decoder_attention_heads": 12,
            "decoder_ffn_dim": 3072,
            "num_mel_bins": 80,
            "max_source_positions": 1500,
            "vocab_size": 51865,
        }
    )
    segment_seconds: float = Field(
        default=30.0,
        gt=0,
        description="(paper) the most audio a segment keeps, centred on its timestamp: the "
        "segments split the video evenly, each keeping min(its length, this); 30 s is "
        "Whisper's window. Extraction and the encoder's kept tokens both follow it.",
    )
    sample_rate: int = 16000

    @property
    def tokens_per_second(self) -> int:
        return 50  # Whisper: 100 mel frames per second, halved by the stride-2 conv

    @property
    def window_frames(self) -> int:
        """Mel frames the encoder requires: 2 x max_source_positions (3000 = 30 s)."""
        return 2 * int(self.arch.get("max_source_positions", 1500))

    @property
    def tokens_per_segment(self) -> int:
        """Encoder tokens kept per segment: the ones that cover real audio, not padding."""
        limit = int(self.arch.get("max_source_positions", 1500))
        return max(1, min(limit, round(self.segment_seconds * self.tokens_per_second)))


# (paper) a BERT-style text encoder for VTC/VTM; offline stand-in: the packaged MiniLM.
class TextEncoderConfig(BackboneConfig):
    path: str = "s3://damo/backbones/paper/text_encoder"
    model_type: str = "bert"
    hub_id: str | None = "google-bert/bert-base-uncased"
    arch: dict[str, Any] = Field(
        default_factory=lambda: {
            "hidden_size": 768,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "intermediate_size": 3072,
            "vocab_size": 30522,
        }
    )
    max_length: int = Field(
        default=64, ge=4, description="Caption tokens kept (a warning says when one is cut)."
    )
    cache_size: int = Field(
        default=0,
        ge=0,
        description="Captions whose frozen encoder outputs are kept for reuse across epochs "
        "(least recently used go first); 0: no cache.",
    )


class LoraConfig(Section):
    r: int = Field(default=32, ge=1, description="(paper)")
    alpha: int = Field(default=64, ge=1, description="(paper)")
    dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )


# (paper) the Mistral-7B language model of LLaVA-v1.6 (LLaVA-v1.6-Mistral-7B, itself tuned from
# Mistral-7B-Instruct-v0.2). The hub holds it only inside the LlavaNext checkpoint
# (`llava-hf/llava-v1.6-mistral-7b-hf`); `damo backbones prepare --llava` extracts it into
# <root>/llm as a standard causal-LM directory. Its vocabulary is Mistral's 32000 tokens plus
# LLaVA's `<image>` and padding: 32064.
class LLMConfig(BackboneConfig):
    path: str = "s3://damo/backbones/paper/llm"
    model_type: str = "mistral"
    arch: dict[str, Any] = Field(
        default_factory=lambda: {
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "vocab_size": 32064,
            "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-5,
            "rope_theta": 1000000.0,
            "tie_word_embeddings": False,
        }
    )
    hub_id: str | None = "llava-hf/llava-v1.6-mistral-7b-hf"
    hub_format: Literal["causal_lm", "llava_next"] = Field(
        default="llava_next",
        description="What `hub_id` holds: a causal LM to download as it is, or a LlavaNext "
        "checkpoint whose language model `damo backbones prepare --llava` extracts.",
    )
    video_token: str = "<video>"
    video_placement: Literal["before", "after"] = Field(
        default="before",
        description="Where the soft prompt goes in the first user turn when the turn has no "
        "`<video>`: before its text, or after it, where a causal LLM's video positions can "
        "attend to the question.",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        default="bfloat16", description="Dtype of the frozen LLM weights."
    )
    gradient_checkpointing: bool = Field(
        default=False,
        description="Recompute the LLM's activations in the backward pass (LM stages): less "
        "memory, about a third more compute.",
    )
    lora: LoraConfig = LoraConfig()


class ResidualConfig(Section):
    """X_res = AdaptiveAvgPool(X_local -> L') + FFN(X_global), then a linear to width D."""

    visual_compression: int = Field(
        default=8, ge=1, description="Visual local tokens per frame / L' (256 -> 32)."
    )
    visual_grid: tuple[int, int] | None = Field(
        default=None,
        description="(rows, cols) the patch grid is average-pooled to (L' = rows x cols); "
        "None: the grid of P / visual_compression tokens closest in shape to the patch grid.",
    )
    audio_compression: int = Field(
        default=60, ge=1, description="Audio tokens per segment / L' (1500 -> 25)."
    )
    ffn_mult: int = Field(default=2, ge=1)

    def visual_pool_grid(self, patch_rows: int, patch_cols: int) -> tuple[int, int]:
        """(rows, cols) of pooled visual tokens per frame for a patch grid of that shape.

        Pooling is 2-D over the patch grid, so left/right and top/bottom both survive; a
        1-D pool over the row-major patch sequence would average whole rows together.
        """
        if self.visual_grid is not None:
            rows, cols = self.visual_grid
            if not (1 <= rows <= patch_rows and 1 <= cols <= patch_cols):
                raise ValueError(
                    f"residual.visual_grid {self.visual_grid} does not fit the "
                    f"{patch_rows}x{patch_cols} patch grid"
                )
            return rows, cols
        tokens = max(1, (patch_rows * patch_cols) // self.visual_compression)
        shapes = [
            (rows, tokens // rows)
            for rows in range(1, patch_rows + 1)
            if tokens % rows == 0 and tokens // rows <= patch_cols
        ]
        if not shapes:
            raise ValueError(
                f"residual.visual_compression {self.visual_compression} gives {tokens} tokens, "
                f"which no grid within {patch_rows}x{patch_cols} holds: set residual.visual_grid"
            )
        aspect = math.log(patch_rows / patch_cols)
        return min(shapes, key=lambda rc: (abs(math.log(rc[0] / rc[1]) - aspect), rc[0]))


class TemporalConfig(Section):
    """Grouped conv along time + learnable positions + sinusoidal timestamps (seconds)."""

    kernel: int = Field(default=3, ge=1, description="Odd, so stride 1 keeps the frame count.")
    stride: int = Field(default=1, ge=1)
    groups: int = Field(default=8, ge=1, description="Must divide the width D.")
    max_positions: int = Field(default=256, ge=1, description="Frames/segments with a position.")
    time_scale: float = Field(
        default=10000.0, gt=0, description="Max period of the sinusoidal timestamp embedding."
    )
    slot_embedding: bool = Field(
        default=False,
        description="A learned embedding per token slot of a frame (pooled cell) or an audio "
        "segment (sub-window): attention has no order of its own, so without it only a cell's "
        "content says which cell it is.",
    )


class FuseformerConfig(Section):
    width: int = Field(default=768, ge=8, description="D (paper)")
    depth: int = Field(default=4, ge=1, description="(paper) layers; a tunable.")
    heads: int = Field(default=12, ge=1)
    ffn_mult: int = Field(default=4, ge=1)
    visual_queries: int = Field(default=192, ge=1, description="(paper)")
    audio_queries: int = Field(default=64, ge=1, description="(paper)")
    fusion_tokens: int = Field(default=128, ge=1, description="(paper)")
    dropout: float = Field(default=0.0, ge=0, lt=1)
    gradient_checkpointing: bool = Field(
        default=False,
        description="Recompute each layer's activations in the backward pass: less memory.",
    )


class BridgeConfig(Section):
    """Q-Former: learnable queries cross-attend to the fusion tokens; then a linear to the LLM."""

    queries: int = Field(default=32, ge=1, description="Soft prompt length (default).")
    depth: int = Field(default=2, ge=1)
    heads: int = Field(default=12, ge=1)
    read_question: bool = Field(
        default=False,
        description="The queries also attend to the question (the first user turn's words, "
        "as the frozen text encoder reads them), as InstructBLIP's Q-Former does, so the soft "
        "prompt can carry the event the question names. Off: one soft prompt per video.",
    )


class HeadsConfig(Section):
    """Stage-1 heads: VTC, VTM (hard negatives from VTC), VTG (video-grounded captioning)."""

    embed_dim: int = Field(default=256, ge=8, description="Shared retrieval space of VTC.")
    init_temperature: float = Field(default=0.07, gt=0)
    vtm_depth: int = Field(default=1, ge=1)
    vtg_depth: int = Field(default=2, ge=1)
    vtg_max_length: int = Field(default=64, ge=4)
    vtc_weight: float = Field(default=1.0, ge=0)
    vtm_weight: float = Field(default=1.0, ge=0)
    vtg_weight: float = Field(default=1.0, ge=0)
    vtg_vocabulary: Literal["full", "batch"] = Field(
        default="full",
        description="The words VTG's softmax ranks each caption token against. full: the text "
        "tokenizer's whole vocabulary. batch: only the tokens the batch's captions use. Scoring "
        "30,522 words is ~90% of a VTG step on the tiny preset, while a synthetic world's "
        "captions use about a hundred, so 'batch' makes VTG cheap enough to anchor the LM "
        "stages with (benchmarks/README.md, section 5).",
    )
    place_negatives: bool | Literal["anchor"] = Field(
        default=False,
        description="VTC and VTM also see each caption with its places made wrong "
        "(damo.data.synthetic.place_negative) as a negative, so that matching needs the place; "
        "captions that name no place get none. true: in stage 1 and in the anchor of the LM "
        "stages; 'anchor': in the anchor alone (stage 1 learned little of the place from them "
        "and lost retrieval, benchmarks/README.md section 5).",
    )
    shape_negatives: bool | Literal["anchor"] = Field(
        default=False,
        description="VTC and VTM also see each caption with its shapes made wrong "
        "(damo.data.synthetic.shape_negative) as a negative, so that matching needs the shape "
        "(the Fuseformer drops it in stage 1 otherwise, benchmarks/README.md section 5); true "
        "and 'anchor' as for place_negatives. With both on, each caption gets one negative: "
        "of its place or of its shape, chosen from its checksum.",
    )


class StageConfig(Section):
    objective: Literal["alignment", "lm"]
    trainable: list[Component]


# One class per stage so that overriding one field (`--set model.stages.stage2.trainable=[bridge]`)
# keeps that stage's other defaults.
class Stage1Config(StageConfig):
    """Video-text alignment: VTC + VTM + VTG, no LLM."""

    objective: Literal["alignment", "lm"] = "alignment"
    trainable: list[Component] = ["residual", "temporal", "fuseformer", "bridge", "heads"]


class Stage2Config(StageConfig):
    """Representation bridging: LM loss on answers, frozen LLM."""

    objective: Literal["alignment", "lm"] = "lm"
    trainable: list[Component] = ["fuseformer", "bridge"]


class Stage3Config(StageConfig):
    """Temporal perception: LM loss on grounded QA, LoRA joins."""

    objective: Literal["alignment", "lm"] = "lm"
    trainable: list[Component] = ["fuseformer", "bridge", "lora"]


class Stage4Config(StageConfig):
    """Dialogue tuning: LM loss on multi-turn dialogues."""

    objective: Literal["alignment", "lm"] = "lm"
    trainable: list[Component] = ["bridge", "lora"]


class StagesConfig(Section):
    """DESIGN §4: what each stage trains. `lora` trains the LLM's adapter."""

    stage1: Stage1Config = Stage1Config()
    stage2: Stage2Config = Stage2Config()
    stage3: Stage3Config = Stage3Config()
    stage4: Stage4Config = Stage4Config()

    def get(self, stage: int) -> StageConfig:
        if stage not in (1, 2, 3, 4):
            raise ValueError(f"stage must be 1, 2, 3 or 4, got {stage!r}")
        return getattr(self, f"stage{stage}")


class ModelConfig(Section):
    """DaMO (DESIGN §3). Defaults are the paper preset."""

    frames: int = Field(default=24, ge=1, description="(paper) frames sampled per video.")
    audio_segments: int = Field(default=8, ge=1, description="(paper) audio segments per video.")
    drop_audio_prob: float = Field(
        default=0.0,
        ge=0,
        lt=1,
        description="(default) chance that a training sample's audio is masked out, so that a "
        "video without sound is a case the model has trained for (0: never).",
    )
    vision: VisionEncoderConfig = VisionEncoderConfig()
    audio: AudioEncoderConfig = AudioEncoderConfig()
    text_encoder: TextEncoderConfig = TextEncoderConfig()
    llm: LLMConfig = LLMConfig()
    residual: ResidualConfig = ResidualConfig()
    temporal: TemporalConfig = TemporalConfig()
    fuseformer: FuseformerConfig = FuseformerConfig()
    bridge: BridgeConfig = BridgeConfig()
    heads: HeadsConfig = HeadsConfig()
    stages: StagesConfig = StagesConfig()

    def with_backbones_at(self, root: str) -> ModelConfig:
        """A copy whose backbones live under `root` (vision/, audio/, text_encoder/, llm/), the
        layout `damo backbones make-tiny` writes."""
        root = root.rstrip("/")
        update = {
            name: getattr(self, name).model_copy(update={"path": f"{root}/{name}"})
            for name in BACKBONES
        }
        return self.model_copy(update=update)


BACKBONES = ("vision", "audio", "text_encoder", "llm")

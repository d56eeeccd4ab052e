"""Config sections for the data side: decoding media and generating the synthetic world."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from damo.config.schema import Section

# CLIP's normalisation; the paper's EVA-CLIP uses the same statistics.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class DecodeConfig(Section):
    """How a video becomes N frames and M audio segments (DESIGN §3: paper N=24, M=8)."""

    num_frames: int = Field(default=24, ge=1, description="Frames sampled uniformly in time.")
    num_segments: int = Field(default=8, ge=1, description="Audio segments covering the video.")
    image_size: int = Field(default=224, ge=8, description="Side of the square frames, pixels.")
    resize_mode: Literal["center_crop", "squash"] = Field(
        default="center_crop",
        description="center_crop: shortest side to image_size, then crop (CLIP); squash: stretch.",
    )
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    sample_rate: int = Field(default=16000, ge=1000, description="Audio rate, Hz (mono float32).")
    time_limit_s: float = Field(default=60.0, gt=0, description="Per-file decode time limit.")
    max_width: int = Field(default=7680, ge=16, description="Wider videos are rejected (8K).")
    max_height: int = Field(default=7680, ge=16, description="Taller videos are rejected.")
    threads: int = Field(default=1, ge=0, description="Decoder threads per file; 0 = auto.")
    stream_min_mb: float | None = Field(
        default=64.0,
        ge=0,
        description="Remote videos this big are read by byte ranges, not downloaded; None: never.",
    )


class ExtractConfig(Section):
    """How feature extraction runs (`damo extract`). None of it changes what a feature row
    holds, so none of it is in the feature hash: changing it redoes nothing."""

    batch_size: int = Field(default=4, ge=1, description="Clips per encoder batch.")
    num_actors: int | None = Field(
        default=None,
        ge=1,
        description="Encoder actors (one model copy each); None: sized "
        "from the cluster (one per GPU, or one per CPU core on a CPU-only cluster).",
    )
    gpus_per_actor: float | None = Field(
        default=None,
        ge=0,
        description="GPUs per encoder actor; None: 1 when the cluster has GPUs, else 0.",
    )
    decode_tasks: int | None = Field(
        default=None,
        ge=1,
        description="Concurrent decode tasks; None: sized from the cluster.",
    )
    isolate_decoder: bool = Field(
        default=True,
        description="Decode in a child process, so that a file which crashes or hangs the "
        "native decoder becomes an error row (decoder_crash, timeout) instead of a dead worker.",
    )
    decode_timeout_s: float = Field(
        default=300.0,
        gt=0,
        description="Wall-clock limit per file for the decoder process, "
        "which is then killed (timeout row). Applies when isolate_decoder is on.",
    )
    crash_retries: int = Field(
        default=1,
        ge=0,
        description="A file whose decoder process dies is tried this many "
        "more times in a fresh process before it is recorded as decoder_crash.",
    )
    max_task_retries: int = Field(
        default=2,
        ge=0,
        description="Ray retries of a decode, encode or write task after a "
        "system failure (a dead worker or node). Failures of single files are error rows.",
    )
    max_actor_restarts: int = Field(default=2, ge=0, description="Restarts per encoder actor.")
    shard_rows: int = Field(
        default=16,
        ge=1,
        description="Rows per Parquet shard. Each shard is durable once "
        "written: a killed run loses at most the shards in flight.",
    )
    object_store_mb: float | None = Field(
        default=None,
        gt=0,
        description="The most object-store memory extraction's blocks in flight may hold (Ray "
        "Data's resource limit). Ray Data's default is a share of the cluster's store; a "
        "cap keeps room for other work on a shared cluster. Blocks beyond it wait upstream.",
    )
    decoder_faults: dict[str, Literal["crash", "hang"]] = Field(
        default_factory=dict,
        description="Fault injection for rehearsals and tests: the decoder process aborts "
        "(crash) or stops answering (hang) on inputs whose URI contains a key. Needs "
        "isolate_decoder. Leave empty in real runs.",
    )


class SyntheticConfig(Section):
    """The synthetic audio-visual world (damo/data/synthetic.py)."""

    num_clips: int = Field(default=200, ge=1)
    seed: int = 0
    min_duration_s: float = Field(default=6.0, ge=4.0)
    max_duration_s: float = Field(default=30.0, ge=4.0)
    max_events: int = Field(default=4, ge=1, le=4)
    width: int = Field(default=96, ge=16)
    height: int = Field(default=96, ge=16)
    fps: int = Field(default=8, ge=1, le=60)
    sample_rate: int = Field(default=16000, ge=8000)
    caption_places: bool = Field(
        default=False,
        description='Captions say where each shape is ("a red square appears in the top left '
        'from ..."), so that stage 1 and its anchor have the place to learn from.',
    )


class DataConfig(Section):
    decode: DecodeConfig = DecodeConfig()
    extract: ExtractConfig = ExtractConfig()
    synthetic: SyntheticConfig = SyntheticConfig()

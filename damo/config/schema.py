"""The configuration schema: one pydantic model per section, composed into `DamoConfig`.

Every section forbids unknown keys, so a typo in a YAML file or a `--set` override is an
error that names the field instead of a silently ignored setting.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class S3Config(Section):
    """How to reach an S3-compatible object store.

    Credentials left empty are taken from the environment (AWS_ACCESS_KEY_ID /
    AWS_SECRET_ACCESS_KEY), so secrets never need to live in a YAML file.
    """

    endpoint_url: str | None = Field(
        default=None, description="Custom endpoint, e.g. http://127.0.0.1:8333; None means AWS."
    )
    region: str = "us-east-1"
    addressing_style: Literal["path", "virtual", "auto"] = Field(
        default="path", description="path-style suits local servers such as SeaweedFS and MinIO."
    )
    access_key_id: str | None = None
    secret_access_key: str | None = None
    connect_timeout_s: float = Field(default=5.0, gt=0)
    read_timeout_s: float = Field(default=60.0, gt=0)
    max_attempts: int = Field(default=3, ge=1)


class EmbeddedS3Config(Section):
    """The embedded SeaweedFS server that `damo storage up` and the demo start."""

    data_dir: str = ".damo/storage"
    host: str = "127.0.0.1"
    s3_port: int = Field(default=0, ge=0, le=65535, description="0 picks a free port.")
    startup_timeout_s: float = Field(default=60.0, gt=0)


class StorageConfig(Section):
    s3: S3Config = S3Config()
    embedded: EmbeddedS3Config = EmbeddedS3Config()
    root: str = Field(
        default="s3://damo", description="Where pipeline outputs go (a path, file:// or s3:// URI)."
    )
    allowed_prefixes: list[str] = Field(
        default_factory=list,
        description="URIs that user-supplied media may come from (Serve, evaluation).",
    )


class RayConfig(Section):
    address: str | None = Field(default=None, description="None starts or joins a local cluster.")
    num_cpus: int | None = Field(default=None, ge=1)
    object_store_memory_mb: int | None = Field(default=None, ge=64)


from damo.config.data import DataConfig  # noqa: E402  (data.py builds on Section above)
from damo.config.model import ModelConfig  # noqa: E402  (model.py builds on Section above)
from damo.config.serve import ServeConfig  # noqa: E402  (serve.py builds on Section above)
from damo.config.train import TrainConfig  # noqa: E402  (train.py builds on Section above)


class DamoConfig(Section):
    """The root of every pipeline configuration."""

    name: str = "default"
    seed: int = 0
    storage: StorageConfig = StorageConfig()
    ray: RayConfig = RayConfig()
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    serve: ServeConfig = ServeConfig()

    @model_validator(mode="after")
    def _frames_agree(self) -> DamoConfig:
        """The model's frame/segment counts are what decoding produces: one number each."""
        decode = self.data.decode
        for model_field, count, data_field in (
            ("model.frames", self.model.frames, "data.decode.num_frames"),
            ("model.audio_segments", self.model.audio_segments, "data.decode.num_segments"),
        ):
            if count != getattr(decode, data_field.rsplit(".", 1)[1]):
                raise ValueError(
                    f"{model_field} ({count}) must equal {data_field} "
                    f"({getattr(decode, data_field.rsplit('.', 1)[1])}): set both"
                )
        return self

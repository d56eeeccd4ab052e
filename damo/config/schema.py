"""The configuration schema: one pydantic model per section, composed into `DamoConfig`.

Every section forbids unknown keys, so a typo in a YAML file or a `--set` override is an
error that names the field instead of a silently ignored setting.
"""

from __future__ import annotations

from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    SerializationInfo,
    field_serializer,
    field_validator,
    model_validator,
)

REDACTED = "**********"  # what a secret looks like in every dump (pydantic's SecretStr mask)
REVEAL_SECRETS = "reveal_secrets"  # serialization context key; see `worker_config_dict`


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class S3Config(Section):
    """How to reach an S3-compatible object store.

    Leave the keys empty to use the default AWS credential chain (AWS_* variables,
    AWS_PROFILE with its shared credentials/config files, SSO, web identity, instance and
    container roles), which also refreshes temporary credentials. Keys given here are used as
    they are, with `session_token` (or AWS_SESSION_TOKEN when the env holds the same key id).
    Secrets are `SecretStr`: every JSON/YAML dump shows them as "**********".
    """

    endpoint_url: str | None = Field(
        default=None, description="Custom endpoint, e.g. http://127.0.0.1:8333; None means AWS."
    )
    region: str | None = Field(
        default=None,
        description="None: AWS_REGION / AWS_DEFAULT_REGION; pyarrow uses the bucket's own region.",
    )
    addressing_style: Literal["path", "virtual", "auto"] = Field(
        default="path", description="path-style suits local servers such as SeaweedFS and MinIO."
    )
    access_key_id: str | None = None
    secret_access_key: SecretStr | None = None
    session_token: SecretStr | None = Field(
        default=None, description="For temporary keys (STS, SSO); only used with access_key_id."
    )
    connect_timeout_s: float = Field(default=5.0, gt=0)
    read_timeout_s: float = Field(default=60.0, gt=0)
    max_attempts: int = Field(default=3, ge=1)

    @field_validator("secret_access_key", "session_token", mode="before")
    @classmethod
    def _redacted_means_unset(cls, value):
        """A redacted dump read back has no secret, rather than the mask as a wrong one."""
        return None if value == REDACTED else value

    @field_serializer("secret_access_key", "session_token", when_used="json")
    def _redact(self, value: SecretStr | None, info: SerializationInfo) -> str | None:
        if value is None:
            return None
        if info.context and info.context.get(REVEAL_SECRETS):
            return value.get_secret_value()
        return REDACTED


class EmbeddedS3Config(Section):
    """The embedded SeaweedFS server that `damo storage up` and the demo start."""

    data_dir: str = ".damo/storage"
    host: str = "127.0.0.1"
    s3_port: int = Field(default=0, ge=0, le=65535, description="0 picks a free port.")
    startup_timeout_s: float = Field(default=60.0, gt=0)
    max_volumes: int = Field(
        default=1000,
        ge=1,
        description="Volume slots. Every bucket takes at least one; weed's own default (one per "
        "GiB free at start) stops writes to new buckets after a few dozen. Slots are sparse files: "
        "an unused one costs no disk.",
    )


class StorageConfig(Section):
    s3: S3Config = S3Config()
    embedded: EmbeddedS3Config = EmbeddedS3Config()
    root: str = Field(
        default="s3://damo", description="Where pipeline outputs go (a path, file:// or s3:// URI)."
    )
    allowed_prefixes: list[str] = Field(
        default_factory=list,
        description="URIs that user-supplied inputs and outputs must lie under (CLI, jobs, "
        "evaluation, Serve); empty means no restriction.",
    )


class RayConfig(Section):
    address: str | None = Field(default=None, description="None starts or joins a local cluster.")
    num_cpus: int | None = Field(default=None, ge=1)
    object_store_memory_mb: int | None = Field(default=None, ge=64)


from damo.config.data import DataConfig  # noqa: E402  (data.py builds on Section above)
from damo.config.model import ModelConfig  # noqa: E402  (model.py builds on Section above)
from damo.config.pipeline import PipelineConfig  # noqa: E402  (builds on Section above)
from damo.config.serve import ServeConfig  # noqa: E402  (serve.py builds on Section above)
from damo.config.train import TrainConfig  # noqa: E402  (train.py builds on Section above)
from damo.config.tune import TuneConfig  # noqa: E402  (tune.py builds on Section above)


class DamoConfig(Section):
    """The root of every pipeline configuration."""

    name: str = "default"
    seed: int = 0
    storage: StorageConfig = StorageConfig()
    ray: RayConfig = RayConfig()
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    tune: TuneConfig = TuneConfig()
    serve: ServeConfig = ServeConfig()
    pipeline: PipelineConfig = PipelineConfig()

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

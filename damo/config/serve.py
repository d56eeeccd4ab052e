"""The `serve:` section: the Ray Serve application (damo/serve).

Three deployments (DESIGN §7): the FastAPI ingress, the featurizer (decoding + frozen encoders,
CPU) and the DaMO model replicas (`@serve.batch`, a GPU when the cluster has one). Each gets its
replica count or autoscaling, its queue limits and its Ray resources from here. Where user media
may come from is `storage.allowed_prefixes`; the bearer token comes from the environment
(`auth_token_env`), never from a file.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from damo.config.schema import Section


class AutoscalingConfig(Section):
    """Ray Serve's autoscaling_config, the fields users tune."""

    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=2, ge=1)
    initial_replicas: int | None = Field(default=None, ge=0)
    target_ongoing_requests: float = Field(
        default=2.0, gt=0, description="Requests per replica the autoscaler aims at."
    )
    upscale_delay_s: float = Field(default=5.0, ge=0)
    downscale_delay_s: float = Field(default=60.0, ge=0)
    look_back_period_s: float = Field(
        default=30.0, gt=0, description="Window of load the autoscaler averages (> 10 s)."
    )

    @model_validator(mode="after")
    def _ordered(self) -> AutoscalingConfig:
        if self.max_replicas < self.min_replicas:
            raise ValueError(
                f"max_replicas ({self.max_replicas}) must be >= min_replicas ({self.min_replicas})"
            )
        return self


class DeploymentConfig(Section):
    """One Serve deployment: replicas (fixed or autoscaled), queues, resources."""

    num_replicas: int = Field(default=1, ge=1, description="Used when autoscaling is None.")
    autoscaling: AutoscalingConfig | None = None
    max_ongoing_requests: int = Field(default=8, ge=1, description="In flight per replica.")
    max_queued_requests: int = Field(
        default=64, ge=-1, description="Waiting per caller before 503 + Retry-After; -1: no cap."
    )
    num_cpus: float = Field(default=0.5, ge=0)
    num_gpus: float | Literal["auto"] = Field(
        default=0.0, description="'auto': one GPU per replica when the cluster has GPUs."
    )
    memory_mb: int | None = Field(default=None, ge=1, description="Ray memory reservation.")

    def ray_actor_options(self, cluster_gpus: float = 0.0) -> dict:
        gpus = (1.0 if cluster_gpus >= 1 else 0.0) if self.num_gpus == "auto" else self.num_gpus
        options: dict = {"num_cpus": self.num_cpus, "num_gpus": gpus}
        if self.memory_mb is not None:
            options["memory"] = self.memory_mb * 1024 * 1024
        return options

    def deployment_options(self, cluster_gpus: float = 0.0) -> dict:
        """Keyword arguments for `Deployment.options(...)`."""
        options: dict = {
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "ray_actor_options": self.ray_actor_options(cluster_gpus),
        }
        if self.autoscaling is not None:
            options["autoscaling_config"] = self.autoscaling.model_dump(exclude_none=True)
        else:
            options["num_replicas"] = self.num_replicas
        return options


# One class per deployment so that overriding one field (`--set serve.model.num_cpus=1`) keeps
# that deployment's other defaults.
class IngressDeployment(DeploymentConfig):
    """FastAPI: cheap, many requests in flight; its queue limit answers 503 + Retry-After."""

    num_cpus: float = Field(default=0.1, ge=0)
    max_ongoing_requests: int = Field(default=64, ge=1)
    max_queued_requests: int = Field(default=256, ge=-1)


class FeaturizerDeployment(DeploymentConfig):
    """Decoding + the frozen encoders, on CPU. Most calls are cache hits that take
    milliseconds, so many may be in flight; decoding itself runs one video at a time."""

    num_cpus: float = Field(default=0.5, ge=0)
    max_ongoing_requests: int = Field(default=16, ge=1)


class ModelDeployment(DeploymentConfig):
    """DaMO replicas, autoscaled; in-flight requests per replica must cover a full batch."""

    num_gpus: float | Literal["auto"] = "auto"
    max_ongoing_requests: int = Field(default=16, ge=1)
    autoscaling: AutoscalingConfig | None = AutoscalingConfig()


class BatchingConfig(Section):
    """`@serve.batch` on the model: 1 turns batching off (each request generates alone)."""

    max_batch_size: int = Field(default=8, ge=1)
    batch_wait_timeout_s: float = Field(default=0.02, ge=0)
    refill_wait_s: float = Field(
        default=0.1,
        ge=0,
        description="Under load (the batch just answered held more than one question), wait "
        "up to this long after it for the next batch to fill: the callers just answered tend to "
        "ask again at once. A lone caller never waits. 0 turns it off.",
    )


class LimitsConfig(Section):
    """What one request may ask for; beyond it the answer is a 4xx that says which limit."""

    max_upload_mb: float = Field(default=64.0, gt=0, description="Uploaded or fetched video.")
    max_duration_s: float = Field(default=3600.0, gt=0)
    max_width: int = Field(default=3840, ge=16)
    max_height: int = Field(default=3840, ge=16)
    max_query_chars: int = Field(default=1000, ge=1)
    max_new_tokens: int = Field(default=48, ge=1, le=1024)
    decode_timeout_s: float = Field(default=30.0, gt=0, description="Decoding + encoding.")
    generate_timeout_s: float = Field(default=30.0, gt=0, description="Answer generation.")
    retry_after_s: int = Field(default=2, ge=1, description="Retry-After on 503 (overload).")


class ServeConfig(Section):
    """The Serve application (`damo serve`, platform/serve/config.yaml)."""

    host: str = Field(default="127.0.0.1", description="HTTP bind address (0.0.0.0 in a pod).")
    port: int = Field(default=8000, ge=0, le=65535, description="0 picks a free port.")
    app_name: str = "damo"
    model_name: str = Field(default="damo", description="The model id of /v1/models.")
    checkpoint: str | None = Field(
        default=None, description="Checkpoint URI to serve (`damo serve --checkpoint`)."
    )
    auth_token_env: str = Field(
        default="DAMO_SERVE_TOKEN",
        description="Environment variable holding the bearer token; unset or empty: no auth.",
    )
    allow_http_prefixes: list[str] = Field(
        default_factory=list,
        description="http(s) URL prefixes videos may be fetched from (no redirects); "
        "empty: http(s) URLs are refused.",
    )
    feature_cache_items: int = Field(
        default=256, ge=0, description="Videos whose features a featurizer replica keeps."
    )
    soft_prompt_cache_items: int = Field(
        default=256,
        ge=0,
        description="Videos whose soft prompt (the video pathway's output, K x H values) a "
        "model replica keeps: a further question about one skips the pathway. 0: off.",
    )
    ingress: IngressDeployment = IngressDeployment()
    featurizer: FeaturizerDeployment = FeaturizerDeployment()
    model: ModelDeployment = ModelDeployment()
    batching: BatchingConfig = BatchingConfig()
    limits: LimitsConfig = LimitsConfig()

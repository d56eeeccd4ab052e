"""The Ray Serve application: FastAPI ingress -> featurizer -> DaMO model replicas.

    HTTP --> Ingress (FastAPI: auth, checks, limits, OpenAPI at /docs, the page at /)
               |-- Featurizer (decode + frozen encoders on CPU, features cached by content)
               `-- ModelReplica (DaMO, @serve.batch, autoscaled, a GPU when the cluster has one)

Every deployment's replicas, queues and resources come from the `serve:` config section.
Errors are JSON `{"error": {"code", "message", "type"}}`; malformed requests get a 4xx that
says what is wrong, overload a 503 with Retry-After, and no response carries a stack trace.
"""

# no `from __future__ import annotations`: FastAPI reads the route annotations at runtime
import asyncio
import json
import os
import time
import uuid
from importlib import resources

from fastapi import Depends
from fastapi.responses import HTMLResponse, StreamingResponse
from pydantic import SecretStr
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError

from damo.config import DamoConfig
from damo.eval.parse import parse_span
from damo.serve import http as http_state
from damo.serve.answer import (
    Answer,
    Answerer,
    GenerationQueue,
    Question,
    quiet_merged_batches_warning,
)
from damo.serve.errors import ApiError
from damo.serve.featurizer import Featurizer, VideoFeaturesRow
from damo.serve.http import ERRORS, api, authorize
from damo.serve.openai_format import awaited, chat_turn, spans_in, sse_chunks
from damo.serve.schemas import (
    AssistantMessage,
    ChatRequest,
    ChatResponse,
    Choice,
    GroundRequest,
    GroundResponse,
    Health,
    ModelCard,
    ModelList,
    QARequest,
    QAResponse,
    Timings,
    Usage,
)
from damo.serve.sources import VideoSource, resolve_video


# ---- replicas ---------------------------------------------------------------------------------
@serve.deployment(name="featurizer")
class FeaturizerDeployment:
    def __init__(self, cfg: DamoConfig):
        self.featurizer = Featurizer(cfg)

    def features(self, source: VideoSource) -> VideoFeaturesRow | ApiError:
        try:
            return self.featurizer.features(source)
        except ApiError as err:  # a value, not an exception: it crosses Ray unchanged
            return err


@serve.deployment(name="model")
class ModelReplica:
    def __init__(self, cfg: DamoConfig, checkpoint_uri: str):
        from damo.train.registry import resolve_checkpoint

        # `best` is resolved here, by each replica: a redeploy serves the latest best trial
        checkpoint_uri = resolve_checkpoint(checkpoint_uri, cfg)
        self.answerer = Answerer(cfg, checkpoint_uri, max(1, int(cfg.serve.model.num_cpus)))
        quiet_merged_batches_warning()
        batching = cfg.serve.batching
        max_batch_size = batching.max_batch_size
        self.generation = GenerationQueue(
            self.answerer.answer_batch, max_batch_size, batching.refill_wait_s
        )
        self.answer.set_max_batch_size(max_batch_size)
        self.answer.set_batch_wait_timeout_s(batching.batch_wait_timeout_s)

    # Batches formed by @serve.batch all go straight on (a batch holds at least one request,
    # so max_ongoing_requests bounds them) to the generation queue, which merges the ones
    # that arrive while the model is busy: see GenerationQueue for why.
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02, max_concurrent_batches=1024)
    async def answer(self, questions: list[Question]) -> list[Answer]:
        return await self.generation.submit(questions)

    def pid(self) -> int:
        return os.getpid()


@serve.deployment(name="ingress")
@serve.ingress(api)
class Ingress:
    def __init__(self, cfg: DamoConfig, featurizer, model, token: SecretStr | None = None):
        self.cfg = cfg
        self.featurizer = featurizer
        self.model = model
        limits = cfg.serve.limits
        # a data: URL is 4/3 of the video, plus the JSON around it
        http_state.settings.max_body_bytes = int(limits.max_upload_mb * 2**20 * 4 / 3) + 2**20
        # through the module (not a name bound here): Serve pickles this class by value
        secret = token.get_secret_value() if token is not None else None
        http_state.settings.token = secret or os.environ.get(cfg.serve.auth_token_env) or None
        self.created = int(time.time())

    # ---- the pipeline, shared by every route ----
    async def _call(self, send, timeout_s: float, what: str):
        """`send()` issues the call; a replica that dies meanwhile (killed, node lost) gets the
        request sent again once, to another replica, within the same time limit."""
        deadline = time.monotonic() + timeout_s
        for attempt in (1, 2):
            response = send()
            try:
                result = await asyncio.wait_for(
                    awaited(response), max(0.01, deadline - time.monotonic())
                )
                break
            except TimeoutError:
                response.cancel()
                raise ApiError(
                    504, f"{what}_timeout", f"{what} took longer than {timeout_s:g} s (time limit)"
                ) from None
            except BackPressureError:
                retry = str(self.cfg.serve.limits.retry_after_s)
                raise ApiError(
                    503,
                    "overloaded",
                    f"the {what} queue is full; retry later",
                    {"Retry-After": retry},
                ) from None
            except (RayActorError, ActorUnavailableError):
                if attempt == 2:
                    retry = str(self.cfg.serve.limits.retry_after_s)
                    raise ApiError(
                        503,
                        "replica_lost",
                        f"the {what} replica was lost twice; retry later",
                        {"Retry-After": retry},
                    ) from None
        if isinstance(result, ApiError):
            raise result
        return result

    async def _ask(self, video: str, prompt: str, max_new_tokens: int | None):
        limits = self.cfg.serve.limits
        started = time.perf_counter()
        if len(prompt) > limits.max_query_chars:
            raise ApiError(
                422,
                "query_too_long",
                f"the question has {len(prompt)} characters; the limit is {limits.max_query_chars}",
            )
        if not prompt.strip():
            raise ApiError(422, "empty_query", "the question is empty")
        if max_new_tokens is not None and max_new_tokens > limits.max_new_tokens:
            raise ApiError(
                422,
                "too_many_tokens",
                f"max_new_tokens {max_new_tokens} exceeds the limit of {limits.max_new_tokens}",
            )
        source = await asyncio.to_thread(
            resolve_video,
            video,
            self.cfg.storage.allowed_prefixes,
            self.cfg.serve.allow_http_prefixes,
            limits.max_upload_mb,
            limits.decode_timeout_s,
        )
        features: VideoFeaturesRow = await self._call(
            lambda: self.featurizer.features.remote(source), limits.decode_timeout_s + 5, "decoding"
        )
        featurized = time.perf_counter()
        question = Question(features, prompt.strip(), max_new_tokens or limits.max_new_tokens)
        answer: Answer = await self._call(
            lambda: self.model.answer.remote(question), limits.generate_timeout_s, "generation"
        )
        timings = Timings(
            featurize_s=round(featurized - started, 4),
            generate_s=round(answer.generate_s, 4),
            total_s=round(time.perf_counter() - started, 4),
            cached_features=features.cached,
            batch_size=answer.batch_size,
        )
        return features, answer, timings

    # ---- routes ----
    @api.post("/v1/ground", response_model=GroundResponse, responses=ERRORS, tags=["video"])
    async def ground(self, body: GroundRequest, _: None = Depends(authorize)) -> GroundResponse:
        """Find when something happens: the start and end of the moment, in seconds."""
        features, answer, timings = await self._ask(body.video, body.query, body.max_new_tokens)
        span = parse_span(answer.text, features.duration)
        return GroundResponse(
            start=span.start if span else None,
            end=span.end if span else None,
            found=span is not None,
            answer=answer.text,
            duration=features.duration,
            timings=timings,
        )

    @api.post("/v1/qa", response_model=QAResponse, responses=ERRORS, tags=["video"])
    async def qa(self, body: QARequest, _: None = Depends(authorize)) -> QAResponse:
        """Answer a question about a video; time spans named in the answer are parsed."""
        features, answer, timings = await self._ask(body.video, body.question, body.max_new_tokens)
        return QAResponse(
            answer=answer.text,
            spans=spans_in(answer.text, features.duration),
            duration=features.duration,
            timings=timings,
        )

    @api.post(
        "/v1/chat/completions",
        response_model=ChatResponse,
        responses={**ERRORS, 200: {"content": {"text/event-stream": {}}}},
        tags=["openai"],
    )
    async def chat(self, body: ChatRequest, _: None = Depends(authorize)):
        """OpenAI chat completions with `video_url` content parts; `stream: true` sends SSE."""
        if body.model != self.cfg.serve.model_name:
            raise ApiError(
                404,
                "model_not_found",
                f"unknown model {body.model!r}; this service has {self.cfg.serve.model_name!r}",
            )
        video, prompt = chat_turn(body)
        # OpenAI's max_tokens is a ceiling: the service's own limit may be lower
        requested = body.max_completion_tokens or body.max_tokens
        tokens = min(
            requested or self.cfg.serve.limits.max_new_tokens, self.cfg.serve.limits.max_new_tokens
        )
        features, answer, _timings = await self._ask(video, prompt, tokens)
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        finish = "length" if answer.completion_tokens >= tokens else "stop"
        if body.stream:
            return StreamingResponse(
                sse_chunks(completion_id, created, body.model, answer.text, finish),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        return ChatResponse(
            id=completion_id,
            created=created,
            model=body.model,
            choices=[
                Choice(index=0, message=AssistantMessage(content=answer.text), finish_reason=finish)
            ],
            usage=Usage(
                prompt_tokens=answer.prompt_tokens,
                completion_tokens=answer.completion_tokens,
                total_tokens=answer.prompt_tokens + answer.completion_tokens,
            ),
            spans=spans_in(answer.text, features.duration),
        )

    @api.get("/v1/models", response_model=ModelList, responses=ERRORS, tags=["openai"])
    async def models(self, _: None = Depends(authorize)) -> ModelList:
        """The one model this service answers with."""
        return ModelList(data=[ModelCard(id=self.cfg.serve.model_name, created=self.created)])

    @api.get("/healthz", response_model=Health, tags=["service"])
    async def healthz(self) -> Health:
        """Liveness of the ingress (Serve restarts replicas that fail their own checks)."""
        return Health(
            status="ok", model=self.cfg.serve.model_name, checkpoint=self.cfg.serve.checkpoint or ""
        )

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self) -> HTMLResponse:
        html = resources.files("damo.serve").joinpath("page.html").read_text()
        page_settings = {
            "model": self.cfg.serve.model_name,
            "auth": bool(http_state.settings.token),
        }
        return HTMLResponse(html.replace("/*SETTINGS*/{}", json.dumps(page_settings)))


# ---- building the application -----------------------------------------------------------------
def cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0.0


def build_app(cfg: DamoConfig, checkpoint_uri: str | None = None, token: SecretStr | None = None):
    """The Serve application for `cfg` (deployments sized by `cfg.serve`).

    The bearer token is `token`, else the environment variable `serve.auth_token_env` as the
    ingress replica sees it; none or empty means no auth.
    """
    checkpoint_uri = checkpoint_uri or cfg.serve.checkpoint
    if not checkpoint_uri:
        raise ValueError("no checkpoint to serve: pass --checkpoint or set serve.checkpoint")
    cfg = cfg.model_copy(
        update={"serve": cfg.serve.model_copy(update={"checkpoint": checkpoint_uri})}
    )
    gpus = cluster_gpus()
    serve_cfg = cfg.serve
    featurizer = FeaturizerDeployment.options(**serve_cfg.featurizer.deployment_options()).bind(cfg)
    model = ModelReplica.options(**serve_cfg.model.deployment_options(gpus)).bind(
        cfg, checkpoint_uri
    )
    retry = {"backpressure_config": {"retry_after_s": serve_cfg.limits.retry_after_s}}
    ingress_options = {**serve_cfg.ingress.deployment_options(), **retry}
    return Ingress.options(**ingress_options).bind(cfg, featurizer, model, token)

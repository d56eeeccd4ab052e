"""Request and response models of the HTTP API (they make the OpenAPI spec at /docs)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

VIDEO_HELP = (
    "An allowed storage URI (s3://bucket/key, file:///path, /path) or an upload as a "
    "data:video/mp4;base64,... URL."
)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Timings(BaseModel):
    featurize_s: float = Field(description="Decoding + encoding (0 when the features were cached).")
    generate_s: float = Field(description="Answer generation, the whole batch.")
    total_s: float
    cached_features: bool = Field(description="True when the video's features were cached.")
    batch_size: int = Field(description="Requests that shared this generate call.")


class GroundRequest(Strict):
    video: str = Field(min_length=1, max_length=100_000_000, description=VIDEO_HELP)
    query: str = Field(
        min_length=1, max_length=100_000, description="What to find, e.g. 'when is a tone heard?'"
    )
    max_new_tokens: int | None = Field(default=None, ge=1, le=1024)


class GroundResponse(BaseModel):
    start: float | None = Field(description="Seconds; None when the answer names no span.")
    end: float | None
    found: bool = Field(description="Whether a time span could be read from the answer.")
    answer: str = Field(description="The model's answer text.")
    duration: float = Field(description="The video's duration, seconds.")
    timings: Timings


class QARequest(Strict):
    video: str = Field(min_length=1, max_length=100_000_000, description=VIDEO_HELP)
    question: str = Field(min_length=1, max_length=100_000)
    max_new_tokens: int | None = Field(default=None, ge=1, le=1024)


class TimeSpan(BaseModel):
    start: float
    end: float


class QAResponse(BaseModel):
    answer: str
    spans: list[TimeSpan] = Field(description="Time spans named in the answer, in seconds.")
    duration: float
    timings: Timings


# ---- OpenAI chat completions -------------------------------------------------------------------
class Lenient(BaseModel):
    """OpenAI clients send fields this service does not use; they are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")


class TextPart(Lenient):
    type: Literal["text"]
    text: str = Field(max_length=100_000)


class VideoURL(Lenient):
    url: str = Field(min_length=1, max_length=100_000_000, description=VIDEO_HELP)


class VideoPart(Lenient):
    type: Literal["video_url"]
    video_url: VideoURL


ContentPart = Annotated[TextPart | VideoPart, Field(discriminator="type")]


class ChatMessage(Lenient):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = None


class ChatRequest(Lenient):
    model: str = Field(min_length=1, max_length=256)
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    stream: bool = False
    # ceilings: above the service's limit (serve.limits.max_new_tokens) they are clamped to it
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(
        default=None, ge=0, le=2, description="Accepted; decoding is always greedy."
    )


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    spans: list[TimeSpan] = Field(
        default_factory=list, description="Extension: time spans named in the answer."
    )


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "damo"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"]
    model: str
    checkpoint: str


class ErrorDetail(BaseModel):
    code: str
    message: str
    type: str


class ErrorBody(BaseModel):
    error: ErrorDetail

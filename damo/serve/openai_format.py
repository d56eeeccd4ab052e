"""OpenAI chat completions: reading a conversation, writing a server-sent event stream."""

from __future__ import annotations

import json

from damo.eval.parse import parse_spans
from damo.serve.errors import ApiError
from damo.serve.schemas import ChatRequest, TimeSpan


def spans_in(text: str, duration: float) -> list[TimeSpan]:
    return [TimeSpan(start=s.start, end=s.end) for s in parse_spans(text, duration)]


def chat_turn(body: ChatRequest) -> tuple[str, str]:
    """(video, question): the last video of the conversation, the last user message's text."""
    video = None
    for message in body.messages:
        if isinstance(message.content, list):
            for part in message.content:
                if part.type == "video_url":
                    video = part.video_url.url
    users = [m for m in body.messages if m.role == "user"]
    if not users:
        raise ApiError(422, "no_user_message", "the conversation has no user message")
    last = users[-1].content
    if isinstance(last, list):
        text = " ".join(part.text for part in last if part.type == "text")
    else:
        text = last or ""
    if video is None:
        raise ApiError(
            422,
            "no_video",
            'no video in the conversation: add a {"type": "video_url", "video_url": {"url": ...}} '
            "content part",
        )
    return video, text


def sse_chunks(completion_id: str, created: int, model: str, text: str, finish: str):
    """OpenAI's chunk stream: the role, the text word by word, the finish reason, [DONE]."""

    def chunk(delta: dict, finish_reason: str | None = None) -> str:
        data = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        }
        return f"data: {json.dumps(data)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    words = text.split(" ")
    for i, word in enumerate(words):
        yield chunk({"content": word if i == 0 else " " + word})
    yield chunk({}, finish)
    yield "data: [DONE]\n\n"


async def awaited(response):
    """A Serve response as a coroutine (what asyncio.wait_for takes)."""
    return await response

"""Turn a model's answer text back into a time span in seconds.

The model is trained to answer "from 12.5 to 20.0 seconds" (`damo.data.records.fmt_span`),
but evaluation must be fair to any model, so the parser also reads "12.5 - 20", "between 3 and
7 s", clock times (HH:MM:SS, MM:SS, with optional fractions) and reversed pairs. Text without two
times joined by a range word is unparsable: `parse_span` returns None, and the metrics count it
as IoU 0 and report it separately.
"""

from __future__ import annotations

import re
from typing import NamedTuple


class Span(NamedTuple):
    start: float
    end: float


_NUMBER = r"\d+(?:\.\d+)?|\.\d+"
_CLOCK = r"\d{1,2}:\d{2}:\d{2}(?:\.\d+)?|\d{1,3}:\d{2}(?:\.\d+)?"
_TIME = rf"(?P<NAME>{_CLOCK}|{_NUMBER})\s*(?:s|secs?|seconds?)?\b"
_JOIN = r"\s*(?:-|–|—|~|to|until|till|through)\s*"
_START, _END = _TIME.replace("NAME", "start"), _TIME.replace("NAME", "end")
# "and" only makes a range after "between": "2 and 3 are numbers" is not a span
_SPANS = (
    re.compile(_START + _JOIN + _END, flags=re.IGNORECASE),
    re.compile(r"\bbetween\s+" + _START + r"\s*and\s*" + _END, flags=re.IGNORECASE),
)


def parse_time(text: str) -> float:
    """'75.5' -> 75.5; '1:15.5' -> 75.5; '01:01:15' -> 3675.0."""
    seconds = 0.0
    for part in text.split(":"):
        seconds = seconds * 60 + float(part)
    return seconds


def parse_span(text: str | None, duration: float | None = None) -> Span | None:
    """The first time range in `text`, ordered and clamped to [0, duration]; None if none."""
    if not text:
        return None
    matches = [m for m in (pattern.search(text) for pattern in _SPANS) if m is not None]
    if not matches:
        return None
    match = min(matches, key=lambda m: m.start())
    start, end = parse_time(match["start"]), parse_time(match["end"])
    if end < start:
        start, end = end, start
    upper = float("inf") if duration is None else float(duration)
    return Span(min(max(start, 0.0), upper), min(max(end, 0.0), upper))


def parse_spans(text: str | None, duration: float | None = None) -> list[Span]:
    """Every time range in `text`, left to right (an answer may name several)."""
    spans: list[Span] = []
    rest = text or ""
    while rest:
        matches = [m for m in (pattern.search(rest) for pattern in _SPANS) if m is not None]
        if not matches:
            break
        match = min(matches, key=lambda m: m.start())
        span = parse_span(match.group(0), duration)
        if span is not None:
            spans.append(span)
        rest = rest[match.end() :]
    return spans


def split_timed_answer(text: str | None, duration: float | None = None) -> tuple[str, Span | None]:
    """A timed answer's event part and its span: "a red square appears from 3.0 to 7.5
    seconds." -> ("a red square appears .", Span(3.0, 7.5)). Without a span the whole text is
    the event part."""
    if not text:
        return "", None
    matches = [m for m in (pattern.search(text) for pattern in _SPANS) if m is not None]
    if not matches:
        return text, None
    match = min(matches, key=lambda m: m.start())
    prefix = re.sub(r"\b(?:from|between)\s*$", "", text[: match.start()], flags=re.IGNORECASE)
    return f"{prefix.strip()} {text[match.end() :].strip()}".strip(), parse_span(text, duration)

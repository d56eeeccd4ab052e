"""The answer parser: every documented format, and None for everything that is not a span."""

from __future__ import annotations

import pytest

from damo.eval.parse import Span, parse_span, parse_spans, parse_time


@pytest.mark.parametrize(
    ("text", "span"),
    [
        ("from 12.5 to 20.0 seconds", (12.5, 20.0)),
        ("The red square is visible from 3.0 to 9.5 seconds.", (3.0, 9.5)),
        ("From 12.5s to 20s", (12.5, 20.0)),
        ("12.5 - 20", (12.5, 20.0)),
        ("12.5-20.0 seconds", (12.5, 20.0)),
        ("3 – 7 sec", (3.0, 7.0)),
        ("between 3 and 7 s", (3.0, 7.0)),
        ("00:00:05 - 00:00:15", (5.0, 15.0)),
        ("00:00:05.5 to 00:00:15", (5.5, 15.0)),
        ("0:05 to 0:15", (5.0, 15.0)),
        ("It is between 0:05 and 0:12.5.", (5.0, 12.5)),
        ("from 20 to 12.5 seconds", (12.5, 20.0)),  # reversed pair is swapped
        ("from 0.5 to .8 s", (0.5, 0.8)),
        ("from 25 to 90 seconds", (25.0, 30.0)),  # clamped to the duration
        ("0:20 - 1:10", (20.0, 30.0)),
    ],
)
def test_parses_spans(text, span):
    assert parse_span(text, duration=30.0) == Span(*span)


@pytest.mark.parametrize(
    "text",
    [
        None,
        "",
        "   ",
        "garbage",
        "I don't know.",
        "at 5 seconds",
        "5",
        "12.5 seconds",
        "2 and 3 are numbers",
        "version 2 of 3",
        "there are 4 circles",
    ],
)
def test_unparsable_is_none(text):
    assert parse_span(text, duration=30.0) is None


def test_without_a_duration_only_negative_times_are_clamped():
    assert parse_span("from 100 to 5000 seconds") == Span(100.0, 5000.0)


def test_parse_time():
    assert parse_time("75.5") == 75.5
    assert parse_time("1:15.5") == 75.5
    assert parse_time("01:01:15") == 3675.0


def test_parses_what_the_records_write():
    from damo.data.records import fmt_span

    for start, end in ((0.0, 2.5), (12.5, 20.0), (3.0, 29.5)):
        assert parse_span(f"It happens {fmt_span(start, end)}.", duration=30.0) == (start, end)


def test_parse_spans_finds_every_range_in_order():
    text = "a tone from 1.0 to 2.5 seconds, then between 3 and 4 s, and 0:05-0:07; 2 and 3"
    assert parse_spans(text, duration=6.0) == [Span(1.0, 2.5), Span(3.0, 4.0), Span(5.0, 6.0)]
    assert parse_spans("yes.") == [] and parse_spans(None) == []

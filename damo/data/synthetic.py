"""The synthetic audio-visual world: clips with known ground truth, deterministic by seed.

Each clip is a dark canvas on which coloured shapes appear and disappear (visual events) while
tones and noise bursts start and stop (audio events). Some events are only visible, some only
audible, and some are both at once (a shape that appears *with* a sound). Every event lasts at
least two seconds and starts and ends on a half second, so that 24 sampled frames and 8 audio
segments always see it and a small model can learn to ground it.

Within one clip every shape, colour and sound occurs at most once, so each question has exactly
one answer ("what colour is the circle?"). The vocabulary is deliberately small and the sentence
templates fixed: a tiny language model trained on `text_corpus` covers every annotation.

Clip `i` of world `seed` depends only on `(seed, i)`, so clips can be generated in parallel and a
bigger world extends a smaller one with the same seed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 240),
    "yellow": (240, 220, 40),
    "purple": (160, 60, 200),
    "white": (240, 240, 240),
}
SHAPES = ("square", "circle", "triangle", "cross")
# Sound name -> frequency in Hz (None: a white-noise burst). Pitches are octaves apart so that
# even a coarse log-mel encoder tells them apart.
SOUNDS: dict[str, float | None] = {
    "low tone": 220.0,
    "middle tone": 660.0,
    "high tone": 1980.0,
    "noise burst": None,
}
# Quadrant centres as fractions of the frame; shapes in one clip never share a quadrant, so
# overlapping visual events never occlude each other.
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.27, 0.27),
    "top right": (0.73, 0.27),
    "bottom left": (0.27, 0.73),
    "bottom right": (0.73, 0.73),
}
BACKGROUND = (24, 24, 32)
SPLIT_OF_INDEX = {8: "val", 9: "test"}  # index % 10; every other index trains

TASKS = ("caption", "qa", "grounding", "temporal_qa", "dialogue")


def fmt_time(seconds: float) -> str:
    """Seconds with one decimal, the one timestamp format used in text (DESIGN §3.7)."""
    return f"{seconds:.1f}"


def fmt_span(start: float, end: float) -> str:
    return f"from {fmt_time(start)} to {fmt_time(end)} seconds"


@dataclass(frozen=True)
class Event:
    """One event. `kind` is "visual", "audio" or "both" (a shape appearing with a sound)."""

    kind: str
    start: float
    end: float
    colour: str | None = None
    shape: str | None = None
    position: str | None = None
    sound: str | None = None

    @property
    def visible(self) -> bool:
        return self.kind in ("visual", "both")

    @property
    def audible(self) -> bool:
        return self.kind in ("audio", "both")

    @property
    def thing(self) -> str:
        """What the event is called in text: "the red square", "the high tone"."""
        if self.visible:
            return f"the {self.colour} {self.shape}"
        return f"the {self.sound}"

    def describe(self) -> str:
        """A clause without timestamps: "a red square appears with a low tone"."""
        if self.kind == "visual":
            return f"a {self.colour} {self.shape} appears"
        if self.kind == "audio":
            return f"a {self.sound} is heard"
        return f"a {self.colour} {self.shape} appears with a {self.sound}"

    def describe_timed(self) -> str:
        return f"{self.describe()} {fmt_span(self.start, self.end)}"


@dataclass(frozen=True)
class ClipSpec:
    """Everything needed to render one clip and to write its annotations."""

    clip_id: str
    index: int
    duration: float
    split: str
    events: tuple[Event, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        return asdict(self)


def _half_seconds(rng: np.random.Generator, low: float, high: float) -> float:
    """A random multiple of 0.5 in [low, high]."""
    return float(rng.integers(int(round(low * 2)), int(round(high * 2)) + 1)) / 2


def sample_clip(
    seed: int,
    index: int,
    min_duration: float = 6.0,
    max_duration: float = 30.0,
    max_events: int = 4,
) -> ClipSpec:
    """The spec of clip `index` of world `seed` (a pure function of its arguments)."""
    rng = np.random.default_rng([seed, index])
    duration = _half_seconds(rng, min_duration, max_duration)
    n_events = int(rng.integers(1, min(max_events, max(1, int(duration // 4))) + 1))
    colours = list(rng.permutation(list(COLOURS)))
    shapes = list(rng.permutation(list(SHAPES)))
    positions = list(rng.permutation(list(POSITIONS)))
    sounds = list(rng.permutation(list(SOUNDS)))
    events = []
    for _ in range(n_events):
        kinds = [
            k
            for k in ("visual", "audio", "both")
            if (k == "audio" or shapes) and (k == "visual" or sounds)
        ]
        if not kinds:
            break
        kind = str(rng.choice(kinds))
        length = _half_seconds(rng, 2.0, min(8.0, max(2.0, duration / 2)))
        start = _half_seconds(rng, 0.0, duration - length)
        visible = kind in ("visual", "both")
        audible = kind in ("audio", "both")
        events.append(
            Event(
                kind=kind,
                start=start,
                end=start + length,
                colour=str(colours.pop()) if visible else None,
                shape=str(shapes.pop()) if visible else None,
                position=str(positions.pop()) if visible else None,
                sound=str(sounds.pop()) if audible else None,
            )
        )
    events.sort(key=lambda e: (e.start, e.end))
    return ClipSpec(
        clip_id=f"syn{seed}-{index:05d}",
        index=index,
        duration=duration,
        split=SPLIT_OF_INDEX.get(index % 10, "train"),
        events=tuple(events),
    )


# ---- annotations ------------------------------------------------------------------------------
def _annotation(
    spec: ClipSpec, task: str, n: int, query: str, answer: str, spans=(), turns=()
) -> dict:
    return {
        "id": f"{spec.clip_id}-{task}-{n}",
        "video_id": spec.clip_id,
        "duration": spec.duration,
        "task": task,
        "query": query,
        "answer": answer,
        "spans": [list(s) for s in spans],
        "turns": [dict(t) for t in turns],
        "split": spec.split,
    }


def _caption(spec: ClipSpec) -> str:
    return " ".join(f"{e.describe_timed()}." for e in spec.events)


def _after(spec: ClipSpec, event: Event) -> Event | None:
    """The first event starting at or after `event` ends."""
    later = [e for e in spec.events if e.start >= event.end]
    return min(later, key=lambda e: (e.start, e.end)) if later else None


def _before(spec: ClipSpec, event: Event) -> Event | None:
    """The last event ending at or before `event` starts."""
    earlier = [e for e in spec.events if e.end <= event.start]
    return max(earlier, key=lambda e: (e.end, e.start)) if earlier else None


def annotations(spec: ClipSpec) -> list[dict]:
    """All annotation records of one clip, for the four training stages.

    Tasks: "caption" (stage 1), "qa" (stage 2), "grounding" and "temporal_qa" (stage 3),
    "dialogue" (stage 4). Spans are [start, end] in seconds.
    """
    out = [
        _annotation(spec, "caption", 0, "", _caption(spec), [(e.start, e.end) for e in spec.events])
    ]

    qa: list[tuple[str, str, list]] = []
    for e in spec.events:
        span = [(e.start, e.end)]
        if e.visible:
            qa.append((f"what colour is the {e.shape}?", f"{e.colour}.", span))
            qa.append((f"what shape is {e.colour}?", f"a {e.shape}.", span))
            qa.append((f"where is the {e.colour} {e.shape}?", f"in the {e.position}.", span))
        if e.kind == "both":
            qa.append(
                (
                    f"what sound is heard when the {e.colour} {e.shape} appears?",
                    f"a {e.sound}.",
                    span,
                )
            )
        if e.kind == "audio":
            qa.append((f"what sound is heard {fmt_span(e.start, e.end)}?", f"a {e.sound}.", span))
        if e.kind == "visual":
            qa.append((f"is there a sound when the {e.colour} {e.shape} appears?", "no.", span))
    present = {e.colour for e in spec.events if e.colour}
    absent = [c for c in COLOURS if c not in present]
    if absent:
        colour = absent[spec.index % len(absent)]
        qa.append((f"is there anything {colour}?", "no.", []))
    shown = [e for e in spec.events if e.visible]
    if shown:
        e = shown[spec.index % len(shown)]
        qa.append((f"is there anything {e.colour}?", "yes.", [(e.start, e.end)]))
    for n, (q, a, spans) in enumerate(qa):
        out.append(_annotation(spec, "qa", n, q, a, spans))

    for n, e in enumerate(spec.events):
        query = f"when does {e.thing} appear?" if e.visible else f"when is {e.thing} heard?"
        out.append(
            _annotation(
                spec, "grounding", n, query, f"{fmt_span(e.start, e.end)}.", [(e.start, e.end)]
            )
        )

    n = 0
    for e in spec.events:
        ends = "disappears" if e.visible else "stops"
        nxt = _after(spec, e)
        if nxt is not None:
            out.append(
                _annotation(
                    spec,
                    "temporal_qa",
                    n,
                    f"what happens after {e.thing} {ends}?",
                    f"{nxt.describe_timed()}.",
                    [(nxt.start, nxt.end)],
                )
            )
            n += 1
        prev = _before(spec, e)
        if prev is not None:
            verb = "appears" if e.visible else "is heard"
            out.append(
                _annotation(
                    spec,
                    "temporal_qa",
                    n,
                    f"what happens before {e.thing} {verb}?",
                    f"{prev.describe_timed()}.",
                    [(prev.start, prev.end)],
                )
            )
            n += 1

    out.append(_dialogue(spec))
    return out


def _dialogue(spec: ClipSpec) -> dict:
    seen = [e for e in spec.events if e.visible]
    heard = [e for e in spec.events if e.audible]
    turns = [{"role": "user", "content": "what do you see in the video?"}]
    if seen:
        said = " and ".join(f"a {e.colour} {e.shape} {fmt_span(e.start, e.end)}" for e in seen)
        turns.append({"role": "assistant", "content": f"i see {said}."})
    else:
        turns.append({"role": "assistant", "content": "i see no shapes."})
    turns.append({"role": "user", "content": "what do you hear?"})
    if heard:
        said = " and ".join(f"a {e.sound} {fmt_span(e.start, e.end)}" for e in heard)
        turns.append({"role": "assistant", "content": f"i hear {said}."})
    else:
        turns.append({"role": "assistant", "content": "i hear nothing."})
    first = spec.events[0]
    nxt = _after(spec, first)
    ends = "disappears" if first.visible else "stops"
    turns.append({"role": "user", "content": f"what happens after {first.thing} {ends}?"})
    turns.append(
        {
            "role": "assistant",
            "content": f"{nxt.describe_timed()}." if nxt else "nothing else happens.",
        }
    )
    spans = [(e.start, e.end) for e in spec.events]
    return _annotation(spec, "dialogue", 0, turns[0]["content"], turns[-1]["content"], spans, turns)


def annotation_texts(record: dict) -> list[str]:
    """The texts of one annotation record, as a language model would see them."""
    if record["turns"]:
        return [" ".join(t["content"] for t in record["turns"])]
    return [" ".join(part for part in (record["query"], record["answer"]) if part)]


def text_corpus(num_clips: int, seed: int) -> list[str]:
    """Every text of a world (captions, questions with answers, grounding answers, dialogues).

    Renders no media: this is cheap, for pretraining a tokenizer and a tiny language model on
    exactly the vocabulary the world uses.
    """
    texts: list[str] = []
    for index in range(num_clips):
        for record in annotations(sample_clip(seed, index)):
            texts.extend(annotation_texts(record))
    return texts

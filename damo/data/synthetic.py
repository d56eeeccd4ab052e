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

import json
import multiprocessing
import os
import re
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from damo.config.data import SyntheticConfig
from damo.config.schema import S3Config
from damo.data.records import fmt_span, make_record, read_records, write_records
from damo.media.encode import encode_mp4
from damo.storage import Storage, join

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
# The QA records' question types (`extra["question"]`), scored apart by evaluation.
QUESTION_TYPES = (
    "colour",
    "shape",
    "position",
    "sound_with_shape",
    "sound_at_time",
    "silent_shape",
    "colour_absent",
    "colour_present",
)


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

    def describe(self, place: bool = False) -> str:
        """A clause without timestamps: "a red square appears with a low tone"; with `place`,
        "a red square appears in the top left with a low tone"."""
        if self.kind == "audio":
            return f"a {self.sound} is heard"
        where = f" in the {self.position}" if place else ""
        sound = f" with a {self.sound}" if self.kind == "both" else ""
        return f"a {self.colour} {self.shape} appears{where}{sound}"

    def describe_timed(self, place: bool = False) -> str:
        return f"{self.describe(place)} {fmt_span(self.start, self.end)}"


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
    spec: ClipSpec,
    task: str,
    n: int,
    query: str,
    answer: str,
    spans=(),
    turns=(),
    modality: str | None = None,
    question: str | None = None,
) -> dict:
    """One record's fields; `modality` (visual / audio / both) says where the event can be
    perceived, which lets evaluation score audio-only queries on their own, and `question`
    names a QA question's type, which lets it score each type on its own."""
    extra = {"modality": modality} if modality else {}
    if question:
        extra["question"] = question
    return {
        "extra": extra,
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


def _caption(spec: ClipSpec, places: bool = False) -> str:
    return " ".join(f"{e.describe_timed(places)}." for e in spec.events)


def _words_made_wrong(caption: str, phrase: re.Pattern, vocabulary) -> str | None:
    """The caption with the words `phrase` captures made wrong, or None when it has none.

    Two different words: the first two that differ are swapped. Otherwise (one word, or every
    word the same): the first changes to another word of `vocabulary`, chosen from the
    caption's checksum, so the same caption always gets the same negative. Everything else is
    kept, so only those words tell the caption from its negative.
    """
    found = list(phrase.finditer(caption))
    if not found:
        return None
    words = [m.group(1) for m in found]
    pair = next(
        (
            (i, j)
            for i in range(len(words))
            for j in range(i + 1, len(words))
            if words[i] != words[j]
        ),
        None,
    )
    if pair is not None:
        i, j = pair
        words[i], words[j] = words[j], words[i]
    else:
        others = [w for w in vocabulary if w != words[0]]
        words[0] = others[zlib.crc32(caption.encode()) % len(others)]
    pieces, last = [], 0
    for match, word in zip(found, words, strict=True):
        pieces += [caption[last : match.start(1)], word]
        last = match.end(1)
    return "".join(pieces) + caption[last:]


_PLACE_PHRASE = re.compile(r" in the (" + "|".join(POSITIONS) + r")\b")
_SHAPE_PHRASE = re.compile(r"\b(?:" + "|".join(COLOURS) + r") (" + "|".join(SHAPES) + r")\b")


def place_negative(caption: str) -> str | None:
    """The caption with its places made wrong, or None when it names no place.

    Two or more places (a clip's shapes never share a quadrant): the first two are swapped (the
    shapes stay, their places trade). One place: it moves to another quadrant. Colours,
    shapes, sounds and times are kept, so only the place tells the caption from its negative.
    """
    return _words_made_wrong(caption, _PLACE_PHRASE, POSITIONS)


def shape_negative(caption: str) -> str | None:
    """The caption with its shapes made wrong, or None when it names no shape.

    Two different shapes: the first two that differ are swapped (the colours stay, their shapes
    trade). One shape, or every shape the same: the first changes to another shape. Colours,
    places, sounds and times are kept, so only the shape tells the caption from its negative.
    """
    return _words_made_wrong(caption, _SHAPE_PHRASE, SHAPES)


def _after(spec: ClipSpec, event: Event) -> Event | None:
    """The first event starting at or after `event` ends."""
    later = [e for e in spec.events if e.start >= event.end]
    return min(later, key=lambda e: (e.start, e.end)) if later else None


def _before(spec: ClipSpec, event: Event) -> Event | None:
    """The last event ending at or before `event` starts."""
    earlier = [e for e in spec.events if e.end <= event.start]
    return max(earlier, key=lambda e: (e.end, e.start)) if earlier else None


def annotations(spec: ClipSpec, caption_places: bool = False) -> list[dict]:
    """All annotation records of one clip, for the four training stages.

    Tasks: "caption" (stage 1), "qa" (stage 2), "grounding" and "temporal_qa" (stage 3),
    "dialogue" (stage 4). Spans are [start, end] in seconds. With `caption_places` the caption
    says where each shape is.
    """
    spans = [(e.start, e.end) for e in spec.events]
    out = [_annotation(spec, "caption", 0, "", _caption(spec, caption_places), spans)]

    qa: list[tuple[str, str, list, str]] = []  # question, answer, spans, question type
    for e in spec.events:
        span = [(e.start, e.end)]
        if e.visible:
            qa.append((f"what colour is the {e.shape}?", f"{e.colour}.", span, "colour"))
            qa.append((f"what shape is {e.colour}?", f"a {e.shape}.", span, "shape"))
            qa.append(
                (f"where is the {e.colour} {e.shape}?", f"in the {e.position}.", span, "position")
            )
        if e.kind == "both":
            qa.append(
                (
                    f"what sound is heard when the {e.colour} {e.shape} appears?",
                    f"a {e.sound}.",
                    span,
                    "sound_with_shape",
                )
            )
        if e.kind == "audio":
            qa.append(
                (
                    f"what sound is heard {fmt_span(e.start, e.end)}?",
                    f"a {e.sound}.",
                    span,
                    "sound_at_time",
                )
            )
        if e.kind == "visual":
            qa.append(
                (
                    f"is there a sound when the {e.colour} {e.shape} appears?",
                    "no.",
                    span,
                    "silent_shape",
                )
            )
    present = {e.colour for e in spec.events if e.colour}
    absent = [c for c in COLOURS if c not in present]
    if absent:
        colour = absent[spec.index % len(absent)]
        qa.append((f"is there anything {colour}?", "no.", [], "colour_absent"))
    shown = [e for e in spec.events if e.visible]
    if shown:
        e = shown[spec.index % len(shown)]
        qa.append((f"is there anything {e.colour}?", "yes.", [(e.start, e.end)], "colour_present"))
    for n, (q, a, spans, kind) in enumerate(qa):
        out.append(_annotation(spec, "qa", n, q, a, spans, question=kind))

    for n, e in enumerate(spec.events):
        query = f"when does {e.thing} appear?" if e.visible else f"when is {e.thing} heard?"
        out.append(
            _annotation(
                spec,
                "grounding",
                n,
                query,
                f"{fmt_span(e.start, e.end)}.",
                [(e.start, e.end)],
                modality=e.kind,
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


def text_corpus(num_clips: int, seed: int, settings: SyntheticConfig | None = None) -> list[str]:
    """Every text of a world (captions, questions with answers, grounding answers, dialogues).

    Renders no media: this is cheap, for pretraining a tokenizer and a tiny language model on
    exactly the vocabulary the world uses. `settings` (durations, events) default to those of
    `SyntheticConfig`; its num_clips and seed are replaced by the arguments.
    """
    settings = (settings or SyntheticConfig()).model_copy(
        update={"num_clips": num_clips, "seed": seed}
    )
    texts: list[str] = []
    for index in range(num_clips):
        for record in annotations(_sample(settings, index), settings.caption_places):
            texts.extend(annotation_texts(record))
    return texts


# ---- rendering ------------------------------------------------------------------------------
def _shape_mask(shape: str, position: str, width: int, height: int) -> np.ndarray:
    cx, cy = POSITIONS[position]
    radius = 0.2 * min(width, height)
    ys, xs = np.mgrid[0:height, 0:width]
    dx, dy = xs + 0.5 - cx * width, ys + 0.5 - cy * height
    inside = (np.abs(dx) <= radius) & (np.abs(dy) <= radius)
    if shape == "square":
        return inside
    if shape == "circle":
        return dx**2 + dy**2 <= radius**2
    if shape == "triangle":  # apex up
        return inside & (np.abs(dx) <= (dy + radius) / 2)
    if shape == "cross":
        return inside & ((np.abs(dx) <= radius / 3) | (np.abs(dy) <= radius / 3))
    raise ValueError(f"unknown shape {shape!r}")


def render_frames(spec: ClipSpec, width: int = 96, height: int = 96, fps: int = 8) -> np.ndarray:
    """(T, H, W, 3) uint8; frame i shows the events active at i / fps."""
    count = int(round(spec.duration * fps))
    frames = np.empty((count, height, width, 3), np.uint8)
    frames[:] = BACKGROUND
    for event in spec.events:
        if not event.visible:
            continue
        mask = _shape_mask(event.shape, event.position, width, height)
        first, last = int(round(event.start * fps)), int(round(event.end * fps))
        frames[first:last, mask] = COLOURS[event.colour]
    return frames


def render_audio(spec: ClipSpec, seed: int, sample_rate: int = 16000) -> np.ndarray:
    """Mono float32: each audible event's tone or noise between its start and end."""
    rng = np.random.default_rng([seed, spec.index, 1])
    total = int(round(spec.duration * sample_rate))
    audio = (0.002 * rng.standard_normal(total)).astype(np.float32)  # a faint noise floor
    fade = int(0.02 * sample_rate)  # 20 ms ramps keep onsets click-free
    for event in spec.events:
        if not event.audible:
            continue
        first, last = int(event.start * sample_rate), int(event.end * sample_rate)
        n = last - first
        hz = SOUNDS[event.sound]
        if hz is None:
            wave = 0.25 * rng.standard_normal(n)
        else:
            wave = 0.3 * np.sin(2 * np.pi * hz * np.arange(n) / sample_rate)
        envelope = np.ones(n)
        envelope[:fade] = np.linspace(0, 1, fade)
        envelope[-fade:] = np.linspace(1, 0, fade)
        audio[first:last] += (wave * envelope).astype(np.float32)
    return np.clip(audio, -1, 1)


def render_clip(spec: ClipSpec, seed: int, settings: SyntheticConfig | None = None) -> bytes:
    """The clip as mp4 bytes (H.264 + AAC)."""
    settings = settings or SyntheticConfig()
    frames = render_frames(spec, settings.width, settings.height, settings.fps)
    audio = render_audio(spec, seed, settings.sample_rate)
    return encode_mp4(frames, settings.fps, audio=audio, sample_rate=settings.sample_rate)


# ---- a world in object storage ----------------------------------------------------------------
@dataclass
class WorldSummary:
    root: str
    num_clips: int
    rendered: int  # clips rendered now (others already existed)
    records: dict[str, int]  # split -> records written
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def video_uri(root: str, clip_id: str) -> str:
    return join(root, "videos", f"{clip_id}.mp4")


def _sample(settings: SyntheticConfig, index: int) -> ClipSpec:
    return sample_clip(
        settings.seed,
        index,
        min_duration=settings.min_duration_s,
        max_duration=settings.max_duration_s,
        max_events=settings.max_events,
    )


def _render_one(job: tuple[str, S3Config, SyntheticConfig, int, bool]) -> bool:
    """Render and upload one clip; returns False when it already existed (kept)."""
    root, s3, settings, index, overwrite = job
    storage = Storage(s3)
    spec = _sample(settings, index)
    uri = video_uri(root, spec.clip_id)
    if not overwrite and storage.exists(uri):
        return False
    storage.write_bytes(uri, render_clip(spec, settings.seed, settings))
    return True


def world_records(root: str, specs: list[ClipSpec], caption_places: bool = False) -> list[dict]:
    """Every annotation of the world as unified records (damo.data.records)."""
    out = []
    for spec in specs:
        uri = video_uri(root, spec.clip_id)
        for annotation in annotations(spec, caption_places):
            extra = {"clip": spec.index, **annotation.pop("extra")}
            out.append(make_record(**annotation, video_uri=uri, source="synthetic", extra=extra))
    return out


def generate_world(
    root: str,
    storage: Storage,
    settings: SyntheticConfig | None = None,
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> WorldSummary:
    """Render a world's clips to `root/videos/`, its records to `root/records/<split>.parquet`,
    the ground-truth events to `root/clips.jsonl` and a manifest to `root/world.json`.

    Clips render in parallel processes (`workers`, default: every CPU). A re-run keeps clips
    that already exist unless `overwrite`.
    """
    started = time.perf_counter()
    settings = settings or SyntheticConfig()
    storage.ensure_bucket(root)
    specs = [_sample(settings, i) for i in range(settings.num_clips)]
    jobs = [(root, storage.s3, settings, i, overwrite) for i in range(settings.num_clips)]
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    bar = tqdm(total=len(jobs), desc="synthetic clips", unit="clip", disable=not progress)
    rendered = 0
    if workers == 1:
        for job in jobs:
            rendered += _render_one(job)
            bar.update()
    else:
        # spawn: the parent may hold threads (Ray, boto3) that fork would copy half-way
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            for done in pool.map(_render_one, jobs, chunksize=4):
                rendered += done
                bar.update()
    bar.close()

    records = world_records(root, specs, settings.caption_places)
    counts = {}
    for split in ("train", "val", "test"):
        rows = [r for r in records if r["split"] == split]
        counts[split] = write_records(rows, join(root, "records", f"{split}.parquet"), storage)
    clips_jsonl = "".join(json.dumps(spec.to_dict()) + "\n" for spec in specs)
    storage.write_bytes(join(root, "clips.jsonl"), clips_jsonl.encode())
    summary = WorldSummary(
        root=root,
        num_clips=settings.num_clips,
        rendered=rendered,
        records=counts,
        seconds=time.perf_counter() - started,
    )
    manifest = {"settings": settings.model_dump(), **summary.to_dict()}
    storage.write_bytes(join(root, "world.json"), json.dumps(manifest, indent=2).encode())
    return summary


def load_world_records(
    root: str, storage: Storage, splits: tuple[str, ...] = ("train", "val", "test")
) -> pa.Table:
    """The records of a generated world (all `splits` concatenated), as a pyarrow Table."""
    return pa.concat_tables(
        [read_records(join(root, "records", f"{split}.parquet"), storage) for split in splits]
    )


def load_world_clips(root: str, storage: Storage) -> list[ClipSpec]:
    """The ground truth of a generated world: every clip with its events."""
    clips = []
    for line in storage.read_bytes(join(root, "clips.jsonl")).decode().splitlines():
        row = json.loads(line)
        row["events"] = tuple(Event(**event) for event in row["events"])
        clips.append(ClipSpec(**row))
    return clips

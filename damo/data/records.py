"""One record schema for every annotation source, and adapters for the real dataset formats.

A record is one training or evaluation example about one video. Every source (the synthetic
world, Charades-STA, QVHighlights, ActivityNet Captions) becomes rows of `RECORD_SCHEMA`:

- id (string, unique): `<source>-<split>-<n>`, or the dataset's own query id.
- video_id (string): the dataset's video id (Charades `3MSZA`, ActivityNet `v_...`).
- video_uri (string, nullable): where the media is (s3://, file://, a path); null if unknown.
- duration (float64 seconds, nullable): null when the source does not say (Charades-STA).
- task (string): caption, qa, grounding, temporal_qa or dialogue.
- query (string): the question or grounding query; "" for captions.
- answer (string): the target text, timestamps as "from 1.0 to 2.5 seconds".
- spans (list of [start, end] float64 seconds): ground-truth windows (several for QVHighlights).
- turns (list of {role, content}): dialogue turns for task "dialogue", else empty.
- source (string): synthetic, charades_sta, qvhighlights or activitynet.
- split (string): train, val, test, or the dataset's own split name (e.g. val_2).
- extra (string, a JSON object): source-specific fields kept for evaluation (QVHighlights qid,
  saliency scores, clip ids; `dropped_spans`).

Spans are clipped to [0, duration] when the duration is known; a span that is empty after
clipping is dropped (and counted in `extra` as `dropped_spans`).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from damo.storage import Storage

TASKS = ("caption", "qa", "grounding", "temporal_qa", "dialogue")

TURN_TYPE = pa.struct([("role", pa.string()), ("content", pa.string())])
SPAN_TYPE = pa.list_(pa.float64(), 2)


def _field(name: str, type_: pa.DataType, doc: str, nullable: bool = True) -> pa.Field:
    return pa.field(name, type_, nullable=nullable, metadata={"doc": doc})


RECORD_SCHEMA = pa.schema(
    [
        _field("id", pa.string(), "unique record id", nullable=False),
        _field("video_id", pa.string(), "the dataset's video id", nullable=False),
        _field("video_uri", pa.string(), "URI of the media; null when unknown"),
        _field("duration", pa.float64(), "video length in seconds; null when unknown"),
        _field("task", pa.string(), f"one of {', '.join(TASKS)}", nullable=False),
        _field("query", pa.string(), "question or grounding query; empty for captions"),
        _field("answer", pa.string(), "target text, timestamps as 'from 1.0 to 2.5 seconds'"),
        _field("spans", pa.list_(SPAN_TYPE), "ground-truth [start, end] windows in seconds"),
        _field("turns", pa.list_(TURN_TYPE), "dialogue turns {role, content}"),
        _field("source", pa.string(), "dataset the record comes from", nullable=False),
        _field("split", pa.string(), "train / val / test or the dataset's split name"),
        _field("extra", pa.string(), "JSON object of source-specific fields"),
    ]
)
RECORD_FIELDS = tuple(RECORD_SCHEMA.names)


class RecordFormatError(ValueError):
    """An annotation file that does not follow its format; names the file and the line."""


def fmt_span(start: float, end: float) -> str:
    """The one timestamp style in text (DESIGN §3.7): seconds with one decimal."""
    return f"from {start:.1f} to {end:.1f} seconds"


def make_record(**fields: Any) -> dict[str, Any]:
    """A record with every schema field present (missing ones get empty defaults)."""
    unknown = set(fields) - set(RECORD_FIELDS)
    if unknown:
        raise ValueError(f"unknown record fields: {sorted(unknown)}")
    record = {
        "video_uri": None,
        "duration": None,
        "query": "",
        "answer": "",
        "spans": [],
        "turns": [],
        "split": "",
        "extra": "{}",
        **fields,
    }
    if isinstance(record["extra"], dict):
        record["extra"] = json.dumps(record["extra"], sort_keys=True)
    record["spans"] = [[float(s), float(e)] for s, e in record["spans"]]
    if record["task"] not in TASKS:
        raise ValueError(f"unknown task {record['task']!r} (known: {', '.join(TASKS)})")
    return {name: record[name] for name in RECORD_FIELDS}


def clip_spans(
    spans: Iterable[Iterable[float]], duration: float | None
) -> tuple[list[list[float]], int]:
    """Spans clipped to [0, duration]; returns (kept, number dropped as empty)."""
    kept, dropped = [], 0
    for start, end in spans:
        start, end = float(start), float(end)
        if duration is not None:
            start, end = max(0.0, min(start, duration)), max(0.0, min(end, duration))
        if end > start:
            kept.append([start, end])
        else:
            dropped += 1
    return kept, dropped


# ---- tables and files ------------------------------------------------------------------------
def grounding_record(
    record_id: str,
    video_id: str,
    video_uri_template: str | None,
    duration: float | None,
    sentence: str,
    span,
    source: str,
    split: str,
) -> dict[str, Any]:
    """One grounding query of a dataset: its span clipped to the video, the answer text, and
    the parts of the span that fell outside the video noted in `extra`."""
    spans, dropped = clip_spans([span], duration)
    return make_record(
        id=record_id,
        video_id=video_id,
        video_uri=video_uri_template.format(video_id=video_id) if video_uri_template else None,
        duration=duration,
        task="grounding",
        query=sentence.strip(),
        answer=f"{fmt_span(*spans[0])}." if spans else "",
        spans=spans,
        source=source,
        split=split,
        extra={"dropped_spans": dropped} if dropped else {},
    )


def records_to_table(records: Iterable[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(list(records), schema=RECORD_SCHEMA)


def write_records(records: Iterable[dict[str, Any]], uri: str, storage: Storage) -> int:
    """Write records as one Parquet file; returns how many."""
    return write_table(records_to_table(records), uri, storage)


def write_table(table: pa.Table, uri: str, storage: Storage) -> int:
    """Write a records table as one Parquet object (atomically, as Storage writes); returns
    its rows. Callers that write several files build every table first, so that a record that
    does not fit the schema fails before anything is written."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    storage.write_bytes(uri, buffer.getvalue())
    return table.num_rows


def read_records(uri: str, storage: Storage) -> pa.Table:
    table = pq.read_table(io.BytesIO(storage.read_bytes(uri)))
    return table.cast(RECORD_SCHEMA)


def _read_text(uri: str, storage: Storage | None) -> str:
    return (storage or Storage()).read_bytes(uri).decode("utf-8")


# ---- Charades-STA ----------------------------------------------------------------------------
def parse_charades_sta(
    text: str,
    split: str,
    durations: dict[str, float] | None = None,
    video_uri_template: str | None = None,
    name: str = "charades_sta",
) -> list[dict[str, Any]]:
    """`VIDEOID start end##sentence` per line -> grounding records.

    The file has no durations; pass `durations` (video id -> seconds) to fill and clip them.
    `video_uri_template` like "s3://bucket/charades/{video_id}.mp4" fills `video_uri`.
    """
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        head, sep, sentence = line.partition("##")
        parts = head.split()
        if not sep or len(parts) != 3:
            raise RecordFormatError(
                f"{name}:{number}: expected 'VID start end##sentence': {line!r}"
            )
        video_id, start, end = parts
        try:
            span = [float(start), float(end)]
        except ValueError as err:
            raise RecordFormatError(f"{name}:{number}: bad times in {line!r}") from err
        duration = (durations or {}).get(video_id)
        records.append(
            grounding_record(
                f"charades_sta-{split}-{number}",
                video_id,
                video_uri_template,
                duration,
                sentence,
                span,
                "charades_sta",
                split,
            )
        )
    return records


def read_charades_sta(
    uri: str, split: str, storage: Storage | None = None, **kwargs
) -> list[dict[str, Any]]:
    return parse_charades_sta(_read_text(uri, storage), split, name=uri, **kwargs)


def parse_charades_durations(text: str, name: str = "Charades_v1.csv") -> dict[str, float]:
    """Video id -> seconds from Charades' own `Charades_v1_{train,test}.csv` (columns `id` and
    `length`, among others): the durations Charades-STA's files lack."""
    reader = csv.DictReader(io.StringIO(text))
    missing = {"id", "length"} - set(reader.fieldnames or ())
    if missing:
        raise RecordFormatError(f"{name}:1: the header lacks {', '.join(sorted(missing))}")
    durations = {}
    for row in reader:
        try:
            durations[row["id"]] = float(row["length"])
        except (TypeError, ValueError) as err:
            raise RecordFormatError(
                f"{name}:{reader.line_num}: bad length {row.get('length')!r}"
            ) from err
    return durations


# ---- QVHighlights ----------------------------------------------------------------------------
def parse_qvhighlights(
    text: str, split: str, video_uri_template: str | None = None, name: str = "qvhighlights"
) -> list[dict[str, Any]]:
    """QVHighlights jsonl (qid, query, duration, vid, relevant_windows, ...) -> records.

    The test split has no windows: such records have empty spans and answer. Clip ids,
    saliency scores and the qid are kept in `extra` for the official metrics.
    """
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            qid, vid, query = row["qid"], row["vid"], row["query"]
            if not isinstance(vid, str) or not isinstance(query, str):
                raise TypeError("vid and query must be strings")
            duration = float(row["duration"]) if row.get("duration") is not None else None
            spans, dropped = clip_spans(row.get("relevant_windows") or [], duration)
        except (KeyError, TypeError, ValueError, AttributeError) as err:  # JSON errors too
            raise RecordFormatError(
                f"{name}:{number}: not a QVHighlights row: {_describe(err)}"
            ) from err
        extra = {
            "qid": qid,
            "relevant_clip_ids": row.get("relevant_clip_ids"),
            "saliency_scores": row.get("saliency_scores"),
        }
        if dropped:
            extra["dropped_spans"] = dropped
        records.append(
            make_record(
                id=f"qvhighlights-{qid}",
                video_id=vid,
                video_uri=video_uri_template.format(video_id=vid) if video_uri_template else None,
                duration=duration,
                task="grounding",
                query=query.strip(),
                answer=" and ".join(fmt_span(s, e) for s, e in spans) + "." if spans else "",
                spans=spans,
                source="qvhighlights",
                split=split,
                extra={k: v for k, v in extra.items() if v is not None},
            )
        )
    return records


def read_qvhighlights(
    uri: str, split: str, storage: Storage | None = None, **kwargs
) -> list[dict[str, Any]]:
    return parse_qvhighlights(_read_text(uri, storage), split, name=uri, **kwargs)


def qvhighlights_submission(predictions: Iterable[dict[str, Any]]) -> str:
    """QVHighlights submission jsonl: one line per query.

    Each prediction needs `qid`, `query`, `vid`, `pred_relevant_windows` ([start, end, score]
    lists, best first) and optionally `pred_saliency_scores` (one score per 2 s clip).
    """
    lines = []
    for pred in predictions:
        missing = {"qid", "query", "vid", "pred_relevant_windows"} - set(pred)
        if missing:
            raise ValueError(f"prediction {pred.get('qid')!r} lacks {sorted(missing)}")
        row = {
            "qid": pred["qid"],
            "query": pred["query"],
            "vid": pred["vid"],
            "pred_relevant_windows": [
                [round(float(s), 4), round(float(e), 4), round(float(score), 4)]
                for s, e, score in pred["pred_relevant_windows"]
            ],
        }
        if pred.get("pred_saliency_scores") is not None:
            row["pred_saliency_scores"] = [round(float(x), 4) for x in pred["pred_saliency_scores"]]
        lines.append(json.dumps(row))
    return "".join(line + "\n" for line in lines)


def write_qvhighlights_submission(
    predictions: Iterable[dict[str, Any]], uri: str, storage: Storage | None = None
) -> None:
    (storage or Storage()).write_bytes(uri, qvhighlights_submission(predictions).encode())


# ---- ActivityNet Captions --------------------------------------------------------------------
def parse_activitynet(
    text: str, split: str, video_uri_template: str | None = None, name: str = "activitynet"
) -> list[dict[str, Any]]:
    """`{"v_ID": {"duration", "timestamps", "sentences"}}` -> one grounding record per sentence.

    Sentences lose their leading space; spans past the duration are clipped to it.
    """
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise RecordFormatError(f"{name}:{err.lineno}: not JSON: {err}") from err
    if not isinstance(data, dict):
        raise RecordFormatError(f"{name}:1: the top level must map video ids to annotations")
    records = []
    for video_id in sorted(data):
        try:
            records.extend(_activitynet_video(video_id, data[video_id], split, video_uri_template))
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise RecordFormatError(
                f"{name}:{_line_of(text, video_id)}: {video_id}: bad entry: {_describe(err)}"
            ) from err
    return records


def _activitynet_video(
    video_id: str, entry: dict, split: str, video_uri_template: str | None
) -> list[dict[str, Any]]:
    duration = float(entry["duration"])
    pairs = list(zip(entry["timestamps"], entry["sentences"], strict=True))
    return [
        grounding_record(
            f"activitynet-{split}-{video_id}-{n}",
            video_id,
            video_uri_template,
            duration,
            sentence,
            span,
            "activitynet",
            split,
        )
        for n, (span, sentence) in enumerate(pairs)
    ]


def _line_of(text: str, key: str) -> int:
    """The line where a JSON key first appears (ActivityNet's official files are one line;
    pretty-printed ones are not), so an error can name the line."""
    at = text.find(json.dumps(key, ensure_ascii=False))
    return text.count("\n", 0, at) + 1 if at >= 0 else 1


def _describe(err: Exception) -> str:
    """A parse error in words: a KeyError alone would print only the key."""
    return f"missing field {err}" if isinstance(err, KeyError) else str(err)


def read_activitynet(
    uri: str, split: str, storage: Storage | None = None, **kwargs
) -> list[dict[str, Any]]:
    return parse_activitynet(_read_text(uri, storage), split, name=uri, **kwargs)

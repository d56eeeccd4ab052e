"""`damo data import`: a dataset's official annotation files -> `<out>/<split>.parquet` records.

The videos prefix is listed once. Each record's `video_uri` is the listed object whose file name
is the record's video id (with any extension), so it is the very URI that `damo extract
--videos` gives that video's feature row, and training joins the two on it. Annotations whose
video is not listed are reported; they keep the URI the video would have (`<videos>/<id>.mp4`),
so uploading it there and extracting again is enough, or, with `drop_missing`, are left out.

Every file is read and every table built before anything is written, so a malformed line or a
missing file leaves the output as it was; each object is then written atomically (Storage).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from damo.data.records import (
    RecordFormatError,
    parse_activitynet,
    parse_charades_durations,
    parse_charades_sta,
    parse_qvhighlights,
    records_to_table,
    write_table,
)
from damo.storage import Storage, join, parse_uri

SPLIT_NAME = re.compile(r"[A-Za-z0-9_-]+")
REPORT_FILE = "import.json"  # next to the records: the full lists the console shortens


class DatasetImportError(ValueError):
    """An import asked for something that cannot be done (unknown format, bad split list)."""


# (text, split, file name, Charades durations or None) -> records
Reader = Callable[[str, str, str, dict[str, float] | None], list[dict[str, Any]]]


@dataclass(frozen=True)
class DatasetFormat:
    name: str
    splits: dict[str, str]  # split -> the official file name, under --annotations
    read: Reader
    takes_durations: bool = False


FORMATS = {
    "charades-sta": DatasetFormat(
        "charades-sta",
        # Charades-STA has no validation file: hold some training videos out (val_from_train)
        {"train": "charades_sta_train.txt", "test": "charades_sta_test.txt"},
        lambda text, split, name, durations: parse_charades_sta(
            text, split, durations=durations, name=name
        ),
        takes_durations=True,
    ),
    "qvhighlights": DatasetFormat(
        "qvhighlights",
        {
            "train": "highlight_train_release.jsonl",
            "val": "highlight_val_release.jsonl",
            "test": "highlight_test_release.jsonl",  # no windows: scored by the official server
        },
        lambda text, split, name, _: parse_qvhighlights(text, split, name=name),
    ),
    "activitynet": DatasetFormat(
        "activitynet",
        # grounding is reported on val_2, so val_1 is the split that picks checkpoints
        {"train": "train.json", "val": "val_1.json", "test": "val_2.json"},
        lambda text, split, name, _: parse_activitynet(text, split, name=name),
    ),
}


@dataclass
class SplitReport:
    split: str
    annotations: str
    records: int  # written
    videos: int  # distinct videos annotated
    missing_videos: list[str]  # annotated video ids not in the videos listing
    missing_records: int  # annotations of those videos (written unless dropped)


@dataclass
class ImportReport:
    format: str
    out: str
    videos_prefix: str
    videos_listed: int
    dropped_missing: bool
    ambiguous_ids: list[str] = field(default_factory=list)  # listed with two extensions
    splits: list[SplitReport] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def dataset_format(name: str) -> DatasetFormat:
    if name not in FORMATS:
        raise DatasetImportError(f"unknown format '{name}' (known: {', '.join(FORMATS)})")
    return FORMATS[name]


def split_files(
    fmt: DatasetFormat, annotations: str | None, splits: dict[str, str] | None
) -> dict[str, str]:
    """split -> annotation file URI: the given splits, else the format's official files.
    A file given as a bare name is looked for under `annotations`."""
    if not splits and annotations is None:
        raise DatasetImportError("give --annotations PREFIX, or each file with --split NAME=URI")
    chosen = splits or fmt.splits
    for split in chosen:
        if not SPLIT_NAME.fullmatch(split):  # it names <out>/<split>.parquet
            raise DatasetImportError(f"split name '{split}': use letters, digits, - and _")
    return {split: _locate(file, annotations) for split, file in chosen.items()}


def _locate(file: str, annotations: str | None) -> str:
    if annotations is None or "://" in file or os.path.isabs(file):
        return file
    return join(annotations, file)


def read_text(uri: str, storage: Storage) -> str:
    try:
        return storage.read_bytes(uri).decode("utf-8-sig")  # a BOM is no part of line 1
    except UnicodeDecodeError as err:
        raise RecordFormatError(f"{uri}: not UTF-8 text (byte {err.start})") from err


def read_durations(uris: list[str], storage: Storage) -> dict[str, float]:
    durations: dict[str, float] = {}
    for uri in uris:
        durations.update(parse_charades_durations(read_text(uri, storage), name=uri))
    return durations


# ---- videos -----------------------------------------------------------------------------------
def list_videos(storage: Storage, videos: str) -> tuple[dict[str, str], list[str]]:
    """(video id -> URI, ids listed under two extensions) from one listing of the prefix.

    The listing is the one `damo extract --videos` makes (damo.data.extract.video_uris: the
    prefix with a trailing slash, dot files left out), so the URIs are its feature rows' own.
    An object is found by its file name and by that name less its extension: QVHighlights ids
    such as `NUsG9BgSes0_210.0_360.0` have dots of their own.
    """
    index: dict[str, str] = {}
    ambiguous: set[str] = set()
    for info in storage.list_objects(videos.rstrip("/") + "/"):
        file_name = info.uri.rsplit("/", 1)[-1]
        if file_name.startswith("."):
            continue
        stem = file_name.rsplit(".", 1)[0]
        for key in dict.fromkeys((file_name, stem)):
            if key in index and index[key] != info.uri:
                ambiguous.add(key)  # the listing is sorted: the first URI stays
            index.setdefault(key, info.uri)
    return index, sorted(ambiguous)


def expected_video_uri(videos: str, video_id: str, extension: str) -> str:
    """Where a missing video would be listed, in the form the listing gives (local listings
    are absolute paths, or file:// URIs when the prefix was one)."""
    name = f"{video_id}.{extension}"
    loc = parse_uri(videos)
    if loc.scheme != "file":
        return join(videos, name)
    path = os.path.join(loc.path, name)
    return f"file://{path}" if videos.startswith("file://") else path


def place_videos(
    records: list[dict[str, Any]],
    index: dict[str, str],
    videos: str,
    extension: str = "mp4",
    drop_missing: bool = False,
) -> tuple[list[dict[str, Any]], list[str], int]:
    """(records with `video_uri` set, sorted missing video ids, records of missing videos)."""
    placed, missing, missing_records = [], set(), 0
    for record in records:
        uri = index.get(record["video_id"])
        if uri is None:
            missing.add(record["video_id"])
            missing_records += 1
            if drop_missing:
                continue
            uri = expected_video_uri(videos, record["video_id"], extension)
        placed.append({**record, "video_uri": uri})
    return placed, sorted(missing), missing_records


# ---- splits -----------------------------------------------------------------------------------
def held_out(video_id: str, fraction: float) -> bool:
    """A stable choice by video id (not Python's salted hash): the same videos every import."""
    digest = hashlib.sha256(video_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def hold_out_val(
    records: list[dict[str, Any]], fraction: float
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, val): the records of about `fraction` of the videos move to split `val`. By
    video, so that no video is in both; ids keep the training file's line they came from."""
    train, val = [], []
    for record in records:
        if held_out(record["video_id"], fraction):
            val.append({**record, "split": "val"})
        else:
            train.append(record)
    return train, val


def parse_splits(
    fmt: DatasetFormat,
    files: dict[str, str],
    storage: Storage,
    durations: dict[str, float] | None,
    val_from_train: float | None,
) -> dict[str, list[dict[str, Any]]]:
    parsed = {
        split: fmt.read(read_text(uri, storage), split, uri, durations)
        for split, uri in files.items()
    }
    if val_from_train is not None:
        parsed["train"], parsed["val"] = hold_out_val(parsed["train"], val_from_train)
    return parsed


# ---- the library function -----------------------------------------------------------------------
def import_dataset(
    format_name: str,
    videos: str,
    out: str,
    storage: Storage,
    annotations: str | None = None,
    splits: dict[str, str] | None = None,
    durations: list[str] | None = None,
    val_from_train: float | None = None,
    drop_missing: bool = False,
    extension: str = "mp4",
) -> ImportReport:
    """Turn a dataset's official annotation files into `<out>/<split>.parquet` records whose
    `video_uri` points into `videos`, and write `<out>/import.json` (the report).

    `splits` maps split names to files (bare names are under `annotations`); by default the
    format's official files. `durations` are Charades' `Charades_v1_*.csv` files (Charades-STA
    only). `val_from_train` holds out that fraction of the training videos as split `val`.
    """
    fmt = dataset_format(format_name)
    if durations and not fmt.takes_durations:
        raise DatasetImportError(f"durations files are for charades-sta, not {fmt.name}")
    if val_from_train is not None and not 0 < val_from_train < 1:
        raise DatasetImportError(f"the held-out fraction must be in (0, 1), got {val_from_train}")
    files = split_files(fmt, annotations, splits)
    if val_from_train is not None and ("train" not in files or "val" in files):
        raise DatasetImportError(
            "a held-out val split needs a train split and no val split of its own "
            f"(splits: {', '.join(files)})"
        )
    lengths = read_durations(durations, storage) if durations else None
    parsed = parse_splits(fmt, files, storage, lengths, val_from_train)
    index, ambiguous = list_videos(storage, videos)
    report = ImportReport(fmt.name, out, videos, len(set(index.values())), drop_missing, ambiguous)
    tables = {}
    for split, records in parsed.items():
        placed, missing, missing_records = place_videos(
            records, index, videos, extension, drop_missing
        )
        tables[split] = records_to_table(placed)
        report.splits.append(
            SplitReport(
                split,
                files.get(split, files.get("train", "")),  # a held-out val: the train file
                tables[split].num_rows,
                len({r["video_id"] for r in records}),
                missing,
                missing_records,
            )
        )
    for split, table in tables.items():
        write_table(table, join(out, f"{split}.parquet"), storage)
    storage.write_bytes(join(out, REPORT_FILE), json.dumps(report.to_dict(), indent=2).encode())
    return report

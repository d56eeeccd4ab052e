"""Training data: feature shards joined with annotation records, per stage, as Ray Datasets.

A Ray Train worker reads its shard with `get_dataset_shard("train").iter_torch_batches(
collate_fn=StageCollator(...))`. Rows carry the cached encoder features of one video plus the
text of one record; the collator tokenises that text for the stage's objective and returns
exactly the batch dict `DamoModel.forward` takes (see damo/model/damo.py).
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from damo.data.records import read_records
from damo.storage import Storage, join

FEATURE_COLUMNS = (
    "video_uri",
    "visual_features",
    "frame_times",
    "audio_features",
    "segment_bounds",
    "has_audio",
    "duration",
)
CAPTION_PROMPT = "describe the video."


@dataclass
class JoinReport:
    """How many records found features; the rest are reported, never silently dropped."""

    records: int
    matched: int
    videos_without_features: list[str]

    @property
    def unmatched(self) -> int:
        return self.records - self.matched


def conversation(record: dict) -> list[dict]:
    """The chat turns a record trains: its dialogue, or one question and its answer."""
    if record["task"] == "dialogue":
        return [{"role": t["role"], "content": t["content"]} for t in record["turns"]]
    question = record["query"] or CAPTION_PROMPT
    return [
        {"role": "user", "content": question},
        {"role": "assistant", "content": record["answer"]},
    ]


def feature_files(features_uri: str, storage: Storage):
    """(filesystem, paths) of the feature shards of an extraction output; an error if none."""
    fs, paths = storage.parquet_files(join(features_uri, "features"))
    if not paths:
        raise FileNotFoundError(f"no feature shards under {features_uri}/features")
    return fs, paths


def stage_records(records: pa.Table, tasks: tuple[str, ...], split: str | None) -> dict[str, list]:
    """video_uri -> the texts of its records for these tasks (and split)."""
    by_video: dict[str, list[dict]] = defaultdict(list)
    for record in records.to_pylist():
        if record["task"] not in tasks or (split is not None and record["split"] != split):
            continue
        by_video[record["video_uri"]].append(
            {
                "record_id": record["id"],
                "task": record["task"],
                "caption": record["answer"] if record["task"] == "caption" else "",
                "conversation": json.dumps(conversation(record)),
                # what evaluation compares against
                "query": record["query"] or "",
                "answer": record["answer"] or "",
                "spans": json.dumps(record["spans"] or []),
                "extra": record["extra"] or "{}",
            }
        )
    return dict(by_video)


def training_dataset(
    features_uri: str,
    records_uri: str,
    tasks: tuple[str, ...],
    storage: Storage,
    split: str | None = None,
):
    """(ray.data.Dataset with one row per record that has features, JoinReport).

    The records table is small (text) and goes to every task by value; the feature shards are
    read in parallel and expanded to one row per record of their video.
    """
    import pyarrow.dataset as pads
    import ray

    fs, paths = feature_files(features_uri, storage)
    by_video = stage_records(read_records(records_uri, storage), tasks, split)
    available = set(
        pads.dataset(paths, filesystem=fs, format="parquet")
        .to_table(columns=["video_uri"])
        .column("video_uri")
        .to_pylist()
    )
    missing = sorted(set(by_video) - available)
    report = JoinReport(
        records=sum(len(v) for v in by_video.values()),
        matched=sum(len(v) for uri, v in by_video.items() if uri in available),
        videos_without_features=missing,
    )

    def expand(row: dict) -> list[dict]:
        return [
            {**{k: row[k] for k in FEATURE_COLUMNS}, **text}
            for text in by_video.get(row["video_uri"], [])
        ]

    dataset = ray.data.read_parquet(paths, filesystem=fs, columns=list(FEATURE_COLUMNS))
    return dataset.flat_map(expand), report


def read_feature_table(features_uri: str, storage: Storage) -> pa.Table:
    """Every feature row under `features_uri` in one Arrow table (for evaluation and tools)."""
    import pyarrow.dataset as pads
    import ray.data  # noqa: F401  registers Ray's tensor extension types with pyarrow

    fs, paths = feature_files(features_uri, storage)
    return pads.dataset(paths, filesystem=fs, format="parquet").to_table()


def table_to_numpy(table: pa.Table) -> dict[str, np.ndarray]:
    """Arrow columns -> numpy, tensor columns with their shapes (B, ...)."""
    out = {}
    for name in table.column_names:
        column = table.column(name)
        if hasattr(column.type, "shape"):  # Ray's fixed-shape tensor extension
            out[name] = np.concatenate([chunk.to_numpy() for chunk in column.chunks])
        else:
            out[name] = column.to_numpy(zero_copy_only=False)
    return out


# ---- collation ---------------------------------------------------------------------------
def video_tensors(batch: dict[str, np.ndarray]) -> dict:
    """Feature columns of a numpy batch -> the `VideoFeatures` fields as tensors."""
    import torch

    visual = torch.as_tensor(np.stack(list(batch["visual_features"])))  # (B, T, 1+P, Dv)
    audio = torch.as_tensor(np.stack(list(batch["audio_features"])))  # (B, M, L, Da)
    bounds = torch.as_tensor(np.stack(list(batch["segment_bounds"])))  # (B, M, 2)
    has_audio = torch.as_tensor(np.asarray(batch["has_audio"], dtype=bool))  # (B,)
    return {
        "visual": visual,
        "visual_times": torch.as_tensor(np.stack(list(batch["frame_times"]))).float(),
        "visual_mask": torch.ones(visual.shape[:2], dtype=torch.bool),
        "audio": audio,
        "audio_times": bounds.mean(dim=-1).float(),  # (B, M) segment centres
        "audio_mask": has_audio[:, None].expand(-1, audio.shape[1]).clone(),  # (B, M)
    }


class StageCollator:
    """numpy batch -> DamoModel batch for one objective ("alignment" or "lm").

    alignment: captions through the text encoder's tokenizer (`tokenize_text`);
    lm: conversations through the LLM's chat template (`prompt_builder`), answers as labels.
    """

    def __init__(self, objective: str, prompt_builder=None, tokenize_text=None):
        if objective == "alignment" and tokenize_text is None:
            raise ValueError("the alignment objective needs tokenize_text")
        if objective == "lm" and prompt_builder is None:
            raise ValueError("the lm objective needs a prompt_builder")
        self.objective = objective
        self.prompt_builder = prompt_builder
        self.tokenize_text = tokenize_text

    def __call__(self, batch: dict[str, np.ndarray]) -> dict:
        out = video_tensors(batch)
        if self.objective == "alignment":
            out.update(self.tokenize_text([str(c) for c in batch["caption"]]))
        else:
            conversations = [json.loads(str(c)) for c in batch["conversation"]]
            out.update(self.prompt_builder(conversations))
        return out

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
    stale_rows: int = 0  # feature rows of another decode/encoder config, not read
    duplicate_rows: int = 0  # older rows of a video that has a newer current one
    rows: int = 0  # rows the dataset yields: `matched`, each record counted as often as it is read

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


@dataclass
class FeatureSelection:
    """The one current feature row of each video: which shard holds it, under which key.

    Shards may hold stale rows (an older decode/encoder config, an older version of the
    object) and duplicates (a re-run that wrote the same key again); only rows whose
    `config_hash` is the current one count, and of several rows for a video the one in the
    most recently written shard wins (ties: the last path, then the last key).
    """

    filesystem: object
    chosen: dict[str, tuple[str, str]]  # video_uri -> (shard path, row key)
    stale_rows: int  # rows of another feature config
    duplicate_rows: int  # current rows that lost to a newer one of the same video

    @property
    def paths(self) -> list[str]:
        return sorted({path for path, _ in self.chosen.values()})

    @property
    def keys(self) -> list[str]:
        return sorted({key for _, key in self.chosen.values()})


def select_feature_rows(
    features_uri: str, storage: Storage, feature_hash: str, videos: set[str] | None = None
) -> FeatureSelection:
    """Scan only the small columns of the shards (filter pushed into the Parquet scan) and
    pick one current row per video (of `videos`, when given)."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    fs, paths = feature_files(features_uri, storage)
    mtimes = {info.path: info.mtime_ns or 0 for info in fs.get_file_info(paths)}
    current = pc.field("config_hash") == feature_hash
    if videos is not None:
        current = current & pc.field("video_uri").isin(sorted(videos))
    candidates: list[tuple[tuple, str, str, str]] = []  # (order, video, path, key)
    stale = 0
    for fragment in pads.dataset(paths, filesystem=fs, format="parquet").get_fragments():
        if "config_hash" not in fragment.physical_schema.names:
            stale += fragment.count_rows()  # written before rows carried their config hash
            continue
        stale += fragment.count_rows(filter=pc.field("config_hash") != feature_hash)
        table = fragment.to_table(columns=["video_uri", "key"], filter=current)
        for video, key in zip(
            table.column("video_uri").to_pylist(), table.column("key").to_pylist(), strict=True
        ):
            order = (mtimes.get(fragment.path, 0), fragment.path, key)
            candidates.append((order, video, fragment.path, key))
    chosen: dict[str, tuple[str, str]] = {}
    for _, video, path, key in sorted(candidates):
        chosen[video] = (path, key)  # later (newer) shards overwrite older ones
    return FeatureSelection(fs, chosen, stale, len(candidates) - len(chosen))


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


def feature_dataset(selection: FeatureSelection, feature_hash: str):
    """The selected rows (one per video) as a ray.data.Dataset of FEATURE_COLUMNS.

    Only the shards holding a selected row are read, with the selection (current feature
    hash, one key per video) pushed into the Parquet scan; a duplicate of a selected key in
    another shard is dropped after the read, by its path.
    """
    import ray
    from ray.data.expressions import col

    chosen = selection.chosen

    def chosen_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keep = np.array(
            [
                chosen.get(video) == (path, key)
                for video, path, key in zip(
                    batch["video_uri"], batch["path"], batch["key"], strict=True
                )
            ],
            dtype=bool,
        )
        return {name: batch[name][keep] for name in FEATURE_COLUMNS}

    # Ray 2.60's default Parquet reader (DataSourceV2) starts a pool of 32 footer-reading
    # actors at every execution of a dataset, and a stage executes its datasets at every epoch
    # and every validation: on 2 CPUs each read took 10-15 s. The V1 reader reads a few shards'
    # footers inline, about 5x faster per read (benchmarks/README.md, section 10). The choice
    # is made here, when the dataset is built, so the context is restored right after.
    context = ray.data.DataContext.get_current()
    shipped, context.use_datasource_v2 = context.use_datasource_v2, False
    try:
        features = ray.data.read_parquet(
            selection.paths,
            filesystem=selection.filesystem,
            columns=[*FEATURE_COLUMNS, "key", "config_hash"],
            include_paths=True,
        )
    finally:
        context.use_datasource_v2 = shipped
    return features.filter(
        expr=(col("config_hash") == feature_hash) & col("key").is_in(selection.keys)
    ).map_batches(chosen_rows, batch_format="numpy")


def training_dataset(
    features_uri: str,
    records_uri: str,
    tasks: tuple[str, ...],
    storage: Storage,
    feature_hash: str,
    split: str | None = None,
    task_repeats: dict[str, int] | None = None,
):
    """(ray.data.Dataset with one row per record that has current features, or None when no
    record has any, JoinReport). A record of a task in `task_repeats` yields that many rows.

    Only rows of the current feature config (`feature_hash`), one per video and only for the
    records' videos, are read (see `select_feature_rows`, `feature_dataset`). The records
    table is small (text) and goes to every task by value; each feature row is expanded to
    one row per record of its video.
    """
    by_video = stage_records(read_records(records_uri, storage), tasks, split)
    selection = select_feature_rows(features_uri, storage, feature_hash, set(by_video))
    chosen = selection.chosen
    missing = sorted(set(by_video) - set(chosen))
    report = JoinReport(
        records=sum(len(v) for v in by_video.values()),
        matched=sum(len(v) for uri, v in by_video.items() if uri in chosen),
        videos_without_features=missing,
        stale_rows=selection.stale_rows,
        duplicate_rows=selection.duplicate_rows,
        rows=sum(
            (task_repeats or {}).get(text["task"], 1)
            for uri, texts in by_video.items()
            if uri in chosen
            for text in texts
        ),
    )
    if task_repeats:
        by_video = {
            uri: [text for text in texts for _ in range(task_repeats.get(text["task"], 1))]
            for uri, texts in by_video.items()
        }

    def expand(row: dict) -> list[dict]:
        return [
            {**{k: row[k] for k in FEATURE_COLUMNS}, **text}
            for text in by_video.get(row["video_uri"], [])
        ]

    if not chosen:
        return None, report
    return feature_dataset(selection, feature_hash).flat_map(expand), report


def read_feature_table(
    features_uri: str, storage: Storage, feature_hash: str, videos: set[str] | None = None
) -> pa.Table:
    """The current feature row of every video (of `videos`) in one Arrow table, sorted by
    video URI (for evaluation and tools)."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads
    import ray.data  # noqa: F401  registers Ray's tensor extension types with pyarrow

    selection = select_feature_rows(features_uri, storage, feature_hash, videos)
    if not selection.chosen:
        raise FileNotFoundError(
            f"no feature rows of the current config ({feature_hash}) under {features_uri}"
        )
    tables = []
    for path in selection.paths:
        keys = [key for p, key in selection.chosen.values() if p == path]
        fragment = pads.dataset([path], filesystem=selection.filesystem, format="parquet")
        tables.append(fragment.to_table(filter=pc.field("key").isin(keys)))
    table = pa.concat_tables(tables, promote_options="default")
    # a key repeated inside one shard (never written so, but cheap to guard): keep the first
    _, first = np.unique(np.asarray(table.column("key").to_pylist()), return_index=True)
    table = table.take(pa.array(np.sort(first)))
    return table.sort_by("video_uri")


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

    alignment: captions through the text encoder's tokenizer (`tokenize_text`), and with
    `negative_caption` (caption -> its hard negative, or None) each caption's negative as
    `negative_text_*`, with `has_negative`;
    lm: conversations through `conversation_inputs` (`DamoModel.conversation_inputs`: the chat
    template, answers as labels, and the question when the bridge reads it).
    """

    def __init__(
        self,
        objective: str,
        conversation_inputs=None,
        tokenize_text=None,
        negative_caption=None,
    ):
        if objective == "alignment" and tokenize_text is None:
            raise ValueError("the alignment objective needs tokenize_text")
        if objective == "lm" and conversation_inputs is None:
            raise ValueError("the lm objective needs conversation_inputs")
        self.objective = objective
        self.conversation_inputs = conversation_inputs
        self.tokenize_text = tokenize_text
        self.negative_caption = negative_caption

    def __call__(self, batch: dict[str, np.ndarray]) -> dict:
        out = video_tensors(batch)
        if self.objective == "alignment":
            captions = [str(c) for c in batch["caption"]]
            out.update(self.tokenize_text(captions))
            if self.negative_caption is not None:
                negatives = [self.negative_caption(c) for c in captions]
                # a caption without a negative stands in for it, masked out by has_negative
                tokens = self.tokenize_text(
                    [n if n is not None else c for n, c in zip(negatives, captions, strict=True)]
                )
                out["negative_text_input_ids"] = tokens["text_input_ids"]
                out["negative_text_attention_mask"] = tokens["text_attention_mask"]
                out["has_negative"] = (
                    out["text_input_ids"].new_tensor([n is not None for n in negatives]).bool()
                )
        else:
            conversations = [json.loads(str(c)) for c in batch["conversation"]]
            out.update(self.conversation_inputs(conversations))
        return out

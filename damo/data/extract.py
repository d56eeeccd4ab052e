"""Feature extraction with Ray Data: video URIs -> frozen-encoder features in Parquet shards.

    URIs --plan (driver: stat, skip done)--> decode (PyAV in a child process; CPU tasks on
         a GPU cluster, inside the encoder actors on a CPU-only one) --> encode (actor pool
         holding the frozen encoders) --> write shards as they come: features/*.parquet,
         errors/*.parquet; then summary.json

Rows stream through: the object store holds only the blocks in flight (a bound independent of
the number of inputs), and each shard is durable once written, so a killed run keeps its
shards and a re-run skips their rows. The actor pool and the decode tasks are sized from the
cluster's resources (`size_extraction`) unless given.

Every input ends as exactly one feature row or one error row with a machine-readable reason;
nothing is dropped silently. A file that crashes or hangs the decoder is an error row
(decoder_crash, timeout). A row's `key` is derived from the URI, the object's size and etag
and the hash of the decode + encoder config, so a re-run skips what is done and redoes what
changed; rows also carry `config_hash`, `etag`, `size` and `written_at` for readers to filter
on. Error rows whose reason may pass are redone by `retry_errors` (`damo extract
--retry-errors`); the older row is then pruned.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from ray.data import Datasink

from damo.config import DamoConfig, config_hash
from damo.config.schema import S3Config
from damo.media.decode import (
    DETERMINISTIC_REASONS,
    STORAGE_REASONS,
    DecodedClip,
    MediaError,
    MediaReason,
    decode_with_config,
)
from damo.media.isolated import DecoderProcess
from damo.storage import ObjectInfo, Storage, StorageError, join
from damo.storage.s3server import free_ports

FEATURES_DIR = "features"
ERRORS_DIR = "errors"
SUMMARY_FILE = "summary.json"
logger = logging.getLogger(__name__)


@dataclass
class ExtractSummary:
    inputs: int
    skipped: int
    ok: int
    errors: dict[str, int]
    seconds: float
    output_uri: str
    feature_config_hash: str
    retryable_errors: int = 0  # error rows in the output that `retry_errors` would redo
    clips_per_second: float = field(init=False)

    def __post_init__(self):
        done = self.ok + sum(self.errors.values())
        self.clips_per_second = done / self.seconds if self.seconds > 0 else 0.0


def feature_config_hash(cfg: DamoConfig) -> str:
    """What determines a feature row: how media is decoded and which encoders embed it."""
    model = cfg.model
    return config_hash({"decode": cfg.data.decode, "vision": model.vision, "audio": model.audio})


def item_key(uri: str, size: int | None, etag: str | None, cfg_hash: str) -> str:
    return hashlib.sha256(f"{uri}|{size}|{etag}|{cfg_hash}".encode()).hexdigest()[:24]


def _done_keys(storage: Storage, output_uri: str, retry_errors: bool = False) -> set[str]:
    """Keys already present in the feature shards and the errors table.

    With `retry_errors`, error rows whose reason may pass (storage trouble, time limits,
    unexpected exceptions) do not count as done; only deterministic media reasons do.
    """
    keys: set[str] = set()
    for sub in (FEATURES_DIR, ERRORS_DIR):
        columns = ["key", "reason"] if sub == ERRORS_DIR and retry_errors else ["key"]
        table = _read_columns(storage, join(output_uri, sub), columns)
        if table is None:
            continue
        if len(columns) == 2:
            final = {str(reason) for reason in DETERMINISTIC_REASONS}
            table = table.filter(pc.is_in(table.column("reason"), pa.array(sorted(final))))
        keys.update(table.column("key").to_pylist())
    return keys


class ListedUri(str):
    """A URI as a listing returned it, with the size and etag the listing already reported,
    so planning needs no HEAD request for it. Anywhere else it is just the URI string."""

    size: int
    etag: str

    def __new__(cls, info: ObjectInfo) -> ListedUri:
        listed = super().__new__(cls, info.uri)
        listed.size, listed.etag = info.size, info.etag
        return listed

    def __reduce__(self):  # pickles (to Ray tasks, say) with its listing
        return ListedUri, (ObjectInfo(str(self), self.size, self.etag),)


def plan(
    storage: Storage, uris: list[str], output_uri: str, cfg_hash: str, retry_errors: bool = False
):
    """(to_decode, stat_errors, skipped): identify every input once, drop the finished ones.

    URIs from `video_uris` carry their listing's size and etag; only the others (URIs given
    one by one) cost a HEAD request each.
    """
    done = _done_keys(storage, output_uri, retry_errors)
    to_decode, stat_errors, skipped = [], [], 0
    for uri in dict.fromkeys(uris):  # de-duplicate, keep order (and the first's listing)
        try:
            if isinstance(uri, ListedUri):
                stat = {"size": uri.size, "etag": uri.etag}
            else:
                stat = storage.stat(uri)
            key = item_key(str(uri), stat["size"], stat["etag"], cfg_hash)
        except StorageError as err:
            key = item_key(uri, None, err.reason.value, cfg_hash)
            if key not in done:
                reason = STORAGE_REASONS.get(err.reason, MediaReason.STORAGE)
                stat_errors.append(_error_row(key, MediaError(uri, reason, str(err))))
            else:
                skipped += 1
            continue
        if key in done:
            skipped += 1
        else:
            to_decode.append(
                {"key": key, "video_uri": str(uri), "size": stat["size"], "etag": stat["etag"]}
            )
    return to_decode, stat_errors, skipped


def _error_row(key: str, error: MediaError) -> dict:
    return {
        "key": key,
        "video_uri": error.uri,
        "reason": str(error.reason),
        "message": error.message,
    }


# ---- Ray Data UDFs ---------------------------------------------------------------------------
_DECODER: DecoderProcess | None = None  # one child per worker process, reused across tasks


def _decode_one(uri: str, cfg: DamoConfig, storage: Storage) -> DecodedClip | MediaError:
    global _DECODER
    settings = cfg.data.extract
    overrides = {"max_segment_seconds": cfg.model.audio.segment_seconds}
    if not settings.isolate_decoder:
        return decode_with_config(uri, cfg.data.decode, storage, **overrides)
    if _DECODER is None or _DECODER.timeout_s != settings.decode_timeout_s:
        _DECODER = DecoderProcess(settings.decode_timeout_s, settings.crash_retries)
    _DECODER.crash_retries = settings.crash_retries
    fault = next((f for mark, f in settings.decoder_faults.items() if mark in uri), None)
    kwargs = {**cfg.data.decode.model_dump(), **overrides}
    return _DECODER.decode(uri, storage.s3, kwargs, fault)


def decode_videos(batch: dict[str, np.ndarray], cfg: DamoConfig) -> dict[str, np.ndarray]:
    """map_batches UDF (CPU tasks): decode each URI; failures become rows with an error.

    With `data.extract.isolate_decoder` (the default) decoding runs in a child process, so a
    crash or hang of the native decoder is one error row (decoder_crash, timeout).
    """
    storage = Storage(cfg.storage.s3)
    decode = cfg.data.decode
    rows = []
    for key, uri in zip(batch["key"], batch["video_uri"], strict=True):
        rows.append((str(key), str(uri), _decode_one(str(uri), cfg, storage)))
    out = _decoded_batch(rows, decode.num_frames, decode.num_segments)
    # what identifies the object version the features came from, for readers to filter on
    size = len(rows)
    out["etag"] = np.array([str(e) for e in batch.get("etag", [""] * size)])
    out["size"] = np.array(batch.get("size", [-1] * size), dtype=np.int64)
    return out


def _decoded_batch(
    rows: list[tuple[str, str, DecodedClip | MediaError]], frames: int, segments: int
) -> dict[str, np.ndarray]:
    """Stack a batch. Error rows carry empty arrays: the encoder stage never looks at them."""

    def column(attr, empty_shape, dtype):
        values = [
            getattr(c, attr) if isinstance(c, DecodedClip) else np.zeros(empty_shape, dtype)
            for _, _, c in rows
        ]
        if len({v.shape for v in values}) == 1:
            return np.stack(values)
        ragged = np.empty(len(values), dtype=object)  # Ray stores it as a variable-shape tensor
        ragged[:] = values
        return ragged

    def scalar(get, default):
        return np.array([get(c) if isinstance(c, DecodedClip) else default for _, _, c in rows])

    return {
        "key": np.array([k for k, _, _ in rows]),
        "video_uri": np.array([u for _, u, _ in rows]),
        "error_reason": np.array(
            [str(c.reason) if isinstance(c, MediaError) else "" for _, _, c in rows]
        ),
        "error_message": np.array(
            [c.message if isinstance(c, MediaError) else "" for _, _, c in rows]
        ),
        "frames": column("frames", (0,), np.uint8),  # (B, T, 3, H, W) uint8
        "audio": column("audio", (0,), np.float32),  # (B, M, samples) float32
        "frame_times": column("frame_times", (frames,), np.float64),  # (B, T) seconds
        "segment_bounds": column("segment_bounds", (segments, 2), np.float64),  # (B, M, 2)
        "has_audio": scalar(lambda c: c.has_audio, False),
        "duration": scalar(lambda c: c.duration, 0.0),
        "probe": scalar(lambda c: json.dumps(c.probe.to_dict()), ""),
    }


def device_for_actor(gpu_ids: list, cuda_available: bool) -> str:
    """ "cuda" only when Ray gave this actor a GPU. Ray 2.60 no longer hides the GPUs from
    actors that asked for none, so `torch.cuda.is_available()` alone would put CPU actors on a
    GPU that another actor owns."""
    if not gpu_ids:
        return "cpu"
    if not cuda_available:
        raise RuntimeError(
            f"Ray gave this encoder actor GPU(s) {list(gpu_ids)} but torch sees no CUDA device "
            "(a CPU-only torch build, or no driver): install a CUDA torch or set "
            "data.extract.gpus_per_actor=0"
        )
    return "cuda"


ENCODE_ERROR = "encode_error"  # the encoders failed on a batch (e.g. out of memory): may pass


class EncodeFeatures:
    """map_batches UDF (actor pool): run the frozen encoders once per actor, on every OK row."""

    def __init__(
        self,
        cfg: DamoConfig,
        cfg_hash: str,
        s3: S3Config,
        torch_threads: int | None = None,
        decode_cfg: DamoConfig | None = None,
        progress=None,
    ):
        """`decode_cfg`: decode each batch of URIs here first (`decode_videos`); `progress`:
        an `ExtractionProgress` actor told of every batch encoded."""
        import ray
        import torch

        from damo.model.backbones import FrozenEncoders, arch_config, vision_geometry

        if torch_threads:
            torch.set_num_threads(torch_threads)
        storage = Storage(s3)
        gpu_ids = ray.get_gpu_ids() if ray.is_initialized() else []
        self.device = device_for_actor(gpu_ids, torch.cuda.is_available())
        self.encoders = FrozenEncoders.from_config(
            cfg.model, pretrained=True, resolve=storage.fetch_dir
        ).to(self.device)
        self.names = (cfg.model.vision.path, cfg.model.audio.path)
        # every row gets these shapes, error rows zeros, so the columns stay fixed-shape tensors
        width, patches = vision_geometry(cfg.model.vision)
        audio_width = arch_config(cfg.model.audio).d_model
        decode = cfg.data.decode
        self.visual_shape = (decode.num_frames, 1 + patches, width)
        self.audio_shape = (decode.num_segments, cfg.model.audio.tokens_per_segment, audio_width)
        self.cfg_hash = cfg_hash
        self.sample_rate = cfg.data.decode.sample_rate
        self.decode_cfg = decode_cfg
        self.progress = progress

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.decode_cfg is not None:
            batch = decode_videos(batch, self.decode_cfg)
        size = len(batch["error_reason"])
        visual_all = np.zeros((size, *self.visual_shape), np.float16)  # (B, T, 1+P, Dv)
        audio_all = np.zeros((size, *self.audio_shape), np.float16)  # (B, M, L, Da)
        reasons = batch["error_reason"].astype(object)
        messages = batch["error_message"].astype(object)
        ok = np.flatnonzero(reasons == "")
        if len(ok):
            try:
                visual_all[ok], audio_all[ok] = self._encode(batch, ok)
            except Exception as err:  # one failed batch must not fail the run: error rows
                reasons[ok] = ENCODE_ERROR
                messages[ok] = f"the encoders failed on this batch: {type(err).__name__}: {err}"
        out = {k: v for k, v in batch.items() if k not in ("frames", "audio")}
        out.update(
            error_reason=reasons.astype(str),
            error_message=messages.astype(str),
            visual_features=visual_all,  # (B, T, 1+P, Dv) float16
            audio_features=audio_all,  # (B, M, L, Da) float16
            vision_encoder=np.array([self.names[0]] * size),
            audio_encoder=np.array([self.names[1]] * size),
            config_hash=np.array([self.cfg_hash] * size),
        )
        if self.progress is not None:
            import ray

            # waited for, so that the counts are in once the work is (a ms per batch)
            ray.get(self.progress.add.remote({"encoded": size}))
        return out

    def _encode(self, batch: dict[str, np.ndarray], ok: np.ndarray):
        import torch

        frames = np.stack([batch["frames"][i] for i in ok])  # (B, T, 3, H, W) uint8
        b, t = frames.shape[:2]
        with torch.inference_mode():
            pixels = self.encoders.preprocess_frames(list(frames.reshape(b * t, *frames.shape[2:])))
            visual = self.encoders.encode_frames(pixels.to(self.device))  # (B*T, 1+P, Dv)
            # segments may differ in length between clips; the feature extractor pads each
            segments = [segment for i in ok for segment in batch["audio"][i]]
            mel = self.encoders.preprocess_audio(segments, self.sample_rate)
            heard = self.encoders.encode_audio(mel.to(self.device))  # (B*M, L, Da)
        visual = visual.reshape(b, t, *visual.shape[1:]).to(torch.float16).cpu().numpy()
        heard = heard.reshape(b, -1, *heard.shape[1:]).to(torch.float16).cpu().numpy()
        return visual, heard


# ---- sizing ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExtractSizing:
    """How many of each stage run at once, and on what."""

    num_actors: int
    gpus_per_actor: float
    cpus_per_actor: float
    torch_threads: int  # intra-op threads per encoder actor
    decode_in_actors: bool  # each actor decodes its own batches (CPU-only clusters)
    decode_tasks: int  # concurrent decode tasks (CPU) when decoding is a stage of its own
    cpus_per_decode: float
    cpus_per_write: float


# On a CPU-only cluster every core runs an encoder actor that decodes its own batches (in its
# decoder child process): every core stays busy, decoding on one while encoding on another,
# and decoded frames and audio never enter the object store. Each actor takes 3/4 of a logical
# CPU; the rest is what write tasks are scheduled on, so the pool never holds every CPU
# (RAY_NOTES: other tasks would starve). With GPUs, decoding is a stage of CPU tasks that
# keeps the GPU actors fed.
_CPU_ACTOR_SHARE = 0.75
_WRITE_CPUS = 0.05


def size_extraction(
    resources: dict[str, float],
    num_actors: int | None = None,
    gpus_per_actor: float | None = None,
    decode_tasks: int | None = None,
) -> ExtractSizing:
    """Size the stages from the cluster's resources (`ray.cluster_resources()`), unless given.

    With GPUs: one encoder actor per GPU (1 GPU, 1 CPU each), decoding on separate CPU tasks
    on the other CPUs. CPU-only: one encoder actor (one torch thread) per core that decodes
    its own batches, see above; giving `decode_tasks` makes decoding a stage of its own there
    too.
    """
    cpus = max(float(resources.get("CPU", 1.0)), 1.0)
    gpus = float(resources.get("GPU", 0.0))
    if gpus_per_actor is None:
        gpus_per_actor = 1.0 if gpus >= 1 else 0.0
    if gpus_per_actor > 0:
        if gpus < gpus_per_actor:
            raise ValueError(
                f"{gpus_per_actor:g} GPU(s) per encoder actor, but the cluster has {gpus:g}"
            )
        actors = num_actors or max(1, int(gpus // gpus_per_actor))
        cpus_per_actor = 1.0 if cpus - actors >= 1 else max(0.1, (cpus - 0.5) / actors)
        spare = max(cpus - actors * cpus_per_actor - _WRITE_CPUS, 0.25)
        decoders = decode_tasks or max(1, int(spare))
        threads = 1
        in_actors = False
    else:
        actors = num_actors or max(1, int(cpus))
        cpus_per_actor = min(1.0, _CPU_ACTOR_SHARE * cpus / actors)
        spare = max(cpus - actors * cpus_per_actor - _WRITE_CPUS, 0.1)
        in_actors = decode_tasks is None
        decoders = decode_tasks or 1
        threads = max(1, int(cpus // actors))
    return ExtractSizing(
        num_actors=actors,
        gpus_per_actor=gpus_per_actor,
        cpus_per_actor=round(cpus_per_actor, 3),
        torch_threads=threads,
        decode_in_actors=in_actors,
        decode_tasks=0 if in_actors else decoders,
        cpus_per_decode=0.0 if in_actors else round(min(1.0, spare / decoders), 3),
        cpus_per_write=_WRITE_CPUS,
    )


# ---- the sink --------------------------------------------------------------------------------
class ShardSink(Datasink):
    """Writes each bundle of rows as it arrives: feature rows to features/, error rows to
    errors/, one new Parquet object each, written atomically. A shard is durable as soon as it
    is written, so a killed run keeps it and a re-run skips its rows."""

    def __init__(self, output_uri: str, s3: S3Config, stamp: str, shard_rows: int, progress=None):
        self.output_uri = output_uri
        self.s3 = s3
        self.stamp = stamp
        self.shard_rows = shard_rows
        self.progress = progress  # an ExtractionProgress actor, told of every shard written
        self.totals: dict[str, Any] = {"ok": 0, "errors": {}}

    @property
    def min_rows_per_write(self) -> int:
        return self.shard_rows

    def get_name(self) -> str:
        return "WriteShards"

    def write(self, blocks, ctx) -> dict[str, Any]:
        from ray.data.block import BlockAccessor

        tables = [BlockAccessor.for_block(block).to_arrow() for block in blocks]
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return {"ok": 0, "errors": {}}
        table = pa.concat_tables(tables)
        written_at = pa.array([_now()] * table.num_rows, pa.timestamp("ms", tz="UTC"))
        table = table.append_column("written_at", written_at)
        failed = pc.not_equal(table.column("error_reason"), "")
        features = table.filter(pc.invert(failed)).drop_columns(["error_reason", "error_message"])
        errors = (
            table.filter(failed)
            .select(["key", "video_uri", "error_reason", "error_message"])
            .rename_columns(["key", "video_uri", "reason", "message"])
        )
        errors = _with_identity(errors, table.filter(failed))
        storage = Storage(self.s3)
        name = f"part-{self.stamp}-{ctx.task_idx:05d}-{uuid.uuid4().hex[:8]}.parquet"
        if features.num_rows:
            _write_table(storage, join(self.output_uri, FEATURES_DIR, name), features)
        if errors.num_rows:
            _write_table(storage, join(self.output_uri, ERRORS_DIR, name), errors)
        if self.progress is not None:
            import ray

            counts = {"written": table.num_rows, "errors": errors.num_rows}
            ray.get(self.progress.add.remote(counts))
        return {
            "ok": features.num_rows,
            "errors": dict(Counter(errors.column("reason").to_pylist())),
        }

    def on_write_complete(self, write_result) -> None:
        errors: Counter[str] = Counter()
        for result in write_result.write_returns:
            self.totals["ok"] += result["ok"]
            errors.update(result["errors"])
        self.totals["errors"] = dict(errors)


class ExtractionProgress:
    """Rows encoded and rows written so far (errors among them), for the driver's progress
    bar. Encoder actors and write tasks add to it as they finish each batch and shard."""

    def __init__(self):
        self.counts: Counter[str] = Counter()

    def add(self, counts: dict[str, int]) -> None:
        self.counts.update(counts)

    def read(self) -> dict[str, int]:
        return dict(self.counts)


def _now():
    import datetime

    return datetime.datetime.now(datetime.UTC)


def _with_identity(errors: pa.Table, source: pa.Table) -> pa.Table:
    """Error rows carry what feature rows carry to identify an input version."""
    for name in ("config_hash", "etag", "size", "written_at"):
        errors = errors.append_column(name, source.column(name))
    return errors


def _write_table(storage: Storage, uri: str, table: pa.Table) -> None:
    import io

    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    storage.write_bytes(uri, buffer.getvalue())


def _read_columns(storage: Storage, prefix_uri: str, columns: list[str]) -> pa.Table | None:
    """These columns of every shard under a prefix (None where a shard lacks one), plus
    `shard`: the shard's path. None when there are no shards."""
    fs, paths = storage.parquet_files(prefix_uri)
    tables = []
    for path in paths:
        with fs.open_input_file(path) as source:  # one open per shard: footer, then columns
            shard = pq.ParquetFile(source)
            present = [c for c in columns if c in shard.schema_arrow.names]
            table = shard.read(columns=present)
        for c in columns:
            if c not in present:
                table = table.append_column(c, pa.nulls(table.num_rows, pa.string()))
        table = table.select(columns)
        tables.append(table.append_column("shard", pa.array([path] * table.num_rows)))
    if not tables:
        return None
    return pa.concat_tables(tables, promote_options="permissive")


def prune_superseded_errors(storage: Storage, output_uri: str) -> int:
    """Drop error rows that a later row for the same input replaced; returns how many.

    An input is a video URI under one feature hash (older rows without a hash: their key).
    After a retry (`--retry-errors`, or a changed object) the input has a newer feature or error
    row; the older error rows go, so that the input ends with exactly one row. Each affected
    errors shard is rewritten in place, atomically; a run killed half-way is finished by the
    next one.
    """
    wanted = ["key", "video_uri", "config_hash", "written_at"]
    errors = _read_columns(storage, join(output_uri, ERRORS_DIR), wanted)
    if errors is None:
        return 0
    features = _read_columns(storage, join(output_uri, FEATURES_DIR), wanted)

    def identity(row) -> tuple:
        hashed = row["config_hash"] is not None
        return (row["video_uri"], row["config_hash"]) if hashed else ("key", row["key"])

    def when(row) -> float:
        stamp = row["written_at"]
        return stamp.timestamp() if hasattr(stamp, "timestamp") else float("-inf")

    newest: dict[tuple, float] = {}
    feature_keys: set[str] = set()
    for row in features.to_pylist() if features is not None else []:
        feature_keys.add(row["key"])
        newest[identity(row)] = max(newest.get(identity(row), float("-inf")), when(row))
    rows = errors.to_pylist()
    last_error: dict[tuple, int] = {}  # identity -> index of its newest error row
    for index, row in enumerate(rows):
        best = last_error.get(identity(row))
        if best is None or when(row) >= when(rows[best]):
            last_error[identity(row)] = index
    drop: dict[str, set[int]] = {}
    for index, row in enumerate(rows):
        replaced_by_feature = row["key"] in feature_keys or newest.get(
            identity(row), float("-inf")
        ) > when(row)
        if replaced_by_feature or last_error[identity(row)] != index:
            drop.setdefault(row["shard"], set()).add(row["key"])
    fs, _ = storage.pyarrow_filesystem(output_uri)
    pruned = 0
    for path, keys in drop.items():
        table = pq.read_table(path, filesystem=fs)
        # a shard holds each key once, so dropping by key drops exactly the rows chosen above
        kept = table.filter(pc.invert(pc.is_in(table.column("key"), pa.array(sorted(keys)))))
        pruned += table.num_rows - kept.num_rows
        uri = _uri_of(output_uri, path)
        if kept.num_rows:
            _write_table(storage, uri, kept)
        else:
            storage.delete(uri)
    return pruned


def _count_retryable(storage: Storage, output_uri: str, cfg_hash: str) -> int:
    table = _read_columns(storage, join(output_uri, ERRORS_DIR), ["reason", "config_hash"])
    if table is None:
        return 0
    final = {str(reason) for reason in DETERMINISTIC_REASONS}
    return sum(
        1
        for reason, hashed in zip(
            table.column("reason").to_pylist(), table.column("config_hash").to_pylist(), strict=True
        )
        if reason not in final and hashed in (cfg_hash, None)
    )


def _uri_of(output_uri: str, path: str) -> str:
    """The URI of a path that `storage.parquet_files(output_uri/...)` returned."""
    return path if "://" not in output_uri else f"{output_uri.split('://', 1)[0]}://{path}"


def connect_ray(cfg: DamoConfig, log_to_driver: bool = True) -> None:
    """Join the cluster of `ray.address`, or start a local one sized by the `ray` section.

    `log_to_driver=False` keeps workers' output in Ray's log files, for commands that draw
    their own progress."""
    import ray

    if ray.is_initialized():
        return
    ray_cfg = cfg.ray
    # inside `ray job submit`, RAY_ADDRESS names the cluster and ray.init() joins it
    local = ray_cfg.address is None and "RAY_ADDRESS" not in os.environ
    memory = ray_cfg.object_store_memory_mb
    runtime_env, gcs_address = None, None
    if local:
        # A private cluster on this machine: token auth (on by default since 2.59) would only
        # break `ray job submit` against it (RAY_NOTES).
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        # Ray's own actors find "their" cluster through the State API, which, with no
        # RAY_ADDRESS, refuses to pick when another Ray cluster runs on this machine. Ray
        # Train's PlacementGroupCleaner then dies, a trial that Tune stops early keeps its
        # workers' CPUs, and the next trial's Ray Data waits for them forever. So the private
        # cluster's GCS gets a port chosen here, and its workers are told the address.
        gcs_address = f"{ray.util.get_node_ip_address()}:{free_ports(1, host='')[0]}"
        runtime_env = {"env_vars": {"RAY_ADDRESS": gcs_address}}
        os.environ["RAY_GCS_SERVER_PORT"] = gcs_address.rsplit(":", 1)[1]  # read by ray.init
    try:
        ray.init(
            address=ray_cfg.address,
            num_cpus=ray_cfg.num_cpus if local else None,
            object_store_memory=memory * 1024 * 1024 if memory and local else None,
            runtime_env=runtime_env,
            log_to_driver=log_to_driver,
            # a command that draws its own progress keeps ray.init's banner off its console
            logging_level=logging.INFO if log_to_driver else logging.WARNING,
        )
    finally:
        os.environ.pop("RAY_GCS_SERVER_PORT", None)
    started_at = ray.get_runtime_context().gcs_address
    if local and started_at != gcs_address:
        ray.shutdown()
        raise RuntimeError(
            f"the local Ray cluster's GCS is at {started_at}, not at the {gcs_address} its "
            "workers were told"
        )


def video_uris(storage: Storage, prefix: str) -> list[ListedUri]:
    """Every object under a prefix (videos or not: what is not a video becomes an error row),
    from one paginated listing that also gives each object's size and etag."""
    return [
        ListedUri(info)
        for info in storage.list_objects(prefix.rstrip("/") + "/")
        if not info.uri.rsplit("/", 1)[-1].startswith(".")
    ]


# ---- the library function --------------------------------------------------------------------


@contextlib.contextmanager
def object_store_cap(megabytes: float | None):
    """Caps the object-store bytes of the datasets built inside (Ray Data's resource limit).

    A dataset keeps the DataContext that was current when it was built, so the cap is set
    around building and running it, then the context is restored."""
    import ray

    context = ray.data.DataContext.get_current()
    shipped = context.execution_options.resource_limits
    if megabytes is not None:
        context.execution_options.resource_limits = shipped.copy(
            object_store_memory=int(megabytes * 2**20)
        )
    try:
        yield
    finally:
        context.execution_options.resource_limits = shipped


def _run_extraction(
    to_decode, sink, cfg, cfg_hash, sizing, actors, batch_size, progress=None
) -> None:
    """decode -> encode -> write shards, streaming: rows are written as they are encoded."""
    import ray

    settings = cfg.data.extract
    retries = settings.max_task_retries
    dataset = ray.data.from_items(to_decode)
    if not sizing.decode_in_actors:
        dataset = dataset.map_batches(
            decode_videos,
            fn_kwargs={"cfg": cfg},
            batch_size=1,
            compute=ray.data.TaskPoolStrategy(size=sizing.decode_tasks),
            num_cpus=sizing.cpus_per_decode,
            max_retries=retries,
        )
    (
        dataset.map_batches(
            EncodeFeatures,
            fn_constructor_args=(cfg, cfg_hash, cfg.storage.s3, sizing.torch_threads),
            fn_constructor_kwargs={
                "decode_cfg": cfg if sizing.decode_in_actors else None,
                "progress": progress,
            },
            batch_size=batch_size,
            # all start at once, but work begins with the first that is ready
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors, initial_size=actors),
            num_gpus=sizing.gpus_per_actor,
            num_cpus=sizing.cpus_per_actor,
            max_restarts=settings.max_actor_restarts,
            max_task_retries=retries,
        ).write_datasink(
            sink, ray_remote_args={"num_cpus": sizing.cpus_per_write, "max_retries": retries}
        )
    )


@contextlib.contextmanager
def _reporting(
    on_progress: Callable[[dict[str, int], int], None] | None, total: int, every_s: float = 0.5
):
    """Yields an `ExtractionProgress` actor (or None without `on_progress`) and, while the
    caller runs the extraction, hands its counts to `on_progress` from a thread, then once more
    at the end. The extraction itself stays on the calling thread, so Ctrl-C stops it."""
    if on_progress is None:
        yield None
        return
    import ray

    counter = ray.remote(num_cpus=0)(ExtractionProgress).remote()
    stop = threading.Event()

    def report() -> None:
        on_progress(ray.get(counter.read.remote()), total)

    def poll() -> None:
        while not stop.wait(every_s):
            try:
                report()
            except Exception:  # noqa: BLE001  a missed refresh must not end the run
                logger.debug("progress refresh failed", exc_info=True)

    poller = threading.Thread(target=poll, name="damo-extract-progress", daemon=True)
    poller.start()
    try:
        try:
            yield counter
        finally:
            stop.set()
            poller.join()
        report()  # the final counts, when the extraction did not raise
    finally:
        ray.kill(counter)


def extract_features(
    uris: list[str],
    output_uri: str,
    cfg: DamoConfig,
    batch_size: int | None = None,
    num_actors: int | None = None,
    num_gpus_per_actor: float | None = None,
    storage: Storage | None = None,
    retry_errors: bool = False,
    on_progress: Callable[[dict[str, int], int], None] | None = None,
) -> ExtractSummary:
    """Extract features for `uris` into `output_uri` (features/, errors/, summary.json).

    Rows stream from decoding through the encoders into Parquet shards; nothing waits for the
    whole dataset, and every shard is durable once written. A re-run skips every input that has
    a row. With `retry_errors` it redoes the inputs whose error may pass (storage trouble, time
    limits, unexpected exceptions); errors that are properties of the file
    (`DETERMINISTIC_REASONS`) are final. Arguments left None come from `cfg.data.extract`, and
    the actor pool and decode tasks are sized from the cluster unless given there.
    """
    import ray

    from damo.model.backbones import require_present

    settings = cfg.data.extract
    storage = storage or Storage(cfg.storage.s3)
    for name in ("vision", "audio"):  # one clear message now, not an actor's traceback later
        require_present(name, getattr(cfg.model, name), storage.exists)
    start = time.monotonic()
    cfg_hash = feature_config_hash(cfg)
    storage.ensure_bucket(output_uri)
    to_decode, stat_errors, skipped = plan(storage, uris, output_uri, cfg_hash, retry_errors)
    stamp = f"{time.strftime('%Y%m%dT%H%M%S')}-{cfg_hash[:8]}"
    errors: Counter[str] = Counter(row["reason"] for row in stat_errors)
    if stat_errors:
        now = _now()
        rows = [
            {**row, "config_hash": cfg_hash, "etag": "", "size": -1, "written_at": now}
            for row in stat_errors
        ]
        schema = pa.schema(
            [(c, pa.string()) for c in ("key", "video_uri", "reason", "message", "config_hash")]
            + [("etag", pa.string()), ("size", pa.int64())]
            + [("written_at", pa.timestamp("ms", tz="UTC"))]
        )
        name = f"part-{stamp}-plan-{uuid.uuid4().hex[:8]}.parquet"
        _write_table(
            storage, join(output_uri, ERRORS_DIR, name), pa.Table.from_pylist(rows, schema)
        )
    ok_count = 0
    if to_decode:
        sizing = size_extraction(
            ray.cluster_resources(),
            num_actors=num_actors or settings.num_actors,
            gpus_per_actor=(
                num_gpus_per_actor if num_gpus_per_actor is not None else settings.gpus_per_actor
            ),
            decode_tasks=settings.decode_tasks,
        )
        batch_size = batch_size or settings.batch_size
        actors = min(sizing.num_actors, -(-len(to_decode) // batch_size))
        with (
            _reporting(on_progress, len(to_decode)) as progress,
            object_store_cap(settings.object_store_mb),
        ):
            sink = ShardSink(output_uri, cfg.storage.s3, stamp, settings.shard_rows, progress)
            _run_extraction(to_decode, sink, cfg, cfg_hash, sizing, actors, batch_size, progress)
        ok_count = sink.totals["ok"]
        errors.update(sink.totals["errors"])
    prune_superseded_errors(storage, output_uri)
    summary = ExtractSummary(
        retryable_errors=_count_retryable(storage, output_uri, cfg_hash),
        inputs=len(dict.fromkeys(uris)),
        skipped=skipped,
        ok=ok_count,
        errors=dict(errors),
        seconds=time.monotonic() - start,
        output_uri=output_uri,
        feature_config_hash=cfg_hash,
    )
    storage.write_bytes(
        join(output_uri, SUMMARY_FILE), json.dumps(asdict(summary), indent=2).encode()
    )
    return summary

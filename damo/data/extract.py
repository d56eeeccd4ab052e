"""Feature extraction with Ray Data: video URIs -> frozen-encoder features in Parquet shards.

    URIs --plan (driver: stat, skip done)--> decode (PyAV) --> encode (actor pool holding
         the frozen encoders) --> features/*.parquet, errors/*.parquet, summary.json

On CPU-only clusters Ray fuses decoding into the encoder actors (same resources), which keeps
raw frames out of the object store; with GPU actors decoding runs as separate CPU tasks.

Every input ends as exactly one feature row or one error row with a machine-readable reason;
nothing is dropped silently. A row's `key` is derived from the URI, the object's size and etag
and the hash of the decode + encoder config, so a re-run skips what is done and redoes what
changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np

from damo.config import DamoConfig, config_hash
from damo.config.schema import S3Config
from damo.media.decode import (
    STORAGE_REASONS,
    DecodedClip,
    MediaError,
    MediaReason,
    decode_with_config,
)
from damo.storage import ObjectInfo, Storage, StorageError, join

FEATURES_DIR = "features"
ERRORS_DIR = "errors"
SUMMARY_FILE = "summary.json"


@dataclass
class ExtractSummary:
    inputs: int
    skipped: int
    ok: int
    errors: dict[str, int]
    seconds: float
    output_uri: str
    feature_config_hash: str
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


def _done_keys(storage: Storage, output_uri: str) -> set[str]:
    """Keys already present in the feature shards and the errors table."""
    import pyarrow.dataset as pads

    keys: set[str] = set()
    for sub in (FEATURES_DIR, ERRORS_DIR):
        fs, paths = storage.parquet_files(join(output_uri, sub))
        if paths:
            table = pads.dataset(paths, filesystem=fs, format="parquet").to_table(columns=["key"])
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


def plan(storage: Storage, uris: list[str], output_uri: str, cfg_hash: str):
    """(to_decode, stat_errors, skipped): identify every input once, drop the finished ones.

    URIs from `video_uris` carry their listing's size and etag; only the others (URIs given
    one by one) cost a HEAD request each.
    """
    done = _done_keys(storage, output_uri)
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
def decode_videos(batch: dict[str, np.ndarray], cfg: DamoConfig) -> dict[str, np.ndarray]:
    """map_batches UDF (CPU tasks): decode each URI; failures become rows with an error."""
    storage = Storage(cfg.storage.s3)
    decode = cfg.data.decode
    rows = []
    for key, uri in zip(batch["key"], batch["video_uri"], strict=True):
        clip = decode_with_config(
            str(uri), decode, storage, max_segment_seconds=cfg.model.audio.segment_seconds
        )
        rows.append((str(key), str(uri), clip))
    return _decoded_batch(rows, decode.num_frames, decode.num_segments)


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


class EncodeFeatures:
    """map_batches UDF (actor pool): run the frozen encoders once per actor, on every OK row."""

    def __init__(self, cfg: DamoConfig, cfg_hash: str, s3: S3Config):
        import torch

        from damo.model.backbones import FrozenEncoders, arch_config, vision_geometry

        storage = Storage(s3)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
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

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        ok = np.flatnonzero(batch["error_reason"] == "")
        size = len(batch["error_reason"])
        visual_all = np.zeros((size, *self.visual_shape), np.float16)  # (B, T, 1+P, Dv)
        audio_all = np.zeros((size, *self.audio_shape), np.float16)  # (B, M, L, Da)
        if len(ok):
            frames = np.stack([batch["frames"][i] for i in ok])  # (B, T, 3, H, W) uint8
            b, t = frames.shape[:2]
            pixels = self.encoders.preprocess_frames(list(frames.reshape(b * t, *frames.shape[2:])))
            visual = self.encoders.encode_frames(pixels.to(self.device))  # (B*T, 1+P, Dv)
            # segments may differ in length between clips; the feature extractor pads each
            segments = [segment for i in ok for segment in batch["audio"][i]]
            mel = self.encoders.preprocess_audio(segments, self.sample_rate)
            heard = self.encoders.encode_audio(mel.to(self.device))  # (B*M, L, Da)
            visual_all[ok] = visual.reshape(b, t, *visual.shape[1:]).to(torch.float16).cpu()
            audio_all[ok] = heard.reshape(b, -1, *heard.shape[1:]).to(torch.float16).cpu()
        out = {k: v for k, v in batch.items() if k not in ("frames", "audio")}
        out.update(
            visual_features=visual_all,  # (B, T, 1+P, Dv) float16
            audio_features=audio_all,  # (B, M, L, Da) float16
            vision_encoder=np.array([self.names[0]] * size),
            audio_encoder=np.array([self.names[1]] * size),
            config_hash=np.array([self.cfg_hash] * size),
        )
        return out


def connect_ray(cfg: DamoConfig) -> None:
    """Join the cluster of `ray.address`, or start a local one sized by the `ray` section."""
    import ray

    if ray.is_initialized():
        return
    ray_cfg = cfg.ray
    # inside `ray job submit`, RAY_ADDRESS names the cluster and ray.init() joins it
    local = ray_cfg.address is None and "RAY_ADDRESS" not in os.environ
    if local:
        # A private cluster on this machine: token auth (on by default since 2.59) would only
        # break `ray job submit` against it (RAY_NOTES).
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    memory = ray_cfg.object_store_memory_mb
    ray.init(
        address=ray_cfg.address,
        num_cpus=ray_cfg.num_cpus if local else None,
        object_store_memory=memory * 1024 * 1024 if memory and local else None,
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
def extract_features(
    uris: list[str],
    output_uri: str,
    cfg: DamoConfig,
    batch_size: int = 4,
    num_actors: int = 1,
    num_gpus_per_actor: float = 0.0,
    storage: Storage | None = None,
) -> ExtractSummary:
    """Extract features for `uris` into `output_uri` (features/, errors/, summary.json)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from damo.model.backbones import require_present

    storage = storage or Storage(cfg.storage.s3)
    for name in ("vision", "audio"):  # one clear message now, not an actor's traceback later
        require_present(name, getattr(cfg.model, name), storage.exists)
    start = time.monotonic()
    cfg_hash = feature_config_hash(cfg)
    storage.ensure_bucket(output_uri)
    to_decode, stat_errors, skipped = plan(storage, uris, output_uri, cfg_hash)
    errors: Counter[str] = Counter(row["reason"] for row in stat_errors)
    ok_count = 0
    fs, root = storage.pyarrow_filesystem(output_uri)
    stamp = f"{time.strftime('%Y%m%dT%H%M%S')}-{cfg_hash[:8]}-{len(to_decode)}"
    error_rows = list(stat_errors)
    if to_decode:
        encoded = (
            ray.data.from_items(to_decode)
            .map_batches(decode_videos, fn_kwargs={"cfg": cfg}, batch_size=1, num_cpus=1)
            .map_batches(
                EncodeFeatures,
                fn_constructor_args=(cfg, cfg_hash, cfg.storage.s3),
                batch_size=batch_size,
                compute=ray.data.ActorPoolStrategy(min_size=1, max_size=num_actors),
                num_gpus=num_gpus_per_actor,
                num_cpus=1,
            )
            .materialize()
        )
        features = encoded.filter(expr="error_reason == ''")
        ok_count = features.count()
        if ok_count:
            features.drop_columns(["error_reason", "error_message"]).write_parquet(
                f"{root}/{FEATURES_DIR}", filesystem=fs
            )
        failed = encoded.filter(expr="error_reason != ''").select_columns(
            ["key", "video_uri", "error_reason", "error_message"]
        )
        for row in failed.iter_rows():
            error_rows.append(
                {
                    "key": row["key"],
                    "video_uri": row["video_uri"],
                    "reason": row["error_reason"],
                    "message": row["error_message"],
                }
            )
            errors[row["error_reason"]] += 1
    if error_rows:
        table = pa.Table.from_pylist(error_rows)
        fs.create_dir(f"{root}/{ERRORS_DIR}", recursive=True)
        with fs.open_output_stream(f"{root}/{ERRORS_DIR}/errors-{stamp}.parquet") as out:
            pq.write_table(table, out)
    summary = ExtractSummary(
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

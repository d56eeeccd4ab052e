"""Video -> encoder features, the way feature extraction makes them, cached by content.

The featurizer replica decodes with PyAV and runs the frozen encoders (`EncodeFeatures`, the
same code as `damo extract`), so the model sees exactly the features it was trained on. A video
is identified by its content: a storage object by URI, size and etag, an upload by its SHA-256.
A second question about the same video therefore skips decoding and encoding.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np

from damo.config import DamoConfig
from damo.data.extract import EncodeFeatures, _decoded_batch, feature_config_hash
from damo.media.decode import (
    STORAGE_REASONS,
    DecodedClip,
    MediaError,
    MediaReason,
    decode_with_config,
    probe,
)
from damo.serve.errors import ApiError, media_error
from damo.serve.lru import LruCache
from damo.serve.sources import VideoSource, too_large
from damo.storage import Storage, StorageError, parse_uri

# the columns of an extracted feature row that the model reads (damo.data.training.video_tensors)
FEATURE_COLUMNS = (
    "visual_features",
    "audio_features",
    "frame_times",
    "segment_bounds",
    "has_audio",
)


@dataclass
class VideoFeaturesRow:
    """One video's encoder features (numpy, one row of an extracted shard) and how they came."""

    key: str
    columns: dict[str, np.ndarray]
    duration: float
    cached: bool = False
    timings: dict[str, float] = field(default_factory=dict)


class Featurizer:
    """Decode + encode one video at a time (the Serve deployment wraps this class)."""

    def __init__(self, cfg: DamoConfig):
        import torch

        torch.set_num_threads(max(1, int(cfg.serve.featurizer.num_cpus)))
        self.cfg = cfg
        self.limits = cfg.serve.limits
        self.storage = Storage(cfg.storage.s3)
        self.cfg_hash = feature_config_hash(cfg)
        self.encode = EncodeFeatures(cfg, self.cfg_hash, cfg.storage.s3)
        self.cache: LruCache[VideoFeaturesRow] = LruCache(cfg.serve.feature_cache_items)

    def content_key(self, source: VideoSource) -> str:
        if source.data is not None:
            identity = f"upload|{source.digest}"
        else:
            try:
                stat = self.storage.stat(source.uri)
            except StorageError as err:
                raise media_error(
                    STORAGE_REASONS.get(err.reason, MediaReason.STORAGE),
                    f"{source.uri}: {err.reason.value}: {err.detail}",
                ) from None
            if stat["size"] > self.limits.max_upload_mb * 2**20:
                raise too_large(stat["size"], self.limits.max_upload_mb)
            identity = f"{source.uri}|{stat['size']}|{stat['etag']}"
        return hashlib.sha256(f"{identity}|{self.cfg_hash}".encode()).hexdigest()

    def features(self, source: VideoSource) -> VideoFeaturesRow:
        """The video's features, from the cache or freshly computed; ApiError if it can't be."""
        started = time.perf_counter()
        key = self.content_key(source)
        row = self.cache.get(key)
        if row is not None:
            lookup = time.perf_counter() - started
            return VideoFeaturesRow(key, row.columns, row.duration, True, {"lookup_s": lookup})
        data = source.data
        if data is None and parse_uri(source.uri).scheme != "file":
            data = self._read(source.uri)  # once: probing and decoding both read it
        if data is not None:
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "video")
                with open(path, "wb") as out:
                    out.write(data)
                clip = self._decode(path, Storage())
        else:
            clip = self._decode(source.uri, self.storage)
        decoded = time.perf_counter()
        batch = _decoded_batch([(key, source.label, clip)], *self.shape)
        encoded = self.encode(batch)
        columns = {name: np.asarray(encoded[name][0]) for name in FEATURE_COLUMNS}
        timings = {"decode_s": decoded - started, "encode_s": time.perf_counter() - decoded}
        row = VideoFeaturesRow(key, columns, clip.duration, False, timings)
        self.cache.put(row.key, row)
        return row

    def _read(self, uri: str) -> bytes:
        try:
            return self.storage.read_bytes(uri)
        except StorageError as err:
            raise media_error(
                STORAGE_REASONS.get(err.reason, MediaReason.STORAGE),
                f"{uri}: {err.reason.value}: {err.detail}",
            ) from None

    @property
    def shape(self) -> tuple[int, int]:
        return self.cfg.data.decode.num_frames, self.cfg.data.decode.num_segments

    def _decode(self, uri: str, storage: Storage) -> DecodedClip:
        limits = self.limits
        info = probe(uri, storage)
        if isinstance(info, MediaError):
            raise media_error(info.reason, info.message)
        if info.duration > limits.max_duration_s:
            raise ApiError(
                413,
                "video_too_long",
                f"the video lasts {info.duration:.1f} s; the limit is {limits.max_duration_s:g} s",
            )
        if info.width > limits.max_width or info.height > limits.max_height:
            raise ApiError(
                413,
                "video_resolution_too_high",
                f"the video is {info.width}x{info.height}; the limit is "
                f"{limits.max_width}x{limits.max_height}",
            )
        clip = decode_with_config(
            uri,
            self.cfg.data.decode,
            storage,
            max_segment_seconds=self.cfg.model.audio.segment_seconds,
            time_limit_s=limits.decode_timeout_s,
            max_width=limits.max_width,
            max_height=limits.max_height,
        )
        if isinstance(clip, MediaError):
            raise media_error(clip.reason, clip.message)
        return clip

"""Feature extraction with Ray Data on a real S3 server: every input is accounted for."""

from __future__ import annotations

import numpy as np
import pyarrow.dataset as pads
import pytest
from conftest import tiny_config

from damo.config import load_config
from damo.data.badmedia import build_media_corpus
from damo.data.extract import ERRORS_DIR, FEATURES_DIR, extract_features, object_store_cap
from damo.media.decode import MediaReason
from damo.storage import join

TINY = load_config("tiny").data.decode
FRAMES, SEGMENTS = TINY.num_frames, TINY.num_segments


def s3_tiny_config(backbones, s3_server, extra=()):
    return tiny_config(
        backbones,
        (
            f"storage.s3.endpoint_url={s3_server.endpoint_url}",
            f"storage.s3.access_key_id={s3_server.access_key_id}",
            f"storage.s3.secret_access_key={s3_server.secret_access_key}",
            *extra,
        ),
    )


def read_table(storage, uri):
    fs, paths = storage.parquet_files(uri)
    return pads.dataset(paths, filesystem=fs, format="parquet").to_table()


@pytest.fixture(scope="module")
def corpus(s3_storage):
    # its own bucket: the access-denied item replaces the bucket policy
    return build_media_corpus("s3://damo-extract-corpus/media", s3_storage, seed=0)


@pytest.fixture(scope="module")
def first_run(corpus, s3_server, s3_storage, tiny_backbones, ray_cluster):
    # a cap of about two blocks of rows: Ray Data holds the rest upstream, and no input is lost
    cfg = s3_tiny_config(tiny_backbones, s3_server, ["data.extract.object_store_mb=0.5"])
    out = "s3://damo-extract-out/run"
    reports = []
    summary = extract_features(
        [item.uri for item in corpus],
        out,
        cfg,
        batch_size=3,
        storage=s3_storage,
        on_progress=lambda counts, total: reports.append((counts, total)),
    )
    return cfg, out, summary, reports


def test_every_input_is_a_feature_row_or_an_error_row(corpus, first_run, s3_storage):
    cfg, out, summary, _ = first_run
    good = [item for item in corpus if not item.is_bad]
    bad = [item for item in corpus if item.is_bad]
    assert {item.name for item in bad} >= {
        "empty",
        "truncated",
        "not_a_video",
        "audio_only",
        "corrupt_middle",
        "absurd_dimensions",
        "zero_duration",
        "missing",
        "access_denied",
    }
    assert summary.inputs == len(corpus)
    assert summary.ok + sum(summary.errors.values()) == summary.inputs
    assert summary.ok == len(good)

    errors = read_table(s3_storage, join(out, ERRORS_DIR)).to_pylist()
    reason_of = {row["video_uri"]: row["reason"] for row in errors}
    assert len(errors) == len(bad)
    for item in bad:
        assert reason_of[item.uri] == str(item.expected), item.name
    assert all(row["message"] for row in errors)

    features = read_table(s3_storage, join(out, FEATURES_DIR))
    assert sorted(features.column("video_uri").to_pylist()) == sorted(i.uri for i in good)
    rows = {r["video_uri"].rsplit("/", 1)[-1]: r for r in features.to_pylist()}
    assert rows["good_no_audio.mp4"]["has_audio"] is False
    assert rows["good_av.mp4"]["has_audio"] is True
    for row in rows.values():
        times = np.asarray(row["frame_times"])
        assert times.shape == (FRAMES,) and np.all(np.diff(times) > 0)
        assert times[0] >= 0 and times[-1] <= row["duration"]
        visual = np.asarray(row["visual_features"])
        audio = np.asarray(row["audio_features"])
        assert visual.shape == (FRAMES, 17, 32)  # frames x (CLS + 16 patches) x width 32
        assert audio.shape == (SEGMENTS, 50, 32)  # segments x 50 tokens (1 s) x width 32
        assert np.isfinite(visual).all() and np.abs(visual).sum() > 0
        assert row["config_hash"] == summary.feature_config_hash
        assert row["vision_encoder"].endswith("vision")


def test_progress_counts_every_decoded_input_once(corpus, first_run):
    _, _, summary, reports = first_run
    assert reports, "on_progress was never called"
    totals = {total for _, total in reports}
    # the inputs that could not even be listed or read (missing, access denied) are error rows
    # from planning, before any decoding; every other input is counted by the bar
    unread = (MediaReason.NOT_FOUND, MediaReason.ACCESS_DENIED)
    decoded = len(corpus) - sum(1 for item in corpus if item.expected in unread)
    assert totals == {decoded}
    for key in ("encoded", "written", "errors"):
        series = [counts.get(key, 0) for counts, _ in reports]
        assert series == sorted(series), f"{key} went backwards: {series}"
    final, _ = reports[-1]
    assert final["encoded"] == final["written"] == decoded
    assert final["written"] - final["errors"] == summary.ok


def test_a_second_run_does_no_work(corpus, first_run, s3_storage):
    cfg, out, _, _ = first_run
    before = s3_storage.list(out + "/")
    again = extract_features([item.uri for item in corpus], out, cfg, storage=s3_storage)
    assert again.skipped == len(corpus)
    assert again.ok == 0 and again.errors == {}
    after = s3_storage.list(out + "/")
    assert [u for u in after if "summary" not in u] == [u for u in before if "summary" not in u]


def test_a_changed_config_redoes_the_work(first_run, corpus, s3_server, s3_storage, tiny_backbones):
    _, out, summary, _ = first_run
    cfg = s3_tiny_config(tiny_backbones, s3_server, ["data.decode.num_frames=4", "model.frames=4"])
    good = [item.uri for item in corpus if not item.is_bad][:1]
    redo = extract_features(good, out, cfg, storage=s3_storage)
    assert redo.skipped == 0 and redo.ok == 1
    assert redo.feature_config_hash != summary.feature_config_hash


def test_the_object_store_cap_holds_for_datasets_built_inside_it(ray_cluster):
    import ray

    context = ray.data.DataContext.get_current()
    shipped = context.execution_options.resource_limits.object_store_memory
    with object_store_cap(3):
        dataset = ray.data.range(4)
    assert dataset.context.execution_options.resource_limits.object_store_memory == 3 * 2**20
    assert context.execution_options.resource_limits.object_store_memory == shipped
    with pytest.raises(RuntimeError), object_store_cap(1):
        raise RuntimeError("a failed extraction restores the context too")
    assert context.execution_options.resource_limits.object_store_memory == shipped
    with object_store_cap(None):  # no cap configured: Ray Data's own share of the store
        assert context.execution_options.resource_limits.object_store_memory == shipped

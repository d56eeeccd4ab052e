"""Extraction survives what a long run meets: decoder crashes and hangs, transient errors, a
killed driver, GPUs it was not given; and it sizes itself from the cluster."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as pads
import pytest
from conftest import REPO_ROOT, tiny_config

from damo.data.extract import (
    ERRORS_DIR,
    FEATURES_DIR,
    device_for_actor,
    extract_features,
    size_extraction,
    video_uris,
)
from damo.media.decode import DecodedClip, MediaError, MediaReason
from damo.media.isolated import DecoderProcess
from damo.storage import Storage, join


def read_rows(storage: Storage, uri: str) -> list[dict]:
    fs, paths = storage.parquet_files(uri)
    if not paths:
        return []
    return pads.dataset(paths, filesystem=fs, format="parquet").to_table().to_pylist()


def name(uri: str) -> str:
    return uri.rsplit("/", 1)[-1]


def with_extract(cfg, **settings):
    extract = cfg.data.extract.model_copy(update=settings)
    return cfg.model_copy(update={"data": cfg.data.model_copy(update={"extract": extract})})


# ---- the decoder process, without Ray ----------------------------------------------------------
def test_decoder_process_turns_crashes_and_hangs_into_errors(fixtures_dir):
    bunny = str(fixtures_dir / "media" / "bigbuckbunny.mp4")
    options = {"num_frames": 2, "num_segments": 2, "image_size": 16}
    decoder = DecoderProcess(timeout_s=3.0, crash_retries=1)
    try:
        crashed = decoder.decode(bunny, None, options, fault="crash")
        assert isinstance(crashed, MediaError) and crashed.reason is MediaReason.DECODER_CRASH
        assert crashed.message.count("SIGABRT") == 2  # tried again in a fresh process first
        started = time.monotonic()
        hung = decoder.decode(bunny, None, options, fault="hang")
        assert isinstance(hung, MediaError) and hung.reason is MediaReason.TIMEOUT
        assert time.monotonic() - started < 30
        clip = decoder.decode(bunny, None, options)  # a fresh child takes over
        assert isinstance(clip, DecodedClip) and clip.frames.shape == (2, 3, 16, 16)
    finally:
        decoder.close()


def test_a_hung_decoder_dies_with_its_parent(tmp_path, fixtures_dir):
    """A killed worker must not leave its decoder behind, even one stuck in a decode."""
    bunny = str(fixtures_dir / "media" / "bigbuckbunny.mp4")
    pid_file = tmp_path / "child.pid"
    script = (
        "import sys, threading\n"
        "from damo.media.isolated import DecoderProcess\n"
        "d = DecoderProcess(timeout_s=600)\n"
        "threading.Thread(target=d.decode, args=(sys.argv[1], None, {}, 'hang')).start()\n"
        "import time\n"
        "while d._proc is None: time.sleep(0.05)\n"
        "open(sys.argv[2], 'w').write(str(d._proc.pid))\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script, bunny, str(pid_file)])
    try:
        deadline = time.monotonic() + 120
        while not pid_file.exists() or not pid_file.read_text():
            assert time.monotonic() < deadline and parent.poll() is None
            time.sleep(0.1)
        child = int(pid_file.read_text())
        time.sleep(1.0)  # the child has the request and hangs in it
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 30
    while Path(f"/proc/{child}").exists() and "Z" not in _state(child):
        assert time.monotonic() < deadline, "the decoder outlived its parent"
        time.sleep(0.2)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return "gone"


# ---- choices without a cluster ----------------------------------------------------------------
def test_encoders_use_cuda_only_on_a_gpu_ray_gave_them():
    assert device_for_actor([], cuda_available=True) == "cpu"  # a GPU visible, not ours
    assert device_for_actor([], cuda_available=False) == "cpu"
    assert device_for_actor(["0"], cuda_available=True) == "cuda"
    with pytest.raises(RuntimeError, match="torch sees no CUDA"):
        device_for_actor([0], cuda_available=False)


def test_sizing_from_cluster_resources():
    gpu = size_extraction({"CPU": 32.0, "GPU": 4.0})
    assert (gpu.num_actors, gpu.gpus_per_actor, gpu.cpus_per_actor) == (4, 1.0, 1.0)
    assert gpu.decode_tasks == 27  # the CPUs the actors leave, minus a little for writes
    half = size_extraction({"CPU": 32.0, "GPU": 4.0}, gpus_per_actor=0.5)
    assert half.num_actors == 8
    given = size_extraction({"CPU": 32.0, "GPU": 4.0}, num_actors=2, decode_tasks=3)
    assert (given.num_actors, given.decode_tasks) == (2, 3)

    assert not gpu.decode_in_actors  # the GPU actors are fed by CPU decode tasks

    laptop = size_extraction({"CPU": 2.0})
    assert (laptop.num_actors, laptop.gpus_per_actor, laptop.torch_threads) == (2, 0.0, 1)
    assert laptop.decode_in_actors and laptop.decode_tasks == 0
    # the actors never hold every CPU: write tasks keep a share to run on
    used = laptop.num_actors * laptop.cpus_per_actor
    assert used + laptop.cpus_per_write <= 2.0 - 0.25
    big = size_extraction({"CPU": 64.0})
    assert big.num_actors == 64 and big.num_actors * big.cpus_per_actor <= 48
    staged = size_extraction({"CPU": 8.0}, num_actors=4, decode_tasks=2)
    assert not staged.decode_in_actors and staged.decode_tasks == 2
    assert 4 * staged.cpus_per_actor + 2 * staged.cpus_per_decode <= 8.0
    one = size_extraction({"CPU": 8.0}, num_actors=1)
    assert one.torch_threads == 8 and one.cpus_per_actor == 1.0
    with pytest.raises(ValueError, match="per encoder actor"):
        size_extraction({"CPU": 8.0}, gpus_per_actor=1.0)


# ---- on the session cluster -------------------------------------------------------------------
@pytest.fixture(scope="module")
def clips(tiny_world):
    return video_uris(Storage(), str(tiny_world / "videos"))[:5]


@pytest.fixture(scope="module")
def faulty_run(clips, tiny_backbones, ray_cluster, tmp_path_factory):
    faults = {name(clips[1]): "crash", name(clips[3]): "hang"}
    cfg = with_extract(tiny_config(tiny_backbones), decoder_faults=faults, decode_timeout_s=20.0)
    out = str(tmp_path_factory.mktemp("faulty") / "run")
    summary = extract_features(clips, out, cfg, batch_size=2, storage=Storage())
    return cfg, out, summary


def test_decoder_crash_and_hang_are_error_rows(clips, faulty_run):
    _, out, summary = faulty_run
    assert summary.ok == 3
    assert summary.errors == {"decoder_crash": 1, "timeout": 1}
    assert summary.retryable_errors == 1  # the timeout
    storage = Storage()
    errors = {name(r["video_uri"]): r for r in read_rows(storage, join(out, ERRORS_DIR))}
    assert set(errors) == {name(clips[1]), name(clips[3])}
    assert errors[name(clips[1])]["reason"] == "decoder_crash"
    assert "SIGABRT" in errors[name(clips[1])]["message"]
    assert errors[name(clips[3])]["reason"] == "timeout"
    features = read_rows(storage, join(out, FEATURES_DIR))
    assert sorted(name(r["video_uri"]) for r in features) == sorted(
        name(c) for c in (clips[0], clips[2], clips[4])
    )
    for row in features + list(errors.values()):
        # what a reader filters on: the feature hash and the object version
        assert row["config_hash"] == summary.feature_config_hash
        assert row["etag"] and row["size"] > 0 and row["written_at"] is not None


def test_retry_errors_redoes_only_what_may_pass(clips, faulty_run):
    cfg, out, _ = faulty_run
    storage = Storage()
    healthy = with_extract(cfg, decoder_faults={})
    again = extract_features(clips, out, healthy, storage=storage)
    assert again.skipped == len(clips) and again.ok == 0 and again.retryable_errors == 1

    retried = extract_features(clips, out, healthy, storage=storage, retry_errors=True)
    # the timeout is redone and now decodes; the crash is a property of the file: final
    assert retried.skipped == len(clips) - 1 and retried.ok == 1 and retried.errors == {}
    assert retried.retryable_errors == 0
    errors = read_rows(storage, join(out, ERRORS_DIR))
    features = read_rows(storage, join(out, FEATURES_DIR))
    assert [name(r["video_uri"]) for r in errors] == [name(clips[1])]  # the old timeout row went
    assert sorted(r["video_uri"] for r in features + errors) == sorted(clips)  # each input once


@pytest.mark.slow
def test_a_killed_driver_keeps_its_shards(tiny_world, tiny_backbones, ray_cluster, tmp_path):
    """`jobs/extract.py` (= `damo extract`) is killed mid-run; the re-run does only the rest."""
    uris = video_uris(Storage(), str(tiny_world / "videos"))
    out = tmp_path / "run"
    stuck = name(uris[-1])  # hangs (until the kill), so the run cannot finish on its own
    overrides = [
        f"model.vision.path={tiny_backbones}/vision",
        f"model.audio.path={tiny_backbones}/audio",
        f"ray.address={ray_cluster.get_runtime_context().gcs_address}",
        "data.extract.shard_rows=1",
        "data.extract.decode_timeout_s=600",
        f"data.extract.decoder_faults={{{stuck}: hang}}",
    ]
    command = [sys.executable, "jobs/extract.py", "--config", "tiny"]
    command += ["--videos", str(tiny_world / "videos"), "--out", str(out), "--batch-size", "1"]
    for override in overrides:
        command += ["--set", override]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    with open(tmp_path / "driver.log", "wb") as log:
        driver = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 420
        while len(list((out / FEATURES_DIR).glob("*.parquet"))) < 3:
            assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no shards were written"
            time.sleep(0.2)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    storage = Storage()
    kept = read_rows(storage, join(str(out), FEATURES_DIR))
    assert len(kept) >= 3

    cfg = tiny_config(tiny_backbones)
    rerun = extract_features(uris, str(out), cfg, batch_size=2, storage=storage)
    # what was written is kept, not decoded again (a write in flight at the kill may have
    # finished after `kept` was read: hence >=)
    assert rerun.skipped >= len(kept)
    assert rerun.ok + sum(rerun.errors.values()) == len(uris) - rerun.skipped
    features = read_rows(storage, join(str(out), FEATURES_DIR))
    errors = read_rows(storage, join(str(out), ERRORS_DIR))
    assert errors == []
    assert sorted(r["video_uri"] for r in features) == sorted(uris)  # every input exactly once


def test_superseded_error_rows_are_pruned(tmp_path):
    """After retries each input keeps one row: its newest (features win over older errors)."""
    import datetime

    import pyarrow as pa

    from damo.data.extract import _write_table, prune_superseded_errors

    storage = Storage()
    out = str(tmp_path / "out")

    def at(second: int):
        return datetime.datetime(2026, 1, 1, 0, 0, second, tzinfo=datetime.UTC)

    def errors(rows):
        return pa.Table.from_pylist(
            [
                {"key": k, "video_uri": u, "reason": r, "message": "m", "config_hash": h}
                | {"written_at": at(t)}
                for k, u, r, h, t in rows
            ]
        )

    _write_table(
        storage,
        join(out, ERRORS_DIR, "part-1.parquet"),
        errors([("a", "A", "timeout", "h", 1), ("b", "B", "truncated", "h", 1)]),
    )
    _write_table(
        storage,
        join(out, ERRORS_DIR, "part-2.parquet"),
        errors([("c", "C", "timeout", "h", 1)]),
    )
    _write_table(
        storage,
        join(out, ERRORS_DIR, "part-3.parquet"),
        errors([("c2", "C", "unreachable", "h", 2), ("b", "B", "truncated", "old", 0)]),
    )
    features = pa.Table.from_pylist(
        [{"key": "a", "video_uri": "A", "config_hash": "h", "written_at": at(2)}]
    )
    _write_table(storage, join(out, FEATURES_DIR, "part-1.parquet"), features)

    assert prune_superseded_errors(storage, out) == 2  # A's timeout, C's older timeout
    kept = sorted(
        (r["video_uri"], r["reason"], r["config_hash"])
        for r in read_rows(storage, join(out, ERRORS_DIR))
    )
    # B under another feature hash is another input and stays
    assert kept == [("B", "truncated", "h"), ("B", "truncated", "old"), ("C", "unreachable", "h")]
    assert not (tmp_path / "out" / ERRORS_DIR / "part-2.parquet").exists()  # emptied: deleted
    assert prune_superseded_errors(storage, out) == 0

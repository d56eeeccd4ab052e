"""Shared fixtures. Heavy services (S3 server, Ray) start once per session and always stop."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = REPO_ROOT.parent / "shared" / "fixtures"


def pytest_collection_modifyitems(config, items):
    """`ray stop` ends every Ray process on the machine, this session's cluster included: the
    tests that run it go last."""
    items.sort(key=lambda item: item.get_closest_marker("stops_ray") is not None)


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """../shared/fixtures. A test that needs it and cannot find it fails (never skips)."""
    assert FIXTURES.is_dir(), f"shared fixtures not found at {FIXTURES}"
    return FIXTURES


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """One real SeaweedFS S3 server (`weed mini`) for the whole session."""
    from damo.storage.s3server import EmbeddedS3Server

    server = EmbeddedS3Server(data_dir=str(tmp_path_factory.mktemp("weed")))
    state = server.start()
    yield state
    server.stop()


@pytest.fixture(scope="session")
def s3_storage(s3_server):
    """A `Storage` on the session S3 server, with a bucket named `damo-test`."""
    from damo.storage import Storage

    storage = Storage(s3_server.s3_config())
    storage.ensure_bucket("s3://damo-test")
    return storage


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared machine they thrash."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def ray_cluster():
    """The one local Ray cluster of a test session (2 CPUs, small object store)."""
    import ray

    ray.init(
        num_cpus=2,
        object_store_memory=256 * 1024 * 1024,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_backbones(tmp_path_factory) -> Path:
    """The tiny HF backbones (`damo backbones make-tiny`), built once into a temp dir."""
    import json

    from damo.data.backbones import make_tiny_backbones

    out = tmp_path_factory.mktemp("backbones") / "tiny"
    timings = make_tiny_backbones(str(out), steps=300, num_clips=200, seed=0)
    out.joinpath("timings.json").write_text(json.dumps(timings))
    return out


def tiny_config(backbones: Path, extra: tuple[str, ...] = ()):
    """The tiny preset with its backbones at a local dir (and any extra overrides)."""
    from damo.config import load_config

    cfg = load_config("tiny", list(extra))
    return cfg.model_copy(update={"model": cfg.model.with_backbones_at(str(backbones))})


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> Path:
    """A small synthetic world (12 clips of 6-12 s) on local disk."""
    from damo.config.data import SyntheticConfig
    from damo.data.synthetic import generate_world
    from damo.storage import Storage

    root = tmp_path_factory.mktemp("world")
    settings = SyntheticConfig(num_clips=12, seed=3, min_duration_s=6.0, max_duration_s=12.0)
    generate_world(str(root), Storage(), settings, workers=2, progress=False)
    return root


@pytest.fixture(scope="session")
def tiny_features(tiny_world, tiny_backbones, ray_cluster) -> Path:
    """The tiny world's features, extracted once with the tiny backbones."""
    from damo.data.extract import extract_features, video_uris
    from damo.storage import Storage

    storage = Storage()
    out = tiny_world / "features-run"
    summary = extract_features(
        video_uris(storage, str(tiny_world / "videos")),
        str(out),
        tiny_config(tiny_backbones),
        batch_size=4,
        storage=storage,
    )
    assert summary.errors == {}, summary
    return out

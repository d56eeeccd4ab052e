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


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """../shared/fixtures. A test that needs it and cannot find it fails (never skips)."""
    assert FIXTURES.is_dir(), f"shared fixtures not found at {FIXTURES}"
    return FIXTURES


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """One real SeaweedFS S3 server (`weed mini`) for the whole session."""
    from damo.media.s3server import EmbeddedS3Server

    server = EmbeddedS3Server(data_dir=str(tmp_path_factory.mktemp("weed")))
    state = server.start()
    yield state
    server.stop()


@pytest.fixture(scope="session")
def s3_storage(s3_server):
    """A `Storage` on the session S3 server, with a bucket named `damo-test`."""
    from damo.media.storage import Storage

    storage = Storage(s3_server.s3_config())
    storage.ensure_bucket("s3://damo-test")
    return storage


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

"""Secrets (the S3 secret key and session token) are never printed or written: not by
`damo config show`, not in a run's manifest, not in any object or log a training run writes.
Workers still get them, through the pickled config, never through a JSON dump."""

from __future__ import annotations

import json
import pickle
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from damo.cli import app
from damo.config import DamoConfig, config_hash, config_to_yaml, load_config
from damo.config.schema import REDACTED
from damo.storage import Storage
from damo.storage.store import explicit_credentials

SECRET = f"secret-{uuid.uuid4().hex}"
TOKEN = f"token-{uuid.uuid4().hex}"
OVERRIDES = [
    "storage.s3.access_key_id=AKIDEXAMPLE",
    f"storage.s3.secret_access_key={SECRET}",
    f"storage.s3.session_token={TOKEN}",
]


def assert_no_secret(text: str | bytes, where: str) -> None:
    blob = text.encode() if isinstance(text, str) else text
    for secret in (SECRET, TOKEN):
        assert secret.encode() not in blob, f"a secret leaked into {where}"


def test_config_show_and_dumps_mask_secrets():
    result = CliRunner().invoke(
        app, ["config", "show", *sum((["--set", o] for o in OVERRIDES), [])]
    )
    assert result.exit_code == 0, result.output
    assert_no_secret(result.output, "damo config show")
    assert f"secret_access_key: '{REDACTED}'" in result.output
    cfg = load_config("default", OVERRIDES)
    for where, text in (
        ("config_to_yaml", config_to_yaml(cfg)),
        ("model_dump_json", cfg.model_dump_json()),
        ("json dump", json.dumps(cfg.model_dump(mode="json"))),
        ("repr", repr(cfg)),
        ("str", str(cfg)),
    ):
        assert_no_secret(text, where)
    # the secret does not change the config's identity (a rotated key resumes the same run)
    rotated = [*OVERRIDES[:1], "storage.s3.secret_access_key=rotated", "storage.s3.session_token=t"]
    assert config_hash(cfg) == config_hash(load_config("default", rotated))


def test_workers_get_secrets_from_the_pickle_not_from_a_dump():
    cfg = load_config("default", OVERRIDES)
    worker = pickle.loads(pickle.dumps(cfg))  # what Ray ships to a worker or actor
    creds = explicit_credentials(worker.storage.s3)
    assert (creds.secret_access_key, creds.session_token) == (SECRET, TOKEN)
    # a JSON dump read back has no secret (not the mask as a wrong one) and says so clearly
    reloaded = DamoConfig.model_validate(cfg.model_dump(mode="json"))
    assert reloaded.storage.s3.secret_access_key is None
    assert reloaded.storage.s3.session_token is None
    from damo.storage import StorageError

    with pytest.raises(StorageError, match="secret_access_key"):
        explicit_credentials(reloaded.storage.s3)


def test_manifest_writer_masks_secrets(tmp_path):
    from damo.train.pipeline import write_manifest

    cfg = load_config("default", OVERRIDES)
    write_manifest(Storage(), str(tmp_path), {"config": cfg.model_dump(mode="json")})
    text = (tmp_path / "manifest.json").read_text()
    assert_no_secret(text, "manifest.json")
    assert REDACTED in text


@pytest.mark.slow
def test_no_file_a_training_run_writes_holds_a_secret(
    s3_server, s3_storage, tiny_backbones, tiny_features, tiny_world, ray_cluster, tmp_path
):
    """Stage 1 on S3 with explicit keys in the config: the workers must get the real secret
    (the run succeeds) and no object under the run, nor any Ray log, may contain it."""
    from conftest import tiny_config

    from damo.train.pipeline import train_pipeline

    real_secret = s3_server.secret_access_key
    runs_root = f"s3://damo-test/secret-runs-{uuid.uuid4().hex}"
    cfg = tiny_config(
        tiny_backbones,
        (
            f"storage.s3.endpoint_url={s3_server.endpoint_url}",
            f"storage.s3.access_key_id={s3_server.access_key_id}",
            f"storage.s3.secret_access_key={real_secret}",
            f"train.runs_root={runs_root}",
            f"train.data.features={tiny_features}",
            f"train.data.records={tiny_world / 'records'}",
            "train.stages.stage1.max_steps=2",
            "train.stages.stage1.batch_size=8",
        ),
    )
    manifest = train_pipeline(cfg, "secret-run", stages=(1,), storage=s3_storage, log=lambda _: 0)
    assert manifest["stages"]["1"]["status"] == "finished"
    written = s3_storage.list_objects(runs_root + "/")
    assert any(info.uri.endswith("manifest.json") for info in written)
    assert any("checkpoint" in info.uri for info in written)
    for info in written:
        blob = s3_storage.read_bytes(info.uri)
        assert real_secret.encode() not in blob, f"the secret leaked into {info.uri}"
    import ray

    session = Path(ray._private.worker._global_node.get_session_dir_path())
    for path in (session / "logs").rglob("*"):
        if path.is_file():
            assert real_secret.encode() not in path.read_bytes(), f"the secret is in {path}"

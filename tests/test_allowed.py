"""`storage.allowed_prefixes` is enforced wherever a URI enters on the command line."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from damo.cli import app
from damo.config.schema import StorageConfig
from damo.storage import Reason, StorageError, require_allowed

ALLOW = ["--set", "storage.allowed_prefixes=[s3://allowed/data]"]
INSIDE = "s3://allowed/data/x"
OUTSIDE = "s3://elsewhere/x"

# (command line with the outside URI, the option the error must name)
ENTRY_POINTS = {
    "extract --videos": (["extract", "--videos", OUTSIDE, "--out", INSIDE], "--videos"),
    "extract --out": (["extract", "--videos", INSIDE, "--out", OUTSIDE], "--out"),
    "train --init-checkpoint": (["train", "--init-checkpoint", OUTSIDE], "--init-checkpoint"),
    "eval run --checkpoint": (
        ["eval", "run", "--checkpoint", OUTSIDE, "--out", INSIDE],
        "--checkpoint",
    ),
    "eval run --out": (["eval", "run", "--checkpoint", INSIDE, "--out", OUTSIDE], "--out"),
    "eval run --features": (
        ["eval", "run", "--checkpoint", INSIDE, "--out", INSIDE, "--features", OUTSIDE],
        "--features",
    ),
    "eval run --records": (
        ["eval", "run", "--checkpoint", INSIDE, "--out", INSIDE, "--records", OUTSIDE],
        "--records",
    ),
    "data synth --out": (["data", "synth", "--out", OUTSIDE], "--out"),
    "data probe": (["data", "probe", OUTSIDE], "video URI"),
    "backbones make-tiny --out": (["backbones", "make-tiny", "--out", OUTSIDE], "--out"),
}


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_cli_refuses_uris_outside_the_allowed_prefixes(entry):
    argv, option = ENTRY_POINTS[entry]
    result = CliRunner().invoke(app, [*argv, *ALLOW])
    assert result.exit_code == 2, result.output
    assert "not_allowed" in result.output and OUTSIDE in result.output
    assert "Traceback" not in result.output
    assert option in result.output


def test_an_allowed_uri_gets_past_the_check(tmp_path):
    """The same command with an allowed URI fails later, for its own reason."""
    local = tmp_path / "media"
    result = CliRunner().invoke(
        app,
        [
            "data",
            "probe",
            str(local / "missing.mp4"),
            "--set",
            f"storage.allowed_prefixes=[{local}]",
        ],
    )
    assert result.exit_code != 0
    assert "not_allowed" not in result.output


def test_require_allowed():
    assert require_allowed("/anything/at/all", StorageConfig()) == "/anything/at/all"
    assert require_allowed(INSIDE, ["s3://allowed/data"]) == INSIDE
    for uri in (OUTSIDE, "s3://allowed/data/../secret", "s3://allowed/database"):
        with pytest.raises(StorageError) as err:
            require_allowed(uri, StorageConfig(allowed_prefixes=["s3://allowed/data"]))
        assert err.value.reason is Reason.NOT_ALLOWED

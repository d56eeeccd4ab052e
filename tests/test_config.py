"""The config system: YAML + pydantic + dotted overrides, and its error messages."""

from __future__ import annotations

import pytest
import yaml

from damo.config import ConfigError, DamoConfig, config_hash, config_to_yaml, load_config
from damo.config.loader import parse_override


def write(path, data) -> str:
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return str(path)


def test_named_default_loads_and_round_trips(tmp_path):
    cfg = load_config("default")
    assert cfg.storage.root == "s3://damo"
    dumped = write(tmp_path / "dumped.yaml", config_to_yaml(cfg))
    assert load_config(dumped) == cfg
    assert config_hash(load_config(dumped)) == config_hash(cfg)


def test_base_inheritance_deep_merges(tmp_path):
    write(tmp_path / "base.yaml", {"seed": 7, "storage": {"s3": {"region": "eu-west-1"}}})
    child = write(
        tmp_path / "child.yaml",
        {"base": "base.yaml", "storage": {"s3": {"endpoint_url": "http://127.0.0.1:1"}}},
    )
    cfg = load_config(child)
    assert cfg.seed == 7
    assert cfg.storage.s3.region == "eu-west-1"
    assert cfg.storage.s3.endpoint_url == "http://127.0.0.1:1"


def test_base_cycle_is_an_error(tmp_path):
    write(tmp_path / "a.yaml", {"base": "b.yaml"})
    write(tmp_path / "b.yaml", {"base": "a.yaml"})
    with pytest.raises(ConfigError, match="cycle"):
        load_config(str(tmp_path / "a.yaml"))


@pytest.mark.parametrize(
    ("text", "keys", "value"),
    [
        ("seed=3", ["seed"], 3),
        ("storage.s3.connect_timeout_s=2.5", ["storage", "s3", "connect_timeout_s"], 2.5),
        ("ray.address=null", ["ray", "address"], None),
        (
            "storage.allowed_prefixes=[s3://a/x, /data]",
            ["storage", "allowed_prefixes"],
            ["s3://a/x", "/data"],
        ),
        ("name=has=equals", ["name"], "has=equals"),
        ("flag=true", ["flag"], True),
    ],
)
def test_parse_override(text, keys, value):
    assert parse_override(text) == (keys, value)


@pytest.mark.parametrize("bad", ["noequals", "=3", "a..b=1", ".a=1"])
def test_malformed_override_is_rejected(bad):
    with pytest.raises(ConfigError, match="section.field=value"):
        parse_override(bad)


def test_overrides_apply_and_change_the_hash():
    base = load_config("default")
    cfg = load_config("default", ["seed=42", "storage.s3.region=ap-south-1"])
    assert (cfg.seed, cfg.storage.s3.region) == (42, "ap-south-1")
    assert config_hash(cfg) != config_hash(base)


def test_unknown_field_names_file_field_and_allowed_fields(tmp_path):
    path = write(tmp_path / "typo.yaml", {"storage": {"s3": {"regoin": "x"}}})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "typo.yaml" in message
    assert "storage.s3.regoin: unknown field" in message
    assert "allowed fields: endpoint_url, region, addressing_style" in message


def test_bad_literal_lists_allowed_values_and_the_override():
    with pytest.raises(ConfigError) as err:
        load_config("default", ["storage.s3.addressing_style=sideways"])
    message = str(err.value)
    assert "storage.s3.addressing_style" in message
    assert "allowed values: 'path', 'virtual', 'auto'" in message
    assert "got 'sideways'" in message
    assert "[from --set storage.s3.addressing_style=sideways]" in message


def test_bound_violation_states_the_bound():
    with pytest.raises(ConfigError, match=r"ray\.num_cpus: .*allowed: int >= 1"):
        load_config("default", ["ray.num_cpus=0"])


def test_override_into_a_value_is_rejected():
    with pytest.raises(ConfigError, match="'storage.root' is a value, not a section"):
        load_config("default", ["storage.root.x=1"])


def test_missing_and_invalid_sources(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="unknown config 'nosuchname'.*default"):
        load_config("nosuchname")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path / "broken.yaml", "a: [1, 2"))
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(write(tmp_path / "list.yaml", "- 1\n- 2\n"))


def test_defaults_without_a_file():
    assert load_config() == DamoConfig()


def test_frame_counts_of_model_and_decoding_must_agree():
    with pytest.raises(ConfigError) as err:
        load_config("tiny", ["data.decode.num_frames=24"])
    assert "model.frames (16) must equal data.decode.num_frames (24)" in str(err.value)
    assert load_config("tiny", ["data.decode.num_frames=24", "model.frames=24"]).model.frames == 24

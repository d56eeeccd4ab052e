"""The one config system: pydantic models loaded from YAML with dotted overrides."""

from damo.config.loader import (
    ConfigError,
    available_configs,
    config_hash,
    config_to_yaml,
    load_config,
)
from damo.config.schema import DamoConfig

__all__ = [
    "ConfigError",
    "DamoConfig",
    "available_configs",
    "config_hash",
    "config_to_yaml",
    "load_config",
]

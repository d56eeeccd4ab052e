"""Load a `DamoConfig` from YAML with dotted `--set` overrides.

A config is named (a YAML file shipped in `damo/config/named/`) or given by path. A file may
start from another with `base: NAME_OR_PATH`; its keys are deep-merged over the base. Overrides
like `model.fuseformer.depth=2` are parsed as YAML scalars and applied last.
"""

from __future__ import annotations

import enum
import hashlib
import json
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from damo.config.schema import DamoConfig

NAMED_DIR = Path(__file__).parent / "named"
_MAX_BASE_DEPTH = 16


class ConfigError(ValueError):
    """A config that cannot be loaded: names the file, the field and what is allowed."""


def available_configs() -> list[str]:
    return sorted(p.stem for p in NAMED_DIR.glob("*.yaml"))


def _resolve_source(name_or_path: str | Path, relative_to: Path | None = None) -> Path:
    text = str(name_or_path)
    candidates = [Path(text)]
    if relative_to is not None and not Path(text).is_absolute():
        candidates.insert(0, relative_to / text)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    if text.endswith((".yaml", ".yml")) or "/" in text:
        raise ConfigError(f"config file '{text}' does not exist")
    named = NAMED_DIR / f"{text}.yaml"
    if named.is_file():
        return named
    raise ConfigError(
        f"unknown config '{text}': not a file, and not one of the named configs "
        f"({', '.join(available_configs())})"
    )


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _load_raw(path: Path, depth: int = 0) -> dict[str, Any]:
    if depth > _MAX_BASE_DEPTH:
        raise ConfigError(f"{path}: 'base' chain is deeper than {_MAX_BASE_DEPTH} (a cycle?)")
    data = _read_yaml(path)
    base_name = data.pop("base", None)
    if base_name is None:
        return data
    base = _load_raw(_resolve_source(base_name, relative_to=path.parent), depth + 1)
    return deep_merge(base, data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], parsed value). Values are YAML scalars or lists."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' must look like section.field=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override '{text}': value is not valid YAML: {err}") from err
    return key.split("."), value


def _unwrap(annotation: Any) -> Any:
    """Strip Optional / list wrappers down to the type whose fields or values matter."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _unwrap(args[0]) if len(args) == 1 else annotation
    if origin in (list, tuple, set, frozenset):
        args = typing.get_args(annotation)
        return _unwrap(args[0]) if args else annotation
    return annotation


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _field_at(loc: tuple[Any, ...]) -> tuple[type[BaseModel] | None, Any]:
    """Walk `loc` through the schema: (the model owning the last field, that field's type)."""
    owner: type[BaseModel] | None = DamoConfig
    annotation: Any = DamoConfig
    for part in loc:
        if isinstance(part, int):
            continue
        model = _unwrap(annotation)
        if not _is_model(model) or part not in model.model_fields:
            return (model if _is_model(model) else None), None
        owner, annotation = model, model.model_fields[part].annotation
    return owner, annotation


def describe_allowed(loc: tuple[Any, ...], unknown_key: bool = False) -> str:
    """What a field accepts, in words, for error messages."""
    owner, annotation = _field_at(loc[:-1] if unknown_key else loc)
    if unknown_key:
        model = _unwrap(annotation) if annotation is not None else owner
        return "allowed fields: " + ", ".join(model.model_fields) if _is_model(model) else ""
    if annotation is None:
        return ""
    inner = _unwrap(annotation)
    if typing.get_origin(inner) is typing.Literal:
        return "allowed values: " + ", ".join(repr(a) for a in typing.get_args(inner))
    if isinstance(inner, type) and issubclass(inner, enum.Enum):
        return "allowed values: " + ", ".join(repr(m.value) for m in inner)
    if _is_model(inner):
        return "a mapping with fields: " + ", ".join(inner.model_fields)
    field = owner.model_fields[loc[-1]] if owner is not None else None
    bounds = []
    for meta in getattr(field, "metadata", []):
        for attr, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if getattr(meta, attr, None) is not None:
                bounds.append(f"{sign} {getattr(meta, attr)}")
    type_name = getattr(inner, "__name__", str(inner))
    return f"allowed: {type_name}" + (f" {' and '.join(bounds)}" if bounds else "")


def _format_validation_error(err: ValidationError, source: str, overrides: dict[str, str]) -> str:
    lines = [f"invalid config {source}:"]
    for item in err.errors():
        loc = tuple(item["loc"])
        dotted = ".".join(str(p) for p in loc) or "(whole config)"
        unknown = item["type"] == "extra_forbidden"
        message = "unknown field" if unknown else item["msg"]
        # a section-level or whole-config error would echo the whole mapping: say less
        quiet = unknown or isinstance(item.get("input"), dict)
        got = "" if quiet else f" (got {item.get('input')!r})"
        allowed = describe_allowed(loc, unknown_key=unknown) if loc else ""
        origin = f" [from --set {overrides[dotted]}]" if dotted in overrides else ""
        lines.append(f"  {dotted}: {message}{got}" + (f"; {allowed}" if allowed else "") + origin)
    return "\n".join(lines)


def _apply_override(data: dict[str, Any], path: list[str], value: Any, text: str) -> None:
    node = data
    for depth, part in enumerate(path[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            dotted = ".".join(path[: depth + 1])
            raise ConfigError(f"override '{text}': '{dotted}' is a value, not a section")
        node = child
    node[path[-1]] = value


def load_config(
    name_or_path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> DamoConfig:
    """Resolve a named config or YAML file, apply overrides, and validate."""
    if name_or_path is None:
        data: dict[str, Any] = {}
        source = "(defaults)"
    else:
        path = _resolve_source(name_or_path)
        data = _load_raw(path)
        source = f"'{path}'"
    return _validate_with_overrides(data, overrides, source)


def _validate_with_overrides(
    data: dict[str, Any], overrides: list[str] | tuple[str, ...], source: str
) -> DamoConfig:
    """Apply dotted overrides to a raw config mapping and validate it; errors name the
    override a bad field came from."""
    applied: dict[str, str] = {}
    for text in overrides:
        keys, value = parse_override(text)
        _apply_override(data, keys, value, text)
        applied[".".join(keys)] = text
    try:
        return DamoConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source, applied)) from None


def with_overrides(cfg: DamoConfig, overrides: list[str] | tuple[str, ...]) -> DamoConfig:
    """A validated copy of a loaded config with dotted overrides applied (secrets kept)."""
    from damo.config.schema import REVEAL_SECRETS

    data = cfg.model_dump(mode="json", context={REVEAL_SECRETS: True})
    return _validate_with_overrides(data, overrides, "(with overrides)")


def config_to_yaml(config: BaseModel) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def config_hash(config: BaseModel | dict[str, Any]) -> str:
    """A short stable digest of a resolved config, one section of it, or a dict of sections."""
    data = config if isinstance(config, dict) else config.model_dump(mode="json")
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), default=_dump)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _dump(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    raise TypeError(f"cannot hash a {type(value).__name__}")

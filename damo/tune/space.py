"""Search spaces: `tune_spaces/*.yaml` in the W&B sweep format, loaded into Ray Tune domains.

    description: depth against residual compression
    grid: false                      # true: a full grid (every parameter uses `values`)
    parameters:
      model.fuseformer.depth: {values: [1, 2, 3, 4]}
      train.stages.stage3.optimizer.lr: {distribution: log_uniform_values, min: 1.0e-4, max: 3.0e-3}

A parameter is a dotted path to a leaf field of `DamoConfig`; every candidate value (each of
`values`, or a distribution's `min` and `max`) is validated by applying it to a base config, so
a typo or an out-of-range value fails when the space loads, not in the middle of a sweep. A
trial's sampled values go back into the config as `--set` overrides (`trial_overrides`).
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from damo.config import ConfigError, DamoConfig, load_config
from damo.config.loader import _apply_override, _field_at, describe_allowed

SPACES_DIR = Path(__file__).resolve().parents[2] / "tune_spaces"
TOP_LEVEL_KEYS = ("description", "grid", "parameters")
PARAMETER_KEYS = ("values", "distribution", "min", "max", "q")
# W&B sweep names -> what they sample
DISTRIBUTIONS = {
    "uniform": "a float uniformly in [min, max]",
    "log_uniform_values": "a float log-uniformly in [min, max], min > 0",
    "int_uniform": "an integer uniformly in [min, max], both ends included",
    "q_uniform": "a multiple of q uniformly in [min, max] (an int for int fields)",
}


class SpaceError(ValueError):
    """A search space that cannot be loaded: names the file, the parameter and what is allowed."""


@dataclass(frozen=True)
class Parameter:
    """One searched config field: a list of `values`, or a `distribution` over [low, high]."""

    path: str
    values: tuple | None
    distribution: str | None
    low: float | None
    high: float | None
    q: float | None
    integer: bool = False  # the config field is an int: quantized samples are ints too

    def domain(self, grid: bool) -> Any:
        """The Ray Tune domain (or `grid_search` spec) that samples this parameter."""
        from ray import tune

        if self.values is not None:
            return tune.grid_search(list(self.values)) if grid else tune.choice(list(self.values))
        if grid:
            raise SpaceError(f"parameter '{self.path}': a grid needs values, not a distribution")
        if self.distribution == "uniform":
            return tune.uniform(self.low, self.high)
        if self.distribution == "log_uniform_values":
            return tune.loguniform(self.low, self.high)
        if self.distribution == "int_uniform":
            return tune.randint(int(self.low), int(self.high) + 1)  # randint excludes its upper
        if self.distribution == "q_uniform" and self.integer:
            step = int(self.q)
            if step == 1:  # qrandint's upper bound is inclusive except when q == 1
                return tune.randint(int(self.low), int(self.high) + 1)
            return tune.qrandint(int(self.low), int(self.high), step)
        if self.distribution == "q_uniform":
            return tune.quniform(self.low, self.high, self.q)
        raise SpaceError(f"parameter '{self.path}': unknown distribution {self.distribution!r}")

    def candidates(self) -> list | None:
        """The values a trial can take, or None for a continuous distribution."""
        if self.values is not None:
            return list(self.values)
        if self.distribution == "int_uniform":
            return list(range(int(self.low), int(self.high) + 1))
        if self.distribution == "q_uniform":
            steps = round((self.high - self.low) / self.q)
            points = [self.low + i * self.q for i in range(steps + 1)]
            return [int(p) for p in points] if self.integer else [_tidy(p) for p in points]
        return None


@dataclass(frozen=True)
class SearchSpace:
    source: str
    description: str
    grid: bool
    parameters: tuple[Parameter, ...]

    def param_space(self) -> dict[str, Any]:
        """{dotted config path: Tune domain}, flat: Tune keeps the dotted keys as they are."""
        return {p.path: p.domain(self.grid) for p in self.parameters}

    def grid_size(self) -> int | None:
        """Trials in the full grid (the product of the value counts), or None without a grid."""
        if not self.grid:
            return None
        return math.prod(len(p.values or ()) for p in self.parameters)


def available_spaces() -> list[str]:
    return sorted(p.stem for p in SPACES_DIR.glob("*.yaml"))


def resolve_space(name_or_path: str | Path) -> Path:
    """A YAML file, or the name of one shipped in `tune_spaces/` (`fuseformer`)."""
    text = str(name_or_path)
    if Path(text).is_file():
        return Path(text)
    if text.endswith((".yaml", ".yml")) or "/" in text:
        raise SpaceError(f"search space file '{text}' does not exist")
    named = SPACES_DIR / f"{text}.yaml"
    if named.is_file():
        return named
    raise SpaceError(
        f"unknown search space '{text}': not a file, and not one of "
        f"{', '.join(available_spaces()) or '(none)'} in {SPACES_DIR}"
    )


def load_space(path: str | Path, base: DamoConfig | None = None) -> SearchSpace:
    """Read and validate a search space; every candidate is checked against `base` (tiny)."""
    file = resolve_space(path)
    source = str(path) if Path(str(path)).is_file() else str(file)
    try:
        data = yaml.safe_load(file.read_text())
    except yaml.YAMLError as err:
        raise SpaceError(f"{source}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise SpaceError(f"{source}: the top level must be a mapping with {_keys(TOP_LEVEL_KEYS)}")
    unknown = [key for key in data if key not in TOP_LEVEL_KEYS]
    if unknown:
        raise SpaceError(f"{source}: unknown key {unknown[0]!r}; allowed: {_keys(TOP_LEVEL_KEYS)}")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise SpaceError(f"{source}: 'description' must be text, got {_kind(description)}")
    grid = data.get("grid", False)
    if not isinstance(grid, bool):
        raise SpaceError(f"{source}: 'grid' must be true or false, got {grid!r}")
    parameters = data.get("parameters")
    if not isinstance(parameters, dict) or not parameters:
        raise SpaceError(
            f"{source}: 'parameters' must be a non-empty mapping of dotted config paths "
            f"(e.g. model.fuseformer.depth) to {{values: [...]}} or {{distribution: ...}}"
        )
    base_data = (base if base is not None else load_config("tiny")).model_dump()
    parsed = tuple(
        _parse_parameter(source, path, spec, grid, base_data) for path, spec in parameters.items()
    )
    return SearchSpace(source=source, description=description, grid=grid, parameters=parsed)


def trial_overrides(params: dict[str, Any]) -> list[str]:
    """{"a.b": 2} -> ["a.b=2"]: `--set` overrides that `load_config` parses back to the values."""
    return [f"{path}={_yaml_scalar(value)}" for path, value in params.items()]


# ---- parsing -------------------------------------------------------------------------------


def _parse_parameter(
    source: str, path: Any, spec: Any, grid: bool, base_data: dict[str, Any]
) -> Parameter:
    where = f"{source}: parameter '{path}'"
    if not isinstance(path, str) or not path or any(not part for part in path.split(".")):
        raise SpaceError(f"{where}: must be a dotted config path like model.fuseformer.depth")
    annotation = _leaf_annotation(where, path)
    if not isinstance(spec, dict):
        raise SpaceError(
            f"{where}: must be a mapping with 'values' or 'distribution', got {_kind(spec)}"
        )
    unknown = [key for key in spec if key not in PARAMETER_KEYS]
    if unknown:
        raise SpaceError(f"{where}: unknown key {unknown[0]!r}; allowed: {_keys(PARAMETER_KEYS)}")
    if ("values" in spec) == ("distribution" in spec):
        raise SpaceError(f"{where}: give exactly one of 'values' or 'distribution'")
    if "values" in spec:
        extra = [key for key in ("min", "max", "q") if key in spec]
        if extra:
            raise SpaceError(f"{where}: {extra[0]!r} belongs to a distribution, not to 'values'")
        return _parse_values(where, path, spec["values"], base_data)
    if grid:
        raise SpaceError(
            f"{where}: a grid file ('grid: true') needs 'values', not distribution "
            f"{spec['distribution']!r}"
        )
    return _parse_distribution(where, path, spec, annotation, base_data)


def _parse_values(where: str, path: str, values: Any, base_data: dict[str, Any]) -> Parameter:
    if not isinstance(values, list) or not values:
        raise SpaceError(f"{where}: 'values' must be a non-empty list, got {values!r}")
    for index, value in enumerate(values):
        if value in values[:index]:
            raise SpaceError(f"{where}: value {value!r} is listed twice")
        _check_value(where, path, value, base_data)
    return Parameter(path, tuple(values), None, None, None, None)


def _parse_distribution(
    where: str, path: str, spec: dict[str, Any], annotation: Any, base_data: dict[str, Any]
) -> Parameter:
    name = spec["distribution"]
    if name not in DISTRIBUTIONS:
        allowed = "; ".join(f"{key}: {text}" for key, text in DISTRIBUTIONS.items())
        raise SpaceError(f"{where}: unknown distribution {name!r}; allowed: {allowed}")
    field_type = _scalar_type(annotation)
    if field_type not in (int, float):
        raise SpaceError(
            f"{where}: a distribution needs a number field, and this one is not "
            f"({describe_allowed(tuple(path.split('.')))}): use 'values'"
        )
    integer = field_type is int
    if integer and name in ("uniform", "log_uniform_values"):
        raise SpaceError(
            f"{where}: the field is an int, so {name!r} (floats) does not fit; "
            "allowed: values, int_uniform, q_uniform"
        )
    if "q" in spec and name != "q_uniform":
        raise SpaceError(f"{where}: 'q' belongs to q_uniform only, not to {name!r}")
    bounds = [_number(where, spec, key) for key in ("min", "max")]
    low, high = bounds
    if name == "q_uniform":
        q = _number(where, spec, "q")
        if q <= 0:
            raise SpaceError(f"{where}: q must be > 0, got {q!r}")
        if integer and not float(q).is_integer():
            raise SpaceError(f"{where}: the field is an int, so q must be an integer, got {q!r}")
        for key, bound in (("min", low), ("max", high)):
            if not math.isclose(bound / q, round(bound / q)):
                raise SpaceError(
                    f"{where}: {key} {bound!r} is not a multiple of q {q!r} (q_uniform draws "
                    "multiples of q)"
                )
    else:
        q = None
    if name == "int_uniform" and not all(float(b).is_integer() for b in bounds):
        raise SpaceError(f"{where}: int_uniform needs integer min and max, got {low!r}, {high!r}")
    if low >= high:
        raise SpaceError(f"{where}: min {low!r} must be below max {high!r}")
    if name == "log_uniform_values" and low <= 0:
        raise SpaceError(f"{where}: log_uniform_values needs min > 0, got {low!r}")
    if integer or name == "int_uniform":
        low, high = int(low), int(high)
    for bound in (low, high):
        _check_value(where, path, bound, base_data)
    return Parameter(path, None, name, low, high, q, integer=integer)


def _leaf_annotation(where: str, path: str) -> Any:
    """The type of the leaf field `path` names; an unknown path or a section is an error."""
    parts = path.split(".")
    for depth in range(1, len(parts) + 1):
        owner, annotation = _field_at(tuple(parts[:depth]))
        if annotation is None:
            parent = ".".join(parts[: depth - 1]) or "the top level"
            if owner is None:
                raise SpaceError(f"{where}: '{parent}' is a value, not a section")
            raise SpaceError(
                f"{where}: '{parts[depth - 1]}' is not a field of {parent}; allowed fields: "
                + ", ".join(owner.model_fields)
            )
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        raise SpaceError(
            f"{where}: '{path}' is a section, not a field; allowed fields: "
            + ", ".join(f"{path}.{name}" for name in annotation.model_fields)
        )
    return annotation


def _check_value(where: str, path: str, value: Any, base_data: dict[str, Any]) -> None:
    """`value` must validate when set at `path` in the base config."""
    data = _deep_copy(base_data)
    keys = path.split(".")
    try:
        _apply_override(data, keys, value, f"{path}={value!r}")
        DamoConfig.model_validate(data)
    except ConfigError as err:
        raise SpaceError(f"{where}: {err}") from None
    except ValidationError as err:
        first = err.errors()[0]
        loc = tuple(first["loc"])
        if loc[: len(keys)] == tuple(keys):
            allowed = describe_allowed(tuple(keys))
            # a field validator's own words say more than the field's type and bounds
            custom = first["type"] == "value_error" or not allowed
            reason = f"{allowed}; {first['msg']}" if custom and allowed else allowed or first["msg"]
            raise SpaceError(f"{where}: value {value!r} is not allowed ({reason})") from None
        # a check across fields (a model validator) failed somewhere else
        dotted = ".".join(str(part) for part in loc) or "the config"
        raise SpaceError(
            f"{where}: value {value!r} makes the config invalid: {dotted}: {first['msg']}"
        ) from None


def _number(where: str, spec: dict[str, Any], key: str) -> float:
    if key not in spec:
        raise SpaceError(f"{where}: distribution {spec['distribution']!r} needs '{key}'")
    value = spec[key]
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            pass
        else:  # YAML 1.1 reads 1e-4 (no dot) as text
            raise SpaceError(
                f"{where}: {key} {value!r} is text, not a number: write it with a dot "
                "(1.0e-4, not 1e-4)"
            )
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise SpaceError(f"{where}: {key} must be a finite number, got {value!r}")
    return value


def _scalar_type(annotation: Any) -> Any:
    """`int | None` -> int; anything else (lists, tuples, literals) stays as it is."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation


def _yaml_scalar(value: Any) -> str:
    if hasattr(value, "item") and not isinstance(value, list | tuple | dict):
        value = value.item()  # numpy scalars from a searcher
    if isinstance(value, tuple):
        value = list(value)
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9)
    return text.removesuffix("\n...\n").removesuffix("\n")


def _tidy(value: float) -> float:
    """0.1 + 2 * 0.1 -> 0.3: the grid point as it would be written."""
    return float(f"{value:.12g}")


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {key: _deep_copy(value) for key, value in data.items()}
    if isinstance(data, list):
        return [_deep_copy(value) for value in data]
    return data


def _keys(keys: tuple[str, ...]) -> str:
    return ", ".join(keys)


def _kind(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"

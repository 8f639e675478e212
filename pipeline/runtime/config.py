"""Typed configuration: YAML -> frozen dataclasses, validated once, and back to plain data.

An unknown key, a missing required key, a value of the wrong type or one outside the field's
declared rule raises :class:`ConfigError` in one line naming the file and the dotted key.
Nested dataclasses map to nested mappings; tuples take lists of the right length; ``X | None``
takes null. Dotted keys (``optim.lr``) name a leaf in overrides from the command line, in Tune
search spaces and in a trial's fixed keys alike.

A field declares its rule in its annotation: ``Annotated[float, Range(gt=0)]`` for a number
(every float must also be finite: NaN and inf are refused everywhere), ``Annotated[str, NAME]``
for a name that becomes a file, folder or MLflow name. :func:`from_dict` enforces them, so a
config file, a command-line override and a Tune search-space value meet the same rule. The rule
types and shared ranges are defined in :mod:`preprocessing.config_rules` and re-exported here.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

# The rules live below pipeline/ so the preprocessing stages' configs declare theirs too; the
# training and sweep configs import them from here.
from preprocessing.config_rules import (  # noqa: F401 (re-exported)
    AT_LEAST_1,
    FRACTION,
    JPEG_QUALITY,
    NAME,
    NON_NEGATIVE,
    POSITIVE,
    PROBABILITY,
    SEED_RANGE,
    Name,
    Range,
)

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names the source and key."""


def check_name(value: str, where: str, rule: Name = NAME) -> str:
    """``value`` if it is a safe name, else a :class:`ConfigError` naming ``where`` (a flag)."""
    reason = rule.refusal(value)
    if reason:
        raise ConfigError(f"{where}: must be {reason}, got {value!r}")
    return value


def load_config(path: Path, cls: type[T], overrides: dict[str, Any] | None = None,
                override_source: str = "command line") -> T:
    """Read a YAML file into dataclass ``cls``; ``overrides`` (dotted keys) win over the file.

    Each override is checked on its own first, so a bad one is named as ``override_source``'s
    rather than the file's."""
    path = Path(path)
    data = read_yaml_mapping(path)
    for dotted, value in (overrides or {}).items():
        check_leaf(cls, dotted, value, override_source)
        set_dotted(data, dotted, value, str(path))
    return from_dict(cls, data, source=str(path))


def check_leaf(cls: type, dotted: str, value: Any, source: str) -> None:
    """Check one dotted key's value against its field's type and rule (an unknown key is left to
    :func:`from_dict`, which names it with the known ones)."""
    hint: Any = cls
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(hint):
            return
        hints = typing.get_type_hints(hint, include_extras=True)
        if part not in hints:
            return
        hint = hints[part]
    if not dataclasses.is_dataclass(hint):
        _convert(hint, list(value) if isinstance(value, tuple) else value, source, dotted)


def with_overrides(base: T, overrides: dict[str, Any], source: str) -> T:
    """A config dataclass ``base`` with dotted keys replaced, checked like a config file."""
    data = to_plain(base)
    for dotted, value in overrides.items():
        set_dotted(data, dotted, value, source)
    return from_dict(type(base), data, source=source)


def to_plain(config: Any) -> Any:
    """A config dataclass (or its ``asdict``) as plain YAML/JSON data: tuples become lists."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    if isinstance(config, dict):
        return {key: to_plain(value) for key, value in config.items()}
    if isinstance(config, (list, tuple)):
        return [to_plain(value) for value in config]
    return config


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """A YAML file whose top level is a mapping (an empty file is an empty one)."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as err:
        raise ConfigError(f"{path}: cannot read ({err})") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level")
    return data


def set_dotted(data: dict[str, Any], dotted: str, value: Any, source: str) -> None:
    """Set the leaf ``a.b.c`` of nested mappings, creating the mappings on the way."""
    *parents, leaf = dotted.split(".")
    for key in parents:
        data = data.setdefault(key, {})
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: '{dotted}' names a key inside '{key}', which is not a mapping")
    data[leaf] = list(value) if isinstance(value, tuple) else value


def from_dict(cls: type[T], data: dict[str, Any], source: str = "config", prefix: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, checking every key and type."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: '{prefix.rstrip('.') or cls.__name__}' must be a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{source}: unknown key '{prefix}{unknown[0]}' (known: {', '.join(fields)})")
    hints = typing.get_type_hints(cls, include_extras=True)
    values = {}
    for name, field in fields.items():
        key = f"{prefix}{name}"
        if name not in data:
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{source}: required key '{key}' is missing")
            continue
        values[name] = _convert(hints[name], data[name], source, key)
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{source}: {prefix.rstrip('.') or cls.__name__}: {err}") from err


def _convert(hint: Any, value: Any, source: str, key: str, nullable: bool = False) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Annotated:
        # A number's rule names its range when it refuses NaN or inf, so it is checked there.
        value = _float(value, source, key) if args[0] is float else _convert(args[0], value, source, key)
        for rule in (item for item in hint.__metadata__ if isinstance(item, (Range, Name))):
            reason = rule.refusal(value)
            if reason:
                raise ConfigError(f"{source}: '{key}' must be {reason}{' or null' if nullable else ''}, "
                                  f"got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _convert(options[0], value, source, key, nullable=len(args) > 1)
        raise ConfigError(f"{source}: '{key}' has an unsupported union type {hint}")
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, source, prefix=f"{key}.")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{source}: '{key}' must be one of {list(args)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: '{key}' must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, source, f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{source}: '{key}' must hold {len(args)} values, got {len(value)}")
        pairs = enumerate(zip(args, value, strict=True))
        return tuple(_convert(a, v, source, f"{key}[{i}]") for i, (a, v) in pairs)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{key}' must be a mapping, got {value!r}")
        return {str(k): _convert(args[1], v, source, f"{key}.{k}") for k, v in value.items()}
    if hint is float:
        number = _float(value, source, key)
        if not math.isfinite(number):
            raise ConfigError(f"{source}: '{key}' must be a finite number, got {value!r}")
        return number
    if hint is bool or hint is int:
        if type(value) is not hint:
            raise ConfigError(f"{source}: '{key}' must be {hint.__name__}, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: '{key}' must be a string, got {value!r}")
        return value
    if hint is Path:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: '{key}' must be a path string, got {value!r}")
        return Path(value)
    raise ConfigError(f"{source}: '{key}' has an unsupported type {hint}")


def _float(value: Any, source: str, key: str) -> float:
    """A number as a float (an integer too large for one becomes inf); NaN and inf pass."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{source}: '{key}' must be a number, got {value!r}")
    try:
        return float(value)
    except OverflowError:
        return math.inf

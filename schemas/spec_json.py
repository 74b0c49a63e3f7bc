"""A ``FeatureSpec`` as JSON, for model directories: data only, read back type by type.

A model directory is written by one process and read by others (serving, ``--resume``), so
nothing in it may run code when read (a pickle can). The spec is stored as the JSON of its
dataclasses (enums by value, tuples as lists) and rebuilt from the dataclasses' field types;
a value of the wrong type or an unknown field is refused with its path in the spec.

>>> from schemas.spec import load_spec
>>> spec = load_spec("movielens")
>>> spec_from_json(spec_to_json(spec)) == spec
True
"""
from __future__ import annotations

import dataclasses
import enum
import json
import types
import typing
from typing import Any

from schemas.spec_types import FeatureSpec


class SpecJsonError(ValueError):
    """The JSON does not describe a FeatureSpec (names the field and the value)."""


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {field.name: _plain(getattr(value, field.name)) for field in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (tuple, list)):
        return [_plain(item) for item in value]
    return value


def spec_to_json(spec: FeatureSpec) -> str:
    return json.dumps(_plain(spec), indent=1, allow_nan=False)


def _build(kind: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        (inner,) = [option for option in options if option is not type(None)]
        return _build(inner, value, where)
    if origin is tuple:
        if not isinstance(value, list):
            raise SpecJsonError(f"{where}: expected a list, got {value!r:.80}")
        item = typing.get_args(kind)[0]
        return tuple(_build(item, element, f"{where}[{index}]") for index, element in enumerate(value))
    if isinstance(kind, type) and dataclasses.is_dataclass(kind):
        if not isinstance(value, dict):
            raise SpecJsonError(f"{where}: expected an object, got {value!r:.80}")
        hints = typing.get_type_hints(kind)
        names = {field.name for field in dataclasses.fields(kind)}
        unknown = sorted(set(value) - names)
        if unknown:
            raise SpecJsonError(f"{where}: unknown field(s) {unknown}")
        return kind(**{name: _build(hints[name], element, f"{where}.{name}") for name, element in value.items()})
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        try:
            return kind(value)
        except ValueError:
            raise SpecJsonError(f"{where}: {value!r:.80} is not one of {[m.value for m in kind]}") from None
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind in (int, str, bool) and type(value) is kind:
        return value
    raise SpecJsonError(f"{where}: expected {getattr(kind, '__name__', kind)}, got {value!r:.80}")


def spec_from_json(text: str | bytes) -> FeatureSpec:
    try:
        raw = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise SpecJsonError(f"not valid JSON: {exc}") from None
    if isinstance(raw, dict) and "sync" in raw and "publish" not in raw:  # (model dirs before the rename)
        raw["publish"] = raw.pop("sync")
    try:
        return _build(FeatureSpec, raw, "spec")
    except (RecursionError, TypeError) as exc:
        raise SpecJsonError(f"not a feature spec: {exc}") from None

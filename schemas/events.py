"""Avro event schemas shipped with streamrec and their Arrow equivalents.

A schema is named by a built-in name (``impression``, ``action``, ``example``,
``movielens_impression``, ...) or by the path of an ``.avsc`` file.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import fastavro
import pyarrow as pa

AVRO_DIR = Path(__file__).parent / "avro"
# Event times a record may carry, ms since the epoch: [1970-01-01, 2200-01-01). Outside it a
# time is a bug (seconds for ms, a sentinel, overflow), and it would break watermarks, windows
# and dates downstream: such records are dead letters ("event_time_out_of_range") in every mode.
# A spec may narrow it (``events.time_range``), never widen it.
EVENT_TIME_RANGE_MS = (0, 7_258_118_400_000)
# An event time later than any record's (and its negation earlier): a watermark at the end of
# input, or "no time yet". Far from int64's ends, so sums with windows do not overflow.
END_OF_TIME_MS = 1 << 62

#: Fields every impression schema must carry (name -> Avro type), whatever context it adds.
CORE_IMPRESSION_FIELDS = {
    "request_id": "string",
    "user_id": "string",
    "item_id": "string",
    "event_time_ms": "long",
    "position": "int",
}


class SchemaError(ValueError):
    """An event schema is missing, malformed or lacks a required field."""


def builtin_schema_names() -> list[str]:
    return sorted(p.stem for p in AVRO_DIR.glob("*.avsc"))


def schema_path(name_or_path: str | Path) -> Path:
    """Resolve a built-in schema name or an ``.avsc`` path to a file path."""
    candidate = Path(name_or_path)
    if candidate.suffix == ".avsc":
        if not candidate.is_file():
            raise SchemaError(f"schema file {str(candidate)!r} does not exist")
        return candidate
    builtin = AVRO_DIR / f"{name_or_path}.avsc"
    if not builtin.is_file():
        raise SchemaError(
            f"unknown schema {str(name_or_path)!r}: not an .avsc path and not one of "
            f"{builtin_schema_names()}"
        )
    return builtin


@lru_cache(maxsize=None)
def _load(path: str) -> dict:
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        return fastavro.parse_schema(raw)
    except (json.JSONDecodeError, fastavro.schema.SchemaParseException, KeyError, TypeError) as exc:
        raise SchemaError(f"schema {path!r} is not valid Avro: {exc}") from exc


def load_schema(name_or_path: str | Path) -> dict:
    """The parsed (fastavro) schema for a built-in name or an ``.avsc`` path."""
    return _load(str(schema_path(name_or_path)))


def log_schemas(events) -> dict[str, dict]:
    """The parsed schemas of a spec's logs by kind: ``{"impressions": ..., "actions": ...}``
    (``events``: the spec's ``EventsSpec``)."""
    return {"impressions": load_schema(events.impression), "actions": load_schema(events.action)}


def field_types(schema: dict) -> dict[str, Any]:
    """Top-level field name -> Avro type (as written in the schema)."""
    return {field["name"]: field["type"] for field in schema["fields"]}


def check_impression_schema(schema: dict) -> None:
    """Raise SchemaError unless the schema has every core impression field with its type."""
    types = field_types(schema)
    for name, avro_type in CORE_IMPRESSION_FIELDS.items():
        if name not in types:
            raise SchemaError(f"impression schema {schema['name']!r} lacks core field {name!r}")
        if types[name] != avro_type:
            raise SchemaError(
                f"impression schema {schema['name']!r}: field {name!r} must be {avro_type!r}, "
                f"got {types[name]!r}"
            )


def base_type(avro_type: Any) -> tuple[Any, bool]:
    """Strip a ``["null", T]`` union: returns (T, nullable)."""
    if isinstance(avro_type, list):
        non_null = [t for t in avro_type if t != "null"]
        if len(non_null) != 1:
            raise SchemaError(f"only [null, T] unions are supported, got {avro_type!r}")
        return non_null[0], len(non_null) < len(avro_type)
    return avro_type, False


_ARROW_PRIMITIVES = {
    "string": pa.string(),
    "bytes": pa.binary(),
    "boolean": pa.bool_(),
    "int": pa.int32(),
    "long": pa.int64(),
    "float": pa.float32(),
    "double": pa.float64(),
}


def arrow_type(avro_type: Any) -> pa.DataType:
    """Arrow type of an Avro type: records -> struct, arrays -> list, maps -> map, enums -> string."""
    avro_type, _ = base_type(avro_type)
    if isinstance(avro_type, str):
        if avro_type in _ARROW_PRIMITIVES:
            return _ARROW_PRIMITIVES[avro_type]
        raise SchemaError(f"no Arrow equivalent for Avro type {avro_type!r}")
    kind = avro_type["type"]
    if kind == "enum":
        return pa.string()
    if kind == "array":
        return pa.list_(arrow_type(avro_type["items"]))
    if kind == "map":
        return pa.map_(pa.string(), arrow_type(avro_type["values"]))
    if kind == "record":
        return pa.struct([arrow_field(f) for f in avro_type["fields"]])
    if kind in _ARROW_PRIMITIVES:
        return _ARROW_PRIMITIVES[kind]
    raise SchemaError(f"no Arrow equivalent for Avro type {avro_type!r}")


def arrow_field(avro_field: dict) -> pa.Field:
    _, nullable = base_type(avro_field["type"])
    return pa.field(avro_field["name"], arrow_type(avro_field["type"]), nullable=nullable)


def arrow_schema(schema: dict) -> pa.Schema:
    """The Arrow schema of an Avro record schema (used for Parquet logs and outputs)."""
    return pa.schema([arrow_field(f) for f in schema["fields"]])


def defaults(schema: dict) -> dict[str, Any]:
    """Field name -> default value, for the fields that declare one."""
    return {f["name"]: f["default"] for f in schema["fields"] if "default" in f}

"""A record checked against its Avro schema: defaults filled, unknown fields dropped, every type
checked with no coercion (what the log readers do to a record they cannot resolve, and serving
to every request)."""
from __future__ import annotations

import fastavro
import fastavro.validation

from schemas.events import base_type


def conform(record: dict, schema: dict) -> dict:
    """Fit a record to ``schema``: fill defaults, drop unknown fields, check every type.

    Raises ValueError naming the field and the value.
    """
    fields = schema["fields"]
    result = {}
    for field in fields:
        name = field["name"]
        if name in record and record[name] is not None:
            result[name] = record[name]
        elif name in record and base_type(field["type"])[1]:
            result[name] = None
        elif "default" in field:
            result[name] = field["default"]
        else:
            raise ValueError(f"missing required field {name!r}")
    for field in fields:
        name = field["name"]
        try:
            fastavro.validation.validate(result[name], field["type"], raise_errors=True)
        except fastavro.validation.ValidationError:
            raise ValueError(
                f"field {name!r}: value {result[name]!r} is not of type {field['type']!r}"
            ) from None
    return result


def _is_int(low: int, high: int):
    return lambda v: type(v) is int and low <= v < high


_PRIMITIVE_CHECKS = {
    "null": lambda v: v is None, "string": lambda v: isinstance(v, str), "boolean": lambda v: type(v) is bool,
    "int": _is_int(-(1 << 31), 1 << 31), "long": _is_int(-(1 << 63), 1 << 63),
    "float": lambda v: type(v) in (int, float), "double": lambda v: type(v) in (int, float),
}


def _quick_check(avro_type):
    """A predicate that accepts only values ``conform`` accepts for ``avro_type`` (None where the
    type is not one of the simple ones: records of it then go through ``conform`` alone)."""
    if isinstance(avro_type, str):
        return _PRIMITIVE_CHECKS.get(avro_type)
    if isinstance(avro_type, list):
        checks = [_quick_check(branch) for branch in avro_type]
        return None if None in checks else (lambda v: any(check(v) for check in checks))
    if isinstance(avro_type, dict) and avro_type.get("type") in ("array", "map"):
        item = _quick_check(avro_type.get("items" if avro_type["type"] == "array" else "values"))
        if item is None:
            return None
        if avro_type["type"] == "array":
            return lambda v: isinstance(v, list) and all(item(x) for x in v)
        return lambda v: isinstance(v, dict) and all(isinstance(k, str) and item(x) for k, x in v.items())
    if isinstance(avro_type, dict) and isinstance(avro_type.get("type"), str) and len(avro_type) == 1:
        return _quick_check(avro_type["type"])
    return None


def conform_records(records: list[dict], schema: dict) -> list[dict]:
    """``conform`` for many JSON records (what serving receives): the same check and the same
    errors, but records whose every field passes a quick type test are filled without calling
    fastavro per value. Raises ValueError ``record I: <conform's message>`` at the first misfit."""
    checks = [(field["name"], _quick_check(field["type"]), field) for field in schema["fields"]]
    quick = all(check is not None for _, check, _ in checks)
    out = []
    for index, record in enumerate(records):
        if quick and isinstance(record, dict):
            fitted = {}
            for name, check, field in checks:
                value = record.get(name)
                if value is None and not (name in record and check(None)):  # absent, or null where not allowed
                    if "default" not in field:
                        break
                    value = field["default"]
                if not check(value):
                    break
                fitted[name] = value
            else:
                out.append(fitted)
                continue
        try:
            if not isinstance(record, dict):
                raise ValueError(f"expected a JSON object, got {type(record).__name__}")
            out.append(conform(record, schema))
        except ValueError as exc:
            raise ValueError(f"record {index}: {exc}") from None
    return out

"""Event schemas (schemas.events): round trips, evolution (old writer -> new reader), Arrow equivalents."""
import io
import json

import fastavro
import pyarrow as pa
import pytest

from schemas.events import SchemaError, arrow_schema, builtin_schema_names, check_impression_schema, load_schema

IMPRESSION = {"request_id": "r1", "user_id": "u1", "item_id": "i1", "event_time_ms": 1_700_000_000_000,
              "position": 2, "age": 31, "gender": "F", "occupation": "writer", "zip_code": "10001",
              "release_year": 1995, "genres": ["Comedy", "Drama"]}


def _roundtrip(records, writer_schema, reader_schema=None):
    buffer = io.BytesIO()
    fastavro.writer(buffer, fastavro.parse_schema(writer_schema), records)
    buffer.seek(0)
    return list(fastavro.reader(buffer, reader_schema=reader_schema))


def test_every_builtin_schema_parses_and_has_an_arrow_equivalent():
    names = builtin_schema_names()
    assert {"impression", "action", "example", "movielens_impression", "obd_impression",
            "synthetic_impression"} <= set(names)
    for name in names:
        schema = load_schema(name)
        assert arrow_schema(schema).names == [f["name"] for f in schema["fields"]]


def test_impression_round_trip():
    schema = load_schema("movielens_impression")
    assert _roundtrip([IMPRESSION], schema) == [IMPRESSION]


def test_example_round_trip_with_maps_and_arrays():
    schema = load_schema("example")
    example = {"request_id": "r", "user_id": "u", "item_id": "i", "impression_time_ms": 5, "position": 0,
               "labels": {"click": 1, "like": 0}, "label_times_ms": {"click": 9}, "sample_rate": 0.25,
               "fids": [(3 << 48) | 77, (4 << 48) | 1], "dense": [0.5, -1.25]}
    assert _roundtrip([example], schema) == [example]
    assert arrow_schema(schema).field("labels").type == pa.map_(pa.string(), pa.int32())


def test_old_impression_schema_is_read_with_defaults_for_new_fields():
    # Version 1 of the MovieLens impression had no release year and no genres.
    current = load_schema("movielens_impression")
    v1 = json.loads(json.dumps(current))
    v1["fields"] = [f for f in v1["fields"] if f["name"] not in ("release_year", "genres")]
    old_record = {k: v for k, v in IMPRESSION.items() if k not in ("release_year", "genres")}
    (read,) = _roundtrip([old_record], v1, current)
    assert read == {**old_record, "release_year": None, "genres": []}


def test_action_type_symbol_unknown_to_the_reader_reads_as_unknown():
    current = load_schema("action")
    newer = json.loads(json.dumps(current))
    enum = newer["fields"][3]["type"]
    enum["symbols"] = enum["symbols"] + ["bookmark"]
    record = {"request_id": "r", "item_id": "i", "user_id": "u", "action_type": "bookmark",
              "event_time_ms": 1, "value": 1.0}
    (read,) = _roundtrip([record], newer, current)
    assert read["action_type"] == "UNKNOWN"


def test_old_action_schema_without_user_and_value_gets_defaults():
    current = load_schema("action")
    v1 = json.loads(json.dumps(current))
    v1["fields"] = [f for f in v1["fields"] if f["name"] not in ("user_id", "value")]
    (read,) = _roundtrip([{"request_id": "r", "item_id": "i", "action_type": "like", "event_time_ms": 7}], v1,
                         current)
    assert read == {"request_id": "r", "item_id": "i", "user_id": "", "action_type": "like",
                    "event_time_ms": 7, "value": 1.0}


def test_impression_schema_must_have_the_core_fields():
    schema = load_schema("movielens_impression")
    check_impression_schema(schema)
    broken = json.loads(json.dumps(schema))
    broken["fields"] = [f for f in broken["fields"] if f["name"] != "event_time_ms"]
    with pytest.raises(SchemaError, match="event_time_ms"):
        check_impression_schema(fastavro.parse_schema(broken))


def test_unknown_schema_name_is_named_in_the_error():
    with pytest.raises(SchemaError, match="'nonesuch'"):
        load_schema("nonesuch")

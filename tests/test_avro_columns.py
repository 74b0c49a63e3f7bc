"""The vectorised schemaless Avro decoder against fastavro, record by record."""
from __future__ import annotations

import io

import fastavro
import numpy as np
import pyarrow as pa
import pytest

from schemas.avro_columns import decode_columns, supports
from schemas.events import arrow_schema, load_schema

SCHEMA = fastavro.parse_schema({
    "type": "record", "name": "Every", "fields": [
        {"name": "i", "type": "int"}, {"name": "l", "type": "long"}, {"name": "f", "type": "float"},
        {"name": "d", "type": "double"}, {"name": "b", "type": "boolean"}, {"name": "s", "type": "string"},
        {"name": "raw", "type": "bytes"}, {"name": "maybe", "type": ["null", "long"]},
        {"name": "maybe_s", "type": ["null", "string"]},
        {"name": "e", "type": {"type": "enum", "name": "E", "symbols": ["a", "b", "c"]}},
        {"name": "tags", "type": {"type": "array", "items": "string"}},
        {"name": "ids", "type": {"type": "array", "items": "long"}}]})


@pytest.fixture(autouse=True, params=["numpy", "compiled"])
def varints(request, monkeypatch):
    """Every test runs with the varints read in numpy and by the compiled loop."""
    import schemas.avro_columns as columns

    monkeypatch.setattr(columns, "COMPILED_FROM_ROWS", 10**9 if request.param == "numpy" else 0)
    return request.param


def _records(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"i": int(rng.integers(-2**31, 2**31)), "l": int(rng.integers(-2**63, 2**63 - 1)),
             "f": float(np.float32(rng.normal())), "d": float(rng.normal()), "b": bool(rng.integers(2)),
             "s": "é" * int(rng.integers(0, 5)) + str(i), "raw": bytes(rng.integers(0, 256, int(rng.integers(0, 4)))),
             "maybe": None if rng.random() < 0.3 else int(rng.integers(-1000, 1000)),
             "maybe_s": None if rng.random() < 0.5 else "x" * int(rng.integers(0, 3)),
             "e": "abc"[int(rng.integers(3))], "tags": [str(t) for t in range(int(rng.integers(0, 4)))],
             "ids": [int(x) for x in rng.integers(-10**12, 10**12, int(rng.integers(0, 3)))]}
            for i in range(n)]


def _encoded(record: dict, schema: dict = SCHEMA) -> bytes:
    out = io.BytesIO()
    fastavro.schemaless_writer(out, schema, record)
    return out.getvalue()


def test_every_supported_type_decodes_as_fastavro_reads_it():
    records = _records(500)
    table, bad = decode_columns([_encoded(r) for r in records], SCHEMA)
    assert not bad.any()
    assert table.equals(pa.Table.from_pylist(records, schema=arrow_schema(SCHEMA)))


@pytest.mark.parametrize("name", ["impression", "action", "movielens_impression", "obd_impression",
                                  "synthetic_impression"])
def test_the_shipped_event_schemas_are_decoded_column_wise(name):
    assert supports(load_schema(name))


def test_an_array_written_in_several_sized_blocks_reads_as_one_list():
    # Avro lets a writer split an array into blocks; a negative count is followed by the block's size
    schema = fastavro.parse_schema({"type": "record", "name": "A", "fields": [
        {"name": "ids", "type": {"type": "array", "items": "long"}}, {"name": "n", "type": "int"}]})
    zigzag = {2: b"\x04", 1: b"\x02", -2: b"\x03", 5: b"\x0a", 7: b"\x0e", 9: b"\x12", 3: b"\x06"}
    blocks = zigzag[-2] + zigzag[2] + zigzag[5] + zigzag[7] + zigzag[1] + zigzag[9] + b"\x00" + zigzag[3]
    table, bad = decode_columns([blocks, _encoded({"ids": [], "n": 1}, schema)], schema)
    assert not bad.any() and table.to_pylist() == [{"ids": [5, 7, 9], "n": 3}, {"ids": [], "n": 1}]


def test_longs_at_every_varint_length_and_the_int64_extremes_decode_exactly():
    schema = fastavro.parse_schema({"type": "record", "name": "L", "fields": [{"name": "l", "type": "long"}]})
    edges = [0, -1, 1, 63, -64, 64, -65, 2**31 - 1, -2**31, 2**62, -2**62 - 1, 2**63 - 1, -2**63]
    edges += [sign * (2**(7 * k) - 1) for k in range(1, 10) for sign in (1, -1)]
    table, bad = decode_columns([_encoded({"l": value}, schema) for value in edges], schema)
    assert not bad.any() and table.column("l").to_pylist() == edges
    _, cut = decode_columns([_encoded({"l": 2**40}, schema)[:-1]], schema)  # its last byte missing
    assert cut.all()


def test_values_that_are_not_one_record_are_marked_bad_and_the_rest_still_decode():
    records = _records(6, seed=1)
    values = [_encoded(r) for r in records]
    values[1] = values[1][:-3]  # truncated
    values[2] = values[2] + b"\x00"  # trailing byte
    values[3] = b""  # empty
    values[4] = b"\xff" * 40  # an endless varint
    table, bad = decode_columns(values, SCHEMA)
    assert bad.tolist() == [False, True, True, True, True, False]
    expected = pa.Table.from_pylist([records[0], records[5]], schema=arrow_schema(SCHEMA))
    assert table.filter(pa.array(~bad)).equals(expected)


def test_a_bad_union_branch_or_enum_index_marks_its_record():
    schema = fastavro.parse_schema({"type": "record", "name": "U", "fields": [
        {"name": "maybe", "type": ["null", "long"]},
        {"name": "e", "type": {"type": "enum", "name": "E2", "symbols": ["a", "b"]}}]})
    good = _encoded({"maybe": 3, "e": "b"}, schema)
    table, bad = decode_columns([good, b"\x04\x02\x02", b"\x00\x08"], schema)  # branch 2; enum index 4
    assert bad.tolist() == [False, True, True] and table.slice(0, 1).to_pylist() == [{"maybe": 3, "e": "b"}]


def test_invalid_utf8_marks_the_batch_for_a_record_by_record_read():
    schema = fastavro.parse_schema({"type": "record", "name": "S", "fields": [{"name": "s", "type": "string"}]})
    _, bad = decode_columns([_encoded({"s": "ok"}, schema), b"\x04\xff\xfe"], schema)
    assert bad.all()

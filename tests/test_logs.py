"""Event-log reading: bad files and records give errors naming file and record, or dead letters."""
import json

import fastavro
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from runners.cli import main
from schemas.dead_letters import DeadLetterSink
from schemas.events import load_schema
from schemas.log_writer import SpanWriter, write_log
from schemas.logs import LogReadError, log_files, read_log, read_log_file
from tests.conftest import without_checksums

ACTION = load_schema("action")


def _actions(n, start=0):
    return [{"request_id": f"r{i}", "item_id": "i", "user_id": "u", "action_type": "click",
             "event_time_ms": start + i * 1000, "value": 1.0} for i in range(n)]


def _write_avro(path, schema, records, codec="null"):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as out:
        fastavro.writer(out, fastavro.parse_schema(schema), records, codec=codec, sync_interval=200)


def test_write_log_splits_by_hour_and_sorts(tmp_path):
    hour = 3_600_000
    table = pa.Table.from_pylist(_actions(5, start=0)[::-1] + _actions(3, start=hour + 10), schema=None)
    files = write_log(table, tmp_path, "actions", ACTION, "avro")
    assert [f.name for f in files] == ["19700101-00.avro", "19700101-01.avro"]
    times = [r["event_time_ms"] for r in read_log(tmp_path, "actions", ACTION)]
    assert times == sorted(times) and len(times) == 8


def test_span_writer_writes_each_span_once_in_background(tmp_path):
    writer = SpanWriter(tmp_path, "actions", ACTION, "parquet", span_ms=10_000, background=True)
    writer.add(pa.Table.from_pylist(_actions(15)))
    writer.flush(10_000)
    writer.add(pa.Table.from_pylist(_actions(5, start=15_500)))
    files = writer.close()
    # span [10 s, 20 s) got records from both adds: still one file, in time order
    assert [f.name for f in files] == ["19700101-000000.parquet", "19700101-000010.parquet"]
    ids = [r["request_id"] for r in read_log(tmp_path, "actions", ACTION)]
    assert ids == [f"r{i}" for i in range(15)] + [f"r{i}" for i in range(5)]


def test_truncated_avro_strict_names_file_and_record(tmp_path):
    path = tmp_path / "actions" / "a.avro"
    _write_avro(path, ACTION, _actions(2000))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(LogReadError, match=r"a\.avro: unreadable from record \d+ on"):
        list(read_log_file(path, ACTION))


def test_truncated_avro_stream_mode_keeps_good_records_and_dead_letters_the_rest(tmp_path):
    path = tmp_path / "actions" / "a.avro"
    _write_avro(path, ACTION, _actions(2000))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    dead = DeadLetterSink()
    records = list(read_log_file(path, ACTION, dead))
    assert 0 < len(records) < 2000
    assert [r["request_id"] for r in records] == [f"r{i}" for i in range(len(records))]
    assert dead.counts == {"corrupt_file": 1}
    assert "a.avro" in dead.letters[0].detail


def test_garbage_file_is_refused_at_its_header(tmp_path):
    path = tmp_path / "actions" / "junk.avro"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"this is not avro at all")
    with pytest.raises(LogReadError, match="junk.avro: unreadable from the file header on"):
        list(read_log_file(path, ACTION))
    dead = DeadLetterSink()
    assert list(read_log_file(path, ACTION, dead)) == [] and dead.counts == {"corrupt_file": 1}


def test_missing_required_field_and_wrong_type_become_dead_letters(tmp_path):
    # A producer wrote event_time_ms as an optional string: some records lack it, some hold text.
    loose = json.loads(json.dumps(ACTION))
    for field in loose["fields"]:
        if field["name"] == "event_time_ms":
            field["type"] = ["null", "string"]
    records = _actions(3)
    records[0]["event_time_ms"] = None
    records[1]["event_time_ms"] = "yesterday"
    records[2]["event_time_ms"] = None
    loose_records = [dict(r) for r in records]
    path = tmp_path / "actions" / "loose.avro"
    _write_avro(path, loose, loose_records)
    dead = DeadLetterSink()
    assert list(read_log_file(path, ACTION, dead)) == []
    assert dead.counts == {"missing_field": 2, "wrong_type": 1}
    wrong = [d for d in dead.letters if d.reason == "wrong_type"][0]
    assert "loose.avro: record 1: field 'event_time_ms': value 'yesterday'" in wrong.detail
    assert json.loads(wrong.record)["request_id"] == "r1"
    with pytest.raises(LogReadError, match="loose.avro: record 0: missing required field 'event_time_ms'"):
        list(read_log_file(path, ACTION))


def test_parquet_missing_required_column_and_defaults(tmp_path):
    path = tmp_path / "actions" / "p.parquet"
    path.parent.mkdir(parents=True)
    rows = [{k: v for k, v in r.items() if k not in ("value", "user_id")} for r in _actions(3)]
    pq.write_table(pa.Table.from_pylist(rows), path)
    read = list(read_log_file(path, ACTION))
    assert read[0]["value"] == 1.0 and read[0]["user_id"] == ""
    pq.write_table(pa.Table.from_pylist([{k: v for k, v in r.items() if k != "event_time_ms"} for r in rows]),
                   path)
    with pytest.raises(LogReadError, match="p.parquet: unreadable from the file header on .*'event_time_ms'"):
        list(read_log_file(path, ACTION))


def test_logs_check_reports_dead_letters_and_exits_1(movielens_logs, tmp_path, capsys):
    logs, _ = movielens_logs
    import shutil

    copy = tmp_path / "logs"
    shutil.copytree(logs, copy)
    without_checksums(copy)
    victim = log_files(copy, "impressions")[50]
    victim.write_bytes(victim.read_bytes()[:300])
    dead_path = tmp_path / "dead.jsonl"
    assert main(["logs", "check", str(copy), "--spec", "movielens", "--dead-letters", str(dead_path)]) == 1
    figures = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert figures["dead_letters"] == {"corrupt_file": 1}
    assert 0 < 100_000 - figures["impressions"] < 2_000
    assert victim.name in dead_path.read_text()

"""Logs a careless user or a broken producer hands the job: missing inputs, logs of another
spec, and event times no clock can have. Each is an error before the job starts or a dead letter
with a reason, in every mode; the last line printed is always strict JSON."""
from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pytest

from event_datasets.synthetic import SyntheticConfig, generate
from runners.cli import main
from schemas.events import load_schema
from schemas.log_writer import write_table
from schemas.logs import arrow_schema, log_files, read_log_file
from tests.conftest import without_checksums


@pytest.fixture(scope="module")
def synthetic_logs(tmp_path_factory):
    logs = tmp_path_factory.mktemp("synthetic")
    generate(logs, SyntheticConfig(events=3_000, span_hours=4, seed=3))
    return logs


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])  # strict: NaN would not parse


@pytest.mark.parametrize("command", ["join", "run"])
def test_missing_logs_are_an_error_naming_them(command, tmp_path, capsys):
    code = main([command, "--spec", "synthetic", "--logs", str(tmp_path / "nonexistent"), "--out", str(tmp_path / "o")])
    error = capsys.readouterr().err
    assert code == 1 and "nonexistent" in error and "no such directory" in error


def test_no_actions_directory_is_an_error_and_a_one_class_run_prints_null(synthetic_logs, tmp_path, capsys):
    logs = tmp_path / "logs"
    shutil.copytree(synthetic_logs, logs)
    shutil.rmtree(logs / "actions")
    assert main(["run", "--spec", "synthetic", "--logs", str(logs), "--out", str(tmp_path / "o"), "--no-progress"]) == 1
    assert "no actions/ directory" in capsys.readouterr().err
    (logs / "actions").mkdir()  # present but empty: every impression a negative, the AUC undefined
    assert main(["run", "--spec", "synthetic", "--logs", str(logs), "--out", str(tmp_path / "o"), "--no-progress"]) == 0
    summary = _last_json(capsys)
    assert summary["auc"] is None and summary["examples"] > 0
    rows = [json.loads(line) for line in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(row["auc"] is None for row in rows)


def test_logs_of_another_spec_are_refused_before_the_job_starts(movielens_logs, tmp_path, capsys):
    logs, _ = movielens_logs
    assert main(["run", "--spec", "synthetic", "--logs", str(logs), "--out", str(tmp_path / "o")]) == 1
    error = capsys.readouterr().err
    assert "lacks the field(s)" in error and "these logs are not for this spec" in error
    assert not (tmp_path / "o" / "examples").exists()


@pytest.mark.parametrize("mode", [[], ["--streaming"]])
def test_event_times_outside_any_clock_are_dead_letters_in_every_mode(mode, synthetic_logs, tmp_path, capsys):
    logs = tmp_path / "logs"
    shutil.copytree(synthetic_logs, logs)
    schema = load_schema("synthetic_impression")
    first = log_files(logs, "impressions")[0]
    record = next(iter(read_log_file(first, schema)))
    extreme = [{**record, "request_id": f"x{i}", "event_time_ms": t}
               for i, t in enumerate([2 ** 63 - 1, -2 ** 63, 4_100_000_000_000_000])]
    write_table(pa.Table.from_pylist(extreme, schema=arrow_schema(schema)),
                logs / "impressions" / f"zz-extreme{first.suffix}", schema, first.suffix[1:])
    assert main(["run", "--spec", "synthetic", "--logs", str(logs), "--out", str(tmp_path / "o"), "--no-progress",
                 *mode]) == 0
    summary = _last_json(capsys)
    assert summary["dead_letters"].get("event_time_out_of_range") == 3 and summary["examples"] > 0
    letters = [json.loads(line) for path in (tmp_path / "o" / "dead_letters").glob("*")
               for line in path.read_text().splitlines()]
    assert sum(letter["reason"] == "event_time_out_of_range" for letter in letters) == 3
    assert (tmp_path / "o" / "metrics.png").is_file()


def test_streaming_counts_every_dead_letter_it_writes(synthetic_logs, tmp_path, capsys):
    """A truncated impression file: its rest is one corrupt_file letter and the actions on the
    lost impressions are orphans. Streaming and backfill report the same counts, and the counts
    are those of the letters written."""
    logs = tmp_path / "logs"
    shutil.copytree(synthetic_logs, logs)
    without_checksums(logs)
    first = log_files(logs, "impressions")[0]
    first.write_bytes(first.read_bytes()[: first.stat().st_size // 2])
    reported = {}
    for mode in ("backfill", "streaming"):
        out = tmp_path / mode
        assert main(["join", "--spec", "synthetic", "--logs", str(logs), "--out", str(out),
                     *(["--streaming"] if mode == "streaming" else [])]) == 0
        reported[mode] = _last_json(capsys)["dead_letters"]
        written: dict[str, int] = {}
        for path in (out / "dead_letters").glob("*.jsonl"):
            for line in path.read_text().splitlines():
                reason = json.loads(line)["reason"]
                written[reason] = written.get(reason, 0) + 1
        assert reported[mode] == written, mode
    assert reported["streaming"] == reported["backfill"]
    assert reported["backfill"].get("corrupt_file") == 1 and sum(reported["backfill"].values()) > 1


def test_the_request_check_is_the_log_readers_check():
    """``conform_records`` (serving) accepts, fills and refuses exactly as ``conform`` (readers)."""
    from schemas.records import conform, conform_records

    schema = load_schema("movielens_impression")
    good = {"request_id": "r", "user_id": "u", "item_id": "i", "event_time_ms": 5, "age": 30, "genres": ["Drama"]}
    cases = [good, {**good, "release_year": None}, {**good, "release_year": 1990}, {**good, "extra": 1},
             {k: v for k, v in good.items() if k != "genres"}, {**good, "genres": None}, {**good, "age": None},
             {**good, "genres": "Horror"}, {**good, "age": 20.7}, {**good, "age": True}, {**good, "event_time_ms": 1.5},
             {**good, "age": 1 << 40}, {**good, "genres": [1]}, {k: v for k, v in good.items() if k != "user_id"}]
    for record in cases:
        try:
            expected = conform(record, schema)
        except ValueError as exc:
            with pytest.raises(ValueError) as raised:
                conform_records([good, record], schema)
            assert str(raised.value) == f"record 1: {exc}"
        else:
            assert conform_records([good, record], schema) == [conform(good, schema), expected]


def test_a_flipped_bit_inside_a_log_file_fails_its_manifest_checksum(movielens_logs, tmp_path, capsys):
    """Avro's deflate blocks have no checksum; the manifest's sha256 per file catches the flip:
    ``logs check`` fails naming it, and the job reads the file as one dead letter, not as changed records."""
    logs = tmp_path / "logs"
    shutil.copytree(movielens_logs[0], logs)
    assert main(["logs", "check", "--spec", "movielens", str(logs)]) == 0
    clean = _last_json(capsys)
    files = log_files(logs, "impressions")
    assert clean["checksummed_files"] == len(files) + len(log_files(logs, "actions")) > 0
    damaged = files[len(files) // 2]
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0x10
    damaged.write_bytes(bytes(data))
    assert main(["logs", "check", "--spec", "movielens", str(logs)]) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out.strip().splitlines()[-1])["dead_letters"] == {"checksum_mismatch": 1}
    assert damaged.name in captured.err
    assert main(["join", "--spec", "movielens", "--logs", str(logs), "--out", str(tmp_path / "o")]) == 0
    assert _last_json(capsys)["dead_letters"].get("checksum_mismatch") == 1


def _spec_with_time_range(tmp_path, time_range) -> str:
    import yaml

    from schemas.spec import spec_path

    raw = yaml.safe_load(spec_path("synthetic").read_text())
    raw.setdefault("events", {})["time_range"] = time_range
    path = tmp_path / "narrowed.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.mark.parametrize("mode", [[], ["--streaming"]])
def test_a_spec_narrows_the_event_time_range(mode, synthetic_logs, tmp_path, capsys):
    """events.time_range: records before its start or from its end on are dead letters that name
    the range; the others are joined as before."""
    schemas = {"impressions": load_schema("synthetic_impression"), "actions": load_schema("action")}
    times = {kind: [r["event_time_ms"] for path in log_files(synthetic_logs, kind)
                    for r in read_log_file(path, schema)] for kind, schema in schemas.items()}
    start = sorted(times["impressions"])[len(times["impressions"]) // 2]
    outside = sum(t < start for ts in times.values() for t in ts)
    spec = _spec_with_time_range(tmp_path, [start, "2199-12-31T00:00:00"])
    out = tmp_path / "o"
    assert main(["join", "--spec", spec, "--logs", str(synthetic_logs), "--out", str(out), *mode]) == 0
    summary = _last_json(capsys)
    assert summary["dead_letters"]["event_time_out_of_range"] == outside > 0
    letters = [json.loads(line) for path in (out / "dead_letters").glob("*") for line in path.read_text().splitlines()]
    ranged = [letter for letter in letters if letter["reason"] == "event_time_out_of_range"]
    assert len(ranged) == outside and f"outside [{start}, " in ranged[0]["detail"]
    assert "2199-12-31 00:00:00 UTC" in ranged[0]["detail"]


@pytest.mark.parametrize("time_range, named", [
    (["2020-01-01", "2019-01-01"], "expected start < end"),
    (["1969-12-31", "2020-01-01"], "within [1970-01-01, 2200-01-01)"),
    ([0, 10 ** 30], "within [1970-01-01, 2200-01-01)"),
    (["soon", "2020-01-01"], "start 'soon'"),
    ("2020-01-01", "expected [start, end]"),
    ([True, 5], "start True"),
])
def test_a_bad_event_time_range_is_named(time_range, named, tmp_path):
    from schemas.spec import load_spec
    from schemas.spec_types import SpecError

    with pytest.raises(SpecError, match="events.time_range") as raised:
        load_spec(_spec_with_time_range(tmp_path, time_range))
    assert named in str(raised.value)

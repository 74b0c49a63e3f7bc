"""Event logs on disk: one directory per event kind, one file per hour (or day) of event time.

Layout::

    LOGS/impressions/20260101-00.avro   (or .parquet)
    LOGS/actions/20260101-00.avro
    LOGS/manifest.json                  (what wrote the logs, with counts)

Files hold their records in event-time order. Avro files carry their writer schema, so a log
written with an older schema version is read with the current one (new fields take their
defaults). Reading never crashes on bad input: in ``strict`` mode a LogReadError names the
file and record; otherwise the bad record (or the unreadable rest of a file) becomes a
DeadLetter with a reason and a counter. This module reads; ``schemas.log_writer`` writes.
"""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import fastavro
import fastavro.validation
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from schemas.dead_letters import DeadLetter, DeadLetterSink, record_json
from schemas.events import EVENT_TIME_RANGE_MS, arrow_schema, base_type, defaults
from schemas.files import file_sha256
from schemas.records import conform

KINDS = ("impressions", "actions")
FORMATS = ("avro", "parquet")
HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
MANIFEST = "manifest.json"


class LogReadError(ValueError):
    """A log file or record could not be read; the message names the file and the record."""


_manifest_cache: dict[Path, tuple[float, dict]] = {}


def checksum_problem(path: str | Path) -> str | None:
    """Why ``path`` does not match the sha256 its log directory's manifest lists for it (None
    when it matches or is not listed: a file written after the manifest, a live log)."""
    path = Path(path)
    manifest_path = path.parent.parent / MANIFEST
    try:
        mtime = manifest_path.stat().st_mtime
    except OSError:
        return None
    cached = _manifest_cache.get(manifest_path)
    if cached is None or cached[0] != mtime:
        try:
            listed = json.loads(manifest_path.read_text(encoding="utf-8")).get("sha256", {})
        except (OSError, ValueError, AttributeError):
            listed = {}
        cached = _manifest_cache[manifest_path] = (mtime, listed if isinstance(listed, dict) else {})
    expected = cached[1].get(f"{path.parent.name}/{path.name}")
    if expected is None:
        return None
    actual = file_sha256(path)
    return None if actual == expected else (f"{path}: sha256 {actual[:16]}... differs from {expected[:16]}... in "
                                            f"{manifest_path}: the file changed after it was written; not read")


def read_manifest(log_dir: str | Path) -> dict:
    path = Path(log_dir) / MANIFEST
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


# ------------------------------------------------------------------------------------------
# Reading


def log_files(log_dir: str | Path, kind: str) -> list[Path]:
    """The log files of one kind, in time order (file names sort by hour)."""
    if kind not in KINDS:
        raise ValueError(f"unknown log kind {kind!r}: expected one of {KINDS}")
    folder = Path(log_dir) / kind
    return sorted(p for p in folder.glob("*") if p.suffix.lstrip(".") in FORMATS and not p.name.startswith("."))


def _writer_fields(path: Path) -> tuple[str, set[str]] | None:
    """(schema name, field names) the file was written with; None if its header is unreadable
    (the readers then report the damage as a dead letter)."""
    try:
        if path.suffix == ".parquet":
            return "parquet columns", set(pq.read_schema(path).names)
        with open(path, "rb") as fo:
            writer = fastavro.reader(fo).writer_schema
        return str(writer.get("name", "?")), {field["name"] for field in writer.get("fields", [])}
    except Exception:  # noqa: BLE001 - any damage: left to the readers' dead letters
        return None


def check_log_dir(log_dir: str | Path, schemas: dict[str, dict], live: bool = False,
                  used: dict[str, set[str]] | None = None) -> None:
    """Refuse, before a job starts, logs it cannot mean: a missing directory, no impression files
    or no ``actions/`` directory (unless ``live``: files may still come), or files whose writer
    schema lacks a field the spec requires or reads (``schemas``: kind -> reader schema; ``used``:
    kind -> fields the spec's features read; the first and the newest file of each kind are
    checked). Raises LogReadError naming it."""
    log_dir = Path(log_dir)
    if not log_dir.is_dir():
        raise LogReadError(f"logs {str(log_dir)!r}: no such directory")
    for kind, schema in schemas.items():
        files = log_files(log_dir, kind)
        if not live and not (log_dir / kind).is_dir():
            raise LogReadError(f"logs {str(log_dir)!r} have no {kind}/ directory: without it every impression "
                               f"would train as a negative" if kind == "actions" else
                               f"logs {str(log_dir)!r} have no {kind}/ directory")
        if not live and kind == "impressions" and not files:
            raise LogReadError(f"logs {str(log_dir)!r}: no impression files (.avro or .parquet) in impressions/")
        required = {f["name"] for f in schema["fields"] if "default" not in f} | (used or {}).get(kind, set())
        for path in {files[0], files[-1]} if files else ():
            written = _writer_fields(path)
            if written is not None and required - written[1]:
                raise LogReadError(
                    f"{path}: written with schema {written[0]!r}, which lacks the field(s) "
                    f"{sorted(required - written[1])} that the spec's {kind} schema {schema.get('name')!r} requires: "
                    f"these logs are not for this spec")


def _iter_avro(path: Path, schema: dict) -> Iterator[tuple[int, dict | None, str | None]]:
    """Yield (index, record, error) for an Avro file.

    Records are resolved against ``schema`` by fastavro; where the writer schema cannot be
    resolved (detected lazily, at the first record that needs it), the rest of the file is read
    raw and each record is fitted by ``conform``. When ``error`` is set, ``record`` is the raw record.
    """
    index = 0
    with open(path, "rb") as fo:
        try:
            for record in fastavro.reader(fo, reader_schema=schema):
                yield index, record, None
                index += 1
            return
        except fastavro.read.SchemaResolutionError:
            pass
    with open(path, "rb") as fo:
        for raw_index, record in enumerate(fastavro.reader(fo)):
            if raw_index < index:
                continue
            try:
                yield raw_index, conform(record, schema), None
            except ValueError as exc:
                yield raw_index, record, str(exc)


TimeRange = tuple[int, int]  # [start, end) in ms since the epoch


def _time_range_text(time_range_ms: TimeRange) -> str:
    start, end = (datetime.fromtimestamp(t / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
                  for t in time_range_ms)
    return f"[{time_range_ms[0]}, {time_range_ms[1]}) ms ({start} to {end} UTC)"


def _parquet_table(path: Path, schema: dict, time_range_ms: TimeRange | None = EVENT_TIME_RANGE_MS
                   ) -> tuple[pa.Table, np.ndarray]:
    """A Parquet log fitted to ``schema`` (defaults filled, types cast) and the rows that are bad:
    a required field null, or the event time outside ``time_range_ms`` (as a bool mask; None:
    times are not checked here)."""
    table = pq.read_table(path)
    want = arrow_schema(schema)
    fill = defaults(schema)
    columns = []
    for target in want:
        if target.name in table.column_names:
            column = table.column(target.name)
            if column.type != target.type:
                try:
                    column = column.cast(target.type)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                    raise ValueError(f"column {target.name!r} of type {column.type} cannot be read as "
                                     f"{target.type}: {exc}") from None
        elif target.name in fill:
            column = pa.array([fill[target.name]] * table.num_rows, type=target.type)
        else:
            raise ValueError(f"missing required field {target.name!r}")
        columns.append(column)
    fitted = pa.table(columns, schema=want)
    bad = np.zeros(table.num_rows, dtype=bool)
    if time_range_ms is not None and "event_time_ms" in fitted.column_names:
        times = fitted.column("event_time_ms").to_numpy(zero_copy_only=False)
        with np.errstate(invalid="ignore"):
            bad |= ~((times >= time_range_ms[0]) & (times < time_range_ms[1]))
    for field in schema["fields"]:
        if not base_type(field["type"])[1] and fitted.column(field["name"]).null_count:
            bad |= fitted.column(field["name"]).is_null().to_numpy(zero_copy_only=False)
    return fitted, bad


def _iter_parquet(path: Path, schema: dict) -> Iterator[tuple[int, dict | None, str | None]]:
    table, bad = _parquet_table(path, schema, time_range_ms=None)  # (times: read_log_file checks them)
    required = [f["name"] for f in schema["fields"] if not base_type(f["type"])[1]]
    for index, row in enumerate(table.to_pylist()):
        nulls = [name for name in required if row[name] is None] if bad[index] else []
        if nulls:
            yield index, row, f"required field {nulls[0]!r} is null"
        else:  # (a bad row without nulls: its event time, which read_log_file reports)
            yield index, row, None


def read_log_table(path: str | Path, schema: dict, dead_letters: DeadLetterSink, stage: str = "read",
                   time_range_ms: TimeRange = EVENT_TIME_RANGE_MS) -> pa.Table:
    """One log file as an Arrow table in ``schema``; bad records (or the unreadable rest of the
    file) go to ``dead_letters`` exactly as ``read_log_file`` reports them. Parquet stays columnar."""
    path = Path(path)
    problem = checksum_problem(path)
    if problem is not None:
        dead_letters.add(DeadLetter(stage, "checksum_mismatch", problem, str(path)))
        return arrow_schema(schema).empty_table()
    if path.suffix == ".parquet":
        try:
            table, bad = _parquet_table(path, schema, time_range_ms)
        except (OSError, ValueError, pa.ArrowException) as exc:
            dead_letters.add(DeadLetter(stage, "corrupt_file", f"{path}: unreadable from the file header on "
                                        f"({type(exc).__name__}: {exc})", str(path)))
            return arrow_schema(schema).empty_table()
        if bad.any():
            list(read_log_file(path, schema, dead_letters, stage, verified=True,  # the per-record report of the bad rows
                               time_range_ms=time_range_ms))
            table = table.filter(pa.array(~bad))
        return table
    return pa.Table.from_pylist(list(read_log_file(path, schema, dead_letters, stage, verified=True,
                                                   time_range_ms=time_range_ms)), schema=arrow_schema(schema))


def read_log_file(path: str | Path, schema: dict, dead_letters: DeadLetterSink | None = None,
                  stage: str = "read", verified: bool = False,
                  time_range_ms: TimeRange = EVENT_TIME_RANGE_MS) -> Iterator[dict]:
    """Records of one log file, fitted to ``schema``, with event times in ``time_range_ms``.

    With ``dead_letters=None`` (strict) any problem raises LogReadError naming the file and
    record. Otherwise bad records become dead letters and reading goes on; a file that breaks
    off (truncated, corrupt) yields what came before the break and one dead letter for the rest.
    """
    path = Path(path)
    fmt = path.suffix.lstrip(".")
    iterate = _iter_avro if fmt == "avro" else _iter_parquet
    index = -1
    problem = None if verified else checksum_problem(path)  # (``verified``: the caller checked it)
    if problem is not None:
        if dead_letters is None:
            raise LogReadError(problem)
        dead_letters.add(DeadLetter(stage, "checksum_mismatch", problem, str(path)))
        return
    try:
        for index, record, error in iterate(path, schema):
            if error is None:
                if "event_time_ms" not in record or time_range_ms[0] <= record["event_time_ms"] < time_range_ms[1]:
                    yield record
                    continue
                error = f"event_time_ms {record['event_time_ms']} is outside {_time_range_text(time_range_ms)}"
            message = f"{path}: record {index}: {error}"
            if dead_letters is None:
                raise LogReadError(message)
            reason = ("event_time_out_of_range" if error.startswith("event_time_ms") else
                      "missing_field" if "missing" in error or "is null" in error else "wrong_type")
            dead_letters.add(DeadLetter(stage, reason, message, str(path), record_json(record)))
    except LogReadError:
        raise
    except (OSError, EOFError, ValueError, TypeError, KeyError, IndexError, pa.ArrowException,
            fastavro.read.SchemaResolutionError) as exc:
        where = "the file header" if index < 0 else f"record {index + 1}"
        message = f"{path}: unreadable from {where} on ({type(exc).__name__}: {exc})"
        if dead_letters is None:
            raise LogReadError(message) from exc
        dead_letters.add(DeadLetter(stage, "corrupt_file", message, str(path)))


def read_event_file(path: str | Path, kind: str, schemas: dict[str, dict], dead_letters: DeadLetterSink,
                    time_range_ms: TimeRange = EVENT_TIME_RANGE_MS) -> tuple[pa.Table, pa.Table]:
    """One log file of ``kind`` as an (impressions, actions) micro-batch: its rows in their
    table, the other table empty. ``schemas``: the Avro schema per kind."""
    tables = {k: arrow_schema(schema).empty_table() for k, schema in schemas.items()}
    tables[kind] = read_log_table(path, schemas[kind], dead_letters, time_range_ms=time_range_ms)
    return tables["impressions"], tables["actions"]


def read_log_tables(log_dir: str | Path, kind: str, schema: dict, dead_letters: DeadLetterSink,
                    time_range_ms: TimeRange = EVENT_TIME_RANGE_MS) -> pa.Table:
    """Every file of one kind as one Arrow table (file after file), bad records to ``dead_letters``."""
    parts = [read_log_table(path, schema, dead_letters, time_range_ms=time_range_ms)
             for path in log_files(log_dir, kind)]
    return pa.concat_tables(parts) if parts else arrow_schema(schema).empty_table()


def read_log(log_dir: str | Path, kind: str, schema: dict,
             dead_letters: DeadLetterSink | None = None) -> Iterator[dict]:
    """Every record of one kind, file after file (each file in event-time order)."""
    for path in log_files(log_dir, kind):
        yield from read_log_file(path, schema, dead_letters)

"""Writing event logs (layout in ``schemas.logs``): one sorted file per span of event time,
each written atomically and deterministically, and the manifest with every file's sha256."""
from __future__ import annotations

import hashlib
import json
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import fastavro
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from schemas.events import arrow_schema, base_type
from schemas.files import atomic_write, file_sha256
from schemas.logs import FORMATS, HOUR_MS, KINDS, MANIFEST, log_files


def span_file_name(start_ms: int, span_ms: int, fmt: str) -> str:
    """``YYYYMMDD-HH.<fmt>`` for the span starting at ``start_ms`` (UTC); ``YYYYMMDD-HHMMSS`` below an hour."""
    start = datetime.fromtimestamp(start_ms / 1000, tz=timezone.utc)
    stamp = f"{start:%Y%m%d-%H}" if span_ms % HOUR_MS == 0 else f"{start:%Y%m%d-%H%M%S}"
    return f"{stamp}.{fmt}"


def _avro_rows(table: pa.Table, schema: dict) -> list[dict]:
    """Rows of an Arrow table as Avro-ready dicts (Arrow maps come back as pairs: make dicts)."""
    rows = table.to_pylist()
    map_fields = [f["name"] for f in schema["fields"]
                  if isinstance(base_type(f["type"])[0], dict) and base_type(f["type"])[0].get("type") == "map"]
    for row in rows:
        for name in map_fields:
            if row.get(name) is not None:
                row[name] = dict(row[name])
    return rows


def write_table(table: pa.Table, path: str | Path, schema: dict, fmt: str) -> None:
    """Write one Arrow table as an Avro or Parquet file, atomically and deterministically.

    The Avro sync marker is derived from the file name, so equal input gives equal bytes.
    """
    path = Path(path)
    if fmt == "avro":
        marker = hashlib.md5(path.name.encode()).digest()
        with atomic_write(path) as out:
            fastavro.writer(out, schema, _avro_rows(table, schema), codec="deflate", sync_marker=marker)
    elif fmt == "parquet":
        table = table.select(arrow_schema(schema).names).cast(arrow_schema(schema))
        with atomic_write(path) as out:
            pq.write_table(table, out, compression="zstd")
    else:
        raise ValueError(f"unknown log format {fmt!r}: expected one of {FORMATS}")


class SpanWriter:
    """Writes a stream of Arrow tables as one sorted file per span of event time.

    Tables may arrive in any order; ``flush(before_ms)`` writes every span that ends at or before
    ``before_ms`` (the caller knows no later record falls there), ``close()`` writes the rest.
    Each span file is written once, atomically. With ``background=True`` files are encoded and
    written on a helper thread (Arrow and Parquet release the GIL), overlapping the caller's work;
    ``close()`` waits for them and re-raises the first error.
    """

    def __init__(self, log_dir: str | Path, kind: str, schema: dict, fmt: str = "avro", span_ms: int = HOUR_MS,
                 background: bool = False):
        if kind not in KINDS:
            raise ValueError(f"unknown log kind {kind!r}: expected one of {KINDS}")
        if fmt not in FORMATS:
            raise ValueError(f"unknown log format {fmt!r}: expected one of {FORMATS}")
        if span_ms <= 0 or span_ms % 1000:
            raise ValueError(f"span_ms must be a positive whole number of seconds, got {span_ms}")
        self.log_dir, self.kind, self.schema, self.fmt, self.span_ms = Path(log_dir), kind, schema, fmt, span_ms
        self.pending: dict[int, list[pa.Table]] = {}
        self.written: list[Path] = []
        self._executor = ThreadPoolExecutor(max_workers=1) if background else None
        self._futures: list[Future] = []

    def add(self, table: pa.Table) -> None:
        spans = table.column("event_time_ms").to_numpy() // self.span_ms
        order = np.argsort(spans, kind="stable")
        sorted_spans = spans[order]
        table = table.take(pa.array(order))
        bounds = np.flatnonzero(np.diff(sorted_spans)) + 1
        for start, end in zip(np.concatenate([[0], bounds]), np.concatenate([bounds, [len(spans)]])):
            if end > start:
                self.pending.setdefault(int(sorted_spans[start]), []).append(table.slice(start, end - start))

    def _write(self, span: int) -> None:
        pieces = self.pending.pop(span)
        path = self.log_dir / self.kind / span_file_name(span * self.span_ms, self.span_ms, self.fmt)
        self.written.append(path)
        if self._executor is None:
            self._write_file(pieces, path)
        else:
            self._futures.append(self._executor.submit(self._write_file, pieces, path))

    def _write_file(self, pieces: list[pa.Table], path: Path) -> None:
        table = pa.concat_tables(pieces)
        order = np.argsort(table.column("event_time_ms").to_numpy(), kind="stable")
        write_table(table.take(pa.array(order)), path, self.schema, self.fmt)

    def flush(self, before_ms: int) -> None:
        for span in sorted(s for s in self.pending if (s + 1) * self.span_ms <= before_ms):
            self._write(span)

    def close(self) -> list[Path]:
        for span in sorted(self.pending):
            self._write(span)
        if self._executor is not None:
            try:
                for future in self._futures:
                    future.result()
            finally:
                self._executor.shutdown()
        return self.written


def write_log(table: pa.Table, log_dir: str | Path, kind: str, schema: dict, fmt: str = "avro",
              span_ms: int = HOUR_MS) -> list[Path]:
    """Split ``table`` into spans of ``span_ms`` of ``event_time_ms`` and write one sorted file per span."""
    writer = SpanWriter(log_dir, kind, schema, fmt, span_ms)
    writer.add(table)
    return writer.close()


def write_event_logs(log_dir: str | Path, impressions: pa.Table, actions: pa.Table, impression_schema: dict,
                     action_schema: dict, fmt: str, span_ms: int, **about) -> dict:
    """Write impression and action logs plus a manifest (counts, files, time range, ``about``)."""
    impression_files = write_log(impressions, log_dir, "impressions", impression_schema, fmt, span_ms)
    action_files = write_log(actions, log_dir, "actions", action_schema, fmt, span_ms)
    types, counts = np.unique(actions.column("action_type").to_numpy(zero_copy_only=False), return_counts=True)
    times = impressions.column("event_time_ms").to_numpy()
    manifest = {
        **about,
        "format": fmt,
        "impressions": impressions.num_rows,
        "actions": {str(t): int(c) for t, c in zip(types, counts)},
        "files": {"impressions": len(impression_files), "actions": len(action_files)},
        "event_time_ms": [int(times.min()), int(times.max())] if len(times) else [],
    }
    write_manifest(log_dir, manifest)
    return manifest


def write_manifest(log_dir: str | Path, manifest: dict) -> None:
    """The manifest, with the sha256 of every log file now in the directory (``sha256``:
    ``kind/name`` -> hex): Avro's deflate blocks carry no checksum, so a flipped bit could change
    records silently; the readers and ``logs check`` verify each listed file against it."""
    log_dir = Path(log_dir)
    manifest = {**manifest, "sha256": {f"{kind}/{path.name}": file_sha256(path)
                                       for kind in KINDS for path in log_files(log_dir, kind)}}
    with atomic_write(log_dir / MANIFEST, "w") as out:
        json.dump(manifest, out, indent=2, sort_keys=True)
        out.write("\n")

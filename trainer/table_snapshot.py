"""Snapshots of an embedding table: Arrow IPC, written atomically (temporary file + rename).

One record batch per chunk of rows with columns ``fid`` (int64), ``embedding`` (fixed-size
list of float32, ``dim``), ``state`` (fixed-size list of float32, ``state_width``; absent when 0),
``last_seen_ms`` (int64) and ``count`` (int32). The schema metadata holds the table config, the
data time, and the frequency filter's counters (zlib-compressed), so a restored table answers
every lookup identically and admits new fids as the original would.
"""
from __future__ import annotations

import dataclasses
import json
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from schemas.files import atomic_write
from schemas.spec_types import InitializerKind
from trainer.embedding_table import EmbeddingTable
from trainer.rows import RowBatch, RowStore
from trainer.table_config import SlotPolicy, TableConfig

FORMAT = "streamrec.table.v1"
CHUNK_ROWS = 1 << 20


def _config_json(config: TableConfig) -> str:
    data = dataclasses.asdict(config)
    data["slots"] = {str(k): {**dataclasses.asdict(v), "initializer": v.initializer.value}
                     for k, v in config.slots.items()}
    data["default_policy"]["initializer"] = config.default_policy.initializer.value
    return json.dumps(data, sort_keys=True)


def _policy(data: dict) -> SlotPolicy:
    return SlotPolicy(**{**data, "initializer": InitializerKind(data["initializer"])})


def config_from_json(text: str, **overrides) -> TableConfig:
    data = json.loads(text)
    data["slots"] = {int(k): _policy(v) for k, v in data["slots"].items()}
    data["default_policy"] = _policy(data["default_policy"])
    data.update(overrides)
    return TableConfig(**data)


def _schema(dim: int, state_width: int, metadata: dict[bytes, bytes]) -> pa.Schema:
    fields = [pa.field("fid", pa.int64()), pa.field("embedding", pa.list_(pa.float32(), dim))]
    if state_width:
        fields.append(pa.field("state", pa.list_(pa.float32(), state_width)))
    fields += [pa.field("last_seen_ms", pa.int64()), pa.field("count", pa.int32())]
    return pa.schema(fields, metadata=metadata)


def _record_batch(rows: RowBatch, schema: pa.Schema) -> pa.RecordBatch:
    def fixed(values: torch.Tensor, width: int) -> pa.Array:
        return pa.FixedSizeListArray.from_arrays(pa.array(values.cpu().numpy().reshape(-1)), width)

    columns = [pa.array(rows.fids.cpu().numpy()), fixed(rows.embeddings, rows.embeddings.shape[1])]
    if rows.state.shape[1]:
        columns.append(fixed(rows.state, rows.state.shape[1]))
    columns += [pa.array(rows.last_seen_ms.cpu().numpy()), pa.array(rows.counts.cpu().numpy())]
    return pa.RecordBatch.from_arrays(columns, schema=schema)


def save_table(table: EmbeddingTable, path: str | Path) -> Path:
    """Write every live row of ``table`` (not its backing store) to ``path``; returns the path."""
    rows = table.all_rows()
    metadata = {
        b"format": FORMAT.encode(),
        b"config": _config_json(table.config).encode(),
        b"data_time_ms": str(table.data_time_ms).encode(),
        b"rows": str(len(rows)).encode(),
        b"load_factor": f"{table.load_factor:.6f}".encode(),
        b"bytes_per_entry": f"{table.bytes_per_entry():.3f}".encode(),
    }
    if table.sketch is not None:
        state = table.sketch.state_dict()
        metadata[b"filter_counters"] = zlib.compress(state["counters"].numpy().tobytes(), 1)
        metadata[b"filter_meta"] = json.dumps({"increments": state["increments"], "seeds": state["seeds"],
                                               "shape": list(state["counters"].shape)}).encode()
    schema = _schema(table.dim, table.state_width, metadata)
    path = Path(path)
    with atomic_write(path) as out:
        with pa.ipc.new_file(out, schema) as writer:
            for start in range(0, max(len(rows), 1), CHUNK_ROWS):
                part = RowBatch(*(getattr(rows, f.name)[start:start + CHUNK_ROWS]
                                  for f in dataclasses.fields(RowBatch)))
                writer.write_batch(_record_batch(part, schema))
    return path


class SnapshotError(ValueError):
    """A snapshot file is missing, not a streamrec table snapshot, or damaged."""


def read_snapshot(path: str | Path) -> tuple[pa.Table, dict[bytes, bytes]]:
    try:
        with pa.memory_map(str(path)) as source:
            data = pa.ipc.open_file(source).read_all()
    except FileNotFoundError:
        raise SnapshotError(f"snapshot {str(path)!r} does not exist") from None
    except pa.ArrowInvalid as exc:
        raise SnapshotError(f"snapshot {str(path)!r} is not a readable Arrow file: {exc}") from None
    metadata = data.schema.metadata or {}
    if metadata.get(b"format") != FORMAT.encode():
        raise SnapshotError(f"{str(path)!r} is not a {FORMAT} snapshot (format {metadata.get(b'format')!r})")
    return data, metadata


def _column_tensor(table: pa.Table, name: str, width: int | None = None) -> torch.Tensor:
    column = table.column(name).combine_chunks()
    if width is None:
        return torch.from_numpy(column.to_numpy(zero_copy_only=False).copy())
    flat = column.flatten().to_numpy(zero_copy_only=False).copy() if len(column) else np.zeros(0, np.float32)
    return torch.from_numpy(flat).view(-1, width)


def read_rows(path: str | Path, with_state: bool = True, **overrides) -> tuple[RowBatch, TableConfig, dict]:
    """The rows of a snapshot (optimizer state dropped unless ``with_state``), its table config
    (with ``overrides``) and its metadata."""
    data, metadata = read_snapshot(path)
    config = config_from_json(metadata[b"config"].decode(), **overrides)
    rows = RowBatch(
        fids=_column_tensor(data, "fid"),
        embeddings=_column_tensor(data, "embedding", config.dim),
        state=(_column_tensor(data, "state", config.state_width) if config.state_width and with_state
               else torch.zeros(data.num_rows, 0)),
        last_seen_ms=_column_tensor(data, "last_seen_ms"),
        counts=_column_tensor(data, "count"),
    )
    if len(rows) != int(metadata[b"rows"]):
        raise SnapshotError(f"snapshot {str(path)!r} holds {len(rows)} rows, its header says {metadata[b'rows']}")
    return rows, config, metadata


def load_table(path: str | Path, store: RowStore | None = None, **overrides) -> EmbeddingTable:
    """Restore a table saved by ``save_table``; ``overrides`` change config fields (e.g. device)."""
    rows, config, metadata = read_rows(path, **overrides)
    table = EmbeddingTable(config, store)
    if config.max_rows is not None and len(rows) > config.max_rows:
        store.put_rows(rows)  # what does not fit the cache goes to the store
    else:
        table.put_rows(rows)
    table.touched.zero_()
    table.data_time_ms = int(metadata[b"data_time_ms"])
    if table.sketch is not None and b"filter_counters" in metadata:
        meta = json.loads(metadata[b"filter_meta"])
        counters = np.frombuffer(zlib.decompress(metadata[b"filter_counters"]), dtype=np.int32)
        table.sketch.load_state_dict({"counters": torch.from_numpy(counters.copy()).view(*meta["shape"]),
                                      "increments": meta["increments"], "seeds": meta["seeds"]})
    return table


def snapshot_stats(path: str | Path) -> dict:
    """Figures of a snapshot without building the table (what ``streamrec table-stats`` prints)."""
    data, metadata = read_snapshot(path)
    config = config_from_json(metadata[b"config"].decode())
    fids = data.column("fid").to_numpy()
    slots, counts = np.unique(fids >> 48, return_counts=True)
    payload = 4 * (config.dim + config.state_width)
    bytes_per_entry = float(metadata.get(b"bytes_per_entry", b"0"))
    return {
        "rows": int(metadata[b"rows"]),
        "dim": config.dim,
        "state_width": config.state_width,
        "data_time_ms": int(metadata[b"data_time_ms"]),
        "load_factor": float(metadata.get(b"load_factor", b"0")),
        "bytes_per_entry": bytes_per_entry,
        "payload_bytes_per_entry": payload,
        "bytes_per_entry_ratio": round(bytes_per_entry / payload, 3),
        "file_bytes": Path(path).stat().st_size,
        "rows_by_slot": {int(s): int(c) for s, c in zip(slots, counts)},
        "frequency_filter": b"filter_counters" in metadata,
    }

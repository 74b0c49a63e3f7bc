"""Arrow tables passed between a job's operators: spilled to IPC files (memory-mapped on read),
sent as IPC stream bytes, or staged as Example Parquet files whose paths a sink commits.
Engine-free: both runners and the Flink operators use it."""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa


def spill_table(table: pa.Table, path: Path) -> str:
    """``table`` as an Arrow IPC file at ``path``; returns the path."""
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return str(path)


def spill_shards(impressions: pa.Table, actions: pa.Table, shards: int, directory: Path,
                 prefix: str) -> list[tuple[int, str, str]]:
    """A micro-batch split by join-key shard (``transforms.batch_join.split_batch_by_shard``), each
    shard's tables spilled as ``PREFIX-SHARD-impressions.arrow`` and ``-actions.arrow`` under
    ``directory``: (shard, impressions path, actions path) per shard it touches, in shard order."""
    from transforms.batch_join import split_batch_by_shard

    return [(shard, spill_table(impressions_part, directory / f"{prefix}-{shard}-impressions.arrow"),
             spill_table(actions_part, directory / f"{prefix}-{shard}-actions.arrow"))
            for shard, impressions_part, actions_part in split_batch_by_shard(impressions, actions, shards)]


def load_spilled(path: str) -> pa.Table:
    """One spilled table (memory-mapped: its buffers are the file's pages)."""
    return pa.ipc.open_file(pa.memory_map(path)).read_all()


def load_table(ref) -> pa.Table:
    """A table passed by reference between operators: a file's path (a Parquet file, or an Arrow
    IPC file, memory-mapped) or the table's Arrow IPC stream bytes (``ipc_bytes``)."""
    if isinstance(ref, bytes):
        return pa.ipc.open_stream(pa.py_buffer(ref)).read_all()
    if ref.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(ref)
    return load_spilled(ref)


def ipc_bytes(table: pa.Table) -> bytes:
    """A table as Arrow IPC stream bytes (LZ4: half the bytes between JVM and Python)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema, options=pa.ipc.IpcWriteOptions(compression="lz4")) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def stage_examples(table: pa.Table, directory: str) -> str:
    """An Example table written as a Parquet file (unique name) under ``directory``; its path is
    what the join emits: the runner publishes the files whose paths a checkpoint committed."""
    import uuid

    import pyarrow.parquet as pq

    from schemas.files import atomic_write

    path = Path(directory) / f"part-{uuid.uuid4().hex}.parquet"
    with atomic_write(path) as out:
        pq.write_table(table, out)
    return str(path)

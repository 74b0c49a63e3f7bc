"""The records a streamrec Flink job passes between operators: source lines, shard records,
dead letters on a side output, and the watermark that ends a bounded input."""
from __future__ import annotations

import pyarrow as pa
from pyflink.common import Types
from pyflink.datastream import OutputTag

from pipelines.tables import ipc_bytes

DEAD_LETTERS = OutputTag("dead_letters", Types.STRING())
FINAL_WATERMARK = (1 << 63) - 1  # Long.MAX_VALUE: the end of a bounded input


def dead_letter_records(letters) -> list:
    """Dead letters as records for the ``DEAD_LETTERS`` side output (JSON lines)."""
    return [(DEAD_LETTERS, letter.to_json()) for letter in letters]


def batch_time(line: str) -> int:
    """The time (ms) a source line carries: a replay batch's first event time, or the wall clock
    of a live announcement line."""
    return int(line.split("\t", 1)[0])


def shard_records(impressions: pa.Table, actions: pa.Table, shards: int) -> list[tuple[int, bytes, bytes]]:
    """A micro-batch -> one (shard, impressions IPC, actions IPC) record per join-key shard it touches
    (the same shard function as the Beam job)."""
    from transforms.batch_join import split_batch_by_shard

    return [(shard, ipc_bytes(impressions_part), ipc_bytes(actions_part))
            for shard, impressions_part, actions_part in split_batch_by_shard(impressions, actions, shards)]


def shard_record(line: str) -> tuple[int, str, str]:
    """Replay batch-list line ``first_ms<TAB>shard<TAB>impressions path<TAB>actions path`` -> the
    shard record (shard, impressions path, actions path): the replay has split the batch by shard
    already, so only paths cross between the JVM and the Python workers."""
    _, shard, impressions_path, actions_path = line.split("\t")
    return int(shard), impressions_path, actions_path

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


def _flink_murmur(code: int) -> int:
    """Flink's ``MathUtils.murmurHash`` of a 32-bit hash code (int32 arithmetic), >= 0."""
    mask = 0xFFFFFFFF

    def rotate_left(x: int, bits: int) -> int:
        return ((x << bits) | (x >> (32 - bits))) & mask

    code = rotate_left((code & mask) * 0xCC9E2D51 & mask, 15)
    code = rotate_left(code * 0x1B873593 & mask, 13)
    code = ((code * 5 + 0xE6546B64) & mask) ^ 4
    code ^= code >> 16  # bitMix
    code = code * 0x85EBCA6B & mask
    code ^= code >> 13
    code = code * 0xC2B2AE35 & mask
    code ^= code >> 16
    signed = code - (1 << 32) if code >= 1 << 31 else code
    return signed if signed >= 0 else (-signed if signed != -(1 << 31) else 0)


def subtask_of_key(key: int, parallelism: int, max_parallelism: int) -> int:
    """The subtask a PyFlink ``key_by(..., key_type=Types.INT())`` key goes to. PyFlink keys by
    the Row ``(key,)``, whose hash code is ``31 * 0 + (31 * 1 + (31 + key)) = 62 + key``
    (``RowUtils.deepHashCodeRow``, an insert row); then Flink's ``KeyGroupRangeAssignment``: key
    group ``murmur(hash) mod max_parallelism``, subtask ``key_group * parallelism // max_parallelism``."""
    return _flink_murmur(62 + key) % max_parallelism * parallelism // max_parallelism


def subtask_keys(parallelism: int, max_parallelism: int) -> list[int]:
    """One int key per subtask (the smallest that goes there): keying record copies by
    ``subtask_keys(p, m)[i]`` sends copy i to subtask i."""
    keys: dict[int, int] = {}
    key = 0
    while len(keys) < parallelism:
        keys.setdefault(subtask_of_key(key, parallelism, max_parallelism), key)
        key += 1
    return [keys[index] for index in range(parallelism)]

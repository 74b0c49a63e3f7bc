"""An external collisionless row store on Redis, behind the embedding table's bounded cache.

One key per fid: ``<prefix>:<fid as 8 big-endian bytes>``; the value is the row packed as
``float32[dim] embedding | float32[state_width] optimiser state | int64 last-seen ms | int32 count``
(little-endian, ``4 * (dim + state_width) + 12`` bytes). Batches move in one round trip per shard:
``MGET`` to read; to write, a pipeline of one ``MSET``, one ``ZADD`` per expiring slot (the expiry
index) and a server-side script for the rows with a TTL (``SET ... PX``); a pipeline to delete; on Redis Cluster, a cluster pipeline (keys spread over hash slots cannot share one command).

Sharding (several independent servers): by consistent hashing of the fid (``HashRing``).

Expiry is on **data time**, as in the table: a slot's ``expire_after_ms`` removes a row once the
newest event time the trainer has seen is more than that past the row's last-seen time. Rows of
expiring slots are listed in a per-slot sorted set (``<prefix>:expiry:<slot>``, score =
last-seen ms), so ``expire_fids(now)`` finds and deletes exactly the rows the in-memory store would
(``ZRANGEBYSCORE -inf now-limit-1``). Redis TTLs are wall-clock, so they serve only as garbage
collection for a store whose trainer is gone, and are off by default. With ``ttl=on`` a row
written at data time ``now`` gets ``PX = (last_seen + expire_after - now) + ttl_grace_ms`` (the
rest of its data-time life plus a grace, by default one more ``expire_after``). While data time
runs at least as fast as the wall clock (replay, live) the TTL never fires before the data-time
expiry; a trainer stopped for longer than the grace can lose rows that were due to expire anyway.
The TTL costs a server-side ``SET ... PX`` per row instead of one ``MSET`` (see BENCHMARKS.md).

Write-behind (default; ``write_behind=off`` to disable): a batch is packed at once and sent by
one background thread while the trainer goes on computing; one write is in flight at a time, and
every read, delete or expiry scan waits for it first, so reads always see earlier writes.
``flush()`` waits for it (the table's ``write_back`` does, so a published delta or snapshot is
in Redis when it is committed).

Failures: every call is retried with exponential back-off (50 ms doubling, at most 1 s apart) for
``retry_for_s``; then ``StoreUnavailable`` names the server and how many rows were not read or
written. Writes are idempotent (``SET``), so a retried write never duplicates; a write that fails
for good raises before the cache frees the rows, so nothing written back is silently lost.

A server that comes back *without its data* (restarted without persistence, flushed, failed over
to an empty replica) would silently lose the rows written before. A writing store therefore keeps
a marker key per server (``<prefix>:<name>#marker``, a random token set once with ``SET NX``; on
a Redis Cluster one per primary, placed by hash tag) and checks it in the same round trip as every
read and write: a missing marker raises ``StoreLost`` naming the server, and no further write
goes out. A snapshot records the tokens, so ``--resume`` refuses a store that is not the one the
snapshot's rows were written to. The trainer's position goes with every write too
(``<prefix>:<name>#trained``, a one-member sorted set raised with ``ZADD GT``): the most examples
the stored rows can have learned from, which a resume needs to keep its metrics honest.

Several trainer workers (``trainer.sharded``) share one store: each fid's row is written by the
worker that owns it, so their keys never collide, and each worker's expiry deletes its own fids
(``share``). The marker, the trained position and serving's read-through are common to all.

The URI and the servers' hash ring: ``trainer.redis_config``.
"""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from schemas.fids import HASH_BITS
from trainer.hashing import owner_of
from trainer.redis_config import HashRing, RedisStoreConfig
from trainer.rows import RowBatch
from trainer.table_config import NEVER, TableConfig

_SET_WITH_TTL = """
for i = 1, #KEYS do
  redis.call('SET', KEYS[i], ARGV[2 * i - 1], 'PX', ARGV[2 * i])
end
return #KEYS
"""


class StoreUnavailable(RuntimeError):
    """The store did not answer within the retry bound."""


class StoreLost(RuntimeError):
    """The store no longer holds rows written to it: its marker key is gone or changed."""


class RedisStore:
    """``RowStore`` on one or more Redis servers (or a Redis Cluster) for one table's rows."""

    persistent = True  # rows outlive the trainer: marker tokens and the trained mark say whose they are

    def __init__(self, config: RedisStoreConfig, table: TableConfig, name: str = "table", writer: bool = True):
        """``writer``: this store writes rows (a trainer) - it sets and checks the marker keys;
        a reader (serving) only reads."""
        import redis

        self.config, self.dim, self.state_width = config, table.dim, table.state_width
        self.dtype = np.dtype([("embedding", "<f4", (table.dim,)), ("state", "<f4", (table.state_width,)),
                               ("last_seen_ms", "<i8"), ("count", "<i4")])
        self.key_prefix = f"{config.prefix}:{name}:".encode()
        self.index_prefix = f"{config.prefix}:{name}#expiry:".encode()
        self.marker_base = f"{config.prefix}:{name}#marker".encode()
        self.trained_key = f"{config.prefix}:{name}#trained".encode()
        self.writer = writer
        self.lost: StoreLost | None = None  # once lost, every later call raises it
        self.trained_examples = 0  # the trainer's position: goes with every write (see the module docstring)
        self.expire_by_slot = {slot: policy.expire_after_ms for slot, policy in table.slots.items()
                               if policy.expire_after_ms is not None}
        self.default_expire = table.default_policy.expire_after_ms
        self._errors = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError,
                        redis.exceptions.NoScriptError)
        if config.cluster:
            from redis.cluster import ClusterNode, RedisCluster

            self.clients = [RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in config.servers],
                                         password=config.password, socket_timeout=config.timeout_s,
                                         socket_connect_timeout=config.timeout_s)]
            self.names = ["cluster " + ",".join(f"{h}:{p}" for h, p in config.servers)]
        else:
            self.clients = [redis.Redis(host=h, port=p, db=config.db, password=config.password,
                                        socket_timeout=config.timeout_s, socket_connect_timeout=config.timeout_s)
                            for h, p in config.servers]
            self.names = [f"{h}:{p}" for h, p in config.servers]
        self._noscript = redis.exceptions.NoScriptError
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="redis-write-behind") if config.write_behind else None
        self._pending: Future | None = None
        self.stats = {"gets": 0, "puts": 0, "deletes": 0, "retries": 0}
        self.owner: tuple[int, int] | None = None  # (worker, workers) when shared (``share``)
        self.ring = HashRing(self.names)
        self._load_scripts()
        self.markers = self._marker_keys() if writer else [[] for _ in self.clients]
        self.tokens = self._set_markers() if writer else []

    # -- plumbing -----------------------------------------------------------------------------

    def _load_scripts(self) -> None:
        if self.config.cluster:
            self.set_with_ttl = []
            return
        self.set_with_ttl = [self._retrying(shard, "loading the write script",
                                            lambda: client.script_load(_SET_WITH_TTL))
                             for shard, client in enumerate(self.clients)]

    def _marker_keys(self) -> list[list[bytes]]:
        """Marker keys per client: one per server; on a cluster one per primary (hash-tagged)."""
        if not self.config.cluster:
            return [[self.marker_base] for _ in self.clients]
        client = self.clients[0]
        primaries = {node.name for node in self._retrying(0, "listing cluster nodes", client.get_primaries)}
        keys: dict[str, bytes] = {}
        for tag in range(100_000):
            if len(keys) == len(primaries):
                break
            key = self.marker_base + b":{" + str(tag).encode() + b"}"
            keys.setdefault(client.get_node_from_key(key).name, key)
        return [sorted(keys.values())]

    def _set_markers(self) -> list[str]:
        """Each marker's token (set to a new random one where absent): the store's identity."""
        import uuid

        tokens = []
        for shard, (client, keys) in enumerate(zip(self.clients, self.markers)):
            for key in keys:
                def call(key=key, client=client):
                    client.set(key, uuid.uuid4().hex, nx=True)
                    return client.get(key)
                tokens.append(self._retrying(shard, "reading its marker key", call).decode())
        return tokens

    def _check_markers(self, shard: int, found: int) -> None:
        """``found`` of this shard's marker keys exist (read in the same round trip as the rows)."""
        if found != len(self.markers[shard]):
            self.lost = StoreLost(
                f"redis {self.names[shard]} lost the rows written to it: its marker key "
                f"{self.markers[shard][0].decode(errors='replace')} is gone (the server restarted without its data, "
                f"was flushed or failed over to an empty replica); rows evicted or published there since the "
                f"last snapshot are lost - restore the server's data, or start the run afresh on an empty store")
            raise self.lost

    def check_identity(self, tokens: list[str], where: str) -> None:
        """Refuse a store that is not the one ``tokens`` (from a snapshot) were read from."""
        if tokens and tokens != self.tokens:
            raise StoreLost(f"{where} relies on rows in redis {', '.join(self.names)}, which no longer holds them "
                            f"(its marker changed from {tokens} to {self.tokens}: restarted without its data or "
                            f"flushed since); resuming would train on missing rows")

    def trained_mark(self) -> int:
        """The most examples the stored rows can have learned from (0 if never written)."""
        marks = [self._retrying(shard, "reading the trained position", lambda c=client: c.zscore(self.trained_key, "n"))
                 for shard, client in enumerate(self.clients)]
        return int(max((m for m in marks if m is not None), default=0))

    def reset_trained_mark(self) -> None:
        for shard, client in enumerate(self.clients):
            self._retrying(shard, "resetting the trained position", lambda c=client: c.delete(self.trained_key))

    def _retrying(self, shard: int, what: str, call):
        wait, deadline = 0.05, time.monotonic() + self.config.retry_for_s
        while True:
            try:
                return call()
            except self._errors as exc:
                if time.monotonic() + wait > deadline:
                    raise StoreUnavailable(f"redis {self.names[shard]} did not answer for {self.config.retry_for_s:g} s "
                                           f"while {what}: {exc}") from exc
                self.stats["retries"] += 1
                time.sleep(wait)
                wait = min(wait * 2, 1.0)

    def _keys(self, fids: np.ndarray) -> list[bytes]:
        raw = fids.astype(">i8").tobytes()
        prefix = self.key_prefix
        return [prefix + raw[i:i + 8] for i in range(0, len(raw), 8)]

    def _fids(self, keys: list[bytes]) -> np.ndarray:
        width = len(self.key_prefix)
        return np.frombuffer(b"".join(key[width:] for key in keys), dtype=">i8").astype(np.int64)

    def _by_shard(self, fids: torch.Tensor) -> list[tuple[int, np.ndarray]]:
        """(shard, positions into fids) for every shard holding some of ``fids``."""
        if len(self.clients) == 1:
            return [(0, np.arange(len(fids)))] if len(fids) else []
        owners = self.ring.shard_of(fids)
        return [(shard, np.flatnonzero(owners == shard)) for shard in range(len(self.clients))
                if (owners == shard).any()]

    def _limits(self, fids: np.ndarray) -> np.ndarray:
        """expire_after_ms per fid (NEVER where its slot does not expire)."""
        slots = fids >> HASH_BITS
        limits = np.full(len(fids), NEVER if self.default_expire is None else self.default_expire, dtype=np.int64)
        for slot, limit in self.expire_by_slot.items():
            limits[slots == slot] = limit
        return limits

    def _index_key(self, slot: int | str) -> bytes:
        """The sorted set of an expiring slot's rows (outside the row keys' prefix)."""
        return self.index_prefix + str(slot).encode()

    def _expiring_slots(self) -> dict[int, int]:
        """slot -> expire_after_ms for every slot that has (or may have) an expiry index."""
        slots = dict(self.expire_by_slot)
        if self.default_expire is not None:  # every slot expires: find the indexes written
            marker = len(self.index_prefix)
            for shard, client in enumerate(self.clients):
                keys = self._retrying(shard, "listing expiry indexes",
                                      lambda: list(client.scan_iter(match=self._index_key("*"), count=1_000)))
                for key in keys:
                    slots.setdefault(int(key[marker:]), self.default_expire)
        return slots

    # -- RowStore -----------------------------------------------------------------------------

    def get_rows(self, fids: torch.Tensor) -> tuple[torch.Tensor, RowBatch]:
        self.flush()  # reads see every write before them
        fids_np = fids.cpu().numpy().astype(np.int64)
        values: list[bytes | None] = [None] * len(fids_np)
        for shard, positions in self._by_shard(fids):
            keys = self._keys(fids_np[positions])
            client = self.clients[shard]
            got = self._retrying(shard, f"reading {len(keys)} rows", lambda: self._read(shard, client, keys))
            for position, value in zip(positions.tolist(), got):
                values[position] = value
        found = np.fromiter((value is not None for value in values), dtype=bool, count=len(values))
        packed = np.frombuffer(b"".join(value for value in values if value is not None), dtype=self.dtype)
        self.stats["gets"] += len(fids_np)
        rows = RowBatch(torch.from_numpy(fids_np[found]), torch.from_numpy(packed["embedding"].copy()),
                        torch.from_numpy(packed["state"].copy()), torch.from_numpy(packed["last_seen_ms"].copy()),
                        torch.from_numpy(packed["count"].astype(np.int32)))
        return torch.from_numpy(found), rows

    def _read(self, shard: int, client, keys: list[bytes]) -> list:
        """MGET of ``keys``; a writing store checks its markers in the same round trip."""
        if self.config.cluster:
            values = client.mget_nonatomic(keys)
            if self.markers[shard]:
                self._check_markers(shard, sum(client.exists(key) for key in self.markers[shard]))
            return values
        if not self.markers[shard]:
            return client.mget(keys)
        pipe = client.pipeline(transaction=False)
        pipe.exists(*self.markers[shard])
        pipe.mget(keys)
        found, values = pipe.execute()
        self._check_markers(shard, found)
        return values

    def put_rows(self, rows: RowBatch, data_time_ms: int | None = None) -> None:
        """Write rows (insert or overwrite). ``data_time_ms`` (default: the newest last-seen time
        in the batch) is the clock the TTLs are set from."""
        if len(rows) == 0:
            return
        fids_np = rows.fids.cpu().numpy().astype(np.int64)
        packed = np.empty(len(fids_np), dtype=self.dtype)
        packed["embedding"] = rows.embeddings.detach().float().cpu().numpy().reshape(len(fids_np), self.dim)
        packed["state"] = rows.state.detach().float().cpu().numpy().reshape(len(fids_np), self.state_width)
        packed["last_seen_ms"] = rows.last_seen_ms.cpu().numpy()
        packed["count"] = rows.counts.cpu().numpy()
        raw, size = packed.tobytes(), self.dtype.itemsize
        limits = self._limits(fids_np)
        now = int(packed["last_seen_ms"].max()) if data_time_ms is None else data_time_ms
        expiring = limits != NEVER
        px = np.zeros(len(fids_np), dtype=np.int64)
        if self.config.ttl and expiring.any():
            grace = limits if self.config.ttl_grace_ms is None else self.config.ttl_grace_ms
            px = np.where(expiring, np.maximum(packed["last_seen_ms"] + limits - now + grace, 1), 0)
        slots = fids_np >> HASH_BITS
        values = [raw[i:i + size] for i in range(0, len(raw), size)]
        writes, trained = [], self.trained_examples
        for shard, positions in self._by_shard(rows.fids):
            keys = self._keys(fids_np[positions])
            writes.append((shard, len(keys), lambda shard=shard, keys=keys, positions=positions: self._write(
                shard, keys, [values[p] for p in positions.tolist()], slots[positions], expiring[positions],
                packed["last_seen_ms"][positions], px[positions], trained)))
        self.flush()  # one write in flight at a time: ordered, and bounded memory
        if self._writer is None:
            self._send(writes)
        else:
            self._pending = self._writer.submit(self._send, writes)
        self.stats["puts"] += len(fids_np)

    def _send(self, writes) -> None:
        for shard, rows, write in writes:
            self._retrying(shard, f"writing {rows} rows (not written; retried until this bound)", write)

    def flush(self) -> None:
        """Wait for the write in flight (write-behind); raises its ``StoreUnavailable``, if any,
        and ``StoreLost`` once the store was found to have lost rows."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()
        if self.lost is not None:
            raise self.lost

    def _write(self, shard: int, keys: list[bytes], values: list[bytes], slots: np.ndarray, expiring: np.ndarray,
               last_seen: np.ndarray, px: np.ndarray, trained: int) -> None:
        """One pipeline: the marker check and the trained position first, then the rows without a
        TTL in one ``MSET``, those with one through a small script (``SET key value PX ttl`` per
        row, server-side), one multi-member ``ZADD`` per expiring slot. Every command is
        idempotent: a retried pipeline writes the same."""
        pipe = self.clients[shard].pipeline(transaction=False)
        for key in self.markers[shard]:
            pipe.exists(key)
        if self.writer:
            pipe.zadd(self.trained_key, {"n": trained}, gt=True)
        timed = px > 0
        if self.config.cluster:  # keys in different hash slots: one SET each
            for key, value, ttl in zip(keys, values, px.tolist()):
                pipe.set(key, value, px=ttl or None)
        else:
            plain = np.flatnonzero(~timed).tolist()
            if plain:
                pipe.execute_command("MSET", *[item for m in plain for item in (keys[m], values[m])])
            with_ttl = np.flatnonzero(timed).tolist()
            if with_ttl:  # SET ... PX for many keys in one call: a server-side loop
                pipe.evalsha(self.set_with_ttl[shard], len(with_ttl), *[keys[m] for m in with_ttl],
                             *[item for m in with_ttl for item in (values[m], int(px[m]))])
        for slot in np.unique(slots[expiring]).tolist():
            members = np.flatnonzero(expiring & (slots == slot)).tolist()
            pipe.execute_command("ZADD", self._index_key(slot),
                                 *[item for m in members for item in (int(last_seen[m]), keys[m])])
        try:
            replies = pipe.execute(raise_on_error=False)
        except self._noscript:  # the server restarted and forgot the script: load it, write again
            self._load_scripts()
            raise
        markers = len(self.markers[shard])
        self._check_markers(shard, sum(int(reply) for reply in replies[:markers]))  # before any error: a loss
        for reply in replies[markers:]:
            if isinstance(reply, self._noscript):
                self._load_scripts()
            if isinstance(reply, Exception):
                raise reply

    def delete(self, fids: torch.Tensor) -> None:
        self.flush()
        fids_np = fids.cpu().numpy().astype(np.int64)
        slots = fids_np >> HASH_BITS
        limits = self._limits(fids_np)
        for shard, positions in self._by_shard(fids):
            keys = self._keys(fids_np[positions])

            def call(shard=shard, positions=positions, keys=keys):
                pipe = self.clients[shard].pipeline(transaction=False)
                for key in keys:  # one DEL per key: keys of a cluster may sit in different slots
                    pipe.delete(key)
                for slot in np.unique(slots[positions][limits[positions] != NEVER]).tolist():
                    members = [k for k, p in zip(keys, positions.tolist()) if slots[p] == slot]
                    pipe.zrem(self._index_key(slot), *members)
                pipe.execute()

            self._retrying(shard, f"deleting {len(keys)} rows", call)
        self.stats["deletes"] += len(fids_np)

    def share(self, worker: int, workers: int) -> None:
        """This store is one of ``workers`` trainer workers' (``trainer.sharded``), which keep their
        rows under the same keys: a fid's row is written by its owner only (``owner_of``), and
        ``expire_fids`` deletes only this worker's (all workers expire on the same data time)."""
        self.owner = (worker, workers)

    def expire_fids(self, data_time_ms: int) -> torch.Tensor:
        """Delete the rows whose data-time life ended by ``data_time_ms`` (of this worker's fids
        when shared); returns their fids."""
        self.flush()
        expired = []
        for slot, limit in sorted(self._expiring_slots().items()):
            index = self._index_key(slot)
            for shard, client in enumerate(self.clients):
                keys = self._retrying(shard, f"listing expired rows of slot {slot}",
                                      lambda: client.zrangebyscore(index, "-inf", data_time_ms - limit - 1))
                if keys:
                    found = self._fids(keys)
                    if self.owner is not None:
                        worker, workers = self.owner
                        found = found[owner_of(torch.from_numpy(found), workers).numpy() == worker]
                    self.delete(torch.from_numpy(found))
                    expired.append(found)
        fids = np.concatenate(expired) if expired else np.empty(0, dtype=np.int64)
        return torch.from_numpy(fids)

    def stored_fids(self) -> np.ndarray:
        """Every fid with a row under this table's prefix (a SCAN: for tests and tools, not the hot path)."""
        self.flush()
        keys = []
        for shard, client in enumerate(self.clients):
            keys += self._retrying(shard, "listing rows",
                                   lambda: list(client.scan_iter(match=self.key_prefix + b"*", count=10_000)))
        return self._fids([key for key in keys if len(key) == len(self.key_prefix) + 8])

    def __len__(self) -> int:
        return len(self.stored_fids())

    def clear(self) -> None:
        """Remove every key of this table (rows and expiry indexes)."""
        self.flush()
        for shard, client in enumerate(self.clients):
            keys = [key for prefix in (self.key_prefix, self.index_prefix)
                    for key in client.scan_iter(match=prefix + b"*", count=10_000)]
            for start in range(0, len(keys), 10_000):
                pipe = client.pipeline(transaction=False)
                for key in keys[start:start + 10_000]:
                    pipe.delete(key)
                pipe.execute()

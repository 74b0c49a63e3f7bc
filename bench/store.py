"""The Redis row store: batch throughput, cache hit rate on a Zipf stream, trainer cost.

Two ``redis-server`` processes of our own on loopback (no persistence), started and stopped here.

* ``redis_rows_per_s``: batch ``put_rows`` then ``get_rows`` of 16-dim Adagrad rows
  (16 embedding + 16 accumulator floats, last-seen time, count: 140 bytes), one and two shards;
  baseline in the same run: the same batches into the in-memory store (a host ``EmbeddingTable``).
* ``hit_rate``: a bounded table (10 % of the ids) over Redis on a Zipf(1.1) id stream, batches of
  4,096 ids; baseline: an exact LRU cache of the same size on the same stream (``OrderedDict``).
* ``trainer_vs_memory``: ``OnlineTrainer`` examples/s on synthetic examples with every table a
  cache (a quarter of its rows, at least twice what one batch touches) in front of two Redis
  shards, over the in-memory trainer (same batches, alternated runs); ``..._with_ttl``: the same
  with Redis TTLs on (``ttl=on``: a server-side ``SET ... PX`` per row).

    python -m bench.store [--quick]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from runners.redis_server import RedisServer
from trainer.embedding_table import EmbeddingTable
from trainer.redis_config import RedisStoreConfig
from trainer.redis_store import RedisStore
from trainer.rows import RowBatch
from trainer.table_config import TableConfig

DIM = 16


def _rows(n: int, seed: int = 0) -> RowBatch:
    generator = torch.Generator().manual_seed(seed)
    # distinct, scattered fids: an odd multiplier is a bijection modulo 2^40
    fids = (torch.arange(n, dtype=torch.int64) * 0x9E3779B1) & ((1 << 40) - 1) | (1 << 48)
    return RowBatch(fids, torch.randn(n, DIM, generator=generator), torch.rand(n, DIM, generator=generator),
                    torch.full((n,), 1_000, dtype=torch.int64), torch.ones(n, dtype=torch.int32))


def _put_get_rows_per_s(store, rows: RowBatch, batch: int, repeats: int) -> float:
    """Rows moved per second: each row put once and got once per repeat, in batches."""
    started = time.perf_counter()
    for _ in range(repeats):
        for at in range(0, len(rows), batch):
            store.put_rows(RowBatch(*(getattr(rows, f)[at:at + batch] for f in
                                      ("fids", "embeddings", "state", "last_seen_ms", "counts"))))
        for at in range(0, len(rows), batch):
            found, _ = store.get_rows(rows.fids[at:at + batch])
            assert bool(found.all())
    return 2 * len(rows) * repeats / (time.perf_counter() - started)


def store_throughput(servers, n: int, batch: int) -> dict:
    table = TableConfig(dim=DIM, state_width=DIM)
    rows = _rows(n)
    figures = {}
    for shards in (1, 2):
        uri = "redis://" + ",".join(s.address for s in servers[:shards]) + f"?prefix=bench{shards}&ttl=off"
        store = RedisStore(RedisStoreConfig.from_uri(uri), table)
        _put_get_rows_per_s(store, rows, batch, 1)  # warm: keys exist, connections open
        figures[shards] = _put_get_rows_per_s(store, rows, batch, 2)
        store.clear()
    memory = EmbeddingTable(table)
    _put_get_rows_per_s(memory, rows, batch, 1)
    memory_rate = _put_get_rows_per_s(memory, rows, batch, 2)
    return {"redis_rows_per_s_1_shard": round(figures[1]), "redis_rows_per_s_2_shards": round(figures[2]),
            "redis_rows_per_s_per_shard": round(min(figures[1], figures[2] / 2)),
            "memory_store_rows_per_s": round(memory_rate),
            "redis_vs_memory_store": round(figures[1] / memory_rate, 3)}


def zipf_stream(ids: int, batches: int, batch: int, seed: int = 1) -> np.ndarray:
    """Batches of ids drawn Zipf(1.1) over ``ids`` ranks (rank r with probability ~ r^-1.1)."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, ids + 1) ** 1.1
    ranks = rng.choice(ids, size=(batches, batch), p=weights / weights.sum())
    permutation = rng.permutation(ids)  # popular ids are not the small numbers
    return permutation[ranks]


def lru_hit_rate(stream: np.ndarray, capacity: int, warm: int) -> float:
    cache: OrderedDict[int, None] = OrderedDict()
    hits = lookups = 0
    for index, batch in enumerate(stream):
        for key in np.unique(batch).tolist():
            if key in cache:
                cache.move_to_end(key)
                hits += index >= warm
            else:
                cache[key] = None
                if len(cache) > capacity:
                    cache.popitem(last=False)
            lookups += index >= warm
    return hits / lookups


def cache_hit_rate(servers, ids: int, batches: int, batch: int) -> dict:
    stream = zipf_stream(ids, batches, batch)
    capacity, warm = ids // 10, batches // 5
    uri = "redis://" + ",".join(s.address for s in servers) + "?prefix=zipf&ttl=off"
    config = TableConfig(dim=DIM, state_width=DIM, max_rows=capacity, evict_fraction=0.02)
    table = EmbeddingTable(config, store=RedisStore(RedisStoreConfig.from_uri(uri), config))
    for index, ids_batch in enumerate(stream):
        if index == warm:
            table.stats["lookups"] = table.stats["hits"] = 0
        table.lookup_or_insert(torch.from_numpy(ids_batch | (1 << 48)), 1_000 + index)
    ours = table.stats["hits"] / table.stats["lookups"]
    lru = lru_hit_rate(stream, capacity, warm)
    table.store.clear()
    return {"hit_rate": round(ours, 4), "lru_hit_rate": round(lru, 4), "hit_rate_vs_lru": round(ours / lru, 3),
            "cache_share_of_ids": 0.1}


def trainer_cost(servers, impressions: int) -> dict:
    from schemas.spec import load_spec
    from trainer.online import OnlineTrainer
    from transforms.log_examples import synthetic_examples

    spec = load_spec("synthetic")
    examples = synthetic_examples(spec, impressions)
    size = spec.training.batch_size
    batches = [examples.slice(at, size) for at in range(0, examples.num_rows, size)]
    memory = OnlineTrainer(spec)
    for b in batches:  # how many rows each table ends with: the cache gets a tenth of the largest
        memory.train_batch(b)
    rows = max(len(group.table) for group in memory.groups)
    # the cache: a quarter of the rows, and at least twice the ids one batch touches
    per_batch = max(len(np.unique(b.column("fids").combine_chunks().values.to_numpy())) for b in batches)
    cache_rows = max(rows // 4, 2 * per_batch)
    uri = "redis://" + ",".join(s.address for s in servers) + f"?prefix=trainer&cache_rows={cache_rows}"
    uris = {"redis": uri, "redis_ttl": uri + "&ttl=on"}
    timings, hits = {}, {}
    for name in ("memory", "redis", "redis_ttl", "memory_again", "redis_again", "redis_ttl_again"):  # alternated
        trainer = OnlineTrainer(spec, store=uris.get(name.removesuffix("_again")))
        started = time.perf_counter()
        for b in batches:
            trainer.train_batch(b)
        trainer.write_back()
        timings[name] = time.perf_counter() - started
        if name.startswith("redis"):
            cache = [group.table for group in trainer.groups]
            hits[name] = sum(t.stats["hits"] for t in cache) / max(sum(t.stats["lookups"] for t in cache), 1)
            for t in cache:
                t.store.clear()
    memory_s = min(timings["memory"], timings["memory_again"])
    redis_s = min(timings["redis"], timings["redis_again"])
    ttl_s = min(timings["redis_ttl"], timings["redis_ttl_again"])
    return {"trainer_examples": examples.num_rows, "trainer_rows": rows,
            "trainer_cache_share_of_rows": round(cache_rows / rows, 3),
            "memory_examples_per_s": round(examples.num_rows / memory_s),
            "redis_examples_per_s": round(examples.num_rows / redis_s),
            "trainer_cache_hit_rate": round(hits["redis"], 4), "trainer_vs_memory": round(memory_s / redis_s, 3),
            "trainer_vs_memory_with_ttl": round(memory_s / ttl_s, 3)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller sizes (under a minute)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        servers = [RedisServer(Path(tmp) / f"redis{i}").start() for i in range(2)]
        try:
            figures = {"benchmark": "store"}
            figures.update(store_throughput(servers, n=100_000 if args.quick else 500_000, batch=50_000))
            figures.update(cache_hit_rate(servers, ids=100_000 if args.quick else 1_000_000,
                                          batches=100 if args.quick else 300, batch=4_096))
            figures.update(trainer_cost(servers, impressions=60_000 if args.quick else 300_000))
        finally:
            for server in servers:
                server.stop()
    print(f"Redis {figures['redis_rows_per_s_1_shard']:,} rows/s on one shard, {figures['redis_rows_per_s_2_shards']:,} "
          f"on two ({figures['redis_vs_memory_store']}x the in-memory store); Zipf hit rate {figures['hit_rate']} with a "
          f"10 % cache (exact LRU {figures['lru_hit_rate']}); trainer with Redis {figures['trainer_vs_memory']}x in memory")
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()

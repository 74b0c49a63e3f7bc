"""Collisionless embedding table vs a static (collision-prone) table and a Python dict.

Workload: a universe of ``--fids`` distinct fids over 26 slots (fid = slot << 48 | id), batches
drawn from it with Zipf popularity; dim 16 with Adagrad state (16 floats); median of repeats.

* ``lookup_ids_per_s``: fid -> embedding rows for fids already in the table (index lookup and
  row gather); ``lookup_vs_static`` = ours / ``F.embedding`` on a static table indexed by
  ``fid % N`` (the collision-prone speed ceiling).
* ``insert_ids_per_s``: lookup-or-insert of batches with ~10 % new fids; ``insert_vs_dict`` =
  ours / a pure-Python dict fid -> row (insert-or-get) on the same fids.
* ``bytes_per_entry_ratio``: (index + row pool bytes) per entry / (embedding + state bytes).
* ``expiry_rows_per_s``: a sweep that expires half of the rows.

    python -m bench.embedding_table [--quick] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from trainer.embedding_table import EmbeddingTable
from trainer.table_config import SlotPolicy, TableConfig

NUM_SLOTS = 26
DIM = 16


def zipf_indices(n: int, universe: int, generator: torch.Generator, exponent: float = 1.05) -> torch.Tensor:
    """Ranks in [0, universe) with P(rank) ~ 1 / (rank + 1)^exponent (continuous inverse CDF)."""
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    a = 1.0 - exponent
    ranks = ((1.0 + u * ((universe + 1.0) ** a - 1.0)) ** (1.0 / a)).long() - 1
    return ranks.clamp_(0, universe - 1)


def make_universe(n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` distinct fids spread over 26 slots, in a random order (rank order = popularity)."""
    slots = torch.arange(n) % NUM_SLOTS + 1
    ids = torch.randperm(n, generator=generator) * 7919 + 12345
    fids = (slots << 48) | ids
    return fids[torch.randperm(n, generator=generator)]


def timed_pair(ours, baseline, repeats: int, sync) -> tuple[float, float]:
    """Median seconds of ``ours`` and ``baseline``, run alternately (the machine's noise hits both)."""
    times: tuple[list, list] = ([], [])
    for _ in range(repeats):
        for fn, out in ((ours, times[0]), (baseline, times[1])):
            if fn is None:
                continue
            sync()
            start = time.perf_counter()
            fn()
            sync()
            out.append(time.perf_counter() - start)
    return statistics.median(times[0]), (statistics.median(times[1]) if times[1] else float("nan"))


def run(universe_size: int, batch: int, repeats: int, device: str) -> dict:
    generator = torch.Generator().manual_seed(0)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    universe = make_universe(universe_size, generator)
    known = universe[: int(universe_size * 0.8)]
    fresh_pool = universe[int(universe_size * 0.8):]

    config = TableConfig(dim=DIM, state_width=DIM, state_init=0.1, device=device,
                         default_policy=SlotPolicy(expire_after_ms=1_000))
    table = EmbeddingTable(config)
    started = time.perf_counter()
    for start in range(0, len(known), batch):
        table.lookup_or_insert(known[start:start + batch].to(device), event_time_ms=0,
                               counts=torch.ones(min(batch, len(known) - start), dtype=torch.int32))
    sync()
    fill_s = time.perf_counter() - started

    # Lookup of existing fids (Zipf-popular), gather rows.
    lookup_batch = known[zipf_indices(batch, len(known), generator)].to(device)
    static = torch.nn.Embedding(len(known), DIM).weight.detach().to(device)
    ours_lookup_s, static_lookup_s = timed_pair(lambda: table.gather(table.lookup(lookup_batch)),
                                                lambda: F.embedding(lookup_batch % len(known), static),
                                                repeats, sync)
    rows = table.lookup(lookup_batch)
    assert bool((rows >= 0).all()), "every known fid must be found"

    # Lookup-or-insert with ~10 % new fids; each repeat gets fresh new fids.
    insert_batches, dict_batches = [], []
    new_per_batch = batch // 10
    for r in range(repeats):
        old = known[zipf_indices(batch - new_per_batch, len(known), generator)]
        new = fresh_pool[r * new_per_batch:(r + 1) * new_per_batch]
        mixed = torch.cat([old, new])[torch.randperm(batch, generator=generator)]
        insert_batches.append(mixed.to(device))
        dict_batches.append(mixed.tolist())
    insert_iter = iter(insert_batches)

    reference = {fid: row for row, fid in enumerate(known.tolist())}

    def dict_insert(fids: list[int], mapping=reference):
        rows_out = []
        for fid in fids:
            row = mapping.get(fid)
            if row is None:
                row = mapping[fid] = len(mapping)
            rows_out.append(row)
        return rows_out

    dict_iter = iter(dict_batches)
    ours_insert_s, dict_insert_s = timed_pair(
        lambda: table.lookup_or_insert(next(insert_iter), event_time_ms=5_000),
        lambda: dict_insert(next(dict_iter)), repeats, sync)

    bytes_ratio = table.bytes_per_entry() / table.payload_bytes_per_entry
    load = table.load_factor

    # Expiry: rows seen at t=5000 stay, the rest (last seen at 0) expire at data time 5000 + 500.
    live_before = len(table)
    touched_recently = known[: len(known) // 2].to(device)
    table.lookup_or_insert(touched_recently, event_time_ms=5_500, counts=torch.ones(len(touched_recently),
                                                                                     dtype=torch.int32))
    sync()
    start = time.perf_counter()
    expired = table.expire(data_time_ms=5_500)
    sync()
    expiry_s = time.perf_counter() - start

    figures = {
        "benchmark": "embedding_table",
        "device": device,
        "fids": universe_size,
        "batch": batch,
        "fill_ids_per_s": round(len(known) / fill_s),
        "lookup_ids_per_s": round(batch / ours_lookup_s),
        "static_lookup_ids_per_s": round(batch / static_lookup_s),
        "lookup_vs_static": round(static_lookup_s / ours_lookup_s, 3),
        "insert_ids_per_s": round(batch / ours_insert_s),
        "dict_insert_ids_per_s": round(batch / dict_insert_s),
        "insert_vs_dict": round(dict_insert_s / ours_insert_s, 3),
        "bytes_per_entry": round(table.bytes_per_entry(), 1),
        "bytes_per_entry_ratio": round(bytes_ratio, 3),
        "load_factor": round(load, 3),
        "expired_rows": expired,
        "expiry_rows_per_s": round(expired / expiry_s),
        "rows_before_expiry": live_before,
    }
    return figures


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="2M fids, batches of 500k (under a minute)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args(argv)
    universe, batch, repeats = (2_000_000, 500_000, 7) if args.quick else (10_000_000, 1_000_000, 7)
    figures = run(universe, batch, repeats, args.device)
    print(f"lookup {figures['lookup_ids_per_s']:,} ids/s ({figures['lookup_vs_static']}x static), "
          f"insert {figures['insert_ids_per_s']:,} ids/s ({figures['insert_vs_dict']}x dict), "
          f"{figures['bytes_per_entry_ratio']}x payload bytes at load {figures['load_factor']}, "
          f"expiry {figures['expiry_rows_per_s']:,} rows/s")
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()

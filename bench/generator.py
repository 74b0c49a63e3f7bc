"""Synthetic log generator throughput: ours (vectorised numpy + Arrow) vs a plain-Python loop.

The baseline draws the same kinds of values (Zipf ranks, hashed ids, teacher logit, click,
delay) one record at a time with ``random`` and writes them with the same Parquet writer.
``events_per_s`` counts impressions + actions written per second of wall time.

    python -m bench.generator [--quick]
"""
from __future__ import annotations

import argparse
import json
import math
import random
import tempfile
import time

import pyarrow as pa
import pyarrow.parquet as pq

from event_datasets.synthetic import DEFAULT_CARDINALITIES, SyntheticConfig, generate


def ours(events: int, out_dir: str) -> tuple[float, float]:
    started = time.perf_counter()
    manifest = generate(out_dir, SyntheticConfig(events=events, seed=1))
    elapsed = time.perf_counter() - started
    return (manifest["impressions"] + manifest["actions"]["click"]) / elapsed, manifest["teacher_auc"]


def python_loop(events: int, out_path: str, s: float = 1.1) -> float:
    rng = random.Random(1)
    started = time.perf_counter()
    rows, actions = [], []
    weights = {}
    for i in range(events):
        row = {"request_id": f"syn-{i}", "event_time_ms": 1_767_225_600_000 + i * 86}
        logit = -1.5
        for field, card in enumerate(DEFAULT_CARDINALITIES):
            rank = int((1.0 + rng.random() * (card ** (1 - s) - 1.0)) ** (1 / (1 - s)))
            value = hash((field, rank)) & ((1 << 62) - 1)
            row[f"C{field + 1}"] = value
            logit += weights.setdefault(value, rng.uniform(-0.6, 0.6))
        for j in range(13):
            row[f"I{j + 1}"] = float(int(math.expm1(max(rng.gauss(1.5, 1.0), 0.0))))
        rows.append(row)
        if rng.random() < 1 / (1 + math.exp(-logit)):
            actions.append({"request_id": row["request_id"],
                            "event_time_ms": row["event_time_ms"] + int(math.exp(rng.gauss(11.0, 1.0)))})
    pq.write_table(pa.Table.from_pylist(rows), out_path + ".impressions.parquet", compression="zstd")
    pq.write_table(pa.Table.from_pylist(actions), out_path + ".actions.parquet", compression="zstd")
    return (len(rows) + len(actions)) / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, under a minute")
    args = parser.parse_args(argv)
    ours_events, loop_events, repeats = (300_000, 20_000, 3) if args.quick else (2_000_000, 100_000, 3)
    our_rates, loop_rates = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(repeats):
            rate, teacher_auc = ours(ours_events, f"{tmp}/ours{repeat}")
            our_rates.append(rate)
            loop_rates.append(python_loop(loop_events, f"{tmp}/loop{repeat}"))
    our_rate = sorted(our_rates)[len(our_rates) // 2]
    loop_rate = sorted(loop_rates)[len(loop_rates) // 2]
    figures = {
        "benchmark": "generator",
        "impressions": ours_events,
        "events_per_s": round(our_rate),
        "python_loop_events_per_s": round(loop_rate),
        "vs_python_loop": round(our_rate / loop_rate, 1),
        "teacher_auc": teacher_auc,
    }
    print(f"ours: {our_rate:,.0f} events/s   plain-Python loop: {loop_rate:,.0f} events/s   "
          f"ratio {our_rate / loop_rate:.1f}x (median of {repeats})")
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()

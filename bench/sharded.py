"""Scale-out training (``trainer.sharded``): K workers in their own processes over gloo, against
one worker in the same run, on the synthetic Criteo-like stream.

* ``throughput``: examples/s of K=2 workers with per-worker batch b against one worker with
  batch 2b - the same model (``tests/test_sharded.py``) - and their ratio. Each worker is one
  process with one torch thread; the single worker gets as many threads as K=2 has processes.
* ``cowclip``: progressive AUC at K=1 with batch b, and at K=4 with per-worker batch b (a global
  batch of 4b) without the scaling rule (the same hyperparameters) and with it (CowClip on,
  embedding L2 x 4, dense lr x 2, warm-up: ``trainer.cowclip.scale_hyperparameters``).

Plain batch updates everywhere (sequential in-batch updates are single-worker).

    python -m bench.sharded [--quick]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

from bench.quality import with_hyperparameters
from schemas.spec import load_spec
from schemas.spec_json import spec_from_json, spec_to_json
from schemas.spec_types import FeatureSpec
from trainer.cowclip import Hyperparameters, scale_hyperparameters
from trainer.online import OnlineTrainer
from trainer.sharded import run_local_workers


def _worker(rank: int, world: int, port: int, spec_json: str, examples_path: str, result_path: str) -> None:
    import torch.distributed as dist

    from trainer.sharded import Collectives, ShardedTrainer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        spec = spec_from_json(spec_json)
        trainer = ShardedTrainer(spec, Collectives())
        prepared = trainer.prepare(pq.read_table(examples_path))
        batch = world * spec.training.batch_size
        dist.barrier()
        started = time.perf_counter()
        for start in range(0, prepared.n, batch):
            trainer.train_prepared(prepared, start, min(start + batch, prepared.n))
        dist.barrier()
        seconds = time.perf_counter() - started
        if rank == 0:
            summary = trainer.metrics.summary()
            Path(result_path).write_text(json.dumps({"auc": summary["auc"], "examples": prepared.n,
                                                     "seconds": seconds}))
    finally:
        dist.destroy_process_group()


def sharded_run(spec: FeatureSpec, workers: int, examples_path: Path, work: Path) -> dict:
    """Train ``spec`` (per-worker ``batch_size``) with ``workers`` processes; rank 0's figures."""
    result = work / f"result-{workers}-{time.monotonic_ns()}.json"
    run_local_workers(_worker, workers, spec_to_json(spec), str(examples_path), str(result))
    figures = json.loads(result.read_text())
    figures["examples_per_s"] = round(figures["examples"] / figures["seconds"])
    return figures


def single_run(spec: FeatureSpec, examples_path: Path, threads: int) -> dict:
    torch.set_num_threads(threads)
    trainer = OnlineTrainer(spec)
    prepared = trainer.prepare(pq.read_table(examples_path))
    started = time.perf_counter()
    for start in range(0, prepared.n, spec.training.batch_size):
        trainer.train_prepared(prepared, start, min(start + spec.training.batch_size, prepared.n))
    seconds = time.perf_counter() - started
    return {"auc": trainer.metrics.summary()["auc"], "examples": prepared.n, "seconds": seconds,
            "examples_per_s": round(prepared.n / seconds)}


def _with_batch(spec: FeatureSpec, batch_size: int) -> FeatureSpec:
    return dataclasses.replace(spec, training=dataclasses.replace(spec.training, batch_size=batch_size,
                                                                  sequential_updates=False))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="30k impressions (under a minute)")
    parser.add_argument("--impressions", type=int, default=None)
    parser.add_argument("--batch", type=int, default=256, help="per-worker batch b")
    args = parser.parse_args(argv)
    from transforms.log_examples import synthetic_examples

    impressions = args.impressions or (30_000 if args.quick else 300_000)
    b = args.batch
    spec = load_spec("synthetic")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        examples_path = work / "examples.parquet"
        pq.write_table(synthetic_examples(spec, impressions, seed=5, span_hours=24), examples_path)

        one = single_run(_with_batch(spec, 2 * b), examples_path, threads=2)
        two = sharded_run(_with_batch(spec, b), 2, examples_path, work)
        throughput = {"global_batch": 2 * b, "single_examples_per_s": one["examples_per_s"],
                      "two_workers_examples_per_s": two["examples_per_s"],
                      "two_vs_single": round(two["examples_per_s"] / one["examples_per_s"], 3),
                      "auc_single": round(one["auc"], 5), "auc_two_workers": round(two["auc"], 5)}
        print(f"throughput at global batch {2 * b}: one worker {one['examples_per_s']:,} ex/s, two workers "
              f"{two['examples_per_s']:,} ex/s ({throughput['two_vs_single']}x); AUC {one['auc']:.5f} vs "
              f"{two['auc']:.5f}", file=sys.stderr, flush=True)

        base = _with_batch(spec, b)
        slot = base.slots[0].optimizer
        hp = Hyperparameters(b, slot.lr, slot.l2, base.training.dense_optimizer.lr, base.training.warmup_steps)
        scaled = with_hyperparameters(base, scale_hyperparameters(hp, 4 * b), cowclip=True)
        scaled = _with_batch(scaled, b)  # (per worker: the rule's batch is the global 4b)
        k1 = single_run(base, examples_path, threads=2)
        k4 = sharded_run(base, 4, examples_path, work)
        k4_scaled = sharded_run(scaled, 4, examples_path, work)
        cow = {"batch_per_worker": b, "auc_k1": round(k1["auc"], 5), "auc_k4_unscaled": round(k4["auc"], 5),
               "auc_k4_scaling_rule_cowclip": round(k4_scaled["auc"], 5),
               "k4_unscaled_minus_k1": round(k4["auc"] - k1["auc"], 5),
               "k4_scaled_minus_k1": round(k4_scaled["auc"] - k1["auc"], 5)}
        print(f"K=1 batch {b}: AUC {k1['auc']:.5f}; K=4 per-worker {b}: {k4['auc']:.5f} unscaled, "
              f"{k4_scaled['auc']:.5f} with the scaling rule and CowClip", file=sys.stderr, flush=True)
    print(json.dumps({"benchmark": "sharded", "quick": args.quick, "examples": one["examples"],
                      "throughput": throughput, "cowclip": cow}))


if __name__ == "__main__":
    main()

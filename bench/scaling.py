"""Scale-out training (``trainer.sharded``): K workers in their own processes over gloo, against
one worker in the same run, on the synthetic Criteo-like stream. Every process (the single
worker's too) has one torch thread.

* ``throughput``: examples/s of K=2 workers with per-worker batch b (a global batch of 2b) against
  one worker with batch b (weak scaling, as the global batch grows with K); beside it one worker
  with batch 2b, the same model as K=2 (``tests/test_sharded.py``):
  ``k2_vs_k1_same_global_batch``. Two arms: the large-batch regime CowClip is for (b = 4096, as
  ``bench.trainer``: ``k2_vs_k1``) and an online trainer's small batch (b = 256:
  ``k2_vs_k1_online``), where a step's fixed cost - five collectives - weighs more. The full run
  alternates K=1 and K=2 three times per arm and reports the median pair.
* ``exchange``: the bytes a step sends between workers per training example, by kind (ids with
  their counts and times, embedding rows, row gradients, the dense all-reduce, the gathered
  scores: ``trainer.sharded.Collectives``), and each worker's seconds per step split into
  compute and communication (inside collectives, waiting for the slower peer included).
* ``cowclip``: progressive AUC at K=1 with batch b, and at K=4 with per-worker batch b (a global
  batch of 4b) without the scaling rule (the same hyperparameters) and with it (CowClip on,
  embedding L2 x 4, dense lr x 2, warm-up: ``trainer.cowclip.scale_hyperparameters``).

Plain batch updates everywhere (sequential in-batch updates are single-worker). ``SCALING.md``
models K = 8 .. 128 from the ``exchange`` figures.

    python -m bench.scaling [--quick]
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
from bench.trainer import LARGE_BATCH
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
        comm = Collectives()
        trainer = ShardedTrainer(spec, comm)
        prepared = trainer.prepare(pq.read_table(examples_path))
        batch = world * spec.training.batch_size
        dist.barrier()
        comm.reset_counters()
        started = time.perf_counter()
        steps = 0
        for start in range(0, prepared.n, batch):
            trainer.train_prepared(prepared, start, min(start + batch, prepared.n))
            steps += 1
        dist.barrier()
        seconds = time.perf_counter() - started
        # every worker's bytes (summed) and seconds in collectives (mean over workers), by kind
        kinds = len(comm.KINDS)
        figures = torch.tensor([float(comm.bytes_sent[kind]) for kind in comm.KINDS]
                               + [comm.seconds[kind] for kind in comm.KINDS], dtype=torch.float64)
        dist.all_reduce(figures)
        if rank == 0:
            summary = trainer.metrics.summary()
            sent = dict(zip(comm.KINDS, figures[:kinds].tolist()))
            waited = dict(zip(comm.KINDS, (figures[kinds:] / world / steps).tolist()))
            Path(result_path).write_text(json.dumps({
                "auc": summary["auc"], "examples": prepared.n, "seconds": seconds, "steps": steps,
                "bytes_per_example": {kind: round(value / prepared.n, 1) for kind, value in sent.items()},
                "communication_s_per_step_by_kind": {kind: round(value, 5) for kind, value in waited.items()},
                "communication_s_per_step": sum(waited.values())}))
    finally:
        dist.destroy_process_group()


def sharded_run(spec: FeatureSpec, workers: int, examples_path: Path, work: Path) -> dict:
    """Train ``spec`` (per-worker ``batch_size``) with ``workers`` processes; rank 0's figures."""
    result = work / f"result-{workers}-{time.monotonic_ns()}.json"
    run_local_workers(_worker, workers, spec_to_json(spec), str(examples_path), str(result))
    figures = json.loads(result.read_text())
    figures["examples_per_s"] = round(figures["examples"] / figures["seconds"])
    step = figures["seconds"] / figures["steps"]
    figures["compute_s_per_step"] = step - figures["communication_s_per_step"]
    return figures


def single_run(spec: FeatureSpec, examples_path: Path) -> dict:
    """One worker (the plain ``OnlineTrainer``), one torch thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = OnlineTrainer(spec)
        table = pq.read_table(examples_path)
        started = time.perf_counter()
        prepared = trainer.prepare(table)
        prepare_s = time.perf_counter() - started
        started = time.perf_counter()
        steps = 0
        for start in range(0, prepared.n, spec.training.batch_size):
            trainer.train_prepared(prepared, start, min(start + spec.training.batch_size, prepared.n))
            steps += 1
        seconds = time.perf_counter() - started
    finally:
        torch.set_num_threads(threads)
    return {"auc": trainer.metrics.summary()["auc"], "examples": prepared.n, "seconds": seconds,
            "steps": steps, "examples_per_s": round(prepared.n / seconds),
            "prepare_s_per_example": prepare_s / prepared.n, "input_bytes_per_example": table.nbytes / prepared.n}


#: The network the model assumes beside its bandwidth (assumptions, not measurements of this
#: machine): a collective's latency over TCP on data-centre Ethernet, gloo's own overhead included,
#: and the added cost of each further peer of an all-to-all (whose messages are all in flight at once).
MESSAGE_LATENCY_S = 50e-6
PER_PEER_S = 5e-6


def model_examples_per_s(k1: dict, k2: dict, batch: int, workers: int, gbit_per_s: float,
                         partitioned_input: bool = False) -> dict:
    """Examples/s of ``workers`` workers (per-worker ``batch``) over a ``gbit_per_s`` network, from
    the measured K=1 and K=2 runs (per worker and step; ``SCALING.md`` explains each term):

    * compute ``C``: the K=2 worker's seconds per step outside collectives (its slice's network,
      its owned rows) - constant in K, as a slice and an owner's share of the rows stay the same;
    * input: every worker receives and prepares the whole global batch (the Flink job broadcasts
      Example tables): ``K b (I / BW + P)``, or only its slice with ``partitioned_input``;
    * sparse exchange: ids, rows and gradients, ``s2 * 2 (K - 1) / K`` bytes (at K=2 half of a
      worker's requests go to a peer, at K all but 1/K), over ``BW``, plus 4 all-to-alls, each
      one latency and ``K - 1`` peers;
    * dense all-reduce (and the scores in it): a ring, ``2 (K - 1) / K * D / BW`` plus ``2 (K - 1)``
      message latencies.
    """
    bandwidth = gbit_per_s * 1e9 / 8  # bytes/s
    k = workers
    per_example = k2["bytes_per_example"]
    sparse_2 = (per_example["ids"] + per_example["embeddings"] + per_example["gradients"]) * batch
    dense_bytes = per_example["dense"] * batch + 4 * k * batch  # the dense gradients, the scores
    compute = k2["compute_s_per_step"]
    inputs = batch if partitioned_input else k * batch
    input_s = inputs * k1["prepare_s_per_example"] + (0 if partitioned_input else
                                                      (k - 1) * batch * k1["input_bytes_per_example"] / bandwidth)
    sparse_s = sparse_2 * 2 * (k - 1) / k / bandwidth + 4 * (MESSAGE_LATENCY_S + (k - 1) * PER_PEER_S)
    dense_s = 2 * (k - 1) / k * dense_bytes / bandwidth + 2 * (k - 1) * MESSAGE_LATENCY_S
    step = compute + input_s + sparse_s + dense_s
    single = batch / (k1["seconds"] / k1["steps"] + batch * k1["prepare_s_per_example"])
    return {"workers": k, "gbit_per_s": gbit_per_s, "examples_per_s": round(k * batch / step),
            "efficiency": round(k * batch / step / (k * single), 3),
            "step_ms": {"compute": round(compute * 1e3, 2), "input": round(input_s * 1e3, 2),
                        "sparse_exchange": round(sparse_s * 1e3, 2), "dense_all_reduce": round(dense_s * 1e3, 2)}}


def _with_batch(spec: FeatureSpec, batch_size: int) -> FeatureSpec:
    return dataclasses.replace(spec, training=dataclasses.replace(spec.training, batch_size=batch_size,
                                                                  sequential_updates=False))


def throughput_arm(spec: FeatureSpec, b: int, examples_path: Path, work: Path,
                   repeats: int = 1) -> tuple[dict, dict]:
    """K=1 at batch b and 2b, K=2 at per-worker batch b: the throughput, the exchange figures and
    the model built on them; also the K=1 run at batch b. With ``repeats``, K=1 and K=2 run
    alternately that many times and the run with the median ratio is reported (the machine's
    noise hits both)."""
    pairs = []
    for _ in range(repeats):
        pair = (single_run(_with_batch(spec, b), examples_path), sharded_run(_with_batch(spec, b), 2, examples_path, work))
        pairs.append(pair)
    ratios = sorted(k2["examples_per_s"] / k1["examples_per_s"] for k1, k2 in pairs)
    k1, k2 = sorted(pairs, key=lambda pair: pair[1]["examples_per_s"] / pair[0]["examples_per_s"])[len(pairs) // 2]
    k1_global = single_run(_with_batch(spec, 2 * b), examples_path)
    per_example = k2["bytes_per_example"]
    throughput = {
        "batch_per_worker": b, "k1_examples_per_s": k1["examples_per_s"], "k2_examples_per_s": k2["examples_per_s"],
        "k2_vs_k1": round(k2["examples_per_s"] / k1["examples_per_s"], 3),
        "k2_vs_k1_runs": [round(ratio, 3) for ratio in ratios],
        "k1_batch_2b_examples_per_s": k1_global["examples_per_s"],
        "k2_vs_k1_same_global_batch": round(k2["examples_per_s"] / k1_global["examples_per_s"], 3),
        "auc_k1_batch_2b": round(k1_global["auc"], 5), "auc_k2": round(k2["auc"], 5)}
    exchange = {
        "bytes_per_example": per_example, "bytes_per_example_total": round(sum(per_example.values()), 1),
        "k2_step_s": round(k2["seconds"] / k2["steps"], 5),
        "k2_compute_s_per_step": round(k2["compute_s_per_step"], 5),
        "k2_communication_s_per_step": round(k2["communication_s_per_step"], 5),
        "k2_communication_s_per_step_by_kind": k2["communication_s_per_step_by_kind"],
        "k1_step_s": round(k1["seconds"] / k1["steps"], 5),
        "prepare_s_per_example": k1["prepare_s_per_example"],
        "input_bytes_per_example": round(k1["input_bytes_per_example"], 1)}
    print(f"K=1 batch {b}: {k1['examples_per_s']:,} ex/s; K=2 per-worker batch {b}: {k2['examples_per_s']:,} "
          f"ex/s ({throughput['k2_vs_k1']}x, runs {throughput['k2_vs_k1_runs']}); K=1 batch {2 * b}: {k1_global['examples_per_s']:,} ex/s "
          f"(K=2 {throughput['k2_vs_k1_same_global_batch']}x, AUC {k1_global['auc']:.5f} vs {k2['auc']:.5f})",
          file=sys.stderr, flush=True)
    print(f"  K=2 bytes per example {per_example}; per step {exchange['k2_compute_s_per_step'] * 1e3:.1f} ms "
          f"compute + {exchange['k2_communication_s_per_step'] * 1e3:.1f} ms communication", file=sys.stderr, flush=True)
    model = {mode: [model_examples_per_s(k1, k2, b, k, gbit, partitioned) for gbit in (25, 100) for k in (8, 32, 128)]
             for mode, partitioned in (("as_built", False), ("partitioned_input", True))}
    for mode, rows in model.items():
        for row in rows:
            print(f"  model ({mode}) K={row['workers']} over {row['gbit_per_s']} Gb/s: {row['examples_per_s']:,} ex/s "
                  f"(efficiency {row['efficiency']}; ms per step {row['step_ms']})", file=sys.stderr, flush=True)
    return {"throughput": throughput, "exchange": exchange, "model": model}, k1


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="30k + 60k impressions (under a minute)")
    parser.add_argument("--impressions", type=int, default=None, help="of the online arm and the CowClip part")
    parser.add_argument("--batch", type=int, default=256, help="per-worker batch b of the online arm and the CowClip part")
    parser.add_argument("--large-batch", type=int, default=LARGE_BATCH, help="per-worker batch of the large-batch arm")
    parser.add_argument("--repeats", type=int, default=None,
                        help="alternated K=1 / K=2 runs per arm, the median reported (default 1 quick, 3 full)")
    args = parser.parse_args(argv)
    from transforms.log_examples import synthetic_examples

    impressions = args.impressions or (30_000 if args.quick else 300_000)
    b = args.batch
    spec = load_spec("synthetic")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        examples_path = work / "examples.parquet"
        pq.write_table(synthetic_examples(spec, impressions, seed=5, span_hours=24), examples_path)
        # the large-batch arm needs more examples for as many steps: 8 global batches at least
        large_path = work / "examples-large.parquet"
        large_impressions = max(impressions, 2 * 8 * args.large_batch)
        pq.write_table(synthetic_examples(spec, large_impressions, seed=5, span_hours=24), large_path)

        repeats = args.repeats or (1 if args.quick else 3)
        online, k1 = throughput_arm(spec, b, examples_path, work, repeats)
        large, _ = throughput_arm(spec, args.large_batch, large_path, work, repeats)

        base = _with_batch(spec, b)  # (K=1 with batch b: k1 above)
        slot = base.slots[0].optimizer
        hp = Hyperparameters(b, slot.lr, slot.l2, base.training.dense_optimizer.lr, base.training.warmup_steps)
        scaled = with_hyperparameters(base, scale_hyperparameters(hp, 4 * b), cowclip=True)
        scaled = _with_batch(scaled, b)  # (per worker: the rule's batch is the global 4b)
        k4 = sharded_run(base, 4, examples_path, work)
        k4_scaled = sharded_run(scaled, 4, examples_path, work)
        cow = {"batch_per_worker": b, "auc_k1": round(k1["auc"], 5), "auc_k4_unscaled": round(k4["auc"], 5),
               "auc_k4_scaling_rule_cowclip": round(k4_scaled["auc"], 5),
               "k4_unscaled_minus_k1": round(k4["auc"] - k1["auc"], 5),
               "k4_scaled_minus_k1": round(k4_scaled["auc"] - k1["auc"], 5)}
        print(f"K=1 batch {b}: AUC {k1['auc']:.5f}; K=4 per-worker {b}: {k4['auc']:.5f} unscaled, "
              f"{k4_scaled['auc']:.5f} with the scaling rule and CowClip", file=sys.stderr, flush=True)
    print(json.dumps({"benchmark": "scaling", "quick": args.quick, "examples": k1["examples"],
                      "k2_vs_k1": large["throughput"]["k2_vs_k1"],
                      "k2_vs_k1_online": online["throughput"]["k2_vs_k1"],
                      "large_batch": large, "online": online, "cowclip": cow}))


if __name__ == "__main__":
    main()

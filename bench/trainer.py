"""Online trainer throughput: ours (collisionless table + sparse optimizers + CowClip) vs a static table.

Workload: the synthetic spec (DeepFM, 26 slots, dim 16, MLP 400-400-400) at batch 4096 (``--batch``)
with CowClip on synthetic examples. Baseline, same run and batches: the same ``CTRModel`` over a static
``nn.Embedding(rows, 16, sparse=True)`` (and a dim-1 one for the wide part) indexed by
``fid % rows`` (collisions allowed), Adagrad on the sparse gradients, Adam on the dense weights
- the fast, collision-prone way. ``vs_static`` = ours / baseline examples per second.

    python -m bench.trainer [--quick] [--batch N]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np
import pyarrow as pa
import torch

from schemas.spec import load_spec
from trainer.models import CTRModel
from trainer.online import OnlineTrainer
from transforms.log_examples import synthetic_examples

LARGE_BATCH = 4096
PAPER_HIDDEN_UNITS = (400, 400, 400)  # CowClip's DeepFM


class StaticBaseline:
    """The same model over static hashed tables with sparse gradients (Adagrad) and Adam."""

    def __init__(self, spec, rows: int, device: str = "cpu"):
        self.rows, self.spec, self.device = rows, spec, torch.device(device)
        self.num_slots, self.dim = len(spec.slots), spec.slots[0].dim
        self.deep = torch.nn.Embedding(rows, self.dim, sparse=True)
        torch.nn.init.normal_(self.deep.weight, std=0.01)
        self.wide = torch.nn.Embedding(rows, 1, sparse=True)
        torch.nn.init.zeros_(self.wide.weight)
        self.deep, self.wide = self.deep.to(self.device), self.wide.to(self.device)
        self.model = CTRModel.from_spec(spec).to(self.device)
        lr = spec.slots[0].optimizer.lr
        self.sparse_optimizer = torch.optim.Adagrad(list(self.deep.parameters()) + list(self.wide.parameters()), lr=lr)
        self.dense_optimizer = torch.optim.Adam(self.model.parameters(), lr=spec.training.dense_optimizer.lr)
        self.slot_position = np.zeros(max(s.slot_id for s in spec.slots) + 1, dtype=np.int64)
        for i, s in enumerate(spec.slots):
            self.slot_position[s.slot_id] = i

    def train_batch(self, examples: pa.Table) -> None:
        fids = examples.column("fids").combine_chunks()
        offsets = fids.offsets.to_numpy()
        flat = fids.values.to_numpy(zero_copy_only=False)[offsets[0]:offsets[-1]]
        n = examples.num_rows
        example_of = np.repeat(np.arange(n), np.diff(offsets))
        positions = self.slot_position[flat >> 48]
        device = self.device
        index = torch.from_numpy(flat % self.rows).to(device)
        pooled = torch.zeros(n * self.num_slots, self.dim, device=device).index_add(
            0, torch.from_numpy(example_of * self.num_slots + positions).to(device), self.deep(index))
        wide = torch.zeros(n, device=device).index_add(0, torch.from_numpy(example_of).to(device),
                                                        self.wide(index)[:, 0])
        dense = examples.column("dense").combine_chunks()
        dense_t = torch.tensor(dense.values.to_numpy(zero_copy_only=False).reshape(n, -1), device=device)
        labels = torch.tensor([dict(l)["click"] for l in examples.column("labels").to_pylist()], dtype=torch.float32,
                              device=device)
        logits = self.model(pooled.view(n, self.num_slots, self.dim), wide, dense_t)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="sum")
        self.sparse_optimizer.zero_grad()
        self.dense_optimizer.zero_grad()
        loss.backward()
        self.sparse_optimizer.step()
        self.dense_optimizer.step()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="40k examples (under a minute)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda: where both trainers' tables and models live")
    parser.add_argument("--batch", type=int, default=LARGE_BATCH,
                        help=f"examples per step (default {LARGE_BATCH}: the large-batch regime; an online "
                             "trainer's small batches insert a larger share of new fids per example)")
    args = parser.parse_args(argv)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    torch.manual_seed(0)
    spec = load_spec("synthetic")
    batch = args.batch  # by default the large-batch (CowClip) regime
    spec = dataclasses.replace(spec, model=dataclasses.replace(spec.model, hidden_units=PAPER_HIDDEN_UNITS),
                               training=dataclasses.replace(spec.training, batch_size=batch,
                                                            cowclip=dataclasses.replace(spec.training.cowclip, enabled=True)))
    examples = synthetic_examples(spec, 40_000 if args.quick else 200_000)
    batches = [examples.slice(start, batch) for start in range(0, examples.num_rows, batch)]
    ours = OnlineTrainer(spec, device=args.device)
    baseline = StaticBaseline(spec, rows=1_000_000, device=args.device)
    ours.train_batch(batches[0])  # warm up both (allocations, first-touch)
    baseline.train_batch(batches[0])
    ours_s = baseline_s = 0.0
    for part in batches[1:]:  # alternate, so the machine's noise hits both
        start = time.perf_counter()
        ours.train_batch(part)
        sync()
        ours_s += time.perf_counter() - start
        start = time.perf_counter()
        baseline.train_batch(part)
        sync()
        baseline_s += time.perf_counter() - start
    trained = sum(p.num_rows for p in batches[1:])
    figures = {
        "benchmark": "trainer",
        "device": args.device,
        "examples": trained,
        "batch": batch,
        "examples_per_s": round(trained / ours_s),
        "static_examples_per_s": round(trained / baseline_s),
        "vs_static": round(baseline_s / ours_s, 3),
        "progressive_auc": round(ours.metrics.auc, 4),
        "table_rows": sum(len(g.table) for g in ours.groups),
    }
    print(f"ours {figures['examples_per_s']:,} examples/s, static sparse table {figures['static_examples_per_s']:,}"
          f" examples/s: {figures['vs_static']}x")
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()

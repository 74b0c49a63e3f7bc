"""One model trained by K workers in lockstep: embedding rows sharded by fid, dense weights replicated.

Every worker holds the same global batch (examples ``start:stop`` of the same prepared table) and
trains its contiguous slice of it: worker ``r`` of ``K`` takes ``per = ceil(n / K)`` examples from
``start + r * per``. Each fid belongs to exactly one worker, ``owner(fid) = mix64(fid, OWNER_SEED)
mod K``, whose table is a collisionless table of its own (expiry, frequency filter) with the
seed the single-worker table would have. Per table, each step:

1. every worker sends the distinct fids of its slice (with their occurrence counts and newest
   event times) to their owners (all-to-all);
2. each owner sums what it received per fid, looks up or inserts the rows (its frequency filter
   sees the whole batch's counts) and sends each worker the rows it asked for (all-to-all);
3. the worker pools, runs the dense network on its slice and backpropagates its summed loss;
4. each fid's summed gradient and summed squared gradient go back to its owner (all-to-all),
   which sums them over the workers and steps the rows (CowClip with the whole batch's counts);
5. the dense gradients are summed over the workers (all-reduce) and every worker takes the same
   dense step; the slice scores are gathered, so every worker's progressive metrics are those of
   the whole batch.

The loss is a sum over examples, so the sums of steps 4-5 equal the gradients of the whole batch:
the model after a step equals a single worker's after the same batch (to float rounding), and a
table's rows are those of the single-worker table restricted to the owner's fids (initial values
are a function of fid and seed: ``trainer.initializers``). A worker with no example in a step
still takes part with an empty slice; a table the whole batch does not touch is skipped by all.

Sequential in-batch updates (``trainer.in_batch``) couple the examples of a batch through shared
rows; they are single-worker, and a sharded trainer takes plain batch updates.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist

from schemas.spec_types import FeatureSpec
from trainer.hashing import mix64
from trainer.online import OnlineTrainer, occurrence_gradients
from trainer.ranking_model import GroupFids, PreparedExamples, TableGroup
from trainer.rows import max_per_group

OWNER_SEED = 0x0A11CE  # fid -> worker hash seed (independent of the cuckoo index's hashes)


def owner_of(fids: torch.Tensor, workers: int) -> torch.Tensor:
    """The worker that holds each fid's row: ``(mix64(fid, OWNER_SEED) >>> 1) mod workers``."""
    return ((mix64(fids, OWNER_SEED) >> 1) & ((1 << 62) - 1)) % workers


class Collectives:
    """The exchanges of a sharded step over a ``torch.distributed`` process group (gloo on CPU,
    NCCL on CUDA); every call is a collective: all workers make the same calls in the same order."""

    def __init__(self, group=None):
        self.group = group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)

    def all_to_all(self, send: torch.Tensor, send_counts: list[int]) -> tuple[torch.Tensor, list[int]]:
        """Rows ``send`` split by ``send_counts`` (one part per worker, in worker order) -> the
        parts every worker sent to this one, concatenated in worker order, and their counts."""
        counts = torch.tensor(send_counts, dtype=torch.int64)
        received_counts = torch.empty_like(counts)
        dist.all_to_all_single(received_counts, counts, group=self.group)
        recv_counts = received_counts.tolist()
        received = send.new_empty((sum(recv_counts), *send.shape[1:]))
        dist.all_to_all_single(received, send.contiguous(), recv_counts, send_counts, group=self.group)
        return received, recv_counts

    def barrier(self) -> None:
        dist.barrier(group=self.group)

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor

    def gather_slices(self, part: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """Each worker's ``part`` (``sizes[r]`` rows from worker r), concatenated in worker order."""
        largest = max(sizes)
        padded = part.new_zeros((largest, *part.shape[1:]))
        padded[:len(part)] = part
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded, group=self.group)
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])


@dataclass
class _Exchange:
    """One table's step between the row exchange and the gradient exchange."""

    group: TableGroup
    inverse: torch.Tensor  # [occurrences of the slice] index into the slice's distinct fids
    target: torch.Tensor  # [occurrences] pooled row of each occurrence (in the slice)
    example: torch.Tensor  # [occurrences] example of each occurrence (in the slice)
    order: torch.Tensor  # [the slice's distinct fids] their order as sent (by owner)
    send_counts: list[int]  # distinct fids sent to each owner
    # the owner's side: what it received, summed per fid
    owned_inverse: torch.Tensor  # [received] index into the owned distinct fids
    owned_rows: torch.Tensor  # [owned distinct] rows (-1: held back by the frequency filter)
    owned_counts: torch.Tensor  # [owned distinct] occurrences in the whole batch


class ShardedTrainer(OnlineTrainer):
    """Worker ``collectives.rank`` of a sharded trainer (see the module docstring). Each table
    holds the rows of this worker's fids; the dense network is the same on every worker."""

    def __init__(self, spec: FeatureSpec, collectives: Collectives, device: str = "cpu", seed: int = 0,
                 store: str | None = None):
        super().__init__(spec, device=device, seed=seed, store=store)
        self.comm = collectives
        self.sequential_updates = False  # (single-worker: see the module docstring)

    def train_prepared(self, prepared: PreparedExamples, start: int, stop: int, unscored: int = 0) -> torch.Tensor:
        """Train the global batch ``start:stop`` of ``prepared`` (every worker calls this with the
        same batch); returns the batch's summed loss over all workers."""
        n, world = stop - start, self.comm.world
        per = -(-n // world)
        sizes = [max(0, min(stop, start + (r + 1) * per) - min(stop, start + r * per)) for r in range(world)]
        lo = min(stop, start + self.comm.rank * per)
        hi = lo + sizes[self.comm.rank]
        pooled, wide, exchanges = self._pool_sharded(prepared, start, stop, lo, hi)
        pooled.requires_grad_()
        wide.requires_grad_()
        logits = self.ranking.forward(pooled, wide, prepared.dense[lo:hi])
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            logits - prepared.log_rate[lo:hi], prepared.label_tensor[lo:hi], reduction="sum")
        grads = torch.autograd.grad(loss, self.dense_parameters + [pooled, wide], allow_unused=True)
        dense = [torch.zeros_like(p) if g is None else g for p, g in zip(self.dense_parameters, grads)]
        pooled_grad, wide_grad = (torch.zeros_like(t) if g is None else g
                                  for t, g in zip((pooled, wide), grads[len(self.dense_parameters):]))
        for exchange in exchanges:
            self._push_gradients(exchange, pooled_grad, wide_grad)
        flat = self.comm.sum_(torch.cat([g.reshape(-1) for g in dense] + [loss.detach().reshape(1)]))
        offset = 0
        for parameter in self.dense_parameters:
            parameter.grad = flat[offset:offset + parameter.numel()].view_as(parameter).clone()
            offset += parameter.numel()
        scores = self.comm.gather_slices(logits.detach(), sizes)
        if unscored < n:
            self._pending_scores.append((scores[unscored:], start + unscored, stop, prepared))
        self._end_step(prepared, start, stop)
        return flat[-1]

    def _pool_sharded(self, prepared: PreparedExamples, start: int, stop: int, lo: int, hi: int):
        """Pooled embeddings and wide sums of this worker's slice ``lo:hi``, the rows fetched from
        their owners (steps 1-2 of the module docstring), and each table's exchange. Every table
        the whole batch ``start:stop`` touches is exchanged, by every worker (``also``)."""
        world = self.comm.world
        touched = frozenset(index for index, fids_of in enumerate(prepared.groups)
                            if fids_of.bounds[start] != fids_of.bounds[stop])
        exchanges = []

        def read_rows(index: int, fids_of: GroupFids, a: int, b: int):
            group = self.groups[index]
            distinct, inverse, counts = torch.unique(fids_of.fids[a:b], return_inverse=True, return_counts=True)
            times = max_per_group(fids_of.times[a:b], inverse, len(distinct))
            owners = owner_of(distinct, world)
            order = torch.argsort(owners, stable=True)
            send_counts = torch.bincount(owners, minlength=world).tolist()
            request = torch.stack([distinct, counts, times], dim=1).index_select(0, order)
            received, recv_counts = self.comm.all_to_all(request, send_counts)
            owned, owned_inverse = torch.unique(received[:, 0], return_inverse=True)
            owned_counts = torch.zeros(len(owned), dtype=torch.int64, device=self.device).index_add_(
                0, owned_inverse, received[:, 1])
            owned_times = max_per_group(received[:, 2], owned_inverse, len(owned))
            rows = (group.table.lookup_or_insert(owned, owned_times, owned_counts) if len(owned)
                    else owned.new_empty(0))
            answer = group.table.gather(rows).index_select(0, owned_inverse)  # [received, dim + 1]
            weights_sent, _ = self.comm.all_to_all(answer, recv_counts)
            weights = torch.empty_like(weights_sent)
            weights[order] = weights_sent  # back into the order of the slice's distinct fids
            exchanges.append(_Exchange(group, inverse, fids_of.target[a:b] - lo * self.num_slots,
                                       fids_of.example[a:b] - lo, order, send_counts, owned_inverse, rows,
                                       owned_counts))
            return weights, inverse

        pooled, wide = self.ranking.pool(prepared, lo, hi, read_rows, also=touched)
        return pooled, wide, exchanges

    def _push_gradients(self, exchange: _Exchange, pooled_grad: torch.Tensor, wide_grad: torch.Tensor) -> None:
        """Step 4: the slice's per-fid gradient sums (and sums of squares, where the optimizer
        takes them) to their owners, summed there and applied."""
        with_squares = exchange.group.uses_squares
        grad, squares = occurrence_gradients(exchange.target, exchange.example, exchange.inverse, len(exchange.order),
                                             pooled_grad, wide_grad, with_squares)
        width = grad.shape[1]
        payload = (torch.cat([grad, squares], dim=1) if with_squares else grad).index_select(0, exchange.order)
        received, _ = self.comm.all_to_all(payload, exchange.send_counts)
        summed = torch.zeros(len(exchange.owned_rows), payload.shape[1], device=self.device).index_add_(
            0, exchange.owned_inverse, received)
        self.update_rows(exchange.group, exchange.owned_rows, summed[:, :width],
                         summed[:, width:] if with_squares else None, exchange.owned_counts)

    def predict_logits(self, examples: pa.Table) -> np.ndarray:
        raise NotImplementedError("a sharded trainer holds part of each table: serve its published model")

    def predict_features(self, fids: pa.ListArray, dense: pa.ListArray) -> np.ndarray:
        raise NotImplementedError("a sharded trainer holds part of each table: serve its published model")


def run_local_workers(target, workers: int, *args, timeout_s: float = 1_800) -> None:
    """Run ``target(rank, workers, port, *args)`` in ``workers`` spawned processes on this machine
    (``port``: a free loopback port for ``init_process_group``'s ``tcp://127.0.0.1:port``);
    processes still running after ``timeout_s`` are killed by process id. Raises if one failed."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = mp.get_context("spawn")
    processes = [context.Process(target=target, args=(rank, workers, port, *args)) for rank in range(workers)]
    for process in processes:
        process.start()
    try:
        for process in processes:
            process.join(timeout=timeout_s)
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
                process.join()
    if any(process.exitcode != 0 for process in processes):
        raise RuntimeError(f"a worker failed: exit codes {[process.exitcode for process in processes]}")

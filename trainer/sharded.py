"""One model trained by K workers in lockstep: embedding rows sharded by fid, dense weights replicated.

Every worker holds the same global batch (examples ``start:stop`` of the same prepared table) and
trains its contiguous slice of it: worker ``r`` of ``K`` takes ``per = ceil(n / K)`` examples from
``start + r * per``. Each fid belongs to exactly one worker, ``owner(fid) = mix64(fid, OWNER_SEED)
mod K``, whose table is a collisionless table of its own (expiry, frequency filter) with the
seed the single-worker table would have. Each step, for all the tables the global batch touches
together (one exchange per direction, ordered by owner and then table):

1. every worker sends the distinct fids of its slice (with their occurrence counts and newest
   event times) to their owners (the counts per owner and table, then the fids: all-to-all);
2. each owner sums what it received per fid, looks up or inserts the rows (its frequency filter
   sees the whole batch's counts) and sends each worker the rows it asked for (all-to-all);
3. the worker pools, runs the dense network on its slice and backpropagates its summed loss;
4. each fid's summed gradient (and summed squared gradient, where an optimizer takes them) goes
   back to its owner (all-to-all, the counts known from step 1), which sums them over the
   workers and steps the rows (CowClip with the whole batch's counts);
5. the dense gradients are summed over the workers (all-reduce) and every worker takes the
   same dense step; the slices' scores are summed in the same all-reduce (each worker's at its
   place), so every worker's progressive metrics are those of the whole batch.

The loss is a sum over examples, so the sums of steps 4-5 equal the gradients of the whole batch:
the model after a step equals a single worker's after the same batch (to float rounding), and a
table's rows are those of the single-worker table restricted to the owner's fids (initial values
are a function of fid and seed: ``trainer.initializers``). A worker with no example in a step
still takes part with an empty slice; a table the whole batch does not touch is skipped by all.

Sequential in-batch updates (``trainer.in_batch``) couple the examples of a batch through shared
rows; they are single-worker, and a sharded trainer takes plain batch updates.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist

from schemas.spec_types import FeatureSpec
from trainer.hashing import owner_of
from trainer.online import OnlineTrainer, occurrence_gradients
from trainer.ranking_model import PreparedExamples, TableGroup
from trainer.rows import max_per_group


class Collectives:
    """The exchanges of a sharded step over a ``torch.distributed`` process group (gloo on CPU,
    NCCL on CUDA); every call is a collective: all workers make the same calls in the same order.

    Counts what this worker sends to its peers, in bytes per kind (``KINDS``; what stays on the
    worker is not counted), and the wall seconds spent inside collectives per kind (waiting for
    the slowest peer included)."""

    KINDS = ("ids", "embeddings", "gradients", "dense", "scores")

    def __init__(self, group=None):
        self.group = group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.reset_counters()

    def reset_counters(self) -> None:
        self.bytes_sent = dict.fromkeys(self.KINDS, 0)
        self.seconds = dict.fromkeys(self.KINDS, 0.0)

    def _timed(self, kind: str, collective, *args, **kwargs) -> None:
        started = time.perf_counter()
        collective(*args, group=self.group, **kwargs)
        self.seconds[kind] += time.perf_counter() - started

    def exchange_counts(self, counts: torch.Tensor, kind: str) -> torch.Tensor:
        """``counts`` [world, ...] int64, row w for worker w -> the rows every worker sent to this
        one [world, ...] (row w from worker w)."""
        received = torch.empty_like(counts)
        self._timed(kind, dist.all_to_all_single, received, counts.contiguous())
        self.bytes_sent[kind] += (self.world - 1) * counts[0].numel() * counts.element_size()
        return received

    def all_to_all(self, send: torch.Tensor, send_counts: list[int], kind: str,
                   recv_counts: list[int] | None = None) -> tuple[torch.Tensor, list[int]]:
        """Rows ``send`` split by ``send_counts`` (one part per worker, in worker order) -> the
        parts every worker sent to this one, concatenated in worker order, and their counts
        (exchanged first unless the caller knows them: ``recv_counts``)."""
        if recv_counts is None:
            recv_counts = self.exchange_counts(torch.tensor(send_counts, dtype=torch.int64), kind).tolist()
        received = send.new_empty((sum(recv_counts), *send.shape[1:]))
        self._timed(kind, dist.all_to_all_single, received, send.contiguous(), recv_counts, send_counts)
        row_bytes = send[0].numel() * send.element_size() if len(send) else 0
        self.bytes_sent[kind] += (sum(send_counts) - send_counts[self.rank]) * row_bytes
        return received, recv_counts

    def barrier(self) -> None:
        dist.barrier(group=self.group)

    def sum_(self, tensor: torch.Tensor, elements: dict[str, int]) -> torch.Tensor:
        """All-reduce (sum, in place) ``tensor``, whose ``elements[kind]`` elements are of each
        kind; counted as a ring all-reduce sends: 2 (K - 1) / K of it. (Synchronous: gloo's
        asynchronous work can abort the process at exit - torch PR 179291 - and a restarted
        Flink job costs more than the overlap saved, about a millisecond a step here.)"""
        started = time.perf_counter()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        seconds = time.perf_counter() - started
        for kind, count in elements.items():
            self.bytes_sent[kind] += 2 * (self.world - 1) * count * tensor.element_size() // self.world
            self.seconds[kind] += seconds * count / tensor.numel()
        return tensor


@dataclass
class _OwnedGroup:
    """The owner's side of one table in a step: what it received, summed per fid."""

    group: TableGroup
    received: torch.Tensor  # [requests for this table] positions in the received buffer
    inverse: torch.Tensor  # [requests for this table] index into the owned distinct fids
    rows: torch.Tensor  # [owned distinct] rows (-1: held back by the frequency filter)
    counts: torch.Tensor  # [owned distinct] occurrences in the whole batch


@dataclass
class _Exchange:
    """A step between the row exchange and the gradient exchange, for all the tables the global
    batch touches (in index order). The requests of all tables travel together, ordered by
    (owner, table): one all-to-all per direction and step."""

    occurrences: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # per table: inverse, target, example
    distinct: list[int]  # per table: the slice's distinct fids
    order: torch.Tensor  # [all distinct fids of the slice] their position in the request (by owner, table)
    send_counts: list[int]  # requests to each owner
    recv_counts: list[int]  # requests from each worker
    owned: list[_OwnedGroup]


class ShardedTrainer(OnlineTrainer):
    """Worker ``collectives.rank`` of a sharded trainer (see the module docstring). Each table
    holds the rows of this worker's fids; the dense network is the same on every worker."""

    def __init__(self, spec: FeatureSpec, collectives: Collectives, device: str = "cpu", seed: int = 0,
                 store: str | None = None):
        super().__init__(spec, device=device, seed=seed, store=store)
        self.comm = collectives
        self.sequential_updates = False  # (single-worker: see the module docstring)
        for group in self.groups:  # each shard is a cache in front of the same external store
            if group.table.store is not None and group.table.store.persistent:
                group.table.store.share(collectives.rank, collectives.world)

    def train_prepared(self, prepared: PreparedExamples, start: int, stop: int, unscored: int = 0) -> torch.Tensor:
        """Train the global batch ``start:stop`` of ``prepared`` (every worker calls this with the
        same batch); returns the batch's summed loss over all workers."""
        n = stop - start
        per = -(-n // self.comm.world)
        lo = min(stop, start + self.comm.rank * per)
        hi = min(stop, lo + per)
        pooled, wide, exchange = self._pool_sharded(prepared, start, stop, lo, hi)
        pooled.requires_grad_()
        wide.requires_grad_()
        logits = self.ranking.forward(pooled, wide, prepared.dense[lo:hi])
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            logits - prepared.log_rate[lo:hi], prepared.label_tensor[lo:hi], reduction="sum")
        grads = torch.autograd.grad(loss, self.dense_parameters + [pooled, wide], allow_unused=True)
        dense = [torch.zeros_like(p) if g is None else g for p, g in zip(self.dense_parameters, grads)]
        pooled_grad, wide_grad = (torch.zeros_like(t) if g is None else g
                                  for t, g in zip((pooled, wide), grads[len(self.dense_parameters):]))
        if exchange is not None:
            self._step_rows(exchange, self._push_gradients(exchange, pooled_grad, wide_grad))
        # one all-reduce sums the dense gradients, the loss and the slices' scores (each worker's
        # at its place, zeros elsewhere)
        scores = torch.zeros(n, device=self.device)
        scores[lo - start:hi - start] = logits.detach()
        flat = torch.cat([g.reshape(-1) for g in dense] + [loss.detach().reshape(1), scores])
        self.comm.sum_(flat, {"dense": len(flat) - n, "scores": n})
        offset = 0
        for parameter in self.dense_parameters:
            parameter.grad = flat[offset:offset + parameter.numel()].view_as(parameter).clone()
            offset += parameter.numel()
        loss_sum, scores = flat[offset], flat[offset + 1:]
        if unscored < n:
            self._pending_scores.append((scores[unscored:], start + unscored, stop, prepared))
        self._end_step(prepared, start, stop)
        return loss_sum

    def _pool_sharded(self, prepared: PreparedExamples, start: int, stop: int, lo: int, hi: int):
        """Pooled embeddings and wide sums of this worker's slice ``lo:hi``, the rows fetched from
        their owners (steps 1-2 of the module docstring) for every table the whole batch
        ``start:stop`` touches, and the step's exchange (None: the batch touches no table)."""
        world = self.comm.world
        touched = [index for index, fids_of in enumerate(prepared.groups)
                   if fids_of.bounds[start] != fids_of.bounds[stop]]
        pooled = torch.zeros((hi - lo) * self.num_slots, self.ranking.dim, device=self.device)
        wide = torch.zeros(hi - lo, device=self.device)
        if not touched:
            return pooled, wide, None
        occurrences, requests = [], []
        for index in touched:
            fids_of = prepared.groups[index]
            a, b = int(fids_of.bounds[lo]), int(fids_of.bounds[hi])
            distinct, inverse, counts = torch.unique(fids_of.fids[a:b], return_inverse=True, return_counts=True)
            times = max_per_group(fids_of.times[a:b], inverse, len(distinct))
            occurrences.append((inverse, fids_of.target[a:b] - lo * self.num_slots, fids_of.example[a:b] - lo))
            requests.append(torch.stack([distinct, counts, times], dim=1))
        tables = len(touched)
        distinct = [len(request) for request in requests]
        request = torch.cat(requests)
        table_of = torch.repeat_interleave(torch.arange(tables, device=self.device),
                                           torch.tensor(distinct, device=self.device))
        destination = owner_of(request[:, 0], world) * tables + table_of
        order = torch.argsort(destination, stable=True)
        send_matrix = torch.bincount(destination, minlength=world * tables).view(world, tables)
        recv_matrix = self.comm.exchange_counts(send_matrix, "ids")
        send_counts, recv_counts = send_matrix.sum(1).tolist(), recv_matrix.sum(1).tolist()
        received, _ = self.comm.all_to_all(request.index_select(0, order), send_counts, "ids", recv_counts)
        received_table = torch.repeat_interleave(torch.arange(tables, device=self.device).repeat(world),
                                                 recv_matrix.reshape(-1))
        answer = torch.empty(len(received), self.ranking.dim + 1, device=self.device)
        owned = []
        for position, index in enumerate(touched):
            group = self.groups[index]
            at = torch.nonzero(received_table == position).squeeze(1)
            mine = received.index_select(0, at)
            fids, inverse = torch.unique(mine[:, 0], return_inverse=True)
            counts = torch.zeros(len(fids), dtype=torch.int64, device=self.device).index_add_(0, inverse, mine[:, 1])
            times = max_per_group(mine[:, 2], inverse, len(fids))
            rows = group.table.lookup_or_insert(fids, times, counts) if len(fids) else fids.new_empty(0)
            answer[at] = group.table.gather(rows).index_select(0, inverse)
            owned.append(_OwnedGroup(group, at, inverse, rows, counts))
        weights_sent, _ = self.comm.all_to_all(answer, recv_counts, "embeddings", send_counts)
        weights = torch.empty_like(weights_sent)
        weights[order] = weights_sent  # back into the order of the slice's distinct fids, by table
        dim = self.ranking.dim
        for (inverse, target, example), table_weights in zip(occurrences, torch.split(weights, distinct)):
            if len(inverse):
                rows_of = table_weights.index_select(0, inverse)
                pooled.index_add_(0, target, rows_of[:, :dim])
                wide.index_add_(0, example, rows_of[:, dim])
        return pooled, wide, _Exchange(occurrences, distinct, order, send_counts, recv_counts, owned)

    def _push_gradients(self, exchange: _Exchange, pooled_grad: torch.Tensor, wide_grad: torch.Tensor) -> torch.Tensor:
        """Step 4: the slice's per-fid gradient sums (and sums of squares, where an optimizer
        takes them) of all tables to their owners in one all-to-all; returns what this worker
        received as an owner (``_step_rows`` applies it)."""
        with_squares = any(self.takes_squares(owned.group) for owned in exchange.owned)
        parts = []
        for (inverse, target, example), fids in zip(exchange.occurrences, exchange.distinct):
            grad, squares = occurrence_gradients(target, example, inverse, fids, pooled_grad, wide_grad, with_squares)
            parts.append(torch.cat([grad, squares], dim=1) if with_squares else grad)
        payload = torch.cat(parts).index_select(0, exchange.order)
        received, _ = self.comm.all_to_all(payload, exchange.send_counts, "gradients", exchange.recv_counts)
        return received

    def _step_rows(self, exchange: _Exchange, received: torch.Tensor) -> None:
        """The owner's side of step 4: the received gradients summed per fid over the workers,
        then each table's rows stepped."""
        width = self.ranking.dim + 1
        for owned in exchange.owned:
            summed = torch.zeros(len(owned.rows), received.shape[1], device=self.device).index_add_(
                0, owned.inverse, received.index_select(0, owned.received))
            self.update_rows(owned.group, owned.rows, summed[:, :width],
                             summed[:, width:] if self.takes_squares(owned.group) else None, owned.counts)

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

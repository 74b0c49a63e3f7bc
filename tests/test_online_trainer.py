"""The online trainer end to end on real and synthetic examples."""
import dataclasses

import numpy as np
import pyarrow as pa
import pytest
import torch

from schemas.spec import parse_spec
from trainer.online import OnlineTrainer
from transforms.examples import EXAMPLE_SCHEMA


def test_run_command_trains_deepfm_on_movielens_and_beats_logistic_regression(movielens_logs, tmp_path, capsys):
    """The main job end to end on Beam: logs -> join -> sample -> features -> online training."""
    import json

    from runners.cli import main

    logs, _ = movielens_logs
    assert main(["run", "--logs", str(logs), "--out", str(tmp_path)]) == 0
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"examples", "auc", "logloss", "examples_per_s"} <= set(figures)
    assert figures["examples"] == 100_000 and figures["dead_letters"] == {}
    # Reference: an online logistic regression (river, one-hot user/item/occupation, SGD 0.05) over
    # the same ratings in time order scored a progressive AUC of 0.7365.
    assert figures["auc"] >= 0.74
    assert figures["calibration"] == pytest.approx(1.0, abs=0.02)
    _check_metric_report(tmp_path, figures)


def _check_metric_report(out, figures):
    from trainer.report import read_metric_rows

    rows = read_metric_rows(out / "metrics.jsonl")
    assert len(rows) == figures["metric_windows"] > 20  # weekly windows over seven months
    assert sum(row["examples"] for row in rows) + figures["late_metric_examples"] == figures["examples"]
    starts = [row["window_start_ms"] for row in rows]
    assert starts == sorted(starts) and all(start % rows[0]["window_ms"] == 0 for start in starts)
    assert (out / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_command_trains_in_streaming_mode_as_well_as_backfill(movielens_logs, tmp_path, capsys):
    """The trainer as a stateful streaming transform: replayed logs, windows closing as the
    watermark advances, training in event-time order; the same quality as the backfill."""
    import json

    from runners.cli import main

    logs, _ = movielens_logs
    assert main(["run", "--streaming", "--no-progress", "--logs", str(logs), "--out", str(tmp_path)]) == 0
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert figures["mode"] == "streaming" and figures["examples"] == 100_000
    assert figures["auc"] >= 0.74
    _check_metric_report(tmp_path, figures)


def _spec(**slot):
    return parse_spec({"name": "t", "events": {"impression": "movielens_impression", "action": "action"},
                       "defaults": {"dim": 4, "optimizer": {"kind": "adagrad", "lr": 0.05}},
                       "slots": [{"name": "item", "source": "item_id", **slot}],
                       "labels": {"actions": ["click"]}, "model": {"kind": "dnn", "hidden_units": [4]},
                       "training": {"batch_size": 64, "dense_optimizer": {"kind": "adam", "lr": 0.003}}})


def _example_table(fids, labels, rate, start_ms=0):
    n = len(labels)
    return pa.table({
        "request_id": pa.array([f"r{i}" for i in range(n)]), "user_id": pa.array(["u"] * n),
        "item_id": pa.array(["i"] * n), "impression_time_ms": pa.array(np.arange(n) + start_ms, pa.int64()),
        "position": pa.array(np.zeros(n, np.int32)),
        "labels": pa.array([[("click", int(y))] for y in labels], EXAMPLE_SCHEMA.field("labels").type),
        "label_times_ms": pa.array([[] for _ in labels], EXAMPLE_SCHEMA.field("label_times_ms").type),
        "sample_rate": pa.array(np.full(n, rate)), "fids": pa.array([[f] for f in fids], pa.list_(pa.int64())),
        "dense": pa.array([[] for _ in labels], pa.list_(pa.float32())),
    }, schema=EXAMPLE_SCHEMA)


def test_log_odds_correction_recovers_the_true_ctr():
    """CTR 0.2; negatives kept at r = 0.1: the trained model serves ~0.2, not the sampled 0.71."""
    rng = np.random.default_rng(0)
    clicks = rng.random(60_000) < 0.2
    kept = clicks | (rng.random(60_000) < 0.1)
    labels = clicks[kept]
    fid = (1 << 48) | 7
    trainer = OnlineTrainer(_spec())
    trainer.train(_example_table([fid] * len(labels), labels, 0.1))
    served = 1 / (1 + np.exp(-trainer.predict_logits(_example_table([fid], [0], 0.1))))
    assert labels.mean() > 0.6  # what a model trained without the correction would serve
    # Tolerance 0.04: online noise of the last batches (an uncorrected model would be 0.5 away).
    assert served[0] == pytest.approx(0.2, abs=0.04)


def test_filtered_fids_get_no_row_and_no_update():
    trainer = OnlineTrainer(_spec(min_count=3))
    rare, common = (1 << 48) | 1, (1 << 48) | 2
    trainer.train(_example_table([rare] + [common] * 5, [1, 0, 1, 0, 1, 0], 1.0))
    table = trainer.groups[0].table
    assert table.lookup(torch.tensor([rare])).item() == -1  # seen once: below min_count, no row
    assert table.lookup(torch.tensor([common])).item() >= 0
    assert table.stats["filtered"] == 1


def test_expired_fids_are_freed_on_data_time_and_return_fresh():
    trainer = OnlineTrainer(_spec(expire_after="1h"))
    old, new = (1 << 48) | 11, (1 << 48) | 12
    trainer.train(_example_table([old] * 4, [1, 0, 1, 0], 1.0, start_ms=0))
    table = trainer.groups[0].table
    first_row = table.lookup(torch.tensor([old])).item()
    before = table.embeddings[first_row].clone()
    assert first_row >= 0
    # Two hours of *data time* later (not wall clock): the sweep frees the unseen fid.
    trainer.train(_example_table([new] * 4, [0, 1, 0, 1], 1.0, start_ms=2 * 3_600_000))
    assert table.lookup(torch.tensor([old])).item() == -1
    assert table.stats["expired"] == 1
    # It comes back as a fresh row (new initial embedding).
    trainer.train(_example_table([old], [1], 1.0, start_ms=2 * 3_600_000 + 10))
    row = table.lookup(torch.tensor([old])).item()
    assert row >= 0 and not torch.equal(table.embeddings[row], before)


def test_dense_learning_rate_warms_up_linearly():
    spec = parse_spec({"name": "t", "events": {"impression": "movielens_impression", "action": "action"},
                       "defaults": {"dim": 4, "optimizer": {"kind": "adagrad", "lr": 0.05}},
                       "slots": [{"name": "item", "source": "item_id"}],
                       "labels": {"actions": ["click"]}, "model": {"kind": "dnn", "hidden_units": [4]},
                       "training": {"batch_size": 8, "warmup_steps": 4,
                                    "dense_optimizer": {"kind": "adam", "lr": 0.004}}})
    trainer = OnlineTrainer(spec)
    seen = []
    for step in range(6):
        trainer.train_batch(_example_table(np.arange(8) + 1, np.arange(8) % 2, 1.0, start_ms=step * 8))
        seen.append(trainer.dense_optimizer.param_groups[0]["lr"])
    assert seen == pytest.approx([0.001, 0.002, 0.003, 0.004, 0.004, 0.004])


def _linear_spec(batch_size, kind="adagrad", sequential=True):
    """Wide & Deep without hidden layers and a frozen dense part: a model linear in its rows."""
    return parse_spec({"name": "t", "events": {"impression": "movielens_impression", "action": "action"},
                       "defaults": {"dim": 3, "initializer": {"kind": "zeros"},
                                    "optimizer": {"kind": kind, "lr": 0.3, "initial_accumulator": 0.1}},
                       "slots": [{"name": "user", "source": "user_id"}, {"name": "item", "source": "item_id"}],
                       "labels": {"actions": ["click"]}, "model": {"kind": "wide_deep", "hidden_units": []},
                       "training": {"batch_size": batch_size, "sequential_updates": sequential,
                                    "dense_optimizer": {"kind": "adam", "lr": 0.0}}})


@pytest.mark.parametrize("kind", ["adagrad", "sgd"])
@pytest.mark.parametrize("batch", [3, 10])
def test_sequential_in_batch_updates_equal_training_example_by_example(kind, batch):
    """Batches of 3 and of 10, their coupled scores solved to convergence (a model linear in its rows and
    the dense part frozen), score and train exactly as batches of one example."""
    rng = np.random.default_rng(3)
    n = 30
    users, items = rng.integers(0, 4, n), rng.integers(0, 5, n)
    fids = [[(1 << 48) | int(u), (2 << 48) | int(i)] for u, i in zip(users, items)]
    examples = _example_table([f[0] for f in fids], rng.random(n) < 0.4, 1.0)
    examples = examples.set_column(examples.schema.get_field_index("fids"), "fids",
                                   pa.array(fids, pa.list_(pa.int64())))
    one, batched = OnlineTrainer(_linear_spec(1, kind)), OnlineTrainer(_linear_spec(batch, kind))
    assert batched.sequential_updates
    batched.newton_steps = 8
    one.train(examples)
    batched.train(examples)
    assert batched.metrics.logloss == pytest.approx(one.metrics.logloss, rel=1e-5)
    distinct = torch.tensor(sorted({f for pair in fids for f in pair}))
    for a, b in zip(one.groups, batched.groups):
        assert torch.allclose(a.table.embeddings[a.table.lookup(distinct)],
                              b.table.embeddings[b.table.lookup(distinct)], atol=1e-5)
        assert torch.allclose(a.table.state[a.table.lookup(distinct)], b.table.state[b.table.lookup(distinct)],
                              atol=1e-5)
    # Without sequential updates the same batches score and train otherwise (not a vacuous check).
    plain = OnlineTrainer(_linear_spec(batch, kind, sequential=False))
    plain.train(examples)
    assert abs(plain.metrics.logloss - one.metrics.logloss) > 1e-3


@pytest.mark.parametrize("batch, per_example", [(1024, True), (4096, False)])
def test_a_plain_batch_accumulates_per_example_squares_only_while_small(batch, per_example):
    """Adagrad's accumulator in a plain batch step: each example's squared gradient summed up to
    a batch of SEQUENTIAL_MAX_BATCH, the square of the summed gradient above - so an id seen
    in every example of a large batch moves by at most lr per coordinate, not sqrt(count) x lr."""
    spec = _spec()
    spec = dataclasses.replace(spec, training=dataclasses.replace(spec.training, batch_size=batch,
                                                                  sequential_updates=False))
    assert spec.training.per_example_squares is per_example
    trainer = OnlineTrainer(spec)
    fid = (1 << 48) | 5
    labels = np.ones(batch, bool)  # every example pushes the row the same way
    table = trainer.groups[0].table
    trainer.train(_example_table([fid], labels[:1], 1.0))  # creates the row
    row = table.lookup(torch.tensor([fid])).item()
    before, accumulated = table.embeddings[row].clone(), table.state[row].clone()
    trainer.train(_example_table([fid] * batch, labels, 1.0))
    moved = (table.embeddings[row] - before).abs().max().item()
    lr = spec.slots[0].optimizer.lr
    if per_example:
        assert moved > 2 * lr  # ~sqrt(batch) x lr: what the examples one at a time would move
    else:
        assert moved <= lr * 1.0001
    assert (table.state[row] >= accumulated).all() and (table.state[row] > accumulated).any()

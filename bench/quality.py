"""Model quality: AUCs that the papers' claims rest on, each beside its baseline in the same run.

0. Online learning against Vowpal Wabbit (``bench.vw``) on the very same Example rows in the same
   order, both scored before they learn each example, exact AUC (scikit-learn) for both:
   MovieLens-100K with the shipped spec; MovieLens-100K with a spec that names no optimizer,
   training or model settings (the project's defaults decide); the synthetic Criteo-like stream
   (600k impressions, seed 5; 100k with ``--quick``) with the spec ``synthetic``; OBD (report
   only: ~0.5 % CTR on 10k rows is noise). Per row: ``auc``, ``vw_auc``, ``auc_minus_vw`` and
   examples/s for both.
1. MovieLens-100K, DeepFM trained online (the shipped spec): progressive AUC.
2. Monolith's collision experiment: the same training with a collisionless table vs a *hashed*
   table with 1/10 as many rows - every fid mapped to ``slot << 48 | mix64(fid) % m_slot`` with
   ``m_slot = ceil(distinct fids of the slot / 10)``, so ids collide as in a fixed-size table -
   on MovieLens (progressive AUC) and on the synthetic Criteo-like logs.
3. CowClip: synthetic Criteo-like logs, DeepFM; the first 80 % (in time order) trained for
   ``epochs`` passes, AUC on the last 20 %. Batch 1K, 16K and 64K, with and without CowClip;
   every run uses the scaling rule from base batch 1K (embedding lr kept, embedding L2 x s,
   dense lr x sqrt(s), warm-up).

``--quick`` runs section 0 alone on 100k synthetic impressions (under a minute); with
``--sections papers`` it shrinks the synthetic data and the MLP (and batches 128/2K/8K, the same
1:16:64 ratios); its CowClip figures are a smoke test, not the result.

    python -m bench.quality [--quick] [--sections online,papers] [--device cuda] [--skip-movielens]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from bench.trainer import PAPER_HIDDEN_UNITS
from schemas.fids import HASH_BITS
from schemas.spec import load_spec
from schemas.spec_types import FeatureSpec
from trainer.cowclip import Hyperparameters, scale_hyperparameters
from trainer.hashing import mix64
from trainer.online import OnlineTrainer
from transforms.log_examples import examples_from_logs, synthetic_examples


def hashed_fids(examples: pa.Table, shrink: int = 10) -> pa.Table:
    """``examples`` with every fid folded into ``ceil(distinct / shrink)`` buckets of its slot."""
    fids = examples.column("fids").combine_chunks()
    flat = fids.values.to_numpy(zero_copy_only=False)
    slots = flat >> HASH_BITS
    buckets = np.zeros_like(flat)
    for slot in np.unique(slots):
        mask = slots == slot
        rows = max(1, math.ceil(len(np.unique(flat[mask])) / shrink))
        hashed = mix64(torch.from_numpy(flat[mask])).numpy()
        buckets[mask] = (slot << HASH_BITS) | (hashed & ((1 << 62) - 1)) % rows
    folded = pa.ListArray.from_arrays(fids.offsets, pa.array(buckets, pa.int64()))
    return examples.set_column(examples.schema.get_field_index("fids"), "fids", folded)


def distinct_fids(examples: pa.Table) -> int:
    return len(np.unique(examples.column("fids").combine_chunks().values.to_numpy(zero_copy_only=False)))


def progressive_auc(spec: FeatureSpec, examples: pa.Table, device: str) -> dict:
    trainer = OnlineTrainer(spec, device=device)
    started = time.perf_counter()
    summary = trainer.train(examples)
    summary["seconds"] = round(time.perf_counter() - started, 1)
    return summary


def online_against_vw(spec: FeatureSpec, examples: pa.Table, device: str) -> dict:
    """Our progressive AUC and VW's on the same Examples (both exact, scikit-learn)."""
    from sklearn.metrics import roc_auc_score

    from bench.vw import vw_progressive

    trainer = OnlineTrainer(spec, device=device)
    recorded = trainer.record_scores()
    started = time.perf_counter()
    trainer.train(examples)
    trainer.metrics  # folds the last scores in
    seconds = time.perf_counter() - started
    scores, labels, weights = recorded.recorded()
    auc = float(roc_auc_score(labels, scores, sample_weight=weights))
    peer = vw_progressive(examples, spec.labels.target)
    return {"examples": examples.num_rows, "batch": spec.training.batch_size,
            "sequential_updates": spec.training.uses_sequential_updates, "auc": round(auc, 5), **peer,
            "auc_minus_vw": round(auc - peer["vw_auc"], 5), "examples_per_s": round(examples.num_rows / seconds)}


def defaults_only(spec_name: str) -> FeatureSpec:
    """The built-in spec without ``defaults.optimizer``, ``training`` and ``model``: a user's spec
    that names no training settings, so the project's defaults decide."""
    import yaml

    from schemas.spec import parse_spec, spec_path

    path = spec_path(spec_name)
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    raw.get("defaults", {}).pop("optimizer", None)
    raw.pop("training", None)
    raw.pop("model", None)
    return parse_spec(raw, source=f"{path} (defaults only)", base_dir=path.parent)


def online_figures(quick: bool, device: str, movielens_rows: bool = True) -> dict:
    """The rows of section 0, as ``online_<row>`` dicts."""
    from event_datasets import obd

    rows = {}
    if movielens_rows:
        from event_datasets import movielens

        spec = load_spec("movielens")
        with tempfile.TemporaryDirectory() as tmp:
            movielens.convert(Path(tmp))
            examples = examples_from_logs(spec, Path(tmp))
        rows["movielens"] = online_against_vw(spec, examples, device)
        rows["movielens_defaults"] = online_against_vw(defaults_only("movielens"), examples, device)
    spec = load_spec("synthetic")
    rows["synthetic"] = online_against_vw(spec, synthetic_examples(spec, 100_000 if quick else 600_000, seed=5),
                                          device)
    spec = load_spec("obd")
    with tempfile.TemporaryDirectory() as tmp:
        obd.convert(Path(tmp))
        rows["obd"] = online_against_vw(spec, examples_from_logs(spec, Path(tmp)), device)
    for name, row in rows.items():
        print(f"online {name}: ours {row['auc']:.4f} ({row['examples_per_s']:,} ex/s), VW {row['vw_auc']:.4f} "
              f"({row['vw_examples_per_s']:,} ex/s): {row['auc_minus_vw']:+.4f}", file=sys.stderr, flush=True)
    return {f"online_{name}": row for name, row in rows.items()}


def with_hyperparameters(spec: FeatureSpec, hp: Hyperparameters, cowclip: bool) -> FeatureSpec:
    slots = tuple(dataclasses.replace(s, optimizer=dataclasses.replace(s.optimizer, lr=hp.embedding_lr,
                                                                       l2=hp.embedding_l2)) for s in spec.slots)
    training = dataclasses.replace(
        spec.training, batch_size=hp.batch_size, warmup_steps=hp.warmup_steps,
        dense_optimizer=dataclasses.replace(spec.training.dense_optimizer, lr=hp.dense_lr),
        cowclip=dataclasses.replace(spec.training.cowclip, enabled=cowclip))
    return dataclasses.replace(spec, slots=slots, training=training)


def train_test_auc(spec: FeatureSpec, train: pa.Table, test: pa.Table, epochs: int, device: str) -> dict:
    from experiments.cowclip_batch import train_test

    result = train_test(spec, train, test, epochs, device)
    return {"test_auc": result["test_auc"], "test_logloss": result["test_logloss"], "steps": result["steps"],
            "seconds": result["train_seconds"]}


def movielens_figures(device: str) -> dict:
    from event_datasets import movielens

    spec = load_spec("movielens")
    with tempfile.TemporaryDirectory() as tmp:
        movielens.convert(Path(tmp))
        examples = examples_from_logs(spec, Path(tmp))
    hashed = hashed_fids(examples)
    ours = progressive_auc(spec, examples, device)
    collided = progressive_auc(spec, hashed, device)
    return {"movielens_deepfm_auc": ours["auc"], "movielens_hashed_auc": collided["auc"],
            "movielens_collisionless_minus_hashed": round(ours["auc"] - collided["auc"], 5),
            "movielens_distinct_fids": distinct_fids(examples), "movielens_hashed_fids": distinct_fids(hashed)}


def synthetic_figures(quick: bool, device: str, epochs: int, impressions: int | None = None,
                      collision: bool = True) -> dict:
    spec = load_spec("synthetic")  # the CowClip paper's MLP (a smaller one for --quick)
    spec = dataclasses.replace(spec, model=dataclasses.replace(spec.model, hidden_units=(128, 128) if quick
                                                               else PAPER_HIDDEN_UNITS))
    impressions = impressions or (60_000 if quick else 1_000_000)
    examples = synthetic_examples(spec, impressions, seed=11, span_hours=24)
    cut = int(examples.num_rows * 0.8)
    train, test = examples.slice(0, cut), examples.slice(cut)
    figures = {"synthetic_examples": examples.num_rows, "epochs": epochs}

    if collision:
        online = dataclasses.replace(spec, training=dataclasses.replace(spec.training, batch_size=1024))
        ours = progressive_auc(online, examples, device)
        collided = progressive_auc(online, hashed_fids(examples), device)
        figures.update({"synthetic_collisionless_auc": ours["auc"], "synthetic_hashed_auc": collided["auc"],
                        "synthetic_collisionless_minus_hashed": round(ours["auc"] - collided["auc"], 5)})

    base_batch = 128 if quick else 1024
    base = Hyperparameters(base_batch, embedding_lr=spec.slots[0].optimizer.lr, embedding_l2=1e-5,
                           dense_lr=spec.training.dense_optimizer.lr, warmup_steps=0)
    runs = []
    for scale in (1, 16, 64):
        hp = scale_hyperparameters(base, base_batch * scale)
        for cowclip in (True, False):
            result = train_test_auc(with_hyperparameters(spec, hp, cowclip), train, test, epochs, device)
            run = {"batch": hp.batch_size, "cowclip": cowclip, "dense_lr": round(hp.dense_lr, 6),
                   "embedding_l2": hp.embedding_l2, "warmup_steps": hp.warmup_steps, **result}
            print(json.dumps(run), file=sys.stderr, flush=True)
            runs.append(run)
    figures["cowclip_runs"] = runs
    for run in runs:
        figures[f"auc_{run['batch']}_{'cowclip' if run['cowclip'] else 'plain'}"] = run["test_auc"]
    large = [r for r in runs if r["batch"] == base_batch * 64]
    figures["cowclip_gain_at_64x"] = round(large[0]["test_auc"] - large[1]["test_auc"], 5)
    figures["cowclip_64x_minus_1x"] = round(large[0]["test_auc"] - runs[0]["test_auc"], 5)
    return figures


SECTIONS = ("online", "papers")  # section 0; sections 1-3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sections", default=None,
                        help="comma-separated: online (section 0, vs VW), papers (sections 1-3: collisions, "
                             "CowClip); default both, with --quick online only (it alone fits in a minute)")
    parser.add_argument("--epochs", type=int, default=None, help="passes over the CowClip training split")
    parser.add_argument("--skip-movielens", action="store_true", help="no MovieLens (no download)")
    parser.add_argument("--skip-collision", action="store_true", help="no synthetic collisionless-vs-hashed runs")
    parser.add_argument("--impressions", type=int, default=None, help="synthetic impressions (default 1M, quick 60k)")
    args = parser.parse_args(argv)
    sections = set((args.sections or ("online" if args.quick else ",".join(SECTIONS))).split(","))
    if not sections <= set(SECTIONS):
        parser.error(f"--sections: unknown {sorted(sections - set(SECTIONS))}, expected some of {list(SECTIONS)}")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    figures = {"quick": args.quick, "device": args.device, "sections": sorted(sections)}
    started = time.perf_counter()
    if "online" in sections:
        figures.update(online_figures(args.quick, args.device, movielens_rows=not args.skip_movielens))
    if "papers" in sections:
        if not args.skip_movielens:
            figures.update(movielens_figures(args.device))
            print(json.dumps(figures), file=sys.stderr, flush=True)
        figures.update(synthetic_figures(args.quick, args.device, args.epochs or (1 if args.quick else 3),
                                         args.impressions, collision=not args.skip_collision))
    figures["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()

"""The papers' experiments as commands (``streamrec experiment NAME``), on a user's spec and logs.

* ``sync-interval`` (Monolith): serving AUC against the parameter-sync interval.
* ``batch-then-online`` (Monolith): batch training on history, then online on the rest.
* ``shard-loss`` (Monolith): a lost parameter-server shard restored from an older snapshot.
* ``cowclip-batch`` (CowClip): test AUC from batch 1K to 64K, with and without CowClip.

Each writes ``OUT/NAME.json`` and ``OUT/NAME.png`` and prints its table. Without ``--logs`` an
experiment generates the drifting synthetic stream its claim needs (``DEFAULT_DATA``).
"""
from __future__ import annotations

EXPERIMENTS = ("sync-interval", "batch-then-online", "shard-loss", "cowclip-batch")

#: (impressions, span in hours) of the synthetic stream an experiment generates without --logs:
#: (full run, --quick). shard-loss needs 9 days (a snapshot 7 days before the loss); cowclip-batch
#: enough rows for 50 steps of batch 64K in its 80 % training part.
DEFAULT_DATA = {
    "sync-interval": ((600_000, 72.0), (40_000, 36.0)),
    "batch-then-online": ((600_000, 48.0), (40_000, 48.0)),
    "shard-loss": ((600_000, 216.0), (40_000, 216.0)),
    "cowclip-batch": ((4_100_000, 24.0), (60_000, 24.0)),
}


def run_experiment(name: str, spec, examples, out, quick: bool, device: str, **options) -> dict:
    """Run experiment ``name`` on ``examples``; returns its result (also written under ``out``)."""
    if name == "sync-interval":
        from experiments.sync_interval import run
    elif name == "batch-then-online":
        from experiments.batch_then_online import run
    elif name == "shard-loss":
        from experiments.shard_loss import run
    elif name == "cowclip-batch":
        from experiments.cowclip_batch import run
    else:
        raise ValueError(f"unknown experiment {name!r} (known: {', '.join(EXPERIMENTS)})")
    return run(spec, examples, out, quick=quick, device=device, **options)

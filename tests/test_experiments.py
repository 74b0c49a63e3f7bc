"""``streamrec experiment NAME --quick`` at toy size, through the CLI on generated synthetic logs:
each writes its JSON (strict) and PNG, prints its table, and every figure is finite and in
range. No AUC is asserted: at toy size they are noise."""
from __future__ import annotations

import json
import math

import pytest

from experiments.common import synthetic_logs
from runners.cli import main


def _run(capsys, *args) -> dict:
    assert main(["experiment", *args, "--quick"]) == 0
    printed = capsys.readouterr().out
    result = json.loads(printed.strip().splitlines()[-1])
    written = json.loads(open(result["json"]).read())
    assert written == result
    with open(result["plot"], "rb") as png:
        assert png.read(8) == b"\x89PNG\r\n\x1a\n"
    assert printed.startswith(result["experiment"])  # the table comes first
    return result


def _metric(value, low: float = 0.0, high: float = 1.0) -> None:
    assert isinstance(value, float) and math.isfinite(value) and low <= value <= high, value


def _auc_and_logloss(figures: dict, prefix: str = "") -> None:
    _metric(figures[f"{prefix}auc"])
    _metric(figures[f"{prefix}logloss"], 0.0, 10.0)


@pytest.fixture(scope="module")
def hours_of_logs(tmp_path_factory):
    return synthetic_logs(tmp_path_factory.mktemp("hours"), 2_000, 2.5)


def test_sync_interval(capsys, tmp_path, hours_of_logs):
    result = _run(capsys, "sync-interval", "--logs", str(hours_of_logs), "--out", str(tmp_path), "--frozen-after", "1")
    assert [run["sparse_every"] for run in result["runs"]] == ["1m", "10m", "30m", "1h", "5h"]
    assert {run["dense_every"] for run in result["runs"]} == {"1h"}  # (--quick: dense hourly only)
    for run in result["runs"]:
        _metric(run["serving_auc"])
        _metric(run["serving_logloss"], 0.0, 10.0)
        assert run["scored_examples"] == result["scored_examples"] > 0 and run["versions"] >= 3
    assert [run["versions"] for run in result["runs"]] == sorted((run["versions"] for run in result["runs"]),
                                                                 reverse=True)
    _metric(result["trainer_progressive_auc"])
    _metric(result["frozen_auc"])
    assert result["identical_training"] is True and set(result["serving_auc_non_increasing"]) == {"1h"}
    assert not (tmp_path / "models").exists()


def test_batch_then_online(capsys, tmp_path, hours_of_logs):
    result = _run(capsys, "batch-then-online", "--logs", str(hours_of_logs), "--out", str(tmp_path))
    assert set(result["arms"]) == {"batch_then_online", "batch_only", "online_from_scratch", "online_throughout"}
    for arm in result["arms"].values():
        _auc_and_logloss(arm)
        assert arm["examples"] == result["online_examples"]
    assert result["history_examples"] + result["online_examples"] == result["examples"]
    assert result["phase1"]["batch_size"] == 16 * result["phase2_batch_size"] and result["phase1"]["cowclip"]
    _metric(result["batch_then_online_minus_batch_only"], -1.0, 1.0)


def test_shard_loss(capsys, tmp_path):
    logs = synthetic_logs(tmp_path / "logs", 2_000, 216.0)  # 9 days: a snapshot 7 days before the loss
    result = _run(capsys, "shard-loss", "--logs", str(logs), "--out", str(tmp_path / "out"), "--shards", "2")
    ages = [arm["snapshot_age"] for arm in result["arms"]]
    assert ages == ["none lost", "1h", "1d", "7d", "never"]
    baseline, *lossy = result["arms"]
    assert baseline["rows_lost"] == 0
    for arm in result["arms"]:
        assert arm["available"]
        _auc_and_logloss(arm, "after_")
    for arm in lossy:
        assert arm["rows_lost"] > 0 and (arm["rows_restored"] > 0) == (arm["snapshot_age"] != "never")
        _metric(arm["after_auc_dip"], -1.0, 1.0)
        assert arm["recovery_ms"] is None or 0 <= arm["recovery_ms"] <= 86_400_000
    assert set(result["window_auc"]) == set(ages)
    assert not (tmp_path / "out" / "shard-loss-work").exists()


def test_cowclip_batch(capsys, tmp_path, hours_of_logs):
    result = _run(capsys, "cowclip-batch", "--logs", str(hours_of_logs), "--out", str(tmp_path), "--base-batch", "8")
    assert [(run["batch"], run["cowclip"]) for run in result["runs"]] == [
        (8, True), (8, False), (64, True), (64, False), (512, True), (512, False)]
    for run in result["runs"]:
        _auc_and_logloss(run, "test_")
        assert run["steps"] == run["steps_per_epoch"] * result["epochs"]
    assert result["runs"][0]["dense_lr"] * 8 == pytest.approx(result["runs"][4]["dense_lr"])  # sqrt(64)
    _metric(result["largest_cowclip_relative_to_base"], -1.0, 1.0)
    assert isinstance(result["largest_cowclip_within_0.1_percent"], bool)


def test_an_option_of_another_experiment_is_refused(capsys, tmp_path, hours_of_logs):
    assert main(["experiment", "shard-loss", "--logs", str(hours_of_logs), "--out", str(tmp_path),
                 "--base-batch", "8"]) == 1
    assert "--base-batch is an option of cowclip-batch" in capsys.readouterr().err


def test_run_backfill_until_is_the_batch_then_online_arm_as_a_job(capsys, tmp_path, hours_of_logs):
    """``run --backfill-until T``: phase 1 batch-trains the Examples before T into snapshot version 1
    of the model directory, and the job resumes from it and trains the rest online - with the
    same progressive AUC as the experiment's ``batch_then_online`` arm split at T."""
    from experiments import batch_then_online
    from experiments.common import event_times, load_examples
    from schemas.spec import load_spec
    from trainer.publish import read_manifest, read_spec

    spec = load_spec("synthetic")
    examples = load_examples(spec, hours_of_logs)
    arms = batch_then_online.run(spec, examples, tmp_path / "experiment", epochs=2)
    times = event_times(examples)
    split_ms = int(times.min() + 0.5 * (times.max() - times.min()))
    model_dir, out = tmp_path / "model", tmp_path / "out"
    argv = ["run", "--spec", "synthetic", "--logs", str(hours_of_logs), "--out", str(out), "--model-dir",
            str(model_dir), "--no-progress", "--backfill-until", str(split_ms)]
    capsys.readouterr()
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["backfill"]["examples"] == arms["history_examples"] > 0
    assert summary["backfill"]["batch_size"] == arms["phase1"]["batch_size"]
    assert summary["examples_trained_this_run"] == arms["online_examples"] > 0
    assert summary["examples_trained"] == examples.num_rows and summary["resumed_from_version"] == 1
    assert summary["auc"] == pytest.approx(arms["arms"]["batch_then_online"]["auc"], abs=1e-4)
    assert read_manifest(model_dir)[0]["kind"] == "snapshot"
    assert read_spec(model_dir) == spec  # the model serves and resumes with the spec's own settings
    # a model directory with versions is not overwritten by a second backfill
    assert main(argv) == 1
    assert "this model directory has versions" in capsys.readouterr().err

"""Typed job options: what the CLI parses is what the runners read and what cluster submission
forwards - parse, then submission argv, then parse again gives equal options."""
from __future__ import annotations

import pytest

from runners.cli import build_parser
from runners.options import _DESTS, JobOptions, Mode

MODE_FLAGS = {"streaming", "watch", "no_progress"}  # (read into mode / progress, not by name)
NOT_JOB_OPTIONS = {"command", "handler"}


def _parse(argv: list[str]) -> JobOptions:
    args = build_parser().parse_args(argv)
    return JobOptions.from_args(args, train=args.command == "run")


@pytest.mark.parametrize("argv", [
    ["run", "--runner", "flink", "--flink-master", "localhost:8081", "--device", "cuda", "--no-progress"],
    ["run", "--spec", "synthetic", "--streaming", "--parallelism", "3", "--events-per-step", "999",
     "--checkpoint-every", "2.5", "--store", "redis://127.0.0.1:7000?prefix=p", "--resume"],
    ["run", "--watch", "0.5", "--stop-after", "30", "--runner", "flink"],
    ["join", "--spec", "obd", "--runner", "flink", "--resume", "--watch", "2", "--parallelism", "2"],
    ["backfill", "--spec", "movielens"],
    ["run", "--backfill-until", "1998-01-01T06:00:00+02:00", "--backfill-epochs", "3", "--backfill-scale", "8",
     "--runner", "flink"],
])
def test_submission_argv_parses_back_to_the_same_options(argv, tmp_path):
    paths = ["--logs", str(tmp_path / "logs"), "--out", str(tmp_path / "out")]
    if argv[0] == "run":
        paths += ["--model-dir", str(tmp_path / "model")]
    options = _parse(argv + paths)
    again = _parse(options.to_argv())
    assert again == options.replace(flink_master=None)  # (the submitted command runs on the cluster)


def test_the_device_reaches_a_cluster_job(tmp_path):
    options = _parse(["run", "--runner", "flink", "--flink-master", "h:8081", "--device", "cuda",
                      "--logs", str(tmp_path), "--out", str(tmp_path / "o")])
    argv = options.to_argv()
    assert argv[argv.index("--device") + 1] == "cuda" and "--flink-master" not in argv


@pytest.mark.parametrize("command", ["run", "join", "backfill"])
def test_every_job_option_the_parser_has_is_a_typed_option(command):
    parser = build_parser()
    sub = next(action for action in parser._subparsers._group_actions[0].choices.items() if action[0] == command)[1]
    dests = {action.dest for action in sub._actions if action.dest != "help"}
    assert dests - NOT_JOB_OPTIONS - MODE_FLAGS <= set(_DESTS), dests - set(_DESTS) - MODE_FLAGS


def test_modes_and_their_flags_go_together(tmp_path):
    assert _parse(["run", "--out", str(tmp_path), "--streaming"]).mode is Mode.REPLAY
    assert _parse(["run", "--out", str(tmp_path), "--streaming", "--watch", "1"]).mode is Mode.LIVE
    assert _parse(["run", "--out", str(tmp_path)]).mode is Mode.BACKFILL
    with pytest.raises(ValueError, match="--stop-after needs --watch"):
        _parse(["run", "--out", str(tmp_path), "--stop-after", "3"])
    with pytest.raises(ValueError, match="watch interval"):
        JobOptions(out=tmp_path, mode=Mode.LIVE)


def test_backfill_until_options(tmp_path, capsys):
    paths = ["run", "--out", str(tmp_path)]
    options = _parse(paths + ["--backfill-until", "1998-01-01"])
    assert options.backfill.until_ms == 883_612_800_000 and (options.backfill.epochs, options.backfill.scale) == (2, 16)
    assert _parse(paths + ["--backfill-until", "883612800000"]).backfill_until_ms == 883_612_800_000
    with pytest.raises(ValueError, match="not with --resume"):
        _parse(paths + ["--backfill-until", "1998-01-01", "--resume"])
    with pytest.raises(ValueError, match="--backfill-epochs must be in"):
        _parse(paths + ["--backfill-until", "1998-01-01", "--backfill-epochs", "0"])
    with pytest.raises(ValueError, match="settings of --backfill-until"):
        _parse(paths + ["--backfill-scale", "4"])
    with pytest.raises(SystemExit):
        _parse(paths + ["--backfill-until", "last tuesday"])
    assert "bad time 'last tuesday'" in capsys.readouterr().err

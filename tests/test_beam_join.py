"""The Beam job (pipelines.beam_join, runners.beam_runner): backfill == streaming, real logs end to
end, bad records to dead letters, live mode."""
import json
import math
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from runners.cli import main
from schemas.logs import log_files
from tests.conftest import without_checksums


@pytest.fixture(scope="module")
def obd_runs(obd_logs, tmp_path_factory):
    from runners.beam_runner import run_job
    from runners.options import JobOptions, Mode
    from schemas.spec import load_spec

    logs, manifest = obd_logs
    spec = load_spec("obd")
    out = tmp_path_factory.mktemp("obd_join")
    runs = {}
    for mode in ("backfill", "streaming"):
        summary = run_job(spec, JobOptions(out=out / mode, logs=logs,
                                           mode=Mode.REPLAY if mode == "streaming" else Mode.BACKFILL))
        runs[mode] = (summary, pq.read_table(sorted((out / mode / "examples").glob("*.parquet"))))
    return runs, manifest


def _example_set(table):
    return sorted((r["request_id"], r["item_id"], tuple(sorted(r["labels"])), r["sample_rate"], tuple(r["fids"]),
                   tuple(round(x, 6) for x in r["dense"])) for r in table.to_pylist())


def test_backfill_equals_streaming(obd_runs):
    runs, _ = obd_runs
    backfill, streaming = runs["backfill"][1], runs["streaming"][1]
    assert backfill.num_rows > 0
    assert _example_set(backfill) == _example_set(streaming)
    assert runs["backfill"][0]["dead_letters"] == runs["streaming"][0]["dead_letters"]


def test_obd_positives_and_sampled_negatives(obd_runs):
    runs, manifest = obd_runs
    table = runs["backfill"][1]
    labels = [dict(r)["click"] for r in table.column("labels").to_pylist()]
    positives = sum(labels)
    assert positives == manifest["actions"]["click"]  # 30 s mean delay: every click within the 10 m window
    negatives_in_source = manifest["impressions"] - positives
    kept = len(labels) - positives
    rate = 0.1
    assert abs(kept - rate * negatives_in_source) <= 4 * math.sqrt(negatives_in_source * rate * (1 - rate))
    rates = table.column("sample_rate").to_numpy()
    assert set(np.round(rates, 6)) == {0.1}  # the stream's negative rate, on positives too


def test_movielens_backfill_end_to_end(movielens_logs, tmp_path, capsys, caplog, monkeypatch):
    logs, manifest = movielens_logs
    argv = ["backfill", "--spec", "movielens", "--logs", str(logs), "--out", str(tmp_path)]
    monkeypatch.setattr("sys.argv", ["streamrec", *argv])  # as the console script sees them
    assert main(argv) == 0
    assert "Discarding unparseable args" not in caplog.text  # Beam must not parse our command line
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # Every like arrives within the 30 min window (exponential delay, mean 120 s): all are positives.
    assert figures["examples"] == 100_000 and figures["positives"] == manifest["actions"]["like"]
    assert figures["dead_letters"] == {}


def test_bad_records_go_to_dead_letters_and_the_job_completes(obd_logs, tmp_path, capsys):
    logs, manifest = obd_logs
    copy = tmp_path / "logs"
    shutil.copytree(logs, copy)
    without_checksums(copy)
    victim = log_files(copy, "impressions")[3]
    victim.write_bytes(victim.read_bytes()[:200])  # truncated mid-file
    assert main(["backfill", "--spec", "obd", "--logs", str(copy), "--out", str(tmp_path / "out")]) == 0
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert figures["dead_letters"].get("corrupt_file") == 1
    # the clicks of the lost impressions have no impression now: orphans, reported
    assert figures["examples"] > 0
    letters = [json.loads(line) for f in (tmp_path / "out" / "dead_letters").glob("*.jsonl")
               for line in f.read_text().splitlines()]
    assert any(letter["reason"] == "corrupt_file" and victim.name in letter["detail"] for letter in letters)


def test_live_mode_picks_up_new_files_in_the_watched_directory(tmp_path):
    import threading
    import time

    import pyarrow as pa
    import yaml

    from runners.beam_runner import run_job
    from runners.options import JobOptions, Mode
    from schemas.events import load_schema
    from schemas.log_writer import write_log
    from schemas.spec import parse_spec, spec_path

    raw = yaml.safe_load(spec_path("movielens").read_text())
    raw["join"]["window"] = "30s"
    spec = parse_spec(raw)
    logs = tmp_path / "logs"
    for kind in ("impressions", "actions"):
        (logs / kind).mkdir(parents=True)
    now = int(time.time() * 1000)
    impressions = pa.Table.from_pylist(
        [{"request_id": r, "user_id": "u", "item_id": "m", "event_time_ms": now + i, "position": 0, "age": 30,
          "gender": "F", "occupation": "x", "zip_code": "1", "release_year": 1990, "genres": ["Drama"]}
         for i, r in enumerate(["r1", "r2"])])
    actions = pa.Table.from_pylist([{"request_id": "r1", "item_id": "m", "user_id": "u", "action_type": "like",
                                     "event_time_ms": now + 500, "value": 1.0}])

    def producer():  # files appear while the job runs
        time.sleep(1.0)
        write_log(impressions, logs, "impressions", load_schema("movielens_impression"), "parquet")
        time.sleep(1.0)
        write_log(actions, logs, "actions", load_schema("action"), "avro")

    thread = threading.Thread(target=producer)
    thread.start()
    summary = run_job(spec, JobOptions(out=tmp_path / "out", logs=logs, mode=Mode.LIVE, watch_interval_s=0.5,
                                       stop_after_s=5))
    thread.join()
    assert summary["mode"] == "live" and summary["dead_letters"] == {}
    table = pq.read_table(sorted((tmp_path / "out" / "examples").glob("*.parquet")))
    assert sorted((r["request_id"], dict(r["labels"])["like"]) for r in table.to_pylist()) == [("r1", 1), ("r2", 0)]

"""The PyFlink job on a local mini-cluster: the same Examples as the Beam job, bad input to dead letters.

Each run is a ``streamrec join --runner flink`` process in its own process group (the driver
starts a JVM), stopped by its group id if it outlives its time limit.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]


def _run_flink_join(spec: str, logs: Path, out: Path, timeout_s: float = 300) -> dict:
    job = subprocess.Popen([sys.executable, "-m", "runners.cli", "join", "--runner", "flink", "--spec", spec,
                            "--logs", str(logs), "--out", str(out)], cwd=ROOT, start_new_session=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = job.communicate(timeout=timeout_s)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
        try:
            os.killpg(job.pid, signal.SIGKILL)  # a JVM left behind by the driver
        except ProcessLookupError:
            pass
    assert job.returncode == 0, stderr[-3000:]
    return json.loads(stdout.strip().splitlines()[-1])


def _examples(out: Path) -> pa.Table:
    table = pa.concat_tables([pq.read_table(path) for path in sorted((out / "examples").glob("*.parquet"))])
    return table.sort_by([("request_id", "ascending"), ("item_id", "ascending")])


def test_flink_and_beam_produce_identical_examples_and_bad_records_become_dead_letters(obd_logs, tmp_path):
    from runners.beam_runner import run_join
    from schemas.spec import load_spec

    source, manifest = obd_logs
    logs = tmp_path / "logs"
    shutil.copytree(source, logs)
    damaged = sorted((logs / "actions").glob("*"))[0]
    shutil.copy(damaged, damaged.with_name("zz-truncated" + damaged.suffix))
    truncated = damaged.with_name("zz-truncated" + damaged.suffix)
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])

    flink = _run_flink_join("obd", logs, tmp_path / "flink")
    beam = run_join(load_spec("obd"), logs, tmp_path / "beam", streaming=True)
    flink_examples, beam_examples = _examples(tmp_path / "flink"), _examples(tmp_path / "beam")
    assert flink_examples.num_rows > 500 and flink_examples.equals(beam_examples)
    assert flink["positives"] == manifest["actions"]["click"]
    assert flink["dead_letters"].get("corrupt_file") == beam["dead_letters"].get("corrupt_file") == 1


def test_job_runs_on_a_standalone_cluster_started_from_the_wheel(obd_logs, tmp_path):
    """A JobManager and a TaskManager from the wheel's bin/ on loopback (own process groups,
    stopped by group id); ``--flink-master`` submits through ``flink run``."""
    from runners.beam_runner import run_join
    from runners.flink_cluster import StandaloneCluster
    from schemas.spec import load_spec

    logs, _ = obd_logs
    cluster = StandaloneCluster(tmp_path / "cluster").start()
    processes = list(cluster.processes)
    try:
        job = subprocess.run([sys.executable, "-m", "runners.cli", "join", "--runner", "flink", "--flink-master",
                              cluster.master, "--spec", "obd", "--logs", str(logs), "--out", str(tmp_path / "remote")],
                             cwd=ROOT, start_new_session=True, capture_output=True, text=True, timeout=300)
        assert job.returncode == 0, job.stderr[-3000:]
        jobs = cluster.jobs()
        assert [j["state"] for j in jobs] == ["FINISHED"] and jobs[0]["name"] == "streamrec join obd"
    finally:
        cluster.stop()
    assert len(processes) == 2 and all(process.poll() is not None for process in processes)
    run_join(load_spec("obd"), logs, tmp_path / "beam", streaming=True)
    assert _examples(tmp_path / "remote").equals(_examples(tmp_path / "beam"))


def _committed(directory: Path, suffix: str) -> list[Path]:
    return sorted(directory.glob(f"part-*{suffix}"))


def test_killed_job_restarts_from_its_checkpoint_without_loss_or_duplicates(tmp_path):
    """The training job is SIGKILLed (its process group: driver, JVM, Python workers) after a
    checkpoint and a model snapshot; ``--resume`` restarts it from the newest retained checkpoint
    and snapshot. Every Example is written exactly once (the committed parts of the killed run
    plus the restarted run's) and trained exactly once."""
    import time

    from datasets.synthetic import SyntheticConfig, generate
    from runners.beam_runner import run_join
    from runners.flink_runner import newest_checkpoint
    from schemas.spec import load_spec
    from trainer.publish import read_manifest

    logs, out, model = tmp_path / "logs", tmp_path / "flink", tmp_path / "model"
    generate(logs, SyntheticConfig(events=60_000, span_hours=72, seed=1))  # snapshots daily: 2 mid-stream
    command = [sys.executable, "-m", "runners.cli", "run", "--runner", "flink", "--spec", "synthetic", "--logs",
               str(logs), "--out", str(out), "--model-dir", str(model), "--no-progress", "--checkpoint-every", "1",
               "--events-per-step", "2048"]
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(command, cwd=ROOT, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline and first.poll() is None:
                snapshots = [e for e in read_manifest(model) if e["kind"] == "snapshot"] if model.exists() else []
                if (len(snapshots) >= 2 and newest_checkpoint(out / ".checkpoints") is not None
                        and _committed(out / "examples", ".examples")):
                    break
                time.sleep(0.2)
            assert first.poll() is None, "the job ended before it could be killed: " + (tmp_path / "first.log").read_text()[-2000:]
        finally:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
    committed_before = sum(len(path.read_text().splitlines()) for path in _committed(out / "examples", ".examples"))
    assert committed_before > 0

    resumed = subprocess.Popen(command + ["--resume"], cwd=ROOT, start_new_session=True, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = resumed.communicate(timeout=300)
    finally:
        try:
            os.killpg(resumed.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert resumed.returncode == 0, stderr[-3000:]
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["restored_from_checkpoint"] and summary["resumed_from_version"] is not None

    run_join(load_spec("synthetic"), logs, tmp_path / "beam", streaming=True)
    flink_examples, beam_examples = _examples(out), _examples(tmp_path / "beam")
    assert flink_examples.num_rows == beam_examples.num_rows > 50_000  # no loss, no duplicates
    assert flink_examples.equals(beam_examples)
    assert summary["examples"] == beam_examples.num_rows  # each example trained once
    assert not (out / ".checkpoints").exists()  # a finished job leaves nothing to restore

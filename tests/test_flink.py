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

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _kill_group(job: subprocess.Popen) -> None:
    """SIGKILL a job's process group (driver, JVM, Python workers: a JVM the driver left behind) and reap it."""
    try:
        os.killpg(job.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    job.wait()


def _run_to_end(command: list[str], timeout_s: float = 300) -> dict:
    """Run a ``streamrec`` command in its own process group to its end (the group - driver, JVM,
    Python workers - is SIGKILLed afterwards or on timeout); returns its JSON summary."""
    job = subprocess.Popen(command, cwd=ROOT, start_new_session=True, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = job.communicate(timeout=timeout_s)
    finally:
        _kill_group(job)
    assert job.returncode == 0, stderr[-3000:]
    return json.loads(stdout.strip().splitlines()[-1])


def _run_flink_join(spec: str, logs: Path, out: Path, timeout_s: float = 300) -> dict:
    return _run_to_end([sys.executable, "-m", "runners.cli", "join", "--runner", "flink", "--spec", spec,
                        "--logs", str(logs), "--out", str(out)], timeout_s)


def _examples(out: Path) -> pa.Table:
    table = pa.concat_tables([pq.read_table(path) for path in sorted((out / "examples").glob("*.parquet"))])
    return table.sort_by([("request_id", "ascending"), ("item_id", "ascending")])


def test_flink_and_beam_produce_identical_examples_and_bad_records_become_dead_letters(obd_logs, tmp_path):
    from runners.beam_runner import run_job
    from runners.options import JobOptions, Mode
    from schemas.spec import load_spec

    source, manifest = obd_logs
    logs = tmp_path / "logs"
    shutil.copytree(source, logs)
    damaged = sorted((logs / "actions").glob("*"))[0]
    shutil.copy(damaged, damaged.with_name("zz-truncated" + damaged.suffix))
    truncated = damaged.with_name("zz-truncated" + damaged.suffix)
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])

    flink = _run_flink_join("obd", logs, tmp_path / "flink")
    beam = run_job(load_spec("obd"), JobOptions(out=tmp_path / "beam", logs=logs, mode=Mode.REPLAY))
    flink_examples, beam_examples = _examples(tmp_path / "flink"), _examples(tmp_path / "beam")
    assert flink_examples.num_rows > 500 and flink_examples.equals(beam_examples)
    assert flink["positives"] == manifest["actions"]["click"]
    assert flink["dead_letters"].get("corrupt_file") == beam["dead_letters"].get("corrupt_file") == 1


def test_job_runs_on_a_standalone_cluster_started_from_the_wheel(obd_logs, tmp_path):
    """A JobManager and a TaskManager from the wheel's bin/ on loopback (own process groups,
    stopped by group id); ``--flink-master`` submits through ``flink run``: the join, then a
    training job with two trainer workers."""
    from event_datasets.synthetic import SyntheticConfig, generate
    from runners.beam_runner import run_job
    from runners.flink_cluster import StandaloneCluster
    from runners.options import JobOptions, Mode
    from schemas.spec import load_spec
    from trainer.publish import read_manifest

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
        # two trainer workers of one model in the cluster's two slots (rendezvous and model
        # directory on a filesystem both see)
        generate(tmp_path / "synthetic", SyntheticConfig(events=20_000, span_hours=24, seed=1))
        train = subprocess.run([sys.executable, "-m", "runners.cli", "run", "--runner", "flink", "--flink-master",
                                cluster.master, "--trainers", "2", "--spec", "synthetic", "--logs",
                                str(tmp_path / "synthetic"), "--out", str(tmp_path / "trained"), "--model-dir",
                                str(tmp_path / "model"), "--no-progress"],
                               cwd=ROOT, start_new_session=True, capture_output=True, text=True, timeout=400)
        assert train.returncode == 0, train.stderr[-3000:]
        summary = json.loads(train.stdout.strip().splitlines()[-1])
        assert summary["trainer_workers"] == 2 and summary["examples_trained"] == summary["examples"] > 10_000
        assert [j["state"] for j in cluster.jobs()] == ["FINISHED", "FINISHED"]
        entries = read_manifest(tmp_path / "model")
        assert len(entries) > 3 and all(entry["shards"] == 2 for entry in entries)
    finally:
        cluster.stop()
    assert len(processes) == 2 and all(process.poll() is not None for process in processes)
    run_job(load_spec("obd"), JobOptions(out=tmp_path / "beam", logs=logs, mode=Mode.REPLAY))
    assert _examples(tmp_path / "remote").equals(_examples(tmp_path / "beam"))


def _committed(directory: Path, suffix: str) -> list[Path]:
    return sorted(directory.glob(f"part-*{suffix}"))


def _kill_after_a_checkpoint_and_two_snapshots(command: list[str], out: Path, model: Path, log_path: Path) -> None:
    """Start a training job in its own process group and SIGKILL the group once it has two model
    snapshots, a completed checkpoint and committed Examples, and has not finished training."""
    import time

    from runners.flink_runner import newest_checkpoint
    from trainer.publish import read_manifest

    with open(log_path, "w") as log:
        first = subprocess.Popen(command, cwd=ROOT, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline and first.poll() is None:
                snapshots = [e for e in read_manifest(model) if e["kind"] == "snapshot"] if model.exists() else []
                if (len(snapshots) >= 2 and newest_checkpoint(out / ".checkpoints") is not None
                        and _committed(out / "examples", ".examples")):
                    break
                time.sleep(0.2)
            assert first.poll() is None, "the job ended before it could be killed: " + log_path.read_text()[-2000:]
        finally:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
    finished = [line for path in _committed(out / "metrics", ".jsonl") for line in path.read_text().splitlines()
                if json.loads(line).get("final")]
    assert not finished, "the trainer had finished before the kill: nothing left to resume"


@pytest.mark.parametrize("parallelism, trainers", [(1, 1), (2, 1), (1, 2)])
def test_killed_job_restarts_from_its_checkpoint_without_loss_or_duplicates(tmp_path, parallelism, trainers):
    """The training job (at parallelism 2: two split and join instances feeding the one trainer;
    with 2 trainers: one model trained by two workers, each publishing its shard) is SIGKILLed (its process group: driver, JVM, Python workers) after a
    checkpoint and a model snapshot; ``--resume`` restarts it from the newest retained checkpoint
    and snapshot. Every Example is written exactly once (the committed parts of the killed run
    plus the restarted run's) and trained exactly once."""

    from event_datasets.synthetic import SyntheticConfig, generate
    from runners.beam_runner import run_job
    from runners.options import JobOptions, Mode
    from schemas.spec import load_spec

    logs, out, model = tmp_path / "logs", tmp_path / "flink", tmp_path / "model"
    generate(logs, SyntheticConfig(events=80_000, span_hours=96, seed=1))  # snapshots daily: 3 mid-stream
    command = [sys.executable, "-m", "runners.cli", "run", "--runner", "flink", "--spec", "synthetic", "--logs",
               str(logs), "--out", str(out), "--model-dir", str(model), "--no-progress", "--checkpoint-every", "1",
               "--events-per-step", "2048", "--parallelism", str(parallelism), "--trainers", str(trainers)]
    _kill_after_a_checkpoint_and_two_snapshots(command, out, model, tmp_path / "first.log")
    committed_before = sum(len(path.read_text().splitlines()) for path in _committed(out / "examples", ".examples"))
    assert committed_before > 0

    summary = _run_to_end(command + ["--resume"])
    assert summary["restored_from_checkpoint"] and summary["resumed_from_version"] is not None
    assert summary["trainer_workers"] == trainers

    run_job(load_spec("synthetic"), JobOptions(out=tmp_path / "beam", logs=logs, mode=Mode.REPLAY))
    flink_examples, beam_examples = _examples(out), _examples(tmp_path / "beam")
    assert flink_examples.num_rows == beam_examples.num_rows > 50_000  # no loss, no duplicates
    assert flink_examples.equals(beam_examples)
    assert summary["examples"] == beam_examples.num_rows  # each example trained once
    assert summary["out_of_order_examples"] == 0  # and in the trainer's order
    assert not (out / ".checkpoints").exists()  # a finished job leaves nothing to restore


def _live_spec(tmp_path: Path, window: str) -> Path:
    import yaml

    from schemas.spec import spec_path

    raw = yaml.safe_load(spec_path("movielens").read_text())
    raw["join"]["window"] = window
    path = tmp_path / "live.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _write_live_logs(logs: Path, requests: list[str], time_ms: int, liked: set[str], name: str) -> None:
    """Impressions of ``requests`` at ``time_ms`` (+ i ms) and a like 1 s later for ``liked``,
    written beside ``logs`` and moved in whole (a running announcer sees each file once)."""
    from schemas.events import load_schema
    from schemas.log_writer import write_log

    impressions = pa.Table.from_pylist(
        [{"request_id": r, "user_id": "u", "item_id": "m", "event_time_ms": time_ms + i, "position": 0, "age": 30,
          "gender": "F", "occupation": "x", "zip_code": "1", "release_year": 1990, "genres": ["Drama"]}
         for i, r in enumerate(requests)])
    actions = pa.Table.from_pylist([{"request_id": r, "item_id": "m", "user_id": "u", "action_type": "like",
                                     "event_time_ms": time_ms + 1000, "value": 1.0} for r in requests if r in liked])
    staging = logs.parent / f"staging-{name}"
    for kind, table, schema in (("impressions", impressions, "movielens_impression"), ("actions", actions, "action")):
        (logs / kind).mkdir(parents=True, exist_ok=True)
        for path in write_log(table, staging, kind, load_schema(schema), "avro"):
            path.rename(logs / kind / f"{name}-{path.name}")


def test_live_job_reads_log_files_as_they_appear_and_drains_when_stopped(tmp_path):
    """``run --runner flink --watch``: log files written while the job runs (some before it
    starts, more and a truncated one after) are read; on SIGTERM every announced file is read,
    the draining stop closes every window, the trainer trains the rest and the sinks commit."""
    import time

    spec, logs, out = _live_spec(tmp_path, "30s"), tmp_path / "logs", tmp_path / "out"
    _write_live_logs(logs, ["r1", "r2", "r3"], int(time.time() * 1000), {"r1"}, "a")
    job = subprocess.Popen([sys.executable, "-m", "runners.cli", "run", "--runner", "flink", "--spec", str(spec),
                            "--logs", str(logs), "--out", str(out), "--watch", "0.5",
                            "--checkpoint-every", "2", "--no-progress"],
                           cwd=ROOT, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not list((out / ".live" / "announced").glob("*.tsv")) and time.monotonic() < deadline and job.poll() is None:
            time.sleep(0.2)
        time.sleep(1.0)  # files that appear after the job started
        _write_live_logs(logs, ["r4", "r5"], int(time.time() * 1000), {"r4"}, "b")
        good = sorted((logs / "actions").glob("b-*"))[0]
        truncated = tmp_path / "zz-truncated.avro"
        truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
        truncated.rename(good.with_name(truncated.name))
        time.sleep(2.0)  # announced
        job.send_signal(signal.SIGTERM)  # the driver: a graceful, draining stop
        stdout, stderr = job.communicate(timeout=240)
    finally:
        _kill_group(job)
    assert job.returncode == 0, stderr[-3000:]
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["mode"] == "flink live" and summary["examples"] == 5  # joined and trained
    assert summary["dead_letters"] == {"corrupt_file": 1}
    table = _examples(out)
    assert [(r["request_id"], dict(r["labels"])["like"]) for r in table.to_pylist()] == [
        ("r1", 1), ("r2", 0), ("r3", 0), ("r4", 1), ("r5", 0)]
    assert not (out / ".live").exists() and not (out / ".checkpoints").exists()


def test_killed_live_job_resumes_from_its_checkpoint_and_reads_what_came_meanwhile(tmp_path):
    """Live: logs A are read, joined and committed; the job is SIGKILLed (process group); logs B
    appear while it is down; ``--resume`` restores the checkpoint (source position, join state),
    reads B and drains: every impression of A and B becomes exactly one Example, labels right."""
    import time

    spec, logs, out = _live_spec(tmp_path, "5s"), tmp_path / "logs", tmp_path / "out"
    now = int(time.time() * 1000) + 30_000  # event times ahead of the clock: the job starts in time
    first = [f"a{i:02d}" for i in range(40)]
    _write_live_logs(logs, first, now, set(first[::3]), "a")
    command = [sys.executable, "-m", "runners.cli", "join", "--runner", "flink", "--spec", str(spec), "--logs",
               str(logs), "--out", str(out), "--watch", "0.5", "--checkpoint-every", "1"]
    with open(tmp_path / "first.log", "w") as log:
        job = subprocess.Popen(command, cwd=ROOT, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and job.poll() is None and not _committed(out / "examples", ".examples"):
                time.sleep(0.2)
            assert job.poll() is None and _committed(out / "examples", ".examples"), (tmp_path / "first.log").read_text()[-2000:]
        finally:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    second = [f"b{i:02d}" for i in range(40)]
    _write_live_logs(logs, second, int(time.time() * 1000), set(second[::4]), "b")
    summary = _run_to_end(command + ["--resume", "--stop-after", "3"], 240)
    assert summary["restored_from_checkpoint"] and summary["dead_letters"] == {}
    labels = {r["request_id"]: dict(r["labels"])["like"] for r in _examples(out).to_pylist()}
    assert _examples(out).num_rows == len(labels) == 80  # no loss, no duplicates
    assert labels == {r: int(r in set(first[::3]) | set(second[::4])) for r in first + second}


def test_local_jobs_start_their_jvm_from_a_class_data_sharing_archive(monkeypatch):
    from runners.flink_cds import archive_works, build
    from runners.flink_runner import _jvm_environment

    path = build()  # (``make test`` has built it; then this returns at once)
    assert path.is_file() and archive_works(path)  # -Xshare:on: the JVM maps it or fails
    monkeypatch.delenv("JVM_ARGS", raising=False)
    monkeypatch.delenv("_python_worker_execution_mode", raising=False)  # (restored afterwards)
    _jvm_environment()
    assert f"-XX:SharedArchiveFile={path}" in os.environ["JVM_ARGS"].split()
    monkeypatch.setenv("JVM_ARGS", "-Xmx1g")  # a user's own JVM_ARGS win
    _jvm_environment()
    assert os.environ["JVM_ARGS"] == "-Xmx1g"


def test_two_trainer_workers_on_flink_train_the_single_worker_model(tmp_path):
    """``run --runner flink --trainers 2`` with per-worker batch b ends with the progressive
    metrics of one worker with batch 2b (same Examples, each trained once, same order), and its
    published model (each version in two shards' parts) serves the same predictions."""
    import yaml

    from event_datasets.synthetic import SyntheticConfig
    from event_datasets.synthetic import generate as generate_logs
    from schemas.spec import spec_path
    from serving.model import ServingModel

    logs = tmp_path / "logs"
    generate_logs(logs, SyntheticConfig(events=12_000, span_hours=6, seed=2))
    specs = {}
    for name, batch in (("one", 128), ("two", 64)):
        raw = yaml.safe_load(spec_path("synthetic").read_text())
        raw.setdefault("training", {}).update(batch_size=batch, sequential_updates=False)
        specs[name] = tmp_path / f"{name}.yaml"
        specs[name].write_text(yaml.safe_dump(raw))
    base = [sys.executable, "-m", "runners.cli", "run", "--runner", "flink", "--logs", str(logs), "--no-progress"]
    one = _run_to_end(base + ["--spec", str(specs["one"]), "--out", str(tmp_path / "one"),
                              "--model-dir", str(tmp_path / "model-one")])
    two = _run_to_end(base + ["--spec", str(specs["two"]), "--out", str(tmp_path / "two"), "--trainers", "2",
                              "--model-dir", str(tmp_path / "model-two")])
    assert two["trainer_workers"] == 2 and one["trainer_workers"] == 1
    assert two["examples"] == one["examples"] > 5_000 and two["out_of_order_examples"] == 0
    assert round(two["auc"], 4) == round(one["auc"], 4)
    assert two["logloss"] == pytest.approx(one["logloss"], rel=1e-5)
    windows = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
               for name in ("one", "two")}
    assert len(windows["two"]) == len(windows["one"]) == two["metric_windows"] > 3  # rows of one model, once
    for a, b in zip(windows["one"], windows["two"]):
        assert (a["window_start_ms"], a["examples"]) == (b["window_start_ms"], b["examples"])
        assert round(a["auc"], 4) == round(b["auc"], 4)
    served = [ServingModel(tmp_path / name) for name in ("model-one", "model-two")]
    for model in served:
        model.refresh()
    assert served[1].version == served[0].version > 2
    examples = _examples(tmp_path / "one").slice(0, 400)
    np.testing.assert_allclose(served[1].model.predict_features(examples.column("fids"), examples.column("dense")),
                               served[0].model.predict_features(examples.column("fids"), examples.column("dense")),
                               rtol=1e-4, atol=1e-5)


def test_several_trainer_workers_are_refused_where_they_cannot_run(tmp_path, capsys):
    from runners.cli import main

    code = main(["run", "--spec", "synthetic", "--logs", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--trainers", "2", "--runner", "beam"])
    assert code != 0 and "need --runner flink" in capsys.readouterr().err


_KEY_GROUPS_JOB = """
import json, sys
from pyflink.common import Types
from pyflink.datastream import KeyedProcessFunction
from runners.flink_runner import flink_environment

class Where(KeyedProcessFunction):
    def open(self, context):
        self.index = context.get_index_of_this_subtask()
    def process_element(self, value, ctx):
        yield json.dumps([value[0], self.index])

parallelism, keys = int(sys.argv[1]), int(sys.argv[2])
env = flink_environment(1)
stream = env.from_collection([(k, "x") for k in range(keys)], type_info=Types.TUPLE([Types.INT(), Types.STRING()]))
out = (stream.key_by(lambda v: v[0], key_type=Types.INT()).process(Where(), output_type=Types.STRING())
       .set_parallelism(parallelism).set_max_parallelism(128))
with out.execute_and_collect() as results:
    print(json.dumps(dict(json.loads(r) for r in results)))
"""


def test_the_trainer_copies_keys_reach_the_subtasks_flink_assigns_them():
    """``flink_records.subtask_of_key`` models PyFlink's key-group assignment; a real job says where
    each key went (the trainer workers' copies depend on it)."""
    from pipelines.flink_records import subtask_keys, subtask_of_key

    placed = {int(key): subtask for key, subtask in _run_to_end([sys.executable, "-c", _KEY_GROUPS_JOB, "3", "40"],
                                                                 180).items()}
    assert placed == {key: subtask_of_key(key, 3, 128) for key in range(40)}
    assert [placed[key] for key in subtask_keys(3, 128)] == [0, 1, 2]


def test_a_killed_trainer_worker_is_restarted_by_flink_from_the_snapshot_and_checkpoint(tmp_path):
    """SIGKILL one trainer worker's Python process (its pid from OUT/.rendezvous) of a K=2 job:
    Flink restarts the job from its checkpoint, every worker resumes from its shard of the newest
    snapshot, and the job ends by itself with every Example trained once, in order."""
    import time

    from event_datasets.synthetic import SyntheticConfig, generate
    from trainer.publish import read_manifest

    logs, out, model = tmp_path / "logs", tmp_path / "flink", tmp_path / "model"
    generate(logs, SyntheticConfig(events=80_000, span_hours=96, seed=1))
    command = [sys.executable, "-m", "runners.cli", "run", "--runner", "flink", "--spec", "synthetic", "--logs",
               str(logs), "--out", str(out), "--model-dir", str(model), "--no-progress", "--checkpoint-every", "1",
               "--events-per-step", "2048", "--trainers", "2"]
    job = subprocess.Popen(command, cwd=ROOT, start_new_session=True, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        deadline, killed = time.monotonic() + 240, None
        while time.monotonic() < deadline and job.poll() is None and killed is None:
            snapshots = [e for e in read_manifest(model) if e["kind"] == "snapshot"] if model.exists() else []
            pid_file = out / ".rendezvous" / "trainer-1.pid"
            if len(snapshots) >= 2 and _checkpointed(out) and pid_file.is_file():
                killed = int(pid_file.read_text())
                os.kill(killed, signal.SIGKILL)  # one worker's Python process, by its id
            time.sleep(0.2)
        assert killed is not None, "the job ended before a worker could be killed"
        stdout, stderr = job.communicate(timeout=300)
    finally:
        _kill_group(job)
    assert job.returncode == 0, stderr[-3000:]
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["resumed_from_version"] is not None  # the restarted workers came from a snapshot
    assert summary["examples"] == _examples(out).num_rows > 50_000  # each Example trained once
    assert summary["out_of_order_examples"] == 0


def _checkpointed(out: Path) -> bool:
    from runners.flink_runner import newest_checkpoint

    return newest_checkpoint(out / ".checkpoints") is not None

"""Join + negative sampling + feature extraction throughput on the same synthetic logs.

* ``pure_events_per_s``: the pure logic (transforms/) in a plain loop over micro-batches: the
  columnar join (``BatchJoiner``), sampling, features extracted on Arrow batches;
* ``naive_events_per_s`` (baseline): the same job written the obvious way - records as dicts,
  a dict join, and every feature value hashed one by one;
* ``beam_batch_events_per_s``: ``streamrec backfill`` on Beam's DirectRunner (reading included);
* ``beam_stream_events_per_s``: ``streamrec join --streaming`` (replay on the streaming DirectRunner);
* with ``--runner flink``: ``flink_events_per_s``, the PyFlink job (``join --runner flink``, local
  mini-cluster, its default parallelism) as a process from start to exit, and ``flink_p2_events_per_s`` at
  parallelism 2, with Beam streaming (``join --streaming``, also its own process) on the same logs
  in the same run (``flink_vs_beam_stream``); each job's start and stop are measured on a
  200-impression log (``flink_job_startup_s``, ``beam_stream_startup_s``), and the rates after
  start-up compare the sustained throughput (``flink_vs_beam_stream_after_startup``).

* with ``--runner flink --source kafka``: the same logs produced into Kafka topics of a Tansu
  broker started here (``streamrec produce``), then ``join --runner flink --source kafka://...``
  (bounded at the producer's end offsets) beside ``join --runner flink --logs`` (the file replay)
  in the same run, each its own process; ``kafka_events_per_s_after_startup`` and
  ``file_events_per_s_after_startup`` take each job's start and stop (a 200-impression run the
  same way) off (None when a job's run is within 0.5 s of that); ``kafka_vs_file`` is the ratio
  of the start-to-exit rates, ``kafka_vs_file_after_startup`` of the sustained ones. The full run
  repeats the four jobs in 3 rounds and reports medians (``--repeats``).

Events = impressions + actions. Reading the logs is outside the pure/naive timings.

    python -m bench.pipeline [--quick] [--impressions N] [--runner flink [--source kafka]]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa

from event_datasets.synthetic import SyntheticConfig, generate
from schemas.spec import load_spec
from transforms.batch_join import join_tables
from transforms.examples import ExampleBuilder
from transforms.join import JoinConfig
from transforms.log_examples import read_events
from transforms.sampling import NegativeSampler

BATCH = 32_768  # micro-batch rows: per-batch work grows with the open window, so bigger batches amortise it


def pure(spec, impressions: pa.Table, actions: pa.Table) -> tuple[float, int]:
    """Micro-batches of impressions (and the actions up to the next batch) through the columnar
    join (``join_tables``), then sampling and feature extraction on the closed impressions."""
    started = time.perf_counter()
    builder = ExampleBuilder(spec)
    batches = join_tables(JoinConfig.from_spec(spec), impressions, actions, BATCH)
    ordered = next(batches)
    examples = 0
    for closed, _ in batches:
        table, _ = builder.build_closed(ordered, closed)
        examples += table.num_rows
    return time.perf_counter() - started, examples


def naive(spec, impressions: pa.Table, actions: pa.Table) -> tuple[float, int]:
    """The obvious version: dict records, dict join at the end, per-value hashing."""
    started = time.perf_counter()
    records = impressions.to_pylist()
    actions = actions.to_pylist()
    clicks: dict[tuple, int] = {}
    for a in actions:
        clicks.setdefault((a["request_id"], a["item_id"]), a["event_time_ms"])
    sampler = NegativeSampler(spec.sampling.negative_rate, spec.sampling.seed)
    window = spec.join.window_ms
    examples = 0
    for record in records:
        t_action = clicks.get((record["request_id"], record["item_id"]))
        positive = t_action is not None and t_action - record["event_time_ms"] <= window
        keep, _ = sampler.decide(record["request_id"], record["item_id"], positive)
        if not keep:
            continue
        fids = []
        for slot in spec.slots:
            value = record.get(slot.source[0])
            digest = hashlib.blake2b(str(value).encode(), digest_size=8).digest()
            fids.append((slot.slot_id << 48) | (int.from_bytes(digest, "little") & ((1 << 48) - 1)))
        examples += 1
    return time.perf_counter() - started, examples


def beam_run(spec, logs: Path, out: Path, streaming: bool) -> float:
    from runners.beam_runner import run_job
    from runners.options import JobOptions, Mode

    started = time.perf_counter()
    run_job(spec, JobOptions(out=out, logs=logs, mode=Mode.REPLAY if streaming else Mode.BACKFILL))
    return time.perf_counter() - started


def _per_s(events: int, seconds: float | None) -> int | None:
    return None if seconds is None else round(events / seconds)


def _after_startup(total_s: float, startup_s: float) -> float | None:
    """A run's seconds with its job's start and stop taken off; None where that is within half a
    second (no sustained rate to see above the noise)."""
    return total_s - startup_s if total_s - startup_s > 0.5 else None


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return None if numerator is None or not denominator else round(numerator / denominator, 2)


def cli_run(args: list[str], timeout_s: float = 600) -> tuple[float, dict]:
    """Seconds of one ``streamrec ARGS`` process, start to exit (in its own process group, killed
    afterwards: the driver's JVM goes with it), and its JSON summary."""
    started = time.perf_counter()
    job = subprocess.Popen([sys.executable, "-m", "runners.cli", *args], start_new_session=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = job.communicate(timeout=timeout_s)
    finally:
        try:
            os.killpg(job.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    seconds = time.perf_counter() - started
    if job.returncode != 0:
        raise RuntimeError(f"streamrec {' '.join(args)} failed: {stderr[-2000:]}")
    return seconds, json.loads(stdout.strip().splitlines()[-1])


def flink_run(logs: Path, out: Path, parallelism: int | None = None) -> tuple[float, dict[str, float]]:
    """Seconds of ``streamrec join --runner flink`` as a user runs it (its own process: Python and
    JVM start, mini-cluster start and stop included) and the Python operators' busy seconds
    (``join``: the time spent in our code, state access included)."""
    extra = [] if parallelism is None else ["--parallelism", str(parallelism)]
    seconds, summary = cli_run(["join", "--runner", "flink", "--spec", "synthetic", "--logs", str(logs),
                                "--out", str(out), *extra])
    return seconds, summary["python_busy_s"]


def kafka_figures(spec, logs: Path, tmp: Path, events: int, pure_s: float, repeats: int = 1) -> dict:
    """The Flink job reading Kafka beside the file replay, on the same logs in the same run. With
    ``repeats``, the four jobs (Kafka and file, each on the tiny and the main logs) run that many
    rounds one after another; every figure is the median over the rounds and ``rounds`` lists
    each round's sustained rates (the machine's noise is a second or two on a 20 s job)."""
    import statistics

    from runners.kafka_broker import KafkaBroker
    from runners.produce import produce_logs

    tiny = tmp / "tiny"
    generate(tiny, SyntheticConfig(events=200, seed=4, span_hours=0.1))
    broker = KafkaBroker(tmp / "broker").start()
    try:
        sources, produce_rates, rounds = {}, {}, []
        for name, log_dir in (("tiny", tiny), ("main", logs)):
            topics = {"impressions": f"{name}-impressions", "actions": f"{name}-actions"}
            produced = produce_logs(spec, log_dir, broker.bootstrap, topics)
            offsets = tmp / f"{name}-offsets.json"
            offsets.write_text(json.dumps(produced))
            produce_rates[name] = produced["events_per_s"]
            sources[name] = (f"kafka://{broker.bootstrap}?impressions={topics['impressions']}"
                             f"&actions={topics['actions']}&until={offsets}")
        for round_ in range(repeats):
            runs = {}
            for name, log_dir in (("tiny", tiny), ("main", logs)):
                out = tmp / f"round{round_}"
                # (a consumer group of its own per round: a group's committed offsets are its start)
                runs[name] = {"kafka": cli_run(["join", "--runner", "flink", "--spec", "synthetic", "--source",
                                                f"{sources[name]}&group=bench-{name}-{round_}",
                                                "--out", str(out / f"kafka-{name}")]),
                              "file": cli_run(["join", "--runner", "flink", "--spec", "synthetic", "--logs",
                                               str(log_dir), "--out", str(out / f"file-{name}")])}
            rounds.append(_kafka_round(runs, events))
    finally:
        broker.stop()

    def median(key: str):
        values = [r[key] for r in rounds if r[key] is not None]
        return None if not values else round(statistics.median(values), 2)

    figures = {"benchmark": "pipeline", "runner": "flink", "source": "kafka", "events": events,
               "pure_events_per_s": round(events / pure_s), "produce_events_per_s": produce_rates["main"],
               "repeats": repeats}
    figures.update({key: median(key) for key in rounds[0] if key not in ("python_busy_s", "same_example_count")})
    for key in ("kafka_events_per_s", "file_events_per_s", "kafka_events_per_s_after_startup",
                "file_events_per_s_after_startup"):
        figures[key] = None if figures[key] is None else round(figures[key])
    figures["kafka_python_busy_s"] = rounds[len(rounds) // 2]["python_busy_s"]["kafka"]
    figures["file_python_busy_s"] = rounds[len(rounds) // 2]["python_busy_s"]["file"]
    figures["same_example_count"] = all(r["same_example_count"] for r in rounds)
    figures["rounds_after_startup"] = [[r["kafka_events_per_s_after_startup"], r["file_events_per_s_after_startup"]]
                                       for r in rounds]
    print(f"Flink from Kafka {figures['kafka_events_per_s']:,} events/s ({figures['kafka_events_per_s_after_startup']}/s "
          f"after its {figures['kafka_job_startup_s']} s start+stop), file replay {figures['file_events_per_s']:,}/s "
          f"({figures['file_events_per_s_after_startup']}/s after start-up): {figures['kafka_vs_file_after_startup']}x; "
          f"produced at {figures['produce_events_per_s']:,}/s; medians of {repeats} round(s), sustained "
          f"(Kafka, file) per round: {figures['rounds_after_startup']}")
    print(json.dumps(figures))
    return figures


def _kafka_round(runs: dict, events: int) -> dict:
    """One round's figures from its four runs (``runs[tiny|main][kafka|file]``: seconds, summary)."""
    main_run, tiny_run = runs["main"], runs["tiny"]
    kafka_s, file_s = main_run["kafka"][0], main_run["file"][0]
    kafka_after, file_after = _after_startup(kafka_s, tiny_run["kafka"][0]), _after_startup(file_s, tiny_run["file"][0])
    return {"kafka_events_per_s": events / kafka_s, "file_events_per_s": events / file_s,
            "kafka_job_startup_s": tiny_run["kafka"][0], "file_job_startup_s": tiny_run["file"][0],
            "kafka_events_per_s_after_startup": _per_s(events, kafka_after),
            "file_events_per_s_after_startup": _per_s(events, file_after),
            "kafka_vs_file": file_s / kafka_s, "kafka_vs_file_after_startup": _ratio(file_after, kafka_after),
            "python_busy_s": {"kafka": main_run["kafka"][1]["python_busy_s"],
                              "file": main_run["file"][1]["python_busy_s"]},
            "same_example_count": main_run["kafka"][1]["examples"] == main_run["file"][1]["examples"]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="60k impressions (under a minute)")
    parser.add_argument("--impressions", type=int, default=None,
                        help="impressions in the synthetic logs (default 300k over 2 h of event time; 60k with "
                             "--quick); N spans N/300k x 2 h, so the event rate, and the open join window, stay")
    parser.add_argument("--runner", choices=("beam", "flink"), default="beam",
                        help="flink: also the PyFlink job (local mini-cluster) on the same logs, with Beam streaming")
    parser.add_argument("--source", choices=("files", "kafka"), default="files",
                        help="with --runner flink: kafka compares the job reading Kafka topics with the file replay")
    parser.add_argument("--repeats", type=int, default=None,
                        help="with --source kafka: rounds of the four jobs, medians reported (default 1 quick, 3 full)")
    args = parser.parse_args(argv)
    logging.getLogger("apache_beam").setLevel(logging.ERROR)
    n = args.impressions or (60_000 if args.quick else 300_000)
    spec = load_spec("synthetic")
    with tempfile.TemporaryDirectory() as tmp:
        logs = Path(tmp) / "logs"
        span_hours = 2.0 if args.impressions is None else 2.0 * n / 300_000
        manifest = generate(logs, SyntheticConfig(events=n, seed=4, span_hours=span_hours))
        events = manifest["impressions"] + manifest["actions"]["click"]
        impressions, actions = read_events(spec, logs)
        pure_s, pure_examples = pure(spec, impressions, actions)
        if args.runner == "flink" and args.source == "kafka":
            return kafka_figures(spec, logs, Path(tmp), events, pure_s, args.repeats or (1 if args.quick else 3))
        if args.runner == "flink":
            from runners.flink_runner import DEFAULT_PARALLELISM

            tiny = Path(tmp) / "tiny"
            generate(tiny, SyntheticConfig(events=200, seed=4, span_hours=0.1))
            startup_s, _ = flink_run(tiny, Path(tmp) / "flink-tiny")  # start and stop, ~no data
            flink_s, busy = flink_run(logs, Path(tmp) / "flink")
            flink2_s, _ = flink_run(logs, Path(tmp) / "flink2", parallelism=2)
            # Beam streaming the same way: its own process, Python start included
            stream_args = ["join", "--streaming", "--spec", "synthetic", "--out"]
            stream_startup_s, _ = cli_run([*stream_args, str(Path(tmp) / "stream-tiny"), "--logs", str(tiny)])
            stream_s, _ = cli_run([*stream_args, str(Path(tmp) / "stream"), "--logs", str(logs)])
            processing_s, stream_processing_s = _after_startup(flink_s, startup_s), _after_startup(stream_s, stream_startup_s)
            figures = {"benchmark": "pipeline", "runner": "flink", "events": events,
                       "pure_events_per_s": round(events / pure_s),
                       "flink_events_per_s": round(events / flink_s),
                       "flink_job_startup_s": round(startup_s, 2),
                       "flink_events_per_s_after_startup": _per_s(events, processing_s),
                       # the JVM/Python split of the time after start-up: our Python code (state
                       # access included) vs the rest (JVM, transport between JVM and Python workers)
                       "flink_python_busy_s": busy,
                       "flink_python_share": _ratio(sum(busy.values()), processing_s),
                       "flink_parallelism": DEFAULT_PARALLELISM,
                       "flink_p2_events_per_s": round(events / flink2_s),
                       "beam_stream_events_per_s": round(events / stream_s),
                       "flink_vs_beam_stream": round(stream_s / flink_s, 2),
                       "flink_p2_vs_beam_stream": round(stream_s / flink2_s, 2),
                       # sustained rates: each job's own start and stop (on the tiny log) taken off
                       "beam_stream_startup_s": round(stream_startup_s, 2),
                       "beam_stream_events_per_s_after_startup": _per_s(events, stream_processing_s),
                       "flink_vs_beam_stream_after_startup": _ratio(stream_processing_s, processing_s)}
            print(f"PyFlink {figures['flink_events_per_s']:,} events/s ({figures['flink_vs_beam_stream']}x Beam "
                  f"streaming at {figures['beam_stream_events_per_s']:,}/s); job start+stop {startup_s:.1f} s; "
                  f"after start-up {figures['flink_events_per_s_after_startup']}/s "
                  f"({figures['flink_vs_beam_stream_after_startup']}x Beam's "
                  f"{figures['beam_stream_events_per_s_after_startup']}/s)")
            print(json.dumps(figures))
            return figures
        naive_s, naive_examples = naive(spec, impressions, actions)
        batch_s = beam_run(spec, logs, Path(tmp) / "batch", streaming=False)
        stream_s = beam_run(spec, logs, Path(tmp) / "stream", streaming=True)
    figures = {
        "benchmark": "pipeline",
        "events": events,
        "examples": pure_examples,
        "pure_events_per_s": round(events / pure_s),
        "naive_events_per_s": round(events / naive_s),
        "pure_vs_naive": round(naive_s / pure_s, 2),
        "beam_batch_events_per_s": round(events / batch_s),
        "beam_stream_events_per_s": round(events / stream_s),
    }
    print(f"pure {figures['pure_events_per_s']:,} events/s ({figures['pure_vs_naive']}x the naive loop), "
          f"Beam batch {figures['beam_batch_events_per_s']:,}/s, Beam streaming {figures['beam_stream_events_per_s']:,}/s")
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()

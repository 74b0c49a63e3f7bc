"""The ``streamrec`` command line.

    streamrec validate SPEC
    streamrec data movielens --out DIR
    streamrec data obd --out DIR [--policy random|bts] [--campaign all|men|women]
    streamrec data synthetic --out DIR --events N --seed S
    streamrec logs check DIR --spec SPEC
    streamrec join --spec SPEC --logs DIR --out DIR [--streaming | --watch SECONDS [--stop-after SECONDS]]
    streamrec join --runner flink [--flink-master HOST:PORT] [--resume] [--watch S [--stop-after S]] --spec SPEC --logs DIR --out DIR
    streamrec join|run --runner flink --source kafka://HOST:PORT[?impressions=T&actions=T&until=U] --spec SPEC --out DIR
    streamrec backfill --spec SPEC --logs DIR --out DIR
    streamrec run [--spec SPEC --logs DIR] --out DIR [--device cpu|cuda] [--streaming | --watch S]
                  [--model-dir DIR [--resume]] [--store redis://HOST:PORT[,...]] [--runner flink ...]
                  [--backfill-until TIME [--backfill-epochs N --backfill-scale S]]
    streamrec serve --model-dir DIR [--host 127.0.0.1 --port N --poll S --fp16 --store URI
                    --max-body-bytes B --max-impressions N]
    streamrec produce --spec SPEC --logs DIR --bootstrap HOST:PORT [--topics I,A] [--partitions N] [--rate N]
    streamrec experiment sync-interval|batch-then-online|shard-loss|cowclip-batch [--spec SPEC --logs DIR] --out DIR [--quick]
    streamrec table-stats SNAPSHOT

Commands print a human summary and, as their last line, a JSON object with the figures.
Exit codes: 0 success, 1 invalid input (spec errors, dead letters in checked logs), 2 usage.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from experiments import EXPERIMENTS
from runners.options import JobOptions


def _print_json(figures: dict) -> None:
    """The last line of every command: one JSON object (strict: no NaN)."""
    from trainer.report import json_safe

    print(json.dumps(json_safe(figures), sort_keys=True, allow_nan=False))


def cmd_validate(args: argparse.Namespace) -> int:
    from schemas.spec import load_spec

    spec = load_spec(args.spec)  # a SpecError lists every problem; main() prints it and exits 1
    print(spec.summary())
    _print_json({"spec": spec.name, "valid": True, "slots": len(spec.slots), "dense": len(spec.dense),
                 "bytes_per_row": spec.bytes_per_row_by_slot})
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    if args.dataset == "movielens":
        from event_datasets import movielens

        manifest = movielens.convert(args.out, seed=args.seed, fmt=args.format or "avro")
    elif args.dataset == "obd":
        from event_datasets import obd

        manifest = obd.convert(args.out, policy=args.policy, campaign=args.campaign, seed=args.seed,
                               fmt=args.format or "avro")
    else:
        from event_datasets.synthetic import SyntheticConfig, generate

        config = SyntheticConfig(events=args.events, seed=args.seed, span_hours=args.span_hours,
                                 drift=args.drift, target_ctr=args.ctr)
        manifest = generate(args.out, config, fmt=args.format or "parquet")
    elapsed = time.perf_counter() - started
    events = manifest["impressions"] + sum(manifest["actions"].values())
    print(f"wrote {manifest['impressions']} impressions and {manifest['actions']} actions "
          f"({manifest['files']['impressions']} + {manifest['files']['actions']} files) to {args.out} "
          f"in {elapsed:.1f} s")
    if "teacher_auc" in manifest:
        print(f"best achievable AUC (the hidden teacher's): {manifest['teacher_auc']:.4f}")
    _print_json({"dataset": manifest["dataset"], "impressions": manifest["impressions"],
                 "actions": manifest["actions"], "events_per_s": round(events / elapsed),
                 **({"teacher_auc": manifest["teacher_auc"]} if "teacher_auc" in manifest else {})})
    return 0


def cmd_produce(args: argparse.Namespace) -> int:
    from runners.produce import produce_logs
    from schemas.spec import load_spec

    names = [name.strip() for name in args.topics.split(",")]
    if len(names) != 2 or not all(names) or names[0] == names[1]:
        raise ValueError(f"--topics: expected two different topic names IMPRESSIONS,ACTIONS, got {args.topics!r}")
    if args.rate is not None and args.rate <= 0:
        raise ValueError(f"--rate must be > 0 events/s, got {args.rate}")
    if args.partitions < 1:
        raise ValueError(f"--partitions must be >= 1, got {args.partitions}")
    summary = produce_logs(load_spec(args.spec), args.logs, args.bootstrap,
                           {"impressions": names[0], "actions": names[1]}, args.rate, args.partitions)
    print(f"produced {summary['events']:,} events in {summary['seconds']} s ({summary['events_per_s']:,}/s) to "
          f"{', '.join(summary['topics'])}; dead letters {summary['dead_letters']}", file=sys.stderr)
    print(json.dumps(summary, sort_keys=True))
    return 0


def cmd_logs_check(args: argparse.Namespace) -> int:
    from schemas.dead_letters import DeadLetterSink
    from schemas.events import log_schemas
    from schemas.logs import log_files, read_log_file, read_manifest
    from schemas.spec import load_spec

    spec = load_spec(args.spec)
    schemas = log_schemas(spec.events)
    dead = DeadLetterSink()
    figures: dict = {"logs": str(args.logs), "spec": spec.name}
    for kind, schema in schemas.items():
        files = log_files(args.logs, kind)
        count, out_of_order, first, last = 0, 0, None, None
        actions: dict[str, int] = {}
        for path in files:
            previous = None
            for record in read_log_file(path, schema, dead, time_range_ms=spec.events.time_range_ms):
                count += 1
                t = record["event_time_ms"]
                if previous is not None and t < previous:
                    out_of_order += 1
                previous = t
                first = t if first is None else min(first, t)
                last = t if last is None else max(last, t)
                if kind == "actions":
                    actions[record["action_type"]] = actions.get(record["action_type"], 0) + 1
        span_h = (last - first) / 3_600_000 if count else 0.0
        print(f"{kind}: {count} records in {len(files)} files, spanning {span_h:.1f} h of event time"
              + (f", {out_of_order} out of event-time order" if out_of_order else ""))
        figures[kind] = count
        figures[f"{kind}_out_of_order"] = out_of_order
        if kind == "actions":
            figures["action_types"] = actions
    if dead.total:
        print(f"{dead.total} dead letters: {dict(dead.counts)}", file=sys.stderr)
        for letter in dead.letters[:10]:
            print(f"  {letter.reason}: {letter.detail}", file=sys.stderr)
        if args.dead_letters:
            dead.write_jsonl(args.dead_letters)
    figures["dead_letters"] = dict(dead.counts)  # a file that fails its manifest checksum: checksum_mismatch
    listed = read_manifest(args.logs).get("sha256", {})
    figures["checksummed_files"] = sum(f"{kind}/{path.name}" in listed for kind in schemas
                                       for path in log_files(args.logs, kind))
    _print_json(figures)
    return 1 if dead.total or figures["impressions_out_of_order"] or figures["actions_out_of_order"] else 0


def _examples_summary(out_dir: Path, spec) -> dict:
    import pyarrow.parquet as pq

    files = sorted((out_dir / "examples").glob("*.parquet"))
    table = pq.read_table(files) if files else None
    examples = table.num_rows if table is not None else 0
    positives = 0
    if table is not None:
        import pyarrow.compute as pc

        labels = table.column("labels").combine_chunks()
        is_target = pc.equal(labels.keys, spec.labels.target)
        positives = int(pc.sum(pc.filter(labels.items, is_target)).as_py() or 0)
    return {"examples": examples, "positives": positives}


def _check_trainers(spec, options: JobOptions) -> None:
    """Several trainer workers run on Flink only."""
    workers = spec.training.workers
    if workers == 1:
        return
    if options.runner != "flink":
        raise ValueError(f"{workers} trainer workers (--trainers / training.workers) need --runner flink: "
                         f"the Beam DirectRunner trains with one worker")
    if options.train and spec.training.sequential_updates is True:
        raise ValueError("training.sequential_updates: true is single-worker; use false or auto with --trainers")


def _check_logs(spec, options: JobOptions) -> None:
    """Missing logs or logs of another spec are refused before a job starts (a Kafka source: its
    URI, and its connector jars)."""
    from schemas.events import log_schemas

    if options.source is not None:
        from runners.kafka_source import connector_jar_uris

        options.kafka  # noqa: B018 (a bad URI or end-offsets file raises, naming it)
        connector_jar_uris(options.kafka_jars)
        return
    from schemas.logs import check_log_dir

    read = {source for slot in spec.slots for source in slot.source} | {dense.source for dense in spec.dense}
    schemas = log_schemas(spec.events)
    fields = {f["name"] for f in schemas["impressions"]["fields"]}
    check_log_dir(options.logs, schemas, live=options.live, used={"impressions": read & fields})


def _submit(options: JobOptions) -> int:
    """The same command through ``flink run`` on the cluster of ``--flink-master``; its exit code."""
    from runners.flink_runner import submit

    return submit(options.flink_master, options.to_argv())


def _run_here(spec, options: JobOptions) -> dict:
    """The job on the runner the options name, in this process; its summary."""
    if options.runner == "flink":
        from runners.flink_runner import run_flink_job

        return run_flink_job(spec, options)
    if options.resume and not options.train:
        raise ValueError("--resume restarts a Flink job from its checkpoint: it needs --runner flink")
    from runners.beam_runner import run_job  # (Beam's imports take ~1 s: only where Beam runs)

    return run_job(spec, options)


def cmd_join(args: argparse.Namespace) -> int:
    from schemas.spec import load_spec

    options = JobOptions.from_args(args, train=False)
    if options.logs is None and options.source is None:
        raise ValueError("--logs DIR (or --source kafka://...) is required")
    spec = load_spec(options.spec)
    _check_logs(spec, options)
    if options.on_cluster:
        return _submit(options)
    summary = _run_here(spec, options)
    summary.update(_examples_summary(options.out, spec))
    from schemas.logs import read_manifest

    manifest = read_manifest(options.logs) if options.logs is not None else {}
    events = manifest.get("impressions", 0) + sum(manifest.get("actions", {}).values())
    if events:
        summary["events"] = events
        summary["events_per_s"] = round(events / summary["seconds"])
    print(f"{summary['mode']}: {summary['examples']} examples ({summary['positives']} positive) in "
          f"{summary['seconds']} s to {options.out}/examples; dead letters {summary['dead_letters'] or 'none'}")
    _print_json(summary)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """The main job: logs -> join -> sample -> features -> online training (backfill, streaming
    replay or live), with progressive metrics per event-time window."""
    from schemas.spec import load_spec

    options = JobOptions.from_args(args, train=True)
    if options.logs is None and options.source is None:
        if options.spec not in (None, "movielens"):
            raise ValueError("--logs is required with a spec other than the built-in movielens")
        from event_datasets import movielens

        options = options.replace(logs=options.out / "logs")
        if not (options.logs / "manifest.json").is_file():
            movielens.convert(options.logs)
    spec = load_spec(options.spec or "movielens")
    if options.store is not None:
        from trainer.redis_config import RedisStoreConfig

        RedisStoreConfig.from_uri(options.store)  # a bad URI fails here, naming the parameter
        spec = dataclasses.replace(spec, store=options.store)
    if options.trainers is not None:
        spec = dataclasses.replace(spec, training=dataclasses.replace(spec.training, workers=options.trainers))
    _check_trainers(spec, options)
    _check_logs(spec, options)
    backfilled = None
    if options.backfill is not None:
        options, backfilled = _backfill(spec, options)
    if options.on_cluster:
        return _submit(options)
    summary = _run_here(spec, options)
    if backfilled is not None:
        summary["backfill"] = backfilled
    print(f"trained on {summary.get('examples', 0)} examples: progressive AUC {summary.get('auc')}, "
          f"logloss {summary.get('logloss')}, calibration {summary.get('calibration')}; "
          f"{summary.get('examples_per_s')} examples/s; dead letters {summary['dead_letters'] or 'none'}; "
          f"metrics per window in {options.out}/metrics.jsonl and metrics.png")
    _print_json(summary)
    return 0


def _backfill(spec, options: JobOptions) -> tuple[JobOptions, dict]:
    """Phase 1 of ``run --backfill-until``: batch-train the history of ``--logs`` into a snapshot
    of the model directory (``trainer.backfill``); returns the options of phase 2 (the job,
    resuming from that snapshot: it trains what comes after it) and phase 1's figures."""
    import shutil

    from trainer.backfill import backfill_model
    from trainer.running import log
    from transforms.log_examples import examples_from_logs

    if spec.training.workers > 1:
        raise ValueError(f"--backfill-until trains one model with one worker: not with {spec.training.workers} "
                         f"trainer workers (--trainers / training.workers)")
    if spec.store is not None:
        raise ValueError("--backfill-until is not built for an external row store (--store / the spec's store) yet")
    model_dir = options.model_dir or options.out / "model"
    backfill = options.backfill
    log(f"backfill: batch-training the Examples before {backfill.until_ms} ms at {backfill.scale}x the batch, "
        f"{backfill.epochs} epoch(s), into {model_dir}")
    examples = examples_from_logs(spec, Path(options.logs))
    figures = backfill_model(spec, examples, model_dir, backfill, options.device)
    log(f"backfill: {figures['examples']:,} Examples in {figures['seconds']} s; the job continues online from "
        f"snapshot version {figures['snapshot_version']}")
    # a new model: a checkpoint an earlier job left in OUT must not be restored into it
    shutil.rmtree(options.out / ".checkpoints", ignore_errors=True)
    phase2 = options.replace(model_dir=model_dir, resume=True, backfill_until_ms=None, backfill_epochs=2,
                             backfill_scale=16)
    return phase2, figures


def cmd_serve(args: argparse.Namespace) -> int:
    from serving.app import RequestLimits, serve

    serve(str(args.model_dir), host=args.host, port=args.port, poll_s=args.poll, device=args.device, fp16=args.fp16,
          store=args.store, limits=RequestLimits(args.max_body_bytes, args.max_impressions))
    return 0


def cmd_table_stats(args: argparse.Namespace) -> int:
    from trainer.table_snapshot import SnapshotError, snapshot_stats

    try:
        stats = snapshot_stats(args.snapshot)
    except SnapshotError as exc:
        print(f"streamrec table-stats: {exc}", file=sys.stderr)
        return 1
    print(f"{stats['rows']} rows of dim {stats['dim']} (+{stats['state_width']} optimiser floats), "
          f"{len(stats['rows_by_slot'])} slots, data time {stats['data_time_ms']} ms; "
          f"{stats['bytes_per_entry']:.1f} B per entry in memory at load {stats['load_factor']:.2f} "
          f"({stats['bytes_per_entry_ratio']}x the {stats['payload_bytes_per_entry']} B of payload); "
          f"file {stats['file_bytes']:,} B")
    _print_json(stats)
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    from experiments import DEFAULT_DATA, run_experiment
    from experiments.common import load_examples, synthetic_logs
    from schemas.spec import load_spec

    options = {key: value for key, value in (
        ("frozen_after_ms", None if args.frozen_after is None else int(args.frozen_after * 3_600_000)),
        ("base_batch", args.base_batch), ("shards", args.shards)) if value is not None}
    owner = {"frozen_after_ms": "sync-interval", "base_batch": "cowclip-batch", "shards": "shard-loss"}
    for key in options:
        if owner[key] != args.name:
            raise ValueError(f"--{key.removesuffix('_ms').replace('_', '-')} is an option of {owner[key]}, "
                             f"not of {args.name}")
    spec = load_spec(args.spec)
    logs = args.logs
    if logs is None:
        if spec.events.impression != "synthetic_impression":
            raise ValueError(f"spec {spec.name!r} needs --logs (without it the experiment generates synthetic "
                             f"logs, which only a spec of the synthetic events reads)")
        impressions, span_hours = DEFAULT_DATA[args.name][1 if args.quick else 0]
        logs = synthetic_logs(args.out / "logs", impressions, span_hours)
        print(f"synthetic logs: {impressions:,} impressions over {span_hours:g} h in {logs}", file=sys.stderr)
    examples = load_examples(spec, logs, args.limit)
    result = run_experiment(args.name, spec, examples, args.out, args.quick, args.device, **options)
    _print_json(result)
    return 0


def _instant(text: str) -> int:
    """``--backfill-until``'s TIME as ms since the epoch."""
    from schemas.durations import parse_instant_ms

    try:
        return parse_instant_ms(text)
    except (TypeError, ValueError, OverflowError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_mode_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--streaming", action="store_true",
                        help="run as a streaming job, replaying the logs in event-time order (default: backfill)")
    parser.add_argument("--watch", type=float, default=None, metavar="SECONDS",
                        help="live: watch the log directory for new files every SECONDS")
    parser.add_argument("--stop-after", type=float, default=None, metavar="SECONDS",
                        help="with --watch: stop watching after SECONDS (default: run until killed)")


def _add_runner_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runner", choices=("beam", "flink"), default="beam",
                        help="beam: Beam's DirectRunner (default); flink: PyFlink on a local mini-cluster")
    parser.add_argument("--flink-master", default=None, metavar="HOST:PORT",
                        help="with --runner flink: submit to this standalone cluster (its REST endpoint)")
    parser.add_argument("--checkpoint-every", type=float, default=10.0, metavar="SECONDS",
                        help="with --runner flink: checkpoint interval (checkpoints go to OUT/.checkpoints)")
    parser.add_argument("--parallelism", type=int, default=None, metavar="N",
                        help="with --runner flink: parallel instances of each operator (the trainer and the "
                             "live log reader are one; default 1)")
    parser.add_argument("--events-per-step", type=int, default=16_384, metavar="N",
                        help="with --runner flink: events per replayed micro-batch (the unit the JVM hands "
                             "to the Python workers)")
    parser.add_argument("--source", default=None, metavar="kafka://HOST:PORT[?...]",
                        help="with --runner flink: read impressions and actions from Kafka topics instead of logs: "
                             "kafka://HOST:PORT[?impressions=T&actions=T&group=G&until=latest|OFFSETS.json"
                             "&window_ms=N&out_of_order_ms=N&idle_ms=N] (no until: live, until stopped)")
    parser.add_argument("--kafka-jars", default=None, metavar="JAR,JAR",
                        help="with --source: flink-connector-kafka and kafka-clients jars (default: "
                             "$STREAMREC_KAFKA_JARS, else the ones make fetched)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamrec", description="Real-time recommendation training on Beam/Flink.")
    commands = parser.add_subparsers(dest="command", required=True)

    validate = commands.add_parser("validate", help="validate a feature spec and print its summary")
    validate.add_argument("spec", help="a spec YAML path or a built-in spec name (movielens, obd, synthetic)")
    validate.set_defaults(handler=cmd_validate)

    data = commands.add_parser("data", help="write impression and action logs")
    datasets = data.add_subparsers(dest="dataset", required=True)
    for name, text in (("movielens", "MovieLens-100K (real ratings)"),
                       ("obd", "Open Bandit Dataset (real impressions and clicks)"),
                       ("synthetic", "a Criteo-like synthetic stream")):
        sub = datasets.add_parser(name, help=text)
        sub.add_argument("--out", required=True, type=Path, help="directory for the logs")
        sub.add_argument("--seed", type=int, default=0, help="seed of the random action delays (and data)")
        sub.add_argument("--format", choices=("avro", "parquet"), default=None,
                         help="log file format (default: avro for real data, parquet for synthetic)")
        sub.set_defaults(handler=cmd_data)
        if name == "obd":
            sub.add_argument("--policy", choices=("random", "bts"), default="random")
            sub.add_argument("--campaign", choices=("all", "men", "women"), default="all")
        if name == "synthetic":
            sub.add_argument("--events", type=int, default=1_000_000, help="number of impressions")
            sub.add_argument("--span-hours", type=float, default=24.0, help="event time the impressions cover")
            sub.add_argument("--drift", type=float, default=0.5, help="teacher drift over the span, 0..1")
            sub.add_argument("--ctr", type=float, default=0.2, help="target click-through rate at the start")

    logs = commands.add_parser("logs", help="inspect event logs")
    logs_commands = logs.add_subparsers(dest="logs_command", required=True)
    check = logs_commands.add_parser("check", help="read every record through the spec's schemas and report")
    check.add_argument("logs", type=Path, help="log directory (with impressions/ and actions/)")
    check.add_argument("--spec", required=True, help="spec whose event schemas the logs must fit")
    check.add_argument("--dead-letters", type=Path, default=None, help="write dead letters here (JSON lines)")
    check.set_defaults(handler=cmd_logs_check)

    for name, text in (("join", "join, sample and extract features from event logs on Beam's DirectRunner"),
                       ("backfill", "replay event logs in batch mode through the same transforms")):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("--spec", required=True, help="a spec YAML path or a built-in spec name")
        sub.add_argument("--logs", required=name == "backfill", type=Path,
                         help="log directory (impressions/, actions/)" + ("; or --source" if name == "join" else ""))
        sub.add_argument("--out", required=True, type=Path, help="output directory (examples/, dead_letters/)")
        if name == "join":
            _add_mode_arguments(sub)
            _add_runner_arguments(sub)
            sub.add_argument("--resume", action="store_true",
                             help="with --runner flink: restart from the newest retained checkpoint in OUT")
        sub.set_defaults(handler=cmd_join)

    run = commands.add_parser("run", help="the whole job: join, sample, extract, train online")
    run.add_argument("--spec", default=None, help="spec (default: the built-in movielens)")
    run.add_argument("--logs", type=Path, default=None,
                     help="log directory (default: obtain MovieLens-100K into OUT/logs)")
    run.add_argument("--out", required=True, type=Path, help="output directory")
    run.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where tables and model live")
    _add_mode_arguments(run)
    run.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    run.add_argument("--model-dir", type=Path, default=None,
                     help="publish snapshots, sparse deltas and dense weights here on the spec's schedule")
    run.add_argument("--resume", action="store_true",
                     help="continue from the newest snapshot in --model-dir (after a crash or kill); with "
                          "--runner flink also from the newest retained checkpoint in OUT")
    _add_runner_arguments(run)
    run.add_argument("--trainers", type=int, default=None, metavar="K",
                     help="with --runner flink: K trainer workers train one model, embedding rows sharded by "
                          "fid, dense weights all-reduced (overrides the spec's training.workers)")
    run.add_argument("--backfill-until", type=_instant, default=None, metavar="TIME",
                     help="first batch-train the Examples of --logs before TIME (ISO 8601 date or date-time, UTC "
                          "unless zoned, or ms since the epoch): CowClip at a large batch, then the job continues "
                          "online from that model and trains only what comes after it (publishes to --model-dir, "
                          "default OUT/model)")
    run.add_argument("--backfill-epochs", type=int, default=2, metavar="N", help="passes over that history (default 2)")
    run.add_argument("--backfill-scale", type=int, default=16, metavar="S",
                     help="its batch is S x the spec's training.batch_size, by CowClip's scaling rule (default 16)")
    run.add_argument("--store", default=None, metavar="URI",
                     help="keep embedding rows in Redis behind a bounded cache: redis://host:port[,host:port...]"
                          "[/db][?prefix=P&cache_rows=N&ttl=on|off] or redis+cluster://host:port (overrides the spec's store)")

    serve = commands.add_parser("serve", help="serve a model directory over HTTP (predict, healthz, metrics)")
    serve.add_argument("--model-dir", required=True, type=Path, help="model directory written by run --model-dir")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback)")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--poll", type=float, default=1.0, metavar="SECONDS", help="how often to look for new versions")
    serve.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    serve.add_argument("--fp16", action="store_true", help="hold serving rows in float16")
    serve.add_argument("--store", default=None, metavar="URI",
                       help="the trainer's redis:// store: rows no version holds are read from it on a miss")
    serve.add_argument("--max-body-bytes", type=int, default=16 << 20, help="larger requests are answered 413")
    serve.add_argument("--max-impressions", type=int, default=10_000,
                       help="impressions per request; more are answered 413")
    serve.set_defaults(handler=cmd_serve)
    run.set_defaults(handler=cmd_run)

    produce = commands.add_parser("produce", help="replay event logs into Kafka topics in event-time order")
    produce.add_argument("--spec", required=True, help="the spec whose event schemas encode the records")
    produce.add_argument("--logs", required=True, type=Path, help="log directory (impressions/, actions/)")
    produce.add_argument("--bootstrap", required=True, metavar="HOST:PORT", help="a Kafka broker")
    produce.add_argument("--topics", default="impressions,actions", metavar="IMPRESSIONS,ACTIONS",
                         help="the two topics (default impressions,actions); created when absent")
    produce.add_argument("--partitions", type=int, default=2, help="partitions of a topic this creates (default 2)")
    produce.add_argument("--rate", type=float, default=None, metavar="N",
                         help="events per second (default: as fast as the broker takes them)")
    produce.set_defaults(handler=cmd_produce)

    experiment = commands.add_parser("experiment", help="reproduce a paper's experiment on a spec and its logs")
    experiment.add_argument("name", choices=EXPERIMENTS)
    experiment.add_argument("--spec", default="synthetic", help="spec YAML path or built-in name (default synthetic)")
    experiment.add_argument("--logs", type=Path, default=None,
                            help="log directory (default: a drifting synthetic stream generated under OUT/logs)")
    experiment.add_argument("--out", required=True, type=Path, help="directory for NAME.json and NAME.png")
    experiment.add_argument("--quick", action="store_true", help="a smaller form (under 3 minutes on 2 cores)")
    experiment.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N Examples")
    experiment.add_argument("--device", default="cpu", help="torch device of the trainers (cpu, cuda)")
    experiment.add_argument("--frozen-after", type=float, default=None, metavar="HOURS",
                            help="sync-interval: the frozen model's and the scored part's start (default 24)")
    experiment.add_argument("--base-batch", type=int, default=None, metavar="B",
                            help="cowclip-batch: the smallest batch (default 1024; 64 with --quick); also 8B and 64B")
    experiment.add_argument("--shards", type=int, default=None, metavar="N",
                            help="shard-loss: parameter-server shards, one of which is lost (default 4)")
    experiment.set_defaults(handler=cmd_experiment)

    table_stats = commands.add_parser("table-stats", help="rows, slots and memory figures of a table snapshot")
    table_stats.add_argument("snapshot", type=Path, help="an embedding-table snapshot (Arrow IPC)")
    table_stats.set_defaults(handler=cmd_table_stats)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"streamrec {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

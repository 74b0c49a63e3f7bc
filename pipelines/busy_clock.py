"""Seconds each Python operator of a Flink job spends in its own code (what the Python workers
cost, as against the JVM and the transport between them)."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path


class BusyClock:
    """Seconds a Python operator spends in its own code (``with clock:`` around each call),
    written as ``DIR/<name>-<pid>.json`` when the operator closes: what the Python workers cost,
    as against the JVM and the transport between them."""

    def __init__(self, name: str, directory: str | None):
        self.name, self.directory, self.seconds, self.calls = name, directory, 0.0, 0
        self.first = self.last = None  # wall-clock time of the first call and of the last return

    def __enter__(self):
        self.started = time.perf_counter()
        if self.first is None:
            self.first = time.time()

    def __exit__(self, *_):
        self.seconds += time.perf_counter() - self.started
        self.calls += 1
        self.last = time.time()

    def write(self) -> None:
        if self.directory is None:
            return
        path = Path(self.directory) / f"{self.name}-{os.getpid()}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"operator": self.name, "busy_s": self.seconds, "calls": self.calls,
                                    "first": self.first, "last": self.last}))


def read_busy_clocks(directory: Path) -> dict[str, float]:
    """Busy seconds per operator name, summed over its workers."""
    busy: dict[str, float] = {}
    for path in sorted(directory.glob("*.json")):
        entry = json.loads(path.read_text())
        busy[entry["operator"]] = round(busy.get(entry["operator"], 0.0) + entry["busy_s"], 2)
    return busy

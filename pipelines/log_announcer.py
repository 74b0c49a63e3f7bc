"""Live logs for a Flink job: new log files announced as lines in files a ``FileSource`` monitors.

The JVM side of PyFlink cannot read our Avro/Parquet logs, so the Flink job's live source does
not read them: ``LogAnnouncer`` watches ``LOGS/impressions`` and ``LOGS/actions`` and, for each
scan, writes one announcement file into ``announce_dir`` (``000000042.tsv``, written under a
hidden name and renamed: the source never sees half a file). A line is
``time_ms<TAB>kind<TAB>path`` for a new log file, ``time_ms<TAB><TAB>`` when nothing was new (a
heartbeat: the watermark follows the clock even when no logs arrive), and finally
``time_ms<TAB>END<TAB>count`` - the number of lines announced before it, so the reader knows when
it has read them all. ``time_ms`` is the wall clock, never decreasing.

The Flink job's source reads these lines in checkpointed order; the Python operator after it
reads each announced log file. A restarted announcer finds what it announced in the files
already there (the job restored from a checkpoint re-reads the ones it had not finished).
"""
from __future__ import annotations

import threading
import time
from pathlib import Path

from schemas.logs import KINDS, log_files

END = "END"


def announcement_line(time_ms: int, kind: str = "", path: str = "") -> str:
    return f"{time_ms}\t{kind}\t{path}\n"


def parse_announcement(line: str) -> tuple[int, str, str]:
    """(time_ms, kind, path): kind is ``impressions``/``actions`` (path: the log file), ``""`` (a
    heartbeat) or ``END`` (path: how many lines came before it)."""
    time_ms, kind, path = line.rstrip("\n").split("\t")
    if kind not in (*KINDS, "", END):
        raise ValueError(f"announcement line {line!r}: unknown kind {kind!r}")
    return int(time_ms), kind, path


class LogAnnouncer:
    """Announces each log file under ``log_dir`` once, in scans (see the module docstring)."""

    def __init__(self, log_dir: str | Path, announce_dir: str | Path, clock=time.time):
        self.log_dir, self.announce_dir, self.clock = Path(log_dir), Path(announce_dir), clock
        self.announce_dir.mkdir(parents=True, exist_ok=True)
        self.announced: set[str] = set()
        self.lines = 0
        self.last_ms = 0
        self.files = 0
        for path in sorted(self.announce_dir.glob("*.tsv")):  # what an earlier run announced
            if path.name.startswith("."):  # written but not renamed when it was killed: never read
                path.unlink()
                continue
            self.files += 1
            for line in path.read_text().splitlines():
                time_ms, kind, logged = parse_announcement(line)
                self.lines += 1
                self.last_ms = max(self.last_ms, time_ms)
                if kind in KINDS:
                    self.announced.add(logged)

    def _now_ms(self) -> int:
        self.last_ms = max(self.last_ms, int(self.clock() * 1000))
        return self.last_ms

    def _write(self, lines: list[str]) -> Path:
        name = f"{self.files:09d}.tsv"
        hidden = self.announce_dir / f".{name}"
        hidden.write_text("".join(lines))
        hidden.rename(self.announce_dir / name)
        self.files += 1
        self.lines += len(lines)
        return self.announce_dir / name

    def scan(self) -> int:
        """Announce the log files not announced yet (a heartbeat if none); returns how many."""
        now = self._now_ms()
        new = [(kind, str(path.resolve())) for kind in KINDS for path in log_files(self.log_dir, kind)
               if str(path.resolve()) not in self.announced]
        self._write([announcement_line(now, kind, path) for kind, path in new] or [announcement_line(now)])
        self.announced.update(path for _, path in new)
        return len(new)

    def end(self) -> int:
        """The last scan, then the END line; returns the number of lines before END."""
        self.scan()
        count = self.lines
        self._write([announcement_line(self._now_ms(), END, str(count))])
        return count

    def run(self, interval_s: float, stop: threading.Event) -> None:
        """Scan every ``interval_s`` until ``stop`` is set (then return without the END line)."""
        while not stop.is_set():
            self.scan()
            stop.wait(interval_s)

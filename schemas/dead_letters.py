"""Dead letters: records that cannot be used go here with a reason, and are counted.

Nothing is dropped silently: every stage that refuses a record emits a DeadLetter and bumps a
counter keyed by its reason, so a run can report ``{"corrupt_file": 1, "late_action": 12}``.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class DeadLetter:
    stage: str  # where it was refused: "read", "join", "features", ...
    reason: str  # a short code, e.g. "missing_field", "late_action"
    detail: str  # a human sentence naming the file / record / field / value
    source: str = ""  # file or stream the record came from
    record: str = ""  # the offending record as JSON, when there is one

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def record_json(record: Any) -> str:
    """A best-effort JSON rendering of a record for a dead letter (never raises)."""
    try:
        return json.dumps(record, sort_keys=True, default=repr)
    except (TypeError, ValueError):
        return repr(record)


class DeadLetterSink:
    """Collects dead letters (optionally only the first ``keep`` of them) and counts all by reason."""

    def __init__(self, keep: int | None = 10_000):
        self.keep = keep
        self.letters: list[DeadLetter] = []
        self.counts: Counter[str] = Counter()

    def add(self, letter: DeadLetter) -> None:
        self.counts[letter.reason] += 1
        if self.keep is None or len(self.letters) < self.keep:
            self.letters.append(letter)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def write_jsonl(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as out:
            for letter in self.letters:
                out.write(letter.to_json() + "\n")

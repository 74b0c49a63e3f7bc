"""Durations written with units in specs and on the command line: ``500ms``, ``10s``, ``30m``, ``6h``, ``7d``, ``2w``;
and points in time: ms since the epoch, or ISO 8601 dates and date-times (UTC unless they name a zone).

>>> parse_duration_ms("30m")
1800000
>>> parse_duration_ms("1.5h")
5400000
>>> format_duration_ms(3 * 86_400_000)
'3d'
>>> parse_instant_ms("1998-04-01T12:00:00")
891432000000
"""
from __future__ import annotations

import datetime
import re
from typing import Any

UNIT_MS = {"ms": 1, "s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)\s*$")


def parse_duration_ms(text: str | int | float) -> int:
    """Milliseconds in a duration string; a bare number is refused (its unit would be a guess)."""
    match = _DURATION.match(str(text)) if isinstance(text, str) else None
    if match is None:
        raise ValueError(
            f"bad duration {text!r}: write a number and a unit, one of {'/'.join(UNIT_MS)} (e.g. '30m')"
        )
    return round(float(match.group(1)) * UNIT_MS[match.group(2)])


def format_duration_ms(ms: int) -> str:
    """The shortest exact rendering: the largest unit that divides ``ms``."""
    for unit in ("w", "d", "h", "m", "s"):
        if ms and ms % UNIT_MS[unit] == 0:
            return f"{ms // UNIT_MS[unit]}{unit}"
    return f"{ms}ms"


def parse_instant_ms(value: Any) -> int:
    """A point in time as ms since the epoch: an int (ms), a date or date-time (UTC unless it
    names its zone), or ISO 8601 text of either (or of an int)."""
    if isinstance(value, bool):
        raise TypeError("expected a date, a time or ms")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        text = value.strip()
        if re.fullmatch(r"-?\d+", text):
            return int(text)
        try:
            value = datetime.datetime.fromisoformat(text)
        except ValueError:
            raise ValueError(f"bad time {text!r}: write ms since the epoch or an ISO 8601 date or date-time "
                             f"(e.g. '1998-04-01' or '1998-04-01T12:00:00Z')") from None
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=datetime.timezone.utc)
        return int(value.timestamp() * 1000)
    if isinstance(value, datetime.date):
        return int(datetime.datetime(value.year, value.month, value.day, tzinfo=datetime.timezone.utc).timestamp() * 1000)
    raise TypeError("expected a date, a time or ms")

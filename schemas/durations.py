"""Durations written with units in specs and on the command line: ``500ms``, ``10s``, ``30m``, ``6h``, ``7d``, ``2w``.

>>> parse_duration_ms("30m")
1800000
>>> parse_duration_ms("1.5h")
5400000
>>> format_duration_ms(3 * 86_400_000)
'3d'
"""
from __future__ import annotations

import re

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

"""Humantime duration strings ("500ms", "5s", "1h 30m") to seconds and back."""

from __future__ import annotations

import math
import re

_NS_PER_UNIT = {
    **dict.fromkeys(("ns", "nsec", "nsecs"), 1),
    **dict.fromkeys(("us", "µs", "usec", "usecs"), 10**3),
    **dict.fromkeys(("ms", "msec", "msecs"), 10**6),
    **dict.fromkeys(("s", "sec", "secs", "second", "seconds"), 10**9),
    **dict.fromkeys(("m", "min", "mins", "minute", "minutes"), 60 * 10**9),
    **dict.fromkeys(("h", "hr", "hrs", "hour", "hours"), 3600 * 10**9),
    **dict.fromkeys(("d", "day", "days"), 86400 * 10**9),
    **dict.fromkeys(("w", "week", "weeks"), 7 * 86400 * 10**9),
}
# Units used by format_duration, largest first.
_FORMAT_UNITS = (
    ("d", 86400 * 10**9),
    ("h", 3600 * 10**9),
    ("m", 60 * 10**9),
    ("s", 10**9),
    ("ms", 10**6),
    ("us", 10**3),
    ("ns", 1),
)
_TERM = re.compile(r"\s*([\d.]+)\s*([^\d\s.]*)")
_EXAMPLES = '"500ms", "5s", "2m" or "1h 30m"'


def parse_duration(text: str) -> float:
    """Parse a humantime duration such as ``"500ms"`` or ``"1h 30m"`` into seconds.

    Every number needs a unit (ns, us, ms, s, m/min, h, d, w); a bare number is rejected.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"invalid duration {text!r}: expected a string such as {_EXAMPLES}")
    total_ns = 0
    position = 0
    stripped = text.strip()
    while position < len(stripped):
        term = _TERM.match(stripped, position)
        if term is None:
            raise ValueError(f'invalid duration "{text}": expected a duration such as {_EXAMPLES}')
        number, unit = term.groups()
        if not number.isdigit():
            raise ValueError(
                f'invalid duration "{text}": {number} is not a whole number; use a smaller unit'
                ' (e.g. "1500ms" instead of "1.5s")'
            )
        if not unit:
            raise ValueError(
                f'invalid duration "{text}": {number} has no unit; write e.g. "{number}s"'
            )
        if unit not in _NS_PER_UNIT:
            raise ValueError(
                f'invalid duration "{text}": unknown unit "{unit}"'
                " (use ns, us, ms, s, m, h, d or w)"
            )
        total_ns += int(number) * _NS_PER_UNIT[unit]
        position = term.end()
    return total_ns / 10**9


def format_duration(seconds: float) -> str:
    """Render seconds as the shortest humantime string, e.g. ``5400.0`` -> ``"1h 30m"``."""
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"cannot format {seconds!r} as a duration: expected a finite number >= 0")
    remaining = round(seconds * 10**9)
    parts = []
    for unit, size in _FORMAT_UNITS:
        count, remaining = divmod(remaining, size)
        if count:
            parts.append(f"{count}{unit}")
    return " ".join(parts) or "0s"

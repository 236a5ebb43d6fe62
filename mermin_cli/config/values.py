"""Parsers for the value kinds of filters and interface patterns.

Each parser raises ValueError with a message that quotes the bad value; the config loader
runs them at load time, and the engines call them again to build their matchers.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_PATTERN_LENGTH = 256
PORT_BOUNDS = (0, 65535)
_RANGE = re.compile(r"(\d+)(?:\s*-\s*(\d+))?")


def parse_cidr(text: str) -> IPNetwork:
    """Parse ``"10.0.0.0/8"``, ``"fd00::/8"`` or a bare IP (a /32 or /128 network)."""
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ValueError(
            f'"{text}" is not an IP address or CIDR such as "10.0.0.0/8" or "fd00::/8"'
        ) from None


def parse_cidrs(values: Iterable[str]) -> list[IPNetwork]:
    """Parse every entry with parse_cidr."""
    return [parse_cidr(value) for value in values]


def parse_range(text: str, low: int, high: int) -> tuple[int, int]:
    """Parse ``"443"`` or an inclusive range ``"8000-9000"`` within ``low..high``."""
    match = _RANGE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f'"{text}" is not a number or a range such as "443" or "8000-9000"')
    start = int(match[1])
    end = int(match[2] or match[1])
    if start > end:
        raise ValueError(f'range "{text}" starts after it ends')
    if start < low or end > high:
        raise ValueError(f'"{text}" is outside {low}..{high}')
    return start, end


def parse_ranges(values: Iterable[str], low: int, high: int) -> list[tuple[int, int]]:
    """Parse every entry with parse_range."""
    return [parse_range(value, low, high) for value in values]


def parse_port_ranges(values: Iterable[str]) -> list[tuple[int, int]]:
    """Parse port numbers and port ranges (0..65535)."""
    return parse_ranges(values, *PORT_BOUNDS)


def compile_pattern(pattern: str, *, ignore_case: bool = False) -> re.Pattern[str]:
    """Compile a name pattern; match candidates with ``.search()``.

    ``/regex/`` is a regular expression (searched, so anchor it with ``^``/``$``); anything
    else is a glob matched against the whole value: ``*``, ``?``, ``[abc]``, ``[!a-z]``,
    ``{a,b}`` and ``\\`` escapes. A literal name is a glob without special characters.
    """
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise ValueError(f"pattern is longer than {MAX_PATTERN_LENGTH} characters")
    is_regex = len(pattern) >= 2 and pattern.startswith("/") and pattern.endswith("/")
    source = pattern[1:-1] if is_regex else f"^(?:{_glob_to_regex(pattern)})$"
    try:
        return re.compile(source, re.IGNORECASE if ignore_case else 0)
    except re.error as error:
        kind = "regular expression" if is_regex else "glob"
        raise ValueError(f'invalid {kind} "{pattern}": {error}') from None


def _glob_to_regex(glob: str) -> str:
    """Translate a glob into an (unanchored) regular expression."""
    out: list[str] = []
    depth = 0  # open {a,b} alternations
    index = 0
    while index < len(glob):
        char = glob[index]
        index += 1
        if char == "*":
            out.append(".*")
        elif char == "?":
            out.append(".")
        elif char == "\\":
            if index == len(glob):
                raise ValueError(f'invalid glob "{glob}": it ends with a lone "\\"')
            out.append(re.escape(glob[index]))
            index += 1
        elif char == "[":
            # "]" right after "[" or "[!" is a literal member, as in fnmatch.
            start = index + (1 if glob[index : index + 1] in ("!", "^") else 0)
            close = glob.find("]", start + 1 if glob[start : start + 1] == "]" else start)
            if close < 0:
                raise ValueError(f'invalid glob "{glob}": "[" has no matching "]"')
            members = glob[index:close]
            negate = members[:1] in ("!", "^")
            escaped = "".join(c if c == "-" else re.escape(c) for c in members[negate:])
            out.append(f"[{'^' if negate else ''}{escaped}]")
            index = close + 1
        elif char == "{":
            depth += 1
            out.append("(?:")
        elif char == "," and depth:
            out.append("|")
        elif char == "}" and depth:
            depth -= 1
            out.append(")")
        else:
            out.append(re.escape(char))
    if depth:
        raise ValueError(f'invalid glob "{glob}": "{{" has no matching "}}"')
    return "".join(out)

"""Render a Config as HCL (loads back to the same Config) or as a plain dict for JSON."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any, get_args

from mermin_cli.config.durations import format_duration
from mermin_cli.config.schema import Config, Spec, optional_inner, schema_fields, unannotate

REDACTED = "<redacted>"


def render_hcl(config: Config, *, redact: bool = False) -> str:
    """The configuration as HCL; ``redact`` hides secrets (passwords, tokens, headers)."""
    return "\n".join(_body(config, 0, redact)) + "\n"


def to_dict(config: Config, *, redact: bool = False) -> dict[str, Any]:
    """The configuration as JSON-ready data keyed like the file; durations in seconds."""
    return _plain(config, Spec(), redact)


def _body(block: Any, depth: int, redact: bool) -> list[str]:
    pad = "  " * depth
    lines: list[str] = []
    for key, known in schema_fields(type(block)).items():
        value = getattr(block, known.name)
        if value is None:
            continue
        if known.spec.labelled:
            for label, child in schema_fields(type(value)).items():
                inner = getattr(value, child.name)
                body = [] if inner is None else _body(inner, depth + 1, redact)
                if body:
                    lines += _separated(depth, [f'{pad}{key} "{label}" {{', *body, f"{pad}}}"])
        elif dataclasses.is_dataclass(value):
            body = _body(value, depth + 1, redact)
            lines += _separated(
                depth, [f"{pad}{key} {{", *body, f"{pad}}}"] if body else [f"{pad}{key} {{}}"]
            )
        else:
            lines.append(f"{pad}{key} = {_value(value, known.type, known.spec, redact, pad)}")
    return lines


def _separated(depth: int, lines: list[str]) -> list[str]:
    """Top-level blocks are preceded by a blank line."""
    return ["", *lines] if depth == 0 else lines


def _value(value: Any, annotation: Any, spec: Spec, redact: bool, pad: str) -> str:
    """One attribute value; maps are written one entry per line below ``pad``."""
    annotation, spec = unannotate(annotation, spec)
    annotation = optional_inner(annotation) or annotation
    if isinstance(value, Mapping):
        value_type, item_spec = get_args(annotation)[1], Spec(secret=spec.secret)
        entries = [
            f"{pad}  {_quote(key)} = {_value(item, value_type, item_spec, redact, pad)}"
            for key, item in value.items()
        ]
        return "\n".join(["{", *entries, f"{pad}}}"]) if entries else "{}"
    if isinstance(value, tuple):
        element = get_args(annotation)[0]
        return "[" + ", ".join(_value(item, element, Spec(), redact, pad) for item in value) + "]"
    if redact and spec.secret:
        return _quote(REDACTED)
    if spec.duration:
        return _quote(format_duration(value))
    if isinstance(value, str):
        return _quote(value)
    return json.dumps(value)


def _quote(text: str) -> str:
    """An HCL string literal; ``${`` and ``%{`` are escaped so they stay literal."""
    escaped = json.dumps(text, ensure_ascii=False)
    return escaped.replace("${", "$${").replace("%{", "%%{")


def _plain(value: Any, spec: Spec, redact: bool) -> Any:
    if dataclasses.is_dataclass(value):
        return {
            key: _plain(getattr(value, known.name), known.spec, redact)
            for key, known in schema_fields(type(value)).items()
        }
    if isinstance(value, Mapping):
        return {key: _plain(item, Spec(secret=spec.secret), redact) for key, item in value.items()}
    if isinstance(value, tuple):
        return [_plain(item, Spec(), redact) for item in value]
    if redact and spec.secret and value is not None:
        return REDACTED
    return value

"""Load, merge and validate the configuration.

Precedence, low to high: the embedded default (``Config()``), the config file (``path``,
else ``$MERMIN_CONFIG_PATH``), environment variables, then ``overrides`` from command-line
flags. Every layer goes through one schema-driven walker (``_build``), so each error names
the dotted key, the value and what was expected, as one sentence.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import logging
import math
import os
import re
import types
from collections.abc import Callable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any, get_args, get_origin

from mermin_cli.config.durations import parse_duration
from mermin_cli.config.schema import (
    Config,
    InvalidCombination,
    Spec,
    optional_inner,
    schema_fields,
    unannotate,
)
from mermin_cli.errors import ConfigError

log = logging.getLogger("mermin.config")

CONFIG_PATH_ENV = "MERMIN_CONFIG_PATH"
# Environment variables that set a key, applied over the file.
ENV_KEYS = {"MERMIN_LOG_LEVEL": "log_level", "MERMIN_CONFIG_AUTO_RELOAD": "auto_reload"}
EXTENSIONS = (".hcl", ".yaml", ".yml")

# `$${` / `%%{` escapes, env("VAR"[, "default"]) interpolations, and any other `${...}`.
_TEMPLATE = re.compile(
    r"(?P<escape>\$\$\{|%%\{)"
    r'|\$\{\s*env\(\s*"(?P<name>(?:[^"\\]|\\.)*)"\s*(?:,\s*"(?P<default>(?:[^"\\]|\\.)*)"\s*)?\)\s*\}'
    r"|(?P<other>\$\{[^}]*\}?)"
)
_ItemCheck = Callable[[str], object]
_BOOLEANS = {"true": True, "1": True, "yes": True, "on": True}
_BOOLEANS |= {"false": False, "0": False, "no": False, "off": False}


def default_config_text() -> str:
    """The embedded default configuration file (HCL, commented)."""
    return resources.files("mermin_cli.config").joinpath("default.hcl").read_text("utf-8")


def config_source(
    path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
) -> str | None:
    """The config file that will be read: ``path``, else ``$MERMIN_CONFIG_PATH``, else None."""
    if path is not None:
        return os.fspath(path)
    return (os.environ if env is None else env).get(CONFIG_PATH_ENV) or None


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build the effective configuration; raises ConfigError on any invalid input.

    ``overrides`` maps dotted keys ("span.tcp_timeout") to typed values or strings to
    parse; None values are skipped (flag not given).
    """
    env = os.environ if env is None else env
    config = Config()
    source = config_source(path, env)
    if source is not None:
        config = _build(Config, _read_file(source), "", _Context(source, env, lenient=False))
    layers = [
        (f"environment variable {var}", key, env.get(var) or None) for var, key in ENV_KEYS.items()
    ]
    layers += [("command line", key, value) for key, value in (overrides or {}).items()]
    for origin, key, value in layers:
        if value is not None:
            tree: Any = value
            for part in reversed(key.split(".")):
                tree = {part: tree}
            config = _build(Config, tree, "", _Context(origin, env, lenient=True), base=config)
    return config


# ---------------------------------------------------------------------------- files


def _read_file(source: str) -> Any:
    file = Path(source)
    if not file.exists():
        raise ConfigError(f"config file {source} does not exist")
    if file.is_dir():
        raise ConfigError(f"config path {source} is a directory, not a file")
    if file.suffix.lower() not in EXTENSIONS:
        raise ConfigError(
            f'config file {source} has the unknown extension "{file.suffix}";'
            " use .hcl, .yaml or .yml"
        )
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read config file {source}: {error}") from None
    return _parse_hcl(text, source) if file.suffix.lower() == ".hcl" else _parse_yaml(text, source)


def _parse_hcl(text: str, source: str) -> Any:
    # Imported here: the HCL parser costs 0.1 s, which runs without a config file skip.
    import hcl2
    from lark.exceptions import LarkError, UnexpectedCharacters, UnexpectedInput, UnexpectedToken

    # Plain Python values: unquoted strings, no comments, blocks as lists of maps.
    options = hcl2.SerializationOptions(
        with_comments=False,
        explicit_blocks=False,
        strip_string_quotes=True,
        preserve_heredocs=False,
        preserve_scientific_notation=False,
    )
    try:
        return hcl2.loads(text, serialization_options=options)
    except UnexpectedInput as error:
        if isinstance(error, UnexpectedToken):
            token = error.token
            near = (
                "end of file" if token.type == "$END" else json.dumps(token.value.strip() or "\n")
            )
        elif isinstance(error, UnexpectedCharacters):
            near = json.dumps(error.char)
        else:
            near = "end of file"
        raise ConfigError(
            f"{source}: HCL syntax error at line {error.line}, column {error.column} near {near}"
        ) from None
    except LarkError as error:
        raise ConfigError(f"{source}: HCL syntax error: {str(error).splitlines()[0]}") from None


def _parse_yaml(text: str, source: str) -> Any:
    try:
        import yaml
    except ImportError:
        raise ConfigError(
            f"{source} is YAML, which needs PyYAML (pip install pyyaml); or write the config in HCL"
        ) from None
    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or "invalid YAML"
        raise ConfigError(f"{source}: YAML syntax error{where}: {problem}") from None


# ---------------------------------------------------------------------------- the walker


@dataclasses.dataclass(frozen=True)
class _Context:
    origin: str  # file path, environment variable or "command line"
    env: Mapping[str, str]
    lenient: bool  # strings may stand for numbers, booleans, durations-in-seconds and lists

    def error(self, path: str, detail: str) -> ConfigError:
        return ConfigError(
            f"{self.origin}: {path}: {detail}" if path else f"{self.origin}: {detail}"
        )


def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


def _show(value: Any) -> str:
    try:
        return json.dumps(value)
    except TypeError:
        return repr(value)


def _build(
    cls: type,
    raw: Any,
    path: str,
    ctx: _Context,
    *,
    base: Any = None,
    items: _ItemCheck | None = None,
) -> Any:
    """Build schema dataclass ``cls`` from ``raw``; keys absent from ``raw`` come from ``base``
    (or the defaults), ``items`` checks the string lists of the block (filter matchers)."""
    fields = schema_fields(cls)
    values = {} if base is None else {f.name: getattr(base, f.name) for f in fields.values()}
    for key, value in _as_mapping(raw, path, ctx).items():
        known = fields.get(key)
        if known is None:
            raise _unknown_key(key, fields, path, ctx, getattr(cls, "UNSUPPORTED", {}))
        values[known.name] = _convert(
            value, known.type, known.spec, _join(path, key), ctx, values.get(known.name), items
        )
    missing = [f.key for f in fields.values() if f.required and f.name not in values]
    if missing:
        raise ctx.error(_join(path, missing[0]), "is required")
    try:
        return cls(**values)
    except InvalidCombination as error:
        raise ctx.error(_join(path, error.key), str(error)) from None


def _as_mapping(raw: Any, path: str, ctx: _Context) -> dict[str, Any]:
    """A block's keys; repeated HCL blocks (lists of maps) are merged, keys set twice refused."""
    if isinstance(raw, Mapping):
        return {str(key): value for key, value in raw.items()}
    if not (isinstance(raw, list) and raw and all(isinstance(part, Mapping) for part in raw)):
        raise ctx.error(path, f"expected a block, got {_show(raw)}")
    merged: dict[str, Any] = {}
    for part in raw:
        for key, value in _as_mapping(part, path, ctx).items():
            if key not in merged:
                merged[key] = value
            elif _is_block(merged[key]) and _is_block(value):
                merged[key] = [*_blocks(merged[key]), *_blocks(value)]
            else:
                raise ctx.error(_join(path, key), "is set more than once")
    return merged


def _is_block(value: Any) -> bool:
    return isinstance(value, Mapping) or (
        isinstance(value, list) and all(isinstance(part, Mapping) for part in value)
    )


def _blocks(value: Any) -> list[Any]:
    return [value] if isinstance(value, Mapping) else list(value)


def _convert(
    raw: Any,
    annotation: Any,
    spec: Spec,
    path: str,
    ctx: _Context,
    base: Any = None,
    items: _ItemCheck | None = None,
) -> Any:
    """Validate ``raw`` against one field type and return the stored value."""
    annotation, spec = unannotate(annotation, spec)
    if spec.evaluated_in:
        block = path.split(".")[-2]
        if block not in spec.evaluated_in:
            where = " or ".join(f'filter "{name}"' for name in spec.evaluated_in)
            raise ctx.error(path, f'is never evaluated in filter "{block}"; put it in {where}')
    inner = optional_inner(annotation)
    if inner is not None:
        if raw is None:
            return None
        annotation = inner
    lenient = ctx.lenient
    if isinstance(raw, str):
        raw, expanded = _expand(raw, path, ctx)
        lenient = lenient or expanded
    if dataclasses.is_dataclass(annotation):
        base = base if isinstance(base, annotation) else None
        return _build(annotation, raw, path, ctx, base=base, items=items or spec.items)
    try:
        if get_origin(annotation) is tuple:
            value: Any = _convert_list(raw, get_args(annotation)[0], path, ctx, items, lenient)
        elif get_origin(annotation) is Mapping:
            value = _convert_map(raw, get_args(annotation)[1], spec, path, ctx)
        else:
            value = _convert_scalar(raw, annotation, spec, lenient)
        if spec.check is not None:
            spec.check(value)
    except ValueError as error:
        raise ctx.error(path, str(error)) from None
    return value


def _convert_list(
    raw: Any, element: Any, path: str, ctx: _Context, items: _ItemCheck | None, lenient: bool
) -> tuple[Any, ...]:
    if isinstance(raw, str) and lenient:
        raw = [raw]
    if not isinstance(raw, (list, tuple)):
        raise ValueError(f"expected a list, got {_show(raw)}")
    return tuple(
        _convert(value, element, Spec(check=items), f"{path}[{index}]", ctx)
        for index, value in enumerate(raw)
    )


def _convert_map(
    raw: Any, value_type: Any, spec: Spec, path: str, ctx: _Context
) -> Mapping[str, Any]:
    data = _as_mapping(raw, path, ctx)
    if spec.defaults is not None:
        for key in data:
            if key not in spec.defaults:
                raise _unknown_key(key, spec.defaults, path, ctx)
    converted = {
        key: _convert(value, value_type, Spec(), _join(path, key), ctx)
        for key, value in data.items()
    }
    return types.MappingProxyType({**(spec.defaults or {}), **converted})


def _convert_scalar(raw: Any, annotation: Any, spec: Spec, lenient: bool) -> Any:
    """Check the type and range of one value; raises ValueError(detail)."""
    expected = _describe(annotation, spec)
    if spec.duration:
        if isinstance(raw, str):
            value = parse_duration(raw)
        elif lenient and _is_number(raw) and raw >= 0:
            value = float(raw)
        else:
            raise ValueError(f"expected {expected}, got {_show(raw)}")
        if spec.positive and value <= 0:
            raise ValueError(f"expected a duration longer than 0s, got {_show(raw)}")
        return value
    if isinstance(raw, str) and lenient and annotation in (bool, int, float):
        raw = _parse_text(raw.strip(), annotation)
    if annotation is bool and isinstance(raw, bool):
        return raw
    if annotation is int and isinstance(raw, int) and not isinstance(raw, bool):
        low, high = spec.bounds or (raw, raw)
        if low <= raw <= high:
            return raw
    elif annotation is float and _is_number(raw) and math.isfinite(raw):
        if raw > 0 or not spec.positive:
            return float(raw)
    elif annotation is str and isinstance(raw, str):
        if not spec.choices:
            return raw
        if raw.lower() in spec.choices:
            return raw.lower()
    raise ValueError(f"expected {expected}, got {_show(raw)}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _parse_text(text: str, annotation: type) -> Any:
    """A number or boolean written as a string (env vars, flags, env() results), else the text."""
    if annotation is bool:
        return _BOOLEANS.get(text.lower(), text)
    try:
        return annotation(text)
    except ValueError:
        return text


def _describe(annotation: Any, spec: Spec) -> str:
    if spec.duration:
        return 'a duration such as "500ms", "5s" or "1h 30m"'
    if annotation is bool:
        return "true or false"
    if annotation is int:
        return (
            f"an integer from {spec.bounds[0]} to {spec.bounds[1]}" if spec.bounds else "an integer"
        )
    if annotation is float:
        return "a number greater than 0" if spec.positive else "a number"
    if spec.choices:
        return "one of " + ", ".join(f'"{choice}"' for choice in spec.choices)
    return "a string"


def _expand(text: str, path: str, ctx: _Context) -> tuple[str, bool]:
    """Evaluate env("VAR") / env("VAR", "default") interpolations; True if any was present."""
    if "{" not in text:
        return text, False
    found = False

    def substitute(match: re.Match[str]) -> str:
        nonlocal found
        if match["escape"]:
            return match["escape"][1:]
        if match["other"]:
            raise ctx.error(
                path,
                f'unsupported expression "{match["other"]}"; only env("VAR") and'
                ' env("VAR", "default") are evaluated',
            )
        found = True
        name = _unescape(match["name"])
        value = ctx.env.get(name)
        if value is not None:
            return value
        if match["default"] is None:
            log.warning('%s: env("%s") is not set and has no default; using ""', path, name)
            return ""
        return _unescape(match["default"])

    return _TEMPLATE.sub(substitute, text), found


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text)


# ---------------------------------------------------------------------------- unknown keys


def _unknown_key(
    key: str,
    valid: Mapping[str, Any],
    path: str,
    ctx: _Context,
    unsupported: Mapping[str, str] | None = None,
) -> ConfigError:
    full = _join(path, key)
    if unsupported and key in unsupported:
        return ctx.error(full, f"{unsupported[key]} is not supported by this host tool; remove it")
    close = difflib.get_close_matches(key, list(valid), n=1)
    elsewhere = [known for known in _schema_paths() if known.rsplit(".", 1)[-1] == key]
    if elsewhere:  # a key of another block: most likely misplaced
        hint = f'did you mean "{elsewhere[0]}"?'
    elif close:
        hint = f'did you mean "{_join(path, close[0])}"?'
    else:
        hint = "valid keys here: " + ", ".join(valid)
    return ctx.error("", f'unknown key "{full}"; {hint}')


@functools.cache
def _schema_paths(cls: type = Config, prefix: str = "") -> tuple[str, ...]:
    """Every dotted key of the schema, for "did you mean" hints across blocks."""
    paths: list[str] = []
    for key, known in schema_fields(cls).items():
        path = _join(prefix, key)
        paths.append(path)
        inner = optional_inner(known.type) or known.type
        if dataclasses.is_dataclass(inner):
            paths.extend(_schema_paths(inner, path))
    return tuple(paths)

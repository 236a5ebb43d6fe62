"""Configuration: schema, loading (HCL/YAML, env, overrides) and rendering."""

from mermin_cli.config.durations import parse_duration
from mermin_cli.config.loader import load_config
from mermin_cli.config.schema import Config
from mermin_cli.errors import ConfigError

__all__ = ["Config", "ConfigError", "load_config", "parse_duration"]

"""Tests of the configuration layer: schema, loader, durations, values, rendering, CLI."""

from __future__ import annotations

import json
import logging
import sys
import types
from collections.abc import Mapping
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner, Result

from mermin_cli.cli.config_cmd import app as config_app
from mermin_cli.config import Config, ConfigError, load_config, parse_duration
from mermin_cli.config.durations import format_duration
from mermin_cli.config.loader import config_source, default_config_text
from mermin_cli.config.render import REDACTED, render_hcl, to_dict
from mermin_cli.config.schema import (
    BasicAuth,
    DiscoveryConfig,
    ExportConfig,
    FilterBlock,
    FilterConfig,
    InstrumentConfig,
    Matcher,
    OtlpAuth,
    OtlpExport,
    OtlpTls,
    SpanConfig,
    StdoutExport,
    TracesExportConfig,
)
from mermin_cli.config.values import compile_pattern, parse_cidrs, parse_port_ranges
from mermin_cli.errors import UsageError
from mermin_cli.logs import set_level

DEFAULT_HCL = Path(__file__).parents[1] / "mermin_cli" / "config" / "default.hcl"


@pytest.fixture
def write(tmp_path: Path):
    """Write a config file into tmp_path and return its path."""

    def _write(text: str, name: str = "mermin.hcl") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return _write


def load_text(write, text: str, env: Mapping[str, str] | None = None) -> Config:
    return load_config(write(text), env=env or {})


def config_error(write, text: str) -> str:
    """Load ``text`` expecting a ConfigError; return its message without the file prefix."""
    path = write(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert caught.value.exit_code == 2
    message = str(caught.value)
    assert "\n" not in message
    prefix = f"{path}: "
    assert message.startswith(prefix)
    return message[len(prefix) :]


# ---------------------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("5s", 5.0),
        ("2min", 120.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("24h", 86400.0),
        ("7d", 604800.0),
        ("1h 30m", 5400.0),
        ("1h30m", 5400.0),
        ("1us", 1e-6),
        ("10ns", 1e-8),
        ("100ms", 0.1),
        ("2 seconds", 2.0),
        ("1w", 604800.0),
        (" 0s ", 0.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("20", 'invalid duration "20": 20 has no unit; write e.g. "20s"'),
        ("5x", 'invalid duration "5x": unknown unit "x" (use ns, us, ms, s, m, h, d or w)'),
        ("1.5s", 'invalid duration "1.5s": 1.5 is not a whole number; use a smaller unit'),
        ("-5s", 'invalid duration "-5s": expected a duration such as'),
        ("", "invalid duration '': expected a string such as"),
        ("s", 'invalid duration "s": expected a duration such as'),
    ],
)
def test_parse_duration_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_duration(text)
    assert str(caught.value).startswith(message)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.0, "0s"),
        (0.1, "100ms"),
        (5.0, "5s"),
        (60.0, "1m"),
        (300.0, "5m"),
        (5400.0, "1h 30m"),
        (86400.0, "1d"),
        (1.5, "1s 500ms"),
        (1e-8, "10ns"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text) == seconds


# ---------------------------------------------------------------------------- values


def test_value_parsers() -> None:
    assert parse_port_ranges(["443", "8000-9000", " 53 "]) == [(443, 443), (8000, 9000), (53, 53)]
    assert [str(n) for n in parse_cidrs(["10.0.0.0/8", "10.0.0.1", "fd00::/8", "10.1.2.3/8"])] == [
        "10.0.0.0/8",
        "10.0.0.1/32",
        "fd00::/8",
        "10.0.0.0/8",
    ]
    with pytest.raises(ValueError, match="starts after it ends"):
        parse_port_ranges(["9000-8000"])
    with pytest.raises(ValueError, match="is not an IP address or CIDR"):
        parse_cidrs(["10.*"])


@pytest.mark.parametrize(
    ("pattern", "matches", "misses"),
    [
        ("eth0", ["eth0"], ["eth01", "xeth0"]),
        ("veth*", ["veth", "veth1a2b"], ["eth0"]),
        ("eth?", ["eth1"], ["eth", "eth10"]),
        ("en[ps]*", ["enp3s0", "ens5"], ["eno1"]),
        ("eth[!0]", ["eth1"], ["eth0"]),
        ("{eth,wl}*", ["eth0", "wlan0"], ["lo"]),
        ("a.b", ["a.b"], ["axb"]),
        ("/^ens[0-9]+$/", ["ens33"], ["ens", "xens1"]),
        ("/cali/", ["cali123", "xcalix"], ["cal"]),
    ],
)
def test_compile_pattern(pattern: str, matches: list[str], misses: list[str]) -> None:
    compiled = compile_pattern(pattern)
    assert all(compiled.search(name) for name in matches)
    assert not any(compiled.search(name) for name in misses)


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("eth[0", 'invalid glob "eth[0": "[" has no matching "]"'),
        ("{eth,wl", 'invalid glob "{eth,wl": "{" has no matching "}"'),
        ("/eth(/", 'invalid regular expression "/eth(/": missing ), unterminated subpattern'),
        ("x" * 257, "pattern is longer than 256 characters"),
    ],
)
def test_compile_pattern_rejects(pattern: str, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        compile_pattern(pattern)
    assert str(caught.value).startswith(message)


# ---------------------------------------------------------------------------- error cases


def test_unknown_key_suggests_the_closest_key(write) -> None:
    message = config_error(write, 'span { tcp_timout = "5s" }')
    assert message == 'unknown key "span.tcp_timout"; did you mean "span.tcp_timeout"?'


def test_unknown_key_in_the_wrong_block_suggests_its_real_place(write) -> None:
    message = config_error(write, 'tcp_timeout = "5s"')
    assert message == 'unknown key "tcp_timeout"; did you mean "span.tcp_timeout"?'


def test_unknown_filter_label(write) -> None:
    message = config_error(write, 'filter "sauce" {}')
    assert message == 'unknown key "filter.sauce"; did you mean "filter.source"?'


def test_unknown_key_without_close_match_lists_valid_keys(write) -> None:
    message = config_error(write, "parser { zzz = 1 }")
    assert message == (
        'unknown key "parser.zzz"; valid keys here: geneve_port, vxlan_port, wireguard_port'
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            'span { community_id_seed = "abc" }',
            'span.community_id_seed: expected an integer from 0 to 65535, got "abc"',
        ),
        (
            'discovery "instrument" { interfaces = "eth0" }',
            'discovery.instrument.interfaces: expected a list, got "eth0"',
        ),
        ('log_color = "yes"', 'log_color: expected true or false, got "yes"'),
        ("span = 5", "span: expected a block, got 5"),
        (
            "span { tcp_timeout = 20 }",
            'span.tcp_timeout: expected a duration such as "500ms", "5s" or "1h 30m", got 20',
        ),
    ],
)
def test_wrong_type(write, text: str, message: str) -> None:
    assert config_error(write, text) == message


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            'span { tcp_timeout = "20" }',
            'span.tcp_timeout: invalid duration "20": 20 has no unit; write e.g. "20s"',
        ),
        (
            'shutdown_timeout = "5 parsecs"',
            'shutdown_timeout: invalid duration "5 parsecs": unknown unit "parsecs"'
            " (use ns, us, ms, s, m, h, d or w)",
        ),
        (
            'span { tcp_timeout = "0s" }',
            'span.tcp_timeout: expected a duration longer than 0s, got "0s"',
        ),
    ],
)
def test_bad_duration(write, text: str, message: str) -> None:
    assert config_error(write, text) == message


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            'filter "source" { address = { match = ["10.*"] } }',
            'filter.source.address.match[0]: "10.*" is not an IP address or CIDR'
            ' such as "10.0.0.0/8" or "fd00::/8"',
        ),
        (
            'filter "destination" { port = { match = ["80", "9000-8000"] } }',
            'filter.destination.port.match[1]: range "9000-8000" starts after it ends',
        ),
        (
            'filter "destination" { port = { not_match = ["70000"] } }',
            'filter.destination.port.not_match[0]: "70000" is outside 0..65535',
        ),
        (
            'filter "flow" { ip_ttl = { match = ["1-300"] } }',
            'filter.flow.ip_ttl.match[0]: "1-300" is outside 0..255',
        ),
        (
            'filter "network" { interface_name = { match = ["eth[0"] } }',
            'filter.network.interface_name.match[0]: invalid glob "eth[0": "[" has no matching "]"',
        ),
        (
            'discovery "instrument" { interfaces = ["eth0", "/eth(/"] }',
            'discovery.instrument.interfaces[1]: invalid regular expression "/eth(/":'
            " missing ), unterminated subpattern at position 3",
        ),
    ],
)
def test_bad_filter_and_pattern_values(write, text: str, message: str) -> None:
    assert config_error(write, text) == message


def test_filter_field_in_a_block_that_never_evaluates_it(write) -> None:
    message = config_error(write, 'filter "network" { port = { match = ["80"] } }')
    assert message == (
        'filter.network.port: is never evaluated in filter "network";'
        ' put it in filter "source" or filter "destination"'
    )


@pytest.mark.parametrize("priority", [0, 32768])
def test_tc_priority_out_of_range(write, priority: int) -> None:
    message = config_error(write, f'discovery "instrument" {{ tc_priority = {priority} }}')
    assert message == (
        f"discovery.instrument.tc_priority: expected an integer from 1 to 32767, got {priority}"
    )


def test_tcx_order_choices(write) -> None:
    message = config_error(write, 'discovery "instrument" { tcx_order = "middle" }')
    assert (
        message == 'discovery.instrument.tcx_order: expected one of "first", "last", got "middle"'
    )


@pytest.mark.parametrize(
    "key",
    [
        "pipeline.flow_capture.flow_stats_capacity",
        "pipeline.flow_capture.flow_events_capacity",
        "pipeline.flow_producer.workers",
        "pipeline.flow_producer.worker_queue_capacity",
        "pipeline.flow_producer.flow_span_queue_capacity",
        "pipeline.k8s_decorator.decorated_span_queue_capacity",
        "export.traces.otlp.max_queue_size",
        "export.traces.otlp.max_concurrent_exports",
    ],
)
@pytest.mark.parametrize("value", [0, -1])
def test_sizes_must_be_positive(write, key: str, value: int) -> None:
    *blocks, leaf = key.split(".")
    text = "".join(f"{block} {{ " for block in blocks) + f"{leaf} = {value}" + " }" * len(blocks)
    message = config_error(write, text)
    assert message == f"{key}: expected an integer from 1 to 4294967295, got {value}"


@pytest.mark.parametrize(
    ("text", "key", "value"),
    [
        ("parser { vxlan_port = 0 }", "parser.vxlan_port", 0),
        ("parser { geneve_port = 65536 }", "parser.geneve_port", 65536),
        ('internal "metrics" { port = 70000 }', "internal.metrics.port", 70000),
        ('internal "server" { port = 0 }', "internal.server.port", 0),
    ],
)
def test_ports_out_of_range(write, text: str, key: str, value: int) -> None:
    assert config_error(write, text) == f"{key}: expected an integer from 1 to 65535, got {value}"


@pytest.mark.parametrize(
    ("level", "mermin_debug", "library_debug", "library_info"),
    [("trace", True, True, True), ("debug", True, False, True), ("info", False, False, True)],
)
def test_log_levels_debug_is_ours_trace_adds_libraries(
    level: str, mermin_debug: bool, library_debug: bool, library_info: bool
) -> None:
    root = logging.getLogger()
    saved = root.level, logging.getLogger("mermin").level
    try:
        set_level(level)
        assert logging.getLogger("mermin.engine").isEnabledFor(logging.DEBUG) is mermin_debug
        assert logging.getLogger("pyroute2.netlink").isEnabledFor(logging.DEBUG) is library_debug
        assert logging.getLogger("pyroute2.netlink").isEnabledFor(logging.INFO) is library_info
    finally:
        root.setLevel(saved[0])
        logging.getLogger("mermin").setLevel(saved[1])


def test_log_level_choices(write) -> None:
    message = config_error(write, 'log_level = "verbose"')
    assert message == (
        'log_level: expected one of "trace", "debug", "info", "warn", "error", got "verbose"'
    )
    assert load_text(write, 'log_level = "DEBUG"').log_level == "debug"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("span {\n  tcp_timeout = \n}\n", 'HCL syntax error at line 2, column 17 near "}"'),
        ('span {\n  tcp_timeout = "5s"\n', "HCL syntax error at line 3, column 1 near end of file"),
        ('log_level = "info"\nspan { = }\n', 'HCL syntax error at line 2, column 8 near "='),
    ],
)
def test_hcl_syntax_error_names_the_line(write, text: str, message: str) -> None:
    assert config_error(write, text).startswith(message)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.hcl"
    with pytest.raises(ConfigError, match=f"^config file {path} does not exist$"):
        load_config(path, env={})


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"^config path {tmp_path} is a directory, not a file$"):
        load_config(tmp_path, env={})


def test_unknown_extension(write) -> None:
    path = write("log_level = 'info'", name="mermin.toml")
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert str(caught.value) == (
        f'config file {path} has the unknown extension ".toml"; use .hcl, .yaml or .yml'
    )


def test_yaml_needs_pyyaml(write, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "yaml", None)  # makes `import yaml` fail
    path = write("log_level: debug\n", name="mermin.yaml")
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert str(caught.value) == (
        f"{path} is YAML, which needs PyYAML (pip install pyyaml); or write the config in HCL"
    )


def test_yaml_loads_the_same_tree(write, monkeypatch: pytest.MonkeyPatch) -> None:
    # JSON is YAML: a stand-in module keeps the test independent of PyYAML being installed.
    fake = types.SimpleNamespace(safe_load=json.loads, YAMLError=ValueError)
    monkeypatch.setitem(sys.modules, "yaml", fake)
    tree = {"log_level": "debug", "discovery": {"instrument": {"interfaces": ["eth*"]}}}
    config = load_config(write(json.dumps(tree), name="mermin.yml"), env={})
    assert config.log_level == "debug"
    assert config.discovery.instrument.interfaces == ("eth*",)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            'discovery "informer" "k8s" { kubeconfig_path = "" }',
            "discovery.informer: the Kubernetes informer is not supported by this host tool;"
            " remove it",
        ),
        (
            'attributes "source" "k8s" {}',
            "attributes: Kubernetes attribute enrichment is not supported by this host tool;"
            " remove it",
        ),
    ],
)
def test_kubernetes_blocks_are_rejected(write, text: str, message: str) -> None:
    assert config_error(write, text) == message


def test_unsupported_expression(write) -> None:
    message = config_error(write, 'log_level = "${upper("info")}"')
    assert message == (
        'log_level: unsupported expression "${upper("info")}"; only env("VAR") and'
        ' env("VAR", "default") are evaluated'
    )


def test_key_set_twice(write) -> None:
    message = config_error(write, 'span { tcp_timeout = "1s" }\nspan { tcp_timeout = "2s" }')
    assert message == "span.tcp_timeout: is set more than once"


def test_histogram_buckets(write) -> None:
    config = load_text(
        write, 'internal "metrics" { histogram_buckets { mermin_export_batch_size = [1, 5] } }'
    )
    buckets = config.internal.metrics.histogram_buckets
    assert buckets["mermin_export_batch_size"] == (1.0, 5.0)
    assert buckets["mermin_shutdown_duration_seconds"][0] == 0.1  # defaults kept
    message = config_error(
        write, 'internal "metrics" { histogram_buckets { mermin_export_batch_size = [5, 1] } }'
    )
    assert message == (
        "internal.metrics.histogram_buckets.mermin_export_batch_size:"
        " bucket bounds must be a non-empty, strictly increasing list"
    )
    message = config_error(
        write, 'internal "metrics" { histogram_buckets { mermin_export_batch = [5] } }'
    )
    assert message == (
        'unknown key "internal.metrics.histogram_buckets.mermin_export_batch";'
        ' did you mean "internal.metrics.histogram_buckets.mermin_export_batch_size"?'
    )


def test_metrics_and_server_ports_collide(write) -> None:
    message = config_error(write, 'internal "server" { port = 10250 }')
    assert (
        message == "internal.server.port: 10250 is also the port of internal.metrics; pick another"
    )


# ---------------------------------------------------------------------------- export rules


def otlp_error(write, body: str) -> str:
    return config_error(write, f'export "traces" {{ otlp = {{ {body} }} }}')


def test_client_cert_without_client_key(write) -> None:
    cert = write("x", name="client.pem")
    message = otlp_error(write, f'tls = {{ client_cert = "{cert}" }}')
    assert message == (
        "export.traces.otlp.tls.client_key: is required when client_cert is set"
        " (mutual TLS needs both)"
    )


def test_insecure_skip_verify_with_client_cert(write) -> None:
    cert = write("x", name="client.pem")
    key = write("x", name="client-key.pem")
    message = otlp_error(
        write,
        f'tls = {{ insecure_skip_verify = true, client_cert = "{cert}", client_key = "{key}" }}',
    )
    assert message == (
        "export.traces.otlp.tls.insecure_skip_verify: cannot be combined with client_cert"
        " and client_key"
    )


def test_header_collides_with_auth(write) -> None:
    message = otlp_error(write, 'headers = { authorization = "x" }, auth = { bearer = "t" }')
    assert message == (
        "export.traces.otlp.headers.authorization: collides with the Authorization header"
        " set by auth; remove one"
    )


def test_endpoint_must_be_a_url(write) -> None:
    message = otlp_error(write, 'endpoint = "localhost:4317"')
    assert message == (
        'export.traces.otlp.endpoint: "localhost:4317" is not a URL; expected http://HOST:PORT'
        ' or https://HOST:PORT such as "http://localhost:4317"'
    )


def test_unknown_protocol(write) -> None:
    message = otlp_error(write, 'protocol = "http_json"')
    assert message == (
        'export.traces.otlp.protocol: expected one of "grpc", "http_binary", got "http_json"'
    )


def test_ca_cert_must_exist(write) -> None:
    message = otlp_error(write, 'tls = { ca_cert = "/nonexistent/ca.pem" }')
    assert message == 'export.traces.otlp.tls.ca_cert: file "/nonexistent/ca.pem" does not exist'


def test_basic_auth_needs_pass(write) -> None:
    message = otlp_error(write, 'auth = { basic = { user = "u" } }')
    assert message == "export.traces.otlp.auth.basic.pass: is required"


def test_basic_and_bearer_together(write) -> None:
    message = otlp_error(write, 'auth = { bearer = "t", basic = { user = "u", pass = "p" } }')
    assert (
        message == "export.traces.otlp.auth.bearer: cannot be combined with basic; keep one of them"
    )


def test_batch_larger_than_queue(write) -> None:
    message = otlp_error(write, "max_batch_size = 4096, max_queue_size = 1024")
    assert message == (
        "export.traces.otlp.max_batch_size: 4096 is larger than max_queue_size (1024)"
    )


def test_stdout_format(write) -> None:
    message = config_error(write, 'export "traces" { stdout = { format = "" } }')
    assert message == (
        'export.traces.stdout.format: expected one of "text", "text_indent", "json", got ""'
    )


# ---------------------------------------------------------------------------- precedence


def test_precedence_default_file_env_overrides(write) -> None:
    path = write('log_level = "debug"\nspan { tcp_timeout = "7s" }')
    env = {"MERMIN_LOG_LEVEL": "warn", "MERMIN_CONFIG_AUTO_RELOAD": "true"}

    assert load_config(None, env={}).log_level == "info"
    from_file = load_config(path, env={})
    assert (from_file.log_level, from_file.span.tcp_timeout) == ("debug", 7.0)
    from_env = load_config(path, env=env)
    assert (from_env.log_level, from_env.auto_reload, from_env.span.tcp_timeout) == (
        "warn",
        True,
        7.0,
    )
    overridden = load_config(
        path, env=env, overrides={"log_level": "error", "span.tcp_timeout": "9s"}
    )
    assert (overridden.log_level, overridden.span.tcp_timeout) == ("error", 9.0)
    assert overridden.auto_reload is True


def test_config_path_from_environment(write) -> None:
    path = write('log_level = "trace"')
    other = write('log_level = "error"', name="other.hcl")
    env = {"MERMIN_CONFIG_PATH": str(path)}
    assert config_source(None, env) == str(path)
    assert config_source(other, env) == str(other)
    assert config_source(None, {}) is None
    assert load_config(env=env).log_level == "trace"
    assert load_config(other, env=env).log_level == "error"


def test_overrides_accept_typed_values_and_strings() -> None:
    config = load_config(
        env={},
        overrides={
            "discovery.instrument.interfaces": ["eth0", "veth*"],
            "span.udp_timeout": 9,
            "span.tcp_timeout": "2m",
            "auto_reload": "yes",
            "internal.metrics.port": "9100",
            "export.traces.otlp.endpoint": "https://collector:4317",
            "log_level": None,  # flag not given
        },
    )
    assert config.discovery.instrument.interfaces == ("eth0", "veth*")
    assert (config.span.udp_timeout, config.span.tcp_timeout) == (9.0, 120.0)
    assert config.auto_reload is True
    assert config.internal.metrics.port == 9100
    assert config.export.traces.otlp == OtlpExport(endpoint="https://collector:4317")
    assert config.log_level == "info"


def test_bad_override_names_the_command_line() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(env={}, overrides={"span.tcp_timout": "5s"})
    assert str(caught.value) == (
        'command line: unknown key "span.tcp_timout"; did you mean "span.tcp_timeout"?'
    )
    with pytest.raises(ConfigError) as caught:
        load_config(env={}, overrides={"discovery.instrument.tc_priority": "high"})
    assert str(caught.value) == (
        "command line: discovery.instrument.tc_priority: expected an integer from 1 to 32767,"
        ' got "high"'
    )


def test_bad_environment_variable_is_named() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(env={"MERMIN_LOG_LEVEL": "loud"})
    assert str(caught.value) == (
        "environment variable MERMIN_LOG_LEVEL: log_level: expected one of"
        ' "trace", "debug", "info", "warn", "error", got "loud"'
    )


# ---------------------------------------------------------------------------- HCL spellings


LABELLED = """
discovery "instrument" {
  interfaces = ["eth*"]
  tcx_order = "last"
}
filter "source" {
  address = { match = ["10.0.0.0/8"] }
}
export "traces" {
  stdout = { format = "json" }
  otlp = {
    endpoint = "http://collector:4317"
    auth = { basic = { user = "u", pass = "p" } }
  }
}
internal "metrics" {
  port = 9100
  histogram_buckets {
    mermin_export_batch_size = [1, 2]
  }
}
internal "server" {
  enabled = false
}
"""

NESTED = """
discovery {
  instrument {
    interfaces = ["eth*"]
    tcx_order = "last"
  }
}
filter {
  source {
    address {
      match = ["10.0.0.0/8"]
    }
  }
}
export {
  traces {
    stdout {
      format = "json"
    }
    otlp {
      endpoint = "http://collector:4317"
      auth {
        basic {
          user = "u"
          pass = "p"
        }
      }
    }
  }
}
internal {
  metrics {
    port = 9100
    histogram_buckets = { mermin_export_batch_size = [1, 2] }
  }
  server {
    enabled = false
  }
}
"""


def test_labelled_blocks_and_nested_maps_are_equivalent(write) -> None:
    labelled = load_text(write, LABELLED)
    assert labelled == load_text(write, NESTED)
    assert labelled.discovery.instrument.tcx_order == "last"
    assert labelled.filter.source.address == Matcher(match=("10.0.0.0/8",))
    assert labelled.export.traces.stdout == StdoutExport(format="json")
    assert labelled.export.traces.otlp.auth.basic == BasicAuth(user="u", password="p")
    assert labelled.internal.metrics.port == 9100
    assert labelled.internal.server.enabled is False


def test_both_spellings_merge(write) -> None:
    text = (
        'discovery "instrument" { tc_priority = 5 }\n'
        'discovery { instrument { tcx_order = "last" } }'
    )
    instrument = load_text(write, text).discovery.instrument
    assert (instrument.tc_priority, instrument.tcx_order) == (5, "last")


# ---------------------------------------------------------------------------- env()


def test_env_function_with_and_without_default(write, caplog: pytest.LogCaptureFixture) -> None:
    text = """
    discovery "instrument" { interfaces = [env("IFACE"), env("OTHER", "veth*"), env("NONE")] }
    log_level = env("LEVEL", "info")
    """
    with caplog.at_level(logging.WARNING, logger="mermin.config"):
        config = load_text(write, text, env={"IFACE": "eth1", "LEVEL": "debug"})
    assert config.discovery.instrument.interfaces == ("eth1", "veth*", "")
    assert config.log_level == "debug"
    assert [r.getMessage() for r in caplog.records] == [
        'discovery.instrument.interfaces[2]: env("NONE") is not set and has no default; using ""'
    ]


def test_env_inside_interpolation(write) -> None:
    text = """
    export "traces" {
      otlp = {
        endpoint = "https://${env("HOST", "localhost")}:${env("PORT")}"
        headers = { "x-tenant" = "team-${env("TEAM", "a")}", "x-raw" = "$${literal}" }
      }
    }
    """
    otlp = load_text(write, text, env={"PORT": "4318"}).export.traces.otlp
    assert otlp.endpoint == "https://localhost:4318"
    assert dict(otlp.headers) == {"x-tenant": "team-a", "x-raw": "${literal}"}


def test_env_values_may_stand_for_numbers_and_booleans(write) -> None:
    text = 'internal "metrics" {\n port = env("PORT", "9100")\n enabled = "${env("ON")}"\n}'
    metrics = load_text(write, text, env={"ON": "false"}).internal.metrics
    assert (metrics.port, metrics.enabled) == (9100, False)


# ---------------------------------------------------------------------------- default and render


def test_default_hcl_is_exactly_the_default_config() -> None:
    assert load_config(DEFAULT_HCL, env={}) == Config()
    assert default_config_text() == DEFAULT_HCL.read_text()


def full_config(tmp_path: Path) -> Config:
    """A configuration that sets every optional block and some awkward strings."""
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    return Config(
        log_level="debug",
        shutdown_timeout=1.5,
        discovery=DiscoveryConfig(
            instrument=InstrumentConfig(interfaces=("eth0", "/^ens[0-9]+$/"), tc_priority=50)
        ),
        filter=FilterConfig(
            source=FilterBlock(address=Matcher(match=("10.0.0.0/8",), not_match=("10.0.0.1",))),
            flow=FilterBlock(icmp_code_name=Matcher(match=("",)), ip_ttl=Matcher(match=("1-64",))),
        ),
        span=SpanConfig(tcp_timeout=5400.0, hostname_resolve_timeout=0.25, community_id_seed=7),
        export=ExportConfig(
            traces=TracesExportConfig(
                stdout=StdoutExport(format="json"),
                otlp=OtlpExport(
                    endpoint="https://collector:4317",
                    protocol="http_binary",
                    headers=types.MappingProxyType({"x-a": 'quote " and ${dollar} \\ \n'}),
                    auth=OtlpAuth(bearer="token"),
                    tls=OtlpTls(ca_cert=str(ca)),
                ),
            )
        ),
    )


def test_render_round_trip(write, tmp_path: Path) -> None:
    for config in (Config(), full_config(tmp_path)):
        assert load_config(write(render_hcl(config)), env={}) == config


def test_render_redacts_secrets(tmp_path: Path) -> None:
    config = full_config(tmp_path)
    text = render_hcl(config, redact=True)
    assert "token" not in text
    assert f'bearer = "{REDACTED}"' in text
    data = to_dict(config, redact=True)
    assert data["export"]["traces"]["otlp"]["auth"]["bearer"] == REDACTED
    assert data["export"]["traces"]["otlp"]["headers"] == {"x-a": REDACTED}
    assert to_dict(config)["export"]["traces"]["otlp"]["auth"]["bearer"] == "token"


def test_to_dict_is_json_ready() -> None:
    data = json.loads(json.dumps(to_dict(Config())))
    assert data["span"]["trace_id_timeout"] == 86400.0
    assert data["discovery"]["instrument"]["interfaces"] == []
    assert data["export"]["traces"] == {"stdout": None, "otlp": None}


def test_invalid_combinations_also_guard_code() -> None:
    with pytest.raises(ValueError, match="is required when client_cert is set"):
        OtlpTls(client_cert="/x")


# ---------------------------------------------------------------------------- CLI


def invoke(*args: str, env: Mapping[str, str] | None = None) -> Result:
    """Run `config ARGS` under a stand-in root app; errors stay in ``result.exception``."""
    root = typer.Typer()
    root.add_typer(config_app, name="config")

    @root.callback()
    def main() -> None:
        """Stand-in for the main app."""

    clean = dict.fromkeys(("MERMIN_CONFIG_PATH", "MERMIN_LOG_LEVEL", "MERMIN_CONFIG_AUTO_RELOAD"))
    return CliRunner().invoke(root, ["config", *args], env={**clean, **(env or {})})


def test_cli_validate_valid(write) -> None:
    path = write('log_level = "debug"')
    result = invoke("validate", str(path))
    assert result.exit_code == 0
    assert result.stdout == f"{path}: valid\n"


def test_cli_validate_invalid(write) -> None:
    path = write('span { tcp_timout = "5s" }')
    result = invoke("validate", str(path))
    assert isinstance(result.exception, ConfigError)
    assert result.exception.exit_code == 2
    assert str(result.exception) == (
        f'{path}: unknown key "span.tcp_timout"; did you mean "span.tcp_timeout"?'
    )
    assert result.stdout == ""


def test_cli_show_effective_config(write) -> None:
    path = write('log_level = "debug"')
    result = invoke("show", "-c", str(path), env={"MERMIN_CONFIG_AUTO_RELOAD": "1"})
    assert result.exit_code == 0
    assert result.stdout.startswith(f"# effective configuration from {path}\n")
    assert 'log_level = "debug"' in result.stdout
    assert "auto_reload = true" in result.stdout


def test_cli_show_json(write) -> None:
    path = write('span { tcp_timeout = "7s" }')
    result = invoke("show", "--json", "--config", str(path))
    assert result.exit_code == 0
    assert json.loads(result.stdout)["span"]["tcp_timeout"] == 7.0


def test_cli_show_default() -> None:
    result = invoke("show", "--default")
    assert result.exit_code == 0
    assert result.stdout == default_config_text()
    result = invoke("show", "--default", "--json")
    assert json.loads(result.stdout) == to_dict(Config())


def test_cli_show_default_with_config_is_a_usage_error(write) -> None:
    result = invoke("show", "--default", "-c", str(write("")))
    assert isinstance(result.exception, UsageError)
    assert str(result.exception) == "--default and --config cannot be combined; pick one"

"""The configuration schema: frozen dataclasses holding the defaults of the reference.

Durations are float seconds. Field types carry their validation rules as
``Annotated[..., Spec(...)]``; the loader and the renderers walk these dataclasses
generically (see ``schema_fields``), so a new key needs only a new field here.
"""

import dataclasses
import functools
import itertools
import os
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Annotated, Any, ClassVar, Union, get_args, get_origin
from urllib.parse import urlsplit

from mermin_cli.config.values import PORT_BOUNDS, compile_pattern, parse_cidr, parse_range

LOG_LEVELS = ("trace", "debug", "info", "warn", "error")
STDOUT_FORMATS = ("text", "text_indent", "json")
OTLP_PROTOCOLS = ("grpc", "http_binary")


@dataclass(frozen=True)
class Spec:
    """Validation and rendering rules of one field, attached with ``Annotated``."""

    key: str | None = None  # key in the config file when it differs from the attribute
    bounds: tuple[int, int] | None = None  # inclusive range of an integer
    choices: tuple[str, ...] = ()  # allowed strings, matched case-insensitively
    duration: bool = False  # a humantime string, stored as seconds
    positive: bool = False  # a duration or number must be > 0
    check: Callable[[Any], object] | None = None  # raises ValueError on a bad value
    items: Callable[[str], object] | None = None  # check for the string lists of a sub-block
    evaluated_in: tuple[str, ...] = ()  # filter blocks where the field is consulted
    defaults: Mapping[str, Any] | None = None  # fixed keys (and defaults) of a map
    labelled: bool = False  # sub-blocks are written `name "label" { }`
    secret: bool = False  # hidden when the configuration is shown


class InvalidCombination(ValueError):
    """Keys that are valid alone but not together; ``key`` is relative to the raising block."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class SchemaField:
    """One key of a schema dataclass."""

    name: str  # attribute name
    key: str  # key in the config file
    type: Any  # the annotation without Annotated
    spec: Spec
    required: bool


def unannotate(annotation: Any, spec: Spec | None = None) -> tuple[Any, Spec]:
    """Split ``Annotated[T, Spec(...)]`` into ``(T, Spec)``; plain types get ``spec``."""
    if get_origin(annotation) is Annotated:
        found = [m for m in annotation.__metadata__ if isinstance(m, Spec)]
        return annotation.__origin__, found[0] if found else Spec()
    return annotation, spec or Spec()


def optional_inner(annotation: Any) -> Any | None:
    """``T`` for ``T | None``, else None."""
    args = get_args(annotation)
    if (
        get_origin(annotation) in (Union, types.UnionType)
        and len(args) == 2
        and types.NoneType in args
    ):
        return args[0] if args[1] is types.NoneType else args[1]
    return None


@functools.cache
def schema_fields(cls: type) -> Mapping[str, SchemaField]:
    """The fields of a schema dataclass in declaration order, keyed by config key."""
    result = {}
    for item in dataclasses.fields(cls):
        annotation, spec = unannotate(item.type)
        key = spec.key or item.name
        required = item.default is dataclasses.MISSING and (
            item.default_factory is dataclasses.MISSING
        )
        result[key] = SchemaField(item.name, key, annotation, spec, required)
    return types.MappingProxyType(result)


# Reusable field types.
Duration = Annotated[float, Spec(duration=True)]
PositiveDuration = Annotated[float, Spec(duration=True, positive=True)]
Count = Annotated[int, Spec(bounds=(1, 2**32 - 1))]
Port = Annotated[int, Spec(bounds=(1, 65535))]
NamePattern = Annotated[str, Spec(check=compile_pattern)]


def _check_file(path: str) -> None:
    if not os.path.isfile(path):
        raise ValueError(f'file "{path}" does not exist')


def _check_endpoint(url: str) -> None:
    parts = urlsplit(url)
    try:
        valid = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
    except ValueError:  # a port that is not a number 0..65535
        valid = False
    if not valid:
        raise ValueError(
            f'"{url}" is not a URL; expected http://HOST:PORT or https://HOST:PORT'
            ' such as "http://localhost:4317"'
        )


def _check_buckets(bounds: tuple[float, ...]) -> None:
    if not bounds or any(a >= b for a, b in itertools.pairwise(bounds)):
        raise ValueError("bucket bounds must be a non-empty, strictly increasing list")


# ---------------------------------------------------------------------------- pipeline


@dataclass(frozen=True)
class FlowCaptureConfig:
    """Kernel-side sizes."""

    flow_stats_capacity: Count = 16384
    flow_events_capacity: Count = 1024


@dataclass(frozen=True)
class FlowProducerConfig:
    """New-flow workers and flow-store pollers."""

    workers: Count = 4
    worker_queue_capacity: Count = 1024
    flow_store_poll_interval: PositiveDuration = 5.0
    flow_span_queue_capacity: Count = 4096


@dataclass(frozen=True)
class DecoratorConfig:
    """The decoration stage in front of the exporters."""

    decorated_span_queue_capacity: Count = 8192


@dataclass(frozen=True)
class PipelineConfig:
    """Capacities of the bounded pipeline stages."""

    flow_capture: FlowCaptureConfig = field(default_factory=FlowCaptureConfig)
    flow_producer: FlowProducerConfig = field(default_factory=FlowProducerConfig)
    k8s_decorator: DecoratorConfig = field(default_factory=DecoratorConfig)


@dataclass(frozen=True)
class ParserConfig:
    """UDP ports recognised as tunnel encapsulations."""

    geneve_port: Port = 6081
    vxlan_port: Port = 4789
    wireguard_port: Port = 51820


# ---------------------------------------------------------------------------- discovery


@dataclass(frozen=True)
class InstrumentConfig:
    """Which interfaces get the capture programs; no pattern = the default-route interfaces."""

    interfaces: tuple[NamePattern, ...] = ()
    auto_discover_interfaces: bool = True
    tc_priority: Annotated[int, Spec(bounds=(1, 32767))] = 1
    tcx_order: Annotated[str, Spec(choices=("first", "last"))] = "first"


@dataclass(frozen=True)
class DiscoveryConfig:
    """Interface discovery."""

    UNSUPPORTED: ClassVar[Mapping[str, str]] = {"informer": "the Kubernetes informer"}

    instrument: InstrumentConfig = field(default_factory=InstrumentConfig)


# ---------------------------------------------------------------------------- filters


@dataclass(frozen=True)
class Matcher:
    """Allowed iff no ``not_match`` entry matches and ``match`` is empty or one entry matches."""

    match: tuple[str, ...] = ()
    not_match: tuple[str, ...] = ()


_ENDPOINT = ("source", "destination")
_CidrMatcher = Annotated[Matcher | None, Spec(items=parse_cidr, evaluated_in=_ENDPOINT)]
_PortMatcher = Annotated[
    Matcher | None,
    Spec(
        items=partial(parse_range, low=PORT_BOUNDS[0], high=PORT_BOUNDS[1]), evaluated_in=_ENDPOINT
    ),
]
_NetworkGlob = Annotated[Matcher | None, Spec(items=compile_pattern, evaluated_in=("network",))]
_IfindexMatcher = Annotated[
    Matcher | None,
    Spec(items=partial(parse_range, low=0, high=2**32 - 1), evaluated_in=("network",)),
]
_FlowGlob = Annotated[Matcher | None, Spec(items=compile_pattern, evaluated_in=("flow",))]
_TtlMatcher = Annotated[
    Matcher | None, Spec(items=partial(parse_range, low=0, high=255), evaluated_in=("flow",))
]
_FlowLabelMatcher = Annotated[
    Matcher | None, Spec(items=partial(parse_range, low=0, high=2**20 - 1), evaluated_in=("flow",))
]


@dataclass(frozen=True)
class FilterBlock:
    """One filter dimension; each field is consulted only in the blocks named in its Spec."""

    address: _CidrMatcher = None
    port: _PortMatcher = None
    transport: _NetworkGlob = None
    type: _NetworkGlob = None
    interface_name: _NetworkGlob = None
    interface_index: _IfindexMatcher = None
    interface_mac: _NetworkGlob = None
    connection_state: _FlowGlob = None
    tcp_flags_tags: _FlowGlob = None
    ip_dscp_name: _FlowGlob = None
    ip_ecn_name: _FlowGlob = None
    ip_ttl: _TtlMatcher = None
    ip_flow_label: _FlowLabelMatcher = None
    icmp_type_name: _FlowGlob = None
    icmp_code_name: _FlowGlob = None


@dataclass(frozen=True)
class FilterConfig:
    """Flow filters, evaluated once per new flow; all fields of all blocks are ANDed."""

    source: FilterBlock = field(default_factory=FilterBlock)
    destination: FilterBlock = field(default_factory=FilterBlock)
    network: FilterBlock = field(default_factory=FilterBlock)
    flow: FilterBlock = field(default_factory=FilterBlock)


# ---------------------------------------------------------------------------- span


@dataclass(frozen=True)
class SpanConfig:
    """Flow timeouts, record interval, Community ID and trace correlation, hostnames."""

    max_record_interval: PositiveDuration = 60.0
    generic_timeout: PositiveDuration = 30.0
    icmp_timeout: PositiveDuration = 10.0
    tcp_timeout: PositiveDuration = 20.0
    tcp_fin_timeout: PositiveDuration = 5.0
    tcp_rst_timeout: PositiveDuration = 5.0
    udp_timeout: PositiveDuration = 60.0
    community_id_seed: Annotated[int, Spec(bounds=(0, 65535))] = 0
    trace_id_timeout: PositiveDuration = 86400.0
    enable_hostname_resolution: bool = True
    hostname_resolve_timeout: PositiveDuration = 0.1


# ---------------------------------------------------------------------------- export


@dataclass(frozen=True)
class StdoutExport:
    """Flow records on stdout."""

    format: Annotated[str, Spec(choices=STDOUT_FORMATS)] = "text_indent"


@dataclass(frozen=True)
class BasicAuth:
    """HTTP basic authentication."""

    user: str
    password: Annotated[str, Spec(key="pass", secret=True)] = field(repr=False)


@dataclass(frozen=True)
class OtlpAuth:
    """Credentials sent in the Authorization header."""

    basic: BasicAuth | None = None
    bearer: Annotated[str | None, Spec(secret=True)] = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.basic is not None and self.bearer is not None:
            raise InvalidCombination("bearer", "cannot be combined with basic; keep one of them")


@dataclass(frozen=True)
class OtlpTls:
    """TLS settings of the OTLP connection."""

    insecure_skip_verify: bool = False
    ca_cert: Annotated[str | None, Spec(check=_check_file)] = None
    client_cert: Annotated[str | None, Spec(check=_check_file)] = None
    client_key: Annotated[str | None, Spec(check=_check_file)] = None

    def __post_init__(self) -> None:
        if (self.client_cert is None) != (self.client_key is None):
            missing, given = (
                ("client_key", "client_cert")
                if self.client_key is None
                else ("client_cert", "client_key")
            )
            raise InvalidCombination(
                missing, f"is required when {given} is set (mutual TLS needs both)"
            )
        if self.insecure_skip_verify and self.client_cert is not None:
            raise InvalidCombination(
                "insecure_skip_verify", "cannot be combined with client_cert and client_key"
            )


@dataclass(frozen=True)
class OtlpExport:
    """OTLP exporter; present = enabled."""

    endpoint: Annotated[str, Spec(check=_check_endpoint)] = "http://localhost:4317"
    protocol: Annotated[str, Spec(choices=OTLP_PROTOCOLS)] = "grpc"
    timeout: PositiveDuration = 10.0
    max_batch_size: Count = 1024
    max_batch_interval: PositiveDuration = 2.0
    max_queue_size: Count = 32768
    max_concurrent_exports: Count = 4
    max_export_timeout: PositiveDuration = 10.0
    headers: Annotated[Mapping[str, str], Spec(secret=True)] = field(
        default_factory=lambda: types.MappingProxyType({})
    )
    auth: OtlpAuth | None = None
    tls: OtlpTls | None = None

    def __post_init__(self) -> None:
        if self.max_batch_size > self.max_queue_size:
            raise InvalidCombination(
                "max_batch_size",
                f"{self.max_batch_size} is larger than max_queue_size ({self.max_queue_size})",
            )
        if self.auth is not None:
            for name in self.headers:
                if name.lower() == "authorization":
                    raise InvalidCombination(
                        f"headers.{name}",
                        "collides with the Authorization header set by auth; remove one",
                    )


@dataclass(frozen=True)
class TracesExportConfig:
    """Where flow records go; both exporters may be enabled together."""

    stdout: StdoutExport | None = None
    otlp: OtlpExport | None = None


@dataclass(frozen=True)
class ExportConfig:
    """Exporters."""

    traces: TracesExportConfig = field(default_factory=TracesExportConfig)


# ---------------------------------------------------------------------------- internal

_PIPELINE_BUCKETS = (1e-5, 5e-5, 1e-4, 5e-4, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60)
DEFAULT_HISTOGRAM_BUCKETS: Mapping[str, tuple[float, ...]] = types.MappingProxyType(
    {
        "mermin_pipeline_duration_seconds": tuple(map(float, _PIPELINE_BUCKETS)),
        "mermin_export_batch_size": (1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0),
        "mermin_shutdown_duration_seconds": (0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0),
    }
)
_WILDCARD_ADDRESSES = frozenset({"0.0.0.0", "::"})
_Buckets = Annotated[tuple[Annotated[float, Spec(positive=True)], ...], Spec(check=_check_buckets)]


@dataclass(frozen=True)
class MetricsConfig:
    """Prometheus metrics endpoint."""

    enabled: bool = True
    listen_address: str = "0.0.0.0"
    port: Port = 10250
    debug_metrics_enabled: bool = False
    stale_metric_ttl: Duration = 300.0
    histogram_buckets: Annotated[
        Mapping[str, _Buckets], Spec(defaults=DEFAULT_HISTOGRAM_BUCKETS)
    ] = field(default_factory=lambda: DEFAULT_HISTOGRAM_BUCKETS)


@dataclass(frozen=True)
class ServerConfig:
    """Health/API HTTP server."""

    enabled: bool = True
    listen_address: str = "0.0.0.0"
    port: Port = 8080


@dataclass(frozen=True)
class InternalConfig:
    """The agent's own endpoints."""

    UNSUPPORTED: ClassVar[Mapping[str, str]] = {"traces": "exporting the agent's own traces"}

    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    server: ServerConfig = field(default_factory=ServerConfig)

    def __post_init__(self) -> None:
        metrics, server = self.metrics, self.server
        addresses = {metrics.listen_address, server.listen_address}
        if (
            metrics.enabled
            and server.enabled
            and metrics.port == server.port
            and (len(addresses) == 1 or addresses & _WILDCARD_ADDRESSES)
        ):
            raise InvalidCombination(
                "server.port", f"{server.port} is also the port of internal.metrics; pick another"
            )


# ---------------------------------------------------------------------------- root


@dataclass(frozen=True)
class Config:
    """The whole configuration; ``Config()`` is the embedded default."""

    UNSUPPORTED: ClassVar[Mapping[str, str]] = {"attributes": "Kubernetes attribute enrichment"}

    log_level: Annotated[str, Spec(choices=LOG_LEVELS)] = "info"
    log_color: bool = False
    auto_reload: bool = False
    shutdown_timeout: Duration = 28.0
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    parser: ParserConfig = field(default_factory=ParserConfig)
    discovery: Annotated[DiscoveryConfig, Spec(labelled=True)] = field(
        default_factory=DiscoveryConfig
    )
    filter: Annotated[FilterConfig, Spec(labelled=True)] = field(default_factory=FilterConfig)
    span: SpanConfig = field(default_factory=SpanConfig)
    export: Annotated[ExportConfig, Spec(labelled=True)] = field(default_factory=ExportConfig)
    internal: Annotated[InternalConfig, Spec(labelled=True)] = field(default_factory=InternalConfig)

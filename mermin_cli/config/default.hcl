# mermin - embedded default configuration
#
# This is what mermin uses when no config file is given (no --config and no
# MERMIN_CONFIG_PATH): every key is listed with its default value. Copy it, keep what you
# change and delete the rest.
#
# Precedence, low to high: these defaults < the config file < environment variables
# (MERMIN_LOG_LEVEL, MERMIN_CONFIG_AUTO_RELOAD) < command-line flags.
#
# Durations are strings with a unit: "500ms", "5s", "2m", "1h 30m", "7d".
# env("VAR") or env("VAR", "default") works wherever a string goes, also inside
# interpolation: endpoint = "https://${env("COLLECTOR", "localhost")}:4317".
# Unknown keys and invalid values are errors that name the key.

# Log verbosity: "trace", "debug", "info", "warn" or "error".
log_level = "info"
# ANSI colours in log output.
log_color = false
# Reload this file when it changes, or on SIGHUP.
auto_reload = false
# Longest graceful shutdown (active flows are flushed as forced_end records).
shutdown_timeout = "28s"

# Sizes of the capture pipeline: the kernel maps and the bounded queues between stages.
pipeline {
  flow_capture {
    # Entries of the in-kernel flow table; fixed when the programs are loaded.
    flow_stats_capacity = 16384
    # New-flow events each CPU's ring holds (rounded up to a power of two).
    flow_events_capacity = 1024
  }
  flow_producer {
    # Workers turning new-flow events into flows, each with its own queue.
    workers = 4
    worker_queue_capacity = 1024
    # How often the pollers scan the flow store for timeouts and due records.
    flow_store_poll_interval = "5s"
    # Queue between the flow producer and the decoration stage.
    flow_span_queue_capacity = 4096
  }
  k8s_decorator {
    # Queue between the decoration stage and the exporters.
    decorated_span_queue_capacity = 8192
  }
}

# UDP ports recognised as tunnel encapsulations (one port per tunnel type).
parser {
  geneve_port = 6081
  vxlan_port = 4789
  wireguard_port = 51820
}

discovery "instrument" {
  # Interfaces to capture on: literal names ("eth0"), globs ("veth*", "eth?", "en[ps]*",
  # "{eth,wl}*") or regular expressions between slashes ("/^ens[0-9]+$/").
  # Empty: the interface(s) holding the default route.
  interfaces = []
  # Follow interfaces that appear or disappear while mermin runs.
  auto_discover_interfaces = true
  # TC filter priority on kernels before 6.6 (1..32767, lower runs earlier).
  tc_priority = 1
  # Position in the TCX chain on kernels 6.6 and later: "first" or "last".
  tcx_order = "first"
}

# Flow filters, evaluated once when a flow is first seen. Each field takes
# { match = [...], not_match = [...] }: a flow passes when no not_match entry matches and
# match is empty or one of its entries matches. All fields of all blocks must pass.
# Addresses are IPs or CIDRs, numbers take "443" or ranges "8000-9000", names take globs
# (case-insensitive) or /regex/. No filter block = every flow is kept.
#
# filter "source" {            # fields: address, port
#   address = { match = ["10.0.0.0/8"], not_match = ["10.0.0.1"] }
#   port = { match = ["443", "8000-9000"] }
# }
# filter "destination" {       # fields: address, port
#   port = { not_match = ["53"] }
# }
# filter "network" {           # fields: transport, type, interface_name, interface_index, interface_mac
#   transport = { match = ["tcp", "udp"] }
#   type = { match = ["ipv4"] }
#   interface_name = { not_match = ["lo"] }
# }
# filter "flow" {              # fields: connection_state, tcp_flags_tags, ip_dscp_name,
#                              # ip_ecn_name, ip_ttl, ip_flow_label, icmp_type_name, icmp_code_name
#   connection_state = { not_match = ["time_wait"] }
#   icmp_type_name = { match = ["echo_*"] }
# }

# When flows are closed and reported.
span {
  # An active flow emits an interim record at least this often.
  max_record_interval = "60s"
  # Inactivity timeouts (no packets) per protocol.
  generic_timeout = "30s"
  icmp_timeout = "10s"
  tcp_timeout = "20s"
  # Wait after a FIN or RST before the final record.
  tcp_fin_timeout = "5s"
  tcp_rst_timeout = "5s"
  udp_timeout = "60s"
  # Community ID hash seed (0..65535); use the same seed as your other tools.
  community_id_seed = 0
  # Records with the same Community ID share one trace ID until this long without a record.
  trace_id_timeout = "24h"
  # Reverse-DNS names in client.address / server.address, looked up off the hot path.
  enable_hostname_resolution = true
  hostname_resolve_timeout = "100ms"
}

# Where flow records go besides the capture command's own output. Nothing is enabled by
# default; uncomment a block to enable it. Both may be enabled together.
export "traces" {
  # stdout = {
  #   format = "text_indent"         # "text", "text_indent" or "json"
  # }
  # otlp = {
  #   endpoint = "http://localhost:4317"   # https:// enables TLS
  #   protocol = "grpc"                    # "grpc" or "http_binary"
  #   timeout = "10s"
  #   max_batch_size = 1024
  #   max_batch_interval = "2s"
  #   max_queue_size = 32768
  #   max_concurrent_exports = 4
  #   max_export_timeout = "10s"
  #   headers = { "x-tenant" = "team-a" }
  #   auth = {
  #     basic = { user = "mermin", pass = env("OTLP_PASSWORD") }
  #     # or: bearer = env("OTLP_TOKEN")
  #   }
  #   tls = {
  #     ca_cert = "/etc/mermin/ca.pem"
  #     client_cert = "/etc/mermin/client.pem"   # client_cert and client_key go together
  #     client_key = "/etc/mermin/client-key.pem"
  #     insecure_skip_verify = false
  #   }
  # }
}

# Prometheus metrics of the agent itself.
internal "metrics" {
  enabled = true
  listen_address = "0.0.0.0"
  port = 10250
  # Also register high-cardinality per-interface metrics.
  debug_metrics_enabled = false
  # How long series of vanished interfaces are kept ("0s" = remove at once).
  stale_metric_ttl = "5m"
  # Histogram bucket bounds (strictly increasing, > 0); unlisted metrics keep these.
  histogram_buckets {
    mermin_pipeline_duration_seconds = [0.00001, 0.00005, 0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60]
    mermin_export_batch_size = [1, 10, 50, 100, 250, 500, 1000]
    mermin_shutdown_duration_seconds = [0.1, 0.5, 1, 5, 10, 30, 60, 120]
  }
}

# Health and local API server (/livez, /readyz, /startup).
internal "server" {
  enabled = true
  listen_address = "0.0.0.0"
  port = 8080
}

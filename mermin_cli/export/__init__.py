"""OpenTelemetry export: spans from flow records, OTLP and stdout sinks, hostname decoration."""

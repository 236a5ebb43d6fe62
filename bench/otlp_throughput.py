"""Records/s through the OTLP gRPC export path on one core, and hostname decoration cost.

The exporting process is pinned to one CPU; a real OTLP/gRPC receiver (tests/otlp_receiver.py,
counting spans only) runs in a child process pinned to another CPU when there is one. Four
measurements:

* the product path: ``OtlpSink`` (to SDK spans, our encoder, gRPC, 4 concurrent exports),
  from the first write until the receiver has every span;
* the SDK path for comparison: the same spans through the SDK's own
  ``OTLPSpanExporter`` (its encoder), one batch after the other;
* encoding alone, ours and the SDK's, per record;
* ``HostnameResolver.decorate`` with a warm cache, per record.

Loopback only. Usage: .venv/bin/python bench/otlp_throughput.py [RECORDS]
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from otlp_receiver import Receiver  # noqa: E402
from test_export import make_records  # noqa: E402

from mermin_cli.config.schema import OtlpExport  # noqa: E402
from mermin_cli.export.hostnames import HostnameResolver  # noqa: E402
from mermin_cli.export.otlp import OtlpSink  # noqa: E402
from mermin_cli.export.spans import build_resource, encode_spans, to_span  # noqa: E402

BATCH = 1024
TARGET = 20_000


def _serve(cpu: int | None, port: Any, count: Any) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    receiver = Receiver("grpc", store=False).start()
    port.value = receiver.port
    while True:
        time.sleep(0.01)
        count.value = receiver.span_count


def _wait(count: Any, target: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while count.value < target:
        if time.monotonic() > deadline:
            raise TimeoutError(f"receiver got {count.value} of {target} spans")
        time.sleep(0.001)


def sink_path(endpoint: str, records: list[Any], resource: Any, count: Any) -> dict[str, float]:
    sink = OtlpSink(OtlpExport(endpoint=endpoint), resource)
    base = count.value
    started, cpu = time.perf_counter(), time.process_time()
    for i in range(0, len(records), BATCH):
        sink.write(records[i : i + BATCH], block=True)
    _wait(count, base + len(records))
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    sink.close()
    assert (sink.sent, sink.failed, sink.dropped) == (len(records), 0, 0)
    return {"records_per_s": len(records) / wall, "cpu_us_per_record": cpu / len(records) * 1e6}


def sdk_path(endpoint: str, records: list[Any], resource: Any, count: Any) -> dict[str, float]:
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    exporter = OTLPSpanExporter(endpoint=endpoint, insecure=True)
    base = count.value
    started, cpu = time.perf_counter(), time.process_time()
    for i in range(0, len(records), BATCH):
        exporter.export([to_span(r, resource) for r in records[i : i + BATCH]])
    _wait(count, base + len(records))
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    exporter.shutdown()
    return {"records_per_s": len(records) / wall, "cpu_us_per_record": cpu / len(records) * 1e6}


def encoding(records: list[Any], resource: Any) -> dict[str, float]:
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans as sdk

    result = {}
    for name, encode in (("ours", encode_spans), ("sdk", sdk)):
        started = time.process_time()
        for i in range(0, len(records), BATCH):
            encode([to_span(r, resource) for r in records[i : i + BATCH]]).SerializeToString()
        result[name] = (time.process_time() - started) / len(records) * 1e6
    return result


def hostnames(records: list[Any]) -> float:
    """Microseconds per record of decorate() once every address is cached."""
    resolver = HostnameResolver(timeout=0.1, resolve=lambda ip: f"host-{ip}.example")
    for i in range(0, len(records), BATCH):
        resolver.decorate(records[i : i + BATCH])  # warm: every address looked up once
    time.sleep(0.2)
    for i in range(0, len(records), BATCH):
        resolver.decorate(records[i : i + BATCH])
    started = time.process_time()
    for i in range(0, len(records), BATCH):
        resolver.decorate(records[i : i + BATCH])
    cost = (time.process_time() - started) / len(records) * 1e6
    resolver.close()
    return cost


def main() -> None:
    # Whole batches: a partial last batch would wait max_batch_interval (2 s) by design.
    n = (int(sys.argv[1]) if len(sys.argv) > 1 else 100 * BATCH) // BATCH * BATCH
    cpus = sorted(os.sched_getaffinity(0))
    port, count = mp.Value("i", 0), mp.Value("q", 0)
    child = mp.Process(
        target=_serve, args=(cpus[1] if len(cpus) > 1 else None, port, count), daemon=True
    )
    child.start()
    os.sched_setaffinity(0, {cpus[0]})  # before any thread of ours (and gRPC's) exists
    while not port.value:
        time.sleep(0.01)
    endpoint = f"http://127.0.0.1:{port.value}"
    records = make_records(n)
    resource = build_resource()
    sink_path(endpoint, records[: 5 * BATCH], resource, count)  # warm-up: connection, caches
    ours = sink_path(endpoint, records, resource, count)
    sdk = sdk_path(endpoint, records[: n // 4], resource, count)
    encode = encoding(records[: n // 4], resource)
    dns = hostnames(records)
    child.terminate()
    results = {
        "records": n,
        "attributes_per_record": sum(len(r.attributes) for r in records) / n,
        "batch": BATCH,
        "cpus": len(cpus),
        "otlp_grpc_sink": ours,
        "sdk_otlp_exporter": sdk,
        "encode_us_per_record": encode,
        "hostname_decorate_us_per_record_warm": dns,
        "target_records_per_s": TARGET,
    }
    print("| measurement (exporter pinned to one core) | result |\n|---|---|")
    print(
        f"| OTLP/gRPC via OtlpSink, {n} records ({results['attributes_per_record']:.0f}"
        f" attributes each) | {ours['records_per_s']:,.0f} records/s"
        f" ({ours['cpu_us_per_record']:.1f} µs CPU/record) |"
    )
    print(
        f"| same spans via the SDK's OTLPSpanExporter | {sdk['records_per_s']:,.0f} records/s"
        f" ({sdk['cpu_us_per_record']:.1f} µs CPU/record) |"
    )
    print(
        f"| encoding only (SDK span + request), ours / SDK's | {encode['ours']:.1f} µs /"
        f" {encode['sdk']:.1f} µs per record |"
    )
    print(f"| hostname decoration, warm cache | {dns:.2f} µs per record |")
    verdict = "meets" if ours["records_per_s"] >= TARGET else "MISSES"
    print(f"\nOTLP/gRPC throughput {verdict} the target of {TARGET:,} records/s.")
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "otlp_throughput.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

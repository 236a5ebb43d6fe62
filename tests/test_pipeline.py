"""The pipeline of a live capture: metrics scraped over HTTP, health and JSON API, and every
drop point driven for real (tiny queues, a stalled consumer) with the books balanced."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

try:
    from .capture_run import MERMIN, servers_config, start_capture, write_config
except ImportError:
    from capture_run import MERMIN, servers_config, start_capture, write_config

pytestmark = [pytest.mark.bpf, pytest.mark.usefixtures("require_bpf")]

METRICS_PORT, API_PORT = 19250, 18080
SERVERS = servers_config(METRICS_PORT, API_PORT)

UDP_FLOWS = """
import socket, sys
dst, first, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for port in range(first, first + count):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("", port))
    s.sendto(b"p" * 20, (dst, 9)); s.close()
"""


def http_get(host, port: int, path: str) -> tuple[int, str]:
    code = (
        "import urllib.request, urllib.error, sys\n"
        "try:\n"
        f"    r = urllib.request.urlopen('http://127.0.0.1:{port}{path}', timeout=5)\n"
        "    print(r.status); print(r.read().decode())\n"
        "except urllib.error.HTTPError as e:\n"
        "    print(e.code); print(e.read().decode())\n"
    )
    out = host.run("python3", "-c", code).stdout
    status, _, body = out.partition("\n")
    return int(status), body


def metric(text: str, name: str, **labels: str) -> float:
    """Value of one sample in Prometheus text format (0 if absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        m = re.match(r"^([a-z_]+)(\{[^}]*\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        got = ",".join(sorted((m.group(2) or "{}")[1:-1].split(","))) if m.group(2) else ""
        if got == want:
            return float(m.group(3))
    return 0.0


def test_metrics_and_api_during_a_capture(link, tmp_path: Path) -> None:
    a, b = link.a, link.b
    cap = start_capture(a, "-i", a.ifname, "-c", str(write_config(tmp_path, extra=SERVERS)))
    try:
        b.run("python3", "-c", UDP_FLOWS, a.ip4, "30000", "5")
        b.run("ping", "-c", "3", "-i", "0.2", a.ip4)
        time.sleep(1.6)  # udp/icmp timeouts (1 s) + poll
        status, text = http_get(a, METRICS_PORT, "/metrics")
        assert status == 200
        live = http_get(a, API_PORT, "/livez")
        ready = http_get(a, API_PORT, "/readyz")
        api = json.loads(http_get(a, API_PORT, "/api/v1/status")[1])
    finally:
        assert cap.stop() == 0, "".join(cap.stderr)
    udp = [r for r in cap.records if 30000 <= r["attributes"]["source.port"] < 30005]
    assert len(udp) == 5
    # What the kernel saw, counted independently: our UDP + ICMP packets at least.
    sent = 5 + 5 + 6  # 5 datagrams, 5 port-unreachable answers, 3 echo requests + 3 replies
    assert metric(text, "mermin_packets_processed_total") >= sent
    assert metric(text, "mermin_packets_processed_total") == api["kernel"]["packets"]
    created = metric(text, "mermin_flow_spans_created_total", interface=a.ifname)
    assert created == api["kernel"]["new_flows"] >= 5 + 1 + 1
    assert metric(text, "mermin_ringbuf_packets_total", type="received") == created
    assert metric(text, "mermin_flow_spans_processed_total") == created
    expired = metric(text, "mermin_flow_spans_expired_total", reason="idle_timeout")
    assert expired == len(cap.records) >= 7
    assert metric(text, "mermin_flow_spans_decorated_total") == expired
    assert metric(text, "mermin_flow_spans_sent_to_exporter_total") == expired
    assert metric(text, "mermin_export_spans_total", exporter="stdout", status="ok") == expired
    assert metric(text, "mermin_ebpf_map_capacity", map="FLOW_STATS") == 16384
    assert metric(text, "mermin_ebpf_method", attachment="tcx") == 1
    assert metric(text, "mermin_channel_capacity", channel="flow_span") == 4096
    assert metric(text, "mermin_flow_events_dropped_backpressure_total") == 0
    assert "mermin_processing_latency_seconds_bucket" in text
    assert live[0] == 200 and json.loads(live[1])["status"] == "ok"
    assert ready[0] == 200 and json.loads(ready[1])["checks"]["interfaces_attached"] is True
    assert api["interfaces"] == [{"index": a.ifindex, "name": a.ifname}]
    assert api["table"]["capacity"] == 16384
    assert api["flow_cache"] == {"enabled": True, "off_reason": None}  # every CPU reachable
    assert api["kernel"]["cache_lost"] == 0


def test_api_lists_active_flows_with_rates(link, tmp_path: Path) -> None:
    a, b = link.a, link.b
    fast = write_config(tmp_path, extra=SERVERS).read_text()
    cfg = fast.replace('udp_timeout     = "1s"', 'udp_timeout     = "30s"')
    (tmp_path / "long.hcl").write_text(cfg)
    cap = start_capture(a, "-i", a.ifname, "-c", str(tmp_path / "long.hcl"))
    try:
        b.run("python3", "-c", UDP_FLOWS, a.ip4, "31000", "3")
        time.sleep(0.5)
        flows = json.loads(http_get(a, API_PORT, "/api/v1/flows?limit=50")[1])["flows"]
    finally:
        assert cap.stop() == 0
    ours = [f for f in flows if 31000 <= f["source.port"] < 31003]
    assert len(ours) == 3
    for f in ours:
        assert f["source.address"] == b.ip4 and f["destination.port"] == 9
        assert f["packets"] == [1, 0] and f["bytes"] == [48, 0]
        assert f["network.interface.name"] == a.ifname and f["kind"] == "server"


def test_port_in_use_is_a_clear_error(link, tmp_path: Path) -> None:
    a = link.a
    blocker = a.popen("python3", "-c", f"import socket,time;s=socket.socket();"
                      f"s.bind(('0.0.0.0',{API_PORT}));s.listen();print('up',flush=True);"
                      "time.sleep(30)", stdout=subprocess.PIPE)  # fmt: skip
    try:
        assert blocker.stdout.readline().strip() == "up"
        res = a.run(MERMIN, "capture", "-i", a.ifname, "-c",
                    str(write_config(tmp_path, extra=SERVERS)), check=False)  # fmt: skip
    finally:
        blocker.kill()
    assert res.returncode == 1
    assert f"cannot listen on 0.0.0.0:{API_PORT} (the port is already in use)" in res.stderr
    assert 'internal "server"' in res.stderr and "Traceback" not in res.stderr
    assert a.run("tc", "filter", "show", "dev", a.ifname, "ingress").stdout == ""


def test_drop_points_balance(link, tmp_path: Path) -> None:
    """Tiny queues and a consumer that stops reading: every stage drops, and
    in == out + dropped holds at each one."""
    a, b = link.a, link.b
    extra = (
        SERVERS
        + """
pipeline {
  flow_capture {
    flow_events_capacity = 64
  }
  flow_producer {
    workers = 1
    worker_queue_capacity = 2
    flow_span_queue_capacity = 200
  }
  k8s_decorator {
    decorated_span_queue_capacity = 4
  }
}
"""
    )
    cap_proc = a.popen(MERMIN, "capture", "--format", "json", "-i", a.ifname, "-c",
                       str(write_config(tmp_path, extra=extra)),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    # Nobody reads stdout until the end: the exporter stalls once the pipe is full.
    try:
        deadline = time.time() + 30
        while not _up(a) and time.time() < deadline:
            time.sleep(0.2)
        b.run("python3", "-c", UDP_FLOWS, a.ip4, "20000", "3000")
        time.sleep(2.5)  # all flows idle out; records pile up behind the stalled exporter
        status = json.loads(http_get(a, API_PORT, "/api/v1/status")[1])
        _, text = http_get(a, METRICS_PORT, "/metrics")
    finally:
        cap_proc.terminate()
        _, err = cap_proc.communicate(timeout=60)
    assert cap_proc.returncode == 0, err
    k, p = status["kernel"], status["pipeline"]
    # Kernel rings (64 events per CPU; 3,000 flows come much faster than the 20-100 ms
    # between reads): every new flow is either an event or a counted loss. A read hands
    # the worker queue (2) up to 128 events at once, so that stage drops too.
    assert k["events_dropped"] > 0
    assert k["new_flows"] == p["ringbuf"]["received"] + k["events_dropped"]
    # Ring buffer stage: received == dispatched + dropped (worker backpressure).
    assert p["ringbuf"]["dropped_backpressure"] > 0
    rb = p["ringbuf"]
    assert rb["received"] == rb["dispatched"] + rb["dropped_backpressure"]
    # Workers: what they took is what the reader dispatched, less what is still queued.
    queued = sum(ch["size"] for ch in p["worker_channels"])
    assert p["workers"]["in"] + queued == p["ringbuf"]["dispatched"]
    w = p["workers"]
    assert w["in"] == w["created"] + w["filtered"] + w["known"] + w["gone"]
    # Poller -> span channel -> decorator -> decorated channel -> exporter.
    spans, decorated = p["flow_span_channel"], p["decorated_span_channel"]
    assert spans["dropped"] > 0 and decorated["dropped"] > 0
    assert p["poller"]["records"] == spans["accepted"] + spans["dropped"]
    assert spans["accepted"] == spans["taken"] + spans["size"]
    assert decorated["accepted"] + decorated["dropped"] <= spans["taken"]  # one batch in hand
    assert decorated["accepted"] == decorated["taken"] + decorated["size"]
    # The metrics say the same.
    backpressure = metric(text, "mermin_flow_events_dropped_backpressure_total")
    assert backpressure == rb["dropped_backpressure"]
    assert metric(text, "mermin_channel_dropped_total", channel="flow_span") == spans["dropped"]
    assert metric(text, "mermin_ringbuf_packets_total", type="dropped") == k["events_dropped"]
    assert "new-flow events lost in the kernel" in err
    summary = next(line for line in err.splitlines() if "done:" in line)
    assert f"dropped: {rb['dropped_backpressure']} events" in summary


def _up(host) -> bool:
    try:
        return http_get(host, API_PORT, "/livez")[0] == 200
    except subprocess.CalledProcessError:
        return False

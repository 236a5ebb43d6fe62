"""`mermin doctor` in test namespaces: each FAIL and WARN produced for real, and a healthy
setup (capture running, traffic flowing, a real collector) that passes."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

try:
    from .capture_run import MERMIN, servers_config, start_capture, write_config
    from .otlp_receiver import make_tls, start_receiver
    from .test_capture import FOREIGN_FILTER
    from .test_pipeline import UDP_FLOWS
except ImportError:
    from capture_run import MERMIN, servers_config, start_capture, write_config
    from otlp_receiver import make_tls, start_receiver
    from test_capture import FOREIGN_FILTER
    from test_pipeline import UDP_FLOWS

METRICS_PORT, API_PORT = 19251, 18081
SERVERS = servers_config(METRICS_PORT, API_PORT)


def doctor(host, *args: str, env: dict[str, str] | None = None, prefix: tuple[str, ...] = ()):
    """Run `mermin doctor --json` in the host's namespace: (exit status, results by id, stderr)."""
    res = host.run(*prefix, MERMIN, "doctor", "--json", *args, check=False, env=env)
    assert "Traceback" not in res.stderr, res.stderr
    report = json.loads(res.stdout)
    results = {r["id"]: r for r in report["checks"]}
    assert sum(report["counts"].values()) == len(results)
    return res.returncode, results, res.stderr


def status_of(results: dict[str, dict[str, Any]]) -> dict[str, str]:
    return {k: r["status"] for k, r in results.items()}


def config(tmp_path: Path, extra: str = "") -> str:
    return str(write_config(tmp_path, extra=SERVERS + extra))


def test_pattern_matching_nothing_fails_and_a_partial_match_warns(link) -> None:
    a = link.a
    code, results, _ = doctor(a, "-i", "nosuch*", "--check", "config.patterns")
    assert code == 1
    assert list(results) == ["config.valid", "config.patterns"]  # with its prerequisite
    found = results["config.patterns"]
    assert found["status"] == "FAIL"
    assert "'nosuch*' matched nothing" in found["evidence"] and a.ifname in found["fix"]

    code, results, _ = doctor(a, "-i", a.ifname, "-i", "vehtx", "--check", "config")
    assert code == 0
    found = results["config.patterns"]
    assert found["status"] == "WARN", found
    assert "'vehtx' did not match any interfaces (did you mean veth0?)" in found["evidence"]
    assert f"'{a.ifname}' -> {a.ifname}" in found["evidence"]
    assert results["config.interfaces_up"]["status"] == "PASS"

    people = a.run(MERMIN, "doctor", "-i", "nosuch*", "--check", "config", check=False)
    assert people.returncode == 1
    assert "config.patterns" in people.stdout and "FAIL" in people.stdout
    assert "1 fail" in people.stdout


def test_interface_down_fails_alone_and_warns_beside_one_up(link) -> None:
    a = link.a
    a.run("ip", "link", "add", "mdown0", "type", "veth", "peer", "name", "mdown1")
    code, results, _ = doctor(a, "-i", "mdown0", "--check", "config.interfaces_up")
    assert code == 1
    found = results["config.interfaces_up"]
    assert found["status"] == "FAIL"
    assert "mdown0 is administratively down" in found["evidence"]
    assert "ip link set dev mdown0 up" in found["fix"]

    code, results, _ = doctor(a, "-i", "mdown0", "-i", a.ifname, "--check", "config")
    assert code == 0
    assert results["config.interfaces_up"]["status"] == "WARN"


def test_check_selection_adds_prerequisites_in_order() -> None:
    from mermin_cli.doctor.framework import plan
    from mermin_cli.doctor.registry import CHECKS

    def ids(*requested: str) -> list[tuple[str, Any]]:
        return [(c.id, names) for c, names in plan(CHECKS, requested)]

    assert ids("env.bpf_jit") == [
        ("env.privileges", None), ("env.bpf_syscall", None), ("env.bpf_jit", None),
    ]  # fmt: skip
    chosen = ids("attach.eth0", "attach.eth1")
    assert chosen[-1] == ("attach.<ifname>", frozenset({"eth0", "eth1"}))
    assert [i for i, _ in chosen] == [
        "env.privileges", "env.bpf_syscall", "env.kernel_headers", "env.bcc",
        "config.valid", "config.patterns", "attach.program", "attach.<ifname>",
    ]  # fmt: skip
    assert [i for i, _ in ids("export")][-4:] == [
        "export.endpoint", "export.tls", "export.accepts_span", "export.hostname_resolution",
    ]  # fmt: skip
    assert len(ids()) == len(CHECKS)


def test_check_ids_complete_in_the_shell() -> None:
    env = {"_MERMIN_COMPLETE": "complete_bash", "COMP_WORDS": "mermin doctor --check cap",
           "COMP_CWORD": "3"}  # fmt: skip
    res = subprocess.run([MERMIN], env=env, capture_output=True, text=True, check=True)
    assert res.stdout.split() == [
        "capture", "capture.running", "capture.packets", "capture.flows_exported",
        "capture.drops", "capture.map_usage",
    ]  # fmt: skip


def test_unknown_check_is_a_usage_error(link) -> None:
    res = link.a.run(MERMIN, "doctor", "--check", "env.nosuch", check=False)
    assert res.returncode == 2
    assert "Unknown check 'env.nosuch'" in res.stderr and "env.privileges" in res.stderr


def test_unprivileged_run_names_the_missing_capabilities(link, tmp_path: Path) -> None:
    a = link.a
    drop = ("setpriv", "--inh-caps=-all", "--bounding-set=-all", "--")
    code, results, _ = doctor(
        a, "-i", a.ifname, "-c", config(tmp_path), "--check", "env", "--check", "attach",
        prefix=drop,
    )  # fmt: skip
    assert code == 1
    found = results["env.privileges"]
    assert found["status"] == "FAIL"
    for cap in ("CAP_NET_ADMIN", "CAP_BPF", "CAP_PERFMON"):
        assert cap in found["evidence"]
    assert "run as root" in found["fix"]
    for dependent in (
        "env.bpf_syscall",
        "attach.program",
        f"attach.{a.ifname}",
        "attach.conflicts",
    ):
        assert results[dependent]["status"] == "SKIP", results[dependent]
        assert "env.privileges failed" in results[dependent]["evidence"]


@pytest.mark.bpf
def test_foreign_program_at_our_priority_warns(link, tmp_path: Path, require_bpf) -> None:
    a = link.a
    a.exec_python(FOREIGN_FILTER.replace("IFNAME", a.ifname))
    cfg = config(tmp_path, 'discovery "instrument" {\n  tc_priority = 1\n}\n')
    code, results, _ = doctor(
        a, "-i", a.ifname, "-c", cfg, "--attach", "tc",
        "--check", f"attach.{a.ifname}", "--check", "attach.conflicts", "--check", "attach.nosuch0",
    )  # fmt: skip
    assert code == 0, results
    assert results["attach.nosuch0"]["status"] == "SKIP"
    assert (
        "nosuch0 is not among the selected interfaces (veth0)"
        in results["attach.nosuch0"]["evidence"]
    )
    conflicts = results["attach.conflicts"]
    assert conflicts["status"] == "WARN"
    assert f"{a.ifname} ingress: tc prio 1 foreign" in conflicts["evidence"]
    assert "shares mermin's tc priority 1" in conflicts["evidence"]
    probe = results[f"attach.{a.ifname}"]
    assert probe["status"] == "PASS" and "tc priority 1" in probe["evidence"]
    filters = a.run("tc", "filter", "show", "dev", a.ifname, "ingress").stdout
    assert "foreign" in filters and "mermin" not in filters  # the probe detached itself


@pytest.mark.bpf
def test_legacy_ingress_qdisc_makes_tc_attach_fail(link, tmp_path: Path, require_bpf) -> None:
    a = link.a
    a.run("tc", "qdisc", "add", "dev", a.ifname, "ingress")
    code, results, _ = doctor(
        a, "-i", a.ifname, "-c", config(tmp_path), "--attach", "tc", "--check", "attach"
    )
    assert code == 1
    probe = results[f"attach.{a.ifname}"]
    assert probe["status"] == "FAIL"
    assert "File exists" in probe["evidence"] and "--attach tcx" in probe["fix"]
    conflicts = results["attach.conflicts"]
    assert conflicts["status"] == "WARN" and "legacy `ingress` qdisc" in conflicts["evidence"]
    # TCX links live beside that qdisc.
    code, results, _ = doctor(a, "-i", a.ifname, "-c", config(tmp_path), "--check", "attach")
    assert code == 0 and results[f"attach.{a.ifname}"]["status"] == "PASS", results


@pytest.mark.bpf
def test_filters_left_by_a_killed_capture_warn(link, tmp_path: Path, require_bpf) -> None:
    a = link.a
    cfg = config(tmp_path)
    start_capture(a, "-i", a.ifname, "-c", cfg, "--attach", "tc").stop(signal.SIGKILL)
    code, results, _ = doctor(a, "-i", a.ifname, "-c", cfg, "--attach", "tc", "--check", "attach")
    assert code == 0
    conflicts = results["attach.conflicts"]
    assert conflicts["status"] == "WARN"
    assert (
        "ingress: tc prio 1 mermin_ingress (ours) has no capture behind it" in conflicts["evidence"]
    )
    probe = results[f"attach.{a.ifname}"]
    assert probe["status"] == "SKIP" and "not probed" in probe["evidence"]
    assert "mermin_ingress" in a.run("tc", "filter", "show", "dev", a.ifname, "ingress").stdout


@pytest.mark.bpf
def test_filter_excluding_all_traffic_fails(link, tmp_path: Path, require_bpf) -> None:
    a, b = link.a, link.b
    cfg = config(tmp_path, 'filter "source" {\n  address = { match = ["192.0.2.0/24"] }\n}\n')
    cap = start_capture(a, "-i", a.ifname, "-c", cfg)
    try:
        b.run("ping", "-c", "3", "-i", "0.1", a.ip4)
        time.sleep(0.5)  # a poll refreshes the counters
        code, results, _ = doctor(a, "-i", a.ifname, "-c", cfg, "--check", "config.filters")
    finally:
        assert cap.stop() == 0
    assert code == 1
    found = results["config.filters"]
    assert found["status"] == "FAIL", found
    assert "the filters exclude everything" in found["evidence"]
    assert "were rejected in the kernel" in found["evidence"]


def test_unreachable_collector_fails(link, tmp_path: Path) -> None:
    a = link.a
    cfg = config(tmp_path, 'export "traces" {\n  otlp = { endpoint = "http://127.0.0.1:1" }\n}\n')
    code, results, _ = doctor(a, "-c", cfg, "--check", "export.accepts_span")
    assert code == 1
    found = results["export.endpoint"]
    assert found["status"] == "FAIL"
    assert "127.0.0.1:1 Connection refused" in found["evidence"]
    assert "is the collector running" in found["fix"]
    assert results["export.tls"]["status"] == "SKIP"
    assert results["export.accepts_span"]["evidence"] == "not run: export.endpoint failed"


def test_wrong_ca_fails_and_the_right_one_passes(link, tmp_path: Path) -> None:
    a = link.a
    right = make_tls(tmp_path / "right", "collector")
    wrong = make_tls(tmp_path / "wrong", "other")

    def run(ca: Path, endpoint: str) -> tuple[int, dict[str, dict[str, Any]]]:
        otlp = f'otlp = {{ endpoint = "{endpoint}", tls = {{ ca_cert = "{ca}" }} }}'
        cfg = config(tmp_path, f'export "traces" {{\n  {otlp}\n}}\n')
        code, results, _ = doctor(a, "-c", cfg, "--check", "export.accepts_span")
        return code, results

    with start_receiver("grpc", tls=right, netns=a.ns) as rx:
        code, results = run(wrong.ca_cert, rx.endpoint)
        assert code == 1
        found = results["export.tls"]
        assert found["status"] == "FAIL", found
        assert "does not verify" in found["evidence"]
        assert "unable to get local issuer certificate" in found["evidence"]
        assert "tls.ca_cert" in found["fix"]
        assert results["export.accepts_span"]["evidence"] == "not run: export.tls failed"

        code, results = run(right.ca_cert, rx.endpoint)
        assert code == 0, results
        found = results["export.tls"]  # the test certificates are valid for one day only
        assert found["status"] == "WARN" and "renew" in found["fix"]
        assert "certificate verified against the system CAs and" in found["evidence"]
        assert "expires in 0.9" in found["evidence"] or "expires in 1.0" in found["evidence"]
        assert "accepted the test span" in results["export.accepts_span"]["evidence"]
        assert rx.wait_for(1, timeout=5)[0].span.name == "mermin_export_check"


@pytest.mark.bpf
def test_running_capture_without_packets_fails(link, tmp_path: Path, require_bpf) -> None:
    a = link.a
    # A veth pair without addresses (IPv6 off) carries nothing at all.
    a.run("ip", "link", "add", "mzero0", "type", "veth", "peer", "name", "mzero1")
    for name in ("mzero0", "mzero1"):
        a.run("sysctl", "-qw", f"net.ipv6.conf.{name}.disable_ipv6=1")
        a.run("ip", "link", "set", name, "up")
    cfg = config(tmp_path)
    cap = start_capture(a, "-i", "mzero0", "-c", cfg)
    try:
        code, results, _ = doctor(a, "-i", "mzero0", "-c", cfg, "--check", "capture.packets")
    finally:
        assert cap.stop() == 0
    assert code == 1
    assert results["capture.running"]["status"] == "PASS"
    assert "on mzero0" in results["capture.running"]["evidence"]
    found = results["capture.packets"]
    assert found["status"] == "FAIL"
    assert found["evidence"] == "no packet seen on mzero0 since the capture started"


@pytest.mark.bpf
def test_flow_table_near_capacity_warns(link, tmp_path: Path, require_bpf) -> None:
    a, b = link.a, link.b
    cfg = config(tmp_path, "pipeline {\n  flow_capture {\n    flow_stats_capacity = 8\n  }\n}\n")
    cap = start_capture(a, "-i", a.ifname, "-c", cfg)
    try:
        b.run("python3", "-c", UDP_FLOWS, a.ip4, "32000", "10")
        time.sleep(0.5)  # a poll
        code, results, _ = doctor(a, "-i", a.ifname, "-c", cfg, "--check", "capture.map_usage")
    finally:
        assert cap.stop() == 0
    assert code == 0
    found = results["capture.map_usage"]
    assert found["status"] == "WARN", found
    assert "packets not accounted because the table was full" in found["evidence"]
    assert "flow_stats_capacity" in found["fix"]


@pytest.mark.bpf
def test_pipeline_drops_warn(link, tmp_path: Path, require_bpf) -> None:
    a, b = link.a, link.b
    tiny = """
pipeline {
  flow_capture {
    flow_events_capacity = 1
  }
  flow_producer {
    workers = 1
    worker_queue_capacity = 2
  }
}
"""
    cfg = config(tmp_path, tiny)
    cap = start_capture(a, "-i", a.ifname, "-c", cfg)
    try:
        b.run("python3", "-c", UDP_FLOWS, a.ip4, "20000", "2000")
        time.sleep(0.5)  # a poll
        code, results, _ = doctor(a, "-i", a.ifname, "-c", cfg, "--check", "capture.drops")
    finally:
        assert cap.stop() == 0
    assert code == 0
    found = results["capture.drops"]
    assert found["status"] == "WARN", found
    assert "new-flow events lost in the kernel (ring buffer full) (raise" in found["evidence"]
    assert "pipeline.flow_capture.flow_events_capacity" in found["evidence"]


@pytest.mark.bpf
def test_healthy_setup_passes(link, tmp_path: Path, require_bpf) -> None:
    a, b = link.a, link.b
    with start_receiver("grpc", netns=a.ns) as rx:
        cfg = config(
            tmp_path, f'export "traces" {{\n  otlp = {{ endpoint = "{rx.endpoint}" }}\n}}\n'
        )
        cap = start_capture(a, "-i", a.ifname, "-c", cfg)
        pinger = b.popen("ping", "-c", "30", "-i", "0.1", a.ip4, stdout=subprocess.DEVNULL)
        try:
            time.sleep(0.5)
            code, results, stderr = doctor(a, "-i", a.ifname, "-c", cfg)
            ours = a.run("bpftool", "-j", "net", "show", "dev", a.ifname).stdout
        finally:
            pinger.kill()
            assert cap.stop() == 0
    statuses = status_of(results)
    assert code == 0, stderr
    assert set(statuses.values()) <= {"PASS", "SKIP"}, results
    assert statuses["export.tls"] == "SKIP"  # plain http
    skipped = {k for k, s in statuses.items() if s == "SKIP"}
    assert skipped == {"export.tls"}, results
    assert f"attach.{a.ifname}" in statuses and "capture.packets" in statuses
    assert "accepted the test span" in results["export.accepts_span"]["evidence"]
    assert "tcx on " + a.ifname in results["capture.running"]["evidence"]
    assert json.loads(ours)[0]["tc"] == []  # no tc filter of the probe left behind

"""`mermin interfaces` in test namespaces: link details, pattern matching, TC programs.

Oracles are iproute2 (`ip -j`, `tc -j`) and bpftool, run in the same namespace.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

try:
    from .capture_run import MERMIN, start_capture, write_config
    from .test_capture import FOREIGN_FILTER
except ImportError:
    from capture_run import MERMIN, start_capture, write_config
    from test_capture import FOREIGN_FILTER

OUR_HANDLE = 0x6D72  # the handle of mermin's cls_bpf filters ("mr")


def interfaces_json(host, *args: str) -> tuple[dict[str, dict[str, Any]], str]:
    """`mermin interfaces --json` inside the host's namespace: rows by name, and stderr."""
    res = host.run(MERMIN, "interfaces", "--json", *args, check=False)
    assert res.returncode == 0, res.stderr
    return {row["name"]: row for row in json.loads(res.stdout)}, res.stderr


def ip_json(host, *args: str) -> Any:
    return json.loads(host.run("ip", "-j", *args).stdout)


def test_veth_and_loopback_details(link) -> None:
    a, b = link.a, link.b
    rows, err = interfaces_json(a)
    assert err == ""
    assert list(rows) == ["lo", a.ifname]
    oracle = ip_json(a, "addr", "show", "dev", a.ifname)[0]
    peer_ns = {n["nsid"]: n["name"] for n in ip_json(a, "netns", "list-id")}
    veth = rows[a.ifname]
    assert veth == {
        "index": a.ifindex,
        "name": a.ifname,
        "kind": "veth",
        "state": "UP",
        "mtu": 1500,
        "mac": a.mac,
        "l3": False,
        "addresses": [f"{x['local']}/{x['prefixlen']}" for x in oracle["addr_info"]],
        "peer": {"ifindex": b.ifindex, "netns_id": oracle["link_netnsid"]},
        "master": None,
        "matched_by": [],
        "tc_programs": [],
    }
    assert veth["addresses"][:2] == [f"{a.ip4}/24", f"{a.ip6}/64"]
    assert peer_ns[veth["peer"]["netns_id"]] == b.ns  # the id really names b's namespace
    assert rows["lo"] == {
        "index": 1,
        "name": "lo",
        "kind": "device",
        "state": "UNKNOWN",
        "mtu": 65536,
        "mac": "00:00:00:00:00:00",
        "l3": False,
        "addresses": ["127.0.0.1/8", "::1/128"],
        "peer": None,
        "master": None,
        "matched_by": [],
        "tc_programs": [],
    }


def test_veth_pair_in_one_namespace_and_bridge_master(link) -> None:
    a = link.a
    a.run("ip", "link", "add", "mbr0", "type", "bridge")
    a.run("ip", "link", "add", "mpair0", "type", "veth", "peer", "name", "mpair1")
    a.run("ip", "link", "set", "mpair0", "master", "mbr0")
    rows, _ = interfaces_json(a)
    index = {link["ifname"]: link["ifindex"] for link in ip_json(a, "link", "show")}
    assert rows["mpair0"]["peer"] == {"ifindex": index["mpair1"], "netns_id": None}
    assert rows["mpair1"]["peer"] == {"ifindex": index["mpair0"], "netns_id": None}
    assert rows["mpair0"]["master"] == "mbr0"
    assert rows["mpair1"]["master"] is None
    assert (rows["mbr0"]["kind"], rows["mbr0"]["state"], rows["mbr0"]["peer"]) == (
        "bridge",
        "DOWN",
        None,
    )


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["-i", "veth0"], {"lo": [], "veth0": ["veth0"]}),
        (["-i", "vet*", "-i", "/^l.$/"], {"lo": ["/^l.$/"], "veth0": ["vet*"]}),
        (
            ["-i", "{lo,veth0}", "-i", "veth?"],
            {"lo": ["{lo,veth0}"], "veth0": ["{lo,veth0}", "veth?"]},
        ),
        (["-i", "/eth/"], {"lo": [], "veth0": ["/eth/"]}),
    ],
)
def test_patterns_literal_glob_regex(link, args: list[str], expected: dict[str, list[str]]) -> None:
    rows, err = interfaces_json(link.a, *args)
    assert err == ""
    assert {name: row["matched_by"] for name, row in rows.items()} == expected


def test_patterns_from_config_and_flag_override(link, tmp_path: Path) -> None:
    cfg = write_config(tmp_path, extra='discovery "instrument" {\n  interfaces = ["l*"]\n}\n')
    rows, _ = interfaces_json(link.a, "-c", str(cfg))
    assert (rows["lo"]["matched_by"], rows["veth0"]["matched_by"]) == (["l*"], [])
    rows, _ = interfaces_json(link.a, "-c", str(cfg), "-i", "veth0")
    assert (rows["lo"]["matched_by"], rows["veth0"]["matched_by"]) == ([], ["veth0"])


def test_pattern_matching_nothing_warns_with_close_candidate(link) -> None:
    rows, err = interfaces_json(link.a, "-i", "veht0", "-i", "veth0", "-i", "zz*")
    assert err.splitlines() == [
        "mermin: warning: Interface pattern 'veht0' did not match any interfaces "
        "(did you mean veth0?).",
        "mermin: warning: Interface pattern 'zz*' did not match any interfaces.",
    ]
    assert rows["veth0"]["matched_by"] == ["veth0"]


def test_text_table(link) -> None:
    a = link.a
    res = a.run(MERMIN, "interfaces", "-i", "veth*")
    header, *lines = res.stdout.splitlines()
    assert header.split() == [
        "INDEX", "NAME", "KIND", "STATE", "MTU", "MAC", "ADDRESSES", "PEER", "MATCHED", "BY",
        "TC", "HOOKS",
    ]  # fmt: skip
    row = next(line for line in lines if f" {a.ifname} " in line)
    nsid = ip_json(a, "link", "show", a.ifname)[0]["link_netnsid"]
    assert row.split() == [
        str(a.ifindex), a.ifname, "veth", "UP", "1500", a.mac, f"{a.ip4}/24",
        "index", f"{link.b.ifindex},", "netns", str(nsid), "veth*",
    ]  # fmt: skip


def test_unprivileged_run_lists_links_without_programs(link) -> None:
    res = link.a.run(
        "setpriv", "--inh-caps=-all", "--bounding-set=-all", "--",
        MERMIN, "interfaces", "--json",
        check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    rows = {row["name"]: row for row in json.loads(res.stdout)}
    assert rows["veth0"]["tc_programs"] is None and rows["veth0"]["mac"] == link.a.mac
    assert "needs root" in res.stderr and res.stderr.count("\n") == 1


# --- programs on the TC hooks -----------------------------------------------------------


def bpftool_prog_name(host, prog_id: int) -> str:
    return json.loads(host.run("bpftool", "-j", "prog", "show", "id", str(prog_id)).stdout)["name"]


def tc_filter_prog_ids(host, hook: str) -> dict[str, int]:
    """{filter name: program id} of the cls_bpf filters on one clsact hook, as tc shows them."""
    filters = json.loads(host.run("tc", "-j", "filter", "show", "dev", host.ifname, hook).stdout)
    return {f["options"]["bpf_name"]: f["options"]["prog"]["id"] for f in filters if "options" in f}


def our_filters(host, priority: int) -> list[dict[str, Any]]:
    """The two entries mermin's cls_bpf filters should have, with tc's program ids."""
    return [
        tc_entry(hook, name, tc_filter_prog_ids(host, hook)[name], True, priority, OUR_HANDLE)
        for hook, name in (("ingress", "mermin_ingress"), ("egress", "mermin_egress"))
    ]


def tc_entry(
    hook: str, name: str, prog_id: int, ours: bool, priority: int, handle: int
) -> dict[str, Any]:
    return {
        "hook": hook,
        "mechanism": "tc",
        "name": name,
        "prog_id": prog_id,
        "ours": ours,
        "order": None,
        "revision": None,
        "priority": priority,
        "handle": handle,
        "kind": "bpf",
    }


@pytest.mark.bpf
@pytest.mark.usefixtures("require_bpf")
def test_our_tcx_programs_are_listed(link, tmp_path: Path) -> None:
    a = link.a
    cap = start_capture(a, "-i", a.ifname, "-c", str(write_config(tmp_path)), "--attach", "tcx")
    try:
        rows, _ = interfaces_json(a)
        table = a.run(MERMIN, "interfaces").stdout
        progs = rows[a.ifname]["tc_programs"]
        names = [bpftool_prog_name(a, p["prog_id"]) for p in progs]
    finally:
        assert cap.stop() == 0, "".join(cap.stderr)
    assert [(p["hook"], p["mechanism"], p["name"], p["ours"], p["order"]) for p in progs] == [
        ("ingress", "tcx", "mermin_l2", True, 1),
        ("egress", "tcx", "mermin_l2", True, 1),
    ]
    assert names == ["mermin_l2", "mermin_l2"]  # one program on both hooks
    for p in progs:
        assert p["revision"] >= 1
        assert (p["priority"], p["handle"], p["kind"]) == (None, None, None)
    assert rows["lo"]["tc_programs"] == []
    assert "ingress: tcx#1 mermin_l2 (ours)" in table
    assert "egress: tcx#1 mermin_l2 (ours)" in table
    rows, _ = interfaces_json(a)
    assert rows[a.ifname]["tc_programs"] == []  # gone with the capture


@pytest.mark.bpf
@pytest.mark.usefixtures("require_bpf")
def test_our_tc_filters_are_listed(link, tmp_path: Path) -> None:
    a = link.a
    cap = start_capture(a, "-i", a.ifname, "-c", str(write_config(tmp_path)), "--attach", "tc")
    try:
        rows, _ = interfaces_json(a)
        expected = our_filters(a, priority=1)
    finally:
        assert cap.stop() == 0, "".join(cap.stderr)
    assert rows[a.ifname]["tc_programs"] == expected


@pytest.mark.bpf
@pytest.mark.usefixtures("require_bpf")
def test_foreign_filter_is_listed_as_not_ours(link, tmp_path: Path) -> None:
    a = link.a
    a.exec_python(FOREIGN_FILTER.replace("IFNAME", a.ifname))
    rows, _ = interfaces_json(a)
    foreign = tc_entry(
        "ingress", "foreign", tc_filter_prog_ids(a, "ingress")["foreign"], False, 1, 1
    )
    assert rows[a.ifname]["tc_programs"] == [foreign]
    assert bpftool_prog_name(a, foreign["prog_id"]) == "foreign"
    config = write_config(tmp_path, extra='discovery "instrument" {\n  tc_priority = 5\n}\n')
    cap = start_capture(a, "-i", a.ifname, "-c", str(config), "--attach", "tc")
    try:
        rows, _ = interfaces_json(a)
        table = a.run(MERMIN, "interfaces").stdout
        ours = our_filters(a, priority=5)
    finally:
        assert cap.stop() == 0, "".join(cap.stderr)
    assert rows[a.ifname]["tc_programs"] == [foreign, *ours]
    assert "ingress: tc prio 1 foreign, tc prio 5 mermin_ingress (ours)" in table

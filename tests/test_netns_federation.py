"""The federation across real network hosts: coordinator and group nodes in separate Linux network
namespaces, each with its own address on a private bridged LAN (10.213.0.0/24, see `netns`), so
every byte goes through a network interface instead of loopback.

- a federation completes over mutual TLS between namespaces, the nodes dialing the coordinator's
  IP (10.213.0.1) with a server certificate whose SAN is that IP; the uploads demonstrably crossed
  the coordinator's interface;
- a node's link is cut mid-round (``ip link set eth0 down`` in its namespace): the round closes at
  its deadline with the other nodes' updates, the node drops out of the quorum, and once the link
  is back it returns by itself and trains in a later round; the run completes;
- a coordinator certificate whose SANs lack the address the node dials is refused by the node
  (`pluralfed node check` fails with UNAVAILABLE; `pluralfed node run` never joins and gives up),
  while the expected name (``tls_server_name``) or a certificate for the right address passes;
- the `netns` helper itself: the LAN reaches its hosts and nothing beyond, leaves the machine's own
  namespace alone, and cleans up after itself and after crashed runs.

Needs root (namespaces, veths, a bridge); skipped when the kernel or permissions refuse them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fedharness import (
    CLI,
    TINY_MODEL,
    FedData,
    Proc,
    Procs,
    env_for_children,
    make_fed_data,
    read_jsonl,
    tails,
    wait_until,
)
from netns import (
    IP,
    PREFIX,
    Host,
    Network,
    list_namespaces,
    namespace_pids,
    probe,
    remove_leftovers,
)

from pluralfed.localfed import node_id, write_toml
from pluralfed.pki import create_ca, issue_node_cert, issue_server_cert

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

COORD_IP = "10.213.0.1"
COORD_DNS = "coordinator.pluralfed.test"  # no resolver knows it: only usable as tls_server_name
PORT = 7443
NODE_IPS = ["10.213.0.11", "10.213.0.12", "10.213.0.13"]


# ------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def namespaces_allowed() -> None:
    """Skips the module where the kernel or the permissions refuse namespaces (not Linux, not
    root); a Linux machine without iproute2 is a setup error, not a reason to skip."""
    if not sys.platform.startswith("linux"):
        pytest.skip(f"Linux network namespaces are not available on {sys.platform}")
    if not Path(IP).exists():
        pytest.fail(f"these tests need iproute2's `ip` (not found at {IP}): install iproute2")
    remove_leftovers()
    reason = probe()
    if reason is not None and os.environ.get("CI"):  # as test_compose: CI must run them
        pytest.fail(f"CI must run the network-namespace federation tests, but: {reason}")
    if reason is not None:
        pytest.skip(
            "Linux network namespaces are refused here (these tests need root, i.e. "
            f"CAP_SYS_ADMIN and CAP_NET_ADMIN): {reason}"
        )


@pytest.fixture
def lan(namespaces_allowed: None) -> Iterator[Network]:
    net = Network("fed")
    try:
        yield net
    finally:
        net.destroy()


@pytest.fixture
def procs(tmp_path: Path, lan: Network) -> Iterator[Procs]:
    """Depends on `lan`, so every process is stopped before its namespace is deleted."""
    with Procs(tmp_path / "logs") as p:
        yield p


@pytest.fixture(scope="module")
def fed_data(
    namespaces_allowed: None, tmp_path_factory: pytest.TempPathFactory, session_cache_dir: Path
) -> FedData:
    """3 synthetic groups, embedded once into the session's cache (the nodes only read it)."""
    return make_fed_data(
        tmp_path_factory.mktemp("netns-data"), session_cache_dir, n_groups=3, n_questions=40
    )


@dataclass(frozen=True)
class NetPki:
    ca: Path
    server_ip: Path  # SAN: IP 10.213.0.1, the address the nodes dial
    server_dns: Path  # SAN: DNS coordinator.pluralfed.test only
    nodes: Mapping[str, Path]  # group -> its node's tls dir


@pytest.fixture(scope="module")
def pki(
    namespaces_allowed: None, tmp_path_factory: pytest.TempPathFactory, fed_data: FedData
) -> NetPki:
    root = tmp_path_factory.mktemp("netns-pki")
    create_ca(root / "ca", common_name="pluralfed netns test CA")
    issue_server_cert(root / "ca", root / "server-ip", "coordinator", [COORD_IP])
    issue_server_cert(root / "ca", root / "server-dns", "coordinator", [COORD_DNS])
    nodes = {}
    for g in fed_data.groups:
        nodes[g] = root / "nodes" / node_id(g)
        issue_node_cert(root / "ca", nodes[g], node_id(g))
    return NetPki(root / "ca", root / "server-ip", root / "server-dns", nodes)


# ------------------------------------------------------------------------------------------------
# services in namespaces


@dataclass
class NetCoordinator:
    proc: Proc
    host: Host
    state_dir: Path

    def records(self, kind: str = "round") -> list[dict[str, Any]]:
        return [r for r in read_jsonl(self.state_dir / "metrics.jsonl") if r.get("kind") == kind]


def start_coordinator(
    procs: Procs,
    host: Host,
    work: Path,
    server_tls: Path,
    groups: list[str],
    settings: Mapping[str, Any],
    cache_dir: Path,
    name: str = "coordinator",
) -> NetCoordinator:
    """`pluralfed coordinator` inside `host`'s namespace, listening on 0.0.0.0:7443 there."""
    state_dir = work / name
    config = work / f"{name}.toml"
    write_toml(
        config,
        {
            "listen": f"0.0.0.0:{PORT}",
            "state_dir": str(state_dir),
            "tls_dir": str(server_tls),
            "heartbeat_interval_s": 1.0,
            "session_timeout_s": 30.0,
            "round_timeout_s": 60.0,
            "eval_timeout_s": 30.0,
            "local_steps": 3,
            "linger_s": 3.0,
            "max_workers": 16,
            **TINY_MODEL,
            **settings,
        },
        {"allow_list": {node_id(g): g for g in groups}},
    )
    proc = procs.start(
        name,
        host.argv([*CLI, "coordinator", "--config", str(config)]),
        env_for_children(cache_dir),
    )
    port_file = state_dir / "coordinator.port"

    def listening() -> bool:
        return port_file.exists() and port_file.read_text().strip() == str(PORT)

    wait_until(listening, 120, f"the coordinator to listen ({port_file})", must_live=[proc])
    return NetCoordinator(proc, host, state_dir)


def node_config(
    work: Path,
    group: str,
    fed_data: FedData,
    pki: NetPki,
    cache_dir: Path,
    settings: Mapping[str, Any] | None = None,
) -> Path:
    """A node's TOML: it dials 10.213.0.1:7443 and, unless `settings` say otherwise, expects
    that address in the coordinator's certificate (no tls_server_name)."""
    path = work / "nodes" / f"{node_id(group)}.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_toml(
        path,
        {
            "coordinator": f"{COORD_IP}:{PORT}",
            "group": group,
            "role": "train",
            "data": str(fed_data.files[group]),
            "tls_dir": str(pki.nodes[group]),
            "cache_dir": str(cache_dir),
            "threads": 1,
            "poll_wait_s": 10.0,
            "backoff_initial_s": 0.2,
            "backoff_max_s": 2.0,
            **(settings or {}),
        },
        {},
    )
    return path


def start_node(procs: Procs, host: Host, config: Path, cache_dir: Path, name: str) -> Proc:
    return procs.start(
        name, host.argv([*CLI, "node", "run", "--config", str(config)]), env_for_children(cache_dir)
    )


def add_hosts(lan: Network, groups: list[str]) -> tuple[Host, dict[str, Host]]:
    coord = lan.add_host("coord", COORD_IP)
    nodes = {g: lan.add_host(f"n{i + 1}", NODE_IPS[i]) for i, g in enumerate(groups)}
    return coord, nodes


# ------------------------------------------------------------------------------------------------
# tests


def test_federation_completes_between_namespaces_over_mutual_tls(
    tmp_path: Path,
    lan: Network,
    procs: Procs,
    pki: NetPki,
    fed_data: FedData,
    session_cache_dir: Path,
) -> None:
    """Coordinator in its namespace at 10.213.0.1 (listening on 0.0.0.0:7443 there), two nodes
    in theirs dialing 10.213.0.1:7443 with no tls_server_name: the certificate's IP SAN is what
    they check. Both rounds and the final evaluation complete."""
    groups = fed_data.groups[:2]
    coord_host, node_hosts = add_hosts(lan, groups)
    # the LAN's own route and nothing else: traffic can only go to the other namespaces
    for host in [coord_host, *node_hosts.values()]:
        assert [r.split()[0] for r in host.routes()] == ["10.213.0.0/24"], host.routes()
    before = coord_host.stats()

    coord = start_coordinator(
        procs,
        coord_host,
        tmp_path,
        pki.server_ip,
        groups,
        {"rounds": 2, "eval_every": 0, "min_nodes": 2, "min_updates": 2},
        session_cache_dir,
    )
    nodes = {
        g: start_node(
            procs,
            node_hosts[g],
            node_config(tmp_path, g, fed_data, pki, session_cache_dir),
            session_cache_dir,
            node_id(g),
        )
        for g in groups
    }
    everyone = [coord.proc, *nodes.values()]
    assert coord.proc.wait(180, list(nodes.values())) == 0, tails(everyone)
    for node in nodes.values():
        assert node.wait(60, everyone) == 0, tails(everyone)

    rounds = coord.records("round")
    assert [r["round"] for r in rounds] == [1, 2], tails(everyone)
    for r in rounds:
        assert r["participants"] == sorted(groups), r
        assert set(r["outcomes"].values()) == {"accepted"}, r
    [evaluation] = coord.records("evaluation")
    assert evaluation["groups"] == sorted(groups) and evaluation["missing"] == []
    results = json.loads((coord.state_dir / "results.json").read_text("utf-8"))
    assert results["rounds"] == 2 and results["final_evaluation"] == evaluation

    log = coord.proc.log()
    assert re.search(rf"listening on 0\.0\.0\.0:{PORT} \(port {PORT}, mutual TLS", log), log
    for g, node in nodes.items():
        assert re.findall(r"joined run (\w+)", node.log()) == [results["run_id"]], node.tail()
        assert f"node {g} joined as train" in log
    # the uploads (and the TLS around them) arrived through the coordinator's interface
    after = coord_host.stats()
    uploaded = sum(r["bytes_in"] for r in rounds)
    assert uploaded > 0
    assert after["rx_bytes"] - before["rx_bytes"] >= uploaded, (before, after, uploaded)
    for host in node_hosts.values():
        assert host.stats()["tx_bytes"] >= uploaded // len(groups)


def test_link_cut_mid_round_round_closes_at_deadline_and_node_returns_by_itself(
    tmp_path: Path,
    lan: Network,
    procs: Procs,
    pki: NetPki,
    fed_data: FedData,
    session_cache_dir: Path,
) -> None:
    """Three nodes, quorum 3, 2 updates suffice. Right after round 1 the third node's interface
    goes down (in its namespace). Its session expires (6 s without heartbeats), so the round
    handed to it closes then, before its 12 s deadline, with the other two updates and the node
    recorded as silent, and the coordinator waits for a quorum again. The node loses its connection (gRPC gives up on unacknowledged data after
    ~10 s, its keepalive timeout), keeps retrying, and once the link is back up it joins again
    by itself and trains in every remaining round."""
    groups = fed_data.groups[:3]
    victim, others = groups[2], sorted(groups[:2])
    deadline_s, session_timeout_s, rounds = 12.0, 6.0, 8
    coord_host, node_hosts = add_hosts(lan, groups)
    coord = start_coordinator(
        procs,
        coord_host,
        tmp_path,
        pki.server_ip,
        groups,
        {
            "rounds": rounds,
            "eval_every": 0,  # one evaluation, after the last round
            "min_nodes": 3,  # while the node is away, no round starts: rounds cannot run out
            "min_updates": 2,  # ... but a round it was given completes without it
            "round_timeout_s": deadline_s,
            "session_timeout_s": session_timeout_s,
            "heartbeat_interval_s": 1.0,
            "local_steps": 10,
        },
        session_cache_dir,
    )
    # backoff_max_s 2: a node retries every 1-3 s, so it is back within seconds of the link
    nodes = {
        g: start_node(
            procs,
            node_hosts[g],
            node_config(tmp_path, g, fed_data, pki, session_cache_dir, {"backoff_max_s": 2.0}),
            session_cache_dir,
            node_id(g),
        )
        for g in groups
    }
    node = nodes[victim]
    everyone = [coord.proc, *nodes.values()]

    def all_three() -> dict[str, Any] | None:
        return next((r for r in coord.records() if r["participants"] == sorted(groups)), None)

    # the first round all three trained in (round 1, unless a slow start made one miss it)
    warm = wait_until(
        all_three,
        180,
        "a round with all three nodes",
        logs=nodes.values(),
        must_live=everyone,
        poll_s=0.02,
    )
    # the next round opens at once, for all three; the link goes down while it runs
    node_hosts[victim].link_down()
    assert not node_hosts[victim].link_is_up()
    coord_log_at_cut, node_log_at_cut = len(coord.proc.log()), len(node.log())

    # If the node still got that round's update through, the round after it is handed to the
    # node as well (it heartbeated < 6 s ago, so it counts as live): that one it misses.
    def cut_off() -> dict[str, Any] | None:
        later = (r for r in coord.records() if r["round"] > warm["round"])
        return next((r for r in later if victim not in r["participants"]), None)

    cut = wait_until(
        cut_off,
        60,
        f"a round without {victim} after round {warm['round']}",
        logs=nodes.values(),
        must_live=everyone,
    )
    wait_until(
        lambda: "waiting for a quorum: 2 of 3" in coord.proc.log()[coord_log_at_cut:],
        30,
        f"{victim} to drop out of the quorum",
        logs=nodes.values(),
        must_live=everyone,
    )
    # the node notices by itself (its connection dies) and keeps retrying: it must not give up.
    # Waiting for this makes the rejoin deterministic: a shorter cut could let the old TCP
    # connection (and session) live on.
    wait_until(
        lambda: "coordinator unreachable" in node.log()[node_log_at_cut:],
        60,
        f"{victim} to notice the lost connection",
        logs=[coord.proc],
        must_live=everyone,
    )
    assert coord.records()[-1] == cut, "no round may start while the node is away (quorum 3)"
    node_hosts[victim].link_up()

    assert coord.proc.wait(120, list(nodes.values())) == 0, tails(everyone)
    for p in nodes.values():
        assert p.wait(60, everyone) == 0, tails(everyone)

    records = coord.records()
    assert [r["round"] for r in records] == list(range(1, rounds + 1)), tails(everyone)
    # the round it missed: handed to it, closed when its session expired, before the deadline,
    # with the two others' updates
    assert cut["round"] in (warm["round"] + 1, warm["round"] + 2), (warm, cut)
    assert cut["selected"] == sorted(groups), cut
    assert cut["participants"] == others, cut
    assert cut["outcomes"] == {**dict.fromkeys(others, "accepted"), victim: "silent"}, cut
    assert cut["seconds"] < deadline_s, cut["seconds"]
    assert re.search(
        rf"train round {cut['round']}: the session of {re.escape(victim)} expired",
        coord.proc.log(),
    ), coord.proc.tail()
    # every round from `warm` on but the cut one had all three: the node came back by itself
    assert cut["round"] < rounds, "no round was left for the node to come back to"
    for r in records[warm["round"] - 1 :]:
        if r["round"] != cut["round"]:
            assert r["participants"] == sorted(groups), (r, tails(everyone))
    # ... through a new session in the same run (the old one was dropped with the connection)
    run_id = json.loads((coord.state_dir / "results.json").read_text("utf-8"))["run_id"]
    assert re.findall(r"joined run (\w+)", node.log()) == [run_id, run_id], node.tail()
    assert coord.proc.log().count(f"node {victim} joined as train") == 2, coord.proc.tail()
    for g in others:
        assert re.findall(r"joined run (\w+)", nodes[g].log()) == [run_id], nodes[g].tail()


def test_coordinator_certificate_without_the_dialed_address_is_refused(
    tmp_path: Path,
    lan: Network,
    procs: Procs,
    pki: NetPki,
    fed_data: FedData,
    session_cache_dir: Path,
) -> None:
    """The coordinator at 10.213.0.1 serves a certificate for coordinator.pluralfed.test only.
    A node dialing 10.213.0.1 without tls_server_name refuses it: `node check` fails with
    UNAVAILABLE, `node run` never joins and gives up. Expecting the certificate's name
    (tls_server_name) passes the same check, and so does a certificate naming 10.213.0.1."""
    group = fed_data.groups[0]
    coord_host, node_hosts = add_hosts(lan, [group])
    host = node_hosts[group]
    env = env_for_children(session_cache_dir)
    # quorum 2 of a one-node allow-list: no round ever starts, only joins are watched
    settings = {"rounds": 1, "min_nodes": 2, "min_updates": 1}
    coord = start_coordinator(
        procs,
        coord_host,
        tmp_path,
        pki.server_dns,
        [group],
        settings,
        session_cache_dir,
        name="coordinator-dns-san",
    )
    config = node_config(
        tmp_path, group, fed_data, pki, session_cache_dir, {"give_up_after_s": 3.0}
    )
    check = [*CLI, "node", "check", "--config", str(config)]

    def outcome(done: Any) -> str:
        return (
            f"exit {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}\n\n"
            + tails([coord.proc])
        )

    # `node run` (retrying, then giving up after 3 s) and `node check`, side by side
    node = start_node(procs, host, config, session_cache_dir, node_id(group))
    refused = host.run(check, timeout=120, env=env)
    assert refused.returncode == 1, outcome(refused)
    assert "FAILED: UNAVAILABLE" in refused.stderr, outcome(refused)
    # ... because of the name: gRPC says "Hostname Verification Check failed"
    assert re.search(r"hostname|peer name", refused.stderr, re.IGNORECASE), outcome(refused)
    assert node.wait(120, [coord.proc]) == 1, tails([node, coord.proc])
    assert "coordinator unreachable (UNAVAILABLE)" in node.log(), node.tail()
    assert "giving up" in node.log() and "joined run" not in node.log(), node.tail()
    # the handshake failed on the node's side: the coordinator never saw a session
    assert coord.proc.alive and " joined as " not in coord.proc.log(), coord.proc.tail()

    # the name the certificate does carry, expected explicitly: the same node is accepted
    named = host.run([*check, "--tls-server-name", COORD_DNS], timeout=120, env=env)
    assert named.returncode == 0, outcome(named)
    assert "ok: the coordinator would admit this node" in named.stdout, outcome(named)
    # a check-only join: checked as a join, but no session (a running node would keep its own)
    assert coord.proc.log().count(f"node {group} passed a connection check") == 1, coord.proc.tail()
    assert " joined as " not in coord.proc.log(), coord.proc.tail()
    coord.proc.popen.terminate()
    coord.proc.wait(60)

    # a certificate naming the address the node dials: the unchanged check passes
    coord = start_coordinator(
        procs,
        coord_host,
        tmp_path,
        pki.server_ip,
        [group],
        settings,
        session_cache_dir,
        name="coordinator-ip-san",
    )
    accepted = host.run(check, timeout=120, env=env)
    assert accepted.returncode == 0, outcome(accepted)
    assert "ok: the coordinator would admit this node" in accepted.stdout, outcome(accepted)
    log = coord.proc.log()
    assert f"node {group} passed a connection check" in log, coord.proc.tail()
    assert " joined as " not in log and f"node {group} left" not in log, coord.proc.tail()


def test_netns_helper_isolates_and_cleans_up(namespaces_allowed: None) -> None:
    """The helper's own promises: the LAN reaches its hosts and nothing else, the machine's own
    interfaces and routes stay as they were, and both `Network.destroy` and `remove_leftovers`
    (for a crashed run's namespaces) delete every namespace and kill what runs inside."""

    def host_view() -> list[str]:
        """Whatever of ours shows in the machine's own namespace: switch ports, LAN routes."""
        links = subprocess.run([IP, "-o", "link", "show"], capture_output=True, text=True)
        routes = subprocess.run([IP, "route", "show"], capture_output=True, text=True)
        ours = [line for line in links.stdout.splitlines() if re.match(r"\d+: p-", line)]
        return ours + [line for line in routes.stdout.splitlines() if "10.213." in line]

    assert host_view() == []
    connect = "import socket, sys; socket.create_connection((sys.argv[1], 9), timeout=2)"
    net = Network("selftest")
    try:
        a = net.add_host("a", COORD_IP)
        b = net.add_host("b", NODE_IPS[0])
        sleeper = subprocess.Popen(b.argv(["sleep", "600"]), stdin=subprocess.DEVNULL)
        # a's discard port is closed: "refused" means b's packets reached a, and a answered
        reached = b.run([sys.executable, "-c", connect, COORD_IP], timeout=30)
        assert "ConnectionRefusedError" in reached.stderr, reached.stderr
        # no route beyond the LAN (192.0.2.1 is TEST-NET-1): nothing leaves the namespaces
        outside = b.run([sys.executable, "-c", connect, "192.0.2.1"], timeout=30)
        assert "Network is unreachable" in outside.stderr, outside.stderr
        a.link_down()
        cut = b.run([sys.executable, "-c", connect, COORD_IP], timeout=30)
        assert "ConnectionRefusedError" not in cut.stderr and cut.returncode != 0, cut.stderr
        a.link_up()
        assert host_view() == [], "the machine's own namespace got links or routes of ours"
    finally:
        net.destroy()
    assert sleeper.wait(10) != 0, "destroy() did not stop the process inside the namespace"
    assert not [ns for ns in list_namespaces() if ns.startswith(net.prefix)]

    # a crashed run: namespaces named after a pid that no longer runs, a process still inside
    gone = subprocess.Popen(["true"])
    gone.wait()
    orphan = f"{PREFIX}{gone.pid}-crashed1-x"
    subprocess.run([IP, "netns", "add", orphan], check=True)
    try:
        stray = subprocess.Popen([IP, "netns", "exec", orphan, "sleep", "600"])
        wait_until(lambda: namespace_pids(orphan), 10, f"a process inside {orphan}")
        assert orphan in remove_leftovers()
        assert stray.wait(10) != 0
        assert orphan not in list_namespaces()
    finally:
        subprocess.run([IP, "netns", "delete", orphan], capture_output=True)

"""Linux network namespaces as separate hosts on one machine, for integration tests.

A `Network` is a private LAN: a "switch" namespace holding a bridge, and one namespace per host,
each wired to the bridge by a veth pair (``eth0`` inside the host, ``p-<host>`` on the switch)
with one address in a private /24 (default 10.213.0.0/24). Nothing is created in the machine's
own namespace and nothing is routed anywhere else: the hosts have no default route, only the
LAN's connected route, so test traffic cannot leave the namespaces.

    net = Network("fed")                 # namespaces pft<pid>-fed<n>-sw, ...
    coord = net.add_host("coord", "10.213.0.1")
    n1 = net.add_host("n1", "10.213.0.11")
    subprocess.run(n1.argv(["python", "-c", "..."]))   # runs inside n1's namespace
    n1.link_down(); n1.link_up()         # unplug / replug n1's cable (inside n1's namespace)
    net.destroy()                        # kills what still runs inside, deletes every namespace

Every namespace name starts with ``pft<pid>-`` (the creating process's pid), so parallel runs do
not collide and `remove_leftovers` can delete what a crashed earlier run left behind (its pid no
longer runs). Needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN) and iproute2; `probe` tells whether
this kernel and these permissions allow it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

PREFIX = "pft"
IP = shutil.which("ip") or "/usr/sbin/ip"
HOST_IFACE = "eth0"
BRIDGE = "br0"
_NAME = re.compile(rf"{PREFIX}(\d+)-[A-Za-z0-9_.-]+")
_HOST_NAME = re.compile(r"[a-z][a-z0-9]{0,12}")  # "p-<name>" must fit IFNAMSIZ (15)
_counter = itertools.count(1)


class NetnsError(RuntimeError):
    """An `ip` command failed; the message has the command and its stderr."""


def ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``ip [-n ns] args...``; raise NetnsError (command + stderr) if it fails and `check`."""
    argv = [IP, *(["-n", ns] if ns else []), *args]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except FileNotFoundError:
        raise NetnsError(f"{IP} not found: install iproute2") from None
    if check and done.returncode != 0:
        raise NetnsError(
            f"`{' '.join(argv)}` failed (exit {done.returncode}): {done.stderr.strip()}"
        )
    return done


def list_namespaces() -> list[str]:
    done = ip("netns", "list", check=False)
    # lines look like "name" or "name (id: 3)"
    return [line.split()[0] for line in done.stdout.splitlines() if line.strip()]


def namespace_pids(ns: str) -> list[int]:
    done = ip("netns", "pids", ns, check=False)
    return [int(p) for p in done.stdout.split() if p.isdigit()]


def _pid_alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead but not yet reaped by its parent, does not)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def kill_inside(ns: str, grace_s: float = 3.0) -> list[int]:
    """SIGTERM, then SIGKILL, every process still running inside namespace `ns` (only ever the
    children a test started there: nothing else enters these namespaces). Returns their pids."""
    pids = [p for p in namespace_pids(ns) if p != os.getpid()]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(_pid_alive(p) for p in pids):
            time.sleep(0.05)
    return pids


def delete_namespace(ns: str) -> None:
    kill_inside(ns)
    ip("netns", "delete", ns, check=False)


def remove_leftovers() -> list[str]:
    """Delete the namespaces of earlier runs that died without cleaning up: names with our
    prefix whose creating pid no longer runs. Returns the names deleted."""
    removed = []
    for ns in list_namespaces():
        m = _NAME.fullmatch(ns)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            delete_namespace(ns)
            removed.append(ns)
    return removed


@dataclass
class Host:
    """One namespace with one interface (``eth0``) on the network's bridge."""

    network: Network
    name: str
    ns: str
    address: str

    def argv(self, argv: Sequence[str]) -> list[str]:
        """`argv` run inside this host's namespace (``ip netns exec`` execs it: same pid)."""
        return [IP, "netns", "exec", self.ns, *argv]

    def run(
        self, argv: Sequence[str], timeout: float = 60.0, env: Mapping[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` inside the namespace to its end (stdout and stderr captured)."""
        return subprocess.run(
            self.argv(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
            env=None if env is None else dict(env),
        )

    def link_down(self) -> None:
        """Unplug: this host's interface goes down (inside its own namespace)."""
        ip("link", "set", HOST_IFACE, "down", ns=self.ns)

    def link_up(self) -> None:
        """Plug back in: the interface comes up with its address and connected route."""
        ip("link", "set", HOST_IFACE, "up", ns=self.ns)

    def link_is_up(self) -> bool:
        done = ip("-j", "link", "show", HOST_IFACE, ns=self.ns)
        return "UP" in json.loads(done.stdout)[0].get("flags", [])

    def stats(self) -> dict[str, int]:
        """Counters of this host's interface: rx/tx bytes and packets (and errors, drops)."""
        done = ip("-j", "-s", "link", "show", HOST_IFACE, ns=self.ns)
        info = json.loads(done.stdout)[0]["stats64"]
        return {
            f"{direction}_{key}": int(info[direction][key])
            for direction in ("rx", "tx")
            for key in ("bytes", "packets", "errors", "dropped")
        }

    def routes(self) -> list[str]:
        """This host's IPv4 routes (main table), e.g. ['10.213.0.0/24 dev eth0 ...']."""
        done = ip("-4", "route", "show", ns=self.ns)
        return [line.strip() for line in done.stdout.splitlines() if line.strip()]


@dataclass
class Network:
    """A private LAN of namespaces (see the module docstring). Call `destroy` when done."""

    tag: str = "net"
    subnet: str = "10.213.0.0/24"
    prefix: str = field(init=False)
    switch: str = field(init=False)
    hosts: dict[str, Host] = field(default_factory=dict, init=False)
    _created: list[str] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        net = ipaddress.ip_network(self.subnet)
        if not (net.is_private and net.version == 4 and net.prefixlen >= 16):
            raise ValueError(f"{self.subnet}: use a private IPv4 test range (/16 or smaller)")
        self.prefix = f"{PREFIX}{os.getpid()}-{self.tag}{next(_counter)}-"
        self.switch = self.prefix + "sw"
        try:
            self._add_namespace(self.switch)
            ip("link", "add", BRIDGE, "type", "bridge", ns=self.switch)
            ip("link", "set", BRIDGE, "up", ns=self.switch)
        except BaseException:
            self.destroy()  # nobody else holds this half-built network
            raise

    def _add_namespace(self, ns: str) -> None:
        ip("netns", "add", ns)
        self._created.append(ns)
        ip("link", "set", "lo", "up", ns=ns)

    def add_host(self, name: str, address: str) -> Host:
        """A new namespace `name` with ``eth0`` = `address` on the bridge, link up."""
        if not _HOST_NAME.fullmatch(name) or name in self.hosts:
            raise ValueError(f"host name {name!r}: 1-13 of a-z 0-9, unique in the network")
        net = ipaddress.ip_network(self.subnet)
        if ipaddress.ip_address(address) not in net:
            raise ValueError(f"{address} is outside the test range {self.subnet}")
        ns = self.prefix + name
        self._add_namespace(ns)
        port = f"p-{name}"
        # both ends are created straight inside their namespaces: the host's own is never touched
        veth = f"link add {port} type veth peer name {HOST_IFACE} netns {ns}"
        ip(*veth.split(), ns=self.switch)
        ip("link", "set", port, "master", BRIDGE, ns=self.switch)
        ip("link", "set", port, "up", ns=self.switch)
        ip("addr", "add", f"{address}/{net.prefixlen}", "dev", HOST_IFACE, ns=ns)
        ip("link", "set", HOST_IFACE, "up", ns=ns)
        host = Host(self, name, ns, address)
        self.hosts[name] = host
        return host

    def destroy(self) -> None:
        """Kill whatever still runs inside, delete every namespace (and so every veth and the
        bridge). Safe to call twice."""
        for ns in reversed(self._created):
            delete_namespace(ns)
        self._created.clear()
        self.hosts.clear()

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()


def probe() -> str | None:
    """None when namespaces, a bridge, veths and ``ip netns exec`` all work here; else why not
    (the refusing command and its error)."""
    if shutil.which("ip") is None and not os.path.exists(IP):
        return f"iproute2's `ip` is not installed (looked for {IP})"
    try:
        with Network("probe") as net:
            host = net.add_host("a", str(next(ipaddress.ip_network(net.subnet).hosts())))
            done = host.run(["true"], timeout=30)
            if done.returncode != 0:
                return f"`ip netns exec` failed: {done.stderr.strip()}"
    except NetnsError as err:
        return str(err)
    return None

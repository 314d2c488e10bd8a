"""Several "hosts" on one machine: network namespaces joined by veth pairs on a bridge.

Each host is a network namespace named after it, with one veth end (``eth0``) and an address
on a private /24; the other ends hang on a bridge in this namespace, which holds the subnet's
first address (where a coordinator listens). Processes enter a host through the
``netns-exec`` script beside this file, which Hydra calls as its ``-launcher-exec`` exactly as
it would call ssh, and which gives each host its own hostname (a UTS namespace).

Needs root and iproute2 (``ip``); `unavailable` says why not, for the test to skip with.
Names carry a random tag, so runs side by side never collide, and `HostNetwork.remove`
deletes everything it made, whatever state the test left it in.
"""

from __future__ import annotations

import ipaddress
import os
import random
import secrets
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["NETNS_EXEC", "HostNetwork", "unavailable", "TCP_ONLY", "shape_commands"]

#: The launcher-exec script that enters a namespace "host".
NETNS_EXEC = str(Path(__file__).with_name("netns-exec"))

#: MPICH's shared-memory and libfabric's shm transports would carry the ranks' messages between
#: namespaces of one machine without touching the veth pairs (measured); force TCP.
TCP_ONLY = {"MPIR_CVAR_CH4_NETMOD": "ofi", "FI_PROVIDER": "tcp"}


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check,
                          timeout=60)


def unavailable() -> str | None:
    """Why namespaces cannot be made here (None: they can)."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            return f"needs the {tool!r} command (Debian: apt-get install iproute2 util-linux)"
    probe = f"dptp{secrets.token_hex(3)}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    _ip("netns", "delete", probe, check=False)
    return None


def shape_commands(link: str, rate_bps: float, delay_s: float = 0.0) -> list[list[str]]:
    """The ``tc`` commands that make `link`'s egress a link of `rate_bps` bits per second with
    `delay_s` seconds of one-way delay: a token bucket (``tbf``) for the rate; for a delay,
    ``netem`` at the root with the token bucket as its child (the kernel must have netem).

    The bucket holds 4 ms of traffic (at least 64 KiB, a GSO segment): with a smaller one
    the refill waits on a timer that busy ranks on few cores delay, and a 1 Gb/s link moved
    8 MB at half its rate (measured); its queue holds 100 ms.
    """
    burst = max(64 * 1024, round(rate_bps / 8 * 4e-3))
    tbf = ["tbf", "rate", f"{round(rate_bps)}bit", "burst", str(burst), "latency", "100ms"]
    if delay_s <= 0:
        return [["tc", "qdisc", "replace", "dev", link, "root", *tbf]]
    return [["tc", "qdisc", "replace", "dev", link, "root", "handle", "1:", "netem", "delay",
             f"{round(delay_s * 1e6)}us"],
            ["tc", "qdisc", "replace", "dev", link, "parent", "1:1", "handle", "10:", *tbf]]


def _free_subnet() -> ipaddress.IPv4Network:
    routes = _ip("-4", "route", "show", "table", "all").stdout
    taken = [ipaddress.ip_network(word, strict=False) for line in routes.splitlines()
             for word in line.split()[:2] if "/" in word and word[0].isdigit()]
    for _ in range(100):
        net = ipaddress.ip_network(f"10.{random.randint(100, 250)}.{random.randint(0, 255)}.0/24")
        if not any(net.overlaps(other) for other in taken):
            return net
    raise RuntimeError("no free 10.x.y.0/24 for the test hosts")


@dataclass
class HostNetwork:
    """Hosts (namespaces) on a bridge. Use `create`, and `remove` in a finalizer."""

    tag: str
    subnet: ipaddress.IPv4Network
    hosts: list[str] = field(default_factory=list)
    created: list[tuple[str, str]] = field(default_factory=list)  # ("netns"|"link", name)

    @property
    def bridge(self) -> str:
        """The bridge's interface name (``HYDRA_IFACE``: where mpiexec's proxies reach it)."""
        return f"{self.tag}b"

    @property
    def address(self) -> str:
        """The bridge's address: this machine as the hosts reach it."""
        return str(self.subnet.network_address + 1)

    def veths(self) -> list[str]:
        """This namespace's ends of the hosts' veth pairs."""
        return [f"{self.tag}v{i}" for i in range(len(self.hosts))]

    @classmethod
    def create(cls, count: int) -> HostNetwork:
        """Make `count` hosts; on any failure, remove what was made and raise."""
        net = cls(f"dpt{secrets.token_hex(3)}", _free_subnet())
        try:
            _ip("link", "add", net.bridge, "type", "bridge")
            net.created.append(("link", net.bridge))
            _ip("addr", "add", f"{net.address}/24", "dev", net.bridge)
            _ip("link", "set", net.bridge, "up")
            for i in range(count):
                host, veth = f"{net.tag}h{i}", f"{net.tag}v{i}"
                _ip("netns", "add", host)
                net.created.append(("netns", host))
                net.hosts.append(host)
                _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", host)
                net.created.append(("link", veth))
                _ip("link", "set", veth, "master", net.bridge, "up")
                _ip("-n", host, "addr", "add", f"{net.subnet.network_address + 2 + i}/24",
                    "dev", "eth0")
                _ip("-n", host, "link", "set", "eth0", "up")
                _ip("-n", host, "link", "set", "lo", "up")
        except BaseException:
            net.remove()
            raise
        return net

    def remove(self) -> None:
        """Delete every namespace and link made (the veth pairs go with their namespace)."""
        for kind, name in reversed(self.created):
            if kind == "netns":
                _ip("netns", "delete", name, check=False)
            else:
                _ip("link", "delete", name, check=False)
        self.created.clear()

    def veth_bytes(self) -> int:
        """Bytes sent plus received so far on this side of every host's veth pair."""
        total = 0
        for veth in self.veths():
            for counter in ("rx_bytes", "tx_bytes"):
                total += int(Path(f"/sys/class/net/{veth}/statistics/{counter}").read_text())
        return total

    def hostfile(self, path: Path, slots: int = 1, extra: tuple[str, ...] = ()) -> Path:
        """Write a hostfile naming every host with `slots` (``host slots=N``: Open MPI's form,
        which Hydra itself would refuse), then the `extra` lines."""
        lines = [f"{host} slots={slots}" for host in self.hosts] + list(extra)
        path.write_text("# the test's namespaces\n" + "\n".join(lines) + "\n")
        return path

    def environment(self) -> dict[str, str]:
        """What mpiexec needs to reach these hosts: proxies call back on the bridge (inside
        a namespace this machine's hostname means its loopback), and TCP between ranks."""
        return {"HYDRA_IFACE": self.bridge, **TCP_ONLY}

    def shape(self, host: str, rate_bps: float, delay_s: float = 0.0) -> None:
        """Shape what `host` sends (its ``eth0``'s egress): `shape_commands`. Raises
        RuntimeError with tc's message when the kernel lacks a queueing discipline."""
        for command in shape_commands("eth0", rate_bps, delay_s):
            done = subprocess.run(["ip", "netns", "exec", host, *command], capture_output=True,
                                  text=True, timeout=60)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(command)} on {host}: {done.stderr.strip()}")

    def run_in(self, host: str, command: str) -> subprocess.CompletedProcess:
        """Run `command` on `host` through the launcher-exec script."""
        return subprocess.run([NETNS_EXEC, "-x", host, command], capture_output=True,
                              text=True, timeout=120)

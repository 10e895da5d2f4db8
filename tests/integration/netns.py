"""Nodes with their own network stack: Linux network namespaces joined by veth pairs to a bridge, for multi-node
tests on one machine (root only). Each node is a namespace with one interface, ``eth0``, on a /24 of the fixture's
own; the bridge holds the subnet's first address, so this namespace (pytest, Prometheus) reaches every node. Traffic
goes only to those addresses. ``down()`` removes every namespace, veth and bridge it made, and ``leftovers()`` says
what is still there (the tests check it is nothing)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def available() -> str | None:
    """None when namespaces can be made here, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (Debian: iproute2; launch/setup.sh test installs it)"
    probe = f"bdprobe{os.getpid() % 100000}"
    made = ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    ip("netns", "del", probe, check=False)
    return None


def free_subnet() -> str:
    """A private /24 no interface or route here uses (10.213.x.0/24), as its first three octets."""
    routes = ip("-4", "route", "show", "table", "all").stdout + ip("-4", "addr").stdout
    for x in range(os.getpid() % 200, os.getpid() % 200 + 200):
        prefix = f"10.213.{x % 250 + 1}"
        if f"{prefix}." not in routes:
            return prefix
    raise RuntimeError("no free 10.213.x.0/24 subnet")


class Nodes:
    made = 0  # per process: each Nodes gets names of its own (interface names stay under 16 characters)

    def __init__(self, count: int):
        Nodes.made += 1
        self.tag = f"bd{os.getpid() % 100000}x{Nodes.made % 100}"
        self.count = count
        self.prefix = free_subnet()
        self.bridge = f"{self.tag}br"
        self.names = [f"{self.tag}n{i}" for i in range(count)]  # namespaces
        self.host_ends = [f"{self.tag}h{i}" for i in range(count)]  # veth ends on the bridge
        self.addresses = [f"{self.prefix}.{10 + i}" for i in range(count)]
        self.host_address = f"{self.prefix}.1"

    def up(self) -> Nodes:
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"{self.host_address}/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        for ns, host, addr in zip(self.names, self.host_ends, self.addresses):
            ip("netns", "add", ns)
            ip("link", "add", host, "type", "veth", "peer", "name", f"{host}p")
            ip("link", "set", f"{host}p", "netns", ns)
            ip("-n", ns, "link", "set", f"{host}p", "name", "eth0")
            ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "lo", "up")
            ip("-n", ns, "link", "set", "eth0", "up")
            ip("link", "set", host, "master", self.bridge)
            ip("link", "set", host, "up")
        return self

    def cmd(self, node: int, argv: list[str]) -> list[str]:
        """``argv`` run inside node ``node``'s namespace."""
        return ["ip", "netns", "exec", self.names[node], *argv]

    def popen(self, node: int, argv: list[str], *, log: Path, env: dict[str, str] | None = None,
              cwd: Path | None = None) -> subprocess.Popen:
        out = open(log, "w")  # noqa: SIM115 - owned by the child
        return subprocess.Popen(self.cmd(node, argv), stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                start_new_session=True)

    def cut(self, node: int) -> None:
        """Take node ``node``'s link down (its bridge end): nothing gets in or out."""
        ip("link", "set", self.host_ends[node], "down")

    def mend(self, node: int) -> None:
        ip("link", "set", self.host_ends[node], "up")

    def shape(self, node: int, *, rate_mbit: float, burst_kb: int = 64, latency_ms: int = 400) -> None:
        """A token-bucket rate on what node ``node`` sends (tc tbf on its eth0)."""
        ip("netns", "exec", self.names[node], "tc", "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate",
           f"{rate_mbit}mbit", "burst", f"{burst_kb}kb", "latency", f"{latency_ms}ms", check=False)
        subprocess.run(self.cmd(node, ["tc", "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate",
                                       f"{rate_mbit}mbit", "burst", f"{burst_kb}kb", "latency", f"{latency_ms}ms"]),
                       check=True, capture_output=True, timeout=30)

    def unshape(self, node: int) -> None:
        subprocess.run(self.cmd(node, ["tc", "qdisc", "del", "dev", "eth0", "root"]), capture_output=True, timeout=30)

    def down(self) -> None:
        """Kill what still runs in the namespaces, then remove them, the veths and the bridge."""
        for ns in self.names:
            pids = ip("netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), 9)
                except (ProcessLookupError, ValueError):
                    pass
            ip("netns", "del", ns, check=False)
        for host in self.host_ends:
            ip("link", "del", host, check=False)
        ip("link", "del", self.bridge, check=False)

    def leftovers(self) -> list[str]:
        netns = ip("netns", "list", check=False).stdout
        links = ip("-o", "link", "show", check=False).stdout
        return [name for name in [*self.names, *self.host_ends, self.bridge] if name in netns or f" {name}" in links
                or f"{name}@" in links or f"{name}:" in links]

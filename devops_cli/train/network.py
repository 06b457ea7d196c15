"""The network of a multi-node run, decided on each node before its workers start (no torch import).

gloo and NCCL advertise to the other nodes the address of the interface they bind to. Left to
themselves they take the address this node's hostname resolves to, and on many hosts that is a
loopback address (`127.0.1.1 host` in /etc/hosts: Debian/Ubuntu's default; `127.0.0.1 host` in
containers): the other nodes are then told to connect to 127.x, fail, and the node that waits on them
waits until a timeout. So each node picks the interface its kernel routes to `master_addr` through (a UDP
socket "connected" to master_addr sends nothing and names the local address the route uses) and gives
the workers GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME for it — unless the user set them.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass, field

from devops_cli.errors import DevopsError

IFNAME_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")
NODE_ADDR_ENV = "DEVOPS_MODEL_NODE_ADDR"  # this node's address towards master_addr, for the workers' messages


@dataclass
class Network:
    address: str  # this node's address on the route to master_addr
    interface: str | None  # the interface that holds it
    env: dict[str, str] = field(default_factory=dict)  # what the workers get
    sources: dict[str, str] = field(default_factory=dict)  # variable -> "chosen" | "env"
    warnings: list[str] = field(default_factory=list)

    def describe(self) -> str:
        via = f"{self.interface} ({self.address})" if self.interface else self.address
        chosen = ", ".join(f"{k}={v} [{self.sources[k]}]" for k, v in self.env.items() if k in IFNAME_VARS)
        return f"network: {via} routes to master_addr; {chosen}"


def route(master_addr: str) -> str:
    """This node's address on the route to `master_addr` (the kernel's routing decision; no packet is sent)."""
    try:
        infos = socket.getaddrinfo(master_addr, 29500, type=socket.SOCK_DGRAM)
    except socket.gaierror as e:
        raise DevopsError(f"master_addr '{master_addr}' does not resolve on this node ({e.strerror})",
                          hint="use node 0's IP address, or fix DNS or /etc/hosts on this node") from None
    last: OSError | None = None
    for family, _, _, _, sockaddr in infos:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            try:
                s.connect(sockaddr)
                return s.getsockname()[0]
            except OSError as e:
                last = e
    raise DevopsError(f"this node has no route to master_addr {master_addr} ({last.strerror if last else 'no address'})",
                      hint="check master_addr (node 0's address) and this node's network (ip route)")


def interface_of(address: str) -> str | None:
    """The interface that holds `address` on this node."""
    import psutil

    want = ipaddress.ip_address(address.split("%")[0])
    for name, addrs in psutil.net_if_addrs().items():
        for a in addrs:
            if a.family in (socket.AF_INET, socket.AF_INET6):
                try:
                    if ipaddress.ip_address(a.address.split("%")[0]) == want:
                        return name
                except ValueError:
                    continue
    return None


def hostname_loopback() -> tuple[str, str | None]:
    """(this node's hostname, the loopback address it resolves to, or None)."""
    name = socket.gethostname()
    try:
        addrs = [i[4][0] for i in socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)]
    except OSError:
        return name, None
    for a in addrs:
        try:
            if ipaddress.ip_address(a.split("%")[0]).is_loopback:
                return name, a
        except ValueError:
            continue
    return name, None


def choose(master_addr: str, env=os.environ) -> Network:
    """The interface every worker of this node uses to reach the others (multi-node runs only)."""
    address = route(master_addr)
    interface = interface_of(address)
    net = Network(address, interface)
    net.env[NODE_ADDR_ENV] = address
    for var in IFNAME_VARS:
        if env.get(var):
            net.env[var], net.sources[var] = env[var], "env"
        elif interface:
            # NCCL matches names by prefix (eth1 would also take eth10); '=' asks for this one exactly
            net.env[var], net.sources[var] = ("=" if var.startswith("NCCL") else "") + interface, "chosen"
    if ipaddress.ip_address(address.split("%")[0]).is_loopback:
        net.warnings.append(f"master_addr {master_addr} is a loopback address: only nodes on this same machine "
                            "can reach it (give node 0's network address to run across machines)")
        return net  # every node on this machine: a loopback hostname is no trap then
    host, loopback = hostname_loopback()
    if loopback:
        if net.sources.get("GLOO_SOCKET_IFNAME") == "env":
            fix = f"GLOO_SOCKET_IFNAME={env['GLOO_SOCKET_IFNAME']} from your environment decides instead"
        elif interface:
            fix = f"the workers use {interface} ({address}) instead: the interface that routes to master_addr"
        else:
            fix = "set GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME to the interface the other nodes reach"
        net.warnings.append(f"this node's hostname '{host}' resolves to the loopback address {loopback} "
                            f"(/etc/hosts): gloo and NCCL would tell the other nodes to connect to it; {fix}")
    return net

"""Testbed: two network namespaces ("a" and "b") on one veth pair, with static daemons.

Lives here: building that topology, starting `python -m udpbackend run` with static peers in
either node and waiting until its TUN is up, kernel VXLAN as flannel configures it (the
benchmark's baseline) and iperf3 between the two. Must not: import the planes (daemons are
subprocesses); every address is in lab/addressing.py; close() removes all it created.

    netns A                                              netns B
    flannel0 198.19.1.0/32 (daemon)                      flannel0 198.19.2.0/32 (daemon)
    veth-a 198.18.0.1/24  <------------ veth ----------> veth-b 198.18.0.2/24
    vxlan0 198.18.100.1/24 (optional, kernel VXLAN)      vxlan0 198.18.100.2/24

Typical use::

    with Testbed() as tb:
        a = tb.start_node("a")
        b = tb.start_node("b")
        print(tb.ping("a", tb.tun_addr("b")).avg_ms)
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .addressing import (
    IPERF_PORT,
    NODE_SUBNET,
    NODES,
    OVERLAY_NETWORK,
    TUN_ADDR,
    UDP_PORT,
    UNDERLAY_ADDR,
    UNDERLAY_PREFIX,
    VETH_NAME,
    VXLAN_ADDR,
    VXLAN_MTU,
    VXLAN_NAME,
    VXLAN_PORT,
    VXLAN_VNI,
)
from .daemons import READY_MARKER, Node
from .errors import DaemonError
from .netns import NetnsLab, next_tag
from .tools import IperfResult


class Testbed(NetnsLab):
    """Two network namespaces (nodes "a" and "b") joined by a veth pair.

    Creates: netns ``<prefix>-<pid>-<n>-a`` / ``-b``, veth-a 198.18.0.1/24 <-> veth-b 198.18.0.2/24
    (MTU ``underlay_mtu``), lo up, ip_forward=1, IPv6 off (no router-solicitation noise on TUNs).
    ``close()`` (also on context exit, constructor failure and interpreter exit) ends every process
    started through this object by PID and deletes both namespaces, which removes the veth,
    VXLAN and TUN devices with them.
    """

    def __init__(
        self,
        underlay_mtu: int = 1500,
        prefix: str = "ubtb",
        disable_ipv6: bool = True,
        workdir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.underlay_mtu = underlay_mtu
        self._vxlan = False
        super().__init__(prefix, workdir)
        try:
            self._build(disable_ipv6)
        except BaseException:
            self.close()
            raise

    # -- construction --

    def _build(self, disable_ipv6: bool) -> None:
        for node in NODES:
            self.add_netns(node)
        for node in NODES:
            self._prepare_netns(node, disable_ipv6)
        # Create the pair inside A (no name clash with anything in the root netns), move one end.
        self._add_veth("a", VETH_NAME["a"], "b", VETH_NAME["b"])
        for node in NODES:
            self._address_iface(
                node, VETH_NAME[node], UNDERLAY_ADDR[node], UNDERLAY_PREFIX, self.underlay_mtu
            )
        self._wait_link_up()

    def _wait_link_up(self, timeout: float = 5.0) -> None:
        self._wait_oper_up([(node, VETH_NAME[node]) for node in NODES], timeout)

    # -- small accessors --

    @staticmethod
    def underlay_addr(node: str) -> str:
        return UNDERLAY_ADDR[node]

    @staticmethod
    def tun_addr(node: str) -> str:
        return TUN_ADDR[node]

    @staticmethod
    def subnet(node: str) -> str:
        return NODE_SUBNET[node]

    @staticmethod
    def veth(node: str) -> str:
        return VETH_NAME[node]

    @staticmethod
    def other(node: str) -> str:
        return "b" if node == "a" else "a"

    # -- udpbackend daemons --

    def daemon_argv(
        self,
        node: str,
        mode: str = "batched",
        peers: Iterable[tuple[str, str]] | None = None,
        peers_file: str | os.PathLike[str] | None = None,
        stats_file: str | os.PathLike[str] | None = None,
        extra_args: Sequence[str] = (),
    ) -> list[str]:
        """The `python -m udpbackend run ...` command line for a node."""
        other = self.other(node)
        if peers is None:
            peers = [(NODE_SUBNET[other], UNDERLAY_ADDR[other])]
        argv = [
            sys.executable,
            "-m",
            "udpbackend",
            "run",
            "--network",
            OVERLAY_NETWORK,
            "--subnet",
            NODE_SUBNET[node],
            "--iface",
            VETH_NAME[node],
            "--port",
            str(UDP_PORT),
            "--mode",
            mode,
        ]
        for subnet, ip in peers:
            argv += ["--peer", f"{subnet}={ip}"]
        if peers_file is not None:
            argv += ["--peers-file", str(peers_file)]
        if stats_file is not None:
            argv += ["--stats-file", str(stats_file)]
        return argv + list(extra_args)

    def start_node(
        self,
        node: str,
        mode: str = "batched",
        extra_args: Sequence[str] = (),
        peers: Iterable[tuple[str, str]] | None = None,
        peers_file: str | os.PathLike[str] | None = None,
        timeout: float = 20.0,
        env: Mapping[str, str] | None = None,
    ) -> Node:
        """Launch the daemon in `node` and wait until its TUN is up with its address.

        peers: (subnet, underlay ip) pairs; default = the other node's subnet -> its underlay addr.
        Raises DaemonError with the log tail if the daemon dies or is not ready within `timeout`.
        """
        self._check_open()
        tag = f"{node}-{mode}-{next_tag()}"
        stats_path = self.workdir / f"stats-{tag}.json"
        argv = self.daemon_argv(node, mode, peers, peers_file, stats_path, extra_args)
        proc, log_path = self._spawn_daemon(node, argv, tag, os.environ if env is None else env)
        handle = Node(self, node, mode, proc, log_path, stats_path, argv)
        self._wait_ready(handle, timeout)
        return handle

    def _wait_ready(self, handle: Node, timeout: float) -> None:
        start = time.monotonic()
        deadline = start + timeout
        tun_ok_at: float | None = None
        state: dict[str, Any] | None = None
        want_addr = f"{TUN_ADDR[handle.node]}/32"
        with self.ipr(handle.node) as ipr:
            while True:
                rc = handle.proc.poll()
                if rc is not None:
                    handle.returncode = rc
                    raise DaemonError(
                        f"daemon on node {handle.node} (mode {handle.mode}) exited with {rc} "
                        f"before it was ready\nargv: {' '.join(handle.argv)}\n"
                        f"--- log tail ---\n{handle.log_tail()}"
                    )
                state = self._dev_state(ipr, handle.tun_name)
                tun_ok = bool(state and state["up"] and want_addr in state["addrs"])
                now = time.monotonic()
                if tun_ok and tun_ok_at is None:
                    tun_ok_at = now
                ready_line = READY_MARKER in handle.log_text()
                # Ready = TUN configured AND the daemon says it forwards. Tolerate a daemon that
                # never prints the marker after a short grace, the TUN state is what we test.
                if tun_ok and (ready_line or (tun_ok_at is not None and now - tun_ok_at > 2.0)):
                    return
                if now > deadline:
                    raise DaemonError(
                        f"daemon on node {handle.node} (mode {handle.mode}) not ready after "
                        f"{timeout}s: {handle.tun_name} state={state}, ready line seen="
                        f"{ready_line}\nargv: {' '.join(handle.argv)}\n"
                        f"--- log tail ---\n{handle.log_tail()}"
                    )
                time.sleep(0.02)

    def start_pair(self, mode: str = "batched", **kw: Any) -> tuple[Node, Node]:
        """Start daemons on both nodes (each pointing at the other)."""
        a = self.start_node("a", mode, **kw)
        b = self.start_node("b", mode, **kw)
        return a, b

    # -- kernel VXLAN baseline --

    def add_vxlan(self) -> None:
        """Kernel VXLAN as flannel's vxlan backend sets it up: VNI 1, dstport 8472, MTU 1450,
        no learning, local/remote = the underlay addresses; vxlan0 198.18.100.{1,2}/24."""
        self._check_open()
        for node in NODES:
            other = self.other(node)
            with self.ipr(node) as ipr:
                veth_idx = ipr.link_lookup(ifname=VETH_NAME[node])[0]
                ipr.link(
                    "add",
                    ifname=VXLAN_NAME,
                    kind="vxlan",
                    vxlan_id=VXLAN_VNI,
                    vxlan_port=VXLAN_PORT,
                    vxlan_local=UNDERLAY_ADDR[node],
                    vxlan_group=UNDERLAY_ADDR[other],
                    vxlan_link=veth_idx,
                    vxlan_learning=0,
                    mtu=VXLAN_MTU,
                )
                idx = ipr.link_lookup(ifname=VXLAN_NAME)[0]
                ipr.addr("add", index=idx, address=VXLAN_ADDR[node], prefixlen=24)
                ipr.link("set", index=idx, state="up")
        self._vxlan = True

    def del_vxlan(self) -> None:
        self._check_open()
        for node in NODES:
            with self.ipr(node) as ipr:
                idx = ipr.link_lookup(ifname=VXLAN_NAME)
                if idx:
                    ipr.link("del", index=idx[0])
        self._vxlan = False

    # -- traffic helpers --

    def iperf3(
        self,
        client: str = "a",
        dst: str | None = None,
        seconds: float = 3,
        zerocopy: bool = False,
        extra: Sequence[str] = (),
        port: int = IPERF_PORT,
    ) -> IperfResult:
        """One iperf3 TCP run: `iperf3 -s -1` in the other node, `iperf3 -c dst -J` in `client`.

        seconds is rounded to a whole number >= 1 (iperf3 3.12 parses -t with atoi).
        """
        server_node = self.other(client)
        if dst is None:
            dst = TUN_ADDR[server_node]
        return self._iperf3(client, server_node, dst, seconds, zerocopy, extra, port)

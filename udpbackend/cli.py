"""Command line: `udpbackend run` (a node from static flags) and `udpbackend demo`.
Parses flags, reports every user-facing problem as one line and a non-zero exit code;
the work itself lives in daemon.py and demo.py.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from . import __version__
from .config import MODES, ConfigError, build_config, parse_ip, parse_peer, read_peers_file
from .packet import DEFAULT_PORT

log = logging.getLogger("udpbackend")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # one line, not argparse's usage block: the usage is one --help away
        sys.stderr.write(f"udpbackend: {message} (see --help)\n")
        raise SystemExit(2)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="udpbackend", description="flannel-compatible UDP/TUN overlay data plane")
    p.add_argument("--version", action="version", version=f"udpbackend {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    r = sub.add_parser("run", help="run a node in the foreground until SIGTERM/SIGINT")
    r.add_argument("--network", required=True, help="the overlay network, e.g. 10.5.0.0/16")
    r.add_argument("--subnet", required=True, help="this node's subnet, e.g. 10.5.52.0/24")
    r.add_argument(
        "--peer",
        action="append",
        default=[],
        metavar="SUBNET=PUBLIC_IP",
        help="a peer node's subnet and underlay address (repeatable)",
    )
    r.add_argument("--peers-file", help="file of SUBNET=PUBLIC_IP lines (# comments)")
    r.add_argument(
        "--iface",
        help="external interface (name or IPv4 address); "
        "default: the interface of the default route",
    )
    r.add_argument("--public-ip", help="underlay address peers use for this node")
    r.add_argument("--port", type=int, default=DEFAULT_PORT, help="UDP port (default %(default)s)")
    r.add_argument(
        "--mode",
        default="batched",
        choices=MODES,
        help="data plane: batched C (default), per-packet C (flannel's loop), "
        "python (the pure-Python twin)",
    )
    r.add_argument(
        "--offload",
        default="auto",
        choices=("auto", "off"),
        help="UDP GSO/GRO in batched mode: auto (where the kernel has them) or off",
    )
    r.add_argument("--tun-name", default="flannel0", help="TUN device name (default %(default)s)")
    r.add_argument("--subnet-file", help="write flannel's subnet.env here")
    r.add_argument("--stats-file", help="keep the data-plane counters here as JSON (every 1 s)")
    r.add_argument("-v", "--verbose", action="count", default=0)

    d = sub.add_parser("demo", help="two nodes in network namespaces: ping and throughput")
    d.add_argument("--mode", default="batched", choices=MODES)
    d.add_argument("--seconds", type=float, default=3.0, help="iperf3 duration")
    return p


def _run(args: argparse.Namespace) -> int:
    from .daemon import Node, RunOptions, StartupError
    from .iface import IfaceError
    from .tun import TunError

    peers = [parse_peer(t) for t in args.peer]
    if args.peers_file:
        peers += read_peers_file(args.peers_file)
    cfg = build_config(args.network, args.subnet, peers, args.port, args.mode)
    opts = RunOptions(
        tun_name=args.tun_name,
        iface=args.iface,
        public_ip=parse_ip(args.public_ip, "--public-ip") if args.public_ip else None,
        stats_file=args.stats_file,
        subnet_file=args.subnet_file,
        offload=args.offload == "auto",
    )
    if os.geteuid() != 0:
        raise StartupError("must run as root: creating the TUN device needs CAP_NET_ADMIN")
    node = Node(cfg, opts)
    try:
        try:
            node.setup()
        except (IfaceError, TunError) as e:
            raise StartupError(str(e)) from None
        import uvloop

        return uvloop.run(node.run())
    finally:
        node.teardown()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "verbose", 0) else logging.INFO,
        format="udpbackend: %(message)s",
    )
    from .daemon import StartupError

    try:
        if args.command == "run":
            return _run(args)
        from .demo import run_demo

        return run_demo(mode=args.mode, seconds=args.seconds)
    except ConfigError as e:
        sys.stderr.write(f"udpbackend: {e}\n")
        return 2
    except StartupError as e:
        sys.stderr.write(f"udpbackend: {e}\n")
        return 1
    except KeyboardInterrupt:
        return 130

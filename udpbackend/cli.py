"""Command line: `udpbackend run` (a node: from etcd like flanneld, or from static flags),
`udpbackend demo`, `udpbackend bench` and `udpbackend trace`.  flanneld's flag names and
defaults, Go-style `-flag` spellings and FLANNELD_<NAME> environment variables; every
user-facing problem is one line and a non-zero exit code.  The work itself lives in node/
(run), lab/demo.py, lab/bench.py and lab/trace.py.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from . import __version__
from .control.static import build_config, parse_ip, parse_peer, read_peers_file
from .errors import ConfigError, StartupError
from .options import DEFAULT_LINGER_MS, DEFAULT_PEER_CHECK, MODES, PEER_CHECKS

log = logging.getLogger("udpbackend")

ENV_PREFIX = "FLANNELD_"
DEFAULT_ENDPOINTS = "http://127.0.0.1:4001,http://127.0.0.1:2379"
DEFAULT_SUBNET_FILE = "/run/flannel/subnet.env"
# flanneld flags for features this data plane lacks (udp backend, IPv4): flag -> its default
UNSUPPORTED: dict[str, str | bool] = {
    "--public-ipv6": "",
    "--ip-blackhole-route": False,
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # one line, not argparse's usage block: the usage is one --help away
        sys.stderr.write(f"udpbackend: {message} (see --help)\n")
        raise SystemExit(2)


def parse_bool(text: str) -> bool:
    """Go's strconv.ParseBool spellings."""
    t = text.strip().lower()
    if t in ("1", "t", "true", "yes", "on"):
        return True
    if t in ("0", "f", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a boolean")


def _bool_flag(p: argparse.ArgumentParser, name: str, default: bool, help: str) -> None:
    # flanneld's booleans: `--x` means true, `--x=false` false
    p.add_argument(
        name, nargs="?", const=True, default=default, type=parse_bool, metavar="BOOL", help=help
    )


def _add_run(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    r = sub.add_parser(
        "run",
        help="run a node in the foreground until SIGTERM/SIGINT",
        description="Without --network: a flanneld-compatible node taking its subnet lease and "
        "peers from etcd. With --network/--subnet: a static node, peers from --peer. Every "
        "flag can also be set as FLANNELD_<NAME> (e.g. FLANNELD_ETCD_ENDPOINTS).",
    )
    g = r.add_argument_group("etcd (flanneld's flags)")
    g.add_argument("--etcd-endpoints", default=DEFAULT_ENDPOINTS, help="comma-separated")
    g.add_argument("--etcd-prefix", default="/coreos.com/network")
    g.add_argument("--etcd-keyfile", default="", help="TLS client key (with --etcd-certfile)")
    g.add_argument("--etcd-certfile", default="", help="TLS client certificate")
    g.add_argument("--etcd-cafile", default="", help="CA of the etcd server's certificate")
    g.add_argument("--etcd-username", default="")
    g.add_argument("--etcd-password", default="")
    g.add_argument(
        "--subnet-lease-renew-margin",
        type=int,
        default=60,
        metavar="MINUTES",
        help="renew the lease this long before it expires (1..1439, default %(default)s)",
    )
    g = r.add_argument_group("Kubernetes (flanneld's flags)")
    _bool_flag(
        g, "--kube-subnet-mgr", False, "take the subnet from the Node's podCIDR, peers from Nodes"
    )
    g.add_argument("--kube-api-url", default="", help="API server URL (default: in-cluster)")
    g.add_argument("--kubeconfig-file", default="", help="kubeconfig (default: in-cluster)")
    g.add_argument("--kube-annotation-prefix", default="flannel.alpha.coreos.com")
    g.add_argument("--net-config-path", default="/etc/kube-flannel/net-conf.json")
    _bool_flag(g, "--set-node-network-unavailable", True, "set NetworkUnavailable=False once ready")
    g = r.add_argument_group("node (flanneld's flags)")
    g.add_argument(
        "--iface",
        action="append",
        default=[],
        help="external interface, name or IPv4 address (repeatable); "
        "default: the interface of the default route",
    )
    g.add_argument("--iface-regex", action="append", default=[], help="regex on IPs, then names")
    g.add_argument("--iface-can-reach", default="", help="the interface that routes to this IP")
    g.add_argument("--public-ip", default="", help="underlay address peers use for this node")
    g.add_argument(
        "--subnet-file",
        default=None,
        help=f"write flannel's subnet.env here (default {DEFAULT_SUBNET_FILE} with etcd, "
        "none in static mode)",
    )
    _bool_flag(g, "--ip-masq", False, "masquerade traffic leaving the overlay")
    _bool_flag(
        g,
        "--ip-masq-fully-random-disable",
        False,
        "masquerade without --random-fully (nftables: without fully-random)",
    )
    _bool_flag(g, "--iptables-forward-rules", True, "accept overlay traffic in FORWARD")
    g.add_argument("--iptables-resync", type=int, default=5, metavar="SECONDS")
    g.add_argument("--healthz-ip", default="0.0.0.0")
    g.add_argument("--healthz-port", type=int, default=0, help="0 disables /healthz and /readyz")
    g.add_argument("-v", "--v", dest="verbose", type=int, default=0, metavar="LEVEL")
    g = r.add_argument_group("flanneld's flags for what udpbackend does not do (a warning)")
    for name, default in UNSUPPORTED.items():
        if isinstance(default, bool):
            _bool_flag(g, name, default, "accepted, warned about, no effect")
        else:
            g.add_argument(name, default=default, help="accepted, warned about, no effect")

    g = r.add_argument_group("static mode (no etcd)")
    g.add_argument("--network", help="the overlay network, e.g. 10.5.0.0/16")
    g.add_argument("--subnet", help="this node's subnet, e.g. 10.5.52.0/24")
    g.add_argument(
        "--peer",
        action="append",
        default=[],
        metavar="SUBNET=PUBLIC_IP",
        help="a peer node's subnet and underlay address (repeatable)",
    )
    g.add_argument("--peers-file", help="file of SUBNET=PUBLIC_IP lines (# comments)")
    g.add_argument("--port", type=int, default=None, help="UDP port (default 8285)")

    g = r.add_argument_group("data plane")
    g.add_argument(
        "--mode",
        default="batched",
        choices=MODES,
        help="batched C (default), per-packet C (flannel's loop), python (the pure-Python twin)",
    )
    g.add_argument(
        "--offload",
        default="auto",
        choices=("auto", "off"),
        help="UDP GSO/GRO in batched mode: auto (where the kernel has them) or off",
    )
    g.add_argument(
        "--driver",
        default="python",
        choices=("python", "c"),
        help="static mode: who drives the C pumps - the uvloop event loop (default) or a tight "
        "C epoll loop on a thread (a yardstick for the Python glue's cost)",
    )
    g.add_argument(
        "--queues",
        default="auto",
        metavar="N|auto",
        help="data-plane queues: each a TUN queue, an SO_REUSEPORT UDP socket and a thread "
        "(a flow stays on one); auto: one per CPU this process may use (default)",
    )
    g.add_argument(
        "--rt-priority",
        type=int,
        default=0,
        metavar="N",
        help="run the queue threads SCHED_RR at priority N (1..99): packets no longer wait "
        "for a time slice behind busy processes (lower latency under load, but smaller "
        "batches: fewer small packets per second); 0: normal (default)",
    )
    g.add_argument(
        "--linger-ms",
        type=int,
        default=DEFAULT_LINGER_MS,
        metavar="MS",
        help="after its last packet a queue keeps serving from C this long before its fds go "
        "back to the event loop (request/response traffic then costs no Python per packet); "
        "0: one drain of both directions per wake-up (default %(default)s)",
    )
    g.add_argument(
        "--peer-check",
        default=DEFAULT_PEER_CHECK,
        choices=PEER_CHECKS,
        help="which UDP datagrams may write into the TUN: strict (default) - sent from a "
        "peer's public IP, inner source in that peer's subnet, inner destination in this "
        "node's; peer-only - sent from a peer's public IP, inner addresses unchecked (a node "
        "that routes outside traffic into the overlay without --ip-masq); off - anything "
        "from anywhere, flannel's behaviour: RISK: any host that reaches UDP port 8285 can "
        "inject packets into the pod network and get replies. A peer whose datagrams arrive "
        "from another address than its lease's PublicIP (behind NAT, or run with a "
        "--public-ip other than its interface's address) is refused by both checks: it needs "
        "off",
    )
    g.add_argument(
        "--tun-name",
        default="flannel%d",
        help="TUN device name (default: flannel%%d, the kernel picks the number, as flanneld)",
    )
    g.add_argument("--stats-file", help="keep the data-plane counters here as JSON (every 1 s)")
    return r


def _parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    p = _Parser(prog="udpbackend", description="flannel-compatible UDP/TUN overlay data plane")
    p.add_argument("--version", action="version", version=f"udpbackend {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = _add_run(sub)
    o = sub.add_parser(
        "docker-opts",
        help="subnet.env -> docker daemon options, as flannel's mk-docker-opts.sh",
        description="Writes docker's options (--bip, --mtu, --ip-masq) from flannel's "
        "subnet.env into an env file for docker's unit, with mk-docker-opts.sh's flags, "
        "variable names and quoting. Without -i or -c: both.",
    )
    o.add_argument("-f", dest="flannel_env", default="/run/flannel/subnet.env", metavar="FILE")
    o.add_argument("-d", dest="docker_env", default="/run/docker_opts.env", metavar="FILE")
    o.add_argument("-i", dest="individual", action="store_true", help="DOCKER_OPT_* lines")
    o.add_argument("-c", dest="combined", action="store_true", help="one combined line")
    o.add_argument("-k", dest="key", default="DOCKER_OPTS", help="the combined line's name")
    o.add_argument("-m", dest="no_ip_masq", action="store_true", help="no --ip-masq option")
    c = sub.add_parser(
        "cni-config",
        help="subnet.env -> the bridge plugin's config, as flannel's CNI plugin derives it",
        description="Prints the network configuration flannel's CNI plugin would hand its "
        "delegate (bridge cni0, host-local over FLANNEL_SUBNET, the pod MTU, ipMasq where "
        "flannel does not masquerade), for hosts with Debian's containernetworking-plugins.",
    )
    c.add_argument("-f", dest="flannel_env", default="/run/flannel/subnet.env", metavar="FILE")
    c.add_argument("--name", default="cbr0", help="the network name (default %(default)s)")
    c.add_argument(
        "--delegate",
        default='{"hairpinMode": true, "isDefaultGateway": true}',
        help="the conflist's delegate object, JSON (default: kube-flannel.yml's)",
    )
    d = sub.add_parser("demo", help="nodes in network namespaces: ping and throughput")
    d.add_argument("--mode", default="batched", choices=MODES)
    d.add_argument("--seconds", type=float, default=3.0, help="iperf3 duration")
    d.add_argument("--nodes", type=int, default=3, help="number of nodes (2..20, default 3)")
    from .lab import bench, trace

    b = sub.add_parser(
        "bench",
        help="the overlay benchmark ladder in network namespaces (veth, VXLAN, every mode)",
        description="Builds its own two-namespace testbed, measures every rung of the ladder "
        "the same way (TCP 1/4 streams, UDP packet rate at <= 1% loss, RTT idle and loaded, "
        "CPU per GB, syscalls per packet, batch sizes, retransmits) and removes it again.",
    )
    bench.add_arguments(b)
    t = sub.add_parser(
        "trace",
        help="decode a running node's packets (wire and TUN) and show its live counters",
        description="Captures packets on the underlay (UDP port 8285) and on the TUN device "
        "and prints them layer by layer (outer IPv4/UDP, inner IPv4, TTL before and after), "
        "with the data plane's per-second counters from its --stats-file.",
    )
    trace.add_arguments(t)
    return p, run


def go_style(argv: list[str]) -> list[str]:
    """Accept Go's single-dash long flags (`-etcd-endpoints=...`, `-iface eth0`)."""
    out: list[str] = []
    for a in argv:
        if a == "--":
            out.extend(argv[len(out) :])
            break
        if a.startswith("-") and not a.startswith("--") and len(a.split("=", 1)[0]) > 2:
            a = "-" + a
        out.append(a)
    return out


def env_var(flag: str) -> str:
    """FLANNELD_<NAME> for --name: upper case, '-' and '.' become '_'."""
    return ENV_PREFIX + flag.lstrip("-").upper().replace("-", "_").replace(".", "_")


def _env_actions(run: argparse.ArgumentParser) -> list[tuple[argparse.Action, list[str]]]:
    out = []
    for action in run._actions:
        longs = [o for o in action.option_strings if o.startswith("--")]
        if longs and longs[0] not in ("--help", "--version"):
            out.append((action, longs))
    return out


def known_env_vars() -> set[str]:
    """Every FLANNELD_* variable `udpbackend run` understands."""
    return {env_var(longs[0]) for _, longs in _env_actions(_parser()[1])}


def apply_env(run: argparse.ArgumentParser, argv: list[str], environ: dict[str, str]) -> None:
    """FLANNELD_<NAME> sets every flag not given on the command line (non-empty values only;
    a repeatable flag gets one value), as flanneld's flagutil does."""
    given = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    for action, longs in _env_actions(run):
        if any(o in given for o in longs):
            continue
        var = env_var(longs[0])
        raw = environ.get(var, "")
        if not raw:
            continue
        try:
            value = action.type(raw) if callable(action.type) else raw
        except (ValueError, argparse.ArgumentTypeError) as e:
            raise ConfigError(f"{var}: {e}") from None
        if action.choices is not None and value not in action.choices:
            raise ConfigError(f"{var}: {raw!r} is not one of {', '.join(map(str, action.choices))}")
        run.set_defaults(**{action.dest: [value] if isinstance(action.default, list) else value})


def unsupported_warnings(args: argparse.Namespace, environ: dict[str, str]) -> list[str]:
    """One line per flanneld feature asked for that udpbackend does not have, and per
    FLANNELD_* variable that names no flag at all (flanneld ignores both silently)."""
    out = []
    for name, default in UNSUPPORTED.items():
        value = getattr(args, name.lstrip("-").replace("-", "_"))
        if value != default:
            out.append(f"{name}={value}: flanneld feature not supported by udpbackend, ignored")
    known = known_env_vars()
    for var in sorted(environ):
        if var.startswith(ENV_PREFIX) and var not in known:
            out.append(f"{var}: no such flanneld flag, ignored")
    return out


def _run(args: argparse.Namespace) -> int:
    from .node.compose import run_node
    from .options import RunOptions

    if not 1 <= args.subnet_lease_renew_margin <= 1439:
        raise ConfigError(
            "--subnet-lease-renew-margin: Invalid subnet-lease-renew-margin option, "
            "out of acceptable range (1..1439 minutes)"
        )
    opts = RunOptions(
        tun_name=args.tun_name,
        ifaces=tuple(args.iface),
        iface_regexes=tuple(args.iface_regex),
        iface_can_reach=args.iface_can_reach or None,
        public_ip=parse_ip(args.public_ip, "--public-ip") if args.public_ip else None,
        stats_file=args.stats_file,
        subnet_file=args.subnet_file,
        offload=args.offload == "auto",
        mode=args.mode,
        driver=args.driver,
        queues=parse_queues(args.queues),
        rt_priority=args.rt_priority,
        linger_ms=args.linger_ms,
        peer_check=args.peer_check,
        ip_masq=args.ip_masq,
        ip_masq_fully_random_disable=args.ip_masq_fully_random_disable,
        forward_rules=args.iptables_forward_rules,
        iptables_resync=args.iptables_resync,
        healthz_ip=args.healthz_ip,
        healthz_port=args.healthz_port,
        etcd_endpoints=[e.strip() for e in args.etcd_endpoints.split(",") if e.strip()],
        etcd_prefix=args.etcd_prefix,
        etcd_cafile=args.etcd_cafile,
        etcd_certfile=args.etcd_certfile,
        etcd_keyfile=args.etcd_keyfile,
        etcd_username=args.etcd_username,
        etcd_password=args.etcd_password,
        renew_margin_minutes=args.subnet_lease_renew_margin,
        kube_subnet_mgr=args.kube_subnet_mgr,
        kube_api_url=args.kube_api_url,
        kubeconfig_file=args.kubeconfig_file,
        kube_annotation_prefix=args.kube_annotation_prefix,
        net_config_path=args.net_config_path,
        set_node_network_unavailable=args.set_node_network_unavailable,
    )
    for line in unsupported_warnings(args, dict(os.environ)):
        log.warning("%s", line)
    if not 0 <= args.linger_ms <= MAX_LINGER_MS:
        raise ConfigError(f"--linger-ms: {args.linger_ms} is outside 0..{MAX_LINGER_MS}")
    if not 0 <= args.rt_priority <= 99:
        raise ConfigError(f"--rt-priority: {args.rt_priority} is outside 0..99")
    static = None
    if args.kube_subnet_mgr and (args.network or args.subnet):
        raise ConfigError("--kube-subnet-mgr takes the subnet from the Node: no --network/--subnet")
    if args.kube_subnet_mgr:
        from .control.annotations import annotations_for

        annotations_for(args.kube_annotation_prefix)  # a bad prefix is a flag error (exit 2)
    if args.network or args.subnet:
        if not (args.network and args.subnet):
            raise ConfigError("static mode needs both --network and --subnet")
        peers = [parse_peer(t) for t in args.peer]
        if args.peers_file:
            peers += read_peers_file(args.peers_file)
        static = build_config(args.network, args.subnet, peers, args.port or 8285, args.mode)
        if args.driver == "c" and args.mode == "python":
            raise ConfigError(
                "--driver c drives the C pumps: use it with --mode batched|per-packet"
            )
    elif args.peer or args.peers_file or args.port or args.driver != "python":
        raise ConfigError(
            "--peer/--peers-file/--port/--driver are for static mode (with --network)"
        )
    elif opts.subnet_file is None:
        opts.subnet_file = DEFAULT_SUBNET_FILE
    if static is not None:
        opts.forward_rules = False  # static nodes never wrote FLANNEL-FWD; --ip-masq still works
    if os.geteuid() != 0:
        raise StartupError("must run as root: creating the TUN device needs CAP_NET_ADMIN")
    return run_node(static, opts)


def _cni_config(args: argparse.Namespace) -> int:
    import json

    from .host import cniconf

    try:
        with open(args.flannel_env) as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(
            f"failed to load flannel 'subnet.env' file {args.flannel_env}: {e.strerror}"
        ) from None
    try:
        delegate = json.loads(args.delegate)
    except ValueError as e:
        raise ConfigError(f"--delegate: not JSON: {e}") from None
    if not isinstance(delegate, dict):
        raise ConfigError("--delegate: must be a JSON object")
    fenv = cniconf.read_flannel_env(text, args.flannel_env)
    conf = cniconf.delegate_config(fenv, name=args.name, delegate=delegate)
    sys.stdout.write(json.dumps(conf, indent=2) + "\n")
    return 0


def _docker_opts(args: argparse.Namespace) -> int:
    from .host import dockeropts

    try:
        with open(args.flannel_env) as f:
            text: str | None = f.read()
    except FileNotFoundError:
        text = None  # the script sources the file only "if [ -f ]"
    except OSError as e:
        raise ConfigError(f"-f {args.flannel_env}: {e.strerror}") from None
    both = not (args.individual or args.combined)
    opts = dockeropts.DockerOpts(
        individual=args.individual or both,
        combined=args.combined or both,
        key=args.key,
        ip_masq=not args.no_ip_masq,
    )
    values = dockeropts.flannel_values(text, os.environ)
    out = dockeropts.render(values, opts, os.environ)
    try:
        with open(args.docker_env, "w") as f:
            f.write(out)
    except OSError as e:
        raise ConfigError(f"-d {args.docker_env}: {e.strerror}") from None
    subnet = dockeropts.bridge_subnet(values)
    route = dockeropts.conflicting_route(subnet) if subnet else None
    if route:
        raise StartupError(f"Your routing table already contains the subnet: {route}")
    return 0


MAX_QUEUES = 64
MAX_LINGER_MS = 10_000


def parse_queues(text: str) -> int:
    """--queues: a count in 1..MAX_QUEUES, or auto (one per CPU we may run on, at most that)."""
    if text == "auto":
        return max(1, min(MAX_QUEUES, len(os.sched_getaffinity(0))))
    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 1 <= n <= MAX_QUEUES:
        raise ConfigError(f"--queues: {text!r} is not auto or a number in 1..{MAX_QUEUES}")
    return n


def main(argv: list[str] | None = None) -> int:
    argv = go_style(list(sys.argv[1:] if argv is None else argv))
    parser, run = _parser()
    try:
        apply_env(run, argv, dict(os.environ))
    except ConfigError as e:
        sys.stderr.write(f"udpbackend: {e}\n")
        return 2
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "verbose", 0) else logging.INFO,
        format="%(asctime)s.%(msecs)03d udpbackend: %(message)s",
        datefmt="%Y-%m-%dT%H:%M:%S",
    )
    if not getattr(args, "verbose", 0):
        # lightkube's HTTP client logs every API request at INFO: only with -v
        for name in ("httpx", "httpx2", "httpcore", "httpcore2"):
            logging.getLogger(name).setLevel(logging.WARNING)

    try:
        if args.command == "run":
            return _run(args)
        if args.command == "cni-config":
            return _cni_config(args)
        if args.command == "docker-opts":
            return _docker_opts(args)
        if args.command == "bench":
            from .lab.bench import BenchError
            from .lab.bench import run as run_bench

            try:
                return run_bench(args)
            except BenchError as e:
                raise ConfigError(str(e)) from None
        if args.command == "trace":
            from .lab.trace import TraceError
            from .lab.trace import run as run_trace

            try:
                return run_trace(args)
            except TraceError as e:
                raise ConfigError(str(e)) from None
        from .lab.demo import run_demo

        return run_demo(mode=args.mode, seconds=args.seconds, nodes=args.nodes)
    except ConfigError as e:
        sys.stderr.write(f"udpbackend: {e}\n")
        return 2
    except StartupError as e:
        sys.stderr.write(f"udpbackend: {e}\n")
        return 1
    except KeyboardInterrupt:
        return 130


def flanneld_main(argv: list[str] | None = None) -> int:
    """`flanneld`: flanneld's own command line, no subcommand, so kube-flannel.yml's
    `command:` and a systemd `ExecStart=` carry over unchanged; `--version` prints the
    version on stderr, as flanneld does."""
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a.split("=", 1)[0] in ("--version", "-version") for a in args):
        sys.stderr.write(f"v{__version__}\n")
        return 0
    return main(["run", *args])

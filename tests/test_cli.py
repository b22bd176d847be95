"""The command line's contract with its user: every bad input is one line on stderr and a
non-zero exit, never a traceback; flanneld spellings (FLANNELD_* environment, -flag) work.
Runs the real `main()` in-process; nothing here needs root or sends a packet."""

import os
import socket

import pytest

from udpbackend import cli
from udpbackend.dataplane import tun

NET = ["--network", "198.19.0.0/16", "--subnet", "198.19.1.0/24"]


def run(capsys, argv, euid=0, monkeypatch=None):
    if monkeypatch is not None:
        monkeypatch.setattr(cli.os, "geteuid", lambda: euid)
    rc = cli.main(argv)
    err = capsys.readouterr().err
    return rc, err


def one_line(err: str) -> str:
    lines = [li for li in err.splitlines() if li.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("udpbackend: ")
    return lines[0]


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["run", "--network", "198.19.0.0/33", "--subnet", "198.19.1.0/24"], "not an IPv4 CIDR"),
        (["run", "--network", "banana", "--subnet", "198.19.1.0/24"], "not an IPv4 CIDR"),
        (["run", "--network", "198.19.0.0/16", "--subnet", "198.20.1.0/24"], "is not inside"),
        (["run", *NET[:2], "--subnet", "198.19.0.0/16"], "whole --network"),
        (["run", *NET, "--peer", "198.20.2.0/24=198.18.0.2"], "not inside --network"),
        (
            [
                "run",
                *NET,
                "--peer",
                "198.19.2.0/24=198.18.0.2",
                "--peer",
                "198.19.2.0/24=198.18.0.3",
            ],
            "duplicate subnet",
        ),
        (
            [
                "run",
                *NET,
                "--peer",
                "198.19.2.0/24=198.18.0.2",
                "--peer",
                "198.19.2.128/25=198.18.0.3",
            ],
            "overlaps peer",
        ),
        (["run", *NET, "--peer", "198.19.1.0/25=198.18.0.2"], "overlaps this node"),
        (["run", *NET, "--peer", "198.19.2.0/24"], "SUBNET=PUBLIC_IP"),
        (["run", *NET, "--peer", "198.19.2.0/24=not-an-ip"], "not an IPv4 address"),
        (["run", *NET, "--port", "70000"], "not a UDP port"),
        (["run", *NET, "--peers-file", "/nonexistent/peers"], "cannot read"),
        (["run", "--network", "198.19.0.0/16"], "needs both --network and --subnet"),
        (["run", "--peer", "198.19.2.0/24=198.18.0.2"], "static mode"),
        (["run", "--subnet-lease-renew-margin=0"], "out of acceptable range"),
        (["run", "--subnet-lease-renew-margin=1440"], "out of acceptable range"),
        (["run", *NET, "--mode", "python", "--driver", "c"], "--driver c"),
        (["run", *NET, "--queues", "0"], "--queues: '0' is not auto or a number in 1..64"),
        (["run", *NET, "--queues", "65"], "--queues"),
        (["run", *NET, "--queues", "many"], "--queues: 'many'"),
        (["run", *NET, "--rt-priority", "100"], "--rt-priority: 100 is outside 0..99"),
        (["run", *NET, "--rt-priority", "-1"], "--rt-priority: -1 is outside 0..99"),
    ],
)
def test_bad_flags_are_one_line_exit_2(capsys, monkeypatch, argv, needle):
    rc, err = run(capsys, argv, monkeypatch=monkeypatch)
    assert rc == 2
    assert needle in one_line(err)


@pytest.mark.parametrize(
    ("argv", "needle"),
    [(["run", "--mode", "turbo"], "invalid choice"), (["run", "--bogus"], "unrecognized")],
)
def test_argparse_errors_exit_2(capsys, argv, needle):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert needle in one_line(capsys.readouterr().err)


def test_bad_peers_file_line_names_the_line(capsys, monkeypatch, tmp_path):
    f = tmp_path / "peers"
    f.write_text("# peers\n198.19.2.0/24=198.18.0.2\n\n198.19.3.0/24 198.18.0.3\n")
    rc, err = run(capsys, ["run", *NET, "--peers-file", str(f)], monkeypatch=monkeypatch)
    assert rc == 2 and f"{f}:4" in one_line(err)


def test_not_root(capsys, monkeypatch):
    rc, err = run(capsys, ["run", *NET], euid=1000, monkeypatch=monkeypatch)
    assert rc == 1 and "must run as root" in one_line(err)


def test_missing_dev_net_tun(capsys, monkeypatch):
    monkeypatch.setattr(tun, "TUN_DEVICE", "/nonexistent/net/tun")
    argv = ["run", *NET, "--iface", "127.0.0.1", "--port", "0"]
    rc, err = run(capsys, argv, monkeypatch=monkeypatch)
    assert rc == 1 and "/nonexistent/net/tun is missing" in one_line(err)


def test_port_in_use(capsys, monkeypatch):
    busy = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    busy.bind(("127.0.0.1", 0))
    port = busy.getsockname()[1]
    try:
        rc, err = run(
            capsys,
            ["run", *NET, "--iface", "127.0.0.1", "--port", str(port)],
            monkeypatch=monkeypatch,
        )
    finally:
        busy.close()
    assert rc == 1 and f"UDP port {port} on 127.0.0.1 is already in use" in one_line(err)


def test_unknown_interface(capsys, monkeypatch):
    rc, err = run(capsys, ["run", *NET, "--iface", "nope0"], monkeypatch=monkeypatch)
    assert rc == 1 and "nope0" in one_line(err)


def test_flanneld_env_and_go_style_flags():
    parser, run_p = cli._parser()
    env = {
        "FLANNELD_ETCD_ENDPOINTS": "http://198.18.0.254:2379",
        "FLANNELD_IFACE": "veth0",
        "FLANNELD_IP_MASQ": "true",
        "FLANNELD_HEALTHZ_PORT": "8081",
        "FLANNELD_PUBLIC_IP": "",  # empty values are ignored, as flanneld does
    }
    argv = cli.go_style(["run", "-etcd-prefix=/x/net", "-iface", "veth1"])
    cli.apply_env(run_p, argv, env)
    args = parser.parse_args(argv)
    assert args.etcd_endpoints == "http://198.18.0.254:2379"
    assert args.etcd_prefix == "/x/net"
    assert args.iface == ["veth1"]  # the command line wins over FLANNELD_IFACE
    assert args.ip_masq is True and args.healthz_port == 8081 and args.public_ip == ""


def test_flanneld_env_bad_value_is_one_line(capsys, monkeypatch):
    monkeypatch.setenv("FLANNELD_HEALTHZ_PORT", "eighty")
    rc = cli.main(["run"])
    assert rc == 2 and "FLANNELD_HEALTHZ_PORT" in one_line(capsys.readouterr().err)


@pytest.mark.parametrize(
    ("text", "value"), [("1", True), ("t", True), ("TRUE", True), ("0", False), ("false", False)]
)
def test_go_booleans(text, value):
    assert cli.parse_bool(text) is value


def test_bool_flags_take_go_spellings():
    parser, _ = cli._parser()
    args = parser.parse_args(["run", "--iptables-forward-rules=false", "--ip-masq"])
    assert args.iptables_forward_rules is False and args.ip_masq is True
    assert cli.env_var("--iface-can-reach") == "FLANNELD_IFACE_CAN_REACH"
    assert "FLANNELD_ETCD_CAFILE" in cli.known_env_vars()


def test_queues_auto_is_one_per_usable_cpu(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})
    assert cli.parse_queues("auto") == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(200)))
    assert cli.parse_queues("auto") == cli.MAX_QUEUES
    assert cli.parse_queues("5") == 5


# --- kube mode and flanneld's own command line ---------------------------------------------

KUBECONFIG = """apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "http://127.0.0.1:9"}}]
users: [{name: u, user: {token: t}}]
contexts: [{name: x, context: {cluster: c, user: u}}]
current-context: x
"""


def test_flanneld_version_is_one_line_on_stderr(capsys):
    assert cli.flanneld_main(["--version"]) == 0
    out = capsys.readouterr()
    assert out.out == "" and out.err.strip().startswith("v") and out.err.count("\n") == 1


def test_flanneld_takes_flanneld_argv_without_a_subcommand(capsys, monkeypatch):
    monkeypatch.setattr(cli.os, "geteuid", lambda: 1000)
    rc = cli.flanneld_main(["--ip-masq", "--kube-subnet-mgr"])
    err = capsys.readouterr().err
    assert rc == 1 and "must run as root" in one_line(err)


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["run", "--kube-subnet-mgr", *NET], "no --network/--subnet"),
        (["run", "--kube-subnet-mgr", "--kube-annotation-prefix", "a/b/c"], "single slash"),
        (["run", "--kube-subnet-mgr", "--kube-annotation-prefix", "NoDots"], "fqdn"),
    ],
)
def test_bad_kube_flags_are_one_line_exit_2(capsys, monkeypatch, argv, needle):
    rc, err = run(capsys, argv, monkeypatch=monkeypatch)
    assert rc == 2 and needle in one_line(err)


def test_kube_mode_startup_problems_are_one_line_exit_1(capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    for var in ("NODE_NAME", "POD_NAME", "POD_NAMESPACE"):
        monkeypatch.delenv(var, raising=False)
    kc = tmp_path / "kubeconfig"
    kc.write_text(KUBECONFIG)
    conf = tmp_path / "net-conf.json"
    base = ["run", "--kube-subnet-mgr", f"--net-config-path={conf}", "--subnet-file", ""]

    rc, err = run(capsys, base, monkeypatch=monkeypatch)  # no kubeconfig, not in a cluster
    assert rc == 1 and "fail to create kubernetes config (in-cluster config)" in one_line(err)
    rc, err = run(capsys, [*base, f"--kubeconfig-file={kc}"], monkeypatch=monkeypatch)
    assert rc == 1 and "POD_NAME and POD_NAMESPACE must be set" in one_line(err)
    monkeypatch.setenv("NODE_NAME", "n1")
    rc, err = run(capsys, [*base, f"--kubeconfig-file={kc}"], monkeypatch=monkeypatch)
    assert rc == 1 and "failed to read net conf" in one_line(err)
    conf.write_text('{"Network": "198.18.0.0/15", "Backend": {"Type": "udp", "Port": "x"}}')
    rc, err = run(capsys, [*base, f"--kubeconfig-file={kc}"], monkeypatch=monkeypatch)
    assert rc == 1 and "Backend" in one_line(err) and "Port" in err
    conf.write_text('{"Network": "198.18.0.0/15", "Backend": {"Type": "vxlan"}}')
    rc, err = run(capsys, [*base, f"--kubeconfig-file={kc}"], monkeypatch=monkeypatch)
    assert rc == 1 and "vxlan" in one_line(err)


def test_kube_flags_from_flanneld_environment():
    parser, run_p = cli._parser()
    env = {
        "FLANNELD_KUBE_SUBNET_MGR": "true",
        "FLANNELD_KUBE_API_URL": "https://198.18.0.1:6443",
        "FLANNELD_NET_CONFIG_PATH": "/tmp/n.json",
        "FLANNELD_SET_NODE_NETWORK_UNAVAILABLE": "false",
    }
    cli.apply_env(run_p, ["run"], env)
    args = parser.parse_args(["run"])
    assert args.kube_subnet_mgr is True and args.kube_api_url == "https://198.18.0.1:6443"
    assert args.net_config_path == "/tmp/n.json" and args.set_node_network_unavailable is False


def test_flanneld_features_we_lack_are_named_never_silent():
    parser, run_p = cli._parser()
    env = {"FLANNELD_IP_BLACKHOLE_ROUTE": "true", "FLANNELD_NO_SUCH_THING": "1"}
    cli.apply_env(run_p, ["run"], env)
    args = parser.parse_args(["run", "--public-ipv6=fd00::1"])
    lines = cli.unsupported_warnings(args, env)
    assert lines == [
        "--public-ipv6=fd00::1: flanneld feature not supported by udpbackend, ignored",
        "--ip-blackhole-route=True: flanneld feature not supported by udpbackend, ignored",
        "FLANNELD_NO_SUCH_THING: no such flanneld flag, ignored",
    ]
    fresh, _ = cli._parser()
    assert cli.unsupported_warnings(fresh.parse_args(["run"]), {}) == []


def test_peer_check_names_are_the_data_planes() -> None:
    """--peer-check offers exactly the checks the data plane knows (packet.PEER_CHECKS, in
    FP_PEER_CHECK_* order), the default among them."""
    from udpbackend import options
    from udpbackend.dataplane import packet

    assert sorted(options.PEER_CHECKS) == sorted(packet.PEER_CHECKS)
    assert options.DEFAULT_PEER_CHECK in options.PEER_CHECKS

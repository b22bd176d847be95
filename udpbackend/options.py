"""What the command line hands the node: RunOptions, one field per flag that reaches a running
node, with flanneld's defaults.  Plain data: no parsing (cli.py) and no behaviour (node/).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

MODES = ("batched", "per-packet", "python")  # --mode: C batched, C one packet a syscall, the twin
# --peer-check, as the help lists them (dataplane.packet.PEER_CHECKS holds the same names in
# the C's FP_PEER_CHECK_* order; tests/test_cli.py keeps the two sets equal).
PEER_CHECKS = ("strict", "peer-only", "off")
DEFAULT_PEER_CHECK = "strict"
# How long a C pump keeps serving after its last packet before its fds go back to the event
# loop's epoll (dataplane/forwarder.py): request/response traffic then stays in C between its
# packets; chosen by measurement (README: Latency); 0 = one drain of both directions per wake.
DEFAULT_LINGER_MS = 20
DEFAULT_ETCD_PREFIX = "/coreos.com/network"


@dataclass
class RunOptions:
    tun_name: str = "flannel%d"  # the kernel picks flannel0, flannel1, ... as flanneld lets it
    ifaces: tuple[str, ...] = ()
    iface_regexes: tuple[str, ...] = ()
    iface_can_reach: str | None = None
    public_ip: ipaddress.IPv4Address | None = None
    stats_file: str | None = None
    subnet_file: str | None = None
    offload: bool = True  # --offload auto: UDP GSO/GRO where the kernel has them
    mode: str = "batched"
    driver: str = "python"  # static mode: "c" runs the pumps from fp_run's C loop instead
    queues: int = 1  # TUN queues / UDP sockets / threads (IFF_MULTI_QUEUE + SO_REUSEPORT)
    rt_priority: int = 0  # > 0: the queue threads run SCHED_RR at this priority
    linger_ms: int = DEFAULT_LINGER_MS
    peer_check: str = DEFAULT_PEER_CHECK  # --peer-check, one of PEER_CHECKS (flannel: off)
    ip_masq: bool = False
    ip_masq_fully_random_disable: bool = False  # plain MASQUERADE, not --random-fully
    forward_rules: bool = True
    iptables_resync: int = 5
    healthz_ip: str = "0.0.0.0"
    healthz_port: int = 0
    etcd_endpoints: list[str] = field(default_factory=lambda: ["http://127.0.0.1:2379"])
    etcd_prefix: str = DEFAULT_ETCD_PREFIX
    etcd_cafile: str = ""
    etcd_certfile: str = ""
    etcd_keyfile: str = ""
    etcd_username: str = ""
    etcd_password: str = ""
    renew_margin_minutes: int = 60
    kube_subnet_mgr: bool = False
    kube_api_url: str = ""
    kubeconfig_file: str = ""
    kube_annotation_prefix: str = "flannel.alpha.coreos.com"
    net_config_path: str = "/etc/kube-flannel/net-conf.json"
    set_node_network_unavailable: bool = True

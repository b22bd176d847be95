"""The composition root: options in, a running node out.  Picks the subnet manager (static
flags, etcd or kube), the data-plane factory and the host's parts, and runs the one
lifecycle on uvloop.  Must not: hold lifecycle logic (lifecycle.py) or parse flags (cli.py).
"""

from __future__ import annotations

import ipaddress
import random
import time
from functools import partial

from ..control.manager import SubnetManager
from ..control.network import NetworkConfig
from ..control.static import NodeConfig, StaticManager
from ..dataplane.plane import DataPlane, tun_mtu
from ..host.firewall import Firewall
from ..host.iface import ExternalInterface, find_interface
from ..host.iptables import IptablesFirewall
from ..options import RunOptions
from .lifecycle import Node, Parts
from .notify import systemd_notifier


def etcd_manager(opts: RunOptions) -> SubnetManager:
    from ..control.etcd import EtcdRegistry
    from ..control.local import LocalManager

    registry = EtcdRegistry(
        endpoints=opts.etcd_endpoints,
        prefix=opts.etcd_prefix,
        cafile=opts.etcd_cafile or None,
        certfile=opts.etcd_certfile or None,
        keyfile=opts.etcd_keyfile or None,
        username=opts.etcd_username or None,
        password=opts.etcd_password or None,
    )
    return LocalManager(
        registry, clock=time.time, rng=random.Random(), renew_margin=opts.renew_margin_minutes
    )


def data_plane(
    opts: RunOptions,
    network: ipaddress.IPv4Network,
    subnet: ipaddress.IPv4Network,
    port: int,
    ext: ExternalInterface,
    mtu: int,
) -> DataPlane:
    return DataPlane(network, subnet, port, ext.address, ext.name, mtu, opts)


def kube_manager(opts: RunOptions) -> SubnetManager:
    from ..control.kube import kube_manager_from_env

    return kube_manager_from_env(
        opts.kube_api_url,
        opts.kubeconfig_file,
        opts.net_config_path,
        opts.kube_annotation_prefix,
        opts.set_node_network_unavailable,
    )


def firewall(opts: RunOptions, cfg: NetworkConfig, subnet: ipaddress.IPv4Network) -> Firewall:
    """flannel's rules for this node: nftables with "EnableNFTables": true, else iptables;
    either removes what the other mode left, as flanneld does at start."""
    from ..host.iptables import remove_flannel_chains
    from ..host.nftables import NftablesFirewall, remove_flannel_tables

    fully_random = not opts.ip_masq_fully_random_disable
    if cfg.enable_nftables:
        return NftablesFirewall(
            cfg.network,
            subnet,
            ip_masq=opts.ip_masq,
            forward=opts.forward_rules,
            fully_random=fully_random,
            ipv6_network=cfg.ipv6_network if cfg.enable_ipv6 else None,
            remove_other=remove_flannel_chains,
        )
    return IptablesFirewall(
        cfg.network,
        subnet,
        ip_masq=opts.ip_masq,
        forward=opts.forward_rules,
        fully_random=fully_random,
        remove_other=remove_flannel_tables,
    )


def build_parts(static: NodeConfig | None, opts: RunOptions) -> Parts:
    """The production parts for these options."""
    manager: SubnetManager
    if static is not None:
        manager = StaticManager(static)
    elif opts.kube_subnet_mgr:
        manager = kube_manager(opts)
    else:
        manager = etcd_manager(opts)
    return Parts(
        manager=manager,
        make_plane=partial(data_plane, opts),
        find_interface=partial(
            find_interface, opts.ifaces, opts.iface_regexes, opts.iface_can_reach
        ),
        tun_mtu=tun_mtu,
        make_firewall=partial(firewall, opts),
        notify=systemd_notifier(),
    )


def run_node(static: NodeConfig | None, opts: RunOptions) -> int:
    """Run a node until SIGTERM/SIGINT: static when ``static`` is given, else from etcd."""
    import uvloop

    async def main() -> int:
        return await Node(opts, build_parts(static, opts)).run()

    return uvloop.run(main())

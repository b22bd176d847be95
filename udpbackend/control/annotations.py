"""Kubernetes Nodes as flannel leases (flannel's pkg/subnet/kube annotations + nodeToLease):
the annotation names under a prefix, a Node object (plain JSON, as the API sends it) turned
into a lease or skipped with a reason, what this node must patch onto its own Node, and the
NetworkUnavailable condition.  Pure: no client, no I/O; bad input is a reason or ConfigError.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from ..errors import ConfigError
from .lease import Lease, LeaseAttrs

DEFAULT_PREFIX = "flannel.alpha.coreos.com"
UDP_BACKEND_TYPE = ""  # flannel's UDP backend sets no BackendType (udp_amd64.go)
UDP_BACKEND_DATA = "null"  # and no BackendData: json.Marshal(nil)
_PREFIX_RE = re.compile(r"(?:[a-z0-9_-]+\.)+[a-z0-9_-]+/(?:[a-z0-9_-]+-)?\Z")


@dataclass(frozen=True)
class Annotations:
    """The annotation keys flannel reads and writes under one --kube-annotation-prefix."""

    kube_managed: str
    backend_data: str
    backend_type: str
    public_ip: str
    public_ip_overwrite: str
    node_public_ip: str


def annotations_for(prefix: str = DEFAULT_PREFIX) -> Annotations:
    """flannel's newAnnotations: "fqdn" or "fqdn/" take a slash, "fqdn/name" a dash."""
    slashes = prefix.count("/")
    if slashes > 1:
        raise ConfigError("--kube-annotation-prefix: prefix can contain at most single slash")
    if slashes == 0:
        prefix += "/"
    if not prefix.endswith(("/", "-")):
        prefix += "-"
    if not _PREFIX_RE.match(prefix):
        raise ConfigError("--kube-annotation-prefix: prefix must be in a format: fqdn/[0-9a-z-_]*")
    return Annotations(
        kube_managed=prefix + "kube-subnet-manager",
        backend_data=prefix + "backend-data",
        backend_type=prefix + "backend-type",
        public_ip=prefix + "public-ip",
        public_ip_overwrite=prefix + "public-ip-overwrite",
        node_public_ip=prefix + "node-public-ip",
    )


def _dig(obj: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(obj, Mapping):
            return None
        obj = obj.get(key)
    return obj


def node_name(node: Mapping[str, Any]) -> str:
    name = _dig(node, "metadata", "name")
    return name if isinstance(name, str) else ""


def node_annotations(node: Mapping[str, Any]) -> dict[str, str]:
    ann = _dig(node, "metadata", "annotations")
    if not isinstance(ann, Mapping):
        return {}
    return {k: v for k, v in ann.items() if isinstance(k, str) and isinstance(v, str)}


def pod_cidr(node: Mapping[str, Any]) -> IPv4Network | None:
    """The node's IPv4 pod subnet: the IPv4 entry of spec.podCIDRs (one or two entries),
    else spec.podCIDR; None when none is assigned (yet).  ConfigError when malformed."""
    name = node_name(node)
    cidrs = _dig(node, "spec", "podCIDRs")
    if not isinstance(cidrs, list) or not cidrs:
        single = _dig(node, "spec", "podCIDR")
        cidrs = [single] if isinstance(single, str) and single else []
    if len(cidrs) > 2:
        raise ConfigError(f'node "{name}" pod cidrs should be IPv4/IPv6 only or dualstack')
    for text in cidrs:
        if not isinstance(text, str):
            raise ConfigError(f'node "{name}": podCIDR {text!r} is not a string')
        try:
            net = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise ConfigError(f'node "{name}": podCIDR {text!r} is not a CIDR') from None
        if isinstance(net, IPv4Network):
            return net
    return None


def node_to_lease(node: Mapping[str, Any], ann: Annotations) -> tuple[Lease | None, str]:
    """(lease, "") for a Node a flannel node manages, else (None, why it is skipped).
    The lease's key is "nodes/<name>"; it has no expiry (kube leases are never renewed)."""
    name = node_name(node)
    if not name:
        return None, "no metadata.name"
    a = node_annotations(node)
    if a.get(ann.kube_managed) != "true":
        return None, f"node {name}: not managed by a flannel kube subnet manager"
    text = a.get(ann.public_ip, "")
    try:
        public_ip = IPv4Address(text)
    except ValueError:
        return None, f"node {name}: {ann.public_ip} {text!r} is not an IPv4 address"
    try:
        subnet = pod_cidr(node)
    except ConfigError as e:
        return None, str(e)
    if subnet is None:
        return None, f"node {name}: no IPv4 podCIDR"
    extra: dict[str, object] = {"BackendType": a.get(ann.backend_type, "")}
    if ann.backend_data in a:
        extra["BackendData"] = a[ann.backend_data]
    return Lease(subnet, LeaseAttrs(public_ip, extra), None, f"nodes/{name}"), ""


def lease_fields(node: Mapping[str, Any], ann: Annotations) -> tuple[str, ...]:
    """What an update must change for flannel to pass it on: backend-data, backend-type,
    public-ip (flannel's handleUpdateLeaseEvent) - and the podCIDR, which it cannot."""
    a = node_annotations(node)
    spec = _dig(node, "spec") or {}
    cidrs = spec.get("podCIDRs") if isinstance(spec, Mapping) else None
    single = spec.get("podCIDR") if isinstance(spec, Mapping) else None
    return (
        a.get(ann.kube_managed, ""),
        a.get(ann.backend_data, ""),
        a.get(ann.backend_type, ""),
        a.get(ann.public_ip, ""),
        repr(cidrs),
        repr(single),
    )


def stored_public_ip(node: Mapping[str, Any], ann: Annotations) -> IPv4Address | None:
    """<prefix>/node-public-ip set by a person: it overrides --public-ip at start."""
    text = node_annotations(node).get(ann.node_public_ip, "")
    if not text:
        return None
    try:
        return IPv4Address(text)
    except ValueError:
        raise ConfigError(f"{ann.node_public_ip} {text!r} is not an IPv4 address") from None


def own_annotations_patch(
    node: Mapping[str, Any], ann: Annotations, public_ip: IPv4Address
) -> tuple[dict[str, Any] | None, IPv4Address]:
    """The strategic-merge patch this UDP node writes onto its own Node, or None when every
    annotation already holds what flannel would write; and the public IP peers will use
    (public-ip-overwrite, when a person has set it, wins - flannel's AcquireLease)."""
    a = node_annotations(node)
    overwrite = a.get(ann.public_ip_overwrite, "")
    effective = public_ip
    if overwrite:
        try:
            effective = IPv4Address(overwrite)
        except ValueError:
            raise ConfigError(
                f"{ann.public_ip_overwrite} {overwrite!r} is not an IPv4 address"
            ) from None
    want = {
        ann.backend_type: UDP_BACKEND_TYPE,
        ann.backend_data: UDP_BACKEND_DATA,
        ann.public_ip: str(effective),
        ann.kube_managed: "true",
    }
    changed = {k: v for k, v in want.items() if a.get(k) != v}
    if not changed:
        return None, effective
    return {"metadata": {"annotations": changed}}, effective


def network_available_patch(now: dt.datetime) -> dict[str, Any]:
    """NetworkUnavailable=False, as flannel's CompleteLease writes it."""
    stamp = now.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "status": {
            "conditions": [
                {
                    "type": "NetworkUnavailable",
                    "status": "False",
                    "reason": "FlannelIsUp",
                    "message": "Flannel is running on this node",
                    "lastTransitionTime": stamp,
                    "lastHeartbeatTime": stamp,
                }
            ]
        }
    }

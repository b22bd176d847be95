"""subnet.env, flannel's hand-off file to the CNI plugin and docker: format, parse and
atomic write (temp file + rename, mode 0644).  Byte-compatible with flanneld's file;
nothing here knows where the values came from.
"""

from __future__ import annotations

import ipaddress
import os
import tempfile


def format_subnet_env(
    network: ipaddress.IPv4Network,
    subnet: ipaddress.IPv4Network,
    mtu: int,
    ip_masq: bool,
    ipv6_network: ipaddress.IPv6Network | None = None,
    ipv6_subnet: ipaddress.IPv6Network | None = None,
) -> str:
    """The lines flanneld writes, in its order: the IPv4 network and subnet, the IPv6 ones
    when the config enables IPv6, then MTU and IPMASQ.  A SUBNET is the subnet's first
    address (network + 1) with the subnet's prefix length."""
    first = subnet.network_address + 1
    text = f"FLANNEL_NETWORK={network}\nFLANNEL_SUBNET={first}/{subnet.prefixlen}\n"
    if ipv6_network is not None and ipv6_subnet is not None:
        first6 = ipv6_subnet.network_address + 1
        text += f"FLANNEL_IPV6_NETWORK={ipv6_network}\n"
        text += f"FLANNEL_IPV6_SUBNET={first6}/{ipv6_subnet.prefixlen}\n"
    return text + f"FLANNEL_MTU={mtu}\nFLANNEL_IPMASQ={'true' if ip_masq else 'false'}\n"


def parse_subnet_env(text: str) -> dict[str, str]:
    """Tolerant KEY=VALUE reader (split at the first '='; blank and # lines skipped)."""
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            k, v = line.split("=", 1)
            out[k.strip()] = v.strip()
    return out


def write_subnet_env(path: str, content: str) -> None:
    """Write atomically: readers see the old file or the new one, never a part."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, mode=0o755, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".subnet.env.", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(content)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise

"""subnet.env, flannel's hand-off file to the CNI plugin and docker: format, parse and
atomic write (temp file + rename, mode 0644).  Byte-compatible with flanneld's file;
nothing here knows where the values came from.
"""

from __future__ import annotations

import ipaddress
import os
import tempfile


def format_subnet_env(
    network: ipaddress.IPv4Network, subnet: ipaddress.IPv4Network, mtu: int, ip_masq: bool
) -> str:
    """The four lines flanneld writes for an IPv4 network; FLANNEL_SUBNET is the subnet's
    first address (network + 1) with the subnet's prefix length."""
    first = subnet.network_address + 1
    return (
        f"FLANNEL_NETWORK={network}\n"
        f"FLANNEL_SUBNET={first}/{subnet.prefixlen}\n"
        f"FLANNEL_MTU={mtu}\n"
        f"FLANNEL_IPMASQ={'true' if ip_masq else 'false'}\n"
    )


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

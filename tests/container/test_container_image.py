"""The image as built from the Dockerfile on plain Debian bookworm: flannel's /opt/bin/flanneld
and `udpbackend` in Debian's python3 (a venv), the C fast path, iproute2 and iptables; no
compiler and nothing of the build's pip configuration left in it."""

from __future__ import annotations

import uuid

from podman_lab import Built, Podman

from udpbackend import __version__

CHECKS = r"""
set -eu
/opt/bin/flanneld --version 2>&1
udpbackend --version
readlink -f "$(command -v python3)"
python3 -c 'import sys; print(sys.prefix)'
python3 -c 'import udpbackend.dataplane._fastpath as f; print("fastpath", f.__file__)'
ip -V
iptables --version
if command -v gcc; then echo "gcc present"; fi
if [ -e /etc/xdg/pip/pip.conf ] || [ -e /etc/xdg/pip/host-ca.pem ]; then echo "pip conf left"; fi
"""


def _name() -> str:
    return f"ubct-image-{uuid.uuid4().hex[:8]}"


def test_image_has_flanneld_udpbackend_tools_and_no_compiler(image: Built, podman: Podman):
    name = _name()
    try:
        r = podman("run", "--name", name, "--entrypoint", "sh", image.image, "-c", CHECKS)
    finally:
        podman.remove_container(name)
    lines = r.stdout.splitlines()
    assert lines[0] == f"v{__version__}"  # flanneld prints its version as flanneld does
    assert lines[1] == f"udpbackend {__version__}"
    assert lines[2] == "/usr/bin/python3.11"  # Debian's python3 ...
    assert lines[3] == "/opt/udpbackend"  # ... in the venv (PEP 668)
    assert lines[4].startswith("fastpath /opt/udpbackend/lib/python3.11/site-packages/")
    assert lines[5].startswith("ip utility, iproute2-")
    assert lines[6].startswith("iptables v")
    assert lines[7:] == [], lines[7:]


def test_default_command_is_run_help(image: Built, podman: Podman):
    name = _name()
    try:
        r = podman("run", "--name", name, image.image)
    finally:
        podman.remove_container(name)
    assert r.stdout.startswith("usage: udpbackend run")
    assert "--kube-subnet-mgr" in r.stdout

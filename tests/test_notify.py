"""node/notify.py against a real AF_UNIX datagram socket, as systemd listens on one: a path
socket and an abstract ("@...") one get READY=1; no $NOTIFY_SOCKET is a silent no-op; an
unreachable one is one warning, never an exception.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import pytest

from udpbackend.node.notify import systemd_notifier


@pytest.mark.parametrize("abstract", [False, True])
def test_ready_reaches_the_notify_socket(
    tmp_path: Path, abstract: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"@udpbackend-test-{os.getpid()}" if abstract else str(tmp_path / "notify")
    addr = "\0" + name[1:] if abstract else name
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sd:
        sd.bind(addr)
        sd.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", name)
        notify = systemd_notifier()
        notify("READY=1\nSTATUS=forwarding for 198.18.1.0/24")
        assert sd.recv(4096) == b"READY=1\nSTATUS=forwarding for 198.18.1.0/24"


def test_no_socket_is_a_no_op_and_a_dead_one_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    systemd_notifier()("READY=1")
    caplog.set_level(logging.WARNING, logger="udpbackend")
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody"))
    systemd_notifier()("READY=1")
    assert len(caplog.records) == 1 and "cannot connect" in caplog.records[0].getMessage()

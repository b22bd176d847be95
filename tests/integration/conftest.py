# The netns tier: real TUN devices and real daemons in network namespaces (udpbackend.lab.testbed).
# Lives here: the skip rule (root, /dev/net/tun, iperf3), the `netns` marker on every test in this
# directory, and fixtures that start a 2-node overlay per mode and always tear it down.
# Must not: configure anything outside namespaces the testbed itself created.
from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from udpbackend.lab.daemons import Node
from udpbackend.lab.testbed import Testbed

HERE = Path(__file__).resolve().parent
MODES = ("batched", "per-packet", "python")
# Every namespace this test process creates starts with this (testbed names: prefix-pid-n-node).
NS_PREFIX = "ubit"
OWN_NS = f"{NS_PREFIX}-{os.getpid()}-"


def _missing() -> list[str]:
    missing = []
    if os.geteuid() != 0:
        missing.append("root")
    if not os.path.exists("/dev/net/tun"):
        missing.append("/dev/net/tun")
    if shutil.which("iperf3") is None:
        missing.append("iperf3")
    return missing


MISSING = _missing()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip = (
        pytest.mark.skip(reason="netns tier needs " + ", ".join(MISSING) + " (missing here)")
        if MISSING
        else None
    )
    for item in items:
        if HERE in item.path.resolve().parents:
            item.add_marker(pytest.mark.netns)
            if skip is not None:
                item.add_marker(skip)


def own_namespaces() -> list[str]:
    from pyroute2 import netns

    return sorted(n for n in netns.listnetns() if n.startswith(OWN_NS))


@pytest.fixture(scope="session", autouse=True)
def no_leftover_namespaces() -> Iterator[None]:
    """After the whole tier: not one namespace created by this test process is left."""
    yield
    if not MISSING:
        left = own_namespaces()
        assert not left, f"namespaces left behind: {left}"


def new_testbed(cls: type[Testbed] = Testbed, **kw: Any) -> Testbed:
    return cls(prefix=NS_PREFIX, **kw)


@pytest.fixture
def testbed() -> Iterator[Testbed]:
    """A bare two-node testbed (no daemons), removed after the test."""
    tb = new_testbed()
    try:
        yield tb
    finally:
        tb.close()


@pytest.fixture
def testbed_factory() -> Iterator[Callable[..., Testbed]]:
    """new_testbed(cls=Testbed, **kw) for tests that need their own; all closed afterwards."""
    made: list[Testbed] = []

    def make(cls: type[Testbed] = Testbed, **kw: Any) -> Testbed:
        tb = new_testbed(cls, **kw)
        made.append(tb)
        return tb

    try:
        yield make
    finally:
        for tb in made:
            tb.close()


@pytest.fixture
def namespaces() -> Callable[[], list[str]]:
    """Lists the namespaces this test process created that still exist."""
    return own_namespaces


@dataclass
class Overlay:
    """Both nodes of a started overlay: tb.ping("a", tb.tun_addr("b")) crosses it."""

    tb: Testbed
    a: Node
    b: Node
    mode: str

    def node(self, name: str) -> Node:
        return self.a if name == "a" else self.b

    def check_alive(self) -> None:
        for n in (self.a, self.b):
            if not n.alive:
                pytest.fail(
                    f"daemon {n.node} ({self.mode}) died with {n.proc.returncode}\n{n.log_tail()}",
                    pytrace=False,
                )


def _overlay(mode: str) -> Iterator[Overlay]:
    tb = new_testbed()
    try:
        a = tb.start_node("a", mode)
        b = tb.start_node("b", mode)
        yield Overlay(tb, a, b, mode)
        # A daemon that crashed during the module, or fails SIGTERM, shows up as a teardown error.
        errors = []
        for n in (a, b):
            try:
                n.stop(check=True)
            except Exception as e:
                errors.append(str(e))
        assert not errors, "\n".join(errors)
    finally:
        tb.close()


@pytest.fixture(scope="module", params=MODES)
def _overlay_module(request: pytest.FixtureRequest) -> Iterator[Overlay]:
    yield from _overlay(request.param)


@pytest.fixture(scope="module")
def _batched_module() -> Iterator[Overlay]:
    yield from _overlay("batched")


@pytest.fixture
def overlay(_overlay_module: Overlay) -> Iterator[Overlay]:
    """A started overlay, once per mode (batched, per-packet, python); shared within a module."""
    _overlay_module.check_alive()
    yield _overlay_module
    _overlay_module.check_alive()


@pytest.fixture
def batched(_batched_module: Overlay) -> Iterator[Overlay]:
    """A started overlay in batched mode, shared within a module."""
    _batched_module.check_alive()
    yield _batched_module
    _batched_module.check_alive()

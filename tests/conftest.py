# Shared fixtures: `impl` runs a test once over the pure-Python twin (udpbackend.dataplane.packet,
# id "python") and once over the C fast path (udpbackend.dataplane.fastpath, id "c").  A missing or
# broken C extension FAILS the "c" variant rather than skipping (UDPBACKEND_NO_EXTENSIONS=1: skip).
# Root/netns helpers live in tests/integration/conftest.py, not here.
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

# tests/ is not a package: make `import packets` (the builders) work from any rootdir.
sys.path.insert(0, str(Path(__file__).parent))

NO_EXTENSIONS = os.environ.get("UDPBACKEND_NO_EXTENSIONS") == "1"
IMPLS = ("python", "c")


def load_impl(name: str) -> ModuleType:
    """The implementation module for `name` ("python" or "c"), or fail/skip the test."""
    if name == "python":
        return importlib.import_module("udpbackend.dataplane.packet")
    if NO_EXTENSIONS:
        pytest.skip("UDPBACKEND_NO_EXTENSIONS=1: C fast path not tested")
    try:
        importlib.import_module("udpbackend.dataplane._fastpath")
        return importlib.import_module("udpbackend.dataplane.fastpath")
    except ImportError as exc:
        error = exc
    # Outside the except block, so the report is this one line, not a chained traceback.
    pytest.fail(
        f"the C fast path cannot be imported ({error}); build it with "
        "`pip install -e . --no-build-isolation` (or `python setup.py build_ext --inplace`), "
        "or set UDPBACKEND_NO_EXTENSIONS=1 to test the pure-Python twin only",
        pytrace=False,
    )


@pytest.fixture(scope="session", params=IMPLS, ids=IMPLS)
def impl(request: pytest.FixtureRequest) -> ModuleType:
    """udpbackend.dataplane.packet or .fastpath: the same API, tested the same way."""
    return load_impl(request.param)


@pytest.fixture(scope="session")
def py_impl() -> ModuleType:
    return load_impl("python")


@pytest.fixture(scope="session")
def c_impl() -> ModuleType:
    return load_impl("c")


# --- etcd fixtures (helpers in tests/etcd_server.py; used by tests/test_etcd.py) ---
# A real etcd per test on free 127.0.0.1 ports, always stopped (by PID) and its data dir removed.
# Skipped, with the reason shown, only when the etcd/etcdctl binaries are missing.
@pytest.fixture
def etcd_factory():
    import etcd_server

    reason = etcd_server.unavailable_reason()
    if reason:
        pytest.skip(reason)
    servers = []

    def make(**kwargs):
        server = etcd_server.EtcdServer(**kwargs)
        servers.append(server)
        return server.start()

    try:
        yield make
    finally:
        for server in servers:
            server.cleanup()


@pytest.fixture
def etcd_server(etcd_factory):
    """A started plain-HTTP etcd (tests/etcd_server.py EtcdServer)."""
    return etcd_factory()


# --- end etcd fixtures ---

# The C fast path built with AddressSanitizer and UBSan (csrc/build.py, UDPBACKEND_SANITIZE=1)
# runs the pump tests that lend it buffers of every size the contract allows.  Guard bytes
# (tests/test_pump_limits.py) see a stray write only where they are; ASan sees any access
# outside any allocation, reads included.  ASan must be the first library loaded, so the tests
# run in a child interpreter with libasan preloaded and the sanitized module put in the place
# of udpbackend.dataplane._fastpath.  The build is cached by the hash of csrc/.
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
# What the child runs: every test that lends the C odd-sized buffers or drives the vnet paths.
CHILD_TESTS = [
    "tests/test_pump_limits.py",
    "tests/test_fastpath_io.py::test_vnet_tso_leaves_as_mtu_sized_datagrams",
    "tests/test_fastpath_io.py::test_vnet_mixed_frames_in_one_round_keep_their_bytes",
    "tests/test_fastpath_io.py::test_vnet_bad_frames_counted_never_sent",
    "tests/test_fastpath_io.py::test_vnet_gso_none_over_mtu_is_an_egress_drop",
    "tests/test_fastpath_io.py::test_vnet_ingress_coalesces_runs",
    "tests/test_fastpath_io.py::test_gro_ingress_split_into_packets",
]
CHILD = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("udpbackend.dataplane._fastpath", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
sys.modules["udpbackend.dataplane._fastpath"] = mod
import pytest
sys.exit(pytest.main(["-q", "-s", "-p", "no:cacheprovider", *sys.argv[2:]]))
"""


def _runtime(name: str) -> str | None:
    """The path of a sanitizer runtime the compiler links against, or None."""
    try:
        out = subprocess.run(
            ["gcc", f"-print-file-name={name}"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return out if os.path.isabs(out) and os.path.exists(out) else None


@pytest.fixture(scope="session")
def sanitized_module(request: pytest.FixtureRequest) -> Path:
    """The sanitized build of csrc/ (built once per version of the sources)."""
    if _runtime("libasan.so") is None or _runtime("libubsan.so") is None:
        pytest.skip("gcc has no ASan/UBSan runtime here")
    h = hashlib.sha256()
    for f in sorted(CSRC.iterdir()):
        if f.suffix in (".c", ".h", ".py"):
            h.update(f.name.encode() + b"\0" + f.read_bytes())
    cache = Path(request.config.cache.mkdir("sanitized-fastpath"))
    out = cache / h.hexdigest()[:16]
    found = sorted(out.glob("udpbackend/dataplane/_fastpath*.so"))
    if not found:
        for old in cache.iterdir():  # builds of other versions of csrc/
            shutil.rmtree(old, ignore_errors=True)
        env = {**os.environ, "UDPBACKEND_SANITIZE": "1"}
        build = ["build_ext", "--build-lib", str(out), "--build-temp", str(out / "tmp")]
        done = subprocess.run(
            [sys.executable, "setup.py", "-q", *build],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        found = sorted(out.glob("udpbackend/dataplane/_fastpath*.so"))
    assert found, f"no module built in {out}"
    return found[0]


def test_pump_tests_pass_under_asan_and_ubsan(c_impl: ModuleType, sanitized_module: Path) -> None:
    # c_impl: the regular build loads (and under UDPBACKEND_NO_EXTENSIONS=1 this is skipped)
    env = {
        **os.environ,
        "LD_PRELOAD": str(_runtime("libasan.so")),
        # leaks: the interpreter's own at exit are not ours; the fast path never mallocs
        "ASAN_OPTIONS": "detect_leaks=0:halt_on_error=1:abort_on_error=0",
        "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
        "UDPBACKEND_TEST_GUARD": "0",  # exact-size buffers: ASan's redzones are the guards
    }
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(sanitized_module), *CHILD_TESTS],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    report = done.stdout[-6000:] + done.stderr[-6000:]
    assert "ERROR: AddressSanitizer" not in done.stderr, report
    assert "runtime error:" not in done.stderr, report
    assert done.returncode == 0, report
    assert " passed" in done.stdout, report

# The fuzz tier's fixtures: clang (skipped, saying why, only when none can be found; a clang
# that cannot link libFuzzer fails) and the harnesses built by fuzz_build.py into a cache
# directory keyed by the hash of the sources and the compiler.
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# tests/fuzz is not a package: make `import fuzz_build, fuzz_seeds` work from any rootdir.
sys.path.insert(0, str(Path(__file__).parent))

from fuzz_build import (
    CLANGS,
    SUMMARY,
    BuildError,
    Fuzzers,
    build,
    find_clang,
    harness_names,
    source_hash,
)


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    line = config.stash.get(SUMMARY, None)
    if line:
        terminalreporter.write_sep("-", "fuzz tier")
        terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def clang() -> str:
    path = find_clang()
    if path is None:
        pytest.skip(
            "no clang on PATH (tried " + ", ".join(CLANGS) + "): the fuzz tier needs Debian's "
            "clang and libclang-rt-dev, which `sudo ./dev test` installs"
        )
    # Found: from here on a toolchain that cannot build a libFuzzer binary is a failure.
    return path


@pytest.fixture(scope="session")
def fuzzers(request: pytest.FixtureRequest, clang: str, tmp_path_factory) -> Fuzzers:
    """The harnesses, built once per version of csrc/ and csrc/fuzz/ (cached)."""
    probe = tmp_path_factory.mktemp("probe")
    (probe / "t.c").write_text("int LLVMFuzzerTestOneInput(const char *d, long n) { return 0; }\n")
    done = subprocess.run(
        [clang, "-fsanitize=fuzzer,address,undefined", str(probe / "t.c"), "-o", str(probe / "t")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, (
        f"{clang} cannot link -fsanitize=fuzzer,address,undefined (is libclang-rt-dev "
        f"installed? `sudo ./dev test` installs it):\n{done.stderr[-3000:]}"
    )
    cache = Path(request.config.cache.mkdir("fuzz-build"))
    key = source_hash(clang)
    out = cache / key
    names = harness_names()
    if not all((out / f"fuzz_{n}").exists() for n in names):
        for old in cache.iterdir():  # builds of other versions of the sources
            shutil.rmtree(old, ignore_errors=True)
        try:
            build(clang, out, jobs=min(2, os.cpu_count() or 1))
        except BuildError as exc:
            pytest.fail(f"the fuzz harnesses do not build: {exc}", pytrace=False)
    return Fuzzers(clang, out)

"""Building the libFuzzer harnesses of csrc/fuzz/ (the fuzz tier's build; see test_fuzz.py).

csrc/*.c and csrc/fuzz/fuzz_*.c compiled with clang, -fsanitize=address,undefined
-fno-sanitize-recover=all, and linked with libFuzzer: a build of its own, never the installed
extension.  The library is built with libFuzzer's coverage instrumentation; the harnesses are
not (but those in SELF_COVERED), so that comparison tracing stays out of their checking loops.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
FUZZ_SRC = CSRC / "fuzz"
CFLAGS = [
    "-g",
    "-O1",
    "-fno-omit-frame-pointer",
    "-fsanitize=address,undefined",
    "-fno-sanitize-recover=all",
    "-std=gnu11",
    "-Wall",
    "-Wextra",
    "-Wno-unused-parameter",
]
# Harnesses whose coverage is their own (the work happens in the kernel): instrumented too.
SELF_COVERED = {"steer"}
CLANGS = ("clang", "clang-19", "clang-18", "clang-17", "clang-16", "clang-15", "clang-14")


def find_clang() -> str | None:
    env = os.environ.get("UDPBACKEND_CLANG")
    if env:
        return shutil.which(env)
    for name in CLANGS:
        path = shutil.which(name)
        if path:
            return path
    return None


def harness_names() -> list[str]:
    return sorted(p.stem.removeprefix("fuzz_") for p in FUZZ_SRC.glob("fuzz_*.c"))


@dataclass
class Fuzzers:
    clang: str
    bindir: Path

    def binary(self, name: str) -> Path:
        return self.bindir / f"fuzz_{name}"


# What the campaign ran, for the terminal summary (conftest.py): one line.
SUMMARY: pytest.StashKey[str] = pytest.StashKey()


class BuildError(Exception):
    pass


def _run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise BuildError(f"{' '.join(cmd)}\n{done.stdout[-4000:]}{done.stderr[-4000:]}")


def build(clang: str, out: Path, jobs: int = 2) -> None:
    """Every harness of csrc/fuzz/ linked against csrc/*.c, into out/."""
    tmp = out / "obj"
    tmp.mkdir(parents=True, exist_ok=True)
    inc = ["-I", str(CSRC), "-I", str(FUZZ_SRC)]
    lib = [(c, tmp / f"lib_{c.stem}.o") for c in sorted(CSRC.glob("*.c"))]
    names = harness_names()
    steps = [
        [clang, *CFLAGS, "-fsanitize=fuzzer-no-link", *inc, "-c", str(c), "-o", str(o)]
        for c, o in lib
    ]
    for n in names:
        cov = ["-fsanitize=fuzzer-no-link"] if n in SELF_COVERED else []
        src = FUZZ_SRC / f"fuzz_{n}.c"
        steps.append([clang, *CFLAGS, *cov, *inc, "-c", str(src), "-o", str(tmp / f"fuzz_{n}.o")])
    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(_run, steps))
    links = [
        [
            clang,
            *CFLAGS,
            "-fsanitize=fuzzer",
            str(tmp / f"fuzz_{n}.o"),
            *(str(o) for _, o in lib),
            "-o",
            str(out / f"fuzz_{n}"),
        ]
        for n in names
    ]
    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(_run, links))


def source_hash(clang: str) -> str:
    h = hashlib.sha256()
    version = subprocess.run([clang, "--version"], capture_output=True, text=True).stdout
    h.update(version.encode() + " ".join(CFLAGS).encode() + repr(sorted(SELF_COVERED)).encode())
    for f in sorted([*CSRC.glob("*.[ch]"), *FUZZ_SRC.glob("*.[ch]")]):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]

#!/usr/bin/env python3
# The overlay benchmark from a source checkout: a thin wrapper around `udpbackend bench`
# (udpbackend/lab/bench/ holds the ladder, the protocol, the schema and the chart), writing into
# benchmarks/results/ unless --out says otherwise. Needs root; leaves nothing behind.
"""Usage: sudo python benchmarks/bench_overlay.py [udpbackend bench flags]

Same flags as `udpbackend bench` (--quick, --rungs, --runs, --explain, ...); --out defaults to
benchmarks/results. `sudo ./dev bench` runs the same thing from the project's .venv.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from udpbackend.lab.bench import main  # noqa: E402 - after the path set-up above

if __name__ == "__main__":
    argv = sys.argv[1:]
    if not any(a == "--out" or a.startswith("--out=") for a in argv):
        argv = ["--out", str(ROOT / "benchmarks" / "results"), *argv]
    raise SystemExit(main(argv))

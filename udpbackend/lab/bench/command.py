"""The `udpbackend bench` command line: its flags, the progress display, what is printed.

Lives here: add_arguments (called by udpbackend/cli.py), flags -> Settings, run() (the checks
before the long run, the rich progress bar, the table or Markdown, --explain, --out) and main()
for benchmarks/bench_overlay.py. Must not: import rich/matplotlib at module import time.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .ladder import run_ladder
from .measure import STEPS_PER_RUN
from .progress import RichReporter
from .report import describe, markdown, render_rich_table, write_outputs
from .rungs import DEFAULT_RUNGS, RUNGS, parse_rungs
from .schema import SCHEMA, validate
from .settings import FULL, NS_PREFIX, QUICK, BenchError, Settings

DESCRIPTION = (
    "`udpbackend bench`: the overlay benchmark ladder, measured side by side in one invocation."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="short runs (under 2 minutes here)")
    p.add_argument(
        "--rungs",
        default=",".join(DEFAULT_RUNGS),
        help=f"comma-separated subset, in ladder order (default %(default)s; "
        f"also: {', '.join(r.name for r in RUNGS if not r.default)})",
    )
    p.add_argument("--runs", type=int, help="runs per rung, figures are medians (default 3)")
    p.add_argument("--out", help="write DIR/results.json, DIR/results.md and DIR/ladder.png")
    p.add_argument("--explain", action="store_true", help="say what each step of the ladder saved")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    p.add_argument("--tcp-seconds", type=int, help="iperf3 TCP seconds per run")
    p.add_argument("--udp-probes", type=int, help="iperf3 UDP runs per packet-rate search")
    p.add_argument("--pings", type=int, help="idle pings per run")
    p.add_argument("--no-zerocopy", action="store_true", help="do not use iperf3 -Z")
    p.add_argument("--print-schema", action="store_true", help="print the JSON schema and exit")
    p.add_argument("--netns-prefix", default=NS_PREFIX, help=argparse.SUPPRESS)


def settings_from_args(args: argparse.Namespace) -> Settings:
    base = QUICK if args.quick else FULL
    s = Settings(**{k: v for k, v in vars(base).items() if k != "rungs"})
    s.rungs = parse_rungs(args.rungs)
    for attr, value, low in (
        ("runs", args.runs, 1),
        ("tcp_seconds", args.tcp_seconds, 1),
        ("udp_probes", args.udp_probes, 1),
        ("pings_idle", args.pings, 10),
    ):
        if value is not None:
            if value < low:
                raise BenchError(f"--{attr.replace('_', '-')} must be >= {low}")
            setattr(s, attr, value)
    s.zerocopy = not args.no_zerocopy
    return s


def run(args: argparse.Namespace) -> int:
    """`udpbackend bench`; user-facing problems raise BenchError (one line, exit 2)."""
    if args.print_schema:
        print(json.dumps(SCHEMA, indent=1))
        return 0
    s = settings_from_args(args)
    _check_requirements(chart=bool(args.out))
    from rich.console import Console

    err = Console(stderr=True, log_path=False)
    doc = _measure(s, args.netns_prefix, err)
    if doc is None:
        err.print("interrupted: testbed removed, no results written")
        return 130
    problems = validate(doc)
    if problems:  # a bug here, not the user's: say so but keep the numbers
        err.print(f"results do not match the schema: {problems[:3]}")
    _print_results(doc, args, Console())
    if args.out:
        paths = write_outputs(doc, Path(args.out))
        err.print("wrote " + ", ".join(str(p) for p in paths))
    failed = [r["name"] for r in doc["rungs"] if r["status"] != "ok"]
    if failed:
        err.print(f"failed rungs: {', '.join(failed)}")
        return 1
    return 0


def _check_requirements(chart: bool) -> None:
    """BenchError before the long run if the host or the environment cannot do it."""
    from ..netns import missing_requirements

    missing = missing_requirements()
    if missing:
        raise BenchError(f"bench needs {', '.join(missing)}")
    try:
        import rich.progress  # noqa: F401 - used by _measure

        if chart:
            import matplotlib  # noqa: F401 - checked before the long run, used by chart()
    except ImportError:
        raise BenchError(
            "bench needs rich and matplotlib: pip install 'udpbackend[bench]'"
        ) from None


def _measure(s: Settings, ns_prefix: str, err: Any) -> dict[str, Any] | None:
    """run_ladder under a rich progress bar on stderr; None if it was interrupted."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    ) as progress:
        task = progress.add_task("starting", total=len(s.rungs) * s.runs * STEPS_PER_RUN)
        try:
            return run_ladder(s, RichReporter(progress, task, err), ns_prefix)
        except KeyboardInterrupt:
            return None


def _print_results(doc: dict[str, Any], args: argparse.Namespace, out_console: Any) -> None:
    """The table (rich in a terminal, else Markdown), the notes and --explain on stdout."""
    if args.markdown or not out_console.is_terminal:
        print(markdown(doc, explain_text=False), end="")
    else:
        out_console.print(describe(doc))
        out_console.print(render_rich_table(doc))
        for note in doc["notes"]:
            out_console.print(f"Note: {note}")
    if args.explain:
        print("\nWhat each step of the ladder changes (from this run's counters):")
        for para in doc["explain"]:
            print(f"- {para}")


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (benchmarks/bench_overlay.py): same flags as `udpbackend bench`."""
    p = argparse.ArgumentParser(prog="udpbackend bench", description=DESCRIPTION)
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return run(args)
    except BenchError as e:
        sys.stderr.write(f"udpbackend: {e}\n")
        return 2

"""The lab's exceptions (a testbed, a daemon or a tool failed) and the log tail they quote.

Stdlib only, so every lab module and the tests' etcd helper can raise them without pulling in
namespaces. Must not: grow behaviour beyond naming and quoting a failure.
"""

from __future__ import annotations

from pathlib import Path


class TestbedError(RuntimeError):
    """Building or driving the testbed failed."""

    __test__ = False  # not a pytest test class


class DaemonError(TestbedError):
    """A udpbackend daemon failed to start, died, or exited with a non-zero status."""


def log_tail(path: Path, lines: int = 25) -> str:
    """The last `lines` lines of a log file (or why it cannot be read)."""
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        return f"<cannot read {path}: {e}>"
    return "\n".join(text.splitlines()[-lines:])

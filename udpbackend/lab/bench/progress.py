"""Progress and stopping: the Reporter sink (rich in the terminal, a no-op in library use) and
SIGINT/SIGTERM turned into KeyboardInterrupt, so that the testbed is removed either way.

Must not: import rich at module import time (RichReporter is handed rich's objects).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any


class Reporter:
    """Progress sink: rich in the terminal (see command.py), a no-op in library use."""

    def status(self, text: str) -> None:
        pass

    def advance(self, steps: int = 1) -> None:
        pass

    def log(self, text: str) -> None:
        pass


class RichReporter(Reporter):
    def __init__(self, progress: Any, task: Any, console: Any) -> None:
        self.progress, self.task, self.console = progress, task, console

    def status(self, text: str) -> None:
        self.progress.update(self.task, description=text)

    def advance(self, steps: int = 1) -> None:
        if steps:
            self.progress.advance(self.task, steps)

    def log(self, text: str) -> None:
        self.progress.console.log(text)


class Checked(Reporter):
    """Passes progress on, and raises KeyboardInterrupt at every step once a signal came."""

    def __init__(self, inner: Reporter, stopped: threading.Event) -> None:
        self.inner, self.stopped = inner, stopped

    def _check(self) -> None:
        if self.stopped.is_set():
            raise KeyboardInterrupt

    def status(self, text: str) -> None:
        self._check()
        self.inner.status(text)

    def advance(self, steps: int = 1) -> None:
        self._check()
        self.inner.advance(steps)

    def log(self, text: str) -> None:
        self.inner.log(text)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[threading.Event]:
    """Ctrl-C (SIGINT) and SIGTERM raise KeyboardInterrupt while the benchmark runs, so cleanup
    happens either way. The yielded event stays set once one arrived: a library that swallows
    the KeyboardInterrupt cannot make the benchmark go on (see Checked)."""
    stopped = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stopped
        return
    owner = os.getpid()

    def handler(signum: int, frame: object) -> None:
        if os.getpid() != owner:  # a forked helper child must not unwind our stack
            os._exit(128 + signum)
        stopped.set()
        raise KeyboardInterrupt

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stopped
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)

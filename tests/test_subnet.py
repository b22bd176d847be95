# The control plane's pure logic and the LocalManager over FakeRegistry + FakeClock:
# flannel-compat.md §10 items 2-4, 6-15 and 17, §2's worked examples with flannel's exact
# error texts, allocation, the lease-event diff, the watch through compaction and outages,
# and hypothesis fuzzing of every parser of datastore input (parsed or ConfigError).
from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from ipaddress import IPv4Address, IPv4Network, IPv6Network
from typing import Any, TypeVar

import pytest
from fakes import FakeRegistry
from hypothesis import given, settings
from hypothesis import strategies as st

from udpbackend.control.allocate import allocate_ipv6_subnet, allocate_subnet, is_lease_compatible
from udpbackend.control.lease import (
    Lease,
    LeaseAttrs,
    LeaseEvent,
    LeaseEventKind,
    LeaseWatcher,
    format_lease_value,
    format_subnet_key,
    kv_to_lease,
    parse_lease_value,
    parse_subnet_key,
    subnet_kv_key,
)
from udpbackend.control.local import SUBNET_TTL, AcquireError, ConfigMissing, LocalManager
from udpbackend.control.network import NetworkConfig, parse_network_config
from udpbackend.control.registry import KeyValue, WatchBatch
from udpbackend.errors import ConfigError

ADDED, REMOVED = LeaseEventKind.ADDED, LeaseEventKind.REMOVED
NET = "198.18.0.0/16"
ME = IPv4Address("198.19.0.1")
PEER_A = IPv4Address("198.19.0.2")
PEER_B = IPv4Address("198.19.0.3")
T = TypeVar("T")


def cfg(**fields: Any) -> NetworkConfig:
    return parse_network_config(json.dumps({"Network": NET, **fields}))


def val(ip: IPv4Address | str) -> bytes:
    return format_lease_value(LeaseAttrs(IPv4Address(ip)))


def net(text: str) -> IPv4Network:
    return IPv4Network(text)


def key(subnet: str) -> str:
    return subnet_kv_key(IPv4Network(subnet))


def run(coro: Awaitable[T]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, 5)

    return asyncio.run(bounded())


async def nxt(gen: AsyncIterator[T]) -> T:
    return await asyncio.wait_for(anext(gen), 2)


def manager(reg: FakeRegistry, seed: int = 7) -> LocalManager:
    return LocalManager(reg, clock=reg.clock, rng=random.Random(seed), sleep=reg.clock.sleep)


def summary(events: list[LeaseEvent]) -> list[tuple[str, str, str]]:
    return [(e.kind.name, str(e.lease.subnet), str(e.lease.attrs.public_ip)) for e in events]


# ---------------------------------------------------------------------------------------------
# Network config (§2, checklist 2 and 3)
# ---------------------------------------------------------------------------------------------

DEFAULTS = [
    # (config JSON, SubnetLen, SubnetMin, SubnetMax): §2's worked examples and checklist 2-3
    ('{"Network":"10.5.0.0/16","Backend":{"Type":"udp"}}', 24, "10.5.1.0", "10.5.255.0"),
    ('{"network":"10.5.0.0/16"}', 24, "10.5.1.0", "10.5.255.0"),
    ('{"Network":"10.3.0.0/16"}', 24, "10.3.1.0", "10.3.255.0"),
    ('{"Network":"198.18.0.0/22"}', 24, "198.18.1.0", "198.18.3.0"),
    ('{"Network":"10.0.0.0/23"}', 25, "10.0.0.128", "10.0.1.128"),
    ('{"Network":"198.18.7.0/24"}', 26, "198.18.7.64", "198.18.7.192"),
    ('{"Network":"198.18.7.0/28"}', 30, "198.18.7.4", "198.18.7.12"),
    ('{"Network":"10.5.3.0/16"}', 24, "10.5.1.0", "10.5.255.0"),  # host bits masked off
    (
        '{"Network":"10.0.0.0/8","SubnetLen":20,"SubnetMin":"10.10.0.0",'
        '"SubnetMax":"10.99.0.0","Backend":{"Type":"udp","Port":7890}}',
        20,
        "10.10.0.0",
        "10.99.0.0",
    ),
    ('{"Network":"198.18.0.0/16","SubnetMin":"198.18.0.0"}', 24, "198.18.0.0", "198.18.255.0"),
    (
        '{"Network":"198.18.0.0/16","SubnetMin":"198.18.9.0","SubnetMax":"198.18.3.0"}',
        24,
        "198.18.9.0",
        "198.18.3.0",
    ),  # no Min <= Max check (flannel)
    ('{"Network":"198.18.0.0/16","SubnetMin":"0.0.0.0"}', 24, "198.18.1.0", "198.18.255.0"),
    ('{"Network":"198.18.0.0/16","SubnetLen":null}', 24, "198.18.1.0", "198.18.255.0"),
    (
        '{"Network":"198.18.0.0/16","SubnetMin":"::ffff:198.18.4.0"}',
        24,
        "198.18.4.0",
        "198.18.255.0",
    ),  # Go's ParseIP: mapped form
    ('{"NETWORK":"198.18.0.0/16","subnetlen":26}', 26, "198.18.0.64", "198.18.255.192"),
]


@pytest.mark.parametrize(("raw", "length", "smin", "smax"), DEFAULTS)
def test_config_defaults(raw: str, length: int, smin: str, smax: str) -> None:
    c = parse_network_config(raw.encode())
    assert (c.subnet_len, str(c.subnet_min), str(c.subnet_max)) == (length, smin, smax)
    assert c.backend_type == "udp"


def test_config_worked_example_counts_and_network() -> None:
    assert parse_network_config('{"Network":"10.3.0.0/16"}').subnet_count == 255
    assert parse_network_config('{"Network":"198.18.0.0/22"}').subnet_count == 3
    assert parse_network_config('{"Network":"10.5.3.0/16"}').network == net("10.5.0.0/16")


@pytest.mark.parametrize(
    ("fields", "backend_type", "port"),
    [
        ({}, "udp", 8285),  # Backend absent: udp (quirk 1: the docs say vxlan)
        ({"Backend": {"Type": "udp"}}, "udp", 8285),
        ({"Backend": {"Type": "UDP"}}, "udp", 8285),  # lower-cased before lookup
        ({"Backend": {"type": "Udp", "port": 7890}}, "udp", 7890),
        ({"Backend": {"Type": "udp", "Port": None}}, "udp", 8285),
        ({"Backend": {"Type": "udp", "Port": 1}}, "udp", 1),
        ({"Backend": {"Type": "udp", "Port": 65535, "Other": [1]}}, "udp", 65535),
    ],
)
def test_config_backend(fields: dict[str, Any], backend_type: str, port: int) -> None:
    c = cfg(**fields)
    assert (c.backend_type, c.backend_port) == (backend_type, port)


def test_config_other_keys() -> None:
    c = parse_network_config(
        '{"Network":"198.18.0.0/16","EnableNFTables":true,"BackendType":"vxlan",'
        '"Unknown":{"x":[1,2]},"enableipv4":true}'
    )
    assert c.enable_nftables and c.enable_ipv4 and not c.enable_ipv6
    assert c.backend_type == "udp"  # a top-level BackendType is not decoded
    # duplicates, in any case: the last one wins (Go)
    c = parse_network_config('{"Network":"10.0.0.0/8","network":"198.18.0.0/16"}')
    assert c.network == net(NET)
    c = parse_network_config('{"Network":"198.18.0.0/16","Backend":{"Type":"x","TYPE":"udp"}}')
    assert c.backend_type == "udp"
    assert parse_network_config(b'  {"Network": "198.18.0.0/16"}\n').network == net(NET)


def test_config_ipv6() -> None:
    c = cfg(EnableIPv6=True, IPv6Network="fc00::/48")
    assert (c.ipv6_subnet_len, str(c.ipv6_subnet_min), str(c.ipv6_subnet_max)) == (
        64,
        "fc00:0:0:1::",
        "fc00:0:0:ffff::",
    )
    c = cfg(EnableIPv6=True, IPv6Network="fc00::/120")
    assert (c.ipv6_subnet_len, str(c.ipv6_subnet_min), str(c.ipv6_subnet_max)) == (
        122,
        "fc00::40",
        "fc00::c0",
    )
    # IPv6 keys are decoded (and type-checked) even while IPv6 is off, as Go does
    assert not cfg(IPv6Network="fc00::/48").enable_ipv6
    with pytest.raises(ConfigError, match="IPv6Network"):
        cfg(IPv6Network="garbage")


CONFIG_ERRORS = [
    # (config JSON, exact message) -- flannel's texts where flannel has one
    ('{"Network":"198.18.7.0/29"}', "network is too small. Minimum useful network prefix is /28"),
    ('{"Network":"198.18.0.0/16","SubnetLen":31}', "SubnetLen must be less than /31"),
    (
        '{"Network":"198.18.0.0/16","SubnetLen":17}',
        "network must be able to accommodate at least four subnets",
    ),
    (
        '{"Network":"198.18.0.0/16","SubnetMin":"198.18.1.128"}',
        "SubnetMin is not on a SubnetLen boundary: 198.18.1.128",
    ),
    (
        '{"Network":"198.18.0.0/16","SubnetMax":"198.18.250.1"}',
        "SubnetMax is not on a SubnetLen boundary: 198.18.250.1",
    ),
    (
        '{"Network":"198.18.0.0/16","SubnetMin":"198.19.1.0"}',
        "SubnetMin is not in the range of the Network",
    ),
    (
        '{"Network":"198.18.0.0/16","SubnetMax":"198.19.1.0"}',
        "SubnetMax is not in the range of the Network",
    ),
    ("{}", "please define a correct Network parameter in the flannel config"),
    ("null", "please define a correct Network parameter in the flannel config"),
    ('{"Network":"0.0.0.0/0"}', "please define a correct Network parameter in the flannel config"),
    (
        '{"Network":"198.18.0.0/16","EnableIPv6":true}',
        "please define a correct IPv6Network parameter in the flannel config",
    ),
    (
        '{"Network":"198.18.0.0/16","EnableIPv6":true,"IPv6Network":"fc00::/48",'
        '"IPv6SubnetLen":127}',
        "SubnetLen must be less than /127",
    ),
    (
        '{"Network":"198.18.0.0/16","EnableIPv6":true,"IPv6Network":"fc00::/48",'
        '"IPv6SubnetLen":49}',
        "network must be able to accommodate at least four subnets",
    ),
    (
        '{"Network":"198.18.0.0/16","EnableIPv6":true,"IPv6Network":"fc00::/125"}',
        "IPv6Network is too small. Minimum useful network prefix is /124",
    ),
    (
        '{"Network":"198.18.0.0/16","EnableIPv6":true,"IPv6Network":"fc00::/48",'
        '"IPv6SubnetMin":"fc01::"}',
        "IPv6SubnetMin is not in the range of the IPv6Network",
    ),
    (
        '{"Network":"198.18.0.0/16","EnableIPv6":true,"IPv6Network":"fc00::/48",'
        '"IPv6SubnetMax":"fc01::"}',
        "IPv6SubnetMax is not in the range of the IPv6Network",
    ),
    (
        '{"Network":"198.18.0.0/16","EnableIPv6":true,"IPv6Network":"fc00::/48",'
        '"IPv6SubnetMin":"fc00:0:0:1::1"}',
        "IPv6SubnetMin is not on a SubnetLen boundary: fc00:0:0:1::1",
    ),
    (
        '{"Network":"198.18.0.0/16","EnableIPv6":true,"IPv6Network":"fc00::/48",'
        '"IPv6SubnetMax":"fc00:0:0:2::1"}',
        "IPv6SubnetMax is not on a SubnetLen boundary: fc00:0:0:2::1",
    ),
    ('{"Network":"198.18.0.0/16","EnableIPv4":false}', "none defined stack"),
    (
        '{"Network":"198.18.0.0/16","SubnetLen":"24"}',
        "json: cannot unmarshal string into Go struct field Config.SubnetLen of type uint",
    ),
    (
        '{"Network":"198.18.0.0/16","SubnetLen":-1}',
        "json: cannot unmarshal number -1 into Go struct field Config.SubnetLen of type uint",
    ),
    (
        '{"Network":"198.18.0.0/16","SubnetLen":24.5}',
        "json: cannot unmarshal number 24.5 into Go struct field Config.SubnetLen of type uint",
    ),
    (
        '{"Network":"198.18.0.0/16","EnableIPv6":"yes"}',
        "json: cannot unmarshal string into Go struct field Config.EnableIPv6 of type bool",
    ),
    ("[1]", "json: cannot unmarshal array into Go value of type subnet.Config"),
    ('"x"', "json: cannot unmarshal string into Go value of type subnet.Config"),
]


@pytest.mark.parametrize(("raw", "message"), CONFIG_ERRORS)
def test_config_error_texts(raw: str, message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_network_config(raw)
    assert str(exc.value) == message


CONFIG_ERRORS_NAMING = [
    # (fields over {"Network": NET}, the key the one-line message must name)
    ({"Network": 10}, "Network"),
    ({"Network": None}, "Network"),  # Go calls the unmarshaller with null: an error
    ({"Network": "198.18.0.0"}, "Network"),
    ({"Network": "198.18.0.0/33"}, "Network"),
    ({"Network": "fc00::/48"}, "Network"),
    ({"Network": "198.18.0.0/255.255.0.0"}, "Network"),
    ({"SubnetMin": "198.18.1"}, "SubnetMin"),
    ({"SubnetMin": None}, "SubnetMin"),
    ({"SubnetMax": "fc00::1"}, "SubnetMax"),
    ({"SubnetMax": ""}, "SubnetMax"),
    ({"EnableIPv6": True, "IPv6Network": "198.18.0.0/16"}, "IPv6Network"),
    ({"EnableIPv6": True, "IPv6Network": "fc00::/48", "IPv6SubnetMin": 5}, "IPv6SubnetMin"),
    ({"EnableIPv4": False, "EnableIPv6": True, "IPv6Network": "fc00::/48"}, "EnableIPv4"),
    ({"Backend": {"Type": "vxlan"}}, "vxlan"),
    ({"Backend": {"Type": "host-gw"}}, "host-gw"),
    ({"Backend": {}}, "Backend.Type"),
    ({"Backend": None}, "Backend.Type"),
    ({"Backend": {"Type": ""}}, "unknown backend type"),
    ({"Backend": "udp"}, "error decoding Backend property of config"),
    ({"Backend": [{"Type": "udp"}]}, "error decoding Backend property of config"),
    ({"Backend": {"Type": 1}}, "error decoding Backend property of config"),
    ({"Backend": {"Type": "udp", "Port": 0}}, "Backend.Port"),
    ({"Backend": {"Type": "udp", "Port": 65536}}, "Backend.Port"),
    ({"Backend": {"Type": "udp", "Port": -1}}, "Backend.Port"),
    ({"Backend": {"Type": "udp", "Port": "8285"}}, "Backend.Port"),
    ({"Backend": {"Type": "udp", "Port": 8285.5}}, "Backend.Port"),
    ({"Backend": {"Type": "udp", "Port": 2**70}}, "Backend.Port"),
]


@pytest.mark.parametrize(("fields", "named"), CONFIG_ERRORS_NAMING)
def test_config_errors_name_the_key(fields: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigError) as exc:
        cfg(**fields)
    assert named in str(exc.value)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"{",
        b'{"Network":"198.18.0.0/16",}',
        b'{"Network":NaN}',
        b'{"SubnetLen":Infinity,"Network":"198.18.0.0/16"}',
        b"\xef\xbb\xbf{}",  # a BOM: Go rejects it too
        b"\xff\xfe",
        b"[" * 100_000,
        b'{"Network":"198.18.0.0/16"} x',
        b'{"Network":"198.18.0.0/16","SubnetLen":' + b"9" * 5000 + b"}",
        '{"Network":"198.18.0.0/16","Backend":' + "[" * 50_000,
    ],
)
def test_config_malformed_json(raw: bytes | str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_network_config(raw)
    assert "\n" not in str(exc.value)


def test_config_error_is_value_error_and_missing_text() -> None:
    assert issubclass(ConfigError, ValueError)
    assert issubclass(ConfigMissing, ConfigError)
    assert str(ConfigMissing()) == (
        "flannel config not found in etcd store. Did you create your config using etcdv3 API?"
    )


# ---------------------------------------------------------------------------------------------
# Subnet keys (§1.1, checklist 8)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "v4", "v6"),
    [
        ("10.12.13.0-24&fd00:12:13::-56", "10.12.13.0/24", "fd00:12:13::/56"),
        ("10.5.52.0-24", "10.5.52.0/24", None),
        ("/coreos.com/network/subnets/10.5.52.0-24", "10.5.52.0/24", None),
        ("subnets/198.18.4.0-24", "198.18.4.0/24", None),
        ("subnets/198.18.4.0-024", "198.18.4.0/24", None),  # Go's ParseUint takes leading 0s
        ("x198.18.4.0-31", "198.18.4.0/31", None),  # anchored at the end only
        ("198.18.4.0-0", "0.0.0.0/0", None),
        ("198.18.4.0-24&::-0", "198.18.4.0/24", "::/0"),
        ("198.18.4.0-24&fd00::-127", "198.18.4.0/24", "fd00::/127"),
    ],
)
def test_subnet_key_parse(text: str, v4: str, v6: str | None) -> None:
    assert parse_subnet_key(text) == (net(v4), None if v6 is None else IPv6Network(v6))


@pytest.mark.parametrize(
    "text",
    [
        # flannel's unit-test list (subnet_test.go) and checklist 8
        "10",
        "10.12.13.0",
        "10.12.13-24",
        "10.12.13.300-24",
        "10.12.13.0-24hi",
        "&2001::-56",
        "10.12.13.0-24&2001::",
        # prefix lengths beyond the 5/7-bit fields
        "10.12.13.0-32",
        "10.12.13.0-99999999999999999999",
        "10.12.13.0-24&2001::-128",
        "10.12.13.0-24&2001:DB8::-64",  # upper-case hex is not in the key alphabet
        "10.12.13.0-24&2001:::1-64",
        "010.12.13.0-24",  # Go rejects leading zeros in an IPv4 literal
        "10.12.13.0-24\n",  # Go's $ is the end of the text
        "10.12.13.0-\u0662\u0664",  # Go's \d is ASCII
        "",
        "config",
        "subnets/",
    ],
)
def test_subnet_key_rejects(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_subnet_key(text)


def test_subnet_key_format() -> None:
    assert format_subnet_key(net("10.5.52.0/24")) == "10.5.52.0-24"
    assert (
        format_subnet_key(net("10.12.13.0/24"), IPv6Network("fd00:12:13::/56"))
        == "10.12.13.0-24&fd00:12:13::-56"
    )
    assert subnet_kv_key(net("198.18.4.0/24")) == "subnets/198.18.4.0-24"
    text = "10.12.13.0-24&fd00:12:13::-56"
    assert format_subnet_key(*parse_subnet_key(text)) == text
    mapped = IPv6Network("::ffff:198.18.0.0/112")  # hex on every Python (3.13 prints dotted)
    assert format_subnet_key(net("198.18.4.0/24"), mapped) == "198.18.4.0-24&::ffff:c612:0-112"


ipv4_nets = st.builds(
    lambda addr, plen: IPv4Network((addr, plen), strict=False),
    st.integers(0, 2**32 - 1),
    st.integers(0, 31),
)
ipv6_nets = st.builds(
    lambda addr, plen: IPv6Network((addr, plen), strict=False),
    st.integers(0, 2**128 - 1),
    st.integers(0, 127),
)


@settings(max_examples=300, deadline=None)
@given(ipv4_nets, st.none() | ipv6_nets, st.text(max_size=12))
def test_subnet_key_roundtrip(v4: IPv4Network, v6: IPv6Network | None, prefix: str) -> None:
    text = format_subnet_key(v4, v6)
    assert parse_subnet_key(text) == (v4, v6)
    assert parse_subnet_key("/coreos.com/network/subnets/" + text) == (v4, v6)
    assert format_subnet_key(*parse_subnet_key(text)) == text


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="0123456789.-&:abcdefx/", max_size=40) | st.text(max_size=40))
def test_subnet_key_fuzz(text: str) -> None:
    try:
        v4, v6 = parse_subnet_key(text)
    except ConfigError:
        return
    assert v4.prefixlen <= 31 and (v6 is None or v6.prefixlen <= 127)


# ---------------------------------------------------------------------------------------------
# Lease values (§1.2, checklist 4, 6, 7)
# ---------------------------------------------------------------------------------------------


def test_lease_value_exact_bytes() -> None:
    assert (
        format_lease_value(LeaseAttrs(IPv4Address("192.168.1.10")))
        == b'{"PublicIP":"192.168.1.10","PublicIPv6":null}'
    )
    assert val("1.2.3.4") == b'{"PublicIP":"1.2.3.4","PublicIPv6":null}'  # registry_test.go


@pytest.mark.parametrize(
    ("raw", "ip"),
    [
        (b'{"PublicIP":"192.168.1.10","PublicIPv6":null}', "192.168.1.10"),
        (
            b'{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan",'
            b'"BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}',
            "192.168.64.3",
        ),
        (b'{"publicip":"1.2.3.4"}', "1.2.3.4"),
        (b'{"PUBLICIP":"198.19.0.1","extra":[1,{"a":null}]}', "198.19.0.1"),
        (b'{"PublicIP":"::ffff:198.19.0.1"}', "198.19.0.1"),
        (b'{"PublicIP":"198.19.0.1","PublicIPv6":"fd00::1"}', "198.19.0.1"),
        (b'{"PublicIP":"198.19.0.8","publicIP":"198.19.0.9"}', "198.19.0.9"),  # last wins
        (b' {"PublicIP":"198.19.0.1"} \n', "198.19.0.1"),
    ],
)
def test_lease_value_parses(raw: bytes, ip: str) -> None:
    assert parse_lease_value(raw).public_ip == IPv4Address(ip)


def test_lease_value_keeps_other_fields() -> None:
    attrs = parse_lease_value(
        b'{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan",'
        b'"BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}'
    )
    assert attrs.extra == {
        "PublicIPv6": None,
        "BackendType": "vxlan",
        "BackendData": {"VNI": 1, "VtepMAC": "c6:d2:32:6f:8f:44"},
    }
    assert attrs == LeaseAttrs(IPv4Address("192.168.64.3"))  # equality: PublicIP only


@pytest.mark.parametrize(
    "raw",
    [
        b'{"PublicIP":"fd00::1","PublicIPv6":null}',  # checklist 7: skipped, not fatal
        b'{"PublicIP":null}',
        b'{"PublicIP":16909060}',
        b'{"PublicIP":"198.19.0"}',
        b'{"PublicIP":"198.019.0.1"}',
        b'{"PublicIP":" 198.19.0.1"}',
        b'{"PublicIP":"198.19.0.1/24"}',
        b'{"PublicIP":"::ffff:198.19.0.1%eth0"}',
        b'{"PublicIPv6":null}',
        b"{}",
        b"null",
        b"[]",
        b'"198.19.0.1"',
        b"",
        b"{",
        b'{"PublicIP":"198.19.0.1","PublicIPv6":"nope"}',
        b'{"PublicIP":"198.19.0.1","PublicIPv6":7}',
        b'{"PublicIP":"198.19.0.1","BackendType":7}',
        b'{"PublicIP":"198.19.0.1","BackendData":' + b"[" * 60_000 + b"]" * 60_000 + b"}",
    ],
)
def test_lease_value_rejects(raw: bytes) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_lease_value(raw)
    assert "\n" not in str(exc.value)


# ---------------------------------------------------------------------------------------------
# Hypothesis: every parser of datastore input returns or raises ConfigError, nothing else
# ---------------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
    | st.sampled_from(["198.18.0.0/16", "198.18.1.0", "fc00::/48", "fc00::", "udp", "UDP"]),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=12,
)
CONFIG_KEYS = [
    "Network",
    "SubnetLen",
    "SubnetMin",
    "SubnetMax",
    "EnableIPv4",
    "EnableIPv6",
    "IPv6Network",
    "IPv6SubnetLen",
    "IPv6SubnetMin",
    "IPv6SubnetMax",
    "EnableNFTables",
    "Backend",
]
case_variants = st.sampled_from(CONFIG_KEYS).flatmap(
    lambda k: st.sampled_from([k, k.lower(), k.upper()])
)
VALID = {
    "Network": "198.18.0.0/16",
    "SubnetLen": 24,
    "SubnetMin": "198.18.1.0",
    "SubnetMax": "198.18.200.0",
    "EnableIPv6": True,
    "IPv6Network": "fc00::/48",
    "Backend": {"Type": "udp", "Port": 8285},
}


def must_parse_or_config_error(parse: Callable[[Any], object], raw: Any) -> None:
    try:
        parse(raw)
    except ConfigError as exc:
        assert str(exc) and "\n" not in str(exc)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_config_bytes(raw: bytes) -> None:
    must_parse_or_config_error(parse_network_config, raw)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_fuzz_config_json_values(value: object) -> None:
    must_parse_or_config_error(parse_network_config, json.dumps(value))


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(case_variants, json_values, max_size=5), st.booleans())
def test_fuzz_config_mutated(mutations: dict[str, object], drop: bool) -> None:
    doc: dict[str, object] = {} if drop else dict(VALID)
    doc.update(mutations)
    must_parse_or_config_error(parse_network_config, json.dumps(doc).encode())


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120))
def test_fuzz_lease_bytes(raw: bytes) -> None:
    must_parse_or_config_error(parse_lease_value, raw)


lease_keys = st.sampled_from(["PublicIP", "publicip", "PublicIPv6", "BackendType", "BackendData"])
ip_texts = st.sampled_from(["198.19.0.1", "fd00::1", "::ffff:198.19.0.1", "", "1.2.3", "x"])


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(lease_keys, json_values | ip_texts, max_size=4) | json_values)
def test_fuzz_lease_json(doc: object) -> None:
    must_parse_or_config_error(parse_lease_value, json.dumps(doc).encode())


# ---------------------------------------------------------------------------------------------
# Allocation (§1.5, checklist 9)
# ---------------------------------------------------------------------------------------------


def first_free(c: NetworkConfig, taken: list[IPv4Network]) -> list[IPv4Network]:
    """flannel's walk, written the slow obvious way."""
    out: list[IPv4Network] = []
    addr, size = int(c.subnet_min), 1 << (32 - c.subnet_len)
    while addr <= int(c.subnet_max) and len(out) < 100:
        cand = IPv4Network((addr, c.subnet_len))
        if not any(cand.overlaps(t) for t in taken):
            out.append(cand)
        addr += size
    return out


class RecordingRng:
    """A random source that records the range it was asked for and returns a fixed pick."""

    def __init__(self, pick: Callable[[int], int]) -> None:
        self.pick = pick
        self.stops: list[int] = []

    def randrange(self, stop: int, /) -> int:
        self.stops.append(stop)
        return self.pick(stop)


def test_allocate_picks_among_first_100_free() -> None:
    c = cfg()
    taken = [net(f"198.18.{i}.0/24") for i in range(1, 256, 3)]
    free = first_free(c, taken)
    assert len(free) == 100
    picks = {allocate_subnet(c, taken, random.Random(seed)) for seed in range(400)}
    assert picks <= set(free)
    assert len(picks) > 80  # uniform over 100: 400 draws leave few unseen
    for pick in (lambda n: 0, lambda n: n - 1):
        rng = RecordingRng(pick)
        assert allocate_subnet(c, taken, rng) == free[pick(100)]
        assert rng.stops == [100]


@pytest.mark.parametrize(
    ("fields", "taken", "expect_first", "expect_count"),
    [
        ({}, [], "198.18.1.0/24", 100),
        ({"SubnetMin": "198.18.250.0"}, [], "198.18.250.0/24", 6),
        ({}, ["198.18.0.0/20"], "198.18.16.0/24", 100),  # a shorter lease blocks 16
        ({}, ["198.18.1.128/26", "198.18.2.7/32"], "198.18.3.0/24", 100),  # longer ones block 1
        ({}, ["198.18.0.0/17", "198.18.128.0/18", "198.18.200.0/24"], "198.18.192.0/24", 63),
        ({}, ["198.18.0.0/16"], None, 0),
        ({}, ["198.18.0.0/15"], None, 0),
        ({"SubnetMin": "198.18.9.0", "SubnetMax": "198.18.3.0"}, [], None, 0),
        ({}, ["198.19.0.0/16", "198.19.1.0/24"], "198.18.1.0/24", 100),  # outside: irrelevant
    ],
)
def test_allocate_table(
    fields: dict[str, Any], taken: list[str], expect_first: str | None, expect_count: int
) -> None:
    c = cfg(**fields)
    taken_nets = [IPv4Network(t, strict=False) for t in taken]
    rng = RecordingRng(lambda n: 0)
    if expect_first is None:
        with pytest.raises(ConfigError, match=r"^out of subnets$"):
            allocate_subnet(c, taken_nets, rng)
        return
    assert allocate_subnet(c, taken_nets, rng) == net(expect_first)
    assert rng.stops == [expect_count]
    assert len(first_free(c, taken_nets)) == expect_count


small_taken = st.lists(
    st.builds(
        lambda addr, plen: IPv4Network((addr, plen), strict=False),
        st.integers(int(IPv4Address("198.18.0.0")), int(IPv4Address("198.18.63.255"))),
        st.integers(18, 32),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(small_taken, st.integers(20, 28), st.integers(0, 10**6))
def test_allocate_matches_reference(taken: list[IPv4Network], length: int, seed: int) -> None:
    c = cfg(SubnetLen=length, Network="198.18.0.0/18")
    free = first_free(c, taken)
    rng = RecordingRng(lambda n: seed % n)
    if not free:
        with pytest.raises(ConfigError, match="out of subnets"):
            allocate_subnet(c, taken, rng)
        return
    got = allocate_subnet(c, taken, rng)
    assert rng.stops == [len(free)]
    assert got == free[seed % len(free)]
    assert c.subnet_min <= got.network_address <= c.subnet_max
    assert not any(got.overlaps(t) for t in taken)


def test_allocate_is_fast_with_many_leases() -> None:
    c = parse_network_config('{"Network":"198.18.0.0/15","SubnetLen":30}')
    first = int(IPv4Address("198.18.0.4"))
    taken = [IPv4Network((first + 4 * i, 30)) for i in range(30_000)]
    random.Random(3).shuffle(taken)
    t0 = time.perf_counter()
    got = allocate_subnet(c, taken, random.Random(1))
    assert time.perf_counter() - t0 < 0.5
    assert int(got.network_address) >= first + 4 * 30_000


def test_allocate_ipv6() -> None:
    c = cfg(EnableIPv6=True, IPv6Network="fc00::/48")
    rng = RecordingRng(lambda n: 0)
    taken = [IPv6Network("fc00:0:0:1::/64"), IPv6Network("fc00:0:0:3::/64")]
    assert allocate_ipv6_subnet(c, taken, rng) == IPv6Network("fc00:0:0:2::/64")
    assert rng.stops == [100]
    with pytest.raises(ConfigError, match="out of subnets"):
        allocate_ipv6_subnet(c, [IPv6Network("fc00::/48")], rng)


@pytest.mark.parametrize(
    ("subnet", "ipv6", "fields", "ok"),
    [
        ("198.18.1.0/24", None, {}, True),
        ("198.18.255.0/24", None, {}, True),
        ("198.18.0.0/24", None, {}, False),  # below SubnetMin
        ("198.18.4.0/25", None, {}, False),  # wrong length
        ("198.19.4.0/24", None, {}, False),  # outside Network
        ("198.18.4.0/24", "fc00:0:0:4::/64", {}, False),  # IPv6 part while IPv6 is off
        (
            "198.18.4.0/24",
            "fc00:0:0:4::/64",
            {"EnableIPv6": True, "IPv6Network": "fc00::/48"},
            True,
        ),
        ("198.18.4.0/24", None, {"EnableIPv6": True, "IPv6Network": "fc00::/48"}, False),
        (
            "198.18.4.0/24",
            "fc00:0:0:4::/80",
            {"EnableIPv6": True, "IPv6Network": "fc00::/48"},
            False,
        ),
    ],
)
def test_lease_compatibility(
    subnet: str, ipv6: str | None, fields: dict[str, Any], ok: bool
) -> None:
    six = None if ipv6 is None else IPv6Network(ipv6)
    assert is_lease_compatible(cfg(**fields), net(subnet), six) is ok


# ---------------------------------------------------------------------------------------------
# LeaseWatcher and kv_to_lease (§1.8)
# ---------------------------------------------------------------------------------------------


def lease(subnet: str, ip: IPv4Address | str, expiration: float | None = 100.0) -> Lease:
    return Lease(net(subnet), LeaseAttrs(IPv4Address(ip)), expiration, key(subnet))


OWN = "198.18.1.0/24"


def test_watcher_reset_from_empty_excludes_own() -> None:
    w = LeaseWatcher(net(OWN))
    events = w.reset(
        [lease(OWN, ME), lease("198.18.3.0/24", PEER_B), lease("198.18.2.0/24", PEER_A)]
    )
    assert summary(events) == [
        ("ADDED", "198.18.2.0/24", str(PEER_A)),
        ("ADDED", "198.18.3.0/24", str(PEER_B)),
    ]
    assert set(w.leases) == {net("198.18.2.0/24"), net("198.18.3.0/24")}


def test_watcher_reset_diff() -> None:
    w = LeaseWatcher(net(OWN))
    w.reset(
        [
            lease("198.18.2.0/24", PEER_A),
            lease("198.18.3.0/24", PEER_B),
            lease("198.18.4.0/24", "198.19.0.4"),
        ]
    )
    events = w.reset(
        [
            lease("198.18.2.0/24", PEER_A, expiration=999.0),  # renewed only: no event
            lease("198.18.4.0/24", "198.19.0.44"),  # PublicIP changed: ADDED (quirk 7 fixed)
            lease("198.18.5.0/24", "198.19.0.5"),  # new
            lease(OWN, ME),
        ]
    )
    assert summary(events) == [
        ("REMOVED", "198.18.3.0/24", str(PEER_B)),
        ("ADDED", "198.18.4.0/24", "198.19.0.44"),
        ("ADDED", "198.18.5.0/24", "198.19.0.5"),
    ]
    assert w.leases[net("198.18.2.0/24")].expiration == 999.0
    assert summary(w.reset([])) == [
        ("REMOVED", "198.18.2.0/24", str(PEER_A)),
        ("REMOVED", "198.18.4.0/24", "198.19.0.44"),
        ("REMOVED", "198.18.5.0/24", "198.19.0.5"),
    ]
    assert w.reset([]) == [] and not w.leases


def test_watcher_update() -> None:
    w = LeaseWatcher(net(OWN))
    w.reset([lease("198.18.2.0/24", PEER_A)])
    placeholder = Lease(
        net("198.18.2.0/24"), LeaseAttrs(IPv4Address(0)), None, key("198.18.2.0/24")
    )
    events = w.update(
        [
            LeaseEvent(ADDED, lease("198.18.2.0/24", PEER_A, 500.0)),  # renewal: upsert, passed on
            LeaseEvent(ADDED, lease(OWN, ME)),  # own: never
            LeaseEvent(REMOVED, lease(OWN, ME)),
            LeaseEvent(ADDED, lease("198.18.3.0/24", PEER_B)),
            LeaseEvent(REMOVED, placeholder),  # carries the known lease out
            LeaseEvent(REMOVED, lease("198.18.9.0/24", PEER_B)),  # unknown: dropped
        ]
    )
    assert summary(events) == [
        ("ADDED", "198.18.2.0/24", str(PEER_A)),
        ("ADDED", "198.18.3.0/24", str(PEER_B)),
        ("REMOVED", "198.18.2.0/24", str(PEER_A)),
    ]
    assert list(w.leases) == [net("198.18.3.0/24")]
    with pytest.raises(TypeError):
        w.leases[net("198.18.7.0/24")] = lease("198.18.7.0/24", PEER_A)  # type: ignore[index]


def test_watcher_without_own_subnet() -> None:
    w = LeaseWatcher(None)
    assert len(w.reset([lease(OWN, ME)])) == 1


@pytest.mark.parametrize(
    ("kv", "ttl", "expect"),
    [
        (KeyValue(key("198.18.2.0/24"), val(PEER_A), 7, 3), 3600, ("198.18.2.0/24", 1000.0 + 3600)),
        (KeyValue(key("198.18.2.0/24"), val(PEER_A), 0, 3), -1, ("198.18.2.0/24", None)),
        (KeyValue(key("198.18.2.0/24"), val(PEER_A), 7, 3), -1, ("198.18.2.0/24", 999.0)),
        (
            KeyValue("subnets/198.18.2.0-24&fd00::-64", val(PEER_A), 7, 3),
            10,
            ("198.18.2.0/24", 1010.0),
        ),
        (KeyValue("subnets/garbage", val(PEER_A), 7, 3), 10, "subnet key"),
        (KeyValue(key("198.18.2.0/24"), b'{"PublicIP":"fd00::1"}', 7, 3), 10, "PublicIP"),
        (KeyValue(key("198.18.2.0/24"), b"not json", 7, 3), 10, "invalid JSON"),
    ],
)
def test_kv_to_lease(kv: KeyValue, ttl: int, expect: tuple[str, float | None] | str) -> None:
    got, why = kv_to_lease(kv, ttl, 1000.0)
    if isinstance(expect, str):
        assert got is None and why is not None and expect in why
        return
    assert got is not None and why is None
    assert (str(got.subnet), got.expiration) == expect
    assert got.key == kv.key and got.attrs.public_ip == PEER_A
    assert got.is_reservation is (expect[1] is None)


# ---------------------------------------------------------------------------------------------
# LocalManager: config, acquire, renew (§1.3, §1.4, §1.6, §1.7; checklist 4, 5, 10-15)
# ---------------------------------------------------------------------------------------------

CONFIG = json.dumps({"Network": NET, "Backend": {"Type": "udp"}}).encode()


def test_get_network_config() -> None:
    reg = FakeRegistry()
    mgr = manager(reg)
    with pytest.raises(ConfigMissing) as exc:
        run(mgr.get_network_config())
    assert "Did you create your config using etcdv3 API?" in str(exc.value)
    reg.set_config('{"Network":"198.18.0.0/29"}')
    with pytest.raises(ConfigError, match="network is too small"):
        run(mgr.get_network_config())
    reg.set_config(CONFIG)
    assert run(mgr.get_network_config()).network == net(NET)


def test_acquire_new_lease_writes_flannel_bytes_with_24h_ttl() -> None:
    reg = FakeRegistry(config=CONFIG)
    mgr = manager(reg)
    c = run(mgr.get_network_config())
    got = run(mgr.acquire_lease(c, ME, None))
    assert got.key == subnet_kv_key(got.subnet) and got.key in reg.data
    assert got.key.startswith("subnets/198.18.") and got.key.endswith("-24")
    assert reg.value_of(got.key) == b'{"PublicIP":"198.19.0.1","PublicIPv6":null}'
    assert reg.ttl_of(got.key) == SUBNET_TTL
    assert got.expiration == reg.clock() + SUBNET_TTL
    assert "create_subnet" in reg.calls and "update_subnet" not in reg.calls
    assert is_lease_compatible(c, got.subnet)


def test_acquire_reuses_lease_of_same_public_ip() -> None:
    # checklist 11: restart with the same PublicIP, subnet.env gone
    reg = FakeRegistry(config=CONFIG)
    reg.put(key("198.18.2.0/24"), val(PEER_A), ttl=600)
    reg.put(key("198.18.7.0/24"), val(ME), ttl=600)
    old_lease = reg.lease_of(key("198.18.7.0/24"))
    reg.clock.advance(100)
    got = run(manager(reg).acquire_lease(cfg(), ME, None))
    assert got.subnet == net("198.18.7.0/24") and got.key == key("198.18.7.0/24")
    assert reg.lease_of(got.key) != old_lease  # a fresh lease, the old one just ages out
    assert reg.ttl_of(got.key) == SUBNET_TTL
    assert reg.value_of(got.key) == val(ME)
    assert "create_subnet" not in reg.calls


def test_acquire_reuses_previous_subnet_from_subnet_env() -> None:
    # checklist 12: new PublicIP, old subnet.env, the key is free and compatible
    reg = FakeRegistry(config=CONFIG)
    reg.put(key("198.18.2.0/24"), val(PEER_A), ttl=600)
    got = run(manager(reg).acquire_lease(cfg(), ME, net("198.18.9.0/24")))
    assert got.subnet == net("198.18.9.0/24")
    assert reg.value_of(key("198.18.9.0/24")) == val(ME)


@pytest.mark.parametrize(
    "prev",
    [
        "198.19.9.0/24",  # outside the Network now
        "198.18.9.0/25",  # wrong SubnetLen
        "198.18.0.0/24",  # below SubnetMin
        "198.18.2.0/24",  # held by a peer
        "198.18.3.0/24",  # an admin's reservation for another host
    ],
)
def test_acquire_ignores_unusable_previous_subnet(prev: str) -> None:
    reg = FakeRegistry(config=CONFIG)
    reg.put(key("198.18.2.0/24"), val(PEER_A), ttl=600)
    reg.put(key("198.18.3.0/24"), val(PEER_B))  # reservation: no lease
    got = run(manager(reg).acquire_lease(cfg(), ME, net(prev)))
    assert got.subnet not in (net("198.18.2.0/24"), net("198.18.3.0/24"))
    assert got.subnet != IPv4Network(prev) and is_lease_compatible(cfg(), got.subnet)
    assert reg.value_of(key("198.18.2.0/24")) == val(PEER_A)
    assert reg.value_of(key("198.18.3.0/24")) == val(PEER_B)
    assert reg.lease_of(key("198.18.3.0/24")) == 0


def test_acquire_deletes_incompatible_own_lease_first() -> None:
    # checklist 13: our PublicIP's lease no longer fits (SubnetLen changed 24 -> 26)
    reg = FakeRegistry(config=CONFIG)
    reg.put(key("198.18.7.0/24"), val(ME), ttl=600)
    got = run(manager(reg).acquire_lease(cfg(SubnetLen=26), ME, None))
    assert key("198.18.7.0/24") not in reg.data
    assert got.subnet.prefixlen == 26 and not got.subnet.overlaps(net("198.18.7.0/24"))
    assert reg.calls.index("delete_subnet") < reg.calls.index("create_subnet")


def test_acquire_never_overwrites_on_lost_race() -> None:
    # checklist 10: the key appears between our listing and our create
    reg = FakeRegistry(config=CONFIG)
    contested: list[str] = []

    def intruder(k: str) -> None:
        if not contested:
            contested.append(k)
            reg.put(k, val(PEER_B), ttl=600)

    reg.before_create = intruder
    got = run(manager(reg).acquire_lease(cfg(), ME, net("198.18.9.0/24")))
    assert contested == [key("198.18.9.0/24")]
    assert reg.value_of(key("198.18.9.0/24")) == val(PEER_B)  # not overwritten
    assert got.subnet != net("198.18.9.0/24")
    assert reg.value_of(got.key) == val(ME)
    assert reg.calls.count("list_subnets") == 2 and reg.calls.count("create_subnet") == 2


def test_acquire_gives_up_after_ten_lost_races() -> None:
    reg = FakeRegistry(config=CONFIG)
    reg.before_create = lambda k: reg.put(k, val(PEER_B), ttl=600)
    with pytest.raises(AcquireError):
        run(manager(reg).acquire_lease(cfg(), ME, None))
    assert reg.calls.count("create_subnet") == 10
    assert all(v.value == val(PEER_B) for v in reg.data.values())


def test_acquire_out_of_subnets() -> None:
    reg = FakeRegistry(config=CONFIG)
    c = parse_network_config('{"Network":"198.18.7.0/28"}')  # three /30s
    for i, sub in enumerate(("198.18.7.4/30", "198.18.7.8/30", "198.18.7.12/30")):
        reg.put(key(sub), val(f"198.19.1.{i}"), ttl=600)
    with pytest.raises(ConfigError, match=r"^out of subnets$"):
        run(manager(reg).acquire_lease(c, ME, None))


def test_acquire_reservation_for_own_ip_stays_a_reservation() -> None:
    # §1.7: re-PUT without a lease (flannel's quirk 3 would attach a 24 h lease)
    reg = FakeRegistry(config=CONFIG)
    reg.put(key("198.18.5.0/24"), val(ME))
    mgr = manager(reg)
    got = run(mgr.acquire_lease(cfg(), ME, net("198.18.9.0/24")))
    assert got.subnet == net("198.18.5.0/24") and got.is_reservation and got.expiration is None
    assert reg.lease_of(got.key) == 0 and reg.value_of(got.key) == val(ME)
    revision = reg.revision
    assert run(mgr.renew_lease(got)) is got and reg.revision == revision  # nothing to renew
    assert mgr.renew_at(got, 60) is None


def test_acquire_skips_malformed_entries_alone() -> None:
    reg = FakeRegistry(config=CONFIG)
    reg.put("subnets/garbage", val(PEER_A), ttl=600)
    reg.put(key("198.18.4.0/24"), b'{"PublicIP":"fd00::1"}', ttl=600)
    reg.put(key("198.18.6.0/24"), val(ME), ttl=600)
    mgr = manager(reg)
    got = run(mgr.acquire_lease(cfg(), ME, None))
    assert got.subnet == net("198.18.6.0/24") and mgr.skipped == 2


def test_acquire_with_thousands_of_leases() -> None:
    reg = FakeRegistry(config=CONFIG)
    c = parse_network_config('{"Network":"198.18.0.0/15","SubnetLen":27}')
    base = int(IPv4Address("198.18.0.32"))
    for i in range(3000):
        reg.put(key(str(IPv4Network((base + 32 * i, 27)))), val(IPv4Address(base + i)), ttl=600)
    t0 = time.perf_counter()
    got = run(manager(reg).acquire_lease(c, ME, None))
    assert time.perf_counter() - t0 < 2.0
    assert int(got.subnet.network_address) >= base + 32 * 3000


def test_acquire_dual_stack_key() -> None:
    reg = FakeRegistry(config=CONFIG)
    c = cfg(EnableIPv6=True, IPv6Network="fc00::/48")
    got = run(manager(reg).acquire_lease(c, ME, None))
    assert got.ipv6_subnet is not None and got.ipv6_subnet.prefixlen == 64
    assert parse_subnet_key(got.key) == (got.subnet, got.ipv6_subnet)
    assert reg.value_of(got.key) == val(ME)


def test_renew_lease_and_renew_at() -> None:
    # checklist 14: re-PUT the same value on a new 24 h lease; peers see an ADDED upsert
    reg = FakeRegistry(config=CONFIG)
    mgr = manager(reg)
    got = run(mgr.acquire_lease(cfg(), ME, None))
    assert got.expiration is not None
    assert mgr.renew_at(got, 60) == got.expiration - 3600
    first_lease = reg.lease_of(got.key)
    reg.clock.advance(23 * 3600)
    renewed = run(mgr.renew_lease(got))
    assert renewed.expiration == reg.clock() + SUBNET_TTL
    assert reg.lease_of(got.key) != first_lease and reg.ttl_of(got.key) == SUBNET_TTL
    assert reg.value_of(got.key) == val(ME)
    reg.clock.advance(3 * 3600)  # the first lease ran out: the key survives on the new one
    reg.expire()
    assert got.key in reg.data


def test_lease_expires_without_renewal() -> None:
    reg = FakeRegistry(config=CONFIG)
    got = run(manager(reg).acquire_lease(cfg(), ME, None))
    reg.clock.advance(SUBNET_TTL)
    reg.expire()
    assert got.key not in reg.data


# ---------------------------------------------------------------------------------------------
# watch_leases (§1.8; checklist 14, 15, 16, 17)
# ---------------------------------------------------------------------------------------------


def watch_setup() -> tuple[FakeRegistry, LocalManager]:
    reg = FakeRegistry(config=CONFIG)
    reg.put(key(OWN), val(ME), ttl=SUBNET_TTL)
    reg.put(key("198.18.2.0/24"), val(PEER_A), ttl=SUBNET_TTL)
    reg.put(key("198.18.3.0/24"), val(PEER_B))  # a reservation is routed like any lease
    return reg, manager(reg)


def test_watch_snapshot_then_events() -> None:
    async def scenario() -> None:
        reg, mgr = watch_setup()
        own_events: list[LeaseEvent] = []
        gen = mgr.watch_leases(net(OWN), on_own=own_events.append)
        assert summary(await nxt(gen)) == [
            ("ADDED", "198.18.2.0/24", str(PEER_A)),
            ("ADDED", "198.18.3.0/24", str(PEER_B)),
        ]
        listed = reg.revision
        reg.put(key("198.18.4.0/24"), val("198.19.0.4"), ttl=60)
        assert summary(await nxt(gen)) == [("ADDED", "198.18.4.0/24", "198.19.0.4")]
        assert reg.watch_starts == [listed + 1]
        # a renewal: same value, new lease -> an ADDED upsert, nothing removed
        reg.put(key("198.18.2.0/24"), val(PEER_A), ttl=SUBNET_TTL)
        assert summary(await nxt(gen)) == [("ADDED", "198.18.2.0/24", str(PEER_A))]
        reg.delete(key("198.18.3.0/24"))
        assert summary(await nxt(gen)) == [("REMOVED", "198.18.3.0/24", str(PEER_B))]
        reg.clock.advance(61)  # 198.18.4.0/24's lease expires: a DELETE event
        reg.expire()
        assert summary(await nxt(gen)) == [("REMOVED", "198.18.4.0/24", "198.19.0.4")]
        # own key: renewals and deletion reach on_own, never the batches
        reg.put(key(OWN), val(ME), ttl=SUBNET_TTL)
        reg.delete(key(OWN))
        reg.put(key("198.18.5.0/24"), val("198.19.0.5"), ttl=60)
        assert summary(await nxt(gen)) == [("ADDED", "198.18.5.0/24", "198.19.0.5")]
        assert [e.kind for e in own_events] == [ADDED, ADDED, REMOVED]
        assert own_events[1].lease.expiration == reg.clock() + SUBNET_TTL
        await gen.aclose()
        assert not reg._watchers

    run(scenario())


def test_watch_malformed_put_is_skipped_alone() -> None:
    # flannel's quirk 4 would withdraw every route here
    async def scenario() -> None:
        reg, mgr = watch_setup()
        gen = mgr.watch_leases(net(OWN))
        await nxt(gen)
        reg.put(key("198.18.2.0/24"), b'{"PublicIP":"fd00::1"}', ttl=60)  # bad value
        reg.put("subnets/not-a-subnet", val(PEER_A), ttl=60)  # bad key
        reg.delete("subnets/not-a-subnet")
        reg.put(key("198.18.6.0/24"), val("198.19.0.6"), ttl=60)
        assert summary(await nxt(gen)) == [("ADDED", "198.18.6.0/24", "198.19.0.6")]
        assert mgr.skipped == 3
        await gen.aclose()

    run(scenario())


def test_watch_initial_snapshot_empty_and_own_missing() -> None:
    async def scenario() -> None:
        reg = FakeRegistry(config=CONFIG)
        own_events: list[LeaseEvent] = []
        gen = manager(reg).watch_leases(net(OWN), on_own=own_events.append)
        assert await nxt(gen) == []  # the initial snapshot is always yielded
        assert [e.kind for e in own_events] == [REMOVED]
        await gen.aclose()

    run(scenario())


def test_watch_outage_loses_nothing_and_resumes_from_revision() -> None:
    async def scenario() -> None:
        reg, mgr = watch_setup()
        states: list[bool] = []
        gen = mgr.watch_leases(net(OWN), on_state=states.append)
        await nxt(gen)
        reg.put(key("198.18.4.0/24"), val("198.19.0.4"), ttl=600)
        await nxt(gen)
        seen = reg.revision
        reg.set_available(False)
        reg.put(key("198.18.5.0/24"), val("198.19.0.5"), ttl=600)  # other clients carry on
        reg.delete(key("198.18.2.0/24"))
        reg.clock.on_sleep = lambda dt: reg.set_available(len(reg.clock.sleeps) >= 4)
        events = await nxt(gen)
        assert summary(events) == [
            ("ADDED", "198.18.5.0/24", "198.19.0.5"),
            ("REMOVED", "198.18.2.0/24", str(PEER_A)),
        ]
        assert reg.clock.sleeps == [0.1, 0.2, 0.25, 0.25]
        assert states == [False, True]
        assert reg.watch_starts[1:] == [seen + 1] * 4  # every retry from the same point
        assert reg.calls.count("list_subnets") == 1  # no re-list needed
        # the backoff was reset by the success: a second outage starts at 0.1 s again
        reg.clock.sleeps.clear()
        reg.set_available(False)
        reg.clock.on_sleep = lambda dt: reg.set_available(True)
        reg.put(key("198.18.6.0/24"), val("198.19.0.6"), ttl=600)
        assert summary(await nxt(gen)) == [("ADDED", "198.18.6.0/24", "198.19.0.6")]
        assert reg.clock.sleeps == [0.1] and states == [False, True, False, True]
        await gen.aclose()

    run(scenario())


def test_watch_backoff_is_capped_below_a_second() -> None:
    async def scenario() -> None:
        reg = watch_setup()[0]
        states: list[bool] = []
        mgr = LocalManager(
            reg,
            clock=reg.clock,
            rng=random.Random(1),
            sleep=reg.clock.sleep,
            on_state=states.append,
        )
        reg.set_available(False)  # down from the start: the initial listing retries
        reg.clock.on_sleep = lambda dt: reg.set_available(len(reg.clock.sleeps) >= 9)
        gen = mgr.watch_leases(net(OWN))
        events = await nxt(gen)
        assert len(events) == 2 and all(e.added for e in events)
        assert reg.clock.sleeps == [0.1, 0.2, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25]
        assert states == [False, True]
        await gen.aclose()

    run(scenario())


def test_watch_compaction_during_outage_relists_and_diffs() -> None:
    # checklist 17: peers added/removed during the gap are reflected afterwards
    async def scenario() -> None:
        reg, mgr = watch_setup()
        gen = mgr.watch_leases(net(OWN))
        await nxt(gen)
        reg.set_available(False)
        reg.put(key("198.18.7.0/24"), val("198.19.0.7"), ttl=600)
        reg.delete(key("198.18.2.0/24"))
        reg.put(key("198.18.3.0/24"), val("198.19.0.33"))  # changed PublicIP: an upsert
        reg.put(key("198.18.8.0/24"), val("198.19.0.8"), ttl=600)
        reg.delete(key("198.18.8.0/24"))  # came and went: nothing to report
        reg.compact()
        reg.clock.on_sleep = lambda dt: reg.set_available(True)
        events = await nxt(gen)
        assert summary(events) == [
            ("REMOVED", "198.18.2.0/24", str(PEER_A)),
            ("ADDED", "198.18.3.0/24", "198.19.0.33"),
            ("ADDED", "198.18.7.0/24", "198.19.0.7"),
        ]
        assert reg.calls.count("list_subnets") == 2
        relisted_at = reg.revision
        reg.put(key("198.18.9.0/24"), val("198.19.0.9"), ttl=600)
        assert summary(await nxt(gen)) == [("ADDED", "198.18.9.0/24", "198.19.0.9")]
        assert reg.watch_starts[-1] == relisted_at + 1
        await gen.aclose()

    run(scenario())


def test_watch_compaction_cancelling_open_watch() -> None:
    async def scenario() -> None:
        reg, mgr = watch_setup()
        gen = mgr.watch_leases(net(OWN))
        await nxt(gen)
        reg.put(key("198.18.6.0/24"), val("198.19.0.6"), ttl=600)
        await nxt(gen)  # the watch is open now
        reg.put(key("198.18.7.0/24"), val("198.19.0.7"), ttl=600)
        reg.compact(cancel_watches=True)  # after the PUT: it is in the queue, then the error
        assert summary(await nxt(gen)) == [("ADDED", "198.18.7.0/24", "198.19.0.7")]
        reg.put(key("198.18.8.0/24"), val("198.19.0.8"), ttl=600)
        assert summary(await nxt(gen)) == [("ADDED", "198.18.8.0/24", "198.19.0.8")]
        assert reg.calls.count("list_subnets") == 2 and reg.clock.sleeps == []
        await gen.aclose()

    run(scenario())


def test_watch_repeated_compaction_backs_off() -> None:
    # one compaction re-lists at once; compacted again before any response: back off
    async def scenario() -> None:
        reg, mgr = watch_setup()
        gen = mgr.watch_leases(net(OWN))
        await nxt(gen)
        reg.compact_revision = 10**9  # every watch start is "compacted"
        reg.set_available(False)  # break the open watch

        def on_sleep(dt: float) -> None:
            reg.set_available(True)
            if len(reg.clock.sleeps) == 3:
                reg.compact_revision = 0
                reg.put(key("198.18.7.0/24"), val("198.19.0.7"), ttl=600)

        reg.clock.on_sleep = on_sleep
        assert summary(await nxt(gen)) == [("ADDED", "198.18.7.0/24", "198.19.0.7")]
        # outage 0.1; compacted -> re-list; compacted again -> 0.2, re-list; again -> 0.4
        assert reg.clock.sleeps == [0.1, 0.2, 0.25]
        await gen.aclose()

    run(scenario())


def test_watch_stream_ending_reconnects_from_resume_point() -> None:
    class EndingRegistry(FakeRegistry):
        """Each watch delivers what it has, then the server closes the stream."""

        async def _watch(self, start: int) -> AsyncIterator[WatchBatch]:
            self.watch_starts.append(start)
            self._enter("watch_subnets")
            yield WatchBatch([ev for rev, ev in self.history if rev >= start], self.revision)

    async def scenario() -> None:
        reg = EndingRegistry(config=CONFIG)
        reg.put(key("198.18.2.0/24"), val(PEER_A), ttl=600)
        states: list[bool] = []
        gen = manager(reg).watch_leases(net(OWN), on_state=states.append)
        await nxt(gen)
        listed = reg.revision
        reg.put(key("198.18.3.0/24"), val(PEER_B), ttl=600)
        assert summary(await nxt(gen)) == [("ADDED", "198.18.3.0/24", str(PEER_B))]
        reg.put(key("198.18.4.0/24"), val("198.19.0.4"), ttl=600)
        assert summary(await nxt(gen)) == [("ADDED", "198.18.4.0/24", "198.19.0.4")]
        assert reg.watch_starts == [listed + 1, listed + 2]
        assert reg.clock.sleeps == [0.1] and states == []  # a clean close is not an outage
        await gen.aclose()

    run(scenario())

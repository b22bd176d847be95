"""The lab's addressing plan: every address, interface name and port its testbeds use.

Everything here lies in the RFC 2544 benchmarking range 198.18.0.0/15, so nothing a testbed does
can reach a real network. Must not: hold code, or an address outside that range.
"""

from __future__ import annotations

# --- the two-node Testbed: nodes "a" and "b" on one veth pair --------------------------------

NODES = ("a", "b")
UNDERLAY_PREFIX = 24
UNDERLAY_ADDR = {"a": "198.18.0.1", "b": "198.18.0.2"}
VETH_NAME = {"a": "veth-a", "b": "veth-b"}
NODE_SUBNET = {"a": "198.19.1.0/24", "b": "198.19.2.0/24"}
TUN_ADDR = {"a": "198.19.1.0", "b": "198.19.2.0"}
# kernel VXLAN as flannel's vxlan backend sets it up (the benchmark's baseline)
VXLAN_NAME = "vxlan0"
VXLAN_VNI = 1
VXLAN_PORT = 8472
VXLAN_MTU = 1450
VXLAN_ADDR = {"a": "198.18.100.1", "b": "198.18.100.2"}

# --- both testbeds ----------------------------------------------------------------------------

OVERLAY_NETWORK = "198.19.0.0/16"
TUN_NAME = "flannel0"
UDP_PORT = 8285
IPERF_PORT = 5201

# --- the Cluster: hub 198.18.0.254 with the bridge and etcd; node i = 198.18.0.(i+1) ----------

HUB = "hub"
HUB_ADDR = "198.18.0.254"
BRIDGE_NAME = "br0"
MAX_CLUSTER_NODES = 253  # node indices 0..252 -> 198.18.0.1 .. 198.18.0.253
HEALTHZ_PORT = 8081

"""The control plane: network config, this node's lease and the peers' leases, from a subnet
manager (manager.SubnetManager: static flags, etcd via local + etcd, kube).  It hands the
node lease events; must not import the data plane or touch a route table itself.
"""

"""The host around the planes, as flanneld leaves it: the external interface, the iptables
rules and the subnet.env hand-off file.  Must not: import either plane or the node.
"""

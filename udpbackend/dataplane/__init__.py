"""The data plane: packets between the TUN and the UDP sockets.  plane.DataPlane is its public
surface (routes in, counters out); the pumps (C in csrc/ via fastpath, or the packet twin) do
the per-packet work.  Must not: import the control plane, the host or the node.
"""

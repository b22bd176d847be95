"""The lab: network-namespace testbeds, the benchmark ladder, trace and the demo.  It drives
nodes only as processes through their public command line; must not import the planes.
"""

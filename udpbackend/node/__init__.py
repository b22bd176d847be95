"""The node: the one place the planes meet.  compose builds the parts from the options,
lifecycle runs them from start to exit, routes turns lease events into routes, health and
metrics serve what the node knows.  Must not: parse flags or touch packets.
"""

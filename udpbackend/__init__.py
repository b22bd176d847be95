"""udpbackend: flannel's UDP backend rebuilt as a fast, tested userspace data plane.
This file holds only the version; the pieces live in their own modules (see README).
"""

__version__ = "0.1.0"

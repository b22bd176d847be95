"""cffi builder for udpbackend._fastpath (build time only; never imported at run time).

The cdef is csrc/fastpath.h verbatim: the header is the contract. UDPBACKEND_SANITIZE=1 builds
with AddressSanitizer/UBSan (compiled and linked in; load it into a Python that has libasan
preloaded, as tests/test_sanitizers.py does).
"""

import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = ["packet.c", "route.c", "offload.c", "io.c", "steer.c"]

with open(os.path.join(HERE, "fastpath.h")) as f:
    header = f.read()

extra = ["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-std=gnu11"]
link: list[str] = []
if os.environ.get("UDPBACKEND_SANITIZE") == "1":
    sanitize = "-fsanitize=address,undefined"
    extra += [sanitize, "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-O1"]
    link += [sanitize]

ffibuilder = FFI()
ffibuilder.cdef(header)
ffibuilder.set_source(
    "udpbackend.dataplane._fastpath",
    '#include <stdint.h>\n#include "fastpath.h"\n',
    # setuptools wants paths relative to the project root.
    sources=[os.path.join("csrc", s) for s in SOURCES],
    include_dirs=["csrc"],
    depends=[os.path.join("csrc", "fastpath.h"), os.path.join("csrc", "internal.h")],
    extra_compile_args=extra,
    extra_link_args=link,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)

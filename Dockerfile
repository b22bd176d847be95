# udpbackend container image: flannel-compatible UDP/TUN overlay data plane.
#
# The data plane creates a TUN device and sets addresses/routes, so it needs:
#   docker run --cap-add NET_ADMIN --device /dev/net/tun udpbackend run --network ... --subnet ...
# (and usually --network host, so the UDP socket and the TUN live in the host's network namespace).

# --- builder: compile the C fast path into a wheel, plus wheels of every dependency ----------------
FROM python:3.11-slim-bookworm AS builder

# Debian's versions are not pinned: bookworm's security updates replace them, so pins would rot.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY pyproject.toml setup.py MANIFEST.in README.md ./
COPY csrc/ csrc/
COPY udpbackend/ udpbackend/

RUN pip install --no-cache-dir --upgrade pip==25.3 setuptools==80.9.0 wheel==0.45.1 \
    && pip wheel --no-cache-dir --no-deps -w /wheels . \
    && pip wheel --no-cache-dir -w /wheels /wheels/udpbackend-*.whl

# --- runtime: no compiler, just the wheels and the tools the data plane shells out to -------------
FROM python:3.11-slim-bookworm

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends iproute2 iptables \
    && rm -rf /var/lib/apt/lists/*

COPY --from=builder /wheels /tmp/wheels
RUN pip install --no-cache-dir --no-index --find-links=/tmp/wheels udpbackend==0.1.0 \
    && rm -rf /tmp/wheels \
    && python -c "import udpbackend.dataplane._fastpath"

# flannel's UDP backend port.
EXPOSE 8285/udp

ENTRYPOINT ["udpbackend"]
CMD ["run", "--help"]

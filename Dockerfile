# udpbackend container image: flannel-compatible UDP/TUN overlay data plane, a drop-in for
# flannel's image in deploy/kube-flannel.yml (/opt/bin/flanneld, flannel's path) and the image
# of deploy/kube-udpbackend.yaml (`udpbackend run ...`).
#
# The data plane creates a TUN device and sets addresses/routes, so it needs:
#   docker run --network host --cap-add NET_ADMIN --cap-add NET_RAW --device /dev/net/tun \
#     udpbackend run --network ... --subnet ...
#
# BASE is any Debian bookworm image: the official Python image (the default, for those with a
# registry) or a plain Debian one (e.g. made by mmdebstrap, as tests/container/ does), where
# Debian's python3 is used.  Either way udpbackend lives in the venv /opt/udpbackend (Debian's
# python3 is externally managed, PEP 668), built in the first stage and copied whole.
ARG BASE=python:3.11-slim-bookworm

# --- builder: compile the C fast path into a wheel, install it and its dependencies ------------
FROM ${BASE} AS builder

# Debian's versions are not pinned: bookworm's security updates replace them, so pins would rot.
# The official Python image has its own python3 in /usr/local; a plain Debian base gets Debian's
# (python3-dev for Python.h, python3-venv for the venv).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && if [ ! -x /usr/local/bin/python3 ]; then \
        apt-get install -y --no-install-recommends python3 python3-dev python3-venv; \
    fi \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY pyproject.toml setup.py MANIFEST.in README.md ./
COPY csrc/ csrc/
COPY udpbackend/ udpbackend/

RUN python3 -m venv /opt/udpbackend \
    && /opt/udpbackend/bin/pip install --no-cache-dir --upgrade \
        pip==25.3 setuptools==80.9.0 wheel==0.45.1 \
    && /opt/udpbackend/bin/pip wheel --no-cache-dir --no-deps -w /wheels . \
    && /opt/udpbackend/bin/pip install --no-cache-dir --find-links=/wheels udpbackend==0.1.0 \
    && /opt/udpbackend/bin/pip uninstall -y pip setuptools wheel

# --- runtime: no compiler, the venv and the tools the data plane shells out to -----------------
FROM ${BASE}

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends iproute2 iptables \
    && if [ ! -x /usr/local/bin/python3 ]; then \
        apt-get install -y --no-install-recommends python3; \
    fi \
    && rm -rf /var/lib/apt/lists/*

COPY --from=builder /opt/udpbackend /opt/udpbackend
ENV PATH=/opt/udpbackend/bin:$PATH

# /opt/bin/flanneld is where kube-flannel.yml's `command:` looks for flanneld.
RUN mkdir -p /opt/bin \
    && ln -s /opt/udpbackend/bin/flanneld /opt/bin/flanneld \
    && /opt/bin/flanneld --version \
    && udpbackend --version \
    && python3 -c "import udpbackend.dataplane._fastpath"

# flannel's UDP backend port.
EXPOSE 8285/udp

ENTRYPOINT ["udpbackend"]
CMD ["run", "--help"]

# The agent-sidecar image, as deploy/k8s/ references it (the sidecar container and the
# iptables init container of overlays/iptables):
#
#   docker build --platform linux/amd64 -t ghcr.io/agent-sidecar/agent-sidecar:0.1.0 .
#
# docs/kubernetes.md ("The image") says how to build, push and pin it. tests/test_image.py
# lints this file with hadolint, runs the build stage's install script into a fresh virtual
# environment, lays out the final stage's files under a temporary root and starts the
# sidecar from the default config baked in below.
#
# linux/amd64 only: the embedded OPA engine (opa-golib-python-bindings) ships x86_64 wheels only.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ------------------------------------------------------------------ build: the virtual environment
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY sidecar/ sidecar/
COPY deploy/image/install.sh deploy/image/install.sh
RUN sh deploy/image/install.sh /opt/agent-sidecar

# ------------------------------------------------------------------ final: no compiler, no pip, no cache
FROM ${PYTHON_IMAGE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="agent-sidecar" \
      org.opencontainers.image.description="OPA/Rego-backed authorization sidecar for AI agents" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"

# iptables: overlays/iptables runs this image as the init container that redirects the agent's
# egress (/bin/sh and iptables). Debian's package versions move with security updates, so they
# are not pinned (DL3008); the base image tag is what pins the release.
# uid and gid 1337: the manifests run the sidecar as 1337 and the iptables rules exempt exactly it.
# The base image's own pip, setuptools and wheel are removed: nothing installs at run time.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb \
 && python -m pip uninstall --quiet --yes pip setuptools wheel \
 && groupadd --system --gid 1337 agent-sidecar \
 && useradd --system --uid 1337 --gid 1337 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin agent-sidecar \
 && mkdir -p /var/lib/agent-sidecar \
 && chown 1337:1337 /var/lib/agent-sidecar \
 && chmod 0750 /var/lib/agent-sidecar

COPY --from=build /opt/agent-sidecar /opt/agent-sidecar
COPY rego/ /usr/share/agent-sidecar/rego/
COPY deploy/image/sidecar.yaml /etc/agent-sidecar/sidecar.yaml

ENV PATH=/opt/agent-sidecar/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 1337:1337
WORKDIR /var/lib/agent-sidecar
VOLUME ["/var/lib/agent-sidecar"]
EXPOSE 15001 15000 15090
ENTRYPOINT ["agent-sidecar", "run"]
CMD ["--config", "/etc/agent-sidecar/sidecar.yaml"]

# The Baton image: the sidecar agent and the rotator (`baton agent|rotator ...`).
# Linted by tests/integration/test_packaging.py (hadolint, checkov); build with
#   docker build -t baton:0.1.0 .
# Both stages use the same exact Python tag, so the venv built in the first
# works unchanged in the second (it points at /usr/local/bin/python3.11).

FROM python:3.11.11-slim-bookworm AS builder
# pip still compiles the installed modules to .pyc (kept on purpose: the
# root file system is read-only at run time, so nothing could cache them later).
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# A C compiler for daemon/usage/_fdscan.c (the agent's fd walk, ~2.5x faster
# than the pure Python fallback); it stays in this stage. Not pinned: libc6-dev
# must match the image's libc6, which Debian point releases move.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/baton
# Only what the distribution needs: the package sources and its metadata.
COPY pyproject.toml README.md ./
COPY daemon ./daemon
COPY sidecar ./sidecar
# A local path, not a PyPI name: the versions come from pyproject.toml.
RUN /opt/baton/bin/pip install --no-cache-dir '.[all]' \
    && /opt/baton/bin/pip uninstall --yes pip setuptools wheel

FROM python:3.11.11-slim-bookworm
LABEL org.opencontainers.image.title="baton" \
      org.opencontainers.image.description="Credential rotation daemon: sidecar agent and rotator" \
      org.opencontainers.image.licenses="Apache-2.0"
# The same UID/GID as the Kubernetes manifests (runAsUser: 10001), with no
# home and no login shell.
RUN groupadd --system --gid 10001 baton \
    && useradd --system --uid 10001 --gid baton --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin baton
COPY --from=builder /opt/baton /opt/baton
ENV PATH=/opt/baton/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
EXPOSE 8787
# Docker's own health check (Kubernetes ignores it and uses the probes in
# manifests/): /healthz on the default api.listen address.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8787/healthz', timeout=4)"]
ENTRYPOINT ["baton"]
CMD ["agent", "--config", "/etc/baton/baton.yaml"]

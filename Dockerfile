# syntax=docker/dockerfile:1
# das-ingest: the ingester image. `docker build -t das-ingest .`; docker-compose.yml builds it
# for the local demo, deploy/kubernetes runs it as a fleet.
#
#   docker run --rm das-ingest run --cluster my-aurora-cluster --metrics-port 9108
#
# Every das-ingest command is available (the entrypoint is `das-ingest`): run, migrate, status,
# decrypt, dead-letters, retention, emulate, ...

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: install das-ingest and its pinned dependencies into a virtualenv ---------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/das-ingest
WORKDIR /src
# Only what the package build needs (see .dockerignore): tests, benchmarks and tools stay out.
COPY pyproject.toml constraints.txt README.md ./
COPY ingest ./ingest
# constraints.txt pins every dependency to the versions CI tested (it is the dev freeze; as a
# constraints file it only limits versions, it installs nothing by itself). Every dependency
# ships manylinux wheels, so no compiler is needed.
RUN /opt/das-ingest/bin/pip install -c constraints.txt . \
    && /opt/das-ingest/bin/das-ingest --version

# --- runtime ------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
# OCI labels: say which code an image runs. Release builds pass the commit and the repository:
#   docker build --build-arg REVISION="$(git rev-parse HEAD)" \
#     --build-arg SOURCE="$(git remote get-url origin)" -t das-ingest .
# VERSION is the package version (pyproject.toml; a test keeps them equal).
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG SOURCE=unknown
LABEL org.opencontainers.image.title="das-ingest" \
      org.opencontainers.image.description="Exactly-once consumer for Aurora Database Activity Streams into a PostgreSQL audit warehouse" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE}"
# A fixed numeric uid/gid so Kubernetes' runAsNonRoot can verify it without a passwd lookup.
RUN groupadd --system --gid 10001 das \
    && useradd --system --uid 10001 --gid das --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin das
COPY --from=build /opt/das-ingest /opt/das-ingest
# The SQL migrations are not part of the wheel: `das-ingest migrate` and the schema check at the
# start of `das-ingest run` read them from $DAS_MIGRATIONS_DIR.
COPY migrations /usr/share/das-ingest/migrations
COPY deploy/docker/healthcheck.py /usr/local/lib/das-ingest/healthcheck.py
COPY LICENSE /usr/share/doc/das-ingest/LICENSE
ENV PATH=/opt/das-ingest/bin:$PATH \
    DAS_MIGRATIONS_DIR=/usr/share/das-ingest/migrations \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
# /metrics, /healthz and /readyz when `run` is given --metrics-port (9108 by convention).
EXPOSE 9108
# GET /healthz on the --metrics-port of `das-ingest run` (or $DAS_METRICS_PORT); passes for
# commands without a health endpoint (migrate, emulate, a run without a metrics port). `run`
# serves it first, before it reaches the warehouse (which it retries while unreachable), so the
# start period only covers the interpreter's start.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python3", "-I", "/usr/local/lib/das-ingest/healthcheck.py"]
ENTRYPOINT ["das-ingest"]
CMD ["--help"]

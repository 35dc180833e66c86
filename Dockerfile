# syntax=docker/dockerfile:1
# keyrotor image: a builder stage installs the package into a virtualenv, a slim runtime stage
# copies only that virtualenv. No compiler, no pip cache and no source tree in the final image.
# Both stages use the same pinned base so the venv's interpreter path (/usr/local/bin/python) holds.

# ---------------------------------------------------------------------------------------- builder
FROM python:3.11.13-slim-bookworm AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

WORKDIR /src
RUN python -m venv /opt/venv

# The dependencies come from the lock file (`make lock`): exact versions, every file's hash
# checked, so an image built today and one built next month hold the same code. Every one of them
# ships manylinux wheels (psycopg[binary], ...), so no build toolchain is installed. Installed
# before the source is copied, this layer is rebuilt only when the lock changes.
COPY requirements/runtime.txt ./requirements/runtime.txt
RUN pip install --no-cache-dir --require-hashes -r requirements/runtime.txt

# Then keyrotor's own wheel, without resolving anything (--no-deps): the source tree never reaches
# the runtime stage, and `pip check` proves the locked set satisfies what pyproject.toml declares.
COPY pyproject.toml README.md ./
COPY worker ./worker
COPY jobs ./jobs
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
    && pip install --no-cache-dir --no-deps /wheels/*.whl \
    && pip check \
    && keyrotor --version

# ---------------------------------------------------------------------------------------- runtime
FROM python:3.11.13-slim-bookworm AS runtime

ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="keyrotor" \
      org.opencontainers.image.description="Event-driven API-key rotation: issue, store in Vault, propagate, verify, retire." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11.13-slim-bookworm"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    KEYROTOR_METRICS_PORT=9108

# A fixed, unprivileged UID/GID (10001) that matches the Helm chart's securityContext, with no
# home directory and no login shell. The venv stays owned by root: the process cannot modify it.
RUN groupadd --system --gid 10001 keyrotor \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin keyrotor

COPY --from=builder /opt/venv /opt/venv

# The root filesystem is read-only under the chart; only /tmp (an emptyDir there) is writable.
WORKDIR /tmp
USER 10001:10001

# /metrics and /healthz for both `keyrotor worker` and `keyrotor scheduler`.
EXPOSE 9108

# For docker/compose runs. Kubernetes ignores HEALTHCHECK and uses the chart's probes instead;
# one-shot commands (`db upgrade`, `config apply`) finish before the first check is due.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('KEYROTOR_METRICS_PORT', '9108'), timeout=3)"]

ENTRYPOINT ["keyrotor"]
CMD ["worker"]

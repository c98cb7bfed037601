# One image for the five driftline services; docker-compose.yml runs it with different commands
# (`driftline serve ingestion`, ... `driftline infra topics`). Settings come from DRIFTLINE_* env.
#
# BASE_IMAGE: any image with Python 3.11+ whose `python` and `pip` come first on PATH (a venv on a
# Debian base will do, where the official image cannot be pulled: docs/deploy.md).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DRIFTLINE_HOST=0.0.0.0 \
    DRIFTLINE_HOME=/var/lib/driftline

WORKDIR /app

# Dependencies first, in their own layer: it is rebuilt only when pyproject.toml changes.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# The repo itself, installed in place: the code reads schemas/ and infra/ next to services/.
COPY . .
# A fixed, numeric uid: Kubernetes can then check runAsNonRoot (infra/kubernetes/).
RUN pip install --no-deps -e . \
    && groupadd --system --gid 10001 driftline \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /var/lib/driftline driftline

USER 10001:10001
# Mount points of the named volumes (offline store, audit log): made here, so that Docker gives
# each new volume this owner instead of root.
RUN mkdir -p /var/lib/driftline/offline /var/lib/driftline/audit
EXPOSE 8000 8001 8002 8003 8004 8005
CMD ["driftline", "--help"]

# One image for the five driftline services; docker-compose.yml runs it with different commands
# (`driftline serve ingestion`, ... `driftline infra topics`). Settings come from DRIFTLINE_* env.
FROM python:3.11-slim

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
RUN pip install --no-deps -e . \
    && useradd --system --create-home --home-dir /var/lib/driftline driftline

USER driftline
# Mount points of the named volumes (offline store, audit log): made here, so that Docker gives
# each new volume this owner instead of root.
RUN mkdir -p /var/lib/driftline/offline /var/lib/driftline/audit
EXPOSE 8000 8001 8002 8003 8004
CMD ["driftline", "--help"]

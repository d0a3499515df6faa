# The runledger image of compose.yaml: the worker, the roles, the migrations and every `runledger` command. Real
# servers only: the embedded ones (runledger's [embedded] extra) are not installed, and it runs as a user of its
# own (uid 10001), never as root.
FROM python:3.11.14-slim-bookworm
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/runledger --create-home \
        --shell /usr/sbin/nologin runledger
WORKDIR /src
COPY pyproject.toml README.md ./
COPY schemas schemas
COPY projections projections
COPY streams streams
COPY sql sql
RUN pip install --no-cache-dir . && rm -rf /src
WORKDIR /var/lib/runledger
# Metrics reachable from Prometheus' container; secrets come as files (compose.yaml's secrets), never here.
ENV RUNLEDGER_EMBEDDED="" RUNLEDGER_METRICS_HOST=0.0.0.0 RUNLEDGER_STATE_DIR=/var/lib/runledger
USER 10001:10001
CMD ["runledger", "worker", "--loglevel", "info"]

# The runledger image of compose.yaml: the worker, the migrations and every `runledger` command.
FROM python:3.11.14-slim-bookworm
WORKDIR /src
COPY pyproject.toml README.md ./
COPY schemas schemas
COPY projections projections
COPY streams streams
COPY sql sql
RUN pip install --no-cache-dir . && rm -rf /src
WORKDIR /var/lib/runledger
# Real servers, not the embedded stack; metrics reachable from Prometheus' container.
ENV RUNLEDGER_EMBEDDED="" RUNLEDGER_METRICS_HOST=0.0.0.0 RUNLEDGER_STATE_DIR=/var/lib/runledger
CMD ["runledger", "worker", "--loglevel", "info"]

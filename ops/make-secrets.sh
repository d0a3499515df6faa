#!/bin/sh
# Writes the password files compose.yaml's secrets name, each once (an existing one is kept): 32 random bytes as
# hex, so that no password needs quoting in a URL, a Redis configuration line or Kafka's SCRAM syntax. The folder is
# the owner's alone; the files are readable by the containers' users (postgres, redis, Kafka and Grafana run as
# users of their own, and compose mounts a secret file with its mode). To change a password, replace its file and
# `docker compose up -d` (the roles service sets the PostgreSQL ones again, kafka-start.sh the Kafka one).
set -eu
cd "$(dirname "$0")"
umask 077
mkdir -p secrets
chmod 700 secrets
for name in postgres_admin_password database_owner_password database_worker_password database_producer_password \
    database_reader_password database_api_password redis_password kafka_password grafana_admin_password; do
  if [ ! -s "secrets/$name" ]; then
    od -An -N32 -tx1 /dev/urandom | tr -d ' \n' >"secrets/$name"
    echo "wrote ops/secrets/$name"
  fi
  chmod 644 "secrets/$name"
done

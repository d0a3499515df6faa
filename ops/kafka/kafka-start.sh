#!/bin/bash
# The kafka service's entrypoint (compose.yaml): the image's own start (/etc/kafka/docker/run), then the SCRAM
# credentials of runledger's Kafka user ($RUNLEDGER_KAFKA_USER) from the docker secret kafka_password, set through
# the INTERNAL listener on the container's loopback, which no other container reaches. Set again on every start,
# so that a changed secret becomes the password. The health check passes once they are set.
set -euo pipefail
rm -f /tmp/runledger-scram-ready
/etc/kafka/docker/run &
broker=$!
trap 'kill -TERM "$broker"; wait "$broker"' TERM INT

deadline=$((SECONDS + 180))
until /opt/kafka/bin/kafka-broker-api-versions.sh --bootstrap-server 127.0.0.1:9094 >/dev/null 2>&1; do
  if ! kill -0 "$broker" 2>/dev/null; then
    wait "$broker"
    exit $?
  fi
  if [ "$SECONDS" -ge "$deadline" ]; then
    echo "kafka-start: the broker did not answer on 127.0.0.1:9094 within 180 s" >&2
    kill -TERM "$broker"
    exit 1
  fi
  sleep 1
done

# The password goes to kafka-configs in a file of this process's own (mode 0600), never on a command line.
umask 077
config=$(mktemp)
printf 'SCRAM-SHA-512=[password=%s]\n' "$(cat /run/secrets/kafka_password)" >"$config"
/opt/kafka/bin/kafka-configs.sh --bootstrap-server 127.0.0.1:9094 --alter --entity-type users \
  --entity-name "${RUNLEDGER_KAFKA_USER:-runledger}" --add-config-file "$config"
rm -f "$config"
touch /tmp/runledger-scram-ready
wait "$broker"

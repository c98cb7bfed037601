#!/bin/bash
# The official image's start, for the variables docker-compose.yml sets: every KAFKA_* variable
# but the JVM's becomes a broker property (KAFKA_LOG_DIRS -> log.dirs; `__` -> `_`, `___` -> `-`),
# the KRaft storage is formatted once with CLUSTER_ID, and the broker runs as PID 1.
set -euo pipefail
props=/opt/kafka/config/server.properties
: > "$props"
for var in $(compgen -e); do
  case "$var" in
    KAFKA_HEAP_OPTS|KAFKA_OPTS|KAFKA_JVM_PERFORMANCE_OPTS|KAFKA_LOG4J_OPTS|KAFKA_JMX_OPTS|KAFKA_GC_LOG_OPTS) ;;
    KAFKA_*)
      key=${var#KAFKA_}; key=${key,,}
      key=${key//___/-}; key=${key//__/@}; key=${key//_/.}; key=${key//@/_}
      printf '%s=%s\n' "$key" "${!var}" >> "$props" ;;
  esac
done
log_dir=$(sed -n 's/^log\.dirs=//p' "$props" | cut -d, -f1)
if [ ! -f "${log_dir:-/tmp/kafka-logs}/meta.properties" ]; then
  /opt/kafka/bin/kafka-run-class.sh kafka.tools.StorageTool format -t "${CLUSTER_ID:?set CLUSTER_ID}" -c "$props"
fi
exec /opt/kafka/bin/kafka-run-class.sh kafka.Kafka "$props"

#!/bin/bash
# `kafka-run-class.sh CLASS ARGS...` as in Kafka's distribution: the broker's jars, its log4j
# config, KAFKA_HEAP_OPTS (default 256 MB) and KAFKA_OPTS.
exec java ${KAFKA_HEAP_OPTS:--Xmx256m} ${KAFKA_OPTS:-} -Djava.awt.headless=true \
  -Dlog4j.configuration=file:/opt/kafka/config/log4j.properties -cp '/opt/kafka/libs/*' "$@"

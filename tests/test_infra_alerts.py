"""Counters from zero, on the real thing: a real Prometheus (1 s scrapes and rule evaluation)
scrapes the real ingestion service and learner (whose drift loop raises concept drift) from
their start; their labelled counters are
there at 0 before anything happens, so the very first dead letter makes DeadLetterRateHigh
active and the very first concept drift makes `increase()` (ConceptDriftDetected) see it.

A series that appeared at 1 (what prometheus_client does without `metrics.start_at_zero`) has
no earlier sample: `rate()` and `increase()` over it are empty and neither alert would fire.
"""

from __future__ import annotations

import time

import pytest
from learner_harness import Driver
from test_drift_service import NO_CHANGE, rows_with_error_rates, wait_learned
from test_observability_live import prometheus, wait_for  # noqa: F401 (the fixture)

from driftline.shared import kafka
from driftline.shared.topics import Topics

pytestmark = pytest.mark.e2e


def test_first_dead_letter_and_first_drift_fire_their_alerts(settings, redis_client, run_service,
                                                             prometheus):  # noqa: F811
    ingestion = run_service("ingestion")
    learner = run_service("learner", DRIFTLINE_LEARNER__MODEL=NO_CHANGE, DRIFTLINE_DRIFT__DATA_DRIFT="false")
    scraped = wait_for("zero series scraped", lambda: len(prometheus.instant(
        'driftline_dead_letters_total{service="ingestion", topic="events", reason="not_avro"} == 0')) == 1
        and len(prometheus.instant('driftline_drift_events_total{kind="concept", level="drift"} == 0')) == 1
        and len(prometheus.instant('driftline_messages_in_total{service="ingestion", topic="events"} == 0')) == 1,
        timeout=60)
    assert scraped, prometheus.get("targets")["activeTargets"]
    time.sleep(2)  # a second sample at 0: the step to 1 is then a rate

    # One dead letter: the first of its series.
    producer = kafka.producer(settings)
    kafka.produce(producer, Topics(settings.namespace).events, b"\x00not avro at all", key="k")
    assert producer.flush(10) == 0
    active = wait_for("DeadLetterRateHigh", lambda: [
        a for a in prometheus.alerts() if a["labels"]["alertname"] == "DeadLetterRateHigh"], timeout=30)
    assert active and active[0]["labels"]["service"] == "ingestion", prometheus.alerts()
    assert active[0]["state"] == "pending"  # it fires after its `for: 5m` if dead letters go on
    assert prometheus.instant('increase(driftline_dead_letters_total{reason="not_avro"}[1m]) > 0')

    # The first concept drift: the champion's error rate rises from 10% to 45%.
    Driver(settings, redis_client).send(rows_with_error_rates([(2000, 0.10), (1000, 0.45)]), entities=1)
    wait_learned(learner, 3000)
    seen = wait_for("increase() sees the first drift", lambda: prometheus.instant(
        'increase(driftline_drift_events_total{kind="concept", level="drift"}[10m]) > 0'), timeout=30)
    assert seen, prometheus.instant("driftline_drift_events_total")
    firing = wait_for("ConceptDriftDetected", lambda: [
        a for a in prometheus.alerts() if a["labels"]["alertname"] == "ConceptDriftDetected"
        and a["state"] == "firing"], timeout=30)
    assert firing, prometheus.alerts()
    ingestion.stop()

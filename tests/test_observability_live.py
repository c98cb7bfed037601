"""The dashboards and alerts work on the real thing: Debian's Prometheus scrapes the five real
services (1 s scrape and rule evaluation) while a drifting stream is replayed through Kafka; then
every dashboard query a classifier's operator sees (the task-neutral panels and the classification
rows) returns data over the replay's time range (as Grafana asks it: a range query), every alert
expression returns data with its threshold taken out, the concept-drift alert fires, and a killed
service makes ServiceDown pending.

A query without data names the metrics in it that no service exported, so a missing metric
points at the service that must emit it.
"""

from __future__ import annotations

import itertools
import time

import httpx
import pytest

from driftline.infra import stack
from driftline.replay.datasets import Dataset
from driftline.serve import SERVICES
from driftline.shared import kafka
from driftline.shared.codec import get_codec
from driftline.shared.topics import Topics
from pipeline import metric, replay_report, start_pipeline
from test_observability_config import (
    alert_rules,
    as_prometheus_query,
    dashboard_queries,
    metric_names,
    without_threshold,
)

pytestmark = pytest.mark.e2e

BEFORE, AFTER = 600, 900  # rows before and after the drift
LABEL_DELAY = 10
# Small windows so that a short stream shows every panel: data drift checked on every features
# message (window 200); a retrain every 150 labels with a 400-label cooldown (so most triggers are
# held back); challengers dropped after 100 shared examples (before they may be promoted at 200).
FAST = {"DRIFTLINE_DRIFT__DATA_DRIFT_SAMPLE": "1", "DRIFTLINE_DRIFT__DATA_DRIFT_WINDOW": "200",
        "DRIFTLINE_DRIFT__ON_NEW_DATA": "150", "DRIFTLINE_DRIFT__COOLDOWN": "400",
        "DRIFTLINE_LEARNER__WARM_START": "0", "DRIFTLINE_LEARNER__PROMOTE_AFTER": "200",
        "DRIFTLINE_LEARNER__MAX_SHADOW": "100",
        "DRIFTLINE_LEARNER__UPDATE_INTERVAL_S": "0.5", "DRIFTLINE_LEARNER__CHECKPOINT_INTERVAL_S": "1"}


def sea_with_a_flip(before: int = BEFORE, after: int = AFTER) -> Dataset:
    """river's SEA (variant 0) whose concept inverts at `before` (every label flips: concept
    drift the champion cannot miss) while its noise feature "2" moves up by 10 (data drift).
    agrawal-abrupt drifts only at row 10,000: too long a stream for this test."""

    def rows():
        from river.datasets import synth

        for i, (x, y) in enumerate(itertools.islice(synth.SEA(variant=0, seed=42), before + after)):
            fields = {str(k): float(v) for k, v in x.items()}
            label = int(y)
            if i >= before:
                label, fields["2"] = 1 - label, fields["2"] + 10.0
            yield fields, str(label), "sea"

    return Dataset("sea-flip", rows, before + after, (before,), 0, "SEA 0 with labels flipped from `before` on")


class PromAPI:
    def __init__(self, url: str) -> None:
        self.url = url
        self.http = httpx.Client(base_url=f"{url}/api/v1/", timeout=10)  # one connection, kept alive

    def get(self, path: str, **params) -> dict:
        body = self.http.get(path, params=params).json()
        assert body["status"] == "success", f"{path} {params}: {body}"
        return body["data"]

    def range(self, expr: str, start: float, end: float) -> list[dict]:
        return self.get("query_range", query=expr, start=start, end=end, step="1s")["result"]

    def instant(self, expr: str) -> list[dict]:
        return self.get("query", query=expr)["result"]

    def alerts(self) -> list[dict]:
        return self.get("alerts")["alerts"]


@pytest.fixture
def prometheus(settings):
    """Debian's Prometheus scraping this test's services every second, with infra/prometheus/rules.yml."""
    prom_settings = settings.model_copy(update={"prometheus_port": stack.free_port()})
    prom = stack.Prometheus(prom_settings, interval="1s")
    prom.start()
    try:
        deadline = time.monotonic() + 30
        while not prom.ready():
            assert prom.running(), f"prometheus exited:\n{prom.log_tail()}"
            assert time.monotonic() < deadline, f"prometheus not ready in 30 s:\n{prom.log_tail()}"
            time.sleep(0.2)
        api = PromAPI(prom.url)
        yield api
        api.http.close()
    finally:
        prom.stop()


def wait_for(what: str, check, timeout: float = 30.0, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(every)


def side_traffic(settings, prediction_url: str) -> None:
    """What a replay alone does not produce: input the ingestion must dead-letter or drop as a
    duplicate, good and bad prediction requests, a readiness probe."""
    topics = Topics(settings.namespace)
    codec = get_codec()
    producer = kafka.producer(settings)
    # An instant before the replay's (publish.START_TS): an event from now would move the
    # learner's event-time clock past the whole replay, and every replayed event would be late.
    event = codec.encode("Event", {"event_id": "obs-probe-1", "entity_id": "obs-probe", "ts": 1_600_000_000.0,
                                   "fields": {"salary": 50_000.0, "age": 40.0}, "published_ms": None})
    kafka.produce(producer, topics.events, b"\x00not avro at all", key="obs-probe")  # -> events.dlq
    kafka.produce(producer, topics.events, event, key="obs-probe")
    kafka.produce(producer, topics.events, event, key="obs-probe")  # same event_id: a duplicate
    assert producer.flush(10) == 0
    with httpx.Client(base_url=prediction_url, timeout=10) as http:
        http.get("/ready")  # a readiness probe, as a load balancer sends it
        for i in range(20):
            http.post("/v1/predict", json={"entity_id": f"obs-{i % 3}", "fields": {"salary": 1000.0 * i, "age": 30.0}})
        assert http.post("/v1/predict", json={"entity_id": "obs", "fields": "not a dict"}).status_code == 422


@pytest.mark.order_given_up("a second replay starts its event times over, before the labels the first one taught")
def test_every_dashboard_query_and_alert_returns_data_from_prometheus_during_a_drifting_replay(
        settings, run_service, prometheus):
    t0 = time.monotonic()
    procs = start_pipeline(run_service, services=SERVICES, **FAST)
    up = wait_for("five targets up", lambda: len(prometheus.instant('up{job="driftline"} == 1')) == len(SERVICES))
    assert up, f"targets: {prometheus.get('targets')['activeTargets']}"
    start = time.time()
    print(f"five services up and scraped in {time.monotonic() - t0:.1f} s")

    side_traffic(settings, procs["prediction"].url)
    report = replay_report(settings, sea_with_a_flip(), label_delay=LABEL_DELAY)
    print(f"replay: {report['examples_learned']} learned in {report['wall_s']} s "
          f"({report['throughput_events_per_s']} ev/s), accuracy {report['prequential']['accuracy']:.3f}, "
          f"drift events {[(d['kind'], d['position']) for d in report['drift_events']]}, "
          f"swaps {[(s['position'], s['to_version']) for s in report['model_swaps']]}")
    assert report["examples_learned"] == BEFORE + AFTER
    assert any(d["kind"] == "concept" and d["position"] >= BEFORE for d in report["drift_events"]), report["drift_events"]
    # In event-time order throughout, with retrain requests, challengers and the drift service's pace.
    assert metric(procs["learner"], "driftline_scored_ahead_of_labels_total") == 0
    assert metric(procs["learner"], "driftline_labels_out_of_order_total") == 0
    # The stream goes on (the new concept): the challenger the retrain requests started shadows
    # these and is dropped. Slowly enough (60 ev/s, so 100 shared examples take over 1.5 s) for a
    # 1 s scrape to see it: at full speed it could shadow and go between two scrapes. (Its event
    # times start over at the replay's: not in order with the first replay's, by design.)
    more = replay_report(settings, sea_with_a_flip(before=0, after=300), label_delay=LABEL_DELAY, rate=60)
    assert more["examples_learned"] == 300
    print(f"both replays done {time.monotonic() - t0:.1f} s in")
    side_traffic(settings, procs["prediction"].url)  # with a model by now: 200s, version served

    # Every dashboard query (panels, annotations, variables) over the replay, as Grafana asks it.
    # The replay's model is a classifier: the regression rows' panels cannot have data.
    queries = [(f"{board}: {what}", as_prometheus_query(expr))
               for board, what, expr in dashboard_queries(tasks={"classification"})]
    queries += [(f"rules.yml: alert {rule['alert']}", without_threshold(rule["expr"])) for rule in alert_rules()]

    def empty() -> list[tuple[str, str]]:
        return [(what, expr) for what, expr in queries if not prometheus.range(expr, start, time.time())]

    missing, deadline = empty(), time.monotonic() + 30  # the last scrapes may still be coming
    while missing and time.monotonic() < deadline:
        print(f"  {len(missing)} queries without data yet, e.g. {missing[0][0]}")
        time.sleep(2)
        missing = empty()
    assert not missing, f"{len(missing)} of {len(queries)} queries without data (metric: series now):\n" + "\n".join(
        f"  {what}: {expr}\n    " + ", ".join(f"{m}: {len(prometheus.instant(m))}" for m in sorted(metric_names(expr)))
        for what, expr in missing)
    print(f"{len(queries)} dashboard and alert queries returned data ({time.monotonic() - t0:.1f} s in)")

    # Every rule evaluates without error, and the drift alert fires.
    groups = prometheus.get("rules")["groups"]
    for rule in (r for g in groups for r in g["rules"]):
        assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))
    firing = wait_for("drift alert", lambda: [a for a in prometheus.alerts()
                                             if a["labels"]["alertname"] == "ConceptDriftDetected"
                                             and a["state"] == "firing"])
    assert firing, prometheus.alerts()
    assert firing[0]["labels"]["detector"] and firing[0]["annotations"]["runbook"]

    # A service that dies makes ServiceDown pending at the next scrape (it fires after its `for`).
    procs["drift"].kill9()
    down = wait_for("service down", lambda: [a for a in prometheus.alerts()
                                            if a["labels"]["alertname"] == "ServiceDown"])
    assert [a["labels"]["service"] for a in down] == ["drift"]
    assert down[0]["state"] == "pending"
    print(f"drift alert fired, ServiceDown pending; {time.monotonic() - t0:.1f} s in all")


def test_a_regressors_dashboard_rows_return_data_and_a_classifiers_stay_away(settings, run_service, prometheus):
    """The regression rows, on a regressor's real metrics: every query returns data, and the
    classification rows' variable finds no model to repeat them for."""
    model = "preprocessing.StandardScaler() | linear_model.LinearRegression()"
    services = ("ingestion", "features", "learner", "drift")  # drift: its retrain requests start challengers
    # A challenger shadows 300 examples (3 s at 100 ev/s): long enough for a 1 s scrape to see it.
    start_pipeline(run_service, services=services, model=model, features="raw",
                   **{**FAST, "DRIFTLINE_LEARNER__MAX_SHADOW": "300"})
    wait_for("four targets up", lambda: len(prometheus.instant('up{job="driftline"} == 1')) == len(services))
    start = time.time()
    report = replay_report(settings, "friedman-abrupt", limit=800, label_delay=LABEL_DELAY, rate=100, model=model,
                           features="raw")
    assert report["examples_learned"] == 800 and report["prequential"]["task"] == "regression"

    regression = set(dashboard_queries(tasks={"regression"})) - set(dashboard_queries(tasks=set()))
    assert len(regression) >= 8
    queries = [(f"{board}: {what}", as_prometheus_query(expr)) for board, what, expr in regression]

    def empty() -> list[str]:
        return [what for what, expr in queries if not prometheus.range(expr, start, time.time())]

    assert wait_for("regression rows' data", lambda: not empty(), timeout=30), empty()
    classification_only = set(dashboard_queries(tasks={"classification"})) - set(dashboard_queries(tasks=set()))
    variable = next(expr for _, what, expr in classification_only if what.startswith("variable"))
    assert prometheus.instant(as_prometheus_query(variable)) == []

"""Helpers for end-to-end tests: start a test's pipeline, replay a dataset through it, get the report.

    from pipeline import start_pipeline, replay_report

    def test_something(settings, run_service):
        procs = start_pipeline(run_service, model="tree.HoeffdingTreeClassifier()", features="raw")
        report = replay_report(settings, "sea-abrupt", label_delay=0)
        assert report["drift_events"]

The services are real `driftline serve NAME` processes on the test's own namespace and ports
(the `run_service` fixture stops them after the test); the replay goes through Kafka like any
producer. `report["_outcomes"]` holds the champion outcomes as they came (for duplicate checks).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import httpx

from driftline.replay import order as learning_order
from driftline.replay.datasets import Dataset, load
from driftline.replay.publish import replay

PIPELINE = ("ingestion", "features", "learner")
ALL = ("ingestion", "features", "learner", "drift", "prediction")


def start_pipeline(run_service, services=PIPELINE, model: str | None = None, features: str | None = None,
                   timeout: float = 120.0, **env) -> dict:
    """Start these services (in parallel, then wait for each /health). `model` and `features`
    set DRIFTLINE_LEARNER__MODEL / DRIFTLINE_FEATURES__SET; other keywords are env overrides."""
    if model is not None:
        env["DRIFTLINE_LEARNER__MODEL"] = model
    if features is not None:
        env["DRIFTLINE_FEATURES__SET"] = features
    procs = {name: run_service(name, wait=False, **env) for name in services}
    for proc in procs.values():
        proc.wait_healthy(timeout)
    return procs


def replay_report(settings, dataset: str | Dataset, *, limit: int | None = None, label_delay: int = 0,
                  rate: float = 0.0, model: str | None = None, features: str | None = None,
                  report_dir: Path | None = None, stall_timeout_s: float = 60.0, **dataset_options) -> dict:
    """Replay through the running pipeline and return the report dict (written to `report_dir`
    too, when given). `model`/`features` are only report metadata (and checked)."""
    ds = load(dataset, **dataset_options) if isinstance(dataset, str) else dataset
    return replay(settings, ds, limit=limit, rate=rate, label_delay=label_delay, model=model, features=features,
                  report_dir=report_dir, stall_timeout_s=stall_timeout_s, progress=False, keep_outcomes=True)


def metric(service, name: str, **labels) -> float:
    """The sum of a metric's samples on a running service's /metrics that carry these labels."""
    text = httpx.get(service.url + "/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def features_in_time_order(fs, events: list[dict]) -> dict[str, dict]:
    """Every event's vector as one process reading the events in time order computes it (the
    exact point-in-time values): own entity and key fields' entities, each before the event."""
    own: dict = defaultdict(dict)
    keyed: dict = defaultdict(dict)
    out = {}
    for ev in sorted(events, key=lambda e: e["ts"]):
        named = {k: keyed[(k, v)] for k, v in fs.key_values(ev["fields"]).items()}
        out[ev["event_id"]] = fs.vector(own[ev["entity_id"]], ev["fields"], ev["ts"], keyed=named)
        fs.apply_event(own[ev["entity_id"]], ev["fields"], ev["ts"])
        for key, state in named.items():
            fs.apply_keyed(key, state, ev["fields"], ev["ts"], ev["entity_id"])
    return out


def as_learned(rows, spec: str, order: learning_order.Order) -> list[str | None]:
    """river in-process, each event scored knowing the labels the learner had learned (river's
    predict_proba_one, as the label text the learner publishes), in the order it learned them."""
    from driftline.learner.champion import predict
    from driftline.learner.labels import to_river
    from driftline.learner.spec import parse_model

    model, preds, learned = parse_model(spec), [], 0
    for j, (x, _, _) in enumerate(rows):
        for row in order.by_position[learned:order.learned_before[j]]:
            model.learn_one(rows[row][0], to_river(rows[row][1]))
        learned = max(learned, order.learned_before[j])
        preds.append(predict(model, x))
    return preds

"""Training/serving parity of windowed aggregates, end to end: a slice of the payments stream goes
through the real ingestion, features, learner and prediction services with payments.toml (10
aggregates over the card and the merchant). For every event the learner scored, the vector it
scored (the outcome's features, what the offline store keeps) equals what one process computes
reading the stream in time order; for probe events sent after it, /v1/predict's vector (same
fields, entity and time, same state) equals both the vector the learner scored for them and that
reference."""

from __future__ import annotations

import time
import uuid

import httpx
import pytest

from driftline.features.definitions import load_feature_set
from driftline.features.store import Snapshots
from driftline.replay import order as learning_order
from driftline.replay.datasets import FEATURES_DIR, load
from driftline.replay.publish import label_time, times_of
from driftline.shared import kafka
from driftline.shared.codec import get_codec
from driftline.shared.keys import Keys
from driftline.shared.topics import Topics
from driftline.client import Producer
from pipeline import as_learned, features_in_time_order, metric, replay_report, start_pipeline

pytestmark = pytest.mark.e2e
PAYMENTS = str(FEATURES_DIR / "payments.toml")
LOGREG = "preprocessing.StandardScaler() | linear_model.LogisticRegression()"
ROWS = None  # the whole stream: three days, every attack and rush
PROBES = 12
LABEL_DELAY = 100


def as_replayed(ds, rows: list, run_id: str) -> list[dict]:
    """The events as `driftline replay` published them: its ids, times and per-run entity names."""
    out = []
    for i, ((fields, _label, card, _t), ts) in enumerate(zip(rows, times_of(ds, rows))):
        fields = {k: f"{run_id}/{v}" if k in ds.keys else v for k, v in fields.items()}
        out.append({"event_id": f"{run_id}-{i}", "entity_id": f"{run_id}/{card}", "ts": ts, "fields": fields})
    return out


def probes_after(events: list[dict], n: int, last: float) -> list[dict]:
    """`n` new events after `last` (the stream's last label: the learner has learned it, and an
    event older than it would come out of the stream's order), each of a card and a merchant that
    no other probe names (so each sees the state the stream left), from the busiest of them."""
    cards, merchants, out = set(), set(), []
    for ev in reversed(events):
        card, merchant = ev["entity_id"], ev["fields"]["merchant"]
        if card in cards or merchant in merchants:
            continue
        cards.add(card), merchants.add(merchant)
        out.append({"event_id": f"probe-{uuid.uuid4().hex[:8]}", "entity_id": card, "ts": last + 10.0 * (len(out) + 1),
                    "fields": {**ev["fields"], "amount": round(ev["fields"]["amount"] * 1.5, 2)}})
        if len(out) == n:
            return out
    raise AssertionError("not enough distinct cards and merchants for the probes")


def scored_vectors(settings, event_ids: set[str], timeout: float) -> dict[str, dict]:
    """The features the learner scored these events with (their outcomes), once each has one."""
    codec = get_codec()
    c = kafka.consumer(settings, f"probe-{uuid.uuid4().hex[:8]}", **{"auto.offset.reset": "earliest"})
    c.subscribe([Topics(settings.namespace).outcomes])
    out, deadline = {}, time.monotonic() + timeout
    try:
        while not event_ids <= out.keys() and time.monotonic() < deadline:
            for m in c.consume(500, timeout=0.5):
                if m.error() is None:
                    o = codec.decode(m.value(), expect="Outcome")
                    if o["event_id"] in event_ids and o["role"] == "champion":
                        out[o["event_id"]] = o["features"]
    finally:
        c.close()
    assert event_ids <= out.keys(), f"{len(event_ids - out.keys())} probes never learned"
    return out


def windowed(x: dict, fs) -> dict:
    return {a.name: x.get(a.name) for a in fs.aggregates}


def test_payments_vectors_scored_served_and_recomputed_by_one_process_agree(settings, run_service):
    fs = load_feature_set(PAYMENTS)
    procs = start_pipeline(run_service, services=("ingestion", "features", "learner", "prediction"),
                           model=LOGREG, features=PAYMENTS)
    ds = load("payments")
    started = time.monotonic()
    report = replay_report(settings, ds, limit=ROWS, label_delay=LABEL_DELAY, model=LOGREG, features=PAYMENTS)
    rows = list(ds.rows())[:ROWS]
    assert report["examples_learned"] == report["labels_sent"] == len(rows)
    events = as_replayed(ds, rows, report["run_id"])
    expected = features_in_time_order(fs, events)
    scored = {o["event_id"]: o["features"] for o in report["_outcomes"]}
    assert scored.keys() == expected.keys()
    wrong = [e for e in scored if scored[e] != expected[e]]
    assert not wrong, f"{len(wrong)} scored vectors differ from one process in time order, e.g. " \
                      f"{[(e, windowed(scored[e], fs), windowed(expected[e], fs)) for e in wrong[:2]]}"
    assert any(x["merchant_cards_10m"] >= 10 for x in scored.values())  # card-testing bursts were in it

    # Learned in the stream's order: each event scored knowing exactly the labels Kafka had before
    # it, and its prediction river's, scoring these very vectors and learning in that order.
    outcomes = {int(o["event_id"].rsplit("-", 1)[1]): o for o in report["_outcomes"]}
    order = learning_order.check(outcomes, report["_acks"], len(rows), LABEL_DELAY)
    assert not order.broken, f"{len(order.broken)} events scored out of Kafka's order, e.g. {order.broken[:3]}"
    assert metric(procs["learner"], "driftline_scored_ahead_of_labels_total") == 0
    in_order = [(expected[e["event_id"]], label, None) for e, (_, label, _, _) in zip(events, rows)]
    river = as_learned(in_order, LOGREG, order)
    differ = [j for j in range(len(rows)) if outcomes[j]["y_pred"] != river[j]]
    assert not differ, f"{len(differ)} of {len(rows)} predictions differ from river in-process, first {differ[:5]}"

    # Probes: /v1/predict first (the state the stream left), then the same events through the pipeline.
    probes = probes_after(events, PROBES, last=label_time([e["ts"] for e in events], len(events) - 1, LABEL_DELAY))
    prediction = procs["prediction"]
    served_ids = {}
    for p in probes:
        served_ids[p["event_id"]] = f"{p['event_id']}-served"
        r = httpx.post(prediction.url + "/v1/predict", timeout=10, json={
            "entity_id": p["entity_id"], "fields": p["fields"], "ts": p["ts"], "event_id": served_ids[p["event_id"]]})
        assert r.status_code == 200, r.text
    import redis as redis_lib

    client = redis_lib.Redis.from_url(settings.redis_url)
    served = Snapshots(client, Keys(settings.namespace)).read_vectors(served_ids.values())
    client.close()
    with Producer(settings=settings) as producer:
        for p in probes:
            producer.send_event(p["entity_id"], p["fields"], ts=p["ts"], event_id=p["event_id"])
        for p in probes:
            producer.send_label(p["event_id"], "0", ts=p["ts"] + 1.0)
    learned = scored_vectors(settings, {p["event_id"] for p in probes}, timeout=90)
    truth = features_in_time_order(fs, events + probes)
    for p in probes:
        x = served[served_ids[p["event_id"]]]["features"]
        assert x == learned[p["event_id"]] == truth[p["event_id"]], (
            p["event_id"], windowed(x, fs), windowed(learned[p["event_id"]], fs), windowed(truth[p["event_id"]], fs))
    print(f"{len(rows)} events and {PROBES} probes agree; replay {report['wall_s']} s, "
          f"{report['throughput_events_per_s']} ev/s; test {time.monotonic() - started:.0f} s")

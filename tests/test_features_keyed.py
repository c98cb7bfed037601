"""Aggregates keyed by other fields (a merchant, a device), against real Kafka and Redis and real
`driftline serve features` processes: whatever the replicas, their backlog and a kill -9 among them,
every event's vector equals what one process computes reading the stream in time order, and every
key entity holds each of its events once; a replica that stops makes its key partitions' values
stale only after features.keyed_hold_ms, by exactly its gap, and says so."""

from __future__ import annotations

import math
import os
import random
import re
import signal
import threading
import time
from bisect import bisect_left, bisect_right
from collections import defaultdict
from pathlib import Path

import httpx
import pytest
from confluent_kafka import TopicPartition

from driftline.features.definitions import load_feature_set
from driftline.features.keyed import Forwarder, KeyStage, key_partition
from driftline.features.store import FeatureStore
from driftline.infra import stack
from driftline.shared.keys import Keys
from driftline.shared.loop import RestartLoop
from driftline.shared import kafka
from driftline.shared.codec import get_codec
from driftline.shared.topics import Topics
from learner_harness import read_all
from pipeline import features_in_time_order
from test_features_service import event, publish

FEATURES = """
[features]
name = "keyed"
count = true
lateness = "60s"

[[aggregate]]
fn = "count"
window = "10m"
name = "card_count_10m"

[[aggregate]]
key = "merchant"
fn = "count"
window = "10m"
name = "m_count_10m"

[[aggregate]]
key = "merchant"
fn = "sum"
field = "amount"
window = "1h"
name = "m_sum_1h"

[[aggregate]]
key = "merchant"
fn = "distinct"
field = "entity_id"
window = "1h"
name = "m_cards_1h"

[[aggregate]]
key = "device"
fn = "count"
window = "5m"
name = "d_count_5m"

[[aggregate]]
key = "device"
fn = "max"
field = "amount"
window = "1h"
name = "d_max_1h"
"""
MERCHANTS = ("m0", "m1", "m2", "m3", "m4")


def feature_file(tmp_path: Path) -> str:
    path = tmp_path / "keyed.toml"
    path.write_text(FEATURES)
    return str(path)


def stream(n: int, seed: int = 5) -> list[dict]:
    """Cards (so on every partition) paying five merchants from twenty devices, half a second apart;
    one in ten events names no device, one in twenty no merchant."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        fields = {"amount": float(rng.randrange(1, 50))}
        if rng.random() > 0.05:
            fields["merchant"] = rng.choice(MERCHANTS)
        if rng.random() > 0.1:
            fields["device"] = f"dev-{rng.randrange(20)}"
        out.append(event(f"k{i}", f"card-{rng.randrange(60)}", 1000.0 + 0.5 * i, **fields))
    return out


def replica(run_service, settings, path: str, wait: bool = False, **env):
    """One more `driftline serve features` of the same group, on a port of its own."""
    own = settings.model_copy(update={"ports": settings.ports.model_copy(update={"features": stack.free_port()})})
    return run_service("features", wait=wait, settings_override=own, DRIFTLINE_FEATURES__SET=path, **env)


def metric(text: str, name: str, **labels) -> float:
    """The sum of a metric's samples whose labels include these."""
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{name}(?:{{(.*)}})? (\S+)$", line)
        if m and all(f'{k}="{v}"' in (m[1] or "") for k, v in labels.items()):
            total += float(m[2])
    return total


def vectors_of(settings, event_ids: set[str], timeout: float,
               order: dict[int, list[float]] | None = None) -> dict[str, list[dict]]:
    """Every vector on `features` until each of these events has one (a redelivery may publish one
    twice: all copies are kept); `order`, if given, gets each partition's event times, first
    copies only, in the order they came."""
    codec = get_codec()
    c = kafka.consumer(settings, f"probe-{time.monotonic_ns()}")
    c.subscribe([Topics(settings.namespace).features])
    out: dict[str, list[dict]] = defaultdict(list)
    deadline = time.monotonic() + timeout
    try:
        while not event_ids <= out.keys() and time.monotonic() < deadline:
            for m in c.consume(500, timeout=0.5):
                if m.error() is None:
                    fv = codec.decode(m.value(), expect="FeatureVector")
                    if order is not None and fv["event_id"] not in out:
                        order.setdefault(m.partition(), []).append(fv["ts"])
                    out[fv["event_id"]].append(fv["features"])
    finally:
        c.close()
    missing = event_ids - out.keys()
    assert not missing, f"{len(missing)} of {len(event_ids)} events have no vector, e.g. {sorted(missing)[:5]}"
    return out


def publish_at(settings, events: list[dict], rate: float) -> None:
    """Publish to events.valid at about `rate` events a second."""
    codec, topic = get_codec(), Topics(settings.namespace).events_valid
    p = kafka.producer(settings)
    started = time.monotonic()
    for i, ev in enumerate(events):
        kafka.produce(p, topic, codec.encode("Event", ev), key=ev["entity_id"])
        if i % 30 == 29:
            p.poll(0)
            time.sleep(max(0.0, started + (i + 1) / rate - time.monotonic()))
    assert p.flush(30) == 0


def last_written(settings, topics: list[str]) -> dict[tuple[str, int], float]:
    """When each partition of `topics` that holds anything was last written: its newest record's
    CreateTime (epoch seconds, the writer's clock: every process here shares one)."""
    c = kafka.consumer(settings, f"probe-{time.monotonic_ns()}")
    try:
        newest = []
        for topic in topics:
            for tp in kafka.partitions_of(settings, topic):
                low, high = c.get_watermark_offsets(tp, timeout=10, cached=False)
                if high > low:
                    newest.append(TopicPartition(topic, tp.partition, high - 1))
        c.assign(newest)
        found: dict[tuple[str, int], float] = {}
        deadline = time.monotonic() + 30
        while len(found) < len(newest):
            assert time.monotonic() < deadline, f"read {len(found)} of {len(newest)} newest records"
            for m in c.consume(len(newest), timeout=0.5):
                if m.error() is None:
                    found.setdefault((m.topic(), m.partition()), m.timestamp()[1] / 1000)
        return found
    finally:
        c.close()


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def test_replicas_on_a_backlog_with_a_kill_give_every_event_its_single_process_value(settings, redis_client,
                                                                                        run_service, tmp_path):
    path = feature_file(tmp_path)
    fs = load_feature_set(path)
    events = stream(6_000)
    publish(settings, events=events)  # the whole backlog is there before any replica starts
    replicas = [replica(run_service, settings, path, DRIFTLINE_FEATURES__BATCH_SIZE="200") for _ in range(3)]
    for r in replicas:
        r.wait_healthy()

    def forwarded() -> list[int]:
        return [httpx.get(r.url + "/health", timeout=5).json().get("forwarded", 0) for r in replicas]

    wait_for(lambda: sum(forwarded()) > len(events) // 4, 90, "the replicas never got going")
    progress = forwarded()
    victim = replicas[progress.index(max(progress))]  # a crash mid-backlog: its partitions go to the others,
    victim.kill9()  # then it comes back
    time.sleep(1.0)
    victim.restart()
    survivors = [r for r in replicas if r is not victim]
    order: dict[int, list[float]] = {}
    got = vectors_of(settings, {e["event_id"] for e in events}, timeout=240, order=order)
    expected = features_in_time_order(fs, events)
    assert got.keys() == expected.keys()
    wrong = {e: (xs, expected[e]) for e, xs in got.items() if any(x != expected[e] for x in xs)}
    assert not wrong, f"{len(wrong)} events differ from one process in time order, e.g. {sorted(wrong.items())[:2]}"
    # features in the stream's order, partition by partition (the learner reads it so), events
    # that name no key entity (one in two hundred) among the others
    behind = {p: sum(b < a for a, b in zip(ts, ts[1:])) for p, ts in order.items()}
    assert not any(behind.values()), f"vectors behind an earlier one on their features partition: {behind}"
    # and each key entity holds each of its events once: what /v1/predict reads after the stream
    probe_ts = events[-1]["ts"] + 1.0
    store = FeatureStore(redis_client, Keys(settings.namespace), fs, 60)
    for merchant in MERCHANTS:
        fields = {"merchant": merchant, "device": "dev-0", "amount": 1.0}
        after = features_in_time_order(fs, events + [event("probe", "nobody", probe_ts, **fields)])["probe"]
        assert store.vector("nobody", fields, probe_ts) == after
    print(f"killed after {sum(progress)} of {len(events)} events had been sent on")
    for r in survivors:
        text = httpx.get(r.url + "/metrics").text
        assert metric(text, "driftline_features_late_events_total", handling="dropped") == 0
        assert metric(text, "driftline_features_keyed_stale_total") == 0


def test_a_replica_that_stops_holds_its_partners_for_the_hold_then_they_go_on_stale_and_say_so(
        settings, run_service, tmp_path):
    path = feature_file(tmp_path)
    events = stream(6_000, seed=9)
    env = dict(DRIFTLINE_FEATURES__KEYED_HOLD_MS="3000", DRIFTLINE_FEATURES__BATCH_SIZE="100")
    a, b = replica(run_service, settings, path, **env), replica(run_service, settings, path, **env)
    a.wait_healthy(), b.wait_healthy()
    stream_on = threading.Thread(target=publish_at, args=(settings, events, 300.0), daemon=True)
    stream_on.start()  # a live stream, 300 events a second, for 20 s

    def health(r) -> dict:
        return httpx.get(r.url + "/health", timeout=5).json()

    def stale() -> float:
        return metric(httpx.get(a.url + "/metrics").text, "driftline_features_keyed_stale_total")

    def both_busy() -> bool:  # each sending events on, in the group as it stands
        before = [health(r)["forwarded"] for r in (a, b)]
        time.sleep(1.0)
        return all(health(r)["forwarded"] > n > 0 for r, n in zip((a, b), before))

    wait_for(both_busy, 15, "not both busy on the stream")
    os.killpg(b.proc.pid, signal.SIGSTOP)  # frozen: its partitions stay its own a while
    stopped, stopped_wall = time.monotonic(), time.time()
    try:
        assert stale() == 0
        wait_for(lambda: stale() > 0, 30, "a went on waiting for the frozen replica past the hold")
        stale_at, stale_wall = time.monotonic(), time.time()
        # b's last words, read while it is still frozen: the internal topics' partitions nobody
        # has written since the stop are its own (a writes each of its own every HEARTBEAT_S)
        internal = [Topics(settings.namespace).keyed(key, s) for key in ("merchant", "device") for s in range(6)]
        frozen = [at for at in last_written(settings, internal).values() if at < stopped_wall]
    finally:
        os.killpg(b.proc.pid, signal.SIGCONT)
    stream_on.join()
    # a busy replica is never given up on (nothing stale before the stop); a stopped one is, once a
    # has heard nothing from it for the hold (3 s), counted from b's last word, which a received
    # after b wrote it (it speaks every keyed.HEARTBEAT_S when it can: on a loaded machine its last
    # word may be older than that; the hold exactly so: test_features_merge.py), and not much later
    assert frozen, "no internal partition went silent when b stopped"
    assert stopped_wall - min(frozen) < 3.0, "b, busy, left one of its partitions unheard for the hold"
    silent = stale_wall - min(frozen)
    waited = stale_at - stopped
    assert silent >= 3.0 - 0.01, f"the first stale read came {silent:.2f} s after b's earliest last word (hold 3 s)"
    assert waited <= 3.0 + 10.0, f"the first stale read came {waited:.1f} s after the stop (hold 3 s)"
    got = vectors_of(settings, {e["event_id"] for e in events}, timeout=180)
    # a stale value misses events of the frozen replica's partitions: it never counts more than
    # the events of its key in the window before it (counted one by one, not by tiles)
    times: dict[tuple[str, object], list[float]] = defaultdict(list)  # (key, its value) -> event times, sorted
    for e in sorted(events, key=lambda e: e["ts"]):
        for key in ("merchant", "device"):
            if key in e["fields"]:
                times[(key, e["fields"][key])].append(e["ts"])
    for ev in events:
        for key, name, window in (("merchant", "m_count_10m", 600.0), ("device", "d_count_5m", 300.0)):
            if key in ev["fields"]:
                seen_at = times[(key, ev["fields"][key])]  # its events in (ts - window, ts)
                exact = bisect_left(seen_at, ev["ts"]) - bisect_right(seen_at, ev["ts"] - window)
                assert all(x[name] <= exact for x in got[ev["event_id"]]), (ev["event_id"], name, exact)
    text = httpx.get(a.url + "/metrics").text
    seen = metric(text, "driftline_features_keyed_staleness_seconds_count")
    total = metric(text, "driftline_features_keyed_staleness_seconds_sum")
    assert seen > 0 and total > 0
    print(f"first stale read {waited:.1f} s after the stop, {silent:.1f} s after b's earliest last word; "
          f"{stale():.0f} stale reads, "
          f"mean staleness {total / seen:.2f} s over {seen:.0f} reads")


def test_a_second_owner_of_a_key_partition_never_overwrites_the_first(settings, redis_client):
    """Two stages that both think they own a merchant (a rebalance gone wrong): the one whose cached
    version is behind refuses to write, forgets what it cached and starts its loop over; the
    merchant holds each event once."""
    fs = load_feature_set(str(Path(__file__).resolve().parents[1] / "services" / "features" / "payments.toml"))
    topics, codec = Topics(settings.namespace), get_codec()
    store = FeatureStore(redis_client, Keys(settings.namespace), fs, 60)
    k = key_partition("m-0", 6)
    to_vectors = topics.keyed("entity_id", k)  # where the merchant stage of partition k sends its events on
    kafka.ensure_internal_topics(settings, [to_vectors], 6)
    producer = kafka.producer(settings)

    def stage() -> KeyStage:
        s = KeyStage(feature_set=fs, key="merchant", store=store, topics=topics, codec=codec, partitions=6,
                     produce=lambda *vector: None, flush=producer.flush,
                     forward=Forwarder(producer, codec, topics, "entity_id", 6, "features"),
                     idle_wait_s=0.0, hold_s=30.0, cache_entities=10, queue_limit=100, service="features")
        s.assigned([(topics.keyed("merchant", 0), k)], now=0.0)
        for source in range(1, 6):  # the other sources have nothing to say
            s.take(topics.keyed("merchant", source), k, 0,
                   codec.encode("KeyedEvents", {"mark": math.inf, "idle": True, "events": []}), now=0.0)
        return s

    def give(s: KeyStage, offset: int) -> None:
        ev = event(f"e{offset}", "card-1", 1000.0 + offset, merchant="m-0", amount=5.0, hour=1.0, online=0.0)
        s.take(topics.keyed("merchant", 0), k, offset, codec.encode("KeyedEvents", {"mark": ev["ts"], "events": [{
            **ev, "order_ts": ev["ts"], "origin_partition": 0, "origin_offset": offset, "route": [],
            "features": {}}]}), now=0.0)
        s.process(now=0.0, lagging=set())

    first, second = stage(), stage()
    give(first, 0)
    give(second, 1)  # reads what first wrote, writes over it: its version is the newer one now
    with pytest.raises(RestartLoop, match="another worker"):
        give(first, 2)  # first's cached version is behind: it must not write
    sent = read_all(settings, to_vectors, "KeyedEvents", until=lambda r: sum(len(m["events"]) for m in r) >= 2,
                    timeout=10)
    # e2 went on before the refused write (what is sent on is acknowledged before the states that
    # say so are written: docs/features.md, "Idempotent")
    assert len(first.cache) == 0 and [e["event_id"] for m in sent for e in m["events"]] == ["e0", "e1", "e2"]
    after = store.vector("nobody", {"merchant": "m-0"}, 2000.0)
    assert after["merchant_count_1d"] == 2.0  # e0 and e1, once each

"""The pipeline rides out its dependencies' outages: Redis or the Kafka broker is killed (kill -9)
in the middle of a replay and started again OUTAGE_S later (15 s here, TEST_OUTAGE_S to
try longer; 60 s was checked by hand, see docs/operations.md). Nothing restarts the services: they wait
with backoff, say on /ready and /health what is missing, and resume. Afterwards every label is
learned exactly once, no outcome is published twice, the counts add up, and every entity's
feature state and every feature vector equal those of an uninterrupted run of the same stream.

Each test has its own Redis (or broker) on free ports, so killing it touches no other test.
"""

from __future__ import annotations

import os
import threading
import time
import uuid

import httpx
import pytest
import redis as redis_lib
from conftest import make_settings
from confluent_kafka import OFFSET_BEGINNING, TopicPartition

from driftline.features.store import OFFSET_FIELD, PARTITION_FIELD, decode_state
from driftline.infra import stack
from driftline.replay.datasets import load
from driftline.shared import kafka, redis_clients
from driftline.shared.codec import get_codec
from driftline.shared.deps import WaitOutOutage
from driftline.shared.keys import Keys
from driftline.shared.topics import Topics
from pipeline import replay_report

pytestmark = pytest.mark.e2e

OUTAGE_S = float(os.environ.get("TEST_OUTAGE_S", "15"))
ROWS, ENTITIES, LABEL_DELAY = 3000, 6, 20
# The replay (a producer like any) waits for a broker that is away, up to librdkafka's delivery
# timeout (300 s): the same rate for every outage length.
RATE = 200.0
SERVICES = ("ingestion", "features", "learner")
ENV = {"DRIFTLINE_FEATURES__SET": "default", "DRIFTLINE_LEARNER__MODEL": "tree.HoeffdingTreeClassifier()",
       "DRIFTLINE_LEARNER__CHECKPOINT_INTERVAL_S": "2"}


def write_dataset(path):
    """A CSV stream over a few entities, so that the entity states (counts, deltas, EWMs, last
    labels) depend on every event being folded in once and in order."""
    lines = ["x,y,shop,label"]
    for i in range(ROWS):
        x, y = (i * 37) % 101 / 10, (i * 53) % 89 / 10
        lines.append(f"{x:.1f},{y:.1f},shop{i % ENTITIES},{int(x + y > 9)}")
    path.write_text("\n".join(lines) + "\n")
    return load(f"csv:{path}", target="label", entity="shop")


def start(run_service, s):
    procs = [run_service(name, wait=False, settings_override=s, **ENV) for name in SERVICES]
    for p in procs:
        p.wait_healthy(120)
    return procs


def stop(procs) -> None:
    for p in procs:
        p.stop()


def entity_states(s, entities: int = ENTITIES) -> dict[str, dict]:
    client = redis_clients.connect(s.redis_url)  # one node or a cluster
    keys = Keys(s.namespace)
    out = {}
    for i in range(entities):
        state = decode_state(client.hgetall(keys.entity(f"shop{i}")))
        # The offsets differ between two runs when a redelivery put a duplicate into events.valid.
        out[f"shop{i}"] = {k: v for k, v in state.items() if k not in (OFFSET_FIELD, PARTITION_FIELD)}
    client.close()
    return out


def feature_vectors(s) -> dict[str, dict]:
    """row -> its FeatureVector's features but the last-label ones; a vector published twice
    must be the same twice."""
    topic = Topics(s.namespace).features
    c = kafka.consumer(s, f"check-{uuid.uuid4().hex[:8]}")
    parts = kafka.partitions_of(s, topic)
    ends = {tp.partition: c.get_watermark_offsets(tp, timeout=10)[1] for tp in parts}
    c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends if ends[p] > 0])
    todo = {p for p, high in ends.items() if high > 0}
    out: dict[str, dict] = {}
    deadline = time.monotonic() + 60
    while todo and time.monotonic() < deadline:
        m = c.poll(0.5)
        if m is None or m.error():
            continue
        fv = get_codec().decode(m.value(), expect="FeatureVector")
        row = fv["event_id"].rsplit("-", 1)[1]  # event ids are <run id>-<row>
        # Whether an event's vector already knows the label of an event just before it depends on
        # arrival timing (the features service waits a bounded time for labels): not compared.
        features = {k: v for k, v in fv["features"].items() if not k.startswith("_last_label")}
        assert out.setdefault(row, features) == features, fv["event_id"]
        if m.offset() >= ends[m.partition()] - 1:
            todo.discard(m.partition())
    c.close()
    assert not todo
    return out


def check_report(report) -> None:
    assert report["events_sent"] == report["labels_sent"] == ROWS
    assert report["events_valid"] == ROWS and report["events_dlq"] == 0
    # An ingestion replica killed with kill -9 publishes again the inputs whose acknowledgement
    # it had not marked yet (at most ~10 ms' worth, and a batch in flight): at-least-once, bounded.
    assert report["events_valid_copies"] <= RATE * 0.5, report["events_valid_copies"]
    assert report["examples_learned"] == ROWS and report["labels_dlq"] == 0  # each label learned once
    assert report["outcome_duplicates"] == 0


@pytest.fixture
def own_redis(infra, tmp_path):
    """A Redis of this test's own (on the session's broker), so that it may be killed."""
    s = make_settings(infra, tmp_path, redis_url=f"redis://127.0.0.1:{stack.free_port()}/0")
    r = stack.Redis(s)
    r.start()
    wait(r.ready, 20, "redis up")
    kafka.ensure_topics(s)
    yield s, r
    r.stop()


@pytest.fixture
def own_kafka(infra, tmp_path):
    """A Kafka broker of this test's own (with the session's Redis), so that it may be killed."""
    for attempt in range(3):  # the controller's port (the broker's + 1) may be taken meanwhile: new ports
        s = make_settings(infra, tmp_path / f"try{attempt}", kafka_bootstrap=f"127.0.0.1:{stack.free_port()}")
        broker = stack.Kafka(s)
        broker.start()
        deadline = time.monotonic() + 90
        while broker.running() and not broker.ready() and time.monotonic() < deadline:
            time.sleep(0.5)
        if broker.ready():
            break
        broker.stop()
    else:
        pytest.fail(f"no broker of our own:\n{broker.log_tail()}")
    kafka.ensure_topics(s)
    yield s, broker
    broker.stop()


def wait(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.2)
    return result


def kill9(component) -> None:
    import signal

    os.kill(component.pid(), signal.SIGKILL)
    wait(lambda: not component.running(), 10, f"{component.name} dead")


def replay_with_outage(s, dataset, component, services, on_outage=None) -> dict:
    """Replay at RATE; OUTAGE_S of `component` (kill -9, then start again) from a third of the way."""
    result: dict = {}

    def run() -> None:
        try:
            result["report"] = replay_report(s, dataset, label_delay=LABEL_DELAY, rate=RATE,
                                             stall_timeout_s=OUTAGE_S + 90)
        except BaseException as exc:  # re-raised in the test's thread
            result["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    time.sleep(ROWS / RATE / 3)
    kill9(component)
    killed = time.monotonic()
    time.sleep(min(4.0, OUTAGE_S))
    if on_outage:
        on_outage()
    time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - killed)))
    component.start()
    wait(component.ready, 60, f"{component.name} back")
    print(f"{component.name} away {time.monotonic() - killed:.1f} s")
    t.join(OUTAGE_S + 300)
    assert not t.is_alive(), "the replay did not end"
    if "error" in result:
        raise result["error"]
    for p in services:
        assert p.proc.poll() is None, f"{p.name} exited:\n{p.log_tail()}"
    return result["report"]


_REFERENCE: dict[str, tuple[dict, dict]] = {}


def reference_run(run_service, s, dataset) -> tuple[dict, dict]:
    """The entity states and feature vectors of an uninterrupted run (own namespace, same servers),
    made once per session: they depend on the stream alone (that an outage changes nothing of them
    is what the tests check), so every test of this module compares with the same run."""
    if "run" not in _REFERENCE:
        _REFERENCE["run"] = _reference_run(run_service, s, dataset)
    return _REFERENCE["run"]


def _reference_run(run_service, s, dataset) -> tuple[dict, dict]:
    reference = s.model_copy(update={"namespace": f"t{uuid.uuid4().hex[:10]}"})
    kafka.ensure_topics(reference)
    procs = start(run_service, reference)
    # The same rate: the last-label features depend on how labels arrive against events.
    check_report(replay_report(reference, dataset, label_delay=LABEL_DELAY, rate=RATE))
    stop(procs)
    return entity_states(reference), feature_vectors(reference)


def same_features(s, want_states, want_vectors) -> None:
    assert entity_states(s) == want_states
    got = feature_vectors(s)
    differ = {k: {f: (got.get(k, {}).get(f), x) for f, x in v.items() if got.get(k, {}).get(f) != x}
              for k, v in want_vectors.items() if got.get(k) != v}
    assert not differ, (len(differ), list(differ.items())[:3])


def test_the_pipeline_rides_out_a_kafka_outage_with_nothing_lost_or_doubled(own_kafka, run_service, tmp_path):
    s, broker = own_kafka
    dataset = write_dataset(tmp_path / "shops.csv")
    want_states, want_vectors = reference_run(run_service, s, dataset)
    procs = start(run_service, s)

    def while_away() -> None:
        for p in procs:
            health = httpx.get(p.url + "/health", timeout=5).json()
            assert health["worker_alive"], health
        ready = wait(lambda: (r := httpx.get(procs[0].url + "/ready", timeout=5)).status_code == 503 and r, 20,
                     "ingestion /ready says 503")
        assert any(r.startswith("kafka unreachable") for r in ready.json()["reasons"])

    report = replay_with_outage(s, dataset, broker, procs, while_away)
    check_report(report)
    for p in procs:
        assert wait(lambda: httpx.get(p.url + "/ready", timeout=5).status_code == 200, 20, f"{p.name} ready")
    same_features(s, want_states, want_vectors)


def test_the_pipeline_rides_out_a_redis_outage_with_nothing_lost_or_doubled(own_redis, run_service, tmp_path):
    s, redis_server = own_redis
    dataset = write_dataset(tmp_path / "shops.csv")
    want_states, want_vectors = reference_run(run_service, s, dataset)
    procs = start(run_service, s)

    def while_away() -> None:  # every worker says what it misses; none has died
        for p in procs:
            health = httpx.get(p.url + "/health", timeout=5).json()
            assert health["worker_alive"], health
        ready = wait(lambda: (r := httpx.get(procs[1].url + "/ready", timeout=5)).status_code == 503 and r, 20,
                     "features /ready says 503")
        assert any(r.startswith("redis unreachable") for r in ready.json()["reasons"])

    report = replay_with_outage(s, dataset, redis_server, procs, while_away)
    check_report(report)
    for p in procs:
        assert "redis is back after" in p.log_path.read_text(), p.log_tail()
        assert httpx.get(p.url + "/ready", timeout=5).status_code == 200
    same_features(s, want_states, want_vectors)


def answer(url: str) -> httpx.Response | None:
    """The response, or None while nothing listens yet."""
    try:
        return httpx.get(url, timeout=5)
    except httpx.TransportError:
        return None


def test_services_started_while_the_broker_is_down_wait_for_it(own_kafka, run_service, tmp_path):
    """docker compose, a reboot, `serve all` before the broker: every stream service (and the
    prediction service) started while Kafka is down stays up, says so on /ready, and works once
    the broker is back -- a supervisor that restarts it is not needed."""
    s, broker = own_kafka
    dataset = write_dataset(tmp_path / "shops.csv")
    broker.stop()
    procs = [run_service(name, wait=False, settings_override=s, **ENV)
             for name in (*SERVICES, "drift", "prediction")]
    time.sleep(30)  # longer than what a start waits for on its own (12 s for the first swap, 10 s per topic)
    for p in procs:
        assert p.proc.poll() is None, f"{p.name} exited while the broker was down:\n{p.log_tail()}"
        health = wait(lambda: answer(p.url + "/health"), 30, f"{p.name} answers")
        assert health.json().get("worker_alive", True), (p.name, health.json())
    broker.start()
    wait(broker.ready, 90, "broker back")
    for p in procs:
        wait(lambda: (r := answer(p.url + "/ready")) is not None and r.status_code == 200, 60, f"{p.name} ready")
    check_report(replay_report(s, dataset, label_delay=LABEL_DELAY, rate=0, stall_timeout_s=120))
    for p in procs:
        assert p.proc.poll() is None, f"{p.name} exited:\n{p.log_tail()}"


def test_redis_commands_wait_for_redis_to_come_back(own_redis):
    s, redis_server = own_redis
    client = redis_lib.Redis.from_url(s.redis_url, retry=WaitOutOutage(30))
    client.set("k", "v")
    kill9(redis_server)
    threading.Timer(2.0, redis_server.start).start()
    started = time.monotonic()
    assert client.get("k") == b"v"  # written to the AOF before the reply: a kill -9 keeps it
    assert 1.5 < time.monotonic() - started < 20
    client.close()


def publish_rows(s, start: int, stop: int, rate: float) -> None:
    """Events (and their labels LABEL_DELAY rows later) of write_dataset's stream, at `rate`."""
    codec, topics, producer = get_codec(), Topics(s.namespace), kafka.producer(s)
    t0 = time.monotonic()
    for i in range(start, stop):
        x, y = (i * 37) % 101 / 10, (i * 53) % 89 / 10
        event = {"event_id": f"r-{i}", "entity_id": f"shop{i % ENTITIES}", "ts": float(i),
                 "fields": {"x": x, "y": y}, "published_ms": None}
        kafka.produce(producer, topics.events, codec.encode("Event", event), key=event["entity_id"])
        j = i - LABEL_DELAY
        if j >= 0:
            xj, yj = (j * 37) % 101 / 10, (j * 53) % 89 / 10
            label = {"event_id": f"r-{j}", "label": str(int(xj + yj > 9)), "ts": float(i)}
            kafka.produce(producer, topics.labels, codec.encode("Label", label), key=label["event_id"])
        if rate:
            time.sleep(max(0.0, t0 + (i - start + 1) / rate - time.monotonic()))
    assert producer.flush(30) == 0


def features_run(run_service, s, lose_writes=None) -> None:
    """Ingestion and features on `s`, the stream published at RATE; `lose_writes(redis_dir)` runs
    a third of the way in."""
    procs = [run_service(name, wait=False, settings_override=s, **ENV) for name in ("ingestion", "features")]
    for p in procs:
        p.wait_healthy(120)
    third = ROWS // 3
    publish_rows(s, 0, third, RATE)
    if lose_writes:
        lose_writes()
    publish_rows(s, ROWS // 2 if lose_writes else third, ROWS, RATE)
    wait(lambda: len(feature_vectors(s)) == ROWS, 120, "every event's vector")
    return procs


def test_features_rebuild_the_entity_states_that_a_redis_crash_lost_from_kafka(own_redis, run_service, tmp_path):
    """Redis is killed and comes back with an older append-only file than it had: the writes of
    the last seconds are gone (what a machine crash does to `appendfsync everysec`, or a restore
    from a backup). The features service sees that its applied offsets are behind what it
    committed to Kafka, re-reads those records and rebuilds the entity states: they end equal to
    an uninterrupted run's, and every re-published vector equals the first one."""
    import shutil

    s, redis_server = own_redis
    reference = s.model_copy(update={"namespace": f"t{uuid.uuid4().hex[:10]}"})
    kafka.ensure_topics(reference)
    for p in features_run(run_service, reference):
        p.stop()
    want_states, want_vectors = entity_states(reference), feature_vectors(reference)

    aof = redis_server.dir / "appendonlydir"
    saved = tmp_path / "aof-before"

    def lose_writes() -> None:
        shutil.copytree(aof, saved)
        publish_rows(s, ROWS // 3, ROWS // 2, RATE)  # these rows' effects are then lost...
        time.sleep(3)  # ...after the features service applied and committed them
        kill9(redis_server)
        shutil.rmtree(aof)
        shutil.copytree(saved, aof)
        redis_server.start()
        wait(redis_server.ready, 30, "redis back")

    procs = features_run(run_service, s, lose_writes)
    features = procs[1]
    assert "features state in Redis is behind Kafka" in features.log_path.read_text(), features.log_tail()
    wait(lambda: entity_states(s) == want_states, 60, "the entity states rebuilt")
    assert httpx.get(features.url + "/health", timeout=5).json()["rebuilds"] >= 1
    same_features(s, want_states, want_vectors)


def test_replicas_added_and_killed_mid_stream_lose_nothing_and_count_nothing_twice(own_redis, run_service, tmp_path):
    """Two ingestion and two features replicas in their consumer groups; mid-stream a third
    features replica joins, then one is killed with kill -9, then a third ingestion replica joins
    and one of the first two is killed with kill -9. The rebalances move partitions between live
    replicas (the stream topics have 6): every label is learned once, and the feature states and
    vectors equal a single-replica run's (a batch an ingestion replica published twice as it died
    is folded once by the features service)."""
    s, _redis = own_redis
    dataset = write_dataset(tmp_path / "shops.csv")
    want_states, want_vectors = reference_run(run_service, s, dataset)

    def replica(name: str):
        ports = s.ports.model_copy(update={name: stack.free_port()})
        return run_service(name, wait=False, settings_override=s.model_copy(update={"ports": ports}), **ENV)

    procs = start(run_service, s) + [replica("ingestion"), replica("features")]
    for p in procs:
        p.wait_healthy(120)
    result: dict = {}

    def run() -> None:
        try:
            result["report"] = replay_report(s, dataset, label_delay=LABEL_DELAY, rate=RATE, stall_timeout_s=120)
        except BaseException as exc:
            result["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    step = ROWS / RATE / 4
    time.sleep(step)
    procs.append(replica("features"))
    time.sleep(step)
    procs[1].kill9()  # the first features replica
    time.sleep(step)
    procs.append(replica("ingestion"))
    time.sleep(step / 2)
    procs[0].kill9()  # the first ingestion replica
    t.join(300)
    assert not t.is_alive() and "error" not in result, result.get("error")
    check_report(result["report"])
    same_features(s, want_states, want_vectors)


def test_a_standby_learner_takes_over_from_a_killed_one_without_skipping_or_doubling_a_label(
        own_redis, run_service, tmp_path):
    """Two learners: one active (the lease holder), one standby. The active one is killed with
    kill -9 mid-stream; the standby takes over from the last checkpoint once the lease runs out
    (lease_ttl_s, 5 s). The takeover time is printed; every label is learned exactly once."""
    s, _redis = own_redis
    dataset = write_dataset(tmp_path / "shops.csv")
    procs = start(run_service, s)
    active = procs[2]
    # /health answers before the worker has taken the lease: a standby started in between could take it first.
    wait(lambda: httpx.get(active.url + "/health", timeout=5).json()["state"] == "active", 30,
         "the first learner's lease")
    ports = s.ports.model_copy(update={"learner": stack.free_port()})
    standby = run_service("learner", settings_override=s.model_copy(update={"ports": ports}), **ENV)
    assert httpx.get(active.url + "/health", timeout=5).json()["state"] == "active"
    assert httpx.get(standby.url + "/health", timeout=5).json()["state"] == "standby"
    result: dict = {}

    def run() -> None:
        try:
            result["report"] = replay_report(s, dataset, label_delay=LABEL_DELAY, rate=RATE, stall_timeout_s=120)
        except BaseException as exc:
            result["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    time.sleep(ROWS / RATE / 2)
    active.kill9()
    killed = time.monotonic()
    wait(lambda: httpx.get(standby.url + "/health", timeout=5).json()["state"] == "active", 60, "takeover")
    takeover = time.monotonic() - killed
    print(f"standby learner active {takeover:.1f} s after the active one was killed")
    t.join(300)
    assert not t.is_alive() and "error" not in result, result.get("error")
    check_report(result["report"])
    assert takeover < 15



def test_an_idle_service_retries_a_refused_commit_until_its_group_has_committed_to_the_end(settings):
    """The commit of a service's last records is refused (as librdkafka does while the group
    coordinator is away: _WAIT_COORD), the partitions stay its own, and nothing comes after: no
    next commit covers those records and no rebalance has them read again. The idle loop retries
    the commit with backoff until the group's committed offsets reach what it processed (the
    learner reads them to know that nothing is on its way; lag tools too). The refusal is
    injected: a broker killed and restarted takes longer than the group's session, so there the
    partitions are reassigned and read again, which hides the gap (checked by hand)."""
    from confluent_kafka import KafkaError, KafkaException

    from driftline.shared.loop import StreamWorker

    topics, n, refusals = Topics(settings.namespace), 30, 3
    producer = kafka.producer(settings)
    for i in range(n):
        kafka.produce(producer, topics.events, b"x", key=f"k{i}")
    assert producer.flush(30) == 0
    seen, attempts = [], []

    class Idle(StreamWorker):
        service = "commit-retry"

        def input_topics(self) -> list[str]:
            return [topics.events]

        def handle(self, messages) -> None:
            seen.extend(m.offset() for m in messages)

        def commit(self) -> None:
            if len(seen) >= n and len(attempts) < refusals:
                attempts.append(time.monotonic())
                raise KafkaException(KafkaError(KafkaError._WAIT_COORD, "Commit failed: Local: Waiting for coordinator"))
            super().commit()

    group = kafka.consumer(settings, topics.group("commit-retry"))  # never subscribes: reads the commits
    ends = {tp.partition: high for tp in kafka.partitions_of(settings, topics.events)
            if (high := group.get_watermark_offsets(tp, timeout=10)[1]) > 0}

    def committed_to_the_end() -> bool:
        try:
            got = group.committed([TopicPartition(topics.events, p) for p in ends], timeout=10)
        except KafkaException:  # the group's coordinator not found yet (NOT_COORDINATOR): ask again
            return False
        return all(tp.offset == ends[tp.partition] for tp in got)

    worker = Idle(settings)
    worker.start()
    try:
        wait(committed_to_the_end, 30, "the group committed to the end")
        assert len(attempts) == refusals and len(seen) == n  # refused, retried; nothing read twice
        assert all(b - a >= 0.04 for a, b in zip(attempts, attempts[1:]))  # with backoff, no busy loop
        assert worker.alive and worker.commits.owed is False
    finally:
        worker.stop()
        group.close()

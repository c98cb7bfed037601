"""`replay()`: publish a dataset as events plus delayed labels through Kafka, wait until the
running pipeline has accounted for every label, and write the report.

    report = replay(settings, load("elec2"), limit=5000, label_delay=100, report_dir=Path("reports/x"))
    report["prequential"]["accuracy"]

The replay talks to the pipeline only through its public doors: Avro `Event`s on `events`
(key = entity id) and `Label`s on `labels` (key = event id), exactly what a producer would send.
It then reads the pipeline's answers: `outcomes` (role champion), `events.dlq`, `labels.dlq`,
`events.valid` (to count valid events), `drift.events` and `model.swaps`, from the offsets they
had when the replay began. It never reads or writes a service's state, and it never starts one.

Ids: event i of a replay is `<run id>-<i>` and its entity `<run id>/<entity>`, so that replays into
one namespace never share entity state or collide in ingestion's de-duplication.

Time: event i has ts = START + i seconds (a `timed` dataset's rows carry their own: START + their
offset); the label of event i is published right after event i+N (N = label delay) with ts =
ts(i+N) + 1 ms (less when the next event is closer), so the features service's ordered merge
applies it after event i+N's vector and before event i+N+1's.

Fields that name other entities (`Dataset.keys`: a merchant) get the run id as their entity ids do.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_END, Consumer, KafkaException, TopicPartition

from ..shared import kafka
from ..shared.codec import DecodeError, get_codec
from ..shared.schema_registry import prepare_output
from ..shared.settings import Settings
from ..shared.topics import Topics
from .datasets import Dataset

START_TS = 1_700_000_000.0  # a fixed past instant: reports and features are reproducible
STEP_S = 1.0
LABEL_EPSILON_S = 1e-3
PIPELINE = ("ingestion", "features", "learner")  # what a replay needs; drift is optional
# A published message waits this long for a broker that is away before it counts as undeliverable
# (librdkafka's own default, made explicit): the replay rides out an outage as the services do.
DELIVERY_TIMEOUT_S = 300.0
log = logging.getLogger(__name__)


class ReplayStalled(RuntimeError):
    """The pipeline stopped accounting for labels before every one came back; the message says
    what is missing and which service looks stuck."""


def event_ts(i: int) -> float:
    return START_TS + i * STEP_S


def label_ts(i: int, delay: int) -> float:
    return event_ts(i + delay) + LABEL_EPSILON_S


def schedule(n: int, delay: int) -> Iterator[tuple[str, int]]:
    """The publication order: ("event", i) then, right after event i+delay, ("label", i); the
    labels of the last `delay` events follow the last event.

    >>> list(schedule(3, 1))
    [('event', 0), ('event', 1), ('label', 0), ('event', 2), ('label', 1), ('label', 2)]
    """
    for i in range(n):
        yield "event", i
        if i - delay >= 0:
            yield "label", i - delay
    for j in range(max(n - delay, 0), n):
        yield "label", j


@dataclass
class Collected:
    """What the pipeline answered, as the collector thread saw it."""

    outcomes: list[dict] = field(default_factory=list)
    challenger_outcomes: int = 0
    labels_dlq: list[dict] = field(default_factory=list)
    events_dlq: list[dict] = field(default_factory=list)
    events_valid: set[str] = field(default_factory=set)  # ids seen on events.valid (a copy counts once)
    events_valid_raw: list[bytes] = field(default_factory=list)  # read, decoded after the run (count_valid)
    outcomes_raw: list[tuple[bytes, int]] = field(default_factory=list)  # this run's (value, broker ms), not decoded yet
    events_valid_copies: int = 0  # messages beyond the first per id: at-least-once after an ingestion crash
    drift: list[dict] = field(default_factory=list)
    swaps: list[dict] = field(default_factory=list)
    accounted: set[str] = field(default_factory=set)  # event ids whose label is learned or dead
    learned_at_s: list[float] = field(default_factory=list)  # broker time of each champion outcome
    last_progress: float = field(default_factory=time.monotonic)

    @property
    def last_learned_s(self) -> float | None:
        return self.learned_at_s[-1] if self.learned_at_s else None


class Collector(threading.Thread):
    """Reads the pipeline's output topics from where they stood before the replay, keeping only
    this replay's records (its event ids share the run prefix)."""

    def __init__(self, settings: Settings, run_prefix: str, entity_prefix: str = "") -> None:
        super().__init__(name="replay-collector", daemon=True)
        self.settings = settings
        self.topics = Topics(settings.namespace)
        self.prefix = run_prefix
        self.entity_prefix = entity_prefix.encode()  # outcome keys (entity ids) of this run start with it
        prepare_output(settings)  # outcomes in the Confluent wire format, when the settings say so
        self.codec = get_codec()
        self.data = Collected()
        self.lock = threading.Lock()
        self._halt = threading.Event()
        self.error: BaseException | None = None
        self.consumer: Consumer = kafka.consumer(settings, f"driftline.replay.{uuid.uuid4().hex[:8]}")
        t = self.topics
        self.handlers = {
            t.outcomes: self._outcome, t.labels_dlq: self._label_dlq, t.events_dlq: self._event_dlq,
            t.events_valid: self._event_valid, t.drift_events: self._drift, t.model_swaps: self._swap,
        }
        # Pin the start now (before anything is published): the high watermark of every partition.
        parts = []
        for topic in self.handlers:
            for tp in kafka.partitions_of(settings, topic):
                _low, high = self.consumer.get_watermark_offsets(tp, timeout=10)
                parts.append(TopicPartition(topic, tp.partition, high if high >= 0 else OFFSET_END))
        self.consumer.assign(parts)

    def run(self) -> None:
        try:
            while not self._halt.is_set():
                for msg in self.consumer.consume(1000, 0.2):
                    if msg.error():
                        continue
                    self.handlers[msg.topic()](msg)
        except BaseException as exc:  # surfaced by the waiting thread
            self.error = exc
        finally:
            self.consumer.close()

    def stop(self) -> None:
        self._halt.set()
        self.join(10)

    def snapshot(self) -> Collected:
        with self.lock:
            return self.data

    # -- one small handler per topic ---------------------------------------------------------
    def _mine(self, event_id: str | None) -> bool:
        return bool(event_id) and event_id.startswith(self.prefix)

    def _decode(self, blob: bytes, expect: str) -> dict | None:
        try:
            return self.codec.decode(blob, expect=expect)
        except DecodeError:
            return None

    def progress(self) -> tuple[int, int]:
        """(labels accounted for, outcomes read and not decoded yet: challengers' among them)."""
        with self.lock:
            return len(self.data.accounted), len(self.data.outcomes_raw)

    def _outcome(self, msg) -> None:
        # Kept as bytes, decoded when the count may be complete (decode_outcomes): decoding each
        # outcome as it came (~37 µs) took CPU from the pipeline the replay measures.
        key = msg.key()
        if not key or not key.startswith(self.entity_prefix):
            return
        with self.lock:
            self.data.outcomes_raw.append((msg.value(), msg.timestamp()[1]))
            self.data.last_progress = time.monotonic()

    def decode_outcomes(self) -> None:
        """Decode the outcomes read so far: champion ones are learned labels, in arrival order."""
        with self.lock:
            raw, self.data.outcomes_raw = self.data.outcomes_raw, []
        for value, broker_ms in raw:
            o = self._decode(value, "Outcome")
            if not o or not self._mine(o["event_id"]):
                continue
            with self.lock:
                if o["role"] != "champion":
                    self.data.challenger_outcomes += 1
                    continue
                self.data.outcomes.append(o)
                self.data.accounted.add(o["event_id"])
                self.data.learned_at_s.append(broker_ms / 1000.0)

    def _dead_id(self, msg, record: str) -> tuple[dict | None, str | None]:
        dl = self._decode(msg.value(), "DeadLetter")
        if dl is None:
            return None, None
        original = self._decode(dl["payload"], record)
        event_id = original["event_id"] if original else None
        if event_id is None and record == "Label" and dl.get("key"):
            event_id = bytes(dl["key"]).decode(errors="replace")
        return dl, event_id

    def _label_dlq(self, msg) -> None:
        dl, event_id = self._dead_id(msg, "Label")
        if dl is None or not self._mine(event_id):
            return
        with self.lock:
            self.data.labels_dlq.append({"event_id": event_id, "reason": dl["reason"], "detail": dl["detail"],
                                         "service": dl["service"]})
            self.data.accounted.add(event_id)
            self.data.last_progress = time.monotonic()

    def _event_dlq(self, msg) -> None:
        dl, event_id = self._dead_id(msg, "Event")
        if dl is None or not self._mine(event_id):
            return
        with self.lock:
            self.data.events_dlq.append({"event_id": event_id, "reason": dl["reason"], "detail": dl["detail"],
                                         "service": dl["service"]})
            # Its label can never be learned: count it as accounted for now rather than wait for
            # the learner's grace period to dead-letter it too.
            self.data.accounted.add(event_id)
            self.data.last_progress = time.monotonic()

    def _event_valid(self, msg) -> None:
        # Kept as bytes and decoded once the run is over: nothing waits on this count, and decoding
        # every valid event while the pipeline runs took CPU from it (a bench on 2 cores).
        with self.lock:
            self.data.events_valid_raw.append(msg.value())

    def count_valid(self) -> None:
        """The distinct valid events of this replay, and the copies beyond the first (after stop())."""
        data = self.data
        for blob in data.events_valid_raw:
            event = self._decode(blob, "Event")
            if not event or not self._mine(event["event_id"]):
                continue
            event_id = event["event_id"]
            if event_id in data.events_valid:
                data.events_valid_copies += 1
            else:
                data.events_valid.add(event_id)
        data.events_valid_raw = []

    def _drift(self, msg) -> None:
        d = self._decode(msg.value(), "DriftEvent")
        if d:
            with self.lock:
                self.data.drift.append(d)

    def _swap(self, msg) -> None:
        s = self._decode(msg.value(), "ModelSwap")
        if s:
            with self.lock:
                self.data.swaps.append(s)


class RateLimiter:
    """At most `rate` events per second on average (0 = as fast as it goes)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.t0 = time.monotonic()

    def wait(self, i: int) -> None:
        if self.rate <= 0:
            return
        ahead = self.t0 + i / self.rate - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)


def replay(
    settings: Settings,
    dataset: Dataset,
    *,
    limit: int | None = None,
    rate: float = 0.0,
    label_delay: int = 0,
    model: str | None = None,
    features: str | None = None,
    report_dir: Path | None = Path("reports/replay"),
    stall_timeout_s: float = 60.0,
    progress: bool = True,
    console=None,
    keep_outcomes: bool = False,
) -> dict[str, Any]:
    """Publish, wait for every label to be accounted for, build (and write) the report.
    With `keep_outcomes`, `report["_outcomes"]` holds the champion outcomes as they came
    (tests use it to prove nothing was learned twice) and `report["_learned_at_s"]` when each
    came, in seconds after the first event was published (the bench's timeline); neither is
    written to report.json.

    Raises ReplayStalled when nothing new comes back for `stall_timeout_s` seconds while labels
    are still missing."""
    from rich.console import Console

    from .plot import plot_report
    from .report import build_report, summary_table, write_report

    console = console or Console(stderr=True)
    if label_delay < 0:
        raise ValueError("--label-delay must be >= 0")
    kafka.ensure_topics(settings)
    run_id = uuid.uuid4().hex[:8]
    rows = list(_take(dataset.rows(), limit))
    n = len(rows)
    expected_model = model or settings.learner.model
    expected_features = features or settings.features.set

    collector = Collector(settings, f"{run_id}-", f"{run_id}/")
    collector.start()
    try:
        with _progress(console, progress) as bar:
            sent_task = bar.add_task("publish", total=n)
            learned_task = bar.add_task("learned", total=n)
            events_sent, labels_sent, t_first = _publish(settings, rows, run_id, label_delay, rate, collector, bar,
                                                         sent_task, learned_task, times=times_of(dataset, rows),
                                                         keys=dataset.keys)
            publish_s = time.time() - (t_first or time.time())
            with collector.lock:  # the stall clock starts when publishing ends
                collector.data.last_progress = max(collector.data.last_progress, time.monotonic())
            _wait_accounted(settings, collector, labels_sent, stall_timeout_s, bar, learned_task)
            _wait_for_drift_service(settings, collector)
    finally:
        collector.stop()  # also on Ctrl-C: no thread left polling a broker that goes away
    collector.decode_outcomes()
    collector.count_valid()
    data = collector.data
    meta = {
        "dataset": dataset.name, "dataset_size": dataset.size, "drift_positions": list(dataset.drift_positions),
        "drift_width": dataset.drift_width, "events_sent": events_sent, "events_valid": len(data.events_valid),
        "events_valid_copies": data.events_valid_copies,
        "labels_sent": labels_sent, "label_delay": label_delay, "model_spec": expected_model,
        "features": expected_features, "rate": rate, "namespace": settings.namespace, "run_id": run_id,
        "t_first_published": t_first, "t_last_learned": data.last_learned_s, "publish_s": round(publish_s, 3),
        "started_at": t_first,
        "checks": check_pipeline(settings, expected_model, expected_features, data.outcomes, console),
    }
    # The report names what actually ran, when the registry knows it.
    if meta["checks"].get("model_matches") is False:
        meta["model_spec"] = meta["checks"]["learner_model"]
    report = build_report(meta, data.outcomes, drift=data.drift, swaps=data.swaps, events_dlq=data.events_dlq,
                          labels_dlq=data.labels_dlq, window=settings.learner.window)
    if report_dir is not None:
        path = write_report(report, report_dir)
        plot_report(report, Path(report_dir) / "report.png")
        report["_paths"] = {"json": str(path), "png": str(Path(report_dir) / "report.png")}
    if keep_outcomes:
        report["_outcomes"] = list(data.outcomes)
        report["_learned_at_s"] = [t - t_first for t in data.learned_at_s] if t_first is not None else []
    if progress:
        console.print(summary_table(report))
        if report_dir is not None:
            console.print(f"[green]wrote[/] {report['_paths']['json']} and {report['_paths']['png']}")
    return report


def times_of(dataset: Dataset, rows: list) -> list[float]:
    """Each row's event time: its own for a timed dataset, else one second apart.

    >>> from .datasets import Dataset
    >>> times_of(Dataset("t", list, 2, timed=True), [({}, "0", "a", 0.5), ({}, "1", "a", 2.0)])
    [1700000000.5, 1700000002.0]
    """
    if dataset.timed:
        return [START_TS + row[3] for row in rows]
    return [event_ts(i) for i in range(len(rows))]


def label_time(times: list[float], i: int, delay: int) -> float:
    """The label of event i: just after event i+delay (before the next one); past the last
    event, a second apart as if the stream went on.

    >>> round(label_time([0.0, 10.0, 10.0005], 0, 1), 6), label_time([0.0, 1.0], 1, 2)
    (10.00025, 3.001)
    """
    j = i + delay
    if j >= len(times):
        return times[-1] + (j - len(times) + 1) * STEP_S + LABEL_EPSILON_S
    gap = times[j + 1] - times[j] if j + 1 < len(times) else STEP_S
    return times[j] + min(LABEL_EPSILON_S, gap / 2 if gap > 0 else LABEL_EPSILON_S)


def _publish(settings: Settings, rows: list, run_id: str, label_delay: int, rate: float, collector: Collector,
             bar, sent_task, learned_task, times: list[float] | None = None,
             keys: tuple[str, ...] = ()) -> tuple[int, int, float | None]:
    """Events and labels in `schedule` order through the `events` and `labels` doors."""
    times = times if times is not None else [event_ts(i) for i in range(len(rows))]
    topics = Topics(settings.namespace)
    codec = get_codec()
    producer = kafka.producer(settings, **{"message.timeout.ms": int(DELIVERY_TIMEOUT_S * 1000)})
    failed: list = []  # delivery errors (librdkafka gave up on a message)

    def delivered(err, _msg) -> None:
        if err is not None:
            failed.append(err)

    limiter = RateLimiter(rate)
    prefix = f"{run_id}-"
    # Encoded before the first is published: a producer's own work is not the pipeline's, and on
    # the pipeline's cores (a bench) it would take their CPU while they are measured.
    encode_task = bar.add_task("encode", total=len(rows))
    messages = []
    for kind, i in schedule(len(rows), label_delay):
        fields, label, entity = rows[i][:3]
        entity = f"{run_id}/{entity}"  # each replay's entities start with a fresh state
        if kind == "event":
            if keys:  # and so do the other entities its fields name
                fields = {k: f"{run_id}/{v}" if k in keys and isinstance(v, str) else v for k, v in fields.items()}
            messages.append((i, topics.events, entity, codec.encode("Event", {
                "event_id": f"{prefix}{i}", "entity_id": entity, "ts": times[i], "fields": fields,
                "published_ms": None})))
            if i % 1000 == 0:
                bar.update(encode_task, completed=i)
        else:
            messages.append((None, topics.labels, f"{prefix}{i}", codec.encode("Label", {
                "event_id": f"{prefix}{i}", "label": label, "ts": label_time(times, i, label_delay)})))
    bar.update(encode_task, completed=len(rows))
    t_first = None
    events_sent = labels_sent = 0
    for i, topic, key, value in messages:
        if i is not None:  # an event
            limiter.wait(i)
            if t_first is None:
                t_first = time.time()
        kafka.produce(producer, topic, value, key=key, on_delivery=delivered)
        if i is not None:
            events_sent += 1
        else:
            labels_sent += 1
        if (events_sent + labels_sent) % 500 == 0:
            producer.poll(0)
            bar.update(sent_task, completed=events_sent)
            bar.update(learned_task, completed=sum(collector.progress()))
    remaining = wait_delivered(producer)
    if remaining or failed:
        raise ReplayStalled(f"{remaining + len(failed)} messages could not be delivered to Kafka at "
                            f"{settings.kafka_bootstrap}" + (f", e.g. {failed[0]}" if failed else ""))
    bar.update(sent_task, completed=events_sent)
    return events_sent, labels_sent, t_first


def wait_delivered(producer, timeout_s: float | None = None) -> int:
    """Wait until Kafka has taken every message the producer holds, however long the broker is
    away: librdkafka retries them by itself until their delivery timeout (DELIVERY_TIMEOUT_S),
    then reports them failed; either way the queue empties by then. Says once that it waits.
    Returns how many are still held when `timeout_s` (default: the delivery timeout and a
    margin) is over."""
    started = time.monotonic()
    deadline = started + (DELIVERY_TIMEOUT_S + 30 if timeout_s is None else timeout_s)
    said = False
    while (remaining := producer.flush(1.0)) and time.monotonic() < deadline:
        if not said and time.monotonic() - started >= 5:
            said = True
            log.warning("replay: Kafka has not taken %d messages after %.0f s (is the broker away?); waiting up "
                        "to %.0f s for it", remaining, time.monotonic() - started, deadline - started)
    if said and not remaining:
        log.warning("replay: Kafka took every message after %.0f s", time.monotonic() - started)
    return remaining


def _take(rows: Iterator, limit: int | None):
    for i, row in enumerate(rows):
        if limit is not None and i >= limit:
            return
        yield row


def _progress(console, enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description:>8}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, disable=not enabled)


def _wait_accounted(settings, collector: Collector, labels_sent: int, stall_timeout_s: float, bar, task) -> None:
    while True:
        if collector.error is not None:
            raise RuntimeError(f"the replay's collector failed: {collector.error!r}") from collector.error
        done, pending = collector.progress()
        with collector.lock:
            idle = time.monotonic() - collector.data.last_progress
        if done + pending >= labels_sent or idle > stall_timeout_s:  # may be complete: count for real
            collector.decode_outcomes()
            done, pending = collector.progress()
        bar.update(task, completed=min(labels_sent, done + pending))  # pending: challengers' too
        if done >= labels_sent:
            return
        if idle > stall_timeout_s:
            with collector.lock:
                accounted = set(collector.data.accounted)
            raise ReplayStalled(diagnose(settings, collector.prefix, labels_sent, accounted, idle))
        time.sleep(0.1)


def _wait_for_drift_service(settings: Settings, collector: Collector, timeout_s: float = 10.0) -> None:
    """Give a running drift service the moment it needs to read the last outcomes, so that its
    events make the report; a drift service that is not there is not waited for."""
    topics = Topics(settings.namespace)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        lag = group_lag(settings, topics.group("drift"), [topics.outcomes])
        if lag is None or lag == 0:
            break
        time.sleep(0.2)
    time.sleep(0.3)  # its last drift event / swap is produced after it commits its input


def group_lag(settings: Settings, group: str, topic_names: list[str]) -> int | None:
    """Messages a consumer group has not committed on these topics; None if it never committed."""
    c = kafka.consumer(settings, group)
    try:
        parts = [tp for t in topic_names for tp in kafka.partitions_of(settings, t)]
        committed = c.committed(parts, timeout=5)
        if all(tp.offset < 0 for tp in committed):
            return None
        lag = 0
        for tp in committed:
            _low, high = c.get_watermark_offsets(tp, timeout=5)
            lag += max(0, high - max(tp.offset, 0))
        return lag
    except KafkaException:
        return None
    finally:
        c.close()


def diagnose(settings: Settings, prefix: str, labels_sent: int, accounted: set[str], idle_s: float) -> str:
    """Say what is missing and which service looks stuck: who does not answer /health, whose
    consumer group has a backlog (or never consumed)."""
    import httpx

    missing = sorted((i for i in range(labels_sent) if f"{prefix}{i}" not in accounted))
    topics = Topics(settings.namespace)
    lines = [
        f"the pipeline stalled: {len(missing):,} of {labels_sent:,} labels were neither learned nor dead-lettered "
        f"after {idle_s:.0f} s without progress (first missing: event ids "
        f"{', '.join(f'{prefix}{i}' for i in missing[:5])}).",
    ]
    inputs = {
        "ingestion": [topics.events, topics.labels],
        "features": [topics.events_valid, topics.labels_valid],
        "learner": [topics.features, topics.labels_valid],
    }
    suspects = []
    for service in PIPELINE:
        url = f"http://{settings.host}:{settings.port_of(service)}/health"
        try:
            answer = httpx.get(url, timeout=2.0)
            ok = answer.status_code == 200
            health = "healthy" if ok else f"unhealthy (GET /health -> {answer.status_code})"
            body = answer.json() if answer.headers.get("content-type", "").startswith("application/json") else {}
            # The learner's own account: active or standby, where it is, what it holds back.
            said = {k: body[k] for k in ("state", "position", "waiting_labels", "held_events") if k in body}
            if said:
                health += f" ({', '.join(f'{k} {v}' for k, v in said.items())})"
        except (httpx.HTTPError, ValueError):
            ok, health = False, f"not answering on {url}"
        lag = group_lag(settings, topics.group(service), inputs[service])
        backlog = ("no committed offsets on its input topics" if lag is None else f"{lag:,} messages behind on "
                   f"{', '.join(topics.base(t) for t in inputs[service])}")
        lines.append(f"  {service:<10} {health}; {backlog}")
        if not ok or lag:
            suspects.append(service)
    if suspects:
        lines.append(f"looks stuck: {suspects[0]} (see its log; `driftline serve {suspects[0]}` runs it).")
    return "\n".join(lines)


def check_pipeline(settings: Settings, model: str, features: str, outcomes: list[dict], console) -> dict[str, Any]:
    """`--model` and `--features` cannot change running services: compare them with what the
    learner's champion was built from (registry) and what the features service computed (the
    snapshot of an event of this replay), and warn when they differ."""
    from ..features.definitions import load_feature_set
    from ..features.store import Snapshots
    from ..shared import redis_clients
    from ..shared.keys import Keys
    from ..shared.registry import ModelRegistry

    checks: dict[str, Any] = {}
    client = redis_clients.connect(settings.redis_url)
    keys = Keys(settings.namespace)
    try:
        registry = ModelRegistry(client, keys, settings.learner.model_name, settings.model_key.get_secret_value().encode())
        champion = registry.champion()
        running = registry.meta(champion).get("spec") if champion is not None else None
        checks["learner_model"] = running
        checks["model_matches"] = None if running is None else _same_spec(running, model)
    except Exception as exc:  # a report is still worth writing
        checks["learner_model"] = f"unknown ({exc.__class__.__name__})"
        checks["model_matches"] = None
    try:
        wanted = load_feature_set(features).name
        running = None
        for o in outcomes[:1]:
            fv = Snapshots(client, keys, service="replay").read_vectors([o["event_id"]]).get(o["event_id"])
            running = fv["feature_set"] if fv else None
        checks["features_running"] = running
        checks["features_match"] = None if running is None else running == wanted
    except Exception as exc:
        checks["features_running"] = f"unknown ({exc.__class__.__name__})"
        checks["features_match"] = None
    finally:
        client.close()
    if checks.get("model_matches") is False:
        console.print(f"[yellow]warning:[/] the learner runs {checks['learner_model']!r}, not {model!r}; "
                      "restart it with DRIFTLINE_LEARNER__MODEL to replay another model")
    if checks.get("features_match") is False:
        console.print(f"[yellow]warning:[/] the features service computes {checks['features_running']!r}, not "
                      f"{features!r}; restart it with DRIFTLINE_FEATURES__SET")
    return checks


def _same_spec(a: str, b: str) -> bool:
    return "".join(a.split()) == "".join(b.split())

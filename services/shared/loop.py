"""The stream services' consume loop: one worker thread per service.

    worker = MyWorker(settings)                  # a StreamWorker subclass: handle(batch)
    app = service_app("features", worker=worker) # app.py: /health, /ready, /metrics
    run_app(app, settings.ports.features, settings)   # process.py

The loop is the same everywhere: consume a batch -> handle it (decode, do the one thing, encode,
produce) -> settle it through the worker's commit policy (commits.py: Kafka's offsets once the
outputs are acknowledged, or the learner's own checkpoint). A worker that dies makes /health
answer 503, so a supervisor restarts the process; input never crashes it (bad input is the DLQ's
business).
"""

from __future__ import annotations

import gc
import logging
import math
import time
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from . import kafka, metrics
from .commits import CheckpointCommits, OffsetCommits
from .deps import DEPS
from .kafka import base_topic
from .schema_registry import prepare_output
from .settings import Settings
from .threads import BackgroundThread
from .topics import Topics

log = logging.getLogger(__name__)


class RestartLoop(Exception):
    """Raised by a worker to start its loop over in this process (a new consumer, from the
    committed offsets), as a process restart would but without one."""


# The cyclic collector's thresholds for a stream worker's process: every message makes short-lived
# dicts, and what a worker holds between batches (states, scored events waiting for labels) is
# much. At Python's (700, 10, 10), collections took ~19 µs per event of `bench features` (py-spy
# puts them on whatever allocated), and 2-5% of the learner's, ingestion's and the offline sink's
# CPU in a `serve all` replay (gc.callbacks); at these, ~3 µs and 0-0.4%. Garbage is still freed by
# reference counting at once; only cycles wait longer.
GC_THRESHOLDS = (20_000, 50, 100)


class StreamWorker(BackgroundThread):
    """Base of the stream services' consume loops. Subclasses set `service` and implement
    `input_topics()` and `handle(messages)`; `tick()` runs between batches for timers."""

    service = "worker"
    batch_size = 1000
    poll_timeout_s = 0.2
    lag_every_s = 5.0
    # 0: wait for the broker and commit after every batch. More: keep consuming while the batches
    # handled since the last commit are acknowledged (see the module's docstring).
    commit_interval_s = 0.0
    consumer_config: dict[str, Any] = {}  # librdkafka settings of this worker's consumer
    stop_timeout_s = 15.0

    def __init__(self, settings: Settings, commits: OffsetCommits | CheckpointCommits | None = None) -> None:
        super().__init__()
        gc.set_threshold(*GC_THRESHOLDS)
        self.settings = settings
        self.topics = Topics(settings.namespace)
        self.producer: Producer = kafka.producer(settings)
        self.consumer: Consumer | None = None
        self.error: BaseException | None = None
        self.started_at = time.time()
        self.batches = 0
        self._last_lag = 0.0
        self._sent: dict[str, Any] = {}  # topic -> its MESSAGES_OUT child (labels() cost ~1 µs a message)
        self._error_logged: dict[int, float] = {}
        self._last_probe = 0.0
        self.kafka_answered_at = time.monotonic()  # when Kafka last answered (a commit or a probe)
        self.commits = commits or OffsetCommits(self)  # how what was handled becomes durable (commits.py)
        self.unsettled_since: float | None = None  # when the oldest batch not yet committed was handled
        # (topic, partition) -> the latest event time handled there: committed with the offset
        # (kafka.event_time_metadata), so the next service knows how far this one has got.
        self.event_times: dict[tuple[str, int], float] = {}
        metrics.start_at_zero(self.service, settings)
        prepare_output(settings)  # output topics in the Confluent wire format: their registry ids

    # -- to implement ----------------------------------------------------------------------
    def input_topics(self) -> list[str]:
        raise NotImplementedError

    def handle(self, messages: list[Message]) -> None:
        raise NotImplementedError

    def tick(self) -> None:
        """Periodic work between batches (timers, pending joins)."""

    def open_consumer(self) -> Consumer:
        c = kafka.consumer(self.settings, self.topics.group(self.service), **self.consumer_config)
        c.subscribe(self.input_topics(), on_revoke=self.settle_on_revoke)
        return c

    def settle_on_revoke(self, _consumer: Consumer, _partitions: list) -> None:
        """Partitions taken away (a rebalance): commit what was handled of them first, so that
        their next owner does not handle it again. (A subclass's own on_revoke calls this first.)"""
        if self.unsettled_since is not None:
            self.settle()

    def note_event_time(self, topic: str, partition: int, ts: float) -> None:
        """A record of event time `ts` was handled on (topic, partition): said with the next commit."""
        key = (topic, partition)
        if ts > self.event_times.get(key, -math.inf):
            self.event_times[key] = ts

    def commit(self) -> None:
        """Commit what was consumed, with each partition's event time (`note_event_time`) in the
        commit's metadata. Always the consumer's positions, never librdkafka's stored offsets: a
        worker that seeks a partition back to read it again (ingestion, waiting for the schema
        registry) must not have the messages it has not handled committed."""
        assert self.consumer is not None
        offsets = []
        for tp in self.consumer.position(self.consumer.assignment()):
            if tp.offset >= 0:  # something consumed there
                ts = self.event_times.get((tp.topic, tp.partition))
                offsets.append(TopicPartition(tp.topic, tp.partition, tp.offset) if ts is None else
                               TopicPartition(tp.topic, tp.partition, tp.offset, metadata=kafka.event_time_metadata(ts)))
        if offsets:
            self.consumer.commit(offsets=offsets, asynchronous=False)

    def close(self) -> None:
        """Last words on a clean stop (a final checkpoint, say)."""

    def settle(self) -> bool:
        """What was handled, made durable by the commit policy; False = stopped while the broker
        was away (nothing is committed past unacknowledged output)."""
        if not self.commits.settle():
            return False
        self.unsettled_since = None
        return True

    def stopping(self) -> bool:
        """A stop was asked for."""
        return self._stop.is_set()

    def pause(self, seconds: float) -> bool:
        """Wait, cut short by a stop; True if stopped."""
        return self._stop.wait(seconds)

    def running(self) -> bool:
        """Whether the loop goes on: no stop was asked for (the learner also ends on a lost lease)."""
        return not self._stop.is_set()

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> None:
        self.consumer = self.open_consumer()
        unacknowledged = False  # stopping while the broker is away: nothing more is committed
        try:
            while self.running():
                messages = self.next_batch()
                good = [m for m in messages if m.error() is None]
                for m in messages:
                    if m.error() is not None:
                        self._consumer_error(m.error())
                if good:
                    self._count_in(good)
                    started = time.perf_counter()
                    self.handle(good)
                    self.producer.poll(0)  # delivery reports so far (the ones failed, counted)
                    metrics.PROCESSING_SECONDS.labels(self.service, "batch").observe(time.perf_counter() - started)
                    metrics.BATCH_SIZE.labels(self.service).observe(len(good))
                    self.batches += 1
                    if self.unsettled_since is None:
                        self.unsettled_since = time.monotonic()
                    if time.monotonic() - self.unsettled_since >= self.commit_interval_s and not self.settle():
                        unacknowledged = True  # stopping with messages unacknowledged: do not commit past them
                        break
                elif self.unsettled_since is not None:
                    if not self.settle():  # the input paused (or the interval passed): commit now
                        unacknowledged = True
                        break
                elif self.commits.owed:
                    self.commits.retry()
                self.tick()
                self._export_lag()
                self.probe_kafka()
            if self.unsettled_since is not None and not unacknowledged:
                self.settle()
            self.close()
        except BaseException:
            # Nothing more is committed, not even by the revoke that closing the consumer brings:
            # a batch cut short may have let go of records it never produced (the features
            # service's merge). Whoever reads the partitions next reads them again.
            self.unsettled_since = None
            raise
        finally:
            self.producer.flush(10)
            self.consumer.close()

    def probe_kafka(self) -> None:
        """Ask the broker for metadata when nothing told us lately that it is there (no batch
        committed for 5 s: an idle loop, or one that is not this class's, like the learner's),
        every 2 s while it is marked away and every 5 s otherwise. librdkafka's own error reports
        do not always say that all brokers are down. Called by the loop and by /health and /ready."""
        now = time.monotonic()
        down = DEPS.is_down("kafka")
        if not down and now - self.kafka_answered_at < 5.0:
            return
        if now - self._last_probe < (2.0 if down else 5.0):
            return
        self._last_probe = now
        try:
            self.producer.list_topics(timeout=1.0)
        except KafkaException as exc:
            DEPS.down("kafka", exc.args[0] if exc.args else exc)
        else:
            self.kafka_answered_at = time.monotonic()
            DEPS.up("kafka")

    def _consumer_error(self, err: KafkaError) -> None:
        """An error the consumer handed over: logged once per kind a minute (librdkafka reports a
        broker outage on every reconnect), the broker marked away while it lasts."""
        if err.code() in (KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN, KafkaError._RESOLVE):
            DEPS.down("kafka", err)
        now = time.monotonic()
        if now - self._error_logged.get(err.code(), -1e9) >= 60:
            self._error_logged[err.code()] = now
            log.warning("%s: consumer error %s (same errors are not logged again for a minute)", self.service, err)

    def next_batch(self) -> list[Message]:
        """Up to batch_size messages: wait at most poll_timeout_s for the first, then take what is
        already fetched without waiting. (consume() alone waits out its whole timeout whenever
        fewer than batch_size messages are there, which adds that much latency at low rates.)"""
        assert self.consumer is not None
        timeout = self.poll_timeout_s
        if self.unsettled_since is not None:  # no longer than until the next commit is due
            timeout = max(0.0, min(timeout, self.unsettled_since + self.commit_interval_s - time.monotonic()))
        first = self.consumer.poll(timeout)
        if first is None:
            return []
        if self.batch_size <= 1:
            return [first]
        return [first, *self.consumer.consume(num_messages=self.batch_size - 1, timeout=0)]

    def _count_in(self, messages: list[Message]) -> None:
        counts: dict[str, int] = {}
        for m in messages:
            counts[m.topic()] = counts.get(m.topic(), 0) + 1
        for topic, n in counts.items():
            metrics.MESSAGES_IN.labels(self.service, base_topic(topic)).inc(n)

    def _export_lag(self) -> None:
        now = time.monotonic()
        if now - self._last_lag < self.lag_every_s or self.consumer is None:
            return
        self._last_lag = now
        try:
            for topic, partition, lag in kafka.lag_of(self.consumer):
                metrics.CONSUMER_LAG.labels(self.service, base_topic(topic), str(partition)).set(lag)
        except Exception:  # lag is best effort; never let it stop the loop
            log.debug("lag export failed", exc_info=True)

    def produce(self, topic: str, value: bytes, key: str | bytes | None = None, **kwargs) -> None:
        kafka.produce(self.producer, topic, value, key, **kwargs)
        sent = self._sent.get(topic)
        if sent is None:
            sent = self._sent[topic] = metrics.MESSAGES_OUT.labels(self.service, base_topic(topic))
        sent.inc()

    # -- thread control (shared/threads.py) -------------------------------------------------
    @property
    def thread_name(self) -> str:
        return f"{self.service}-loop"

    def _guarded_run(self) -> None:
        try:
            while True:
                try:
                    self.run()
                    return
                except RestartLoop as exc:
                    log.warning("%s: starting the loop over: %s", self.service, exc)
                    if self._stop.wait(1.0):
                        return
        except BaseException as exc:  # recorded for /health; the supervisor restarts us
            self.error = exc
            log.exception("%s worker died", self.service)

    def health(self) -> dict[str, Any]:
        self.probe_kafka()
        return {"worker_alive": self.alive, "batches": self.batches,
                "error": repr(self.error) if self.error else None, "dependencies": DEPS.status()}

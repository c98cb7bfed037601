"""The offline store's sink: reads `outcomes` (every learned example, as the learner published it)
and writes it to Parquet (store.py). It never sits in the hot path: a stopped sink only falls behind.

    driftline serve offline          # port settings.ports.offline: /health, /metrics

Effectively once: a batch's files are durable before its offsets are committed, and a start deletes
and re-reads the one batch that may be partial (`OfflineStore.resume_offsets`). The consumer is
*assigned* its partitions at the offsets the files say, not subscribed: the files are the truth.
"""

from __future__ import annotations

import logging
import time
from collections import Counter

from confluent_kafka import OFFSET_BEGINNING, KafkaError, KafkaException, Message, TopicPartition

from ..shared import kafka, metrics
from ..shared.codec import DecodeError, get_codec
from ..shared.kafka import base_topic
from ..shared.app import service_app
from ..shared.loop import StreamWorker
from ..shared.process import configure_logging, run_app
from ..shared.settings import Settings
from .store import OfflineStore, row_of

log = logging.getLogger(__name__)
SERVICE = "offline"


class OfflineSink(StreamWorker):
    service = SERVICE

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.codec = get_codec()
        self.store = OfflineStore.from_settings(settings)
        self.cfg = settings.offline
        self.batch_size = max(1, min(self.batch_size, self.cfg.flush_rows))  # a read never overshoots a batch
        self.rows: dict[int, list[dict]] = {}  # partition -> rows read since the last batch was written
        self.span: dict[int, tuple[int, int]] = {}  # partition -> (first, last) offset read since then
        self.oldest = 0.0  # when the oldest unwritten outcome was read

    def input_topics(self) -> list[str]:
        return [self.topics.outcomes]

    def open_consumer(self):
        # Off the hot path and written in batches of seconds: large fetches, few of them. With the
        # default fetch.min.bytes (1) a consumer behind a busy topic asks the broker for each few
        # records as they come, and the broker's CPU per request is what the hot path shares.
        c = kafka.consumer(self.settings, self.topics.group(self.service),
                           **{"fetch.min.bytes": 256 * 1024, "fetch.wait.max.ms": 500})
        topic = self.topics.outcomes
        parts = kafka.partitions_of(self.settings, topic)
        committed = {tp.partition: tp.offset for tp in with_coordinator(lambda: c.committed(parts, timeout=10)) if tp.offset >= 0}
        resume = self.store.resume_offsets(topic, committed)
        c.assign([TopicPartition(topic, tp.partition, resume.get(tp.partition, OFFSET_BEGINNING)) for tp in parts])
        log.info("offline sink: %s into %s from offsets %s", topic, self.store.root, resume or "the beginning")
        return c

    def handle(self, messages: list[Message]) -> None:
        if not self.span:
            self.oldest = time.monotonic()
        for m in messages:
            p, off = m.partition(), m.offset()
            first, _ = self.span.get(p, (off, off))
            self.span[p] = (first, off)
            try:
                outcome = self.codec.decode(m.value(), expect="Outcome")
            except DecodeError as exc:  # the learner wrote it; there is no DLQ of its to put it in
                log.error("offline sink: undecodable outcome at %s/%s: %s", p, off, exc)
                metrics.DEAD_LETTERS.labels(SERVICE, base_topic(m.topic()), exc.reason).inc()
                continue
            self.rows.setdefault(p, []).append(row_of(outcome, m.topic(), p, off))

    def commit(self) -> None:
        """Called after every batch read: writes (and then commits) only when a batch is due."""
        pending = sum(len(r) for r in self.rows.values())
        if self.span and (pending >= self.cfg.flush_rows
                          or time.monotonic() - self.oldest >= self.cfg.flush_interval_s):
            self.write()

    def tick(self) -> None:
        if self.span and time.monotonic() - self.oldest >= self.cfg.flush_interval_s:
            self.write()

    def close(self, drain_s: float = 5.0) -> None:
        """On a clean stop: read what is already there (a demo stops the sink right after the last
        label is learned, then drops its topics), then write it."""
        deadline = time.monotonic() + drain_s
        while time.monotonic() < deadline:
            batch = [m for m in self.next_batch() if m.error() is None]
            if not batch:
                break
            self.handle(batch)
        if self.span:
            self.write()

    def write(self) -> None:
        """The files of what was read, durably; then its offsets to Kafka (synchronously: the next
        batch must not start before this one is committed, see store.py)."""
        assert self.consumer is not None
        topic = self.topics.outcomes
        started = time.perf_counter()
        for p, (first, last) in sorted(self.span.items()):
            rows = self.rows.get(p, [])
            self.store.write_batch(topic, p, first, last, rows)
            for model, n in Counter(row["model"] for row in rows).items():
                metrics.OFFLINE_ROWS.labels(model).inc(n)
        done = [TopicPartition(topic, p, last + 1) for p, (_, last) in self.span.items()]
        with_coordinator(lambda: self.consumer.commit(offsets=done, asynchronous=False))
        metrics.PROCESSING_SECONDS.labels(SERVICE, "write").observe(time.perf_counter() - started)
        self.rows, self.span = {}, {}


def with_coordinator(call, timeout_s: float = 60.0):
    """`call()`, waiting out a group coordinator that is still loading or moving (a fresh or
    restarted broker answers NOT_COORDINATOR / COORDINATOR_LOAD_IN_PROGRESS for a while)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return call()
        except KafkaException as exc:
            if time.monotonic() > deadline or not exc.args[0].retriable() and exc.args[0].code() not in RETRY:
                raise
            log.warning("offline sink: group coordinator not ready (%s); retrying", exc.args[0].str())
            time.sleep(0.5)


RETRY = {KafkaError.NOT_COORDINATOR, KafkaError.COORDINATOR_LOAD_IN_PROGRESS, KafkaError.COORDINATOR_NOT_AVAILABLE,
         KafkaError._TIMED_OUT}


def create_app(settings: Settings):
    return service_app(SERVICE, worker=OfflineSink(settings), title="driftline offline store sink")


def serve(settings: Settings) -> None:
    configure_logging(settings)
    run_app(create_app(settings), settings.ports.offline, settings)

"""How a driftline service runs: a FastAPI app (GET /health, GET /metrics, HTTP metrics) and, for
the stream services, one worker thread running the consume loop.

    worker = MyWorker(settings)                  # a StreamWorker subclass: handle(batch)
    app = service_app("features", worker=worker)
    run_app(app, settings.ports.features, settings)

The loop is the same everywhere: consume a batch -> handle it (decode, do the one thing, encode,
produce) -> wait for the produced messages -> commit. A worker with a `commit_interval_s` does not
wait per batch: it goes on consuming while the broker acknowledges, and waits and commits once
that interval has passed, when its input pauses, or when its partitions are taken away (Kafka
Streams' commit.interval.ms; at-least-once either way, since nothing is committed before its
outputs are acknowledged). A worker that dies makes /health answer 503, so a supervisor restarts
the process; input never crashes it (bad input is the DLQ's business).
"""

from __future__ import annotations

import gc
import logging
import math
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from fastapi_offline import FastAPIOffline
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from . import kafka, metrics
from .bodylimit import BodyLimit
from .deps import DEPS, backoff_delays
from .kafka import base_topic
from .schema_registry import prepare_output
from .settings import Settings, check_secrets
from .topics import Topics

log = logging.getLogger(__name__)
# Services whose only bodies are admin requests ({"version": 3}, {"reason": "demand"}) take this much.
ADMIN_BODY_BYTES = 64 * 1024

# A commit refused because a rebalance (or a broker that came back after the group's session
# timed out) took the partitions, or because the coordinator is away for a moment. Not fatal: the
# uncommitted records go to the partitions' new owner (maybe this consumer again), and every
# service's handling is idempotent on redelivery, which a crash needs anyway.
COMMIT_RETRIABLE = frozenset({
    KafkaError._ASSIGNMENT_LOST, KafkaError.REBALANCE_IN_PROGRESS, KafkaError.ILLEGAL_GENERATION,
    KafkaError.UNKNOWN_MEMBER_ID, KafkaError._STATE, KafkaError._TRANSPORT, KafkaError._TIMED_OUT,
    KafkaError._WAIT_COORD, KafkaError.COORDINATOR_NOT_AVAILABLE, KafkaError.NOT_COORDINATOR,
    KafkaError.COORDINATOR_LOAD_IN_PROGRESS, KafkaError.REQUEST_TIMED_OUT, KafkaError._ALL_BROKERS_DOWN,
})


def commit_failed_harmlessly(exc: KafkaException) -> bool:
    """True for a commit error the loop may shrug off (see COMMIT_RETRIABLE)."""
    err = exc.args[0] if exc.args else None
    return isinstance(err, KafkaError) and (err.code() in COMMIT_RETRIABLE or err.retriable())


class RestartLoop(Exception):
    """Raised by a worker to start its loop over in this process (a new consumer, from the
    committed offsets), as a process restart would but without one."""


class StreamWorker:
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

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topics = Topics(settings.namespace)
        self.producer: Producer = kafka.producer(settings)
        self.consumer: Consumer | None = None
        self.error: BaseException | None = None
        self.started_at = time.time()
        self.batches = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_lag = 0.0
        self._delays = None  # the Kafka backoff in progress (None: the last call went through)
        self._error_logged: dict[int, float] = {}
        self._last_probe = 0.0
        self._kafka_ok = time.monotonic()  # when Kafka last answered (a commit or a probe)
        self.commit_owed = False  # a commit failed and no later one has gone through yet
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
                elif self.commit_owed:
                    self.retry_commit()
                self.tick()
                self._export_lag()
                self.probe_kafka()
            if self.unsettled_since is not None and not unacknowledged:
                self.settle()
            self.close()
        finally:
            self.producer.flush(10)
            self.consumer.close()

    def settle(self) -> bool:
        """Wait for the broker to acknowledge everything produced, then commit what was handled.
        False = stopped while the broker was away (nothing is committed past unacknowledged output)."""
        started = time.perf_counter()
        if not self.flush_until_stopped():
            return False
        self.safe_commit()
        self.unsettled_since = None
        metrics.PROCESSING_SECONDS.labels(self.service, "commit").observe(time.perf_counter() - started)
        return True

    def safe_commit(self) -> None:
        """commit(), shrugging off a commit that a rebalance or a broker outage refused: the next
        commit covers these records if the partitions are still ours, else their new owner reads
        them again. When no next batch comes (an idle service after an outage), the loop retries
        the commit itself (`retry_commit`): a group's committed offsets must reach what it
        processed, since others read them (lag tools, the learner asking whether anything is
        still on its way)."""
        try:
            self.commit()
        except KafkaException as exc:
            if not commit_failed_harmlessly(exc):
                raise
            DEPS.down("kafka", exc.args[0]) if exc.args[0].code() in (
                KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN, KafkaError._TIMED_OUT) else None
            (log.debug if self.commit_owed else log.warning)(
                "%s: commit not done (%s); retried until it is, unless a next commit covers these records "
                "or the partitions' new owner reads them again", self.service, exc.args[0])
            self.commit_owed = True
            self._kafka_backoff()
        else:
            if self.commit_owed:
                log.warning("%s: commit done after it had failed", self.service)
            self.commit_owed = False
            DEPS.up("kafka")
            self._delays = None
            self._kafka_ok = time.monotonic()

    def retry_commit(self) -> None:
        """On an idle loop: the commit that failed, again (safe_commit waits out its backoff between
        two failures, so this is no busy loop). Nothing left to commit counts as done."""
        try:
            self.safe_commit()
        except KafkaException as exc:
            err = exc.args[0] if exc.args else None
            if not (isinstance(err, KafkaError) and err.code() == KafkaError._NO_OFFSET):
                raise
            self.commit_owed = False  # a rebalance or a later commit took care of them

    def probe_kafka(self) -> None:
        """Ask the broker for metadata when nothing told us lately that it is there (no batch
        committed for 5 s: an idle loop, or one that is not this class's, like the learner's),
        every 2 s while it is marked away and every 5 s otherwise. librdkafka's own error reports
        do not always say that all brokers are down. Called by the loop and by /health and /ready."""
        now = time.monotonic()
        down = DEPS.is_down("kafka")
        if not down and now - self._kafka_ok < 5.0:
            return
        if now - self._last_probe < (2.0 if down else 5.0):
            return
        self._last_probe = now
        try:
            self.producer.list_topics(timeout=1.0)
        except KafkaException as exc:
            DEPS.down("kafka", exc.args[0] if exc.args else exc)
        else:
            self._kafka_ok = time.monotonic()
            DEPS.up("kafka")

    def _kafka_backoff(self) -> None:
        """A pause between two failing Kafka calls (exponential, capped at 2 s; a stop cuts it short)."""
        if self._delays is None:
            self._delays = backoff_delays()
        self._stop.wait(next(self._delays))

    def _consumer_error(self, err: KafkaError) -> None:
        """An error the consumer handed over: logged once per kind a minute (librdkafka reports a
        broker outage on every reconnect), the broker marked away while it lasts."""
        if err.code() in (KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN, KafkaError._RESOLVE):
            DEPS.down("kafka", err)
        now = time.monotonic()
        if now - self._error_logged.get(err.code(), -1e9) >= 60:
            self._error_logged[err.code()] = now
            log.warning("%s: consumer error %s (same errors are not logged again for a minute)", self.service, err)

    def flush_until_stopped(self) -> bool:
        """Wait for the broker to acknowledge what the batch produced (commit only after that), a
        second at a time so that a stop is still heard while Kafka is away. False = stopped first."""
        while self.producer.flush(1.0) > 0:
            DEPS.down("kafka", f"{len(self.producer)} produced messages not acknowledged")
            if self._stop.is_set():
                log.error("%s: stopping with %d messages not acknowledged by Kafka; their inputs are not "
                          "committed and will be read again", self.service, len(self.producer))
                return False
        return True

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

    def produce(self, topic: str, value: bytes, key: str | bytes | None = None) -> None:
        kafka.produce(self.producer, topic, value, key)
        metrics.MESSAGES_OUT.labels(self.service, base_topic(topic)).inc()

    # -- thread control ---------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._guarded_run, name=f"{self.service}-loop", daemon=True)
        self._thread.start()

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

    def stop(self, timeout: float = 15.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def health(self) -> dict[str, Any]:
        self.probe_kafka()
        return {"worker_alive": self.alive, "batches": self.batches,
                "error": repr(self.error) if self.error else None, "dependencies": DEPS.status()}


class HttpMetrics:
    """Request count and latency per route template, as pure ASGI middleware: Starlette's
    `BaseHTTPMiddleware` (`@app.middleware("http")`) runs every request through an extra task and
    memory streams, which cost more than a whole fast route. The labelled children are cached."""

    def __init__(self, app, service: str) -> None:
        self.app = app
        self.service = service
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def children(self, path: str, method: str, status: int) -> tuple[Any, Any]:
        key = (path, method, status)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = (metrics.HTTP_REQUESTS.labels(self.service, path, method, str(status)),
                                           metrics.HTTP_SECONDS.labels(self.service, path))
        return found

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            # The router writes the matched route into this same scope dict.
            path = getattr(scope.get("route"), "path", "unmatched")  # the template, never the raw path
            count, seconds = self.children(path, scope["method"], status)
            count.inc()
            seconds.observe(time.perf_counter() - started)


def service_app(
    service: str,
    worker: StreamWorker | None = None,
    title: str | None = None,
    on_start: Callable[[], None] | None = None,
    on_stop: Callable[[], None] | None = None,
    max_body_bytes: int = ADMIN_BODY_BYTES,
    body_limit_setting: str = "(the admin routes' limit)",
    **fastapi_kwargs: Any,
) -> FastAPI:
    """A FastAPI app with /health, /metrics and HTTP metrics; starts and stops the worker.
    Every request body is limited to `max_body_bytes` (413) before routing and before any auth."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        if on_start:
            on_start()
        # What is loaded by now (modules, the app, a served model) lives as long as the process:
        # frozen out of the collector's sight, a full collection no longer walks it all while a
        # request waits (bench predict, 16 connections: p99 55-69 ms -> 9 ms, CPU per request -15%).
        gc.freeze()
        if worker is not None:
            worker.start()
        yield
        if worker is not None:
            worker.stop()
        if on_stop:
            on_stop()

    # /docs and /redoc load Swagger UI / ReDoc from the installed fastapi-offline package, not a CDN:
    # the docs open on a machine without internet.
    app = FastAPIOffline(title=title or f"driftline {service}", lifespan=lifespan, **fastapi_kwargs)
    app.state.worker = worker

    app.add_middleware(HttpMetrics, service=service)

    # Added last, so outermost: a too-large body is refused before routing, auth or parsing.
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes, service=service, setting=body_limit_setting)

    # `async def`: answered on the event loop, no thread-pool hop, except for a stream worker's
    # details (its Kafka probe may wait up to a second while the broker is away).
    @app.get("/health", tags=["ops"], summary="Is the process alive and its loop running?")
    async def health() -> JSONResponse:
        body: dict[str, Any] = {"service": service, "status": "ok"}
        if worker is not None:
            body.update(await run_in_threadpool(worker.health))
            if not worker.alive:
                body["status"] = "worker stopped"
                return JSONResponse(body, status_code=503)
            # Alive but waiting for Redis or Kafka: still 200 (a restart would not bring them
            # back); /ready says 503 meanwhile.
            missing = DEPS.missing()
            if missing:
                body["status"] = "waiting: " + "; ".join(missing)
        return JSONResponse(body)

    if worker is not None:  # the prediction service has its own /ready (model loaded, ...)
        @app.get("/ready", tags=["ops"], summary="Is the loop running and are Redis and Kafka there?")
        def ready() -> JSONResponse:
            worker.probe_kafka()
            reasons = ([] if worker.alive else ["worker stopped"]) + DEPS.missing()
            return JSONResponse({"service": service, "ready": not reasons, "reasons": reasons},
                                status_code=503 if reasons else 200)

    @app.get("/metrics", tags=["ops"], summary="Prometheus metrics")
    def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics_registry()), media_type=CONTENT_TYPE_LATEST)

    return app


def metrics_registry():
    """What /metrics exports: this process's metrics or, when a service runs several worker processes
    (prometheus_client's multiprocess mode, PROMETHEUS_MULTIPROC_DIR set before they start), the
    sum over all of them."""
    import os

    from prometheus_client import REGISTRY, CollectorRegistry, multiprocess

    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return REGISTRY
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return registry


def run_app(app: FastAPI, port: int, settings: Settings, workers: int = 1, factory: str | None = None) -> None:
    """Serve `app` with uvicorn on the settings' host (`factory` import string when workers > 1).
    Never with a weak model key or token (`driftline serve` says so first; this is the last line)."""
    import uvicorn

    check_secrets(settings)
    if workers > 1 and factory:
        uvicorn.run(factory, factory=True, host=settings.host, port=port, workers=workers,
                    log_level=settings.log_level.lower(), access_log=False)
    else:
        uvicorn.run(app, host=settings.host, port=port, log_level=settings.log_level.lower(), access_log=False)


def configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )

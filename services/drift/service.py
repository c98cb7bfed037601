"""The drift service (port 8004): watches the champion's errors and the features' distributions,
publishes `drift.events`, and asks the learner for a challenger on `retrain.requests`.

    outcomes     -> RetrainPolicy.observe (concept drift, new data, performance) -> drift.events, retrain.requests
    model.swaps  -> RetrainPolicy.swap (a new champion is watched from scratch)
    features     -> DataDriftMonitor (1 message in `data_drift_sample`) -> drift.events (kind data)
    clock        -> RetrainPolicy.tick (schedule)
    POST /v1/retrain (admin token) -> retrain.requests (reason demand)

The policy's state (positions, cooldown, detector) is saved to Redis, signed, after the batch's
messages are produced and before the offsets are committed; outcomes at or below the saved position
are skipped after a restart, so a crash neither repeats nor loses a retrain request.
It never trains or swaps a model itself: that is the learner's job.
"""

from __future__ import annotations

import logging
from typing import Literal

import redis
from confluent_kafka import Message
from fastapi import Body, FastAPI, HTTPException
from pydantic import BaseModel, Field

from ..shared import deps, kafka, metrics
from ..shared.codec import DecodeError, get_codec
from ..shared.kafka import base_topic
from ..shared.admin import AdminAction, admin_action
from ..shared.keys import Keys
from ..shared.registry import TamperedArtifact, dumps_signed, loads_signed
from ..shared.runtime import StreamWorker, run_app, service_app
from ..shared.settings import Settings
from ..shared.vocabulary import RETRAIN_REASONS
from .datadrift import DataDriftMonitor
from .policy import Action, RetrainPolicy

log = logging.getLogger(__name__)
SERVICE = "drift"


class DriftWorker(StreamWorker):
    service = SERVICE
    batch_size = 2000

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.codec = get_codec()
        self.model = settings.learner.model_name
        self.policy = RetrainPolicy(settings.drift, self.model)
        self.data = DataDriftMonitor(settings.drift.data_drift_window, settings.drift.data_drift_psi,
                                     ignore=settings.drift.data_drift_ignore)
        self.redis = deps.redis_client(settings)  # waits out a Redis outage
        self.keys = Keys(settings.namespace)
        self.signing_key = settings.model_key.get_secret_value().encode()
        self.features_seen = 0
        self.gauge_version: int | None = None

    def input_topics(self) -> list[str]:
        topics = [self.topics.outcomes, self.topics.model_swaps]
        if self.settings.drift.data_drift:
            topics.append(self.topics.features)
        return topics

    def open_consumer(self):
        self.load_state()
        # A small prefetch: with librdkafka's default (100k messages per partition) an outcome would
        # queue behind a whole backlog of the features firehose and drift would be noticed late.
        c = kafka.consumer(self.settings, self.topics.group(self.service), **{"queued.min.messages": 2000})
        c.subscribe(self.input_topics())
        return c

    # -- the loop: decode -> decide -> publish (the base class flushes, then commit() saves) ------
    def handle(self, messages: list[Message]) -> None:
        for m in messages:
            topic = base_topic(m.topic())
            if topic == "outcomes":
                outcome = self.decode(m, "Outcome")
                if outcome is not None and outcome["role"] == "champion":
                    correct = outcome["y_pred"] is not None and outcome["y_pred"] == outcome["y_true"]
                    self.publish(self.policy.observe(outcome["position"], correct, outcome["model_version"],
                                                     outcome.get("error")))
            elif topic == "model.swaps":
                swap = self.decode(m, "ModelSwap")
                if swap is not None and swap["model"] == self.model:
                    self.policy.swap(swap["to_version"])
            elif topic == "features":
                self.features_seen += 1
                if self.features_seen % max(1, self.settings.drift.data_drift_sample) == 0:
                    vector = self.decode(m, "FeatureVector")
                    for alarm in self.data.update(vector["features"]) if vector is not None else ():
                        self.publish(self.policy.data_drift(alarm.feature, alarm.psi, "PSI"))
        self.export_error_rate()

    def tick(self) -> None:
        actions = self.policy.tick()
        if actions:
            self.publish(actions)
            self.producer.flush()
            self.save_state()

    def commit(self) -> None:
        self.save_state()  # after the produced messages are acknowledged (run() flushed them)
        super().commit()

    # -- helpers --------------------------------------------------------------------------------
    def decode(self, m: Message, expect: str) -> dict | None:
        try:
            return self.codec.decode(m.value(), expect=expect)
        except DecodeError as exc:
            # Internal topics have no DLQ: count it, say it, skip it (never crash on input).
            metrics.DEAD_LETTERS.labels(SERVICE, base_topic(m.topic()), exc.reason).inc()
            log.warning("skipping undecodable %s message at %s/%s: %s", base_topic(m.topic()),
                        m.partition(), m.offset(), exc)
            return None

    def publish(self, actions: list[Action]) -> None:
        for action in actions:
            if action.kind == "drift":
                record = action.record
                self.produce(self.topics.drift_events, self.codec.encode("DriftEvent", record), key=self.model)
                metrics.DRIFT_EVENTS.labels(self.model, record["kind"], record["level"], record["detector"]).inc()
                log.info("drift %s/%s at %s: %s", record["kind"], record["level"], record["position"],
                         {k: record[k] for k in ("feature", "error_before", "error_after", "statistic")})
            elif action.kind == "retrain":
                self.send_retrain(action.record)
            elif action.kind == "suppressed":
                metrics.RETRAINS_SUPPRESSED.labels(self.model, action.record["reason"]).inc()

    def send_retrain(self, record: dict) -> None:
        self.produce(self.topics.retrain_requests, self.codec.encode("RetrainRequest", record), key=self.model)
        metrics.RETRAIN_REQUESTS.labels(self.model, record["reason"]).inc()
        log.info("retrain request %s (%s) at position %s", record["request_id"], record["reason"], record["position"])

    def export_error_rate(self) -> None:
        version = self.policy.version
        if version is None:
            return
        if self.gauge_version is not None and self.gauge_version != version:
            try:
                metrics.ERROR_RATE.remove(self.model, str(self.gauge_version))  # one series per live version
            except KeyError:
                pass
        self.gauge_version = version
        metrics.ERROR_RATE.labels(self.model, str(version)).set(self.policy.error_rate)

    # -- state in Redis ---------------------------------------------------------------------------
    def save_state(self) -> None:
        snap = self.policy.snapshot()
        try:
            self.redis.hset(self.keys.drift_state(self.model), mapping={
                "state": dumps_signed(snap, self.signing_key),
                "position": snap["position"],
                "last_retrain": "" if snap["last_retrain"] is None else snap["last_retrain"],
                "version": "" if snap["version"] is None else snap["version"],
            })
        except redis.RedisError:
            log.warning("could not save the drift state; it will be retried after the next batch", exc_info=True)

    def load_state(self) -> None:
        blob = self.redis.hget(self.keys.drift_state(self.model), "state")
        if blob is None:
            return
        try:
            self.policy.restore(loads_signed(blob, self.signing_key))
            log.info("drift state restored at position %s (last retrain at %s)",
                     self.policy.position, self.policy.last_retrain)
        except TamperedArtifact:
            log.error("REFUSED the saved drift state: its signature does not match; starting afresh")

    def demand(self, reason: str) -> dict:
        """An on-demand retrain request, published now (called from the HTTP thread)."""
        record = self.policy.demand(reason).record
        self.send_retrain(record)
        if self.producer.flush(10) > 0:
            raise RuntimeError("Kafka did not acknowledge the retrain request")
        return record


class RetrainBody(BaseModel):
    reason: Literal[RETRAIN_REASONS] = Field(  # type: ignore[valid-type]
        "demand", description="why the retrain is asked for (operators use demand)")


class RetrainAccepted(BaseModel):
    request_id: str
    model: str
    reason: str
    model_version: int | None
    position: int


def build_app(settings: Settings, worker: DriftWorker) -> FastAPI:
    app = service_app(SERVICE, worker=worker, title="driftline drift")

    @app.post("/v1/retrain", status_code=202, response_model=RetrainAccepted, tags=["admin"],
              summary="Ask the learner for a challenger now (reason demand); needs the admin token")
    def retrain(body: RetrainBody | None = Body(None),
                act: AdminAction = admin_action(settings, SERVICE, "retrain", success=202)) -> RetrainAccepted:
        reason = (body or RetrainBody()).reason
        act.about(reason=reason)
        try:
            record = worker.demand(reason)
        except RuntimeError as exc:
            raise HTTPException(503, str(exc)) from None
        return act.answered(RetrainAccepted(**{k: record[k] for k in RetrainAccepted.model_fields}))

    @app.get("/v1/drift", tags=["ops"], summary="What the drift service watches and when it last asked to retrain")
    def state() -> dict:
        p = worker.policy
        return {"model": worker.model, "detector": settings.drift.detector, "model_version": p.version,
                "position": p.position, "error_rate": p.error_rate, "rolling_accuracy": p.rolling_accuracy,
                "last_retrain_position": p.last_retrain, "cooling_down": p.cooling_down(),
                "cooldown": settings.drift.cooldown}

    return app


def serve(settings: Settings) -> None:
    worker = DriftWorker(settings)
    run_app(build_app(settings, worker), settings.ports.drift, settings)

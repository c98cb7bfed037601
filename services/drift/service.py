"""The drift service (port 8004): the operators' side of the drift loop.

    drift.events -> the latest alarms, for /v1/drift
    model.swaps  -> which version is the champion (the subject of a scheduled or demanded retrain)
    clock        -> a retrain request every `drift.on_schedule_s` (reason schedule)
    POST /v1/retrain (admin token) -> a retrain request now (reason demand)
    GET /v1/drift  -> what the learner's drift loop sees (its policy's state) and the latest alarms

Detection itself (concept drift on the champion's errors, data drift on the features, the
label-count and accuracy triggers) runs inside the learner, at the example where it is seen
(`learner.adaptation`, with the policy of `drift.policy`): acting on a drift must not depend on
another process keeping up with the learner, and the same stream must give the same decisions at
any speed. What cannot come from the stream -- a person's demand, a clock -- comes from here, as a
retrain request the learner takes at the position it has reached when it reads it.
It never trains or swaps a model itself: that is the learner's job.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Literal

import redis
from confluent_kafka import Message
from fastapi import Body, FastAPI, HTTPException
from pydantic import BaseModel, Field

from ..shared import deps, metrics
from ..shared.codec import DecodeError, get_codec
from ..shared.kafka import base_topic
from ..shared.admin import AdminAction, admin_action
from ..shared.keys import Keys
from ..shared.registry import ModelRegistry
from ..shared.app import service_app
from ..shared.loop import StreamWorker
from ..shared.process import run_app
from ..shared.settings import Settings
from ..shared.vocabulary import RETRAIN_REASONS
from .policy import retrain_request

log = logging.getLogger(__name__)
SERVICE = "drift"
RECENT_ALARMS = 50  # alarms /v1/drift lists


class DriftWorker(StreamWorker):
    service = SERVICE
    commit_interval_s = 1.0  # two low-volume topics: nothing downstream waits for these commits

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.codec = get_codec()
        self.model = settings.learner.model_name
        self.redis = deps.redis_client(settings)  # waits out a Redis outage
        self.keys = Keys(settings.namespace)
        self.registry = ModelRegistry(self.redis, self.keys, self.model, settings.model_key.get_secret_value().encode())
        self.alarms: deque[dict] = deque(maxlen=RECENT_ALARMS)
        self.champion: int | None = None
        self.last_schedule = time.monotonic()

    def input_topics(self) -> list[str]:
        return [self.topics.drift_events, self.topics.model_swaps]

    def handle(self, messages: list[Message]) -> None:
        for m in messages:
            topic = base_topic(m.topic())
            try:
                record = self.codec.decode(m.value(), expect="DriftEvent" if topic == "drift.events" else "ModelSwap")
            except DecodeError as exc:  # internal topics have no DLQ: count it, say it, skip it
                metrics.DEAD_LETTERS.labels(SERVICE, topic, exc.reason).inc()
                log.warning("skipping undecodable %s message at %s/%s: %s", topic, m.partition(), m.offset(), exc)
                continue
            if record["model"] != self.model:
                continue
            if topic == "drift.events":
                self.alarms.append(record)
            else:
                self.champion = record["to_version"]

    def tick(self) -> None:
        every = self.settings.drift.on_schedule_s
        if every > 0 and time.monotonic() - self.last_schedule >= every:
            self.last_schedule = time.monotonic()
            self.send("schedule")

    def send(self, reason: str) -> dict:
        """A retrain request for the current champion, at the learner's position, published now."""
        state = self.learner_state()
        version = self.champion or self.registry_champion()
        record = retrain_request(self.model, reason, version=version, position=int(state.get("position") or 0))
        self.produce(self.topics.retrain_requests, self.codec.encode("RetrainRequest", record), key=self.model)
        if self.producer.flush(10) > 0:
            raise RuntimeError("Kafka did not acknowledge the retrain request")
        metrics.RETRAIN_REQUESTS.labels(self.model, reason).inc()
        log.info("retrain request %s (%s) for v%s at position %s", record["request_id"], reason, version,
                 record["position"])
        return record

    def registry_champion(self) -> int | None:
        try:
            return self.registry.champion()
        except redis.RedisError:
            return None

    def learner_state(self) -> dict[str, str]:
        """What the learner's drift loop published at its last checkpoint (empty before one)."""
        try:
            raw = self.redis.hgetall(self.keys.drift_state(self.model))
        except redis.RedisError:
            return {}
        return {k.decode(): v.decode() for k, v in raw.items()}


class RetrainBody(BaseModel):
    reason: Literal[RETRAIN_REASONS] = Field(  # type: ignore[valid-type]
        "demand", description="why the retrain is asked for (operators use demand)")


class RetrainAccepted(BaseModel):
    request_id: str
    model: str
    reason: str
    model_version: int | None
    position: int


def _number(text: str | None) -> float | None:
    return float(text) if text not in (None, "") else None


def build_app(settings: Settings, worker: DriftWorker) -> FastAPI:
    app = service_app(SERVICE, worker=worker, title="driftline drift")

    @app.post("/v1/retrain", status_code=202, response_model=RetrainAccepted, tags=["admin"],
              summary="Ask the learner for a challenger now (reason demand); needs the admin token")
    def retrain(body: RetrainBody | None = Body(None),
                act: AdminAction = admin_action(settings, SERVICE, "retrain", success=202)) -> RetrainAccepted:
        reason = (body or RetrainBody()).reason
        act.about(reason=reason)
        try:
            record = worker.send(reason)
        except RuntimeError as exc:
            raise HTTPException(503, str(exc)) from None
        return act.answered(RetrainAccepted(**{k: record[k] for k in RetrainAccepted.model_fields}))

    @app.get("/v1/drift", tags=["ops"], summary="What the learner's drift loop sees, and the latest alarms")
    def state() -> dict:
        learner = worker.learner_state()
        return {"model": worker.model, "detector": settings.drift.detector, "cooldown": settings.drift.cooldown,
                "model_version": int(learner["version"]) if learner.get("version") else worker.champion,
                "position": int(learner.get("position") or 0),
                "error_rate": _number(learner.get("error_rate")),
                "rolling_accuracy": _number(learner.get("rolling_accuracy")),
                "last_retrain_position": int(learner["last_retrain"]) if learner.get("last_retrain") else None,
                "cooling_down": learner.get("cooling_down") == "1",
                "recent_alarms": list(worker.alarms)[-10:]}

    return app


def serve(settings: Settings) -> None:
    worker = DriftWorker(settings)
    run_app(build_app(settings, worker), settings.ports.drift, settings)

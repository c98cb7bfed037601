"""What the learner publishes, each record built in one place: predictions, outcomes, model
updates, model swaps, the drift loop's alarms and retrain requests, and the labels it dead-letters.

    out = Outputs(producer, Topics(""), "default", telemetry)
    blob = out.prediction(event, slot.role, slot.version, y_pred, proba)   # produced; the blob for Redis
    out.outcome(event_vector, label, answer, "champion", position)

Produce only: the worker flushes before each checkpoint (its commit). Predictions and outcomes
are held back until the worker has stored the batch's snapshots in Redis (`release`): after a
crash, an outcome on the topic is re-learned from its event's stored snapshot, so none may be
published before that snapshot is stored.
"""

from __future__ import annotations

import logging
import time

from confluent_kafka import Producer

from ..shared import kafka, metrics
from ..shared.codec import get_codec
from ..shared.deadletter import dead_letter
from ..shared.swaps import publish_swap
from ..shared.topics import OUTCOME_MODEL_HEADER, OUTCOME_ROLE_HEADER, Topics
from .champion import Slot
from .labels import error
from .records import Event, Label
from .telemetry import Telemetry

log = logging.getLogger(__name__)
SERVICE = "learner"
# A retrain request the learner made itself carries this header: it reads retrain.requests for
# requests from elsewhere, and acted on its own where it decided them.
ORIGIN_HEADER = "driftline-origin"


class Outputs:
    def __init__(self, producer: Producer, topics: Topics, model: str, telemetry: Telemetry) -> None:
        self.producer = producer
        self.topics = topics
        self.model = model
        self.telemetry = telemetry
        self.codec = get_codec()
        # predictions and outcomes until `release`: (topic, value, key, headers)
        self.held_back: list[tuple[str, bytes, str, list[tuple[str, bytes]] | None]] = []
        self.model_header = (OUTCOME_MODEL_HEADER, model.encode())

    def release(self) -> None:
        """Publish the predictions and outcomes held back: their snapshots are stored now."""
        for topic, value, key, headers in self.held_back:
            self.produce(topic, value, key, headers)
        self.held_back.clear()

    def forget(self) -> None:
        """A new session starts from the checkpoint: what was held back will be decided again."""
        self.held_back.clear()

    def produce(self, topic: str, value: bytes, key: str | bytes | None = None,
                headers: list[tuple[str, bytes]] | None = None) -> None:
        kafka.produce(self.producer, topic, value, key, headers=headers)
        self.telemetry.sent(topic)

    def prediction(self, event: Event, role: str, version: int, y_pred: str | None,
                   proba: dict[str, float], publish: bool = True) -> tuple[dict, bytes]:
        """A role's Prediction for an event, produced unless `publish` is false (a displaced
        champion answers only to its contest); (the record, its bytes for the snapshot)."""
        fv = event.vector
        p = {"event_id": event.event_id, "entity_id": fv["entity_id"], "ts": event.ts, "model": self.model,
             "model_version": version, "role": role, "y_pred": y_pred, "proba": proba, "source": SERVICE,
             "published_ms": fv.get("published_ms")}
        blob = self.codec.encode("Prediction", p)
        if publish:
            self.held_back.append((self.topics.predictions, blob, fv["entity_id"], None))
            self.telemetry.count("predictions", role)
        return p, blob

    def outcome(self, fv: dict, label: Label, answer: dict, role: str, position: int,
                regression: bool = False) -> None:
        o = {"event_id": fv["event_id"], "entity_id": fv["entity_id"], "model": self.model,
             "model_version": answer["model_version"], "role": role, "y_true": label.label,
             "y_pred": answer["y_pred"], "proba": answer["proba"], "position": position, "ts": fv["ts"],
             # what the offline store keeps (offline/store.py): the vector scored, and where the label was read.
             # Only the champion's outcome carries the vector: every role learned the same one at this
             # position, and a challenger's copy cost its encoding, the broker and every reader again.
             "features": None if role != "champion" else fv["features"],
             "feature_set": fv.get("feature_set"), "label_ts": label.ts,
             "label_partition": label.partition, "label_offset": label.offset,
             "error": error(answer["y_pred"], label.label) if regression else None,
             "known": answer.get("known")}
        headers = [self.model_header, (OUTCOME_ROLE_HEADER, role.encode())]
        self.held_back.append((self.topics.outcomes, self.codec.encode("Outcome", o), fv["entity_id"], headers))

    def update(self, slot: Slot) -> None:
        """ModelUpdate: a new revision of the champion's artifact is in the registry."""
        update = {"model": self.model, "version": slot.version, "examples_seen": slot.examples,
                  "revision": slot.revision, "ts": time.time()}
        self.produce(self.topics.model_updates, self.codec.encode("ModelUpdate", update), self.model)
        metrics.MODEL_UPDATES.labels(self.model).inc()

    def swap(self, from_version: int | None, to_version: int, reason: str, position: int) -> bool:
        return publish_swap(self.producer, self.topics, model=self.model, from_version=from_version,
                            to_version=to_version, reason=reason, position=position, service=SERVICE)

    def drift_event(self, record: dict) -> None:
        """A DriftEvent the drift loop raised (concept or data drift)."""
        self.produce(self.topics.drift_events, self.codec.encode("DriftEvent", record), self.model)
        metrics.DRIFT_EVENTS.labels(self.model, record["kind"], record["level"], record["detector"]).inc()
        log.info("drift %s/%s at %s: %s", record["kind"], record["level"], record["position"],
                 {k: record[k] for k in ("feature", "error_before", "error_after", "statistic")})

    def retrain_request(self, record: dict) -> None:
        """A RetrainRequest the drift loop made and acted on: published for the record."""
        kafka.produce(self.producer, self.topics.retrain_requests, self.codec.encode("RetrainRequest", record),
                      self.model, headers=[(ORIGIN_HEADER, SERVICE.encode())])
        self.telemetry.sent(self.topics.retrain_requests)
        metrics.RETRAIN_REQUESTS.labels(self.model, record["reason"]).inc()
        log.info("retrain request %s (%s) at position %s", record["request_id"], record["reason"], record["position"])

    def dead_letter(self, raw: bytes | None, key, partition: int, offset: int, reason: str, detail: str) -> None:
        """A labels.valid message to labels.dlq."""
        self.produce(self.topics.labels_dlq, dead_letter(self.topics.labels_valid, reason, detail, SERVICE, key, raw,
                                                         partition, offset), key)
        metrics.DEAD_LETTERS.labels(SERVICE, "labels.valid", reason).inc()

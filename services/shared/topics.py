"""The Kafka topics of docs/DESIGN.md, defined once: name, record schema, partitions, key.

    >>> topics = Topics("")            # the default namespace: docs/DESIGN.md's names as they are
    >>> topics.events_valid
    'events.valid'
    >>> Topics("t1").features          # a namespace prefixes every topic (tests, tenants)
    't1.features'

Keys are the entity id wherever the record has one, so one entity stays on one partition. The
stream topics (events, labels, their .valid, features, predictions) have
`kafka_stream_partitions` partitions (6 unless set): at most that many replicas of ingestion or
features share a stream. The model-level topics (outcomes, drift.events, retrain.requests, model.swaps,
model.updates) have one partition: one active learner writes them, and their consumers need them
in order.

    >>> SPEC_BY_NAME["outcomes"].partition_count(stream_partitions=3), SPEC_BY_NAME["features"].partition_count(3)
    (1, 3)

Aggregates keyed by another field (a merchant) add the features service's internal topics
(docs/features.md): `features.by.<key>.<source>`, one per key field and per partition of the stage
before it, each with as many partitions as events.valid (`KeyedEvents` records).

    >>> Topics("t1").keyed("merchant", 3)
    't1.features.by.merchant.3'
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TopicSpec:
    name: str
    schema: str  # Avro record name in schemas/
    partitions: int | None  # None: a stream topic, with the deployment's kafka_stream_partitions
    key: str  # what the message key holds

    def partition_count(self, stream_partitions: int) -> int:
        return self.partitions if self.partitions is not None else stream_partitions


STREAM = None  # a stream topic: settings.kafka_stream_partitions partitions

TOPIC_SPECS: tuple[TopicSpec, ...] = (
    TopicSpec("events", "Event", STREAM, "entity_id"),
    TopicSpec("labels", "Label", STREAM, "event_id"),
    TopicSpec("events.valid", "Event", STREAM, "entity_id"),
    TopicSpec("labels.valid", "Label", STREAM, "event_id"),
    TopicSpec("events.dlq", "DeadLetter", 3, "original key"),
    TopicSpec("labels.dlq", "DeadLetter", 3, "original key"),
    TopicSpec("features", "FeatureVector", STREAM, "entity_id"),
    TopicSpec("predictions", "Prediction", STREAM, "entity_id"),
    TopicSpec("outcomes", "Outcome", 1, "entity_id"),
    TopicSpec("drift.events", "DriftEvent", 1, "model name"),
    TopicSpec("retrain.requests", "RetrainRequest", 1, "model name"),
    TopicSpec("model.swaps", "ModelSwap", 1, "model name"),
    TopicSpec("model.updates", "ModelUpdate", 1, "model name"),
)
SPEC_BY_NAME = {spec.name: spec for spec in TOPIC_SPECS}
# An outcome also says in its headers which model and role it is for, readable without decoding
# it: a prediction worker follows the champion's outcomes only, and while challengers shadow, about
# as many are theirs (36,176 beside 45,000 in a 45,000-row Elec2 replay).
OUTCOME_MODEL_HEADER = "driftline-model"
OUTCOME_ROLE_HEADER = "driftline-role"
KEYED_PREFIX = "features.by."  # + key field + "." + source partition: the features service's own topics
KEYED_SCHEMA = "KeyedEvents"


def outcome_role(headers: list[tuple[str, bytes]] | None) -> str | None:
    """The role an outcome's headers name, without decoding it (None: no such header, an older
    learner's outcome, to be decoded and looked at).

        >>> outcome_role([("driftline-model", b"m"), ("driftline-role", b"challenger")]), outcome_role(None)
        ('challenger', None)
    """
    for key, value in headers or ():
        if key == OUTCOME_ROLE_HEADER:
            return value.decode()
    return None


class Topics:
    """Topic names as they are on the broker, for one namespace."""

    def __init__(self, namespace: str = "") -> None:
        self.namespace = namespace
        for spec in TOPIC_SPECS:
            setattr(self, spec.name.replace(".", "_"), self.name(spec.name))

    def name(self, base: str) -> str:
        return f"{self.namespace}.{base}" if self.namespace else base

    def base(self, full: str) -> str:
        """The docs/DESIGN.md name of a broker topic (drops the namespace)."""
        prefix = f"{self.namespace}." if self.namespace else ""
        return full[len(prefix):] if prefix and full.startswith(prefix) else full

    def spec(self, full: str) -> TopicSpec:
        base = self.base(full)
        if base.startswith(KEYED_PREFIX):
            return TopicSpec(base, KEYED_SCHEMA, STREAM, "key entity")  # events.valid's count, in fact
        return SPEC_BY_NAME[base]

    def keyed(self, key: str, source: int) -> str:
        """The internal topic that carries events to the entities of key field `key`, from partition
        `source` of the stage before (events.valid for the first key field)."""
        return self.name(f"{KEYED_PREFIX}{key}.{source}")

    def internal(self, stages: tuple[str, ...], partitions: int) -> list[str]:
        """Every internal topic of the features service's stages (`FeatureSet.stages`), stage by
        stage, one per source partition.

            >>> Topics("t1").internal(("merchant", "entity_id"), 2)
            ['t1.features.by.merchant.0', 't1.features.by.merchant.1', 't1.features.by.entity_id.0', 't1.features.by.entity_id.1']
        """
        return [self.keyed(stage, source) for stage in stages for source in range(partitions)]

    def all(self) -> list[str]:
        return [self.name(spec.name) for spec in TOPIC_SPECS]

    def owns(self, full: str) -> bool:
        """Whether a broker topic belongs to this namespace (never, for the unnamed one: it has no
        prefix to tell its topics from anyone else's).

            >>> Topics("demo-1").owns("demo-1.features.by.merchant.0"), Topics("demo-1").owns("demo-10.events")
            (True, False)
        """
        return bool(self.namespace) and full.startswith(f"{self.namespace}.")

    def owns_group(self, group_id: str) -> bool:
        """Whether a consumer group is one of this namespace's services' (`group`)."""
        return bool(self.namespace) and group_id.startswith(self.group("") + ".")

    def group(self, service: str, suffix: str = "") -> str:
        """Consumer group id of a service in this namespace."""
        parts = ["driftline", self.namespace, service, suffix]
        return ".".join(p for p in parts if p)

    # Declared for type checkers and readers; set in __init__.
    events: str
    labels: str
    events_valid: str
    labels_valid: str
    events_dlq: str
    labels_dlq: str
    features: str
    predictions: str
    outcomes: str
    drift_events: str
    retrain_requests: str
    model_swaps: str
    model_updates: str

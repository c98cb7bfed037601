"""The learner's two consumers, positioned by its checkpoint (never by group-managed offsets).

    inputs = Inputs(settings, topics)
    consumer = inputs.open(offsets)                # features + labels.valid, and control apart
    batch = inputs.next_batch(1000, 0.05)          # control first, then up to 1000 stream messages
    marks = inputs.label_ends(offsets)             # [(labels.valid partition, read to its end?)]

Control (retrain.requests, model.swaps) has a consumer of its own: in one consumer, librdkafka's
prefetch queue would put a retrain request behind megabytes of backlog, and the challenger would
come after the stream it should adapt to. Per-partition flow control (pausing a partition that
runs ahead) belongs here too.
"""

from __future__ import annotations

from confluent_kafka import OFFSET_BEGINNING, Consumer, Message, TopicPartition

from ..shared import kafka
from ..shared.settings import Settings
from ..shared.topics import Topics
from .records import Event

SERVICE = "learner"


class Inputs:
    def __init__(self, settings: Settings, topics: Topics) -> None:
        self.settings = settings
        self.topics = topics
        self.consumer: Consumer | None = None
        self.control: Consumer | None = None
        self.label_partitions: list[TopicPartition] = []
        self.rescore_below: dict[tuple[str, int], int] = {}  # features offsets consumed before this session

    def open(self, offsets: dict[tuple[str, int], int]) -> Consumer:
        self.label_partitions, self.rescore_below = [], {}
        self.consumer = self.assign([self.topics.features, self.topics.labels_valid], offsets)
        self.control = self.assign([self.topics.retrain_requests, self.topics.model_swaps], offsets)
        return self.consumer

    def assign(self, topics: list[str], offsets: dict[tuple[str, int], int]) -> Consumer:
        # The group id is the service's (lag tools read its offsets); the position is the checkpoint's.
        c = kafka.consumer(self.settings, self.topics.group(SERVICE))
        parts = []
        for topic in topics:
            for tp in kafka.partitions_of(self.settings, topic):
                parts.append(TopicPartition(topic, tp.partition, offsets.get((topic, tp.partition), OFFSET_BEGINNING)))
                if topic == self.topics.features:  # events up to here may have been scored before
                    self.rescore_below[(topic, tp.partition)] = c.get_watermark_offsets(tp, timeout=10.0,
                                                                                        cached=False)[1]
                elif topic == self.topics.labels_valid:
                    self.label_partitions.append(parts[-1])
        c.assign(parts)
        return c

    def next_batch(self, batch_size: int, timeout: float) -> list[Message]:
        control = self.control.consume(num_messages=100, timeout=0)
        return control + self.consumer.consume(num_messages=batch_size, timeout=timeout)

    def label_ends(self, offsets: dict[tuple[str, int], int]) -> list[tuple[int, bool]]:
        """Each labels.valid partition and whether it is read to its end (the consumer's cached
        watermarks, no broker round trip)."""
        out = []
        for tp in self.label_partitions:
            low, high = self.consumer.get_watermark_offsets(tp, cached=True)
            out.append((tp.partition, high >= 0 and offsets.get((tp.topic, tp.partition), max(low, tp.offset)) >= high))
        return out

    def maybe_scored(self, event: Event) -> bool:
        """Read before this session began? Then a prediction stored for it (made at event time) is kept."""
        return event.offset < self.rescore_below.get((event.topic, event.partition), 0)

    def commit(self, offsets: dict[tuple[str, int], int]) -> None:
        """For lag tools only (kafka-consumer-groups, the replay's stall report): never read back."""
        self.consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()], asynchronous=True)

    def close_control(self) -> None:
        if self.control is not None:
            self.control.close()
        self.control = None

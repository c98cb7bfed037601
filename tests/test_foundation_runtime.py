"""The stream services' loop (shared/loop.py, shared/commits.py): against a Kafka that is not there, and committing at
an interval on the real broker."""

from __future__ import annotations

import threading
import time

from confluent_kafka import TopicPartition
from confluent_kafka.admin import NewTopic

from driftline.infra import stack
from driftline.shared import kafka
from driftline.shared.loop import StreamWorker
from driftline.shared.settings import Settings
from driftline.shared.topics import Topics


def test_a_worker_waiting_for_kafka_to_acknowledge_still_hears_stop():
    # Nothing listens on this port: the produced message can never be acknowledged. Before, the
    # loop's flush() had no timeout and a service could not be stopped while Kafka was away.
    worker = StreamWorker(Settings(kafka_bootstrap=f"127.0.0.1:{stack.free_port()}"))
    worker.produce("nowhere", b"x")
    threading.Timer(1.5, worker._stop.set).start()
    started = time.monotonic()
    assert worker.commits.flush_until_stopped() is False  # not acknowledged: the caller must not commit
    assert time.monotonic() - started < 10
    assert len(worker.producer) == 1


# -- committing at an interval (ingestion, features) against the real broker -------------------

class Copier(StreamWorker):
    """Copies its input topic to an output topic: the smallest worker with an output to acknowledge."""

    service = "copier"
    batch_size = 20

    def __init__(self, settings: Settings, interval_s: float) -> None:
        super().__init__(settings)
        self.commit_interval_s = interval_s
        self.handled = 0

    def input_topics(self) -> list[str]:
        return [self.topics.name("copy.in")]

    def handle(self, messages) -> None:
        for m in messages:
            self.produce(self.topics.name("copy.out"), m.value(), m.key())
        self.handled += len(messages)


def copy_topics(settings: Settings, partitions: int) -> tuple[str, str]:
    """A copier's input and output topics, made with that many partitions each."""
    topics = Topics(settings.namespace)
    src, out = topics.name("copy.in"), topics.name("copy.out")
    admin = kafka.admin(settings)  # kept until the futures are done: a dropped client cancels them
    for f in admin.create_topics([NewTopic(src, partitions, 1), NewTopic(out, partitions, 1)]).values():
        f.result(30)
    return src, out


def committed_total(settings: Settings, topic: str, group: str) -> int:
    c = kafka.consumer(settings, group)
    try:
        parts = kafka.partitions_of(settings, topic)
        return sum(max(tp.offset, 0) for tp in c.committed(parts, timeout=10))
    finally:
        c.close()


def test_a_worker_committing_at_an_interval_hands_partitions_over_without_handling_anything_twice(settings):
    """Two copiers in one group, the second joining mid-stream: the rebalance takes partitions from
    the first while batches it handled are not committed yet (a 2 s interval). It commits them
    before letting go (settle_on_revoke), so the second starts after them: every input is copied
    exactly once. Once the input pauses, everything handled is committed without waiting for the
    interval to pass again."""
    topics = Topics(settings.namespace)
    src, out = copy_topics(settings, partitions=6)
    producer = kafka.producer(settings)
    first, second = Copier(settings, 2.0), Copier(settings, 2.0)
    first.start()
    n = 0
    for phase in range(2):
        deadline = time.monotonic() + 4.0
        while time.monotonic() < deadline:  # a steady stream, keyed over every partition
            for _ in range(20):
                kafka.produce(producer, src, str(n).encode(), f"k{n % 17}")
                n += 1
            producer.flush(10)
            time.sleep(0.02)
        if phase == 0:
            second.start()  # a rebalance while the first has handled and not committed
    group = topics.group("copier")
    deadline = time.monotonic() + 30
    while first.handled + second.handled < n and time.monotonic() < deadline:
        time.sleep(0.1)
    paused_at = time.monotonic()
    while committed_total(settings, src, group) < n and time.monotonic() - paused_at < 30:
        time.sleep(0.1)
    committed_after_s = time.monotonic() - paused_at
    for w in (first, second):
        w.stop()
    assert first.handled and second.handled, "the second copier took partitions over"
    assert first.handled + second.handled == n, "an input handled twice (or lost) across the rebalance"
    assert committed_total(settings, src, group) == n
    assert committed_after_s < 2.0, f"the pause's commit came {committed_after_s:.1f} s after the last batch"
    c = kafka.consumer(settings, "copy-reader")
    c.assign([TopicPartition(out, tp.partition, 0) for tp in kafka.partitions_of(settings, out)])
    copied = []
    while len(copied) < n:
        batch = [m.value() for m in c.consume(1000, 2.0) if m.error() is None]
        if not batch:
            break
        copied += batch
    c.close()
    assert sorted(copied, key=int) == [str(i).encode() for i in range(n)], "each input copied exactly once"


class FailingCopier(Copier):
    """Copies its first `good` messages, then fails a batch halfway: the messages it let go of in
    that batch were never produced (as the features service's merge can pop records and then fail)."""

    def __init__(self, settings: Settings, good: int) -> None:
        super().__init__(settings, interval_s=60.0)
        self.good = good

    def handle(self, messages) -> None:
        if self.handled + len(messages) > self.good:
            raise RuntimeError("a batch cut short")
        super().handle(messages)


def test_a_worker_whose_batch_fails_commits_nothing_it_did_not_produce(settings):
    """Closing the consumer of a failed loop hands its partitions back (a revoke): that must not
    commit the failed batch, whose inputs were consumed and never copied. The next owner reads
    them again."""
    topics = Topics(settings.namespace)
    src, _out = copy_topics(settings, partitions=1)
    producer = kafka.producer(settings)
    for n in range(100):
        kafka.produce(producer, src, str(n).encode(), "k")
    producer.flush(10)
    worker = FailingCopier(settings, good=30)
    worker.start()
    deadline = time.monotonic() + 30
    while worker.error is None and time.monotonic() < deadline:
        time.sleep(0.05)
    worker.stop()
    assert isinstance(worker.error, RuntimeError), worker.error
    assert 0 < worker.handled <= 30
    assert committed_total(settings, src, topics.group("copier")) <= worker.handled

"""How a stream worker makes what it handled durable: its commit policy, a collaborator of the
consume loop (`loop.StreamWorker`).

    worker = MyWorker(settings)                          # OffsetCommits: Kafka's committed offsets
    LearnerWorker(settings) -> CheckpointCommits()       # the learner's checkpoint is its commit

`OffsetCommits` commits only what the broker has acknowledged the outputs of: it waits for the
producer's acknowledgements, then commits (`StreamWorker.commit`: each partition's offset and the
event time reached there), after every batch or every `commit_interval_s` (Kafka Streams'
commit.interval.ms; at-least-once either way). A commit that a rebalance or a broker outage
refused is not fatal: the next one covers it, or the partitions' new owner reads the records again,
and an idle loop retries it until it goes through (others read the committed offsets: lag tools,
the learner asking how far upstream has got).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from confluent_kafka import KafkaError, KafkaException

from . import metrics
from .deps import DEPS, backoff_delays

if TYPE_CHECKING:
    from .loop import StreamWorker

log = logging.getLogger(__name__)

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


class OffsetCommits:
    """Commits through Kafka's consumer offsets, once the outputs are acknowledged."""

    def __init__(self, worker: StreamWorker) -> None:
        self.worker = worker
        self.owed = False  # a commit failed and no later one has gone through yet
        self._delays = None  # the Kafka backoff in progress (None: the last call went through)

    def settle(self) -> bool:
        """Wait for the broker to acknowledge everything produced, then commit what was handled.
        False = stopped while the broker was away (nothing is committed past unacknowledged output)."""
        started = time.perf_counter()
        if not self.flush_until_stopped():
            return False
        self.safe_commit()
        metrics.PROCESSING_SECONDS.labels(self.worker.service, "commit").observe(time.perf_counter() - started)
        return True

    def safe_commit(self) -> None:
        """commit(), shrugging off a commit that a rebalance or a broker outage refused: the next
        commit covers these records if the partitions are still ours, else their new owner reads
        them again. When no next batch comes (an idle service after an outage), the loop retries
        the commit itself (`retry`): a group's committed offsets must reach what it
        processed, since others read them (lag tools, the learner asking whether anything is
        still on its way)."""
        try:
            self.worker.commit()
        except KafkaException as exc:
            if not commit_failed_harmlessly(exc):
                raise
            DEPS.down("kafka", exc.args[0]) if exc.args[0].code() in (
                KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN, KafkaError._TIMED_OUT) else None
            (log.debug if self.owed else log.warning)(
                "%s: commit not done (%s); retried until it is, unless a next commit covers these records "
                "or the partitions' new owner reads them again", self.worker.service, exc.args[0])
            self.owed = True
            self.backoff()
        else:
            if self.owed:
                log.warning("%s: commit done after it had failed", self.worker.service)
            self.owed = False
            DEPS.up("kafka")
            self._delays = None
            self.worker.kafka_answered_at = time.monotonic()

    def retry(self) -> None:
        """On an idle loop: the commit that failed, again (safe_commit waits out its backoff between
        two failures, so this is no busy loop). Nothing left to commit counts as done."""
        try:
            self.safe_commit()
        except KafkaException as exc:
            err = exc.args[0] if exc.args else None
            if not (isinstance(err, KafkaError) and err.code() == KafkaError._NO_OFFSET):
                raise
            self.owed = False  # a rebalance or a later commit took care of them

    def backoff(self) -> None:
        """A pause between two failing Kafka calls (exponential, capped at 2 s; a stop cuts it short)."""
        if self._delays is None:
            self._delays = backoff_delays()
        self.worker.pause(next(self._delays))

    def flush_until_stopped(self) -> bool:
        """Wait for the broker to acknowledge what the batch produced (commit only after that), a
        second at a time so that a stop is still heard while Kafka is away. False = stopped first."""
        while self.worker.producer.flush(1.0) > 0:
            DEPS.down("kafka", f"{len(self.worker.producer)} produced messages not acknowledged")
            if self.worker.stopping():
                log.error("%s: stopping with %d messages not acknowledged by Kafka; their inputs are not "
                          "committed and will be read again", self.worker.service, len(self.worker.producer))
                return False
        return True


class CheckpointCommits:
    """The worker's own checkpoint is its commit (the learner's: its model with the offsets it
    consumed, in one write): nothing is flushed or committed per batch, and so a batch says nothing
    of Kafka's health either."""

    owed = False

    def settle(self) -> bool:
        return True

    def retry(self) -> None:
        """Nothing is owed."""

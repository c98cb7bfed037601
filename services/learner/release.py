"""Stores each batch's predictions in Redis and then publishes what they back, on a thread of its
own, in batch order, while the learner's loop goes on with the next batch.

Behind a backlog the learner is the one stage that cannot be spread over cores (it learns in
stream order), and it used to wait out one Redis round trip per batch before publishing: a
py-spy `--idle` profile of a `serve all` replay had ~6% of its loop's wall time in that wait,
longer while Redis was busy with the other services' scripts. The rule that made it wait stays:
a batch's predictions and outcomes go to Kafka only after its snapshots' predictions are in
Redis (outputs.py: after a crash, an outcome on the topic is re-learned from that snapshot), and
batches go out in the order they were handled. Only the loop no longer waits for it.

    release = Release(snapshots, produce, "default")
    release.submit(new_predictions, out.take())   # returns at once
    release.wait()          # before a checkpoint or an artifact: everything submitted is out

A batch that fails to store (Redis away beyond the client's outage wait) is not published, nor
is any after it: the error is raised in the loop at its next `submit` or `wait`, and the session
that starts over re-decides everything after its checkpoint, as for a crash (`settle`).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from ..features.store import Snapshots
from ..shared import metrics

log = logging.getLogger(__name__)
SERVICE = "learner"

Output = tuple[str, bytes, Any, Any]  # (topic, value, key, headers)
Produce = Callable[[str, bytes, Any, Any], None]


class Release:
    def __init__(self, snapshots: Snapshots, produce: Produce, name: str) -> None:
        self.snapshots = snapshots
        self.produce = produce
        self._batches: queue.Queue[tuple[list, list[Output]]] = queue.Queue()
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"learner-{name}-release", daemon=True)
        self._thread.start()

    def submit(self, predictions: list[tuple[str, dict[str, bytes]]], outputs: list[Output]) -> None:
        """Store `predictions` ((event_id, role -> encoded Prediction) pairs) in their snapshots,
        then produce `outputs`, after every batch submitted before."""
        self._raise_failure()
        if predictions or outputs:
            self._batches.put((predictions, outputs))

    def wait(self) -> None:
        """Every batch submitted is stored and handed to the producer (not yet acknowledged:
        the caller flushes when it needs that)."""
        self._batches.join()
        self._raise_failure()

    def settle(self) -> None:
        """A new session starts: let what was submitted go out (or, after a failure, be dropped),
        and forget the failure; the session re-decides everything after its checkpoint."""
        self._batches.join()
        if self._failure is not None:
            log.warning("learner: outputs after a failed Redis write were not published: %r", self._failure)
        self._failure = None

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure

    def _run(self) -> None:
        while True:
            predictions, outputs = self._batches.get()
            try:
                if self._failure is None:  # after a failure nothing more goes out (order)
                    self._store(predictions)
                    for output in outputs:
                        self.produce(*output)
            except BaseException as exc:  # handed to the loop, which starts over
                self._failure = exc
            finally:
                self._batches.task_done()

    def _store(self, predictions: list[tuple[str, dict[str, bytes]]]) -> None:
        if not predictions:
            return
        pipe = self.snapshots.client.pipeline(transaction=False)
        self.snapshots.queue_predictions_if_present(pipe, predictions, keep_existing=True)
        started = time.perf_counter()
        pipe.execute()
        metrics.REDIS_SECONDS.labels(SERVICE, "write").observe(time.perf_counter() - started)

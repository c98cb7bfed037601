"""The stream services' loop (shared/runtime.py) against a Kafka that is not there."""

from __future__ import annotations

import threading
import time

from driftline.infra import stack
from driftline.shared.runtime import StreamWorker
from driftline.shared.settings import Settings


def test_a_worker_waiting_for_kafka_to_acknowledge_still_hears_stop():
    # Nothing listens on this port: the produced message can never be acknowledged. Before, the
    # loop's flush() had no timeout and a service could not be stopped while Kafka was away.
    worker = StreamWorker(Settings(kafka_bootstrap=f"127.0.0.1:{stack.free_port()}"))
    worker.produce("nowhere", b"x")
    threading.Timer(1.5, worker._stop.set).start()
    started = time.monotonic()
    assert worker.flush_until_stopped() is False  # not acknowledged: the caller must not commit
    assert time.monotonic() - started < 10
    assert len(worker.producer) == 1

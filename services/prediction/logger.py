"""Background logging of served predictions to the `predictions` topic.

The answer to a request must never wait for Kafka. `PredictionLog.log` hands the encoded record to
confluent-kafka's own in-memory queue (bounded by `settings.prediction.log_queue`) and returns at
once; librdkafka's threads deliver it, and a small poll thread here runs the delivery callbacks.
When the queue is full or a delivery fails (Kafka down longer than `log_timeout_ms`), the record
is dropped and counted in `driftline_prediction_log_dropped_total{reason}`; the service keeps
answering. It must never block, retry in the request path, or raise into a request.

    plog = PredictionLog(settings)
    plog.start()
    plog.log(prediction_dict)        # returns immediately
    plog.stop()                      # flushes what it can
"""

from __future__ import annotations

import logging
import time
from typing import Any

from confluent_kafka import KafkaError

from ..shared import kafka, metrics
from ..shared.codec import get_codec
from ..shared.framing import OUTPUT
from ..shared.schema_registry import prepare_output
from ..shared.settings import Settings
from ..shared.threads import BackgroundThread
from ..shared.topics import Topics

log = logging.getLogger(__name__)
SERVICE = "prediction"


class PredictionLog(BackgroundThread):
    thread_name = "prediction-log"

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        self.topic = Topics(settings.namespace).predictions
        self.codec = get_codec()
        prepare_output(settings)  # `predictions` in the Confluent wire format, when the settings say so
        self.producer = kafka.producer(
            settings,
            **{
                "queue.buffering.max.messages": max(1, settings.prediction.log_queue),
                "message.timeout.ms": max(1, settings.prediction.log_timeout_ms),
                "linger.ms": 2,
                "logger": log,  # librdkafka's own complaints go to our logs, not raw stderr
            },
        )
        self.delivered = 0
        self.dropped = 0

    def log(self, prediction: dict[str, Any], key: str | None = None) -> bool:
        """Queue one Prediction record; False (and counted) when it had to be dropped."""
        try:
            blob = OUTPUT.frame(self.topic, self.codec.encode("Prediction", prediction))
            self.producer.produce(self.topic, value=blob, key=key or prediction["entity_id"],
                                  on_delivery=self._delivered)
            return True
        except BufferError:
            self._drop("queue_full")
        except Exception:  # a client error must cost one log record, never the answer
            log.exception("could not queue a prediction for logging")
            self._drop("produce_error")
        return False

    def _delivered(self, err: KafkaError | None, _msg) -> None:
        if err is None:
            self.delivered += 1
            metrics.MESSAGES_OUT.labels(SERVICE, "predictions").inc()
            return
        reason = "timeout" if err.code() == KafkaError._MSG_TIMED_OUT else "delivery_failed"
        self._drop(reason)

    def _drop(self, reason: str) -> None:
        self.dropped += 1
        metrics.PREDICTION_LOG_DROPPED.labels(reason).inc()

    # -- the poll thread: runs delivery callbacks ---------------------------------------------
    def _guarded_run(self) -> None:
        while not self._stop.is_set():
            try:
                self.producer.poll(0.1)
            except Exception:  # keep serving callbacks whatever one of them did
                log.exception("prediction log poll failed")
                time.sleep(0.1)

    def pending(self) -> int:
        return len(self.producer)

    def stop(self, timeout: float = 5.0) -> None:
        super().stop(timeout)
        left = self.producer.flush(timeout)
        if left:
            log.warning("%d predictions were not logged at shutdown", left)
            self.dropped += left
            metrics.PREDICTION_LOG_DROPPED.labels("shutdown").inc(left)

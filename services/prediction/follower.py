"""The follower: keeps this process serving the registry's champion, at its latest revision.

It reads `model.swaps` (a new champion) and `model.updates` (the champion learned more) and loads
the model they name on its own thread, then swaps the serving reference (`ModelHolder`): the
request path never loads, unpickles or waits. Every replica and every uvicorn worker must see
every message, so each follower has its own consumer group (`...prediction.<host>-<pid>-<rand>`)
and never commits: it starts from "now" and the registry is the truth for what came before.

Start-up order closes the gap between "what the registry says" and "what the topic says next":
read the topics' end offsets, assign the consumer there, THEN read the registry. A message
published in between is read (and is harmless if it names what already serves). A slow
reconcile every `reconcile_s` also re-reads the registry, so a message lost while Kafka was down
still lands. The loop: consume -> decode -> load + swap -> observe the swap time.

    follower = ModelFollower(settings, holder, registry)
    follower.start()      # background thread
    follower.stop()
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid

from confluent_kafka import OFFSET_END, KafkaException, TopicPartition

from ..shared import kafka, metrics
from ..shared.codec import DecodeError, get_codec
from ..shared.registry import ModelRegistry
from ..shared.settings import Settings
from ..shared.topics import Topics
from .models import ModelHolder

log = logging.getLogger(__name__)
SERVICE = "prediction"


def replica_group(topics: Topics) -> str:
    """A consumer group of its own for this process (host, pid and a random part)."""
    return topics.group(SERVICE, f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}")


class ModelFollower:
    reconcile_s = 10.0
    retry_s = 1.0

    def __init__(self, settings: Settings, holder: ModelHolder, registry: ModelRegistry) -> None:
        self.settings = settings
        self.holder = holder
        self.registry = registry
        self.topics = Topics(settings.namespace)
        self.codec = get_codec()
        self.group = replica_group(self.topics)
        self.assigned = False  # True once the consumer follows both topics
        self.messages = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the loop -----------------------------------------------------------------------------
    def run(self) -> None:
        consumer = kafka.consumer(self.settings, self.group, **{"logger": log})
        try:
            self._assign_at_end(consumer)
            self._reconcile()
            last_reconcile = time.monotonic()
            while not self._stop.is_set():
                msg = consumer.poll(0.2)
                if msg is not None and msg.error() is None:
                    self.messages += 1
                    metrics.MESSAGES_IN.labels(SERVICE, kafka.base_topic(msg.topic())).inc()
                    self._guarded(self.handle, msg.value(), msg.topic())
                elif msg is not None:
                    log.warning("model follower: consumer error %s", msg.error())
                if time.monotonic() - last_reconcile > self.reconcile_s:
                    self._reconcile()
                    last_reconcile = time.monotonic()
        finally:
            consumer.close()

    def handle(self, blob: bytes, topic: str) -> None:
        """One model.swaps or model.updates message: load what it names, if it is ours."""
        base = kafka.base_topic(topic)
        record = self.codec.decode(blob, expect="ModelSwap" if base == "model.swaps" else "ModelUpdate")
        if record["model"] != self.holder.model_name:
            return
        if base == "model.swaps":
            target = record["to_version"]
        else:
            # An update of a version that is not the champion here (a challenger's, or one that
            # arrived before its swap) is not ours to serve: ask the registry who is champion.
            current = self.holder.current
            target = record["version"]
            if current is None or current.version != target:
                target = self.registry.champion()
                if target is None:
                    return
        before = self.holder.current
        served = self.holder.load(self.registry, target)
        if served is not None and served is not before:
            metrics.SWAP_SECONDS.observe(max(0.0, time.time() - float(record["ts"])))

    # -- helpers around the loop --------------------------------------------------------------
    def _assign_at_end(self, consumer) -> None:
        """Follow both topics from their current end, retrying until Kafka answers."""
        names = [self.topics.model_swaps, self.topics.model_updates]
        while not self._stop.is_set():
            try:
                parts = []
                for name in names:
                    meta = consumer.list_topics(name, timeout=5.0).topics[name]
                    if meta.error is not None:
                        raise KafkaException(meta.error)
                    for p in sorted(meta.partitions):
                        _low, high = consumer.get_watermark_offsets(TopicPartition(name, p), timeout=5.0)
                        parts.append(TopicPartition(name, p, high if high >= 0 else OFFSET_END))
                consumer.assign(parts)
                self.assigned = True
                log.info("model follower %s follows %s from their end", self.group, names)
                return
            except KafkaException as exc:
                log.warning("model follower: Kafka does not answer yet (%s); retrying", exc)
                self._reconcile()  # meanwhile the registry alone keeps us on the champion
                self._stop.wait(self.retry_s)

    def _reconcile(self) -> None:
        self._guarded(self.holder.sync_champion, self.registry)

    def _guarded(self, fn, *args) -> None:
        try:
            fn(*args)
        except DecodeError as exc:
            log.error("model follower: unreadable message (%s); skipped", exc)
        except Exception:  # Redis hiccup, bad artifact...: keep serving what we have, keep following
            log.exception("model follower: could not apply a model change; still serving the current model")

    # -- thread control -----------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._guarded_run, name="model-follower", daemon=True)
        self._thread.start()

    def _guarded_run(self) -> None:
        while not self._stop.is_set():
            try:
                self.run()
            except Exception:
                log.exception("model follower died; restarting it")
                self._stop.wait(self.retry_s)

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

"""The learner's metrics: per-role accuracy gauges, versions, and counters resolved once.

    telemetry = Telemetry("default")
    telemetry.count("predictions", "champion"); telemetry.flush_counts(); telemetry.export(roles)

Label lookups on a prometheus metric cost more than the increment itself, so each child is
looked up once and kept; gauges of a version that leaves a role are removed (one series per
live version and role).
"""

from __future__ import annotations

from typing import Any

from ..shared import metrics
from ..shared.kafka import base_topic
from .champion import Roles, Slot
from .labels import is_regressor

SERVICE = "learner"


class Telemetry:
    def __init__(self, model: str) -> None:
        self.model = model
        self._children: dict[Any, Any] = {}
        # Counted per event, added to the metrics once per loop (`flush_counts`, from the worker's
        # tick): each increment of a prometheus child takes a lock, ~5% of the learner at full speed.
        self._counts: dict[Any, int] = {}
        self._error_version: str | None = None

    def sent(self, topic: str) -> None:
        self._counts[topic] = self._counts.get(topic, 0) + 1

    def count(self, what: str, role: str) -> None:
        """`predictions` made or examples `learned` by a role."""
        key = (what, role)
        self._counts[key] = self._counts.get(key, 0) + 1

    def _child(self, key: Any) -> Any:
        child = self._children.get(key)
        if child is None:
            if isinstance(key, str):
                child = metrics.MESSAGES_OUT.labels(SERVICE, base_topic(key))
            elif key[0] == "predictions":
                child = metrics.PREDICTIONS.labels(SERVICE, self.model, key[1])
            else:
                child = metrics.EXAMPLES_LEARNED.labels(self.model, key[1])
            self._children[key] = child
        return child

    def flush_counts(self) -> None:
        counts, self._counts = self._counts, {}
        for key, n in counts.items():
            self._child(key).inc(n)

    def export(self, roles: Roles | None, error_rate: float | None = None) -> None:
        """Each public role's figures; `error_rate`: what the drift policy sees of the champion."""
        if roles is not None and error_rate is not None:
            version = str(roles.champion.version)
            if self._error_version not in (None, version):
                try:  # one series per live version
                    metrics.ERROR_RATE.remove(self.model, self._error_version)
                except KeyError:
                    pass
            self._error_version = version
            metrics.ERROR_RATE.labels(self.model, version).set(error_rate)
        for slot in roles.slots() if roles else ():
            labels = (self.model, str(slot.version), slot.role)
            if is_regressor(slot.model):  # a regressor's figures; accuracy would be a meaningless 0
                metrics.MAE.labels(*labels).set(slot.stats.mae)
                metrics.RMSE.labels(*labels).set(slot.stats.rmse)
                metrics.R2.labels(*labels).set(slot.stats.r2)
                metrics.WINDOW_MAE.labels(*labels).set(slot.stats.window_mae)
            else:
                metrics.ACCURACY.labels(*labels).set(slot.stats.accuracy)
                metrics.WINDOW_ACCURACY.labels(*labels).set(slot.stats.window_accuracy)
                metrics.LOG_LOSS.labels(*labels).set(slot.stats.log_loss)
        self.versions(roles)

    def versions(self, roles: Roles | None) -> None:
        champion = roles.champion.version if roles else 0
        challenger = roles.challenger.version if roles and roles.challenger else 0
        metrics.MODEL_VERSION.labels(self.model, "champion").set(champion)
        metrics.MODEL_VERSION.labels(self.model, "challenger").set(challenger)

    def retire(self, *slots: Slot) -> None:
        for slot in slots:
            for gauge in (gauge for gauges in metrics.TASK_GAUGES.values() for gauge in gauges):
                try:
                    gauge.remove(self.model, str(slot.version), slot.role)
                except KeyError:
                    pass

"""The retraining policy: which outcome, alarm, clock tick or demand becomes a retrain request.

Pure logic, no I/O: the drift service feeds it champion outcomes, model swaps and clock ticks, and
publishes what it returns. Every trigger is configurable (`DriftSettings`) and every request
carries its reason:

- concept_drift  the champion's error rate went UP by >= `min_error_increase` at a drift alarm
- data_drift     a feature's distribution moved (only if `data_drift_retrains`)
- schedule       every `on_schedule_s` seconds
- new_data       every `on_new_data` labels
- performance    rolling accuracy over `accuracy_window` labels under `on_accuracy_below`
- demand         a person asked (`driftline retrain`, POST /v1/retrain)

A cooldown of `cooldown` labelled examples holds back automatic requests after one was made, so
one drift does not start a storm of retrainings; demand requests are never held back.

    >>> policy = RetrainPolicy(DriftSettings(on_new_data=100, cooldown=0), model="default")
    >>> out = [a for p in range(300) for a in policy.observe(p, correct=True, version=1)]
    >>> [a.record["reason"] for a in out if a.kind == "retrain"]
    ['new_data', 'new_data', 'new_data']

It never resets a model or a detector because of an alarm whose error went down.
"""

from __future__ import annotations

import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ..shared.settings import DriftSettings
from ..shared.vocabulary import AUTOMATIC_RETRAIN_REASONS, RETRAIN_REASONS
from .detectors import WARNING_DETECTORS, ConceptMonitor

AUTOMATIC, REASONS = AUTOMATIC_RETRAIN_REASONS, RETRAIN_REASONS
WARNING_SPACING = 1000  # labelled examples between two published warnings (DDM/HDDM warn often)


@dataclass
class Action:
    """What the service must do: publish a drift event or a retrain request, or count a
    suppressed trigger (`record` then holds {"reason": ...})."""

    kind: str  # drift | retrain | suppressed | ignored
    record: dict[str, Any] = field(default_factory=dict)


class RetrainPolicy:
    def __init__(self, settings: DriftSettings, model: str, clock=time.time) -> None:
        self.settings = settings
        self.model = model
        self.clock = clock
        self.version: int | None = None  # champion version being watched
        self.retired: set[int] = set()  # versions we moved away from: their late outcomes are stale
        self.position = -1  # last champion outcome position handled (restarts skip what is done)
        self.last_retrain: int | None = None  # position of the last automatic retrain request
        self.last_schedule = clock()
        self.last_warning: int | None = None
        self.monitor = self._new_monitor()
        self.accuracy: deque[int] = deque(maxlen=max(1, settings.accuracy_window))
        self.performance_armed_at = 0  # position from which the performance trigger may fire again
        self.outcomes_since_swap = 0

    def _new_monitor(self) -> ConceptMonitor:
        return ConceptMonitor(self.settings.detector, self.settings.detector_params,
                              self.settings.min_error_increase)

    # -- inputs -------------------------------------------------------------------------------
    def observe(self, position: int, correct: bool, version: int, error: float | None = None) -> list[Action]:
        """One champion outcome, in stream order; a regressor's brings its `error` (the residual),
        which the monitor watches instead of the hit. Returns what to publish."""
        if position <= self.position:
            return []  # already handled before a restart
        if version != self.version:
            if version in self.retired:
                return [Action("ignored", {"reason": "stale_version"})]
            self._watch(version)
        self.position = position
        self.outcomes_since_swap += 1
        actions: list[Action] = []
        if error is None:
            self.accuracy.append(1 if correct else 0)
            alarm = self.monitor.update(not correct)
        else:
            alarm = self.monitor.update(abs(float(error)))
        if alarm is not None and alarm.direction == "up":
            actions += self._on_concept_alarm(alarm)
        n = self.settings.on_new_data
        if n > 0 and (position + 1) % n == 0:
            actions += self._automatic("new_data")
        actions += self._check_performance()
        return actions

    def swap(self, to_version: int) -> None:
        """A new champion (promotion or rollback): watch it from scratch."""
        self.retired.discard(to_version)
        if to_version != self.version:
            self._watch(to_version)

    def tick(self) -> list[Action]:
        """Clock-driven triggers (call between batches)."""
        every = self.settings.on_schedule_s
        if every <= 0 or self.clock() - self.last_schedule < every:
            return []
        self.last_schedule = self.clock()
        return self._automatic("schedule")

    def data_drift(self, feature: str, statistic: float, detector: str) -> list[Action]:
        """A feature's distribution moved: publish it; ask for retraining only if configured."""
        event = self._drift_event("data", "drift", detector, feature=feature, statistic=statistic)
        actions = [Action("drift", event)]
        if self.settings.data_drift_retrains:
            actions += self._automatic("data_drift", drift_id=event["drift_id"])
        return actions

    def demand(self, reason: str = "demand") -> Action:
        """An on-demand request: never held back by the cooldown."""
        if reason not in REASONS:
            raise ValueError(f"unknown retrain reason {reason!r}; choose from {', '.join(REASONS)}")
        return Action("retrain", self._request(reason, stable=False))

    # -- state ----------------------------------------------------------------------------------
    @property
    def error_rate(self) -> float:
        return self.monitor.error_rate

    @property
    def rolling_accuracy(self) -> float | None:
        return sum(self.accuracy) / len(self.accuracy) if self.accuracy else None

    def cooling_down(self, position: int | None = None) -> bool:
        pos = self.position if position is None else position
        return self.last_retrain is not None and pos - self.last_retrain < self.settings.cooldown

    # -- triggers ---------------------------------------------------------------------------------
    def _watch(self, version: int) -> None:
        if self.version is not None:
            self.retired.add(self.version)
        self.version = version
        self.monitor = self._new_monitor()
        self.accuracy.clear()
        self.outcomes_since_swap = 0
        self.performance_armed_at = self.position + 1
        self.last_warning = None

    def _on_concept_alarm(self, alarm) -> list[Action]:
        if alarm.level == "warning":
            if self.settings.detector not in WARNING_DETECTORS:
                return []
            if self.last_warning is not None and self.position - self.last_warning < WARNING_SPACING:
                return []
            self.last_warning = self.position
        event = self._drift_event("concept", alarm.level, self.settings.detector,
                                  error_before=alarm.error_before, error_after=alarm.error_after)
        actions = [Action("drift", event)]
        if alarm.level == "drift":
            # The monitor knows where the error rate changed: the challenger should warm-start on
            # the new regime only, not on the pre-drift examples that fill the last W.
            since = max(self.position - alarm.recent + 1, 0)
            actions += self._automatic("concept_drift", drift_id=event["drift_id"], since_position=since)
        return actions

    def _check_performance(self) -> list[Action]:
        threshold = self.settings.on_accuracy_below
        if threshold <= 0 or len(self.accuracy) < self.accuracy.maxlen:
            return []
        if self.position < self.performance_armed_at:
            return []
        accuracy = self.rolling_accuracy
        if accuracy is None or accuracy >= threshold:
            return []
        # At most one attempt per window: a fresh window must again be under the threshold.
        self.performance_armed_at = self.position + self.accuracy.maxlen
        return self._automatic("performance")

    def _automatic(self, reason: str, drift_id: str | None = None, since_position: int | None = None) -> list[Action]:
        if self.cooling_down():
            return [Action("suppressed", {"reason": reason, "drift_id": drift_id})]
        self.last_retrain = max(self.position, 0)
        return [Action("retrain", self._request(reason, drift_id, since_position, stable=reason != "schedule"))]

    # -- records ----------------------------------------------------------------------------------
    def _request(self, reason: str, drift_id: str | None = None, since_position: int | None = None,
                 stable: bool = True) -> dict[str, Any]:
        """`stable`: a decision of the stream (its id follows from where it was taken); a demand
        or a schedule is not, and gets a fresh id each time."""
        request_id = decision_id(self.model, reason, self.version, self.position) if stable else None
        return retrain_request(self.model, reason, version=self.version, position=self.position,
                               drift_id=drift_id, ts=self.clock(), since_position=since_position,
                               request_id=request_id)

    def _drift_event(self, kind: str, level: str, detector: str, *, feature: str | None = None,
                     error_before: float | None = None, error_after: float | None = None,
                     statistic: float | None = None) -> dict[str, Any]:
        return {
            "drift_id": decision_id(self.model, kind, level, self.version, self.position, feature or ""),
            "model": self.model,
            "model_version": self.version or 0,
            "kind": kind,
            "level": level,
            "detector": detector,
            "feature": feature,
            "position": max(self.position, 0),
            "error_before": error_before,
            "error_after": error_after,
            "statistic": statistic,
            "ts": self.clock(),
        }

    # -- persistence --------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """What survives a restart: positions, cooldown, versions, and the detector itself."""
        return {
            "config": self._config(),
            "version": self.version,
            "retired": sorted(self.retired),
            "position": self.position,
            "last_retrain": self.last_retrain,
            "last_schedule": self.last_schedule,
            "last_warning": self.last_warning,
            "performance_armed_at": self.performance_armed_at,
            "outcomes_since_swap": self.outcomes_since_swap,
            "monitor": self.monitor,
            "accuracy": list(self.accuracy),
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.version = state.get("version")
        self.retired = set(state.get("retired", []))
        self.position = int(state.get("position", -1))
        self.last_retrain = state.get("last_retrain")
        self.last_schedule = float(state.get("last_schedule", self.clock()))
        self.last_warning = state.get("last_warning")
        self.performance_armed_at = int(state.get("performance_armed_at", 0))
        self.outcomes_since_swap = int(state.get("outcomes_since_swap", 0))
        # A detector built under other settings is not what the operator asked for now.
        if state.get("config") == self._config() and isinstance(state.get("monitor"), ConceptMonitor):
            self.monitor = state["monitor"]
            self.accuracy.extend(state.get("accuracy", [])[-self.accuracy.maxlen:])

    def _config(self) -> dict[str, Any]:
        s = self.settings
        return {"detector": s.detector, "params": dict(s.detector_params),
                "min_error_increase": s.min_error_increase, "accuracy_window": s.accuracy_window}


def decision_id(*parts: Any) -> str:
    """A stable id for a decision taken at a given point of the stream: the same stream makes the
    same ids, so a consumer (or a learner that restarts and takes the decision again) can tell a
    repeat from a new one.

        >>> decision_id("default", "concept_drift", 1, 4170) == decision_id("default", "concept_drift", 1, 4170)
        True
    """
    return uuid.uuid5(uuid.NAMESPACE_URL, "driftline:" + "/".join(map(str, parts))).hex


def retrain_request(model: str, reason: str, *, version: int | None, position: int,
                    drift_id: str | None = None, ts: float | None = None,
                    since_position: int | None = None, request_id: str | None = None) -> dict[str, Any]:
    """A RetrainRequest record (schemas/RetrainRequest.avsc); a random id unless one is given."""
    if reason not in REASONS:
        raise ValueError(f"unknown retrain reason {reason!r}; choose from {', '.join(REASONS)}")
    return {
        "request_id": request_id or uuid.uuid4().hex,
        "model": model,
        "reason": reason,
        "drift_id": drift_id,
        "model_version": version,
        "position": max(int(position), 0),
        "since_position": since_position,
        "ts": time.time() if ts is None else ts,
    }

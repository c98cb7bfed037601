"""Concept-drift detection on a model's 0/1 errors, reacting only when the error rate went UP.

River's detectors alarm on any change of the mean: ADWIN fires just as readily when a model gets
*better* (a young tree learning, a new champion settling in), and a retrain or reset on every alarm
is harmful (on a stationary stream it can cost 15 points of accuracy). So `ConceptMonitor` keeps
its own short error history and, on each alarm, measures the error rate before and after the
change point; only an increase of at least `min_error_increase` counts as concept drift.

    >>> monitor = ConceptMonitor("ADWIN", {}, min_error_increase=0.02)
    >>> alarms = [monitor.update(i >= 2000 and i % 2 == 0 or i % 10 == 0) for i in range(3000)]
    >>> [(a.position, a.direction) for a in alarms if a][0][1]
    'up'

A regressor's outcomes bring real-valued errors (absolute residuals, `update(3.7)`): the same
monitor watches them (ADWIN, KSWIN and Page-Hinkley take real values; the binary detectors get
"above the running mean error"), the change point splits the residuals, and "up" means the mean
absolute error rose by at least `min_error_increase` *relative* to before (0.02 = 2%), confirmed
by Welch's z on the two sides:

    >>> monitor = ConceptMonitor("ADWIN", {}, min_error_increase=0.02)
    >>> alarms = [monitor.update(float(1 + (i % 7) / 7 + (3 if i >= 2000 else 0))) for i in range(3000)]
    >>> [(a.direction, a.error_after > a.error_before) for a in alarms if a][0]
    ('up', True)

A large step is flagged within a few errors of it (ADWIN: 3 residuals after a 10-fold rise),
while the split keeps at least `min_side` errors on each side, most of the newest from before the
step: too few to call it a rise. Such an alarm, whose best split is the newest one allowed, is
judged once more `min_side` errors later, and counts as "up" then if it is one.

It must never raise on odd input (anything truthy is an error) and never keep unbounded memory.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections import deque
from dataclasses import dataclass
from typing import Any

from river import drift

from ..shared.vocabulary import DRIFT_DETECTORS, WARNING_DETECTORS

# A regressor's error beyond this counts as this: the squares the statistics take (a variance, a
# change point's score, RMSE) then stay finite doubles over thousands of errors. A diverged model
# can answer 1e200 from inputs in range, and Python raises OverflowError on 1e200 ** 2.
MAX_ABS_ERROR = 1e100

DETECTORS = tuple(DRIFT_DETECTORS)
Z_UP = 3.0  # z-score a rise of the error rate needs to count as "up"
# Integer-valued parameters, so that a TOML/env float (e.g. 100.0) still builds the detector.
_INT_PARAMS = {"clock", "max_buckets", "min_window_length", "grace_period", "min_instances", "window_size",
               "stat_size", "warm_start", "seed"}


def make_detector(name: str, params: dict[str, Any] | None = None):
    """A fresh river detector by its config name, e.g. `make_detector("DDM", {"warm_start": 50})`."""
    if name not in DRIFT_DETECTORS:
        raise ValueError(f"unknown drift detector {name!r}; choose from {', '.join(DETECTORS)}")
    path, defaults = DRIFT_DETECTORS[name]
    params = {k: int(v) if k in _INT_PARAMS else v for k, v in {**defaults, **(params or {})}.items()}
    return functools.reduce(getattr, path.split("."), drift)(**params)


@dataclass(frozen=True)
class Alarm:
    """One detector alarm with its evidence. `direction` is up | down | flat."""

    level: str  # warning | drift
    position: int  # index of the error that raised it (0-based, since the monitor started)
    error_before: float
    error_after: float
    direction: str
    recent: int  # how many errors the "after" rate is measured on


class ConceptMonitor:
    """A river detector on one model version's errors plus the "did the error go up?" gate.

    `update(error)` returns an `Alarm` when the detector enters its warning zone or detects drift
    (warnings only for DDM/HDDM), otherwise None. The caller acts only on `direction == "up"`.
    """

    def __init__(
        self,
        detector: str = "ADWIN",
        params: dict[str, Any] | None = None,
        min_error_increase: float = 0.02,
        history: int = 5000,
        recent: int = 200,
        min_side: int = 30,
        warmup: int = 200,
    ) -> None:
        self.name = detector
        self.params = dict(params or {})
        self.detector = make_detector(detector, self.params)
        self.min_error_increase = min_error_increase
        self.errors: deque[int] = deque(maxlen=history)  # bounded: the last `history` errors
        self.recent = recent  # the "after" window of detectors that do not say where the change was
        self.min_side = min_side
        self.warmup = warmup  # alarms on the first errors of a version are noise, not drift
        self.n = 0  # errors seen
        self.segment_start = 0  # first position of the current regime (after the last change)
        self.warning_since: int | None = None
        self.total_errors = 0
        self.real = False  # real-valued errors (a regressor's absolute residuals)
        # A drift alarm whose change point fell in its last `min_side` errors (a large step is
        # detected within a few errors): judged again, once, `min_side` errors later. (n then, the
        # position the alarm's span started at.)
        self.rejudge: tuple[int, int] | None = None

    @property
    def error_rate(self) -> float:
        """Error rate of the current regime, over at most the last `recent` errors."""
        k = min(len(self.errors), max(self.recent, 1), self.n - self.segment_start)
        return self._mean_last(k, 0) if k > 0 else 0.0

    def update(self, error: Any) -> Alarm | None:
        if isinstance(error, float) and math.isfinite(error):
            self.real = True
        if getattr(self, "real", False):  # (monitors pickled before regression have no `real`)
            x = min(abs(float(error)), MAX_ABS_ERROR) if isinstance(error, (int, float)) and math.isfinite(error) \
                else 0.0
            binary = x > (self.total_errors / self.n if self.n else 0.0)
        else:
            x = 1 if error else 0
            binary = bool(x)
        position = self.n
        self.n += 1
        self.errors.append(x)
        self.total_errors += x
        width_before = getattr(self.detector, "width", None) if self.name == "ADWIN" else None
        self.detector.update(binary if self.name in WARNING_DETECTORS else x)
        if self.detector.drift_detected:
            self.warning_since = None
            if self.n <= self.warmup:
                self.segment_start = self.n  # too early to judge: start the regime afresh
                return None
            return self._alarm("drift", position, width_before)
        due = getattr(self, "rejudge", None)  # (monitors pickled before it have none)
        if due is not None and self.n >= due[0]:
            self.rejudge = None
            alarm = self._alarm("drift", position, None, since=due[1])
            if alarm.direction == "up":
                return alarm
        warning = bool(getattr(self.detector, "warning_detected", False)) and self.n > self.warmup
        if warning and self.warning_since is None:
            self.warning_since = position
            return self._alarm("warning", position, None)
        if not warning:
            self.warning_since = None
        return None

    # -- evidence -----------------------------------------------------------------------------
    def _alarm(self, level: str, position: int, width_before: int | None, since: int | None = None) -> Alarm:
        # The current regime: since the last change (or, for ADWIN, its window before this update),
        # within the bounded history; judged again: since where the first judgement's span began.
        span = self.n - (self.segment_start if since is None else since)
        if width_before is not None:
            span = min(span, int(width_before) + 1)
        span = min(span, len(self.errors))
        cut, before, after = change_point(list(itertools.islice(self.errors, len(self.errors) - span, None)),
                                          self.min_side)
        recent = span - cut
        delta = after - before
        # "Up" needs a material rise (min_error_increase) that is also no fluke of a short window:
        # a one-sided two-proportion z-test at Z_UP on the split (sensitive detectors such as HDDM_W
        # otherwise alarm on noise over a few dozen errors).
        if getattr(self, "real", False):  # residuals: a relative rise of the mean, Welch's z
            window = list(itertools.islice(self.errors, len(self.errors) - span, None))
            se = math.sqrt(max(_var(window[:cut]) / max(cut, 1) + _var(window[cut:]) / max(recent, 1), 1e-12))
            material = delta >= self.min_error_increase * max(before, 1e-12)
        else:
            pooled = (before * cut + after * recent) / max(1, span)
            se = math.sqrt(max(pooled * (1 - pooled), 1e-12) * (1 / max(cut, 1) + 1 / max(recent, 1)))
            material = delta >= self.min_error_increase
        if material and delta / se >= Z_UP:
            direction = "up"
        else:
            direction = "down" if delta < 0 else "flat"
        if level == "drift" and (since is None or direction == "up"):
            self.segment_start = self.n - recent  # the new regime starts at the change point
            # Too recent to judge (a first judgement, here, when not "up"): the best split left the
            # least it may on the newest side.
            too_recent = direction != "up" and span >= 2 * self.min_side and recent == self.min_side
            self.rejudge = (self.n + self.min_side, self.n - span) if too_recent else None
        return Alarm(level, position, round(before, 6), round(after, 6), direction, recent)

    def _mean_last(self, k: int, skip: int) -> float:
        """Mean of `k` errors ending `skip` errors before the newest."""
        if k <= 0:
            return 0.0
        end = len(self.errors) - skip
        start = max(0, end - k)
        window = itertools.islice(self.errors, start, end)
        return sum(window) / max(1, end - start)


def _var(xs: list[float]) -> float:
    if len(xs) < 2:
        return 0.0
    mean = sum(xs) / len(xs)
    return sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)


def change_point(errors: list[float], min_side: int = 30) -> tuple[int, float, float]:
    """The most likely single change of mean in `errors`: (cut, mean before, mean after).

    Maximises n1 * n2 / n * (m1 - m2) ** 2 over cuts leaving at least `min_side` on each side
    (the likelihood-ratio split of a Gaussian mean change). Detectors say *that* the mean changed,
    mostly not *where*; ADWIN, for one, may keep pre-change errors in its shrunk window.

        >>> change_point([0] * 100 + [1] * 50)
        (100, 0.0, 1.0)
    """
    n = len(errors)
    if n < 2 * min_side:
        half = n // 2
        if half == 0:
            return 0, 0.0, float(errors[0]) if errors else 0.0
        left, right = errors[:half], errors[half:]
        return half, sum(left) / len(left), sum(right) / len(right)
    total = sum(errors)
    prefix = 0
    best, best_cut = -1.0, min_side
    for i, x in enumerate(errors[: n - min_side], start=1):
        prefix += x
        if i < min_side:
            continue
        m1 = prefix / i
        m2 = (total - prefix) / (n - i)
        score = i * (n - i) / n * (m1 - m2) ** 2
        if score > best:
            best, best_cut = score, i
    before = sum(errors[:best_cut]) / best_cut
    after = sum(errors[best_cut:]) / (n - best_cut)
    return best_cut, before, after

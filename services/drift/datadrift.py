"""Data drift: per feature, the Population Stability Index of a recent window against a reference.

The first `window` values of a feature fix its bins (deciles of the reference, plus one bin below
its minimum and one above its maximum, so that a constant or discrete feature still has bins) and
the reference proportions; then a sliding window of the last `window` values is compared with it
every `window // 5` values. PSI >= `threshold` is data drift; the next `window` values then
become the new reference, so one shift raises one alarm, not one per check.

    >>> monitor = DataDriftMonitor(window=200, threshold=0.25)
    >>> alarms = [a for i in range(1000) for a in monitor.update({"x": float(i % 10 + (50 if i > 600 else 0))})]
    >>> [(a.feature, a.position > 600) for a in alarms]
    [('x', True)]

Memory is bounded (`max_features` features, each two windows of bin indices); the cost per value
is one bisect over ~12 edges. It never raises on odd values: NaN and infinities are skipped.
"""

from __future__ import annotations

import bisect
import fnmatch
import math
from collections import deque
from dataclasses import dataclass

BINS = 10


@dataclass(frozen=True)
class DataAlarm:
    feature: str
    psi: float
    position: int  # values of this feature seen when it fired


def psi(expected: list[int], actual: list[int]) -> float:
    """Population Stability Index of two histograms over the same bins (counts, smoothed).

        >>> round(psi([50, 50], [50, 50]), 3)
        0.0
    """
    n_e, n_a, k = sum(expected), sum(actual), len(expected)
    total = 0.0
    for e, a in zip(expected, actual):
        pe = (e + 0.5) / (n_e + 0.5 * k)
        pa = (a + 0.5) / (n_a + 0.5 * k)
        total += (pa - pe) * math.log(pa / pe)
    return total


class FeatureDrift:
    """PSI of one feature's recent values against its reference."""

    def __init__(self, window: int, threshold: float) -> None:
        self.window = window
        self.threshold = threshold
        self.check_every = max(1, window // 5)
        self.reference_values: list[float] | None = []  # until the bins are fixed
        self.edges: list[float] = []
        self.reference: list[int] = []
        self.recent: deque[int] = deque(maxlen=window)
        self.recent_counts: list[int] = []
        self.seen = 0
        self.since_check = 0

    def update(self, x: float) -> float | None:
        """Add a value; returns the PSI when it crossed the threshold (drift), else None."""
        self.seen += 1
        if self.reference_values is not None:
            self.reference_values.append(x)
            if len(self.reference_values) >= self.window:
                self._fix_bins(self.reference_values)
                self.reference_values = None
            return None
        b = bisect.bisect_right(self.edges, x)
        if len(self.recent) == self.recent.maxlen:
            self.recent_counts[self.recent[0]] -= 1
        self.recent.append(b)
        self.recent_counts[b] += 1
        self.since_check += 1
        if len(self.recent) < self.window or self.since_check < self.check_every:
            return None
        self.since_check = 0
        value = psi(self.reference, self.recent_counts)
        if value < self.threshold:
            return None
        # The new regime becomes the reference (new bins from the next `window` values): one
        # shift, one alarm -- not one per check while the recent window still mixes both regimes.
        self.reference_values = []
        self.recent.clear()
        self.since_check = 0
        return value

    def _fix_bins(self, values: list[float]) -> None:
        ordered = sorted(values)
        n = len(ordered)
        quantiles = [ordered[min(n - 1, (n * q) // BINS)] for q in range(1, BINS)]
        self.edges = sorted(set([ordered[0], *quantiles, math.nextafter(ordered[-1], math.inf)]))
        self.reference = [0] * (len(self.edges) + 1)
        for v in values:
            self.reference[bisect.bisect_right(self.edges, v)] += 1
        self.recent_counts = [0] * len(self.reference)


class DataDriftMonitor:
    """One `FeatureDrift` per feature name (at most `max_features`), except the names matching an
    `ignore` pattern (fnmatch): a counter or a time-since feature moves by construction, and its
    PSI would cry drift on every window."""

    def __init__(self, window: int = 1000, threshold: float = 0.25, max_features: int = 256,
                 ignore: tuple[str, ...] | list[str] = ()) -> None:
        self.window = window
        self.threshold = threshold
        self.max_features = max_features
        self.ignore = tuple(ignore)
        self.ignored: set[str] = set()
        self.features: dict[str, FeatureDrift] = {}

    def update(self, values: dict[str, float]) -> list[DataAlarm]:
        alarms: list[DataAlarm] = []
        for name, x in values.items():
            if not isinstance(x, (int, float)) or not math.isfinite(x):
                continue
            fd = self.features.get(name)
            if fd is None:
                if name in self.ignored:
                    continue
                if any(fnmatch.fnmatchcase(name, pattern) for pattern in self.ignore):
                    self.ignored.add(name)
                    continue
                if len(self.features) >= self.max_features:
                    continue
                fd = self.features[name] = FeatureDrift(self.window, self.threshold)
            value = fd.update(float(x))
            if value is not None:
                alarms.append(DataAlarm(name, round(value, 6), fd.seen))
        return alarms

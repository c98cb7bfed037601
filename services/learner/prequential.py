"""Prequential (test-then-train) metrics of one model version in one role.

    >>> stats = Prequential(window=2)
    >>> stats.update("1", "1", {"1": 0.9, "0": 0.1}), stats.update("1", "0", {"1": 0.2, "0": 0.8})
    (True, False)
    >>> stats.accuracy, stats.window_accuracy, stats.n
    (0.5, 0.5, 2)

Each update scores the prediction that was made at event time, before the label was learned, so
these are honest online figures. Plain picklable state: it lives in the learner's checkpoint.
"""

from __future__ import annotations

import math
from collections import deque

EPS = 1e-15


class Prequential:
    def __init__(self, window: int = 1000) -> None:
        self.n = 0
        self.correct = 0
        self.loss_sum = 0.0
        self.loss_n = 0  # examples with a probability to score (none before the first class is known)
        self.recent: deque[int] = deque(maxlen=max(1, window))

    def update(self, y_true: str, y_pred: str | None, proba: dict[str, float]) -> bool:
        """Count one example; returns whether the prediction was right."""
        hit = y_pred is not None and y_pred == y_true
        self.n += 1
        self.correct += hit
        self.recent.append(int(hit))
        if proba:
            p = min(max(proba.get(y_true, 0.0), EPS), 1.0)
            self.loss_sum -= math.log(p)
            self.loss_n += 1
        return hit

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0

    @property
    def window_accuracy(self) -> float:
        return sum(self.recent) / len(self.recent) if self.recent else 0.0

    @property
    def log_loss(self) -> float:
        return self.loss_sum / self.loss_n if self.loss_n else 0.0

    def as_dict(self) -> dict[str, float]:
        return {"n": self.n, "accuracy": self.accuracy, "window_accuracy": self.window_accuracy,
                "log_loss": self.log_loss}

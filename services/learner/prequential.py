"""Prequential (test-then-train) metrics of one model version in one role.

    >>> stats = Prequential(window=2)
    >>> stats.update("1", "1", {"1": 0.9, "0": 0.1}), stats.update("1", "0", {"1": 0.2, "0": 0.8})
    (True, False)
    >>> stats.accuracy, stats.window_accuracy, stats.n
    (0.5, 0.5, 2)

A regressor's examples go through `update_error` (river's own MAE, RMSE and R², and the MAE of
the last `window`):

    >>> reg = Prequential(window=2)
    >>> reg.update_error(10.0, 12.0), reg.update_error(20.0, 19.0), reg.update_error(30.0, None)
    (2.0, 1.0, None)
    >>> reg.mae, reg.window_mae, reg.n
    (1.5, 1.5, 3)
    >>> reg.update_error(1.0, 1e200)  # a diverged model's answer: counted as the largest error
    1e+100

Each update scores the prediction that was made at event time, before the label was learned, so
these are honest online figures. Plain picklable state: it lives in the learner's checkpoint.
"""

from __future__ import annotations

import math
from collections import deque

from river import metrics, utils

from ..drift.detectors import MAX_ABS_ERROR

EPS = 1e-15


class Prequential:
    def __init__(self, window: int = 1000) -> None:
        self.n = 0
        self.correct = 0
        self.loss_sum = 0.0
        self.loss_n = 0  # examples with a probability to score (none before the first class is known)
        self.recent: deque[int] = deque(maxlen=max(1, window))
        self._regression(window)

    def _regression(self, window: int) -> None:
        self.scored = 0  # regression examples with a prediction to score
        self.mae_metric, self.rmse_metric, self.r2_metric = metrics.MAE(), metrics.RMSE(), metrics.R2()
        self.window_mae_metric = utils.Rolling(metrics.MAE(), window_size=max(1, window))

    def __setstate__(self, state: dict) -> None:  # a checkpoint from before regression metrics
        self.__dict__.update(state)
        if "mae_metric" not in state:
            self._regression(self.recent.maxlen or 1000)

    def update(self, y_true: str, y_pred: str | None, proba: dict[str, float]) -> bool:
        """Count one example; returns whether the prediction was right."""
        hit = y_pred is not None and y_pred == y_true
        self.n += 1
        self.correct += hit
        self.recent.append(int(hit))
        if proba:
            p = proba.get(y_true, 0.0)
            p = min(max(p, EPS), 1.0) if p == p else EPS  # NaN (a diverged model): the worst, not NaN
            self.loss_sum -= math.log(p)
            self.loss_n += 1
        return hit

    def update_error(self, y_true: float, y_pred: float | None) -> float | None:
        """Count one regression example; returns its absolute error (None: no prediction yet)."""
        self.n += 1
        if y_pred is None:
            return None
        self.scored += 1
        y_pred = min(max(y_pred, y_true - MAX_ABS_ERROR), y_true + MAX_ABS_ERROR)  # RMSE squares it
        for metric in (self.mae_metric, self.rmse_metric, self.r2_metric, self.window_mae_metric):
            metric.update(y_true, y_pred)
        return abs(y_pred - y_true)

    @property
    def mae(self) -> float:
        return self.mae_metric.get() if self.scored else 0.0

    @property
    def rmse(self) -> float:
        return self.rmse_metric.get() if self.scored else 0.0

    @property
    def r2(self) -> float:
        return self.r2_metric.get() if self.scored else 0.0

    @property
    def window_mae(self) -> float:
        return self.window_mae_metric.get() if self.scored else 0.0

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
        if self.scored:
            return {"n": self.n, "mae": self.mae, "rmse": self.rmse, "r2": self.r2, "window_mae": self.window_mae}
        return {"n": self.n, "accuracy": self.accuracy, "window_accuracy": self.window_accuracy,
                "log_loss": self.log_loss}

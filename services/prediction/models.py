"""The model the prediction service serves, and how it is swapped without stopping requests.

`ModelHolder.current` is the one reference requests read: a `replica.Replica`, which the follower
thread (follower.py) loads off the request path and keeps learning what the learner learns, and
replaces whole, in a single assignment (atomic under the GIL), when another version takes over. A
request reads the reference ONCE and uses it to the end, so it finishes on the version it started
with and names the version that really answered. The holder never gets a model whose artifact
signature was not checked, and a refused artifact never replaces the one that serves.

    holder = ModelHolder("default")
    holder.swap(Replica.from_artifact(*registry.load(1)))    # signature checked by the registry
    served = holder.current                                  # grab once per request
    prediction, proba = served.score({"price": 0.3})

Labels are strings everywhere in driftline; river gives back Python values (bool for binary
models trained on 0/1), mapped back by the learner's own `labels.proba_to_text`, so a served
prediction compares with a learned label exactly as the learner's predictions do.
"""

from __future__ import annotations

import math
from typing import Any

from ..learner.labels import answer
from ..shared import metrics


class NonFiniteOutput(ValueError):
    """The model's probabilities are not finite numbers (inputs far outside what it has seen)."""


def score(model: Any, x: dict[str, float]) -> tuple[str | None, dict[str, float]]:
    """(prediction, proba) of one vector, labels as strings (the learner's own mapping). The
    prediction is the argmax of proba, as river's `predict_one` does; None before the model has
    seen a label (empty proba). A regressor's prediction is its number as text, with no proba."""
    y_pred, proba = answer(model, x)
    if not all(math.isfinite(p) for p in proba.values()) or (y_pred is not None and not proba
                                                               and not math.isfinite(float(y_pred))):
        raise NonFiniteOutput("the model's output for these fields is not a finite number")
    return y_pred, proba


class ModelHolder:
    """The serving reference of one model name and role, replaced whole on every swap."""

    def __init__(self, model_name: str, gauge: bool = True) -> None:
        self.model_name = model_name
        self.current: Any = None  # a replica.Replica, or None before the first load
        self.refused: dict[int, str] = {}  # version -> why it was refused (for /v1/models, logs)
        self.gauge = gauge  # export the version it serves (the champion's holder)

    def swap(self, served: Any) -> None:
        self.current = served  # the one atomic step: readers see the old or the new replica, whole
        if self.gauge and served is not None:
            metrics.SERVING_VERSION.labels(self.model_name).set(served.version)
